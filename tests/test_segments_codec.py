"""Chunk format 2: per-segment cell sizes, segments of zeros, stream layouts, fuzzing."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medustore.codecs import LATTICES, DiffThresholdCodec, LatticeCodec, get_lattice
from medustore.codecs._format import ChunkReader, varint
from medustore.codecs.lattice import (
    SMALL_CHUNK,
    LatticeInfo,
    chunk_streams,
    lattice_info,
    normalize_segments,
)
from medustore.testing import (
    LATTICE_FIELDS,
    THRESHOLD_FIELDS,
    in_voronoi,
    mutated_chunks,
    reframe,
    scaled_examples,
    threshold_header,
)

NAMES = sorted(LATTICES)
_EPS64 = float(np.finfo(np.float64).eps)


def check_segment_guarantee(lattice: str, x: np.ndarray, xhat: np.ndarray,
                            info: LatticeInfo) -> None:
    """Assert format 2's bound: segments of zeros decode to exact zeros; over the coded
    segments, concatenated, each value's error divided by its own segment's
    ``t_j = s_j / volume**(1/n)`` gives blocks inside the Voronoi cell of the lattice
    (up to the rounding slack of `medustore.testing.cast_tolerance`, per value); a tail
    block has only its norm checked (its padding's error is not observable)."""
    lat = get_lattice(lattice)
    x = np.asarray(x).reshape(-1)
    xhat = np.asarray(xhat).reshape(-1)
    assert sum(n for n, _ in info.segments) == x.size
    errs, tols, a = [], [], 0
    for n, s in info.segments:
        xs, hs = x[a : a + n].astype(np.float64), xhat[a : a + n]
        a += n
        if s == 0.0:
            assert not xs.any() and not hs.any()
            continue
        t = s / lat.volume ** (1.0 / lat.dim)
        errs.append((hs.astype(np.float64) - xs) / t)
        fi = np.finfo(xhat.dtype)
        _, exp = np.frexp(np.abs(hs.astype(np.float64)))
        ulp = np.maximum(np.ldexp(float(fi.eps), exp - 1), float(fi.smallest_subnormal))
        tols.append(0.5 * ulp / t + 16.0 * _EPS64 * (np.abs(xs) / t + 4.0))
    if not errs:
        return
    e, tol = np.concatenate(errs), np.concatenate(tols)
    blocks = -(-e.size // lat.dim)
    pad = blocks * lat.dim - e.size
    e = np.concatenate([e, np.zeros(pad)]).reshape(blocks, lat.dim)
    tol = np.concatenate([tol, np.zeros(pad)]).reshape(blocks, lat.dim).sum(axis=1)
    norms = np.sqrt(np.einsum("ij,ij->i", e, e))
    assert (norms <= lat.covering_radius + tol).all(), norms.max()
    complete = (blocks * lat.dim - pad) // lat.dim
    assert in_voronoi(lat, e[:complete], tol[:complete]).all()


def layered(sizes: list[int], scales: list[float], seed: int, dtype: str = "f8"
            ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, 1.0, sum(sizes)) * np.repeat(scales, sizes)).astype(dtype)


# ---------------------------------------------------------------- the segment table


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["f2", "f4", "f8"])
def test_segments_round_trip_with_their_own_scale(name: str, dtype: str) -> None:
    sizes, scales = [301, 64, 40, 7, 195], [1.0, 1e-3, 0.0, 3e-2, 1e-1]
    x = layered(sizes, scales, seed=1, dtype=dtype)
    codec = LatticeCodec(name, bits=3, seed=5)
    enc = codec.encode(x, segments=sizes)
    info = lattice_info(enc)
    assert info.version == 2 and [n for n, _ in info.segments] == sizes
    scale, _codes, steps = codec.segment_steps(x, sizes)
    assert info.scale == scale and [s for _, s in info.segments] == steps
    dec = codec.decode(enc)
    check_segment_guarantee(name, x, dec, info)
    # each step is within 1/32 octave of the segment's own ideal, the largest exact
    for (n, s), sc, a in zip(info.segments, scales, np.cumsum([0, *sizes]), strict=False):
        if sc == 0.0:
            assert s == 0.0 and not dec[a : a + n].any()
            continue
        ideal = LatticeCodec(name, bits=3).cell_size(x[a : a + n])
        assert abs(np.log2(s / ideal)) <= 1 / 32 + 1e-12
    assert max(s for _, s in info.segments) == info.scale
    out = np.empty_like(x)
    assert codec.decode(enc, out=out) is out and out.tobytes() == dec.tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_one_segment_is_the_default(name: str) -> None:
    x = layered([500], [2.0], seed=2)
    codec = LatticeCodec(name, bits=2, seed=9)
    assert codec.encode(x) == codec.encode(x, segments=[500]) == codec.encode(x, [0, 500, 0])
    info = lattice_info(codec.encode(x))
    assert info.segments == ((500, codec.cell_size(x)),)
    # the one-segment header has no table: one byte for the layout, one for the count
    assert len(codec.encode(x, [250, 250])) > len(codec.encode(x))


