"""Test helpers for medustore's codecs: lattice geometry, chunk headers, hypothesis strategies.

The geometry here is written from the lattices' definitions (Z, A2 with unit minimum
distance, D4 = even-sum integer vectors, E8 = D8 u (D8 + 1/2)), not from medustore's
closest-point or index code, so it can serve as an independent reference:

* `is_lattice_point`, `short_vectors` (every lattice point within a radius);
* `brute_force_closest`: nearest lattice point by local descent over short vectors;
* `in_voronoi`: membership of error vectors in the Voronoi cell, up to a tolerance;
* `natural_errors` / `cast_tolerance` / `check_lattice_guarantee`: the bound every
  `LatticeCodec` chunk promises, in natural lattice units.

The header readers and `edit_field` follow the chunk formats documented in
`medustore.codecs.lattice` and `medustore.codecs.threshold`; they let fuzzers change a
header field and recompute the checksum so the parser behind it gets exercised.

Hypothesis is imported lazily by the strategies, so importing this module needs only numpy.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medustore.codecs import LATTICES, Lattice, get_lattice

if TYPE_CHECKING:
    from hypothesis.strategies import DrawFn, SearchStrategy

    from medustore.codecs import LatticeCodec

__all__ = [
    "ARRAY_KINDS",
    "DYNAMIC_EXPONENTS",
    "FLOAT_DTYPES",
    "LATTICE_FIELDS",
    "THRESHOLD_FIELDS",
    "SCALE_EXPONENTS",
    "LatticeHeader",
    "ThresholdHeader",
    "brute_force_closest",
    "cast_tolerance",
    "check_lattice_guarantee",
    "codec_and_array",
    "edit_field",
    "float_arrays",
    "in_voronoi",
    "is_lattice_point",
    "lattice_header",
    "lattice_names",
    "make_array",
    "mutated_chunks",
    "natural_errors",
    "reframe",
    "relevant_vectors",
    "scaled_examples",
    "short_vectors",
    "threshold_header",
]

FLOAT_DTYPES: tuple[np.dtype, ...] = (np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8"))

_SQRT3 = float(np.sqrt(3.0))
_EPS64 = float(np.finfo(np.float64).eps)


def _lat(lattice: Lattice | str) -> Lattice:
    return lattice if isinstance(lattice, Lattice) else get_lattice(lattice)


# ---------------------------------------------------------------- lattice geometry


def _near_int(a: np.ndarray, tol: float) -> np.ndarray:
    # Absolute slack plus a few ulps of |a|, for points computed in float64 far from 0.
    return np.abs(a - np.rint(a)) <= tol + 8.0 * _EPS64 * np.abs(a)


def is_lattice_point(lattice: Lattice | str, v: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Whether each row of ``v`` (``(N, n)``) is a point of the lattice, from its definition."""
    lat = _lat(lattice)
    v = np.asarray(v, dtype=np.float64).reshape(-1, lat.dim)
    if lat.name == "Z":
        return _near_int(v[:, 0], tol)
    if lat.name == "A2":  # a (1, 0) + b (1/2, sqrt3/2)
        b = 2.0 * v[:, 1] / _SQRT3
        return _near_int(b, tol) & _near_int(v[:, 0] - np.rint(b) / 2.0, tol)
    if lat.name == "D4":
        return _near_int(v, tol).all(axis=1) & _near_int(v.sum(axis=1) / 2.0, tol)
    if lat.name == "E8":
        whole = _near_int(v, tol).all(axis=1)
        half = _near_int(v - 0.5, tol).all(axis=1)
        return (whole | half) & _near_int(v.sum(axis=1) / 2.0, tol)
    raise NotImplementedError(f"no reference definition for lattice {lat.name}")


@functools.cache
def _short_vectors(name: str, radius: float) -> np.ndarray:
    lat = get_lattice(name)
    r = int(np.floor(radius))
    if name == "A2":
        m = int(np.ceil(2.0 * radius)) + 1
        a, b = np.meshgrid(np.arange(-m, m + 1), np.arange(-m, m + 1), indexing="ij")
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        pts = np.stack([a + b / 2.0, b * _SQRT3 / 2.0], axis=1)
    else:
        grids = [np.arange(-r, r + 1, dtype=np.float64)]
        if name == "E8":  # the D8 + 1/2 coset
            h = np.arange(-r - 1, r + 1, dtype=np.float64) + 0.5
            grids.append(h[np.abs(h) <= radius])
        pts = np.concatenate([
            np.stack(np.meshgrid(*[g] * lat.dim, indexing="ij"), axis=-1).reshape(-1, lat.dim)
            for g in grids
        ])
    pts = pts[is_lattice_point(lat, pts)]
    pts = pts[np.einsum("ij,ij->i", pts, pts) <= radius * radius * (1 + 1e-12)]
    order = np.lexsort((*pts.T[::-1], np.einsum("ij,ij->i", pts, pts)))
    out = pts[order]
    out.setflags(write=False)
    return out


