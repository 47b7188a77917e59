"""An archive opens in a process where no entry point is installed (a source checkout):
importing medustore registers its codecs with numcodecs and zarr itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import medustore

_CHILD = textwrap.dedent("""
    import importlib.metadata as md
    import sys

    real = md.entry_points

    def no_codec_entry_points(**kw):
        found = real(**kw)
        if isinstance(found, dict):  # Python 3.11: groups by name when called without args
            found = [e for group in found.values() for e in group]
        return md.EntryPoints([e for e in found if not e.value.startswith("medustore")])

    md.entry_points = no_codec_entry_points  # before zarr or numcodecs look them up
    import numpy as np
    import medustore

    with medustore.open(sys.argv[1]) as store:
        np.save(sys.argv[2], store.unlearn("b", out="flat"))
""")


def test_archive_opens_without_entry_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    policy = medustore.MeduPolicy(coord_threshold=0.5, lattice="E8", bits=3, aggregate_bits=4,
                                  seed=5)
    path = tmp_path / "a"
    with medustore.open(path, "w", model=np.zeros(64, np.float32), policy=policy) as store:
        for t in range(3):
            store.record_round(t, {u: rng.normal(size=64).astype(np.float32)
                                   for u in ("a", "b", "c")})
        expected = store.unlearn("b", out="flat")
    out = tmp_path / "child.npy"
    subprocess.run([sys.executable, "-c", _CHILD, str(path), str(out)], check=True,
                   timeout=120)
    np.testing.assert_array_equal(np.load(out), expected)
