"""Golden fixtures: committed chunks decode to committed arrays, and re-encode bit for bit.

The fixtures (tests/fixtures/codecs, written by make_fixtures.py) freeze the chunk formats
and the dither streams: any change that alters a decoded value of a committed chunk (format
1 or 2), or an encoded byte of a format-2 configuration (the one written today), breaks
archives already written, and fails here. Format-1 chunks can no longer be written; they
are only decoded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numcodecs
import numpy as np
import pytest
from test_segments_codec import check_segment_guarantee

from medustore.codecs import DiffThresholdCodec, LatticeCodec, threshold_info
from medustore.codecs.lattice import lattice_info
from medustore.testing import check_lattice_guarantee, lattice_header, threshold_header

FIXTURES = Path(__file__).parent / "fixtures" / "codecs"
LAT_ID = "medustore.lattice"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["cases"]
BY_NAME = {case["name"]: case for case in MANIFEST}


def load(case: dict, key: str) -> np.ndarray:
    return np.load(FIXTURES / case[key], allow_pickle=False)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_decodes_to_expected(name: str) -> None:
    case = BY_NAME[name]
    codec = numcodecs.get_codec(dict(case["config"]))
    decoded = codec.decode((FIXTURES / case["encoded"]).read_bytes())
    assert same_bits(decoded, load(case, "expected"))
    out = np.empty_like(load(case, "expected"))
    codec.decode((FIXTURES / case["encoded"]).read_bytes(), out=out)
    assert same_bits(out, load(case, "expected"))


CURRENT = sorted(n for n, c in BY_NAME.items() if c["version"] == 2)


@pytest.mark.parametrize("name", CURRENT)
def test_reencodes_to_same_bytes(name: str) -> None:
    case = BY_NAME[name]
    codec = numcodecs.get_codec(dict(case["config"]))
    encoded = codec.encode(load(case, "input"), segments=case["segments"])
    assert bytes(encoded) == (FIXTURES / case["encoded"]).read_bytes()


def test_both_formats_are_covered() -> None:
    versions = {c["version"] for c in MANIFEST}
    assert versions == {1, 2}
    layouts = {lattice_info((FIXTURES / c["encoded"]).read_bytes()).layout
               for c in MANIFEST if c["version"] == 2 and c["config"]["id"] == LAT_ID}
    assert layouts == {0, 1, 2}
    assert any(c["segments"] and len(c["segments"]) > 2 for c in MANIFEST)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_fixture_is_consistent(name: str) -> None:
    # The committed expectation itself obeys the codec's contract for the committed input.
    case = BY_NAME[name]
    x, expected = load(case, "input"), load(case, "expected")
    buf = (FIXTURES / case["encoded"]).read_bytes()
    assert buf[4] == case["version"]  # chunk format version
    flat = x.reshape(-1)
    assert expected.dtype == x.dtype and expected.shape == (x.size,)
    codec = numcodecs.get_codec(dict(case["config"]))
    if isinstance(codec, LatticeCodec):
        head = lattice_header(buf)
        assert head.seed == (codec.seed if head.mode else 0)
        if not head.mode:
            assert not expected.any()
        elif case["version"] == 1:
            check_lattice_guarantee(codec.lattice, flat, expected, head.scale)
        else:
            info = lattice_info(buf)
            scale, _codes, steps = codec.segment_steps(flat, case["segments"])
            assert info.scale == scale and [s for _, s in info.segments] == steps
            check_segment_guarantee(codec.lattice, flat, expected, info)
        # A chunk is self-describing: a codec with another config decodes it the same.
        assert same_bits(LatticeCodec("Z", step=99.0).decode(buf), expected)
        return
    assert isinstance(codec, DiffThresholdCodec)
    info = threshold_info(buf)
    keep, counts = codec.survivors(flat, case["segments"])
    assert info.tau == max(codec.taus(flat, case["segments"]), default=codec.tau(flat))
    assert (info.count, info.survivors) == (flat.size, int(keep.sum()))
    assert np.all(expected[~keep] == 0)
    if codec.inner is None:
        assert same_bits(expected[keep], flat[keep])
    elif keep.any():
        inner_buf = threshold_header(buf).inner
        if case["version"] == 1:
            inner = lattice_header(inner_buf)
            check_lattice_guarantee(codec.inner.lattice, flat[keep], expected[keep],
                                    inner.scale)
        else:
            inner = lattice_info(inner_buf)
            assert [n for n, _ in inner.segments] == [c for c in counts if c]
            check_segment_guarantee(codec.inner.lattice, flat[keep], expected[keep], inner)


def test_manifest_matches_script() -> None:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # defines the cases, writes nothing
    assert script.manifest()["cases"] == MANIFEST
    for name, (_config, input_spec, _segs, _version) in script.CASES.items():
        assert same_bits(script.make_input(*input_spec), load(BY_NAME[name], "input"))


def test_fixture_coverage_and_size() -> None:
    configs = [case["config"] for case in MANIFEST]
    lattices = {c["lattice"] for c in configs if c["id"] == "medustore.lattice"}
    assert lattices == {"Z", "A2", "D4", "E8"}
    assert any(c.get("step") for c in configs) and any(c.get("bits") for c in configs)
    dtypes = {load(case, "input").dtype.str for case in MANIFEST}
    assert dtypes == {"<f2", "<f4", "<f8"}
    inners = {json.dumps(c.get("inner")) for c in configs if c["id"] == "medustore.diffthreshold"}
    assert "null" in inners and len(inners) >= 2
    names = {p.name for p in FIXTURES.iterdir()}
    listed = {case[k] for case in MANIFEST for k in ("input", "encoded", "expected")}
    assert listed <= names
    assert names - listed == {"make_fixtures.py", "manifest.json"}
    total = sum((FIXTURES / n).stat().st_size for n in listed)
    assert total < 500 * 1024
    assert max((FIXTURES / n).stat().st_size for n in listed) < 16 * 1024