def short_vectors(lattice: Lattice | str, radius: float) -> np.ndarray:
    """Every lattice point of norm ``<= radius`` (origin first, by increasing norm)."""
    return _short_vectors(_lat(lattice).name, float(radius))


def relevant_vectors(lattice: Lattice | str) -> np.ndarray:
    """Voronoi-relevant vectors: for Z, A2, D4 and E8 these are the minimal vectors.

    ``2, 6, 24, 240`` of them; the Voronoi cell is ``{e : e.v <= |v|^2 / 2 for each v}``.
    """
    lat = _lat(lattice)
    pts = short_vectors(lat, 2.0 * lat.covering_radius)[1:]
    norms = np.einsum("ij,ij->i", pts, pts)
    return pts[norms <= norms.min() * (1 + 1e-9)]


def _sublattice_start(lat: Lattice, y: np.ndarray) -> np.ndarray:
    # A lattice point near y, from a rectangular sublattice: 2Z^n lies in Z, D4 and E8;
    # Z x sqrt3 Z lies in A2.
    if lat.name == "Z":
        return np.rint(y)
    if lat.name == "A2":
        return np.stack([np.rint(y[:, 0]), np.rint(y[:, 1] / _SQRT3) * _SQRT3], axis=1)
    return 2.0 * np.rint(y / 2.0)


def brute_force_closest(lattice: Lattice | str, y: np.ndarray, batch: int = 128) -> np.ndarray:
    """Nearest lattice point of every row of ``y``, by exhaustive local search.

    Starts from a point of a rectangular sublattice and moves to the nearest of the lattice
    points within twice the covering radius until none is nearer; since these include
    every Voronoi-relevant vector, the point reached is a nearest point.
    """
    lat = _lat(lattice)
    y = np.asarray(y, dtype=np.float64).reshape(-1, lat.dim)
    near = short_vectors(lat, 2.0 * lat.covering_radius)
    out = np.empty_like(y)
    for lo in range(0, len(y), batch):
        yb = y[lo : lo + batch]
        c = _sublattice_start(lat, yb)
        while True:
            cand = c[:, None, :] + near[None, :, :]
            d = np.einsum("ijk,ijk->ij", yb[:, None, :] - cand, yb[:, None, :] - cand)
            best = np.argmin(d, axis=1)  # index 0 (staying) wins ties
            if not best.any():
                break
            c = cand[np.arange(len(yb)), best]
        out[lo : lo + batch] = c
    return out


def in_voronoi(lattice: Lattice | str, errors: np.ndarray, tol: float | np.ndarray = 0.0
               ) -> np.ndarray:
    """Whether each row of ``errors`` lies in the Voronoi cell of the origin, up to ``tol``.

    A row passes when ``e.v <= |v|^2 / 2 + tol |v|`` for every relevant vector ``v``: it is
    within distance ``tol`` of each facet's half-space. ``tol`` is a scalar or one value per
    row, in the lattice's natural units.
    """
    lat = _lat(lattice)
    e = np.asarray(errors, dtype=np.float64).reshape(-1, lat.dim)
    rel = relevant_vectors(lat)
    norms = np.sqrt(np.einsum("ij,ij->i", rel, rel))
    slack = np.asarray(tol, dtype=np.float64).reshape(-1, 1) * norms[None, :]
    return np.all(e @ rel.T <= 0.5 * norms[None, :] ** 2 + slack, axis=1)


# ---------------------------------------------------------------- chunk headers


@dataclass(frozen=True)
class LatticeHeader:
    """Fixed header of a `LatticeCodec` chunk (format version 1)."""

    version: int
    lattice: int
    dtype: int
    mode: int
    count: int
    scale: float
    seed: int
    width: int
    streams: int


@dataclass(frozen=True)
class ThresholdHeader:
    """Fixed header of a `DiffThresholdCodec` chunk (format version 1), with its payload."""

    version: int
    dtype: int
    flags: int
    count: int
    tau: float
    survivors: int
    zeroed_norm: float
    mask_len: int
    inner_len: int
    mask: bytes
    inner: bytes


