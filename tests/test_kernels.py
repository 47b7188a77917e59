"""Compiled lattice kernels (`medustore.codecs._kernels`) against the numpy reference path.

The kernels are a second implementation of the codec's hot paths, not a new format: with
them every chunk must be the reference's byte for byte, every decoded value its value bit
for bit, and every damaged chunk must be refused (ValueError) exactly where the reference
refuses it. ``MEDUSTORE_KERNELS=numpy`` selects the reference path (read on every call).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
from hypothesis import given, settings
from pcodec import ChunkConfig, standalone

from medustore.codecs import LATTICES, LatticeCodec, _kernels, get_lattice
from medustore.codecs._format import varint
from medustore.codecs.lattice import (
    _CounterDither,
    _gather,
    _Piece,
    chunk_streams,
    lattice_info,
)
from medustore.testing import LATTICE_FIELDS, mutated_chunks, reframe, scaled_examples

pytestmark = pytest.mark.skipif(_kernels.numba is None, reason="numba is not installed")

NAMES = sorted(LATTICES)
FIXTURES = Path(__file__).parent / "fixtures" / "codecs"
GOLDEN = json.loads((FIXTURES / "manifest.json").read_text())["cases"]
#: 0..17 (tails of every length for every dimension), a few slabs, and chunks large
#: enough for the context layout with several segments per slab
SIZES = [*range(18), 61, 4099, 20001]


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels, whatever MEDUSTORE_KERNELS the suite runs with."""
    monkeypatch.setenv("MEDUSTORE_KERNELS", "numba")


def paths(fn: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """``fn()`` on the reference path, then on the kernels."""
    monkeypatch.setenv("MEDUSTORE_KERNELS", "numpy")
    assert not _kernels.available()
    ref = fn()
    monkeypatch.setenv("MEDUSTORE_KERNELS", "numba")
    assert _kernels.available()
    return ref, fn()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    uint = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(uint), b.view(uint)))


def segmentations(rng: np.random.Generator, n: int) -> list[list[int] | None]:
    """One segment; and three to five cut at random, zero lengths included."""
    out: list[list[int] | None] = [None]
    for k in (3, 5):
        cuts = np.sort(rng.integers(0, n + 1, size=k - 1))
        lengths = np.diff([0, *cuts.tolist(), n]).tolist()
        lengths.insert(int(rng.integers(0, len(lengths) + 1)), 0)
        out.append(lengths)
    return out


def chunk_input(rng: np.random.Generator, n: int, dtype: str, segments: list[int] | None,
                zero: int | None = None) -> np.ndarray:
    """Gaussian values, each segment at its own scale; one segment (``zero``, by default
    one at random) all zeros: not coded."""
    x = rng.standard_normal(n)
    if segments:
        bounds = np.cumsum([0, *segments])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            x[a:b] *= 10.0 ** rng.integers(-3, 3)
        zero = int(rng.integers(0, len(segments))) if zero is None else zero
        x[bounds[zero] : bounds[zero + 1]] = 0.0
    return x.astype(dtype)


