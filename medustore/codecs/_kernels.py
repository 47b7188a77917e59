"""Compiled (numba) kernels of the lattice codec's version-2 hot paths.

`medustore.codecs.lattice` codes a chunk slab by slab with numpy: the dither, the scaling
of every segment, the closest-point search, the context split of the index streams and,
when decoding, their merge. Each step is a pass over memory and a few numpy calls per
slab. The kernels here fuse them into one compiled pass per chunk:

* `index_streams`: dither (SplitMix64 of the position), ``y = x / t_j`` segment by
  segment, the nearest lattice point and its indices, written straight into the stream
  of their coding context;
* `decode_into`: indices read from the streams in the order their contexts require,
  lattice points, minus the dither, times ``t_j``, into the chunk's places.

They are a second implementation of the numpy path, not a new format: every float
operation that rounds is the same IEEE operation on the same operands in the same order
(no fast-math, no fused multiply-add, no reassociation), so chunks are identical byte
for byte and decoded values bit for bit; ``tests/test_kernels.py`` checks both. One
numpy reduction has no fixed order: E8's squared distances come from ``np.einsum``,
whose summation order depends on numpy's SIMD build. The kernel sums in the order this
numpy was measured to use and checks it against ``np.einsum`` once per process (`_e8_ok`);
where the orders differ, E8 encodes with numpy.

The numpy path remains the reference and runs instead when numba is not installed, when
``MEDUSTORE_KERNELS=numpy`` is set, and for what the kernels do not cover: version-1
chunks (PCG64 dither) and 64-bit indices (huge values for the step). numba cannot write
float16: for a float16 chunk the kernels compute ``v - u`` and the reference's own
`lattice._scatter` scales and casts it. Segments reach the kernels as three arrays
(start, length, t) of the coded pieces. Compiled code is cached on disk
(``cache=True``): a new process loads it instead of compiling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from medustore.codecs.dither import GAMMA, chunk_key
from medustore.codecs.lattices import _SQRT3, Lattice

try:
    import numba
except ImportError:  # the numpy reference path runs instead
    numba = None

__all__ = ["available", "decode_into", "enabled", "index_streams"]

#: Lattices the kernels implement, by header code.
_CODES = {"Z": 1, "A2": 2, "D4": 4, "E8": 8}
#: Values per slab inside a kernel: its temporaries (a few float64 slabs) stay in cache.
_SLAB = 2048

# SplitMix64 constants as uint64 scalars: numba then keeps every operation on uint64
# (mixing in a Python int would promote to float64), and multiplies wrap modulo 2**64.
_GAMMA = np.uint64(GAMMA)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))
_ULP53 = 2.0**-53


def _jit(fn: Any) -> Any:
    # Without numba the functions stay plain Python: never called (see `available`).
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True)(fn)


def available() -> bool:
    """Whether the kernels can run: numba is importable and ``MEDUSTORE_KERNELS`` is not
    ``numpy`` (read on every call, so tests can switch paths)."""
    return numba is not None and os.environ.get("MEDUSTORE_KERNELS", "").lower() != "numpy"


def enabled(lat: Lattice, encode: bool = False) -> bool:
    """Whether the kernels code ``lat`` (for encoding when ``encode``)."""
    if not available() or lat.name not in _CODES:
        return False
    return not (encode and lat.name == "E8") or _e8_ok()


# ---------------------------------------------------------------- shared pieces
# Loops index slices from 0 where they should vectorise: numba wraps negative indices,
# and an index LLVM cannot prove non-negative turns contiguous loads into gathers.


@_jit
def _uniform(key, p):
    # r(p) of `medustore.codecs.dither`: SplitMix64's finaliser of key ^ (p * GAMMA)
    z = (np.uint64(p) * _GAMMA) ^ key
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return np.float64(z >> _S11) * _ULP53  # exact: fewer than 53 bits


@_jit
def _width_pattern(widths, n):
    # widths[i mod dim] for a slab (slabs start at multiples of dim): one flat multiply
    # per value instead of a modulo
    dim = widths.size
    pat = np.empty(n)
    for i in range(n):
        pat[i] = widths[i % dim]
    return pat


@_jit
def _gather_dithered(x, pstart, plen, pt, key, pat, lo, hi, z, q, c):
    # z[i - lo] = u(i) + x / t_j for coded positions i in [lo, hi), u(i) = r(i) * w_j:
    # both rounded as the reference rounds them (x / t_j in float64, then u + y).
    # Piece q starts at coded position c; returns the cursor of the piece holding hi.
    while q < plen.size:
        n = plen[q]
        a, e = max(lo, c), min(hi, c + n)
        if a < e:
            src = x[pstart[q] + a - c : pstart[q] + e - c]
            dst, w, t = z[a - lo : e - lo], pat[a - lo : e - lo], pt[q]
            for i in range(e - a):
                dst[i] = _uniform(key, a + i) * w[i] + np.float64(src[i]) / t
        if c + n > hi:
            break
        c += n
        q += 1
    return q, c


@_jit
def _scatter_undithered(v, pstart, plen, pt, key, pat, lo, hi, xhat, q, c):
    # x_hat = (v - u(i)) * t_j for coded positions i in [lo, hi), into the chunk's places;
    # the float64 product is rounded to xhat's dtype on the store, as numpy's cast of
    # `out` rounds it. Cursor as in `_gather_dithered`.
    while q < plen.size:
        n = plen[q]
        a, e = max(lo, c), min(hi, c + n)
        if a < e:
            dst = xhat[pstart[q] + a - c : pstart[q] + e - c]
            src, w, t = v[a - lo : e - lo], pat[a - lo : e - lo], pt[q]
            for i in range(e - a):
                dst[i] = (src[i] - _uniform(key, a + i) * w[i]) * t
        if c + n > hi:
            break
        c += n
        q += 1
    return q, c


# ---------------------------------------------------------------- encoding
# Z and A2 work block by block on the slab z (blocks of dim values, consecutive). D4 and
# E8 first transpose it to zt[j, b] and run every step for all blocks of the slab, one
# coordinate at a time, so that LLVM vectorises across blocks; choices are selects, not
# branches (the parity and the coset are coin flips, a branch would mispredict). The
# streams split by a context are written last: every candidate is stored at its stream's
# next slot and only the chosen stream's count advances.


@_jit
def _workspace(step):
    # per-call temporaries of the D4 / E8 slab kernels (step blocks)
    return (np.empty((8, step)), np.empty((8, step)), np.empty((8, step)),
            np.empty(step, dtype=np.int64), np.empty(step, dtype=np.int64), np.empty(step),
            np.empty(step), np.empty(step), np.empty(step))


@_jit
def _transpose(z, nb, dim, zt):
    for b in range(nb):
        for j in range(dim):
            zt[j, b] = z[b * dim + j]


@_jit
def _closest_d_cols(zt, off, n, nb, f, s, k, rk, worst):
    # f[:, b] = nearest D_n point of y = zt[:, b] - off (`lattices._closest_d`; y rounded
    # as the reference's z - 0.5, and z - 0.0 is z): round every coordinate; on an odd
    # sum, round the first coordinate of largest error |r| the other way (+1 if r >= 0)
    for b in range(nb):
        s[b], k[b], rk[b], worst[b] = 0, 0, 0.0, -1.0
    for j in range(n):
        zj, fj = zt[j], f[j]
        for b in range(nb):
            y = zj[b] - off
            v = np.rint(y)
            fj[b] = v
            s[b] += np.int64(v)
            r = y - v
            a = abs(r)
            first = a > worst[b]  # strictly: the first maximum, as np.argmax
            k[b] = j if first else k[b]
            rk[b] = r if first else rk[b]
            worst[b] = a if first else worst[b]
    for j in range(n):
        fj = f[j]
        for b in range(nb):
            step = 1.0 if rk[b] >= 0 else -1.0
            fj[b] = fj[b] + step if (s[b] & 1) != 0 and k[b] == j else fj[b]


@_jit
def _sq_dist8(zt, f, off, nb, acc0, acc1, out):
    # out[b] = sum_j (zt[j, b] - (f[j, b] + off))**2 in np.einsum("ij,ij->i")'s order on
    # 2-lane SIMD builds: lane 0 accumulates s6, s4, s2, s0 and lane 1 s7, s5, s3, s1
    # (each new square + the lane), then lane 0 + lane 1. `_e8_ok` checks the order.
    # With off = 0: f + 0.0 is f but for the sign of a zero, which no square sees.
    for b in range(nb):
        d = zt[6, b] - (f[6, b] + off)
        acc0[b] = d * d
        d = zt[7, b] - (f[7, b] + off)
        acc1[b] = d * d
    for j in (4, 2, 0):
        z0, f0, z1, f1 = zt[j], f[j], zt[j + 1], f[j + 1]
        for b in range(nb):
            d = z0[b] - (f0[b] + off)
            acc0[b] = d * d + acc0[b]
            d = z1[b] - (f1[b] + off)
            acc1[b] = d * d + acc1[b]
    for b in range(nb):
        out[b] = acc0[b] + acc1[b]


@_jit
def _streams_z(z, nb, store, fill):
    f = fill[0]
    out = store[0, f : f + nb]
    for b in range(nb):
        out[b] = np.int32(np.rint(z[b]))
    fill[0] = f + nb


@_jit
def _streams_a2(z, nb, store, fill, k1):
    # `lattices._streams_a2` value by value: both cosets' candidates and distances
    # rounded term by term as there; the coset c (k0's low bit) picks k1's stream 1 + c
    f0 = fill[0]
    out0 = store[0, f0 : f0 + nb]
    for b in range(nb):
        z0 = z[2 * b]
        x1 = z[2 * b + 1] / _SQRT3
        a0, a1 = np.rint(z0), np.rint(x1)
        r0, r1 = np.rint(z0 - 0.5), np.rint(x1 - 0.5)
        e0, e1 = z0 - a0, x1 - a1
        da = e0 * e0 + (e1 * e1) * 3.0
        e0, e1 = z0 - (r0 + 0.5), x1 - (r1 + 0.5)
        db = e0 * e0 + (e1 * e1) * 3.0
        use_b = db < da
        out0[b] = np.int32(r0 + r0 + 1.0) if use_b else np.int32(a0 + a0)  # exact
        k1[b] = np.int32(r1) if use_b else np.int32(a1)
    n0, n1 = fill[1], fill[2]
    for b in range(nb):
        c = out0[b] & 1
        store[1, n0] = k1[b]
        store[2, n1] = k1[b]
        n0 += 1 - c
        n1 += c
    fill[0], fill[1], fill[2] = f0 + nb, n0, n1


@_jit
def _streams_d4(z, nb, store, fill, ws):
    zt, f, _, s, k, rk, worst, _, _ = ws
    _transpose(z, nb, 4, zt)
    _closest_d_cols(zt, 0.0, 4, nb, f, s, k, rk, worst)
    f0 = fill[0]
    for j in range(3):
        out, fj = store[j, f0 : f0 + nb], f[j]
        for b in range(nb):
            out[b] = np.int32(fj[b])
    # the low bit of v3 is the context parity(k0 + k1 + k2); k3 = v3 >> 1
    n0, n1 = fill[3], fill[4]
    f3 = f[3]
    for b in range(nb):
        v3 = np.int64(f3[b])
        odd = v3 & 1
        store[3, n0] = v3 >> 1
        store[4, n1] = v3 >> 1
        n0 += 1 - odd
        n1 += odd
    fill[0] = fill[1] = fill[2] = f0 + nb
    fill[3], fill[4] = n0, n1


@_jit
def _streams_e8(z, nb, store, fill, ws):
    # E8 = D8 u (D8 + 1/2): candidates a and fb + 1/2 (`lattices._streams_e8`)
    zt, fa, fb, s, k, rk, worst, da, db = ws
    _transpose(z, nb, 8, zt)
    _closest_d_cols(zt, 0.0, 8, nb, fa, s, k, rk, worst)
    _closest_d_cols(zt, 0.5, 8, nb, fb, s, k, rk, worst)
    _sq_dist8(zt, fa, 0.0, nb, rk, worst, da)
    _sq_dist8(zt, fb, 0.5, nb, rk, worst, db)
    f0 = fill[0]
    out0 = store[0, f0 : f0 + nb]
    fa0, fb0 = fa[0], fb[0]
    for b in range(nb):  # k0 = 2 f0 + c, c the coset
        out0[b] = 2 * np.int64(fb0[b]) + 1 if db[b] < da[b] else 2 * np.int64(fa0[b])
    # k1..k6 go to streams 2j - 1 + c, which all hold as many values as there were
    # blocks of coset c (n0, n1); k7 = v7 >> 1 to 13 + 2 parity + c, parity = v7's low bit
    n0, n1 = fill[1], fill[2]
    m = fill[13:17].copy()
    for b in range(nb):
        c = out0[b] & 1
        f = fb if c else fa
        for j in range(1, 7):
            v = np.int32(f[j, b])
            store[2 * j - 1, n0] = v
            store[2 * j, n1] = v
        n0 += 1 - c
        n1 += c
        v7 = np.int64(f[7, b])
        ctx = 2 * (v7 & 1) + c
        store[13 + ctx, m[ctx]] = v7 >> 1
        m[ctx] += 1
    fill[0] = f0 + nb
    for j in range(1, 7):
        fill[2 * j - 1], fill[2 * j] = n0, n1
    fill[13:17] = m


@_jit
def _streams(code, z, nb, store, fill, ws):
    # one loop per lattice: the branch is taken once per slab, not per value
    if code == 1:
        _streams_z(z, nb, store, fill)
    elif code == 2:
        _streams_a2(z, nb, store, fill, ws[3])
    elif code == 4:
        _streams_d4(z, nb, store, fill, ws)
    else:
        _streams_e8(z, nb, store, fill, ws)


@_jit
def _dithered(x, pstart, plen, pt, coded, key, pat, lo, nb, dim, z, q, c):
    # z = u + y for the nb blocks from coded position lo, y zero past `coded`
    hi = min(lo + nb * dim, coded)
    q, c = _gather_dithered(x, pstart, plen, pt, key, pat, lo, hi, z, q, c)
    for i in range(hi, lo + nb * dim):
        z[i - lo] = _uniform(key, i) * pat[i - lo] + 0.0
    return q, c


@_jit
def _encode(code, x, pstart, plen, pt, coded, key, widths, store, fill):
    dim = widths.size
    blocks = store.shape[1]
    step = _SLAB // dim
    pat = _width_pattern(widths, step * dim)
    z = np.empty(step * dim)
    ws = _workspace(step)
    q, c = 0, 0
    for b0 in range(0, blocks, step):
        nb = min(step, blocks - b0)
        q, c = _dithered(x, pstart, plen, pt, coded, key, pat, b0 * dim, nb, dim, z, q, c)
        _streams(code, z, nb, store, fill, ws)


@_jit
def _dither_only(x, pstart, plen, pt, coded, key, widths, z):
    # z (blocks * dim) of `_encode`, for tests
    dim = widths.size
    step = _SLAB // dim
    pat = _width_pattern(widths, step * dim)
    q, c = 0, 0
    for lo in range(0, z.size, step * dim):
        nb = min(step * dim, z.size - lo) // dim
        q, c = _dithered(x, pstart, plen, pt, coded, key, pat, lo, nb, dim, z[lo:], q, c)


@_jit
def _streams_only(code, z, dim, store, fill):
    # `_streams` of a whole (blocks * dim) array, slab by slab as `_encode`, for tests
    blocks = store.shape[1]
    step = _SLAB // dim
    ws = _workspace(step)
    for b0 in range(0, blocks, step):
        nb = min(step, blocks - b0)
        _streams(code, z[b0 * dim :], nb, store, fill, ws)


@_jit
def _e8_rows(d, out):
    # out[i] = the sum of squares of row i of d (N, 8) as `_streams_e8` sums it
    n = d.shape[0]
    dt = np.ascontiguousarray(d.T)
    _sq_dist8(dt, np.zeros((8, n)), 0.0, n, np.empty(n), np.empty(n), out)


# ---------------------------------------------------------------- decoding
# Streams are runs of one int32 buffer: stream i is store[start[i] : start[i] + size[i]]
# and pos[i] counts what was read. Every read is checked against the stream's size; the
# kernels return the number of a stream read past its end, -1 when all went well. With
# `direct` (layouts 1 and 2: one stream per coordinate, one index per block) coordinate
# j is read from stream j, without contexts.


@_jit
def _points_z(store, start, size, pos, direct, nb, v):
    p = pos[0]
    if p + nb > size[0]:
        return 0
    for b in range(nb):
        v[b] = store[start[0] + p + b]
    pos[0] = p + nb
    return -1


@_jit
def _points_a2(store, start, size, pos, direct, nb, v):
    p0 = pos[0]
    if p0 + nb > size[0]:
        return 0
    for b in range(nb):
        k0 = np.int64(store[start[0] + p0 + b])
        c = k0 & 1
        s = 1 if direct else 1 + c
        if pos[s] >= size[s]:
            return s
        k1 = store[start[s] + pos[s]]
        pos[s] += 1
        v[2 * b] = k0 * 0.5
        v[2 * b + 1] = (k1 + 0.5 * c) * _SQRT3
    pos[0] = p0 + nb
    return -1


@_jit
def _points_d4(store, start, size, pos, direct, nb, v):
    for j in range(3):
        if pos[j] + nb > size[j]:
            return j
    for b in range(nb):
        parity = 0
        for j in range(3):
            k = np.int64(store[start[j] + pos[j] + b])
            parity += k
            v[4 * b + j] = k
        parity &= 1
        s = 3 if direct else 3 + parity
        if pos[s] >= size[s]:
            return s
        v[4 * b + 3] = store[start[s] + pos[s]] * 2.0 + parity
        pos[s] += 1
    for j in range(3):
        pos[j] += nb
    return -1


@_jit
def _points_e8(store, start, size, pos, direct, nb, v):
    p0 = pos[0]
    if p0 + nb > size[0]:
        return 0
    for b in range(nb):
        o = 8 * b
        k0 = np.int64(store[start[0] + p0 + b])
        c = k0 & 1
        half = 0.5 * c
        v[o] = k0 * 0.5
        parity = (k0 - c) >> 1
        for j in range(1, 7):
            s = j if direct else 2 * j - 1 + c
            if pos[s] >= size[s]:
                return s
            k = np.int64(store[start[s] + pos[s]])
            pos[s] += 1
            parity += k
            v[o + j] = k + half
        parity &= 1
        s = 7 if direct else 13 + 2 * parity + c
        if pos[s] >= size[s]:
            return s
        v[o + 7] = (store[start[s] + pos[s]] * 2.0 + parity) + half
        pos[s] += 1
    pos[0] = p0 + nb
    return -1


@_jit
def _points(code, store, start, size, pos, direct, nb, v):
    if code == 1:
        return _points_z(store, start, size, pos, direct, nb, v)
    if code == 2:
        return _points_a2(store, start, size, pos, direct, nb, v)
    if code == 4:
        return _points_d4(store, start, size, pos, direct, nb, v)
    return _points_e8(store, start, size, pos, direct, nb, v)


@_jit
def _decode(code, store, start, size, pos, direct, blocks, coded, key, widths, pstart,
            plen, pt, xhat):
    dim = widths.size
    step = _SLAB // dim
    pat = _width_pattern(widths, step * dim)
    v = np.empty(step * dim)
    q, c = 0, 0
    for b0 in range(0, blocks, step):
        nb = min(step, blocks - b0)
        err = _points(code, store, start, size, pos, direct, nb, v)
        if err >= 0:
            return err
        lo = b0 * dim
        hi = min(lo + nb * dim, coded)
        q, c = _scatter_undithered(v, pstart, plen, pt, key, pat, lo, hi, xhat, q, c)
    return -1


@_jit
def _decode_slab(code, store, start, size, pos, direct, b0, nb, coded, key, widths, w):
    # w = v - u for one slab, without the scatter: for outputs numba cannot write
    # (float16), which numpy then scales and casts
    dim = widths.size
    lo = b0 * dim
    pat = _width_pattern(widths, nb * dim)
    err = _points(code, store, start, size, pos, direct, nb, w)
    if err < 0:
        for i in range(min(nb * dim, coded - lo)):
            w[i] = w[i] - _uniform(key, lo + i) * pat[i]
    return err


# ---------------------------------------------------------------- entry points


def _pieces(pieces: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(start, length, t)`` arrays of the coded pieces (`lattice._Piece`)."""
    start = np.array([p.start for p in pieces], dtype=np.int64)
    length = np.array([p.length for p in pieces], dtype=np.int64)
    t = np.array([p.t for p in pieces], dtype=np.float64)
    return start, length, t


