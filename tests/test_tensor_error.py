"""Per-tensor coding error (`medustore.tensor_error`, ``inspect --tensors``) against the
truth: the same rounds recorded losslessly give the exact differentials, and the measured
squared error of each tensor must match the expected one the chunk headers give, within
the spread its second moments allow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import medustore
from medustore.cli import main
from medustore.tensor_error import tensor_errors

#: Tensors whose scales span four decades (a BatchNorm-like vector among them).
SHAPES = {"conv.weight": (24, 9, 9), "conv.bias": (24,), "bn.weight": (40,),
          "fc.weight": (10, 300)}
SCALES = {"conv.weight": 1e-1, "conv.bias": 1e-3, "bn.weight": 1e-4, "fc.weight": 3e-2}
ROUNDS, USERS = 8, 6


def _record(path: Path, policy: str) -> medustore.UpdateStore:
    rng = np.random.default_rng(11)
    model = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    store = medustore.open(path, "w", model=model, policy=policy)
    for t in range(ROUNDS):
        store.record_round(t, {u: {k: (SCALES[k] * rng.standard_normal(s)).astype(np.float32)
                                   for k, s in SHAPES.items()} for u in range(USERS)})
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, medustore.UpdateStore]:
    root = tmp_path_factory.mktemp("tensors")
    made = {p: _record(root / p, p) for p in ("full", "lattice")}
    yield made
    for s in made.values():
        s.close()


def test_expected_error_matches_the_measured_one(stores: dict) -> None:
    full, lossy = stores["full"], stores["lattice"]
    rows = {r.name: r for r in tensor_errors(lossy)}
    n = lossy.index.n_records
    assert n == full.index.n_records == ROUNDS * USERS
    err = {k: 0.0 for k in SHAPES}
    energy = {k: 0.0 for k in SHAPES}
    for t in range(ROUNDS):
        for u in range(USERS):
            exact, coded = full.record(t, u, out="numpy"), lossy.record(t, u, out="numpy")
            for k in SHAPES:
                d = coded[k].astype(np.float64) - exact[k]
                err[k] += float(d @ d.ravel()) if d.ndim == 1 else float((d * d).sum())
                energy[k] += float((exact[k].astype(np.float64) ** 2).sum())
    for k in SHAPES:
        values = n * math.prod(SHAPES[k])
        expected = rows[k].noise_rms ** 2 * values
        # sum of `values` squared errors, each with relative variance <= 0.8 per coordinate
        # (a uniform cell; E8 blocks of 8 at most 8x that): 5 sigma
        spread = 5 * math.sqrt(8 * 0.8 / values)
        assert abs(err[k] / expected - 1) < spread, (k, err[k], expected)
        assert rows[k].relative == pytest.approx(math.sqrt(expected / energy[k]), rel=spread)
    # per-tensor coding: every tensor's relative error within 2x of the whole model's
    whole = rows["(model)"].relative
    assert all(r.relative < 2 * whole for r in rows.values()), rows


def test_lossless_archive_has_no_coding_error(stores: dict) -> None:
    assert all(r.noise_rms == 0 and r.relative == 0 for r in tensor_errors(stores["full"]))
    with pytest.raises(ValueError, match="aggregate"):
        tensor_errors(stores["lattice"], "nothing")


def test_inspect_tensors(stores: dict) -> None:
    path = str(stores["lattice"].location)
    out = CliRunner().invoke(main, ["inspect", path, "--tensors"])
    assert out.exit_code == 0, out.output
    for k in (*SHAPES, "(model)"):
        assert any(line.startswith(k) for line in out.output.splitlines()), k
    data = json.loads(CliRunner().invoke(main, ["inspect", path, "--tensors", "--json"]).stdout)
    api = [r.to_json() for r in tensor_errors(stores["lattice"])]
    assert data["tensors"]["records"] == api
    assert "tensors" not in json.loads(CliRunner().invoke(main, ["inspect", path,
                                                                 "--json"]).stdout)
