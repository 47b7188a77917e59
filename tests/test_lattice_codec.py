"""LatticeCodec: the error guarantee, unbiasedness, second moments, the Codec contract."""

from __future__ import annotations

import json
import struct
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import pytest
from _numcodecs_checks import check_config
from hypothesis import given, settings
from hypothesis import strategies as st
from pcodec import ChunkConfig, standalone

from medustore.codecs import LATTICES, LatticeCodec, get_lattice
from medustore.codecs._format import MAX_VALUES_PER_BYTE, VALUE_ALLOWANCE
from medustore.codecs.lattice import chunk_streams, dither
from medustore.testing import (
    FLOAT_DTYPES,
    LATTICE_FIELDS,
    check_lattice_guarantee,
    codec_and_array,
    edit_field,
    lattice_header,
    make_array,
    mutated_chunks,
    natural_errors,
    reframe,
    scaled_examples,
)

NAMES = sorted(LATTICES)
FIXTURES = Path(__file__).parent / "fixtures" / "codecs"
SQRT_2PIE = float(np.sqrt(2.0 * np.pi * np.e))
# Published normalized second moments (Conway & Sloane), independent of Lattice.G.
G_THEORY = {"Z": 1.0 / 12.0, "A2": 0.08019, "D4": 0.07660, "E8": 0.07168}


def round_trip(codec: LatticeCodec, x: np.ndarray) -> tuple[bytes, np.ndarray]:
    enc = codec.encode(x)
    return enc, codec.decode(enc)


def assert_guarantee(codec: LatticeCodec, x: np.ndarray) -> np.ndarray:
    """Encode, check header and the Voronoi bound with s read from the header."""
    enc, dec = round_trip(codec, x)
    head = lattice_header(enc)
    flat = np.asarray(x).reshape(-1)
    assert head.count == flat.size
    assert dec.shape == (flat.size,) and dec.dtype == flat.dtype.newbyteorder("<")
    if head.mode == 0:  # nothing coded: zeros or empty, reproduced exactly
        assert not flat.any() and not dec.any()
        return dec
    # cell_size may differ in the last bit for non-contiguous x (summation order).
    assert head.scale == pytest.approx(codec.cell_size(x), rel=1e-14) and head.scale > 0
    check_lattice_guarantee(codec.lattice, flat, dec, head.scale)
    return dec


# ---------------------------------------------------------------- the guarantee