def test_absolute_step_is_the_same_everywhere() -> None:
    sizes = [100, 50, 100]
    x = layered(sizes, [1.0, 0.0, 1e-3], seed=3)
    codec = LatticeCodec("E8", step=0.01, seed=4)
    info = lattice_info(codec.encode(x, sizes))
    assert info.segments == ((100, 0.01), (50, 0.0), (100, 0.01))
    check_segment_guarantee("E8", x, codec.decode(codec.encode(x, sizes)), info)


@pytest.mark.parametrize("name", NAMES)
def test_zero_segments_cost_nothing(name: str) -> None:
    x = layered([400, 4000, 400], [1.0, 0.0, 1.0], seed=4, dtype="f4")
    codec = LatticeCodec(name, bits=2, seed=1)
    with_zeros = codec.encode(x, [400, 4000, 400])
    without = codec.encode(np.concatenate([x[:400], x[4400:]]), [400, 400])
    assert abs(len(with_zeros) - len(without)) <= 4  # the table entry only
    dec = codec.decode(with_zeros)
    assert not dec[400:4400].any()
    # all segments zero: a zero chunk
    z = np.zeros(64, np.float32)
    assert lattice_info(codec.encode(z, [32, 32])).segments == ()
    assert not codec.decode(codec.encode(z, [32, 32])).any()


@pytest.mark.parametrize("bad", [[10, 10], [-1, 101], [50.5, 49.5], [True, 99], "ab", 5,
                                 [2**70, 0]])
def test_bad_segments_are_refused(bad: object) -> None:
    x = np.ones(100)
    for codec in (LatticeCodec("Z", seed=1), DiffThresholdCodec(relative=0.5)):
        with pytest.raises(ValueError, match="segments"):
            codec.encode(x, segments=bad)


def test_normalize_segments() -> None:
    assert normalize_segments(None, 5, "c") == [5]
    assert normalize_segments(None, 0, "c") == []
    assert normalize_segments([0, 2, 0, 3], 5, "c") == [2, 3]
    assert normalize_segments(np.array([2, 3]), 5, "c") == [2, 3]


def test_extreme_scale_ratios() -> None:
    # segments 600 orders of magnitude apart still code (coarser where float64 ends)
    x = np.concatenate([np.full(16, 1e300), np.full(16, -1e-300), np.full(16, 5e-324)])
    codec = LatticeCodec("D4", bits=4, seed=3)
    enc = codec.encode(x, [16, 16, 16])
    info = lattice_info(enc)
    dec = codec.decode(enc)
    assert np.isfinite(dec).all() and all(s > 0 for _, s in info.segments[:2])
    np.testing.assert_allclose(dec[:32], x[:32], rtol=0.5)
    # A segment whose cell size underflows float64 (subnormal data) is not coded, as a
    # format-1 chunk of such data is a zero chunk.
    assert info.segments[2][1] == 0.0 and not dec[32:].any()


# ---------------------------------------------------------------- statistics per segment


@pytest.mark.parametrize("name", NAMES)
def test_second_moment_per_segment(name: str) -> None:
    # Segment lengths not multiples of the dimension: blocks straddle segments.
    sizes, scales = [20001, 15003, 9999], [1.0, 1e-3, 3e-2]
    x = layered(sizes, scales, seed=5)
    codec = LatticeCodec(name, bits=4, seed=11)
    enc = codec.encode(x, sizes)
    err = codec.decode(enc) - x
    lat = get_lattice(name)
    a = 0
    for (n, s), _ in zip(lattice_info(enc).segments, scales, strict=True):
        g = (err[a : a + n] / s) ** 2
        a += n
        assert abs(g.mean() - lat.G) < 6 * g.std() / np.sqrt(n) + 0.002 * lat.G
        # error independent of the data within the segment
        r = np.corrcoef(err[a - n : a], x[a - n : a])[0, 1]
        assert abs(r) < 6 / np.sqrt(n)
    assert codec.expected_error(x, sizes) == pytest.approx(
        sum(lat.G * s * s * n for n, s in lattice_info(enc).segments))


