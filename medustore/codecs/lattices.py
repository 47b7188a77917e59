"""Lattices and their exact closest-point algorithms (Conway & Sloane, 1982).

Each lattice is given in its natural coordinates (Z^n, A2 with unit minimum distance,
D4 as the integer vectors of even sum, E8 = D8 u (D8 + 1/2)). All searches are vectorised:
they take an ``(N, n)`` float64 array and return the nearest lattice point of every row.

Besides the search, a lattice here knows two things that make dithered coding cheap:

* a *box-shaped fundamental cell* ``[0, w_1) x ... x [0, w_n)``: every point of space has
  exactly one lattice point ``v`` with ``x - v`` in the box. Drawing the dither uniformly
  over that box needs no closest-point search to regenerate when decoding;
* an *integer index* per lattice point, ``k_j = floor(v_j / w_j)``, one stream per
  coordinate. Coding the streams separately loses nothing to the parity constraints of
  D4 and E8 (the constrained coordinate is coded at half resolution), and for A2 the two
  streams follow orthogonal directions, so they are nearly independent on white data.

The searches above are the reference. The codec runs equivalent slab kernels
(`Lattice.index_streams`, `Lattice.stream_points`): the same float operations wherever
rounding happens, so the same indices bit for bit, in a fraction of the time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["FAST_LIMIT", "LATTICES", "SHANNON_G", "Lattice", "StreamCursor", "get_lattice"]

#: Normalized second moment of the ideal (n -> infinity) quantiser cell, 1 / (2 pi e).
SHANNON_G = 1.0 / (2.0 * np.pi * np.e)

_SQRT3 = float(np.sqrt(3.0))


def _round(y: np.ndarray) -> np.ndarray:
    # Round half away from zero would also do; ties have probability zero under a dither.
    return np.rint(y)


# ---------------------------------------------------------------- closest points


def _closest_z(y: np.ndarray) -> np.ndarray:
    return _round(y)


def _closest_a2(y: np.ndarray) -> np.ndarray:
    # A2 = R u (R + (1/2, sqrt3/2)), R the rectangular lattice Z x sqrt3 Z. The nearest
    # point of a union of cosets is the nearer of the nearest points of each coset.
    x0, x1 = y[:, 0], y[:, 1] / _SQRT3
    a0, a1 = _round(x0), _round(x1)
    b0, b1 = _round(x0 - 0.5) + 0.5, _round(x1 - 0.5) + 0.5
    da = (x0 - a0) ** 2 + 3.0 * (x1 - a1) ** 2
    db = (x0 - b0) ** 2 + 3.0 * (x1 - b1) ** 2
    use_b = db < da
    out = np.empty_like(y)
    out[:, 0] = np.where(use_b, b0, a0)
    out[:, 1] = np.where(use_b, b1, a1) * _SQRT3
    return out


def _closest_d(y: np.ndarray) -> np.ndarray:
    # D_n: round every coordinate; if the sum is odd, round the worst coordinate the
    # other way (Conway & Sloane, algorithm for D_n).
    f = _round(y)
    odd = (f.sum(axis=1) % 2) != 0
    if np.any(odd):
        rows = np.flatnonzero(odd)
        r = y[rows] - f[rows]
        k = np.argmax(np.abs(r), axis=1)
        rk = r[np.arange(rows.size), k]
        f[rows, k] += np.where(rk >= 0, 1.0, -1.0)
    return f


def _closest_e8(y: np.ndarray) -> np.ndarray:
    # E8 = D8 u (D8 + 1/2).
    a = _closest_d(y)
    b = _closest_d(y - 0.5) + 0.5
    da = np.einsum("ij,ij->i", y - a, y - a)
    db = np.einsum("ij,ij->i", y - b, y - b)
    return np.where((db < da)[:, None], b, a)


# ---------------------------------------------------------------- integer indices
# k_j = floor(v_j / w_j); the inverse maps rebuild v from k using the coset structure.


def _from_index_z(k: np.ndarray) -> np.ndarray:
    return k.astype(np.float64)


def _from_index_a2(k: np.ndarray) -> np.ndarray:
    c = (k[:, 0] & 1).astype(np.float64)  # coset: which of R, R + (1/2, sqrt3/2)
    out = np.empty(k.shape, dtype=np.float64)
    out[:, 0] = 0.5 * k[:, 0]
    out[:, 1] = (k[:, 1] + 0.5 * c) * _SQRT3
    return out


def _from_index_d(k: np.ndarray) -> np.ndarray:
    out = k.astype(np.float64)
    parity = k[:, :-1].sum(axis=1) & 1  # the last coordinate makes the sum even
    out[:, -1] = 2.0 * k[:, -1] + parity
    return out


def _from_index_e8(k: np.ndarray) -> np.ndarray:
    c = k[:, 0] & 1  # coset of D8 fixed by the first coordinate (coded at width 1/2)
    half = 0.5 * c.astype(np.float64)
    out = k.astype(np.float64) + half[:, None]
    out[:, 0] = 0.5 * k[:, 0]
    z_first = (k[:, 0] - c) // 2  # the D8 part of the first coordinate
    parity = (z_first + k[:, 1:-1].sum(axis=1)) & 1
    out[:, -1] = 2.0 * k[:, -1] + parity + half
    return out


# ---------------------------------------------------------------- coding contexts
# The streams of a block are not independent: the coset of A2 and E8 (fixed by the first
# coordinate) shifts every other coordinate by half a step, and the parity constraint of
# D4 and E8 fixes the low bit of the last one. Coding coordinate j separately for each
# value of such a context (known to the decoder from coordinates < j) recovers what
# separate streams would lose: 0.05 bit/dim for A2 at 2 bits (docs/codecs.md).


def _contexts_none(k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
    return None, 1


def _contexts_a2(k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
    return (k[:, 0] & 1, 2) if j == 1 else (None, 1)


def _contexts_d4(k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
    return (k[:, :3].sum(axis=1) & 1, 2) if j == 3 else (None, 1)


def _contexts_e8(k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
    if j == 0:
        return None, 1
    c = k[:, 0] & 1
    if j < 7:
        return c, 2
    parity = (((k[:, 0] - c) // 2) + k[:, 1:7].sum(axis=1)) & 1
    return 2 * parity + c, 4


# ---------------------------------------------------------------- codec kernels
# The codec's hot path works on whole chunks and needs indices, not points. These kernels
# compute exactly what ``to_index(closest(z))``, the context split and ``from_index``
# compute (the same float operations wherever rounding happens, integer identities
# elsewhere), slab by slab, with fewer passes, no row-wise reductions and no per-call
# allocations: temporaries live in per-thread scratch buffers (`_scratch`). The encoder
# kernels assume ``max |z| < FAST_LIMIT + 2`` (indices fit int32 and
# ``floor(v / w + 1e-6)`` is exact); the codec takes the reference path above that.

#: Largest ``max |y|`` (natural units, before dithering) the encoder kernels accept.
FAST_LIMIT = 2.0**29

#: Values per slab of the kernels: small enough for the temporaries to stay in a core's
#: L2 cache, large enough to amortise numpy's per-call overhead (2**15..2**17 measure
#: alike).
SLAB_VALUES = 1 << 16


def slab_blocks(dim: int) -> int:
    """Blocks of ``dim`` values per slab."""
    return max(1, SLAB_VALUES // dim)


class _Scratch(threading.local):
    """Per-thread reusable buffers for the slab loops, by name.

    Fresh temporaries of a few hundred KB can be mmap'd and handed back to the OS by the
    allocator on every call; the page faults of touching them again can cost more than
    the arithmetic (A2 decoding of a 2**20-value chunk took ~1.4x longer with ~2,500
    faults per call). A few MB per thread that codes chunks.
    """

    def __init__(self) -> None:
        self.bufs: dict[str, np.ndarray] = {}

    def __call__(self, key: str, n: int, dtype: type = np.float64) -> np.ndarray:
        buf = self.bufs.get(key)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = self.bufs[key] = np.empty(max(n, 1024), dtype=dtype)
        return buf[:n]

    def arange(self, n: int) -> np.ndarray:
        buf = self.bufs.get("arange")
        if buf is None or buf.size < n:
            buf = self.bufs["arange"] = np.arange(max(n, 1024), dtype=np.intp)
        return buf[:n]


_scratch = _Scratch()


class StreamCursor:
    """Reads consecutive runs of a chunk's decoded index streams.

    Parameters
    ----------
    streams
        The streams of a chunk, in chunk order (see `Lattice.index_streams`).
    """

    def __init__(self, streams: list[np.ndarray]) -> None:
        self.streams = streams
        self.pos = [0] * len(streams)

    def take(self, i: int, n: int) -> np.ndarray:
        """The next ``n`` values of stream ``i``; ValueError past its end."""
        p = self.pos[i]
        if p + n > self.streams[i].size:
            raise ValueError(
                f"index stream {i} holds {self.streams[i].size} values; its contexts "
                f"need more (corrupt chunk)"
            )
        self.pos[i] = p + n
        return self.streams[i][p : p + n]

    def check_consumed(self) -> None:
        """ValueError unless every stream was read to its end."""
        for i, (p, s) in enumerate(zip(self.pos, self.streams, strict=True)):
            if p != s.size:
                raise ValueError(
                    f"index stream {i} holds {s.size} values, its contexts use {p} "
                    "(corrupt chunk)"
                )


def _split(mask: np.ndarray, col: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(col[~mask], col[mask])`` into scratch; inverse of `_Merge`."""
    n1 = int(np.count_nonzero(mask))
    n0 = mask.size - n1
    inv = np.logical_not(mask, out=_scratch(key + "~", mask.size, np.bool_))
    c0 = np.compress(inv, col, out=_scratch(key + "0", n0, col.dtype))
    c1 = np.compress(mask, col, out=_scratch(key + "1", n1, col.dtype))
    return c0, c1