#: ``name: (offset, struct format)`` of each header field, after magic and version.
LATTICE_FIELDS: dict[str, tuple[int, str]] = {
    "version": (4, "B"), "lattice": (5, "B"), "dtype": (6, "B"), "mode": (7, "B"),
    "count": (8, "Q"), "scale": (16, "d"), "seed": (24, "Q"), "width": (32, "B"),
    "streams": (33, "H"),
}
THRESHOLD_FIELDS: dict[str, tuple[int, str]] = {
    "version": (4, "B"), "dtype": (5, "B"), "flags": (6, "B"), "count": (7, "Q"),
    "tau": (15, "d"), "survivors": (23, "Q"), "zeroed_norm": (31, "d"),
    "mask_len": (39, "Q"), "inner_len": (47, "Q"),
}
_LATTICE_HEAD = struct.Struct("<4sBBBBQdQBH")
_THRESHOLD_HEAD = struct.Struct("<4sBBBQdQdQQ")


def lattice_header(buf: bytes) -> LatticeHeader:
    """Parse the header of a `LatticeCodec` chunk (no checks beyond the magic)."""
    magic, *fields = _LATTICE_HEAD.unpack_from(bytes(buf))
    if magic != b"MDLC":
        raise ValueError(f"not a LatticeCodec chunk: {magic!r}")
    return LatticeHeader(*fields)


def threshold_header(buf: bytes) -> ThresholdHeader:
    """Parse the header of a `DiffThresholdCodec` chunk and slice out mask and inner chunk."""
    data = bytes(buf)
    magic, *fields = _THRESHOLD_HEAD.unpack_from(data)
    if magic != b"MDDT":
        raise ValueError(f"not a DiffThresholdCodec chunk: {magic!r}")
    mask_len, inner_len = fields[-2:]
    start = _THRESHOLD_HEAD.size
    mask = data[start : start + mask_len]
    inner = data[start + mask_len : start + mask_len + inner_len]
    return ThresholdHeader(*fields, mask=mask, inner=inner)


def reframe(body: bytes) -> bytes:
    """Append a valid CRC-32 to ``body`` (a chunk without its checksum)."""
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def edit_field(buf: bytes, fields: dict[str, tuple[int, str]], name: str, value: Any) -> bytes:
    """Overwrite header field ``name`` of a framed chunk and recompute its checksum."""
    offset, fmt = fields[name]
    body = bytearray(bytes(buf)[:-4])
    struct.pack_into("<" + fmt, body, offset, value)
    return reframe(bytes(body))


# ---------------------------------------------------------------- the lattice guarantee