@pytest.mark.parametrize("name", NAMES)
def test_unbiased_per_segment(name: str) -> None:
    sizes, scales = [61, 37, 30], [1.0, 1e-3, 1e-1]  # blocks straddle the boundaries
    x = layered(sizes, scales, seed=6)
    runs = 300
    total = np.zeros(x.size)
    steps = None
    for seed in range(runs):
        codec = LatticeCodec(name, bits=2, seed=7000 + seed)
        enc = codec.encode(x, sizes)
        total += codec.decode(enc)
        steps = [s for _, s in lattice_info(enc).segments]
    lat = get_lattice(name)
    bias = total / runs - x
    a = 0
    for n, s in zip(sizes, steps, strict=True):
        sigma = np.sqrt(lat.G / runs) * s
        assert np.abs(bias[a : a + n]).max() < 6 * sigma
        assert abs(bias[a : a + n].mean()) < 6 * sigma / np.sqrt(n)
        a += n


# ---------------------------------------------------------------- stream layouts


@pytest.mark.parametrize("name", ["A2", "D4", "E8"])
def test_small_chunks_take_the_smallest_layout(name: str) -> None:
    x = layered([4810], [1.0], seed=7, dtype="f4")
    enc = LatticeCodec(name, bits=2, seed=3).encode(x)
    info = lattice_info(enc)
    assert info.layout in (0, 1, 2)
    # Every layout decodes to the same values: the layout changes bytes, not indices.
    from medustore.codecs import lattice as mod

    sizes = {}
    for layout in (0, 1, 2):
        orig = mod._smallest_layout

        def forced(streams, k, blocks, lat, coded, layout=layout, orig=orig):
            best = orig(streams, k, blocks, lat, SMALL_CHUNK + 1)  # contexts only
            if layout == 0:
                return best
            if k is None:
                k = lat.to_index(lat.stream_points(streams, blocks)).astype(np.int32)
            arrays = ([np.ascontiguousarray(k.T).reshape(-1)] if layout == 1
                      else [np.ascontiguousarray(k[:, j]) for j in range(lat.dim)])
            return layout, [mod.standalone.simple_compress(a, mod._PCO) for a in arrays]

        mod._smallest_layout = forced
        try:
            buf = LatticeCodec(name, bits=2, seed=3).encode(x)
        finally:
            mod._smallest_layout = orig
        assert lattice_info(buf).layout == layout
        assert LatticeCodec().decode(buf).tobytes() == LatticeCodec().decode(enc).tobytes()
        sizes[layout] = len(buf)
    assert len(enc) == min(sizes.values())
    if name == "E8":  # the overhead of 17 streams on 4,810 values is gone
        assert len(enc) < 0.8 * sizes[0]


def test_large_chunks_keep_the_context_streams() -> None:
    x = layered([SMALL_CHUNK + 8], [1.0], seed=8, dtype="f4")
    enc = LatticeCodec("E8", bits=2, seed=3).encode(x)
    assert lattice_info(enc).layout == 0 and len(chunk_streams(enc)) == 17


# ---------------------------------------------------------------- threshold with segments


def test_threshold_per_segment() -> None:
    sizes, scales = [500, 300, 40, 160], [1.0, 1e-3, 0.0, 1e-1]
    x = layered(sizes, scales, seed=9, dtype="f4")
    inner = LatticeCodec("E8", bits=3, seed=2)
    codec = DiffThresholdCodec(relative=0.5, inner=inner)
    enc = codec.encode(x, sizes)
    taus = codec.taus(x, sizes)
    assert taus[2] == 0.0 and taus[1] < 1e-2 * taus[0]
    keep, counts = codec.survivors(x, sizes)
    a = 0
    for n, tau, c in zip(sizes, taus, counts, strict=True):
        assert c == int((np.abs(x[a : a + n].astype(np.float64)) > tau).sum())
        a += n
    # a single relative tau would have zeroed the whole small-scale segment
    assert counts[1] > 0.5 * sizes[1]
    dec = codec.decode(enc)
    assert not dec[~keep].any()
    head = threshold_header(enc)
    assert head.version == 2 and head.tau == max(taus)
    info = lattice_info(head.inner)
    assert [n for n, _ in info.segments] == [c for c in counts if c]
    check_segment_guarantee("E8", x[keep], dec[keep], info)
    # lossless inner: exact survivors
    lossless = DiffThresholdCodec(relative=0.5)
    dec = lossless.decode(lossless.encode(x, sizes))
    assert dec[keep].tobytes() == x[keep].tobytes() and not dec[~keep].any()
    # absolute threshold: segments change nothing but the inner table
    absolute = DiffThresholdCodec(threshold=0.01)
    assert absolute.taus(x, sizes) == [0.01] * 4