@settings(max_examples=scaled_examples(300))
@given(case=codec_and_array())
def test_round_trip_guarantee(case: tuple[LatticeCodec, np.ndarray]) -> None:
    codec, x = case
    assert_guarantee(codec, x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("dtype", "exponents"), [
    ("f2", [-4, -2, 0, 2, 3]),
    ("f4", [-30, -15, 0, 15, 30]),
    ("f8", [-300, -30, 0, 30, 300]),
])
def test_scales(name: str, dtype: str, exponents: list[int]) -> None:
    for i, e in enumerate(exponents):
        x = make_array("gaussian", (257,), dtype, 10.0**e, seed=i)
        for codec in (LatticeCodec(name, bits=4, seed=i),
                      LatticeCodec(name, step=0.3 * 10.0**e, seed=i)):
            dec = assert_guarantee(codec, x)
            # The relative error does not depend on the scale.
            err = (dec.astype(np.float64) - x.astype(np.float64)) / codec.cell_size(x)
            rel = np.sqrt(np.mean(err**2))
            assert 0.2 < rel < 0.35


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits", [0.25, 1.0, 2.0, 6.0, 12.0, 20.0, 30.0])
def test_bits_range(name: str, bits: float) -> None:
    x = make_array("gaussian", (200,), "f8", 1.0, seed=3)
    dec = assert_guarantee(LatticeCodec(name, bits=bits, seed=5), x)
    assert np.all(np.isfinite(dec))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_huge_dynamic_range(name: str, dtype: np.dtype) -> None:
    x = make_array("dynamic", (500,), dtype, 1.0, seed=11)
    mags = np.abs(x.astype(np.float64))
    assert np.log10(mags.max()) - np.log10(mags[mags > 0].min()) > 9
    for codec in (LatticeCodec(name, bits=8, seed=1),
                  LatticeCodec(name, step=float(np.abs(x).max()) * 1e-6, seed=2)):
        assert_guarantee(codec, x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_constant_chunks(name: str, dtype: np.dtype) -> None:
    for value in (1.0, -3.5, 1e-3, 250.0):
        x = np.full((7, 9), value, dtype=dtype)
        assert_guarantee(LatticeCodec(name, bits=3, seed=8), x)
        assert_guarantee(LatticeCodec(name, step=abs(value) / 3, seed=8), x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_chunks(name: str, dtype: np.dtype) -> None:
    x = np.zeros((5, 13), dtype=dtype)
    enc, dec = round_trip(LatticeCodec(name, bits=4, seed=1), x)
    head = lattice_header(enc)
    assert (head.mode, head.count, head.streams) == (0, 65, 0)
    assert len(enc) < 64  # an all-zero chunk costs a header, not a stream per value
    assert dec.dtype == dtype and dec.shape == (65,) and not dec.any()
    # -0.0 counts as zero too.
    assert not LatticeCodec(name).decode(LatticeCodec(name).encode(-x)).any()
    # With an absolute step too (format 2): a segment of zeros is not coded.
    assert_guarantee(LatticeCodec(name, step=0.1, seed=2), x)
    enc = LatticeCodec(name, step=0.1, seed=2).encode(x)
    assert lattice_header(enc).mode == 0 and len(enc) < 64


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 0, 4)])
def test_empty_arrays(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    for codec in (LatticeCodec(name), LatticeCodec(name, step=1.0, seed=3)):
        enc, dec = round_trip(codec, np.zeros(shape, dtype=dtype))
        assert lattice_header(enc).count == 0
        assert dec.shape == (0,) and dec.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_zero_dimensional_input(name: str) -> None:
    x = np.float32(2.5)
    dec = assert_guarantee(LatticeCodec(name, step=0.5, seed=4), np.asarray(x))
    assert dec.shape == (1,)


@pytest.mark.parametrize("name", NAMES)
def test_lengths_not_multiple_of_dimension(name: str) -> None:
    for n in range(1, 20):
        x = make_array("gaussian", (n,), "f4", 1.0, seed=n)
        assert_guarantee(LatticeCodec(name, bits=5, seed=n), x)


@settings(max_examples=scaled_examples(100))
@given(case=codec_and_array(), pad_seed=st.integers(0, 2**32 - 1))
def test_tail_is_coded_as_zero_padding(case: tuple[LatticeCodec, np.ndarray],
                                       pad_seed: int) -> None:
    # The tail block is coded as if padded with zeros: same s and seed on the padded input
    # give the same values, and the padded blocks are complete, so the full Voronoi check
    # applies to the tail as well.
    codec, x = case
    flat = np.asarray(x).reshape(-1)
    dim = get_lattice(codec.lattice).dim
    if flat.size == 0 or codec.cell_size(flat) == 0.0:
        return
    s = codec.cell_size(flat)
    step_codec = LatticeCodec(codec.lattice, step=s, seed=codec.seed)
    padded = np.zeros(-(-flat.size // dim) * dim, dtype=flat.dtype)
    padded[: flat.size] = flat
    dec_padded = step_codec.decode(step_codec.encode(padded))
    np.testing.assert_array_equal(codec.decode(codec.encode(x)), dec_padded[: flat.size])
    check_lattice_guarantee(codec.lattice, padded, dec_padded, s)


@settings(max_examples=scaled_examples(100))
@given(case=codec_and_array())
def test_relative_mode_is_step_mode_with_cell_size(case: tuple[LatticeCodec, np.ndarray]
                                                   ) -> None:
    codec, x = case
    s = codec.cell_size(x)
    if codec.bits is None or s == 0.0:
        return
    # s = rms(x) sqrt(2 pi e) 2^-bits, the RMS scaled by the peak so that 1e300 is fine.
    x64 = np.asarray(x, np.float64).reshape(-1)
    peak = float(np.abs(x64).max())
    rms = peak * float(np.sqrt(np.mean((x64 / peak) ** 2)))
    assert s == pytest.approx(rms * SQRT_2PIE * 2.0**-codec.bits, rel=1e-12)
    assert LatticeCodec(codec.lattice, step=s, seed=codec.seed).encode(x) == codec.encode(x)


@pytest.mark.parametrize("name", NAMES)
def test_wide_indices(name: str) -> None:
    # Natural-unit magnitudes beyond 2**31 switch the index streams to 64 bits.
    x = make_array("uniform", (64,), "f8", 1.0, seed=12)
    t = 2.0**-33
    codec = LatticeCodec(name, step=t * get_lattice(name).scale_per_dim, seed=9)
    enc, dec = round_trip(codec, x)
    assert lattice_header(enc).width == 8
    check_lattice_guarantee(name, x, dec, codec.step)


@pytest.mark.parametrize("name", NAMES)
def test_step_too_small_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="too small"):
        LatticeCodec(name, step=1e-20).encode(np.ones(16))


# ---------------------------------------------------------------- edge cases of range

@pytest.mark.parametrize("name", ["A2", "E8"])
def test_int32_index_boundary(name: str) -> None:
    x = np.ones(8 * get_lattice(name).dim)
    t = 1.0 / (2**30 - 0.01)
    for seed in range(20):
        codec = LatticeCodec(name, step=t * get_lattice(name).scale_per_dim, seed=seed)
        check_lattice_guarantee(name, x, codec.decode(codec.encode(x)), codec.step)


def test_a2_small_step() -> None:
    x = make_array("gaussian", (1000,), "f8", 1.0, seed=0)
    codec = LatticeCodec("A2", step=1e-11, seed=1)
    check_lattice_guarantee("A2", x, codec.decode(codec.encode(x)), codec.step)


@pytest.mark.parametrize("dtype", ["f2", "f4"])
def test_reconstruction_stays_finite_near_dtype_max(dtype: str) -> None:
    x = np.full(64, np.finfo(dtype).max, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dec = LatticeCodec("Z", bits=1, seed=3).decode(LatticeCodec("Z", bits=1, seed=3)
                                                       .encode(x))
    assert np.all(np.isfinite(dec))


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["f4", "f8"])
def test_unbiased(name: str, dtype: str) -> None:
    # Mean reconstruction over R independent seeds -> x. Each value's error has variance
    # G s^2, so the mean over R seeds has standard deviation sqrt(G / R) s: allow 6 of them
    # per value (about 2e-9 per value to fail at random) and for the grand mean.
    lat = get_lattice(name)
    rng = np.random.default_rng(21)
    x = np.concatenate([rng.normal(0.0, 1.0, 200), [0.0, 0.25, 0.5, -0.3, 1.0, 2.0, -2.0]])
    x = x[: len(x) // lat.dim * lat.dim].astype(dtype)
    runs = 400
    total = np.zeros(x.size)
    for seed in range(runs):
        codec = LatticeCodec(name, bits=2, seed=1000 + seed)
        total += codec.decode(codec.encode(x))
    s = LatticeCodec(name, bits=2).cell_size(x)
    sigma_mean = np.sqrt(lat.G / runs) * s
    bias = total / runs - x.astype(np.float64)
    assert np.abs(bias).max() < 6 * sigma_mean
    assert abs(bias.mean()) < 6 * sigma_mean / np.sqrt(x.size)
    # Sanity: the per-run error is large compared with the bound being tested.
    assert sigma_mean * np.sqrt(runs) > 0.1


def _second_moment(name: str, x: np.ndarray, codec: LatticeCodec
                   ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Measured G, its standard error, per-value errors (data units) and s."""
    enc, dec = round_trip(codec, x)
    s = lattice_header(enc).scale
    e, t = natural_errors(name, x, dec, s)
    lat = get_lattice(name)
    per_block = np.einsum("ij,ij->i", e, e) / lat.dim * t * t / (s * s)
    return (float(per_block.mean()), float(per_block.std() / np.sqrt(per_block.size)),
            (dec.astype(np.float64) - x.astype(np.float64)), s)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("source", ["constant", "gaussian"])
def test_second_moment_matches_theory(name: str, source: str) -> None:
    n = 2**17
    rng = np.random.default_rng(31)
    if source == "constant":
        x = np.full(n, 0.3712)
        codec = LatticeCodec(name, step=0.25, seed=7)
    else:
        x = rng.normal(0.0, 2.0, n)
        codec = LatticeCodec(name, bits=4, seed=7)
    g, se, err, s = _second_moment(name, x, codec)
    assert abs(g - G_THEORY[name]) < 0.02 * G_THEORY[name]
    assert abs(g - get_lattice(name).G) < 6 * se
    if source == "gaussian":
        # Error uncorrelated with the input: |r| ~ 1/sqrt(n) under independence.
        r = np.corrcoef(err, x)[0, 1]
        assert abs(r) < 6 / np.sqrt(n)
        # ... and its power does not depend on the input's magnitude (quartile bins).
        edges = np.quantile(np.abs(x), [0.25, 0.5, 0.75])
        bins = np.digitize(np.abs(x), edges)
        sq = err**2 / s**2
        for b in range(4):
            part = sq[bins == b]
            assert abs(part.mean() - get_lattice(name).G) < 6 * part.std() / np.sqrt(part.size)


def test_lattices_beat_scalar_quantisation() -> None:
    # Same cell volume, less error per value: the point of the higher lattices.
    x = np.random.default_rng(32).normal(size=2**16)
    measured = {name: _second_moment(name, x, LatticeCodec(name, step=0.2, seed=1))[0]
                for name in NAMES}
    assert measured["Z"] > measured["A2"] > measured["D4"] > measured["E8"]


def test_rate_follows_bits() -> None:
    # With bits=b, Gaussian data costs about b bits per value plus the lattice's loss
    # against the Shannon bound (0.25 bit for Z); one more bit halves the RMS error.
    x = np.random.default_rng(33).normal(size=2**16)
    prev = None
    for b in (3, 4, 5, 6):
        codec = LatticeCodec("Z", bits=b, seed=2)
        enc, dec = round_trip(codec, x)
        rate = len(enc) * 8 / x.size
        assert b < rate < b + 0.45
        rmse = float(np.sqrt(np.mean((dec - x) ** 2)))
        if prev is not None:
            assert rmse == pytest.approx(prev / 2, rel=0.03)
        prev = rmse


def test_error_variance_prediction() -> None:
    x = np.random.default_rng(34).normal(size=4096)
    for name in NAMES:
        codec = LatticeCodec(name, bits=3)
        s = codec.cell_size(x)
        assert s == pytest.approx(np.sqrt(np.mean(x**2)) * SQRT_2PIE / 8, rel=1e-12)
        assert codec.error_variance(x) == pytest.approx(get_lattice(name).G * s * s, rel=1e-12)
    assert LatticeCodec(step=0.5).cell_size(x) == 0.5


def test_dither_is_uniform_over_the_box() -> None:
    for name in NAMES:
        lat = get_lattice(name)
        u = dither(123, 50_000, lat)
        assert u.shape == (50_000, lat.dim)
        assert np.all(u >= 0) and np.all(u < lat.widths)
        np.testing.assert_allclose(u.mean(axis=0), lat.widths / 2, rtol=0.02)
        np.testing.assert_array_equal(u, dither(123, 50_000, lat))
        assert not np.array_equal(u, dither(124, 50_000, lat))


# ---------------------------------------------------------------- seeds


def test_seeds() -> None:
    x = np.random.default_rng(40).normal(size=300).astype(np.float32)
    fixed = LatticeCodec("D4", bits=4, seed=77)
    assert fixed.encode(x) == fixed.encode(x)
    assert lattice_header(fixed.encode(x)).seed == 77
    assert LatticeCodec("D4", bits=4, seed=78).encode(x) != fixed.encode(x)
    # Without a seed every chunk draws its own dither (independent errors across chunks).
    fresh = LatticeCodec("D4", bits=4)
    a, b = fresh.encode(x), fresh.encode(x)
    assert lattice_header(a).seed != lattice_header(b).seed
    assert not np.array_equal(fresh.decode(a), fresh.decode(b))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_finite_input(dtype: np.dtype) -> None:
    x = np.ones((4, 5), dtype=dtype)
    x[0, 3] = np.nan
    x[1, 2] = np.inf
    x[3, 4] = -np.inf
    with pytest.raises(ValueError, match=r"\b3 NaN or infinite value\(s\), the first at flat "
                                         r"index 3\b"):
        LatticeCodec("E8").encode(x)
    y = np.zeros(10, dtype=dtype)
    y[9] = np.nan
    with pytest.raises(ValueError, match=r"\b1 NaN or infinite.*index 9\b"):
        LatticeCodec("Z", step=1.0).encode(y)


@pytest.mark.parametrize("bad", [
    np.arange(8, dtype=np.int32), np.arange(8), np.ones(8, dtype=bool),
    np.ones(8, dtype=np.complex64), np.ones(8, dtype=np.longdouble),
    np.array(["a", "b"]), np.array([1.0, None], dtype=object), b"\x00" * 16, [1, 2, 3],
])
def test_wrong_dtype(bad: object) -> None:
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        LatticeCodec().encode(bad)


@pytest.mark.parametrize("kwargs", [
    dict(lattice="B3"), dict(lattice="e8"), dict(lattice=3), dict(lattice=None),
    dict(bits=0), dict(bits=-1.0), dict(bits=30.5), dict(bits=float("nan")),
    dict(bits=float("inf")), dict(bits="4"),
    dict(step=0.0), dict(step=-1.0), dict(step=float("inf")), dict(step=float("nan")),
    dict(step="1"), dict(bits=4, step=1.0),
    dict(seed=-1), dict(seed=2**64), dict(seed=1.5), dict(seed="7"),
])
def test_bad_constructor_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LatticeCodec(**kwargs)


# ---------------------------------------------------------------- the Codec contract


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decode_into_out(dtype: np.dtype) -> None:
    x = make_array("gaussian", (6, 10), dtype, 1.0, seed=50)
    codec = LatticeCodec("A2", bits=5, seed=1)
    enc = codec.encode(x)
    expected = codec.decode(enc)
    for out in (np.empty(60, dtype=dtype), np.empty((6, 10), dtype=dtype),
                np.empty((10, 6), dtype=dtype, order="F")):
        got = codec.decode(enc, out=out)
        assert np.shares_memory(got, out)
        np.testing.assert_array_equal(out.reshape(-1, order="A"), expected)
    raw = bytearray(x.nbytes)
    codec.decode(enc, out=raw)
    assert bytes(raw) == expected.tobytes()
    with pytest.raises(ValueError):
        codec.decode(enc, out=np.empty(61, dtype=dtype))
    other = np.float64 if dtype != np.float64 else np.float32
    with pytest.raises(ValueError):
        codec.decode(enc, out=np.empty(60, dtype=other))
    with pytest.raises(ValueError):
        codec.decode(enc, out=bytearray(x.nbytes + 1))


def test_decode_accepts_buffer_types() -> None:
    x = make_array("gaussian", (100,), "f4", 1.0, seed=51)
    codec = LatticeCodec("E8", bits=3, seed=2)
    enc = codec.encode(x)
    expected = codec.decode(enc)
    for buf in (bytearray(enc), memoryview(enc), np.frombuffer(enc, dtype=np.uint8)):
        np.testing.assert_array_equal(codec.decode(buf), expected)


def test_big_endian_input() -> None:
    x = make_array("gaussian", (40,), "f8", 1.0, seed=52)
    codec = LatticeCodec("D4", bits=4, seed=3)
    assert codec.encode(x.astype(">f8")) == codec.encode(x)


CODECS = [
    LatticeCodec(),
    LatticeCodec("Z", bits=2.5),
    LatticeCodec("E8", bits=8, seed=2**64 - 1),
    LatticeCodec("D4", step=0.125, seed=0),
    LatticeCodec("A2", step=1e-3),
]


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_config_round_trip(codec: LatticeCodec) -> None:
    check_config(codec)  # numcodecs: JSON round trip, then the registry rebuilds it
    config = json.loads(json.dumps(codec.get_config()))
    assert config["id"] == "medustore.lattice"
    assert numcodecs.get_codec(config) == codec
    # from_config takes the config without its id (numcodecs' registry strips it).
    rebuilt = LatticeCodec.from_config({k: v for k, v in config.items() if k != "id"})
    assert rebuilt == codec and hash(rebuilt) == hash(codec)
    assert eval(repr(codec), {"LatticeCodec": LatticeCodec}) == codec


def test_equality_is_by_config() -> None:
    assert LatticeCodec("E8", bits=4) == LatticeCodec("E8", bits=4.0)
    assert LatticeCodec("E8", bits=4) != LatticeCodec("E8", bits=5)
    assert LatticeCodec("E8", seed=1) != LatticeCodec("E8", seed=2)
    assert LatticeCodec("Z", step=1.0) != LatticeCodec("A2", step=1.0)
    assert LatticeCodec() != numcodecs.Zstd()
    assert repr(LatticeCodec("Z", step=0.5)) == (
        "LatticeCodec(lattice='Z', bits=None, step=0.5, seed=None)")


def test_get_codec_with_partial_config() -> None:
    codec = numcodecs.get_codec({"id": "medustore.lattice", "lattice": "E8", "bits": 2})
    assert isinstance(codec, LatticeCodec)
    assert (codec.lattice, codec.bits, codec.step, codec.seed) == ("E8", 2.0, None, None)
    with pytest.raises(ValueError):
        numcodecs.get_codec({"id": "medustore.lattice", "lattice": "Q7"})


# ---------------------------------------------------------------- fuzzing

_X = make_array("gaussian", (203,), "f4", 1.0, seed=60)
VALID = {
    "E8": LatticeCodec("E8", bits=3, seed=1).encode(_X),
    "A2": LatticeCodec("A2", bits=6, seed=2).encode(_X.astype(np.float16)),
    "D4-wide": LatticeCodec("D4", step=2e-10, seed=3).encode(_X.astype(np.float64)),
    "Z": LatticeCodec("Z", bits=2, seed=4).encode(_X[:17]),
    "zero": LatticeCodec("D4").encode(np.zeros(40, dtype=np.float32)),
    "empty": LatticeCodec("E8", step=1.0).encode(np.zeros(0)),
    # format-1 chunks (committed fixtures): still decoded, so still fuzzed
    **{f"v1-{name}": (FIXTURES / f"lattice-{name}.bin").read_bytes()
       for name in ("E8-b4-f4", "A2-b2-f4", "D4-b3-f4", "Z-b4-f4")},
}


def decode_or_value_error(buf: bytes, out: np.ndarray | None = None) -> None:
    """Decoding either succeeds with a consistent array or raises ValueError."""
    codec = LatticeCodec()  # decoding reads everything it needs from the chunk
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # e.g. a huge edited scale
            dec = codec.decode(buf, out=out)
    except ValueError:
        return
    assert isinstance(dec, np.ndarray) and dec.dtype.kind == "f"
    assert dec.size == lattice_header(buf).count


@settings(max_examples=scaled_examples(400))
@given(buf=mutated_chunks(list(VALID.values()), LATTICE_FIELDS, table_offset=35))
def test_fuzz_mutated_chunks(buf: bytes) -> None:
    decode_or_value_error(buf)
    if len(buf) >= 16:
        decode_or_value_error(buf, out=np.empty(203, dtype=np.float32))


@settings(max_examples=scaled_examples(200))
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_value_error(data)


@settings(max_examples=scaled_examples(300))
@given(body=st.binary(max_size=400))
def test_fuzz_random_body_with_valid_frame(body: bytes) -> None:
    # Past the magic, version and checksum: only the header parser stands in the way.
    decode_or_value_error(reframe(b"MDLC\x01" + body))


def test_header_edits_reach_the_parser() -> None:
    # With the checksum recomputed, an edit is judged by the header checks themselves.
    buf = VALID["E8"]
    reseeded = edit_field(buf, LATTICE_FIELDS, "seed", 12345)
    a, b = LatticeCodec().decode(buf), LatticeCodec().decode(reseeded)
    assert a.shape == b.shape and not np.array_equal(a, b)
    rescaled = LatticeCodec().decode(edit_field(buf, LATTICE_FIELDS, "scale",
                                                2 * lattice_header(buf).scale))
    assert rescaled.shape == a.shape and not np.array_equal(rescaled, a)
    refusals = {
        "lattice": (9, "unknown lattice"), "dtype": (0, "dtype"), "mode": (7, "corrupt"),
        "width": (2, "corrupt"), "streams": (3, "streams"), "scale": (-1.0, "corrupt"),
        "count": (2**40, "limit"), "version": (9, "version"),
    }
    for name, (value, message) in refusals.items():
        with pytest.raises(ValueError, match=message):
            LatticeCodec().decode(edit_field(buf, LATTICE_FIELDS, name, value))
    with pytest.raises(ValueError):  # one block more than the streams hold
        LatticeCodec().decode(edit_field(buf, LATTICE_FIELDS, "count", 203 + 8))


@pytest.mark.parametrize("key", sorted(VALID))
def test_mutations_without_new_checksum_are_refused(key: str) -> None:
    buf = VALID[key]
    with pytest.raises(ValueError):
        LatticeCodec().decode(buf[:-1])
    with pytest.raises(ValueError):
        LatticeCodec().decode(buf + b"\x00")
    for i in range(0, len(buf), max(1, len(buf) // 50)):
        flipped = bytearray(buf)
        flipped[i] ^= 0x10
        with pytest.raises(ValueError):
            LatticeCodec().decode(bytes(flipped))


# ---------------------------------------------------------------- keyed dither seeds


def test_keyed_seed_is_reproducible_and_data_dependent() -> None:
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=4096), rng.normal(size=4096)
    codec = LatticeCodec("E8", bits=3, key=42)
    assert codec.encode(x) == codec.encode(x)  # same data, same key: same bytes
    def seed_of(buf: bytes) -> int:
        return lattice_header(buf).seed

    assert seed_of(codec.encode(x)) != seed_of(codec.encode(y))
    assert seed_of(codec.encode(x)) != seed_of(LatticeCodec("E8", bits=3, key=43).encode(x))
    check_lattice_guarantee("E8", x, codec.decode(codec.encode(x)), codec.cell_size(x))
    assert numcodecs.get_codec(codec.get_config()) == codec


def test_keyed_seeds_are_unbiased_across_keys() -> None:
    # Over many keys the dither of one chunk is a fresh draw each time: the mean
    # reconstruction converges to x like with random seeds (6-sigma bound per value).
    x = np.random.default_rng(12).normal(size=512)
    runs = 300
    mean = np.zeros_like(x)
    for key in range(runs):
        codec = LatticeCodec("A2", bits=2, key=key)
        mean += codec.decode(codec.encode(x)) / runs
    sigma = np.sqrt(codec.error_variance(x) / runs)
    assert np.max(np.abs(mean - x)) < 6 * sigma


# ---------------------------------------------------------------- bounded decoding memory


def claim_limit(buf: bytes) -> int:
    return VALUE_ALLOWANCE + MAX_VALUES_PER_BYTE * len(buf)


def refused_cheaply(decode: Callable[[], object], match: str = "claims") -> None:
    """``decode`` raises ValueError(match) without tracing more than 1 MiB or taking 1 s
    (generous: a refusal allocates nothing proportional to the claim)."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            decode()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes traced before the refusal"


def constant_stream_chunk(count: int) -> bytes:
    """A valid coded Z chunk (float64, scale 1) whose index stream is all zeros: pcodec
    packs it at ~20000 values per byte, the densest a chunk can claim."""
    stream = standalone.simple_compress(np.zeros(count, dtype=np.int32), ChunkConfig())
    head = struct.pack("<BBBQdQBH", get_lattice("Z").code, 3, 1, count, 1.0, 7, 4, 1)
    return reframe(b"MDLC\x01" + head + struct.pack("<Q", len(stream)) + stream)


@pytest.mark.parametrize("count", [2**23, 2**28, 2**28 + 1, 2**40])
def test_zero_chunk_claiming_too_much_is_refused(count: int) -> None:
    # 39 bytes used to decode to 2**28 float64 values (2 GiB).
    buf = edit_field(LatticeCodec().encode(np.zeros(8)), LATTICE_FIELDS, "count", count)
    assert len(buf) == 39
    refused_cheaply(lambda: LatticeCodec().decode(buf), "claims|limit")


def test_claim_limit_is_exact() -> None:
    zero = LatticeCodec().encode(np.zeros(8, dtype=np.float16))
    limit = claim_limit(zero)
    assert LatticeCodec().decode(edit_field(zero, LATTICE_FIELDS, "count", limit)).size == limit
    with pytest.raises(ValueError, match=rf"39 bytes claims {limit + 1} values.*{limit}"):
        LatticeCodec().decode(edit_field(zero, LATTICE_FIELDS, "count", limit + 1))


def test_hostile_constant_streams_are_refused() -> None:
    # A consistent chunk: its streams really hold 2**25 indices (~1.6 KB). Before the bound
    # a 13 KB chunk of this kind took 5.6 s and 3.3 GiB to decode.
    buf = constant_stream_chunk(2**25)
    assert len(buf) < 4096
    assert len(chunk_streams(constant_stream_chunk(2**16))[0]) == 2**16  # well formed
    refused_cheaply(lambda: LatticeCodec().decode(buf))
    refused_cheaply(lambda: chunk_streams(buf))
    # With `out` too: the index arrays and pcodec's work grow with the count.
    out = np.empty(2**25, dtype=np.float64)
    refused_cheaply(lambda: LatticeCodec().decode(buf, out=out))


def test_dense_chunk_within_the_allowance_decodes() -> None:
    buf = constant_stream_chunk(VALUE_ALLOWANCE)
    assert VALUE_ALLOWANCE / len(buf) > MAX_VALUES_PER_BYTE  # only the allowance admits it
    dec = LatticeCodec().decode(buf)
    assert dec.shape == (VALUE_ALLOWANCE,) and dec.dtype == np.float64


LEGIT_EXTREMES = {  # name: (codec, input of 2**22 values), the densest measured chunks
    "zeros": (LatticeCodec("E8", bits=4, seed=1), lambda n: np.zeros(n, dtype="f4")),
    "zeros-step": (LatticeCodec("Z", step=1.0, seed=1), lambda n: np.zeros(n, dtype="f2")),
    "mid-cell": (LatticeCodec("Z", step=1.0, seed=2), lambda n: np.full(n, 0.5, dtype="f4")),
    "constant": (LatticeCodec("Z", bits=1.05, seed=3), lambda n: np.full(n, 3.0, dtype="f8")),
    "coarse": (LatticeCodec("D4", step=1e6, seed=4),
               lambda n: np.random.default_rng(5).normal(size=n).astype("f4")),
}


@pytest.mark.parametrize("name", sorted(LEGIT_EXTREMES))
def test_legitimate_extremes_decode(name: str) -> None:
    codec, make = LEGIT_EXTREMES[name]
    x = make(VALUE_ALLOWANCE)
    enc = codec.encode(x)
    dec = LatticeCodec().decode(enc)
    assert dec.dtype == x.dtype and dec.size == x.size
    if lattice_header(enc).mode == 0:
        assert not dec.any()
    else:
        check_lattice_guarantee(codec.lattice, x, dec, lattice_header(enc).scale)
    # A quarter larger, past the allowance: a zero chunk needs `out`; coded ones decode...
    big = np.concatenate([x, x[: x.size // 4]])
    enc = codec.encode(big)
    if lattice_header(enc).mode == 0:
        with pytest.raises(ValueError, match="claims"):
            LatticeCodec().decode(enc)
        assert not LatticeCodec().decode(enc, out=np.empty_like(big)).any()
    elif big.size <= claim_limit(enc):
        assert LatticeCodec().decode(enc).size == big.size
    else:  # ...but mid-cell constants on Z, denser than the bound allows even with `out`.
        assert name == "mid-cell"
        with pytest.raises(ValueError, match="claims"):
            LatticeCodec().decode(enc, out=np.empty_like(big))


@settings(max_examples=scaled_examples(100))
@given(key=st.sampled_from(sorted(VALID)), near=st.booleans(),
       value=st.one_of(st.integers(-64, 64), st.integers(0, 2**34)))
def test_fuzz_claimed_counts(key: str, near: bool, value: int) -> None:
    # Any count: decoded consistently or refused with ValueError; over the bound, refused.
    count = max(claim_limit(VALID[key]) + value, 0) if near else abs(value)
    buf = edit_field(VALID[key], LATTICE_FIELDS, "count", count)
    if count > claim_limit(buf):
        refused_cheaply(lambda: LatticeCodec().decode(buf), "claims|limit")
    else:
        decode_or_value_error(buf)
