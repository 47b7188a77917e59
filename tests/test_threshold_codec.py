"""DiffThresholdCodec: exact zeros, survivors, header info, nesting, the Codec contract."""

from __future__ import annotations

import json
import math
import re
import struct
import tracemalloc
import warnings

import numcodecs
import numpy as np
import pytest
from _numcodecs_checks import check_config, check_encode_decode_array
from hypothesis import given, settings
from hypothesis import strategies as st

from medustore.codecs import DiffThresholdCodec, LatticeCodec, threshold_info
from medustore.codecs._format import MAX_VALUES_PER_BYTE, VALUE_ALLOWANCE
from medustore.testing import (
    FLOAT_DTYPES,
    THRESHOLD_FIELDS,
    check_lattice_guarantee,
    edit_field,
    float_arrays,
    lattice_header,
    lattice_names,
    make_array,
    mutated_chunks,
    reframe,
    scaled_examples,
    threshold_header,
)


def reference_rms(x: np.ndarray) -> float:
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    return math.hypot(*flat) / math.sqrt(flat.size) if flat.size else 0.0


def expected_keep(x: np.ndarray, tau: float) -> np.ndarray:
    # The contract, in exact arithmetic: an entry survives iff |x| > tau.
    return np.abs(np.asarray(x, dtype=np.float64).reshape(-1)) > tau