# ---------------------------------------------------------------- varints and fuzzing


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, 2**64 - 1])
def test_varint_round_trip(n: int) -> None:
    body = b"MDLC\x02" + varint(n)
    r = ChunkReader(reframe(body), b"MDLC", (2,), "t")
    assert r.varint() == n
    r.finish()


@pytest.mark.parametrize("raw", [b"\x80\x00", b"\xff" * 11, b"\x80", b"\x81\x80\x00"])
def test_bad_varints_are_refused(raw: bytes) -> None:
    r = ChunkReader(reframe(b"MDLC\x02" + raw), b"MDLC", (2,), "t")
    with pytest.raises(ValueError):
        r.varint()


_SIZES = [301, 64, 40, 7, 195]
_XS = layered(_SIZES, [1.0, 1e-3, 0.0, 3e-2, 1e-1], seed=10, dtype="f4")
VALID = {
    **{name: LatticeCodec(name, bits=3, seed=7).encode(_XS, _SIZES) for name in NAMES},
    "ctx": LatticeCodec("E8", bits=2, seed=8).encode(_XS, _SIZES),
    "step": LatticeCodec("D4", step=1e-3, seed=9).encode(_XS.astype(np.float64), _SIZES),
}
THRESHOLD = DiffThresholdCodec(relative=0.3, inner=LatticeCodec("A2", bits=2, seed=3))
VALID_THRESHOLD = THRESHOLD.encode(_XS, _SIZES)


def decode_or_value_error(codec, buf: bytes, out: np.ndarray | None = None) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dec = codec.decode(buf, out=out)
    except ValueError:
        return
    assert isinstance(dec, np.ndarray) and dec.dtype.kind == "f"


@settings(max_examples=scaled_examples(400))
@given(buf=mutated_chunks(list(VALID.values()), LATTICE_FIELDS))
def test_fuzz_v2_lattice_chunks(buf: bytes) -> None:
    decode_or_value_error(LatticeCodec(), buf)
    decode_or_value_error(LatticeCodec(), buf, out=np.empty(_XS.size, np.float32))


@settings(max_examples=scaled_examples(300))
@given(data=st.data())
def test_fuzz_v2_segment_tables(data: st.DataObject) -> None:
    # Rewrite the table after the fixed header with arbitrary varints, checksum recomputed.
    buf = data.draw(st.sampled_from(list(VALID.values())))
    body = bytearray(buf[:-4])
    head = 35
    values = data.draw(st.lists(st.one_of(st.integers(0, 600), st.integers(0, 2**64 - 1)),
                                min_size=1, max_size=12))
    layout = data.draw(st.integers(0, 3))
    keep = data.draw(st.integers(0, 40))
    table = bytes([layout]) + b"".join(varint(v) for v in values)
    new = bytes(body[:head]) + table + bytes(body[head + keep :])
    decode_or_value_error(LatticeCodec(), reframe(new))
    decode_or_value_error(LatticeCodec(), reframe(new), out=np.empty(_XS.size, np.float32))


@settings(max_examples=scaled_examples(200))
@given(buf=mutated_chunks([VALID_THRESHOLD], THRESHOLD_FIELDS))
def test_fuzz_v2_threshold_chunks(buf: bytes) -> None:
    decode_or_value_error(THRESHOLD, buf)


def test_header_table_edits_are_refused() -> None:
    buf = VALID["E8"]
    body = bytearray(buf[:-4])
    for layout, message in ((3, "layout"), (0, "streams")):
        edited = bytes(body[:35]) + bytes([layout]) + bytes(body[36:])
        with pytest.raises(ValueError, match=message):
            LatticeCodec().decode(reframe(edited))
    # a table that does not add up to the count
    table = bytes([1]) + varint(2) + varint(300) + varint(1) + varint(300) + varint(1)
    with pytest.raises(ValueError):
        LatticeCodec().decode(reframe(bytes(body[:35]) + table + bytes(body[36:])))
    # a single-stream layout claimed for a large chunk
    big = struct.pack("<BBBQdQBH", 8, 2, 1, SMALL_CHUNK + 8, 1.0, 1, 4, 1)
    with pytest.raises(ValueError, match="large chunk"):
        LatticeCodec().decode(reframe(b"MDLC\x02" + big + b"\x01\x01" + varint(0)))