def check_both_paths(codec: LatticeCodec, x: np.ndarray, segments: list[int] | None,
                     monkeypatch: pytest.MonkeyPatch) -> bytes:
    ref, kern = paths(lambda: bytes(codec.encode(x, segments=segments)), monkeypatch)
    assert kern == ref, f"chunk differs: {codec}, {x.size} {x.dtype} values, {segments}"
    dec_ref, dec_kern = paths(lambda: codec.decode(kern), monkeypatch)
    assert same_bits(dec_kern, dec_ref)
    out = np.full(x.size, np.nan, dtype=x.dtype)  # decoding into `out`, gaps included
    codec.decode(kern, out=out)
    assert same_bits(out, dec_ref)
    return kern


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_chunks_and_values_match_reference(name: str, bits: int, dtype: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng([NAMES.index(name), bits, np.dtype(dtype).itemsize])
    codec = LatticeCodec(name, bits=bits, seed=int(rng.integers(2**63)))
    for n in SIZES:
        for segments in segmentations(rng, n):
            check_both_paths(codec, chunk_input(rng, n, dtype, segments), segments,
                             monkeypatch)


@pytest.mark.parametrize("name", NAMES)
def test_large_chunks_match_reference(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past SMALL_CHUNK (context streams only), segments spanning many kernel slabs.
    rng = np.random.default_rng(17 + NAMES.index(name))
    n = 2**18 + 2**16 + 5
    segments = [70001, 0, 3, 123456, n - 70001 - 3 - 123456]
    for dtype, bits in (("<f4", 2), ("<f2", 8), ("<f8", 5)):
        x = chunk_input(rng, n, dtype, segments, zero=2)
        buf = check_both_paths(LatticeCodec(name, bits=bits, seed=99), x, segments,
                               monkeypatch)
        assert lattice_info(buf).layout == 0


@pytest.mark.parametrize("name", NAMES)
def test_every_layout_decodes_as_reference(name: str, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    # One stream (1) and one per coordinate (2) are read without contexts by the kernels.
    rng = np.random.default_rng(5)
    seen = set()
    for n in (61, 4099, 20000, 100000):
        for bits in (1, 2, 4, 8):
            x = rng.uniform(-1.0, 1.0, n).astype("<f4")
            buf = check_both_paths(LatticeCodec(name, bits=bits, seed=bits), x, None,
                                   monkeypatch)
            seen.add(lattice_info(buf).layout)
    assert seen == ({0} if name == "Z" else {0, 1, 2})


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: c["name"])
def test_golden_chunks_decode_as_reference(case: dict, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    # Formats 1 (numpy on both paths) and 2, every layout, the threshold codec's inner
    # chunks; test_golden checks the values themselves.
    codec = numcodecs.get_codec(dict(case["config"]))
    buf = (FIXTURES / case["encoded"]).read_bytes()
    ref, kern = paths(lambda: codec.decode(buf), monkeypatch)
    assert same_bits(kern, ref)


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8"])
@pytest.mark.parametrize("name", NAMES)
def test_dithered_values_match_reference(name: str, dtype: str) -> None:
    # The values the kernels quantise, compared before quantisation: a fused multiply-add
    # or a reordered sum would show here even where it does not move an index.
    lat = get_lattice(name)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(5000) * 40.0).astype(dtype)
    pieces = [_Piece(0, 1700, 0.7), _Piece(1710, 2300, 1e-3), _Piece(4000, 997, 3.25)]
    coded = sum(p.length for p in pieces)
    blocks = -(-coded // lat.dim)
    y = np.zeros(blocks * lat.dim)
    _gather(x, pieces, 0, coded, y)
    u = _CounterDither(12345, lat).fill(np.empty((blocks, lat.dim)))
    u += y.reshape(blocks, lat.dim)
    assert same_bits(_kernels.dithered_values(x, pieces, 12345, lat), u)


def tie_grid(rng: np.random.Generator, dim: int) -> np.ndarray:
    """Points on fine dyadic grids (and A2's sqrt3 multiples): rounding ties, equal
    coordinate errors and equidistant cosets, where an exact search must still agree."""
    parts = [rng.integers(-12, 13, size=(4096, dim)) / d for d in (2.0, 4.0, 8.0)]
    if dim == 2:
        g = rng.integers(-12, 13, size=(4096, 2)) / 4.0
        g[:, 1] *= float(np.sqrt(3.0))
        parts.append(g)
    parts.append(rng.standard_normal((4096, dim)) * 1e3)
    return np.concatenate(parts)


def near_cosets(rng: np.random.Generator, name: str, n: int = 20000) -> np.ndarray:
    """Points near the bisector of a point of A2's or E8's first coset and a neighbour in
    the second: the two distances agree to a few ulps, so which point is nearest depends
    on how they were rounded (a different order of operations flips many of them)."""
    if name == "A2":  # a in Z x sqrt3 Z, a + s in the other coset, |s| = 1
        r3 = float(np.sqrt(3.0))
        a = rng.integers(-50, 50, size=(n, 2)) * np.array([1.0, r3])
        s = np.stack([rng.choice([-0.5, 0.5], n), rng.choice([-1.0, 1.0], n) * r3 / 2], 1)
        tangent = np.stack([-s[:, 1], s[:, 0]], 1)
    else:  # a in D8, a + s in D8 + 1/2 (s = +-1/2 with an even number of minus signs)
        a = rng.integers(-50, 50, size=(n, 8)).astype(np.float64)
        a[:, 7] += a.sum(axis=1) % 2
        s = rng.choice([-0.5, 0.5], size=(n, 8))
        s[:, 7] *= np.where((s < 0).sum(axis=1) % 2 == 1, -1.0, 1.0)
        g = rng.standard_normal((n, 8))
        tangent = g - (np.sum(g * s, axis=1) / 2.0)[:, None] * s
        tangent /= 4.0 * np.linalg.norm(tangent, axis=1)[:, None]
    return a + s / 2 + rng.uniform(-0.4, 0.4, size=(n, 1)) * tangent


@pytest.mark.parametrize("name", NAMES)
def test_nearest_points_match_reference_on_ties(name: str) -> None:
    lat = get_lattice(name)
    if name == "E8" and not _kernels.enabled(lat, encode=True):
        pytest.skip("this numpy's einsum sums in another order: E8 encodes with numpy")
    rng = np.random.default_rng(11)
    z = tie_grid(rng, lat.dim)
    if name in ("A2", "E8"):
        z = np.concatenate([z, near_cosets(rng, name)])
    ref = lat.index_streams(z)
    mine = _kernels.nearest_streams(z, lat)
    assert len(mine) == len(ref)
    for a, b in zip(mine, ref, strict=True):
        assert a.dtype == np.int32 and np.array_equal(a, b)


def test_e8_sum_order_is_numpys_or_e8_encodes_with_numpy() -> None:
    d = np.random.default_rng(2).standard_normal((1000, 8)) * 7.0
    mine = np.empty(1000)
    _kernels._e8_rows(d, mine)
    agrees = np.array_equal(mine, np.einsum("ij,ij->i", d, d))
    assert _kernels.enabled(get_lattice("E8"), encode=True) == agrees
    assert _kernels.enabled(get_lattice("E8"))  # decoding sums nothing


def test_environment_selects_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDUSTORE_KERNELS", "numpy")
    assert not _kernels.available()
    assert not any(_kernels.enabled(lat, encode=True) for lat in LATTICES.values())
    monkeypatch.delenv("MEDUSTORE_KERNELS")
    assert _kernels.available()


def test_a_process_loads_the_kernels_after_a_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unset, the numpy path codes a process's first KERNEL_WARMUP values: a command that
    # decodes a few records does not pay the ~0.4 s of loading numba (same bytes either way).
    import sys

    import medustore.codecs.lattice as lattice_mod

    lat = get_lattice("A2")
    monkeypatch.delenv("MEDUSTORE_KERNELS", raising=False)
    monkeypatch.setattr(lattice_mod, "KERNEL_WARMUP", 1000)
    monkeypatch.setitem(lattice_mod._coded, "values", 0)
    monkeypatch.delitem(sys.modules, "medustore.codecs._kernels")  # as in a new process
    assert lattice_mod._compiled(lat, 600) is None
    assert lattice_mod._compiled(lat, 600) is _kernels  # 1,200 values coded: loaded
    monkeypatch.setitem(lattice_mod._coded, "values", 0)
    monkeypatch.setenv("MEDUSTORE_KERNELS", "numba")
    assert lattice_mod._compiled(lat, 1) is _kernels
    monkeypatch.setenv("MEDUSTORE_KERNELS", "numpy")
    assert lattice_mod._compiled(lat, 10**9) is None


def test_kernels_are_cached_on_disk() -> None:
    # cache=True on every compiled function: a new process loads instead of compiling
    from numba.core.caching import FunctionCache
    from numba.core.registry import CPUDispatcher

    jitted = [f for f in vars(_kernels).values() if isinstance(f, CPUDispatcher)]
    assert len(jitted) > 10
    assert all(isinstance(f._cache, FunctionCache) for f in jitted)
    assert all(f.targetoptions.get("nogil") for f in jitted)


# ---------------------------------------------------------------- damaged chunks

_X = np.random.default_rng(60).standard_normal(203).astype("<f4")
VALID = {
    "Z": LatticeCodec("Z", bits=2, seed=4).encode(_X[:17]),
    "A2": LatticeCodec("A2", bits=6, seed=2).encode(_X.astype("<f2")),
    "D4": LatticeCodec("D4", bits=3, seed=3).encode(_X.astype("<f8"), segments=[100, 103]),
    "E8": LatticeCodec("E8", bits=3, seed=1).encode(_X),
    # context layout (more than SMALL_CHUNK values), every stream in use
    "E8-contexts": LatticeCodec("E8", bits=1, seed=5).encode(
        np.random.default_rng(61).standard_normal(2**18 + 9).astype("<f4")),
}


def outcome(buf: bytes, out: np.ndarray | None = None) -> np.ndarray | type[ValueError]:
    """The decoded values, or ValueError; anything else fails the test."""
    try:
        return LatticeCodec().decode(buf, out=out)
    except ValueError:
        return ValueError


def same_outcome(buf: bytes, monkeypatch: pytest.MonkeyPatch, out_size: int | None = None
                 ) -> None:
    def run() -> np.ndarray | type[ValueError]:
        out = None if out_size is None else np.zeros(out_size, dtype="<f4")
        return outcome(buf, out)

    ref, kern = paths(run, monkeypatch)
    if ref is ValueError or kern is ValueError:
        assert ref is kern, "one path refuses the chunk, the other decodes it"
    else:
        assert same_bits(kern, ref)


@settings(max_examples=scaled_examples(300))
@given(buf=mutated_chunks(list(VALID.values()), LATTICE_FIELDS, table_offset=35))
def test_fuzz_damaged_chunks_same_outcome(buf: bytes) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        same_outcome(buf, monkeypatch)
        same_outcome(buf, monkeypatch, out_size=203)


def with_streams(buf: bytes, streams: list[np.ndarray]) -> bytes:
    """A one-segment version-2 chunk ``buf`` with its index streams replaced."""
    info = lattice_info(buf)
    assert info.version == 2 and len(info.segments) == 1
    payloads = [standalone.simple_compress(np.asarray(s, dtype=np.int32), ChunkConfig())
                for s in streams]
    head = bytearray(bytes(buf)[:35] + bytes([info.layout]) + varint(1))
    struct.pack_into("<H", head, 33, len(payloads))
    table = b"".join(varint(len(p)) for p in payloads)
    return reframe(bytes(head) + table + b"".join(payloads))


def context_breaking_edits(streams: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Streams with as many values in all, which no longer fit their contexts: a value
    moved from one stream to another, and the low bit (the context) of k0 flipped."""
    edits = []
    for i, j in ((1, 2), (2, 1), (len(streams) - 1, 1), (1, len(streams) - 1)):
        if streams[i].size:
            moved = [s.copy() for s in streams]
            moved[j] = np.append(moved[j], moved[i][-1])
            moved[i] = moved[i][:-1]
            edits.append(moved)
    for at in (0, len(streams[0]) // 2, len(streams[0]) - 1):
        flipped = [s.copy() for s in streams]
        flipped[0][at] ^= 1
        edits.append(flipped)
    return edits


@pytest.mark.parametrize("name", ["A2", "D4", "E8"])
def test_streams_that_do_not_fit_their_contexts_are_refused(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(62).standard_normal(2**18 + 3).astype("<f4")
    buf = LatticeCodec(name, bits=2, seed=8).encode(x)
    assert lattice_info(buf).layout == 0
    streams = chunk_streams(buf)
    same_outcome(with_streams(buf, streams), monkeypatch)  # the rebuilt chunk is valid
    assert outcome(with_streams(buf, streams)) is not ValueError
    for edited in context_breaking_edits(streams):
        bad = with_streams(buf, edited)
        for setting in ("numpy", "numba"):
            monkeypatch.setenv("MEDUSTORE_KERNELS", setting)
            with pytest.raises(ValueError, match="LatticeCodec: index stream"):
                LatticeCodec().decode(bad)


def test_truncated_streams_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = VALID["E8-contexts"]
    streams = chunk_streams(buf)
    for i in (0, 5, len(streams) - 1):
        short = [s if k != i else s[: s.size // 2] for k, s in enumerate(streams)]
        for setting in ("numpy", "numba"):
            monkeypatch.setenv("MEDUSTORE_KERNELS", setting)
            with pytest.raises(ValueError, match="LatticeCodec: index streams hold"):
                LatticeCodec().decode(with_streams(buf, short))
    for cut in (1, 7, len(buf) // 2):
        for setting in ("numpy", "numba"):
            monkeypatch.setenv("MEDUSTORE_KERNELS", setting)
            with pytest.raises(ValueError):
                LatticeCodec().decode(reframe(bytes(buf)[: -4 - cut]))


def test_numcodecs_round_trip_uses_either_path(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = numcodecs.get_codec({"id": "medustore.lattice", "lattice": "A2", "bits": 3,
                                 "seed": 7})
    x = np.random.default_rng(9).standard_normal((31, 7)).astype("<f4")
    ref, kern = paths(lambda: codec.decode(codec.encode(x)), monkeypatch)
    assert same_bits(kern, ref)