def check_header(enc: bytes, x: np.ndarray, tau: float) -> np.ndarray:
    """threshold_info against the input: count, survivors, tau, exact norm of the zeroed."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    keep = expected_keep(x, tau)
    info = threshold_info(enc)
    assert (info.count, info.survivors, info.tau) == (flat.size, int(keep.sum()), tau)
    assert tuple(info) == (info.count, info.survivors, info.tau, info.zeroed_norm)
    assert info.zeroed_norm == pytest.approx(math.hypot(*flat[~keep]), rel=1e-13, abs=0.0)
    return keep


@st.composite
def thresholds(draw: st.DrawFn, x: np.ndarray) -> DiffThresholdCodec:
    """An absolute threshold at a data quantile (or 0), or a relative one."""
    flat = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
    if draw(st.booleans()):
        return DiffThresholdCodec(relative=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0])))
    if flat.size and draw(st.booleans()):  # exactly at a data value: |x| == tau is zeroed
        return DiffThresholdCodec(threshold=float(flat[draw(st.integers(0, flat.size - 1))]))
    return DiffThresholdCodec(threshold=draw(st.sampled_from([0.0, 1e-3, 0.5, 2.0, 1e6])))


# ---------------------------------------------------------------- lossless inner


@settings(max_examples=scaled_examples(200))
@given(x=float_arrays(), data=st.data())
def test_lossless_round_trip(x: np.ndarray, data: st.DataObject) -> None:
    codec = data.draw(thresholds(x))
    tau = codec.tau(x)
    enc = codec.encode(x)
    keep = check_header(enc, x, tau)
    dec = codec.decode(enc)
    flat = np.asarray(x).reshape(-1)
    assert dec.dtype == flat.dtype and dec.shape == flat.shape
    # Zeroed entries are exactly +0.0; survivors are bit-exact.
    assert np.all(dec[~keep].view(f"u{flat.itemsize}") == 0)
    np.testing.assert_array_equal(dec[keep].view(f"u{flat.itemsize}"),
                                  flat[keep].view(f"u{flat.itemsize}"))


@pytest.mark.parametrize(("dtype", "where"), [("f2", 0.75), ("f4", 0.75), ("f8", 0.0)])
def test_threshold_compares_in_float64(dtype: str, where: float) -> None:
    # tau between two adjacent values of a narrow dtype: the upper one must survive (a
    # comparison in the input dtype would round tau up onto it and zero it). For float64,
    # tau equal to the lower one: |x| == tau is zeroed.
    lo = np.array([0.1], dtype=dtype)[0]
    hi = np.nextafter(lo, np.array([1.0], dtype=dtype)[0])
    tau = float(lo) + where * (float(hi) - float(lo))
    x = np.array([lo, hi, -hi, -lo], dtype=dtype)
    codec = DiffThresholdCodec(threshold=tau)
    dec = codec.decode(codec.encode(x))
    np.testing.assert_array_equal(dec, np.array([0, hi, -hi, 0], dtype=dtype))
    assert threshold_info(codec.encode(x)).survivors == 2


def test_relative_threshold_with_huge_values() -> None:
    # Squares of 1e200 overflow float64: the RMS and the zeroed norm must not.
    x = np.array([1e200, -3e199, 0.0, 5.0, 2e-200])
    for codec, survivors in ((DiffThresholdCodec(), 4), (DiffThresholdCodec(relative=0.5), 2),
                             (DiffThresholdCodec(threshold=1e300), 0)):
        enc = codec.encode(x)
        tau = codec.tau(x)
        assert math.isfinite(tau)
        keep = check_header(enc, x, tau)
        assert keep.sum() == survivors
        np.testing.assert_array_equal(codec.decode(enc), np.where(keep, x, 0.0))
    assert DiffThresholdCodec(relative=0.5).tau(x) == pytest.approx(0.5 * reference_rms(x))
    tiny = np.array([1e-200, -3e-200, 0.0])
    assert threshold_info(DiffThresholdCodec(threshold=1.0).encode(tiny)).zeroed_norm == (
        pytest.approx(math.hypot(1e-200, 3e-200), rel=1e-13))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_relative_tau_is_relative_to_rms(dtype: np.dtype) -> None:
    x = make_array("gaussian", (40, 25), dtype, 3.0, seed=1)
    codec = DiffThresholdCodec(relative=0.7)
    assert codec.tau(x) == pytest.approx(0.7 * reference_rms(x), rel=1e-12)
    keep = check_header(codec.encode(x), x, codec.tau(x))
    assert 0.3 < keep.mean() < 0.7


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_edge_cases(dtype: np.dtype) -> None:
    codec = DiffThresholdCodec(threshold=0.5)
    # Empty input: header only.
    enc = codec.encode(np.zeros((0, 4), dtype=dtype))
    assert tuple(threshold_info(enc)) == (0, 0, 0.5, 0.0)
    assert codec.decode(enc).shape == (0,) and codec.decode(enc).dtype == dtype
    # All zeroed: no inner payload.
    x = np.full(100, 0.25, dtype=dtype)
    head = threshold_header(codec.encode(x))
    assert (head.survivors, head.inner_len, head.flags) == (0, 0, 1)
    assert not codec.decode(codec.encode(x)).any()
    # All survive: no mask.
    x = np.full(100, -2.0, dtype=dtype)
    head = threshold_header(codec.encode(x))
    assert (head.survivors, head.mask_len, head.flags) == (100, 0, 0)
    np.testing.assert_array_equal(codec.decode(codec.encode(x)), x)
    # Default: only exact zeros (and -0.0) are dropped.
    x = np.array([0.0, -0.0, 1e-7, -3.0], dtype=dtype)
    dec = DiffThresholdCodec().decode(DiffThresholdCodec().encode(x))
    np.testing.assert_array_equal(dec, x)
    assert threshold_info(DiffThresholdCodec().encode(x)).survivors == 2


def test_numcodecs_helpers() -> None:
    x = make_array("sparse", (30, 20), "f4", 1.0, seed=3)
    check_encode_decode_array(x, DiffThresholdCodec())
    check_encode_decode_array(x.astype(np.float64), DiffThresholdCodec(threshold=0.0))


# ---------------------------------------------------------------- lattice inner


@settings(max_examples=scaled_examples(150))
@given(x=float_arrays(kinds=("gaussian", "uniform", "sparse", "heavy", "dynamic", "constant")),
       name=lattice_names(), bits=st.floats(1.0, 16.0), data=st.data())
def test_lattice_inner(x: np.ndarray, name: str, bits: float, data: st.DataObject) -> None:
    codec = data.draw(thresholds(x))
    codec = DiffThresholdCodec(codec.threshold, codec.relative,
                               inner=LatticeCodec(name, bits=bits, seed=data.draw(
                                   st.integers(0, 2**64 - 1))))
    tau = codec.tau(x)
    enc = codec.encode(x)
    keep = check_header(enc, x, tau)
    dec = codec.decode(enc)
    flat = np.asarray(x).reshape(-1)
    assert dec.dtype == flat.dtype and dec.shape == flat.shape
    assert np.all(dec[~keep] == 0)
    head = threshold_header(enc)
    if not keep.any():
        assert head.inner_len == 0
        return
    inner = lattice_header(head.inner)
    assert inner.count == keep.sum()
    if inner.mode == 0:
        assert not dec.any()
        return
    check_lattice_guarantee(name, flat[keep], dec[keep], inner.scale)


def test_lattice_inner_is_unbiased_on_survivors() -> None:
    x = make_array("sparse", (4000,), "f8", 1.0, seed=4)
    keep = np.abs(x) > 0.2
    total = np.zeros(x.size)
    runs = 200
    for seed in range(runs):
        codec = DiffThresholdCodec(threshold=0.2, inner=LatticeCodec("D4", bits=2, seed=seed))
        total += codec.decode(codec.encode(x))
    s = LatticeCodec("D4", bits=2).cell_size(x[keep])
    sigma = np.sqrt(0.0766 / runs) * s
    assert np.all(total[~keep] == 0)
    assert np.abs(total[keep] / runs - x[keep]).max() < 6 * sigma


# ---------------------------------------------------------------- config and refusals


CODECS = [
    DiffThresholdCodec(),
    DiffThresholdCodec(threshold=0.01),
    DiffThresholdCodec(relative=0.5, inner=LatticeCodec("E8", bits=3, seed=5)),
    DiffThresholdCodec(threshold=2.0, inner=LatticeCodec("Z", step=0.1)),
]


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_config_round_trip(codec: DiffThresholdCodec) -> None:
    check_config(codec)
    config = json.loads(json.dumps(codec.get_config()))
    assert config["id"] == "medustore.diffthreshold"
    assert config["inner"] == (None if codec.inner is None else codec.inner.get_config())
    assert numcodecs.get_codec(config) == codec
    rebuilt = DiffThresholdCodec.from_config({k: v for k, v in config.items() if k != "id"})
    assert rebuilt == codec and hash(rebuilt) == hash(codec)
    assert type(rebuilt.inner) is type(codec.inner)
    names = {"DiffThresholdCodec": DiffThresholdCodec, "LatticeCodec": LatticeCodec}
    assert eval(repr(codec), names) == codec


def test_inner_codec_is_used() -> None:
    x = make_array("gaussian", (500,), "f4", 1.0, seed=6)
    for codec in CODECS:
        enc = codec.encode(x)
        dec = codec.decode(enc)
        inner = threshold_header(enc).inner
        if isinstance(codec.inner, LatticeCodec):
            assert inner[:4] == b"MDLC"
        else:
            keep = expected_keep(x, codec.tau(x))
            assert inner == x[keep].tobytes()
            np.testing.assert_array_equal(dec, np.where(keep, x, 0))


def test_equality_is_by_config() -> None:
    assert DiffThresholdCodec(threshold=1) == DiffThresholdCodec(threshold=1.0)
    assert DiffThresholdCodec(threshold=1.0) != DiffThresholdCodec(relative=1.0)
    assert (DiffThresholdCodec(inner=LatticeCodec("Z"))
            == DiffThresholdCodec(inner={"id": "medustore.lattice", "lattice": "Z"}))
    assert DiffThresholdCodec(inner=LatticeCodec("Z")) != DiffThresholdCodec(
        inner=LatticeCodec("A2"))


@pytest.mark.parametrize("kwargs", [
    dict(threshold=1.0, relative=1.0), dict(threshold=-1.0), dict(relative=-0.1),
    dict(threshold=float("nan")), dict(threshold=float("inf")), dict(relative=float("inf")),
    dict(threshold="1"), dict(inner={"id": "medustore.lattice", "lattice": "Q"}),
    dict(inner={"id": "no.such.codec"}),
])
def test_bad_constructor_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DiffThresholdCodec(**kwargs)


def test_inner_must_be_a_codec() -> None:
    with pytest.raises(TypeError, match="LatticeCodec, its config dict or None"):
        DiffThresholdCodec(inner=42)  # type: ignore[arg-type]


class _Tripwire(numcodecs.abc.Codec):
    """A registered codec whose construction or decoding fails the test."""

    codec_id = "medustore-test.tripwire"

    def __init__(self, **_config: object) -> None:
        raise AssertionError("an inner codec other than the lattice was built")

    def encode(self, buf: object) -> bytes:  # pragma: no cover - never built
        raise AssertionError("encode")

    def decode(self, buf: object, out: object = None) -> object:  # pragma: no cover
        raise AssertionError("decode")


numcodecs.register_codec(_Tripwire)
REFUSED_IDS = ["pickle", "zstd", "blosc", "medustore.diffthreshold", "no.such.codec",
               _Tripwire.codec_id, "", None, 42]


@pytest.mark.parametrize("codec_id", REFUSED_IDS)
def test_inner_config_ids_are_refused(codec_id: object) -> None:
    # Refused by id before anything is built from the config (the tripwire would fire),
    # from the constructor, from_config and the numcodecs registry alike.
    inner = {} if codec_id is None else {"id": codec_id}
    message = rf"inner codec {re.escape(repr(codec_id))} is not accepted.*'medustore\.lattice'"
    builders = [
        lambda: DiffThresholdCodec(inner=inner),
        lambda: DiffThresholdCodec.from_config({"threshold": 0.1, "inner": inner}),
        lambda: numcodecs.get_codec({"id": "medustore.diffthreshold", "inner": inner}),
    ]
    for build in builders:
        with pytest.raises(ValueError, match=message):
            build()


@pytest.mark.parametrize("codec", [numcodecs.Pickle(), numcodecs.Zstd(level=1),
                                   numcodecs.Shuffle(), DiffThresholdCodec()], ids=repr)
def test_inner_codec_objects_are_refused(codec: numcodecs.abc.Codec) -> None:
    with pytest.raises(ValueError, match=rf"inner codec '{re.escape(codec.codec_id)}' is not"):
        DiffThresholdCodec(inner=codec)


def test_reassigned_inner_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # An `inner` swapped in after construction is checked before the chunk is read.
    codec = DiffThresholdCodec(threshold=0.1)
    enc = codec.encode(make_array("gaussian", (64,), "f4", 1.0, seed=9))
    monkeypatch.setattr(numcodecs.Pickle, "decode", _Tripwire.decode)
    codec.inner = numcodecs.Pickle()
    with pytest.raises(ValueError, match="inner codec 'pickle' is not accepted"):
        codec.decode(enc)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_finite_input(dtype: np.dtype) -> None:
    x = np.zeros((3, 4), dtype=dtype)
    x[1, 1] = np.nan
    x[2, 3] = -np.inf
    with pytest.raises(ValueError, match=r"\b2 NaN or infinite value\(s\), the first at flat "
                                         r"index 5\b"):
        DiffThresholdCodec(threshold=1.0).encode(x)


@pytest.mark.parametrize("bad", [np.arange(5), np.ones(3, dtype=bool), b"abcd",
                                 np.ones(2, dtype=np.complex128)])
def test_wrong_dtype(bad: object) -> None:
    with pytest.raises(TypeError):
        DiffThresholdCodec().encode(bad)


@pytest.mark.parametrize("codec", CODECS[:4], ids=repr)
def test_decode_into_out(codec: DiffThresholdCodec) -> None:
    x = make_array("sparse", (8, 16), "f4", 1.0, seed=7)
    enc = codec.encode(x)
    expected = codec.decode(enc)
    for out in (np.empty(128, np.float32), np.empty((8, 16), np.float32)):
        got = codec.decode(enc, out=out)
        assert np.shares_memory(got, out)
        np.testing.assert_array_equal(out.reshape(-1), expected)
    raw = bytearray(x.nbytes)
    codec.decode(enc, out=raw)
    assert bytes(raw) == expected.tobytes()
    for bad in (np.empty(127, np.float32), np.empty(128, np.float64), bytearray(10)):
        with pytest.raises(ValueError):
            codec.decode(enc, out=bad)


def test_threshold_info_refuses_other_chunks() -> None:
    with pytest.raises(ValueError, match="not a DiffThresholdCodec chunk"):
        threshold_info(LatticeCodec(seed=1).encode(np.ones(8)))


# ---------------------------------------------------------------- fuzzing

_X = make_array("sparse", (150,), "f4", 1.0, seed=8)
VALID = {
    "lossless": (DiffThresholdCodec(threshold=0.1), _X),
    "lattice": (DiffThresholdCodec(threshold=0.1, inner=LatticeCodec("A2", bits=4, seed=1)), _X),
    "nomask": (DiffThresholdCodec(), np.ones(30, dtype=np.float64)),
    "allzero": (DiffThresholdCodec(threshold=5.0), _X),
    "empty": (DiffThresholdCodec(), np.zeros(0, dtype=np.float16)),
}
CHUNKS = {k: codec.encode(x) for k, (codec, x) in VALID.items()}


def decode_or_value_error(codec: DiffThresholdCodec, buf: bytes,
                          out: np.ndarray | None = None) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dec = codec.decode(buf, out=out)
    except ValueError:
        return
    assert isinstance(dec, np.ndarray) and dec.dtype.kind == "f"
    assert dec.size == threshold_header(buf).count


@settings(max_examples=scaled_examples(400))
@given(case=st.sampled_from(sorted(CHUNKS)).flatmap(
    lambda key: mutated_chunks([CHUNKS[key]], THRESHOLD_FIELDS).map(lambda buf: (key, buf))))
def test_fuzz_mutated_chunks(case: tuple[str, bytes]) -> None:
    key, buf = case
    codec = VALID[key][0]
    decode_or_value_error(codec, buf)
    if len(buf) >= 16:
        decode_or_value_error(codec, buf, out=np.empty(150, dtype=np.float32))


@settings(max_examples=scaled_examples(200))
@given(data=st.binary(max_size=600), key=st.sampled_from(sorted(VALID)))
def test_fuzz_random_bytes(data: bytes, key: str) -> None:
    decode_or_value_error(VALID[key][0], data)


@settings(max_examples=scaled_examples(300))
@given(body=st.binary(max_size=300), key=st.sampled_from(sorted(VALID)))
def test_fuzz_random_body_with_valid_frame(body: bytes, key: str) -> None:
    decode_or_value_error(VALID[key][0], reframe(b"MDDT\x01" + body))


def test_header_edits_reach_the_parser() -> None:
    codec, buf = VALID["lossless"][0], CHUNKS["lossless"]
    refusals = {
        "dtype": (7, "dtype"), "flags": (3, "corrupt"), "survivors": (151, "corrupt"),
        "count": (2**40, "limit"), "mask_len": (2**20, "truncated"),
        "inner_len": (0, "trailing|survivor"), "version": (9, "version"),
    }
    for name, (value, message) in refusals.items():
        with pytest.raises(ValueError, match=message):
            codec.decode(edit_field(buf, THRESHOLD_FIELDS, name, value))
    # tau and the zeroed norm are informative: editing them changes threshold_info only.
    edited = edit_field(buf, THRESHOLD_FIELDS, "zeroed_norm", 123.0)
    assert threshold_info(edited).zeroed_norm == 123.0
    np.testing.assert_array_equal(codec.decode(edited), codec.decode(buf))


@pytest.mark.parametrize("key", sorted(CHUNKS))
def test_mutations_without_new_checksum_are_refused(key: str) -> None:
    codec, buf = VALID[key][0], CHUNKS[key]
    for bad in (buf[:-1], buf + b"\x00", b"MDLC" + buf[4:]):
        with pytest.raises(ValueError):
            codec.decode(bad)
    for i in range(0, len(buf), max(1, len(buf) // 40)):
        flipped = bytearray(buf)
        flipped[i] ^= 0x01
        with pytest.raises(ValueError):
            codec.decode(bytes(flipped))


# ---------------------------------------------------------------- bounded decoding memory


def claim_limit(buf: bytes) -> int:
    return VALUE_ALLOWANCE + MAX_VALUES_PER_BYTE * len(buf)


def zeroed_chunk(count: int, dtype: str = "f8") -> bytes:
    """A consistent chunk of ``count`` zeroed values, packed by hand (no input array):
    zstd stores the all-zero mask in ~1 byte per 32 KiB of it."""
    mask = bytes(numcodecs.Zstd(level=1).encode(np.zeros(-(-count // 8), dtype=np.uint8)))
    head = struct.pack("<BBQdQdQQ", {"f2": 1, "f4": 2, "f8": 3}[dtype], 1, count, 1.0, 0,
                       0.0, len(mask), 0)
    return reframe(b"MDDT\x01" + head + mask)


@pytest.mark.parametrize("count", [2**23, 2**26])
def test_hostile_mask_is_refused_before_allocating(count: int) -> None:
    buf = zeroed_chunk(count)
    assert count / len(buf) > 10_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"{len(buf)} bytes claims {count} values"):
            DiffThresholdCodec().decode(buf)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes traced before the refusal"


def test_zeroed_chunk_beyond_the_allowance_decodes_with_out() -> None:
    # With `out` the caller sized the output; the mask costs ~1.1 byte per value more.
    count = VALUE_ALLOWANCE + 2**20
    out = np.full(count, 7.0, dtype=np.float16)
    DiffThresholdCodec().decode(zeroed_chunk(count, "f2"), out=out)
    assert not out.any()


def test_claim_limit_is_exact() -> None:
    buf = CHUNKS["allzero"]
    limit = claim_limit(buf)
    edited = edit_field(buf, THRESHOLD_FIELDS, "count", limit + 1)
    with pytest.raises(ValueError, match=rf"claims {limit + 1} values.*{limit}"):
        DiffThresholdCodec().decode(edited)
    # At the limit the count is admitted, and the (now too short) mask is what fails.
    with pytest.raises(ValueError, match="mask"):
        DiffThresholdCodec().decode(edit_field(buf, THRESHOLD_FIELDS, "count", limit))


SPARSE = {  # name: (codec, survivors) on 2**22 values: the densest thresholded chunks
    "none": (DiffThresholdCodec(), 0),
    "one": (DiffThresholdCodec(), 1),
    "one-lattice": (DiffThresholdCodec(inner=LatticeCodec("E8", bits=1, seed=1)), 1),
    "few-lattice": (DiffThresholdCodec(inner=LatticeCodec("Z", step=1e6, seed=2)), 4096),
}


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_masks_within_the_allowance_decode(name: str) -> None:
    codec, survivors = SPARSE[name]
    x = np.zeros(VALUE_ALLOWANCE, dtype=np.float32)
    x[np.random.default_rng(10).choice(x.size, survivors, replace=False)] = 1.5
    enc = codec.encode(x)
    assert x.size / len(enc) > MAX_VALUES_PER_BYTE  # only the allowance admits it
    dec = codec.decode(enc)
    assert dec.dtype == x.dtype and dec.size == x.size
    assert np.all(dec[x == 0] == 0)
    if codec.inner is None:
        np.testing.assert_array_equal(dec, x)


@settings(max_examples=scaled_examples(100))
@given(key=st.sampled_from(sorted(CHUNKS)), near=st.booleans(),
       value=st.one_of(st.integers(-64, 64), st.integers(0, 2**34)))
def test_fuzz_claimed_counts(key: str, near: bool, value: int) -> None:
    # Any count: decoded consistently or refused with ValueError; over the bound, refused.
    count = max(claim_limit(CHUNKS[key]) + value, 0) if near else abs(value)
    buf = edit_field(CHUNKS[key], THRESHOLD_FIELDS, "count", count)
    if count > claim_limit(buf):
        with pytest.raises(ValueError, match="claims|limit"):
            VALID[key][0].decode(buf)
    else:
        decode_or_value_error(VALID[key][0], buf)


@settings(max_examples=scaled_examples(200))
@given(inner=st.one_of(
    st.none(), st.dictionaries(st.sampled_from(["id", "lattice", "bits", "step", "seed"]),
                               st.one_of(st.text(max_size=20), st.integers(), st.floats(),
                                         st.sampled_from(["medustore.lattice", "pickle"])))))
def test_fuzz_inner_configs(inner: dict | None) -> None:
    # Any config either builds a lattice inner (or none) or raises ValueError/TypeError.
    try:
        codec = DiffThresholdCodec(inner=inner)
    except (ValueError, TypeError):
        return
    assert codec.inner is None or type(codec.inner) is LatticeCodec