def _low_bit(k: np.ndarray, key: str) -> np.ndarray:
    """``(k & 1).astype(bool)`` into scratch."""
    bits = np.bitwise_and(k, 1, out=_scratch(key, k.size, np.uint8), casting="unsafe")
    return bits.view(np.bool_)


class _Merge:
    """Inverse of `_split` for one mask: rows with ``mask`` false take the next values of
    ``s0``, rows with ``mask`` true those of ``s1``. The gather positions are computed once
    and reused for every column split by the same mask."""

    def __init__(self, mask: np.ndarray, key: str) -> None:
        n = mask.size
        self.mask, self.key, self.n1 = mask, key, int(np.count_nonzero(mask))
        i1 = np.cumsum(mask, dtype=np.intp, out=_scratch(key + "i1", n, np.intp))
        self.i0 = np.subtract(_scratch.arange(n), i1, out=_scratch(key + "i0", n, np.intp))
        i1 -= 1  # rows with mask true take s1[i1 - 1]; the others s0[i - i1]
        self.i1 = i1

    def __call__(self, s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
        if s1.size == 0 or s0.size == 0:
            return s0 if s1.size == 0 else s1
        n = self.mask.size
        g1 = np.take(s1, self.i1, out=_scratch(self.key + "g1", n, s1.dtype), mode="clip")
        g0 = np.take(s0, self.i0, out=_scratch(self.key + "g0", n, s0.dtype), mode="clip")
        g1 -= g0  # integer blend g0 + mask * (g1 - g0): exact even where it wraps
        g1 *= self.mask
        g1 += g0
        return g1


# Lowest set byte of a word whose bytes are 0/1 flags: multiplying the isolated byte
# 2**(8j) by this constant puts j in the top byte (a de Bruijn-style lookup).
_FIRST_FLAG = {4: (np.uint32, np.uint32(0x00010203), np.uint32(24)),
               8: (np.uint64, np.uint64(0x0001020304050607), np.uint64(56))}


def _closest_d_rows(y: np.ndarray, key: str) -> np.ndarray:
    """`_closest_d` of a C-contiguous ``(N, 4)`` or ``(N, 8)`` array (into scratch)."""
    N, n = y.shape
    f = np.rint(y, out=_scratch(key + "f", y.size).reshape(N, n))
    s = np.add(f[:, 0], f[:, 1], out=_scratch(key + "s", N))
    for j in range(2, n):
        s += f[:, j]  # integer-valued: exact in any order
    si = _scratch(key + "si", N, np.int64)
    np.copyto(si, s, casting="unsafe")  # exact: |s| < 2**33
    rows = np.flatnonzero(_low_bit(si, key + "o"))
    if rows.size == 0:
        return f
    nr = rows.size
    r = np.take(y, rows, axis=0, out=_scratch(key + "r", nr * n).reshape(nr, n))
    r -= np.take(f, rows, axis=0, out=_scratch(key + "t", nr * n).reshape(nr, n))
    a = np.abs(r, out=_scratch(key + "a", nr * n).reshape(nr, n))
    # First column of the row maximum, as np.argmax picks it: flag the maxima, then find
    # the lowest flagged byte of each row read as one machine word.
    m = np.maximum(a[:, 0], a[:, 1], out=_scratch(key + "m", nr))
    for j in range(2, n):
        np.maximum(m, a[:, j], out=m)
    uint, magic, shift = _FIRST_FLAG[n]
    eq = np.equal(a, m[:, None], out=_scratch(key + "e", nr * n, np.bool_).reshape(nr, n))
    word = eq.view(uint).reshape(-1)
    low = np.invert(word, out=_scratch(key + "w", nr, uint))
    low += uint(1)
    low &= word
    low *= magic
    low >>= shift
    col = low.view(np.int64) if n == 8 else low  # 0..7: the same bits signed
    at = np.multiply(_scratch.arange(nr), n, out=_scratch(key + "i", nr, np.intp))
    at += col
    inc = np.greater_equal(np.take(r.reshape(-1), at, out=_scratch(key + "k", nr)), 0,
                           out=_scratch(key + "b", nr, np.bool_))
    step = np.multiply(inc, 2.0, out=_scratch(key + "d", nr))
    step -= 1.0  # +1 toward y, -1 away, as _closest_d rounds the other way
    np.multiply(rows, n, out=at)
    at += col
    f.reshape(-1)[at] += step
    return f


def _streams_z(z: np.ndarray) -> list[np.ndarray]:
    return [np.rint(z.reshape(-1), out=_scratch("z.k", z.size))]


def _points_z(cur: StreamCursor, out: np.ndarray) -> None:
    out[:, 0] = cur.take(0, out.shape[0])


def _streams_a2(z: np.ndarray) -> list[np.ndarray]:
    # _closest_a2 term by term (da and db must round identically), then
    # k0 = 2 v0 and k1 = floor(v1 / sqrt3) straight from the rounded coordinates.
    N = z.shape[0]
    z0 = z[:, 0]
    x1 = np.divide(z[:, 1], _SQRT3, out=_scratch("a2.x1", N))
    a0 = np.rint(z0, out=_scratch("a2.a0", N))
    a1 = np.rint(x1, out=_scratch("a2.a1", N))
    r0 = np.subtract(z0, 0.5, out=_scratch("a2.r0", N))
    np.rint(r0, out=r0)
    r1 = np.subtract(x1, 0.5, out=_scratch("a2.r1", N))
    np.rint(r1, out=r1)
    e = _scratch("a2.e", N)
    da = _a2_dist(z0, x1, a0, a1, _scratch("a2.da", N), e)
    b0 = np.add(r0, 0.5, out=_scratch("a2.db", N))
    b1 = np.add(r1, 0.5, out=e)
    db = _a2_dist(z0, x1, b0, b1, b0, b1)
    use_b = np.less(db, da, out=_scratch("a2.c", N, np.bool_))  # the coset: k0 odd
    # k0 = 2 a0 or 2 r0 + 1 (exact small integers); k1 = a1 or r1, and since its streams
    # split by coset, each comes straight from one candidate.
    r0 -= a0
    r0 *= 2.0
    r0 += 1.0
    r0 *= use_b
    a0 *= 2.0
    a0 += r0
    inv = np.logical_not(use_b, out=_scratch("a2.~c", N, np.bool_))
    k1_a = np.compress(inv, a1, out=_scratch("a2.k1a", N - int(np.count_nonzero(use_b))))
    k1_b = np.compress(use_b, r1, out=_scratch("a2.k1b", N - k1_a.size))
    return [a0, k1_a, k1_b]


def _a2_dist(x0: np.ndarray, x1: np.ndarray, p0: np.ndarray, p1: np.ndarray,
             out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    # (x0 - p0) ** 2 + 3.0 * (x1 - p1) ** 2, rounded exactly as written; out and tmp
    # may be p0 and p1.
    d = np.subtract(x0, p0, out=out)
    np.square(d, out=d)
    e = np.subtract(x1, p1, out=tmp)
    np.square(e, out=e)
    e *= 3.0
    d += e
    return d


def _points_a2(cur: StreamCursor, out: np.ndarray) -> None:
    N = out.shape[0]
    k0 = cur.take(0, N)
    coset = _low_bit(k0, "a2.m")
    merge = _Merge(coset, "a2.")
    k1 = merge(cur.take(1, N - merge.n1), cur.take(2, merge.n1))
    np.multiply(k0, 0.5, out=out[:, 0])
    h = np.multiply(coset, 0.5, out=_scratch("a2.h", N))  # 0.5 * c, c = k0 & 1
    np.add(k1, h, out=h)
    np.multiply(h, _SQRT3, out=out[:, 1])


def _streams_d4(z: np.ndarray) -> list[np.ndarray]:
    f = _closest_d_rows(z, "d4.")
    # The sum of a D4 point is even, so the context parity(k0 + k1 + k2) is the low bit
    # of the last coordinate, whose index is floor(v3 / 2).
    N = z.shape[0]
    k3 = _scratch("d4.k3", N, np.int32)
    np.copyto(k3, f[:, 3], casting="unsafe")  # exact: integer-valued
    odd = _low_bit(k3, "d4.o")
    k3 >>= 1
    return [f[:, 0], f[:, 1], f[:, 2], *_split(odd, k3, "d4.s")]


def _points_d4(cur: StreamCursor, out: np.ndarray) -> None:
    N = out.shape[0]
    k0, k1, k2 = cur.take(0, N), cur.take(1, N), cur.take(2, N)
    parity = np.add(k0, k1, out=_scratch("d4.p", N, k0.dtype))
    parity += k2
    parity &= 1  # wraps on overflow, which keeps the parity
    odd = _low_bit(parity, "d4.o")
    merge = _Merge(odd, "d4.")
    k3 = merge(cur.take(3, N - merge.n1), cur.take(4, merge.n1))
    out[:, 0], out[:, 1], out[:, 2] = k0, k1, k2
    last = np.multiply(k3, 2.0, out=_scratch("d4.l", N))
    last += parity
    out[:, 3] = last


def _streams_e8(z: np.ndarray) -> list[np.ndarray]:
    N = z.shape[0]
    a = _closest_d_rows(z, "e8a.")
    zb = np.subtract(z, 0.5, out=_scratch("e8.zb", z.size).reshape(z.shape))
    fb = _closest_d_rows(zb, "e8b.")  # b = fb + 1/2
    # da and db through the same einsum over C-contiguous rows as _closest_e8, so that
    # they round identically.
    d = np.subtract(z, a, out=zb)
    da = np.einsum("ij,ij->i", d, d, out=_scratch("e8.da", N))
    np.add(fb, 0.5, out=d)
    np.subtract(z, d, out=d)
    db = np.einsum("ij,ij->i", d, d, out=_scratch("e8.db", N))
    use_b = np.less(db, da, out=_scratch("e8.c", N, np.bool_))  # the coset: k0 odd
    # Every stream but k0 is split by the coset, so each comes straight from one
    # candidate (a, or the D8 part fb of b): k_j = f_j for j = 1..6, k7 = f7 >> 1 in the
    # context 2 * parity + c, parity = low bit of f7 (the sum of a D8 point is even).
    k0 = np.subtract(fb[:, 0], a[:, 0], out=_scratch("e8.k0", N))  # k0 = 2 f0 + c
    k0 *= use_b
    k0 += a[:, 0]
    k0 *= 2.0
    k0 += use_b
    out = [k0]
    inv = np.logical_not(use_b, out=_scratch("e8.~c", N, np.bool_))
    n1 = int(np.count_nonzero(use_b))
    for j in range(1, 7):
        out.append(np.compress(inv, a[:, j], out=_scratch(f"e8.a{j}", N - n1)))
        out.append(np.compress(use_b, fb[:, j], out=_scratch(f"e8.b{j}", n1)))
    last = []
    for name, cand, rows, n in (("a", a, inv, N - n1), ("b", fb, use_b, n1)):
        f7 = np.compress(rows, cand[:, 7], out=_scratch(f"e8.{name}7f", n))
        k7 = _scratch(f"e8.{name}7", n, np.int32)
        np.copyto(k7, f7, casting="unsafe")  # exact: integer-valued
        odd = _low_bit(k7, f"e8.{name}o")
        k7 >>= 1
        last.append(_split(odd, k7, f"e8.{name}s"))
    (a_even, a_odd), (b_even, b_odd) = last
    return [*out, a_even, b_even, a_odd, b_odd]


def _points_e8(cur: StreamCursor, out: np.ndarray) -> None:
    N = out.shape[0]
    k0 = cur.take(0, N)
    coset = _low_bit(k0, "e8.m")
    by_coset = _Merge(coset, "e8.")
    n1 = by_coset.n1
    half = np.multiply(coset, 0.5, out=_scratch("e8.h", N))  # 0.5 * c, c = k0 & 1
    np.multiply(k0, 0.5, out=out[:, 0])
    parity = np.subtract(k0, coset, out=_scratch("e8.p", N, k0.dtype))
    parity >>= 1  # (k0 - c) // 2 exactly: k0 - c is even
    for j in range(1, 7):
        kj = by_coset(cur.take(2 * j - 1, N - n1), cur.take(2 * j, n1))
        parity += kj  # wraps on overflow, which keeps the parity
        np.add(kj, half, out=out[:, j])
    parity &= 1
    # k7 by context 2 * parity + c (streams 13..16): merge by coset within each parity,
    # then by parity
    odd = _low_bit(parity, "e8.o")
    halves = []
    for p, rows in ((0, np.logical_not(odd, out=_scratch("e8.~o", N, np.bool_))), (1, odd)):
        c = np.compress(rows, coset, out=_scratch(f"e8.c{p}", int(np.count_nonzero(rows)),
                                                  np.bool_))
        merge = _Merge(c, f"e8.{p}")
        halves.append(merge(cur.take(13 + 2 * p, c.size - merge.n1),
                            cur.take(14 + 2 * p, merge.n1)))
    k7 = _Merge(odd, "e8.7")(*halves)
    last = np.multiply(k7, 2.0, out=_scratch("e8.l", N))
    last += parity
    last += half
    out[:, 7] = last


# ---------------------------------------------------------------- the lattice type


@dataclass(frozen=True, eq=False)
class Lattice:
    """A lattice quantiser in natural coordinates.

    Attributes
    ----------
    name, dim
        Identifier (``"Z"``, ``"A2"``, ``"D4"``, ``"E8"``) and dimension ``n``.
    code
        One-byte identifier written in chunk headers.
    volume
        Volume of a fundamental cell in natural coordinates.
    G
        Normalized second moment of the Voronoi cell (Conway & Sloane, table 2.3).
    covering_radius
        Largest distance from a point of space to its nearest lattice point.
    widths
        Side lengths of the box-shaped fundamental cell used for the dither and the indices.
    """

    name: str
    dim: int
    code: int
    volume: float
    G: float
    covering_radius: float
    widths: np.ndarray
    _closest: Callable[[np.ndarray], np.ndarray]
    _from_index: Callable[[np.ndarray], np.ndarray]
    _contexts: Callable[[np.ndarray, int], tuple[np.ndarray | None, int]]
    # codec kernels: index-stream pieces of a slab (scratch views, integer-valued, float
    # or int) and the points of the next slab of a cursor (written to ``out``)
    _streams: Callable[[np.ndarray], list[np.ndarray]]
    _points: Callable[[StreamCursor, np.ndarray], None]

    def contexts(self, k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
        """Coding context of column ``j`` of indices ``k``, from columns ``< j`` only.

        Returns ``(ctx, n)``: an int array with values in ``range(n)``, or ``(None, 1)``.
        """
        return self._contexts(k, j)

    def closest(self, y: np.ndarray) -> np.ndarray:
        """Nearest lattice point of every row of ``y`` (shape ``(N, dim)``, float64)."""
        return self._closest(y)

    def to_index(self, v: np.ndarray) -> np.ndarray:
        """Integer index ``(N, dim)`` of lattice points ``v``."""
        k = np.floor(v / self.widths + 1e-6).astype(np.int64)
        if self.name == "A2":
            # v1 = (k1 + c/2) sqrt3 is not a dyadic multiple of its width: dividing rounds,
            # and past |v1| ~ 2**35 the 1e-6 margin no longer absorbs it. Round instead.
            c = k[:, 0] & 1
            k[:, 1] = np.rint(v[:, 1] / _SQRT3 - 0.5 * c).astype(np.int64)
        return k

    def from_index(self, k: np.ndarray) -> np.ndarray:
        """Lattice points ``(N, dim)`` of integer indices ``k``; inverse of `to_index`."""
        return self._from_index(k)

    @cached_property
    def n_streams(self) -> int:
        """Number of index streams of a chunk: one per coordinate and context."""
        probe = np.zeros((1, self.dim), dtype=np.int64)
        return sum(self.contexts(probe, j)[1] for j in range(self.dim))

    def index_streams(self, z: np.ndarray) -> list[np.ndarray]:
        """Index streams (int32, chunk order) of the nearest lattice points of ``z``.

        Equals ``to_index(closest(z))`` split column by column and context by context
        (see `contexts`), for ``z`` of shape ``(N, dim)`` with
        ``max |z| < FAST_LIMIT + 2``.
        """
        z = np.ascontiguousarray(z, dtype=np.float64)
        parts: list[list[np.ndarray]] = [[] for _ in range(self.n_streams)]
        step = slab_blocks(self.dim)
        for b0 in range(0, z.shape[0], step):
            for part, piece in zip(parts, self._streams(z[b0 : b0 + step]), strict=True):
                part.append(piece.astype(np.int32))
        return [np.concatenate(p) if p else np.empty(0, np.int32) for p in parts]

    def stream_points(self, streams: list[np.ndarray], blocks: int) -> np.ndarray:
        """Lattice points ``(blocks, dim)`` float64 of index streams; inverse of
        `index_streams` (ValueError if the streams do not fit their contexts)."""
        cur = StreamCursor(streams)
        out = np.empty((blocks, self.dim), dtype=np.float64)
        step = slab_blocks(self.dim)
        for b0 in range(0, blocks, step):
            self._points(cur, out[b0 : b0 + step])
        cur.check_consumed()
        return out

    @property
    def scale_per_dim(self) -> float:
        """``volume ** (1/dim)``: natural length of a cell of unit volume per dimension."""
        return float(self.volume ** (1.0 / self.dim))

    def __repr__(self) -> str:
        return f"Lattice({self.name!r})"


def _lattice(name, dim, code, volume, G, rho, widths, closest, from_index, ctx, streams,
             points) -> Lattice:
    return Lattice(name, dim, code, float(volume), G, float(rho),
                   np.asarray(widths, dtype=np.float64), closest, from_index, ctx, streams,
                   points)


LATTICES: dict[str, Lattice] = {
    lat.name: lat
    for lat in (
        _lattice("Z", 1, 1, 1.0, 1.0 / 12.0, 0.5, [1.0], _closest_z, _from_index_z,
                 _contexts_none, _streams_z, _points_z),
        _lattice("A2", 2, 2, _SQRT3 / 2.0, 5.0 / (36.0 * _SQRT3), 1.0 / _SQRT3,
                 [0.5, _SQRT3], _closest_a2, _from_index_a2, _contexts_a2, _streams_a2,
                 _points_a2),
        _lattice("D4", 4, 4, 2.0, 0.0766032346, 1.0, [1.0, 1.0, 1.0, 2.0],
                 _closest_d, _from_index_d, _contexts_d4, _streams_d4, _points_d4),
        _lattice("E8", 8, 8, 1.0, 929.0 / 12960.0, 1.0, [0.5] + [1.0] * 6 + [2.0],
                 _closest_e8, _from_index_e8, _contexts_e8, _streams_e8, _points_e8),
    )
}
_BY_CODE = {lat.code: lat for lat in LATTICES.values()}


def get_lattice(name: str | int) -> Lattice:
    """Look a lattice up by name (``"Z"``, ``"A2"``, ``"D4"``, ``"E8"``) or header code."""
    table = _BY_CODE if isinstance(name, int) else LATTICES
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown lattice {name!r}; choose one of {', '.join(LATTICES)}"
        ) from None
