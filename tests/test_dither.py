"""The counter-based dither of format 2: definition, numpy == torch bit for bit, statistics."""

from __future__ import annotations

import numpy as np
import pytest

from medustore.codecs import LATTICES, LatticeCodec, get_lattice
from medustore.codecs.dither import (
    GAMMA,
    chunk_key,
    dither_values,
    mix64,
    uniform,
)
from medustore.codecs.lattice import _CounterDither, lattice_info

NAMES = sorted(LATTICES)
SEEDS = [0, 1, 2, 12345, 2**32 - 1, 2**32, 2**62 + 7, 2**63 - 1, 2**63, 2**63 + 1,
         0x9E3779B97F4A7C15, 2**64 - 2, 2**64 - 1]
RANGES = [(0, 1), (0, 17), (5, 3), (7, 1000), (2**20 - 3, 64), (2**40 + 1, 33),
          (2**62 - 10, 10)]


def reference(seed: int, p: int) -> float:
    """The definition, on Python ints."""
    h = mix64(chunk_key(seed) ^ ((p * GAMMA) % 2**64))
    return (h >> 11) * 2.0**-53


def test_numpy_matches_the_definition() -> None:
    for seed in SEEDS:
        for offset, n in RANGES:
            got = uniform(seed, offset, min(n, 40))
            want = [reference(seed, p) for p in range(offset, offset + got.size)]
            assert got.tolist() == want


def test_known_values() -> None:
    # Frozen: a change here changes every format-2 chunk.
    assert chunk_key(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output for state 0
    assert uniform(0, 0, 3).tobytes().hex() == (
        "".join(np.array([reference(0, p) for p in range(3)]).tobytes().hex()))
    assert uniform(2**64 - 1, 2**40, 1)[0] == reference(2**64 - 1, 2**40)


def test_seed_and_range_checks() -> None:
    for bad in (-1, 2**64, 1.5):
        with pytest.raises(ValueError):
            uniform(bad, 0, 4)
    with pytest.raises(ValueError):
        uniform(1, 2**62, 1)


def test_positions_are_independent_of_slabs() -> None:
    whole = uniform(99, 0, 5000)
    parts = np.concatenate([uniform(99, a, b - a) for a, b in ((0, 1), (1, 777), (777, 5000))])
    assert whole.tobytes() == parts.tobytes()
    for name in NAMES:
        lat = get_lattice(name)
        blocks = 5000 // lat.dim
        source = _CounterDither(99, lat)
        slabs = [source.fill(np.empty((nb, lat.dim))) for nb in (1, 3, blocks - 4)]
        assert np.concatenate(slabs).reshape(-1).tobytes() == dither_values(
            99, 0, blocks * lat.dim, lat).tobytes()


def test_uniform_over_the_box() -> None:
    for name in NAMES:
        lat = get_lattice(name)
        u = dither_values(123, 0, 50_000 * lat.dim, lat).reshape(-1, lat.dim)
        assert (u >= 0).all() and (u < lat.widths).all()
        np.testing.assert_allclose(u.mean(axis=0), lat.widths / 2, rtol=0.02)
        np.testing.assert_allclose(u.var(axis=0), lat.widths**2 / 12, rtol=0.03)
    r = uniform(5, 0, 2**16)
    # neighbouring positions and neighbouring seeds are uncorrelated
    assert abs(np.corrcoef(r[:-1], r[1:])[0, 1]) < 6 / np.sqrt(r.size)
    assert abs(np.corrcoef(r, uniform(6, 0, r.size))[0, 1]) < 6 / np.sqrt(r.size)
    # shifted keys do not give shifted streams (XOR, not addition, with the position)
    assert not np.array_equal(uniform(5, 1, 100), uniform(5 + GAMMA, 0, 100))


def test_codec_uses_the_counter_dither() -> None:
    # x = 0 on Z with step 1: q = round(u), x_hat = q - u; with u from the definition.
    x = np.zeros(300)
    x[0] = 1.0  # not a zero chunk
    codec = LatticeCodec("Z", step=1.0, seed=2**63 + 3)
    dec = codec.decode(codec.encode(x))
    u = dither_values(2**63 + 3, 0, 300, "Z")
    want = np.rint(x + u) - u
    assert dec.tobytes() == want.tobytes()
    assert lattice_info(codec.encode(x)).seed == 2**63 + 3


def _torch():
    return pytest.importorskip("torch", reason="torch is not installed: the numpy/torch "
                                               "identity of the dither cannot be checked")


@pytest.mark.parametrize("name", NAMES)
def test_torch_is_bit_identical(name: str) -> None:
    torch = _torch()
    from medustore.codecs.dither import dither_values_torch, uniform_torch

    rng = np.random.default_rng(7)
    seeds = SEEDS + [int(s) for s in rng.integers(0, 2**63, 20, dtype=np.int64)] + [
        int(s) + 2**63 for s in rng.integers(0, 2**63, 20, dtype=np.int64)]
    for seed in seeds:
        for offset, n in RANGES:
            a = dither_values(seed, offset, n, name)
            b = dither_values_torch(seed, offset, n, name)
            assert b.dtype == torch.float64
            assert a.tobytes() == b.numpy().tobytes(), (seed, offset, n)
        assert uniform(seed, 3, 500).tobytes() == uniform_torch(seed, 3, 500).numpy().tobytes()


def test_torch_large_and_empty() -> None:
    _torch()
    from medustore.codecs.dither import dither_values_torch

    assert dither_values_torch(1, 0, 0, "E8").numel() == 0
    a = dither_values(2**64 - 1, 0, 2**18, "A2")
    assert a.tobytes() == dither_values_torch(2**64 - 1, 0, 2**18, "A2").numpy().tobytes()