def natural_errors(lattice: Lattice | str, x: np.ndarray, xhat: np.ndarray, s: float
                   ) -> tuple[np.ndarray, float]:
    """Reconstruction errors per block in natural lattice units, and the unit ``t``.

    ``t = s / volume**(1/n)``; the errors are ``(xhat - x) / t`` computed in float64, split
    into blocks of the lattice dimension, the tail block zero-padded.
    """
    lat = _lat(lattice)
    t = s / lat.volume ** (1.0 / lat.dim)
    x64 = np.asarray(x).reshape(-1).astype(np.float64)
    xh64 = np.asarray(xhat).reshape(-1).astype(np.float64)
    blocks = -(-x64.size // lat.dim)
    e = np.zeros(blocks * lat.dim)
    e[: x64.size] = (xh64 - x64) / t
    return e.reshape(blocks, lat.dim), t


def _ulp(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # Spacing of ``dtype`` at |values| (float64 arithmetic, no overflow at the dtype's max).
    fi = np.finfo(dtype)
    _, exp = np.frexp(np.abs(values.astype(np.float64)))
    ulp = np.ldexp(float(fi.eps), exp - 1)
    return np.maximum(ulp, float(fi.smallest_subnormal))


def cast_tolerance(lattice: Lattice | str, x: np.ndarray, xhat: np.ndarray, t: float
                   ) -> np.ndarray:
    """Per-block slack, in natural units, for rounding outside the lattice arithmetic.

    Covers the final cast of the float64 reconstruction to the output dtype (half a unit
    in the last place of each value) and float64 rounding in ``x / t``, the dither
    addition and ``(q - u) t`` (a few ulps of the natural-unit magnitudes). Summed over the
    block (an upper bound on the norm of the per-value slack).
    """
    lat = _lat(lattice)
    xhat = np.asarray(xhat).reshape(-1)
    x64 = np.abs(np.asarray(x).reshape(-1).astype(np.float64))
    per_value = 0.5 * _ulp(xhat, xhat.dtype) / t + 16.0 * _EPS64 * (x64 / t + 4.0)
    blocks = -(-per_value.size // lat.dim)
    padded = np.zeros(blocks * lat.dim)
    padded[: per_value.size] = per_value
    return padded.reshape(blocks, lat.dim).sum(axis=1)


def check_lattice_guarantee(lattice: Lattice | str, x: np.ndarray, xhat: np.ndarray,
                            s: float) -> None:
    """Assert `LatticeCodec`'s bound: each block's error is in the Voronoi cell of ``t L``.

    Every block's error norm is at most ``covering_radius * t``; every complete block's
    error lies in the scaled Voronoi cell (a tail block only has its norm checked: the
    error of its padding is not observable). Both up to `cast_tolerance`.
    """
    lat = _lat(lattice)
    x = np.asarray(x)
    if x.size == 0:
        return
    e, t = natural_errors(lat, x, xhat, s)
    tol = cast_tolerance(lat, x, xhat, t)
    norms = np.sqrt(np.einsum("ij,ij->i", e, e))
    over = norms > lat.covering_radius + tol
    assert not over.any(), (
        f"{int(over.sum())} block(s) beyond the covering radius {lat.covering_radius:.4f}: "
        f"worst norm {norms.max():.6g} (first at block {int(np.argmax(over))})"
    )
    complete = x.size // lat.dim
    inside = in_voronoi(lat, e[:complete], tol[:complete])
    assert inside.all(), (
        f"{int((~inside).sum())} block(s) outside the Voronoi cell of {lat.name}, first at "
        f"block {int(np.argmin(inside))}: error {e[int(np.argmin(inside))]}"
    )


# ---------------------------------------------------------------- arrays and strategies

#: Magnitude ranges ``(lo, hi)`` as powers of ten whose reconstructions stay finite in the
#: dtype for ``bits >= 1`` (the error can reach about twice the chunk RMS there).
SCALE_EXPONENTS: dict[str, tuple[float, float]] = {"f2": (-4.0, 3.0), "f4": (-30.0, 30.0),
                                                   "f8": (-30.0, 30.0)}
#: Wider ranges for mixed-magnitude ("dynamic") arrays.
DYNAMIC_EXPONENTS: dict[str, tuple[float, float]] = {"f2": (-7.0, 3.5), "f4": (-37.0, 37.0),
                                                     "f8": (-300.0, 300.0)}

ARRAY_KINDS: tuple[str, ...] = ("gaussian", "uniform", "constant", "zeros", "sparse",
                                "heavy", "dynamic")


def make_array(kind: str, shape: tuple[int, ...], dtype: np.dtype | str, scale: float,
               seed: int) -> np.ndarray:
    """A deterministic test array: ``kind`` in `ARRAY_KINDS`, values around ``scale``."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape, dtype=np.int64))
    if kind == "gaussian":
        v = rng.normal(0.0, scale, size)
    elif kind == "uniform":
        v = rng.uniform(-scale, scale, size)
    elif kind == "constant":
        v = np.full(size, scale * rng.choice([-1.0, 1.0]))
    elif kind == "zeros":
        v = np.zeros(size)
    elif kind == "sparse":
        v = np.where(rng.random(size) < 0.1, rng.normal(0.0, scale, size), 0.0)
    elif kind == "heavy":  # Student t with 2 degrees of freedom: peaks far above the RMS
        v = np.clip(rng.standard_t(2.0, size), -30.0, 30.0) * scale
    elif kind == "dynamic":
        lo, hi = DYNAMIC_EXPONENTS[dtype.str[1:]]
        v = rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(lo, hi, size)
    else:
        raise ValueError(f"unknown array kind {kind!r}")
    return v.astype(dtype).reshape(shape)


def scaled_examples(n: int) -> int:
    """``n`` hypothesis examples at the default ``max_examples`` of 100, scaled by the
    active settings profile (so a deeper profile deepens tests that set their own count)."""
    from hypothesis import settings

    return max(1, n * settings.default.max_examples // 100)


def lattice_names() -> SearchStrategy[str]:
    """One of the lattice names (``"Z"``, ``"A2"``, ``"D4"``, ``"E8"``)."""
    from hypothesis import strategies as st

    return st.sampled_from(sorted(LATTICES))


def float_arrays(max_side: int = 12, max_dims: int = 3,
                 kinds: tuple[str, ...] = ARRAY_KINDS) -> SearchStrategy[np.ndarray]:
    """Float16/32/64 arrays of any shape (empty and 0-d included), C, F or strided layout."""
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import array_shapes

    @st.composite
    def build(draw: DrawFn) -> np.ndarray:
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
        shape = draw(array_shapes(min_dims=0, max_dims=max_dims, min_side=0,
                                  max_side=max_side))
        lo, hi = SCALE_EXPONENTS[dtype.str[1:]]
        scale = 10.0 ** draw(st.floats(lo, hi))
        kind = draw(st.sampled_from(kinds))
        seed = draw(st.integers(0, 2**32 - 1))
        layout = draw(st.sampled_from(["C", "F", "strided"]))
        if layout == "strided" and shape:
            big = make_array(kind, (*shape[:-1], 2 * shape[-1]), dtype, scale, seed)
            return big[..., ::2]
        x = make_array(kind, shape, dtype, scale, seed)
        return np.asfortranarray(x) if layout == "F" else x

    return build()


def codec_and_array(lattices: SearchStrategy[str] | None = None,
                    max_bits: float = 20.0) -> SearchStrategy[tuple[LatticeCodec, np.ndarray]]:
    """A seeded `LatticeCodec` (relative ``bits`` or absolute ``step``) and an input array.

    Absolute steps are drawn relative to the array's RMS (``rms * 2**-b``, ``b`` in
    ``[-1, max_bits]``), so the indices stay well inside the codec's range.
    """
    from hypothesis import strategies as st

    from medustore.codecs import LatticeCodec

    @st.composite
    def build(draw: DrawFn) -> tuple[LatticeCodec, np.ndarray]:
        x = draw(float_arrays())
        name = draw(lattices if lattices is not None else lattice_names())
        seed = draw(st.integers(0, 2**64 - 1))
        if draw(st.booleans()):
            bits = draw(st.floats(1.0, max_bits))
            return LatticeCodec(name, bits=bits, seed=seed), x
        b = draw(st.floats(-1.0, max_bits))
        x64 = np.asarray(x, dtype=np.float64)
        peak = float(np.max(np.abs(x64))) if x64.size else 0.0
        rms = peak * float(np.sqrt(np.mean((x64 / peak) ** 2))) if peak > 0 else 1.0
        return LatticeCodec(name, step=rms * 2.0**-b, seed=seed), x

    return build()


def _u64_values(original: int) -> SearchStrategy[int]:
    # Small counts and lengths, neighbours of the original, or values beyond every limit;
    # never mid-sized ones, so that a mutated chunk cannot ask for gigabytes legitimately.
    from hypothesis import strategies as st

    return st.one_of(st.integers(0, 4096), st.sampled_from(
        [original, max(original - 1, 0), original + 1, 2**28 + 1, 2**63, 2**64 - 1]))


def mutated_chunks(chunks: Sequence[bytes], fields: dict[str, tuple[int, str]],
                   table_offset: int | None = None) -> SearchStrategy[bytes]:
    """Valid framed chunks, damaged for fuzzing a decoder.

    Bit flips, truncation and extension leave the checksum stale (the frame check must
    catch them); a header field (``fields``, e.g. `LATTICE_FIELDS`), a little-endian u64
    of the length table starting at ``table_offset``, or a few bytes anywhere (payloads
    included) are overwritten with the checksum recomputed, so the checks behind it run.
    """
    from hypothesis import strategies as st

    ops = ["flip", "truncate", "extend", "field", "splice"]
    if table_offset is not None:
        ops.append("table")

    @st.composite
    def build(draw: DrawFn) -> bytes:
        buf = bytearray(draw(st.sampled_from(list(chunks))))
        op = draw(st.sampled_from(ops))
        if op == "flip":
            for _ in range(draw(st.integers(1, 4))):
                buf[draw(st.integers(0, len(buf) - 1))] ^= 1 << draw(st.integers(0, 7))
            return bytes(buf)
        if op == "truncate":
            return bytes(buf[: draw(st.integers(0, len(buf) - 1))])
        if op == "extend":
            return bytes(buf) + draw(st.binary(min_size=1, max_size=64))
        if op == "field":
            name = draw(st.sampled_from(sorted(fields)))
            offset, fmt = fields[name]
            current = struct.unpack_from("<" + fmt, buf, offset)[0]
            value = {"B": st.integers(0, 255), "H": st.integers(0, 65535),
                     "d": st.floats(allow_nan=True, allow_infinity=True),
                     "Q": _u64_values(current)}[fmt]
            return edit_field(bytes(buf), fields, name, draw(value))
        body = buf[:-4]
        if op == "table" and table_offset is not None and len(body) >= table_offset + 8:
            i = draw(st.integers(0, (len(body) - table_offset) // 8 - 1))
            struct.pack_into("<Q", body, table_offset + 8 * i, draw(_u64_values(0)))
            return reframe(bytes(body))
        i = draw(st.integers(0, max(len(body) - 1, 0)))
        patch = draw(st.binary(min_size=1, max_size=8))
        body[i : i + len(patch)] = patch
        return reframe(bytes(body))

    return build()