def _kernel_input(x: np.ndarray) -> np.ndarray:
    # numba reads native float32/64 only; float16 -> float32 is exact, so x / t is unchanged
    if x.dtype == np.float16:
        return x.astype(np.float32)
    if not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))
    return np.ascontiguousarray(x)


def index_streams(x: np.ndarray, pieces: Sequence[Any], seed: int, lat: Lattice
                  ) -> list[np.ndarray]:
    """`lattice._index_streams` compiled: the int32 index streams of the coded pieces of
    chunk ``x`` (flat float16/32/64), each quantised at its scale ``t``, with the
    version-2 dither of ``seed``; needs ``max |x / t| < FAST_LIMIT`` and
    ``enabled(lat, encode=True)``.

    Returns
    -------
    list of numpy.ndarray
        The streams in chunk order, views of one ``(n_streams, blocks)`` buffer.
    """
    start, length, t = _pieces(pieces)
    coded = int(length.sum())
    blocks = -(-coded // lat.dim)
    store = np.empty((lat.n_streams, blocks), dtype=np.int32)
    fill = np.zeros(lat.n_streams, dtype=np.int64)
    _encode(_CODES[lat.name], _kernel_input(x), start, length, t, coded,
            np.uint64(chunk_key(seed)), lat.widths, store, fill)
    return [store[i, :n] for i, n in enumerate(fill.tolist())]


def dithered_values(x: np.ndarray, pieces: Sequence[Any], seed: int, lat: Lattice
                    ) -> np.ndarray:
    """``z = u + x / t_j`` ``(blocks, dim)`` as `index_streams` quantises it (for tests: the
    reference computes it with `lattice._CounterDither` and `lattice._gather`)."""
    start, length, t = _pieces(pieces)
    coded = int(length.sum())
    z = np.empty(-(-coded // lat.dim) * lat.dim)
    _dither_only(_kernel_input(x), start, length, t, coded, np.uint64(chunk_key(seed)),
                 lat.widths, z)
    return z.reshape(-1, lat.dim)


def nearest_streams(z: np.ndarray, lat: Lattice) -> list[np.ndarray]:
    """The index streams of the nearest points of ``z`` ``(blocks, dim)``, as
    `Lattice.index_streams` computes them (for tests, on inputs such as ties)."""
    z = np.ascontiguousarray(z, dtype=np.float64).reshape(-1)
    store = np.empty((lat.n_streams, z.size // lat.dim), dtype=np.int32)
    fill = np.zeros(lat.n_streams, dtype=np.int64)
    _streams_only(_CODES[lat.name], z, lat.dim, store, fill)
    return [store[i, :n] for i, n in enumerate(fill.tolist())]


def _packed(streams: list[np.ndarray], direct: bool, blocks: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(store, start, size)``: the streams as runs of one buffer, without a copy when
    they are consecutive views of one (as `lattice._decode_streams` returns them)."""
    size = np.array([s.size for s in streams], dtype=np.int64)
    base = streams[0].base
    if (isinstance(base, np.ndarray) and base.ndim == 1 and base.dtype == np.int32
            and base.flags.c_contiguous and all(s.base is base for s in streams)):
        item = base.itemsize
        origin = base.__array_interface__["data"][0]
        start = np.array([(s.__array_interface__["data"][0] - origin) // item
                          for s in streams], dtype=np.int64)
        store = base
    else:
        store = np.concatenate(streams).astype(np.int32, copy=False)
        start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    if direct and len(streams) == 1:  # layout 1: coordinate j is the j-th run of blocks
        start = start[0] + blocks * np.arange(size[0] // max(blocks, 1), dtype=np.int64)
        size = np.full(start.size, blocks, dtype=np.int64)
    return store, start, size


def decode_into(streams: list[np.ndarray], layout: int, lat: Lattice, seed: int,
                pieces: Sequence[Any], blocks: int, xhat: np.ndarray) -> None:
    """Decode a version-2 chunk's int32 index streams into ``xhat`` (flat, C-contiguous,
    the chunk's dtype): ``x_hat = (v - u) * t_j`` at the places of the coded ``pieces``;
    the other places are left as they are.

    Raises
    ------
    ValueError
        The streams do not fit their contexts: one runs out, or one is not consumed.
    """
    direct = layout != 0
    if direct and len(streams) > 1 and any(s.size != blocks for s in streams):
        raise ValueError("index streams do not hold one value per block each")
    store, start, size = _packed(streams, direct, blocks)
    pos = np.zeros(size.size, dtype=np.int64)
    pstart, plen, pt = _pieces(pieces)
    coded = int(plen.sum())
    key = np.uint64(chunk_key(seed))
    code = _CODES[lat.name]
    if xhat.dtype == np.float16 or not xhat.dtype.isnative:  # numba writes neither
        err = _decode_numpy_cast(code, store, start, size, pos, direct, blocks, coded, key, lat,
                          pieces, xhat)
    else:
        err = _decode(code, store, start, size, pos, direct, blocks, coded, key,
                      lat.widths, pstart, plen, pt, xhat)
    if err >= 0:
        raise ValueError(f"index stream {err} holds {size[err]} values; its contexts need "
                         "more (corrupt chunk)")
    for i in np.flatnonzero(pos != size).tolist():
        raise ValueError(f"index stream {i} holds {size[i]} values, its contexts use "
                         f"{pos[i]} (corrupt chunk)")


def _decode_numpy_cast(code: int, store: np.ndarray, start: np.ndarray, size: np.ndarray,
                pos: np.ndarray, direct: bool, blocks: int, coded: int, key: np.uint64,
                lat: Lattice, pieces: Sequence[Any], xhat: np.ndarray) -> int:
    # v - u compiled, slab by slab; the multiply by t_j and the cast to float16 by the
    # reference's own `_scatter` (numba has no float16)
    from medustore.codecs.lattice import _scatter
    from medustore.codecs.lattices import SLAB_VALUES, _scratch

    dim = lat.dim
    step = max(1, SLAB_VALUES // dim)
    for b0 in range(0, blocks, step):
        nb = min(step, blocks - b0)
        w = _scratch("kern.w", nb * dim)
        err = _decode_slab(code, store, start, size, pos, direct, b0, nb, coded, key,
                           lat.widths, w)
        if err >= 0:
            return err
        lo = b0 * dim
        _scatter(w, pieces, lo, min(lo + nb * dim, coded), xhat)
    return -1


# ---------------------------------------------------------------- E8's einsum order

_E8_STATE: list[bool] = []


def _e8_ok() -> bool:
    """Whether `_sq_dist8` sums as this numpy's ``np.einsum("ij,ij->i")`` does (checked
    once per process on rows whose sums differ in most orders, with and without ``out``)."""
    if not _E8_STATE:
        rng = np.random.default_rng(8)
        d = rng.random((512, 8)) - 0.5
        d *= np.exp2(rng.integers(-20, 20, size=(512, 8)))
        mine = np.empty(512)
        _e8_rows(d, mine)
        ref = np.einsum("ij,ij->i", d, d)
        out = np.empty(512)
        np.einsum("ij,ij->i", d, d, out=out)
        _E8_STATE.append(bool(np.array_equal(mine, ref) and np.array_equal(mine, out)))
    return _E8_STATE[0]
