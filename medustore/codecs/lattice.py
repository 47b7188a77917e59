"""`LatticeCodec`: subtractive-dithered lattice quantisation with entropy-coded indices.

Encoding a chunk ``x`` (any shape, float16/32/64):

1. Pick the cell size ``s``: the side of a cube with the volume of one lattice cell, in
   data units. With ``bits=b`` it is relative to the chunk's RMS,
   ``s = rms(x) * sqrt(2 pi e) * 2**-b``, chosen so that ``b`` is the rate (bits per value)
   of ideal entropy-coded quantisation of Gaussian data at high resolution: the mean
   squared error is ``G * s**2`` per value (``G`` the lattice's normalized second moment),
   so every extra bit divides it by 4 (6.02 dB) whatever the chunk's scale. With
   ``step=s`` the cell size is absolute.
2. Split ``x`` into blocks of the lattice dimension (the tail is zero-padded), scale to
   natural lattice units ``y = x / t`` with ``t = s / volume**(1/n)``.
3. Draw a dither ``u`` uniform over a box-shaped fundamental cell of the lattice, from a
   64-bit seed written in the header, and quantise ``q = Q_L(y + u)`` with an exact
   closest-point search. The decoder rebuilds ``x_hat = t * (q - u)``. The error
   ``x_hat - x = t * (q - (y + u))`` lies in the scaled Voronoi cell of the lattice, is
   uniform over it, zero-mean and independent of ``x`` (subtractive dither).
4. Code each coordinate of ``q`` as an integer stream (per coding context, see
   `medustore.codecs.lattices`) with pcodec, which comes within ~0.01 bit of the
   streams' empirical entropy.

Chunk format, version 1 (little-endian)::

    magic "MDLC" | version u8 | lattice u8 | dtype u8 | mode u8 (0 zero, 1 coded)
    count u64 | scale f64 (s) | seed u64 | index width u8 (4 or 8) | streams u16
    stream byte lengths u64 x streams | streams | crc32 u32

Decoding memory is bounded before anything is allocated (rule and constants in
`medustore.codecs._format`): with ``out`` the count must be the buffer's; a coded chunk
may claim at most ``VALUE_ALLOWANCE + MAX_VALUES_PER_BYTE * len(chunk)`` values with or
without ``out`` (its index arrays and pcodec work grow with the count); a zero chunk,
which only writes zeros, is held to that bound without ``out`` only.
"""

from __future__ import annotations

import hashlib
import secrets
import struct

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ndarray_copy
from pcodec import ChunkConfig, standalone

from medustore.codecs._format import (
    DTYPE_CODES,
    DTYPES,
    ChunkReader,
    as_float_array,
    check_claim,
    check_count,
    check_finite,
    frame,
)
from medustore.codecs.lattices import (
    FAST_LIMIT,
    LATTICES,
    SLAB_VALUES,
    Lattice,
    StreamCursor,
    _scratch,
    get_lattice,
    slab_blocks,
)

__all__ = ["LatticeCodec", "chunk_streams", "dither"]

_MAGIC = b"MDLC"
_VERSION = 1
_HEAD = struct.Struct("<BBBQdQBH")
_LEN = struct.Struct("<Q")
_MODE_ZERO, _MODE_CODED = 0, 1
_SQRT_2PIE = float(np.sqrt(2.0 * np.pi * np.e))
#: Indices stay below 2**50 so that float64 arithmetic on them is exact.
_MAX_INDEX = float(2**50)
_PCO = ChunkConfig()


def _uniform_is_raw() -> bool:
    # Generator.random computes (next64 >> 11) * 2**-53 in C from the same PCG64 stream,
    # 2-3x faster than doing it in numpy; used only while it agrees with the definition.
    seed = 0x9E3779B97F4A7C15
    raw = np.random.PCG64(seed).random_raw(4099)
    ref = (raw >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    return bool(np.array_equal(np.random.Generator(np.random.PCG64(seed)).random(4099), ref))


_FAST_UNIFORM = _uniform_is_raw()


class _DitherSource:
    """The dither of a chunk, produced slab by slab: consecutive `fill` calls continue
    the stream, so any slab sizes give the values of `dither`."""

    def __init__(self, seed: int, lattice: Lattice) -> None:
        self._bits = np.random.PCG64(seed)
        self._gen = np.random.Generator(self._bits) if _FAST_UNIFORM else None
        self._widths = [(j, w) for j, w in enumerate(lattice.widths.tolist()) if w != 1.0]

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Write the next ``out.shape[0]`` blocks into C-contiguous float64 ``out``."""
        if self._gen is not None:
            self._gen.random(out=out)
        else:
            raw = self._bits.random_raw(out.size).reshape(out.shape)
            raw >>= np.uint64(11)
            np.multiply(raw, 2.0**-53, out=out)
        for j, w in self._widths:  # times 1.0 is exact: skipped
            out[:, j] *= w
        return out


def dither(seed: int, blocks: int, lattice: Lattice) -> np.ndarray:
    """The dither of a chunk: ``(blocks, dim)`` uniform over the lattice's box cell.

    Built from the raw 64-bit outputs of PCG64 (whose stream numpy guarantees stable
    across releases) as ``(r >> 11) * 2**-53``, so archives decode identically forever.
    """
    return _DitherSource(seed, lattice).fill(np.empty((blocks, lattice.dim)))


def _peak(x: np.ndarray) -> float:
    # max |x| without an |x| temporary (abs is exact, so this is the same number)
    return max(float(x.max()), -float(x.min())) if x.size else 0.0


def _rms(x: np.ndarray, peak: float | None = None) -> float:
    # Scaled by the largest magnitude first, so 1e300 values neither overflow nor lose bits.
    if peak is None:
        peak = _peak(x)
    if peak == 0.0 or x.size == 0:
        return 0.0
    return peak * float(np.sqrt(_sum_sq(x, peak, 0, x.size) / x.size))


def _sum_sq(x: np.ndarray, peak: float, lo: int, n: int) -> float:
    """``np.sum((x[lo:lo+n] / peak) ** 2)`` in float64, bit for bit, without a full copy.

    numpy sums a float64 array pairwise, splitting ``n`` at ``n // 2`` rounded down to a
    multiple of 8 down to blocks of 128; following that split down to slabs and summing
    each slab with numpy gives the same additions in the same order.
    """
    if n <= SLAB_VALUES:
        sq = np.divide(x[lo : lo + n], peak, out=_scratch("rms", n), dtype=np.float64)
        np.square(sq, out=sq)
        return float(np.add.reduce(sq))
    half = n // 2
    half -= half % 8
    return _sum_sq(x, peak, lo, half) + _sum_sq(x, peak, lo + half, n - half)


class LatticeCodec(Codec):
    """Subtractive-dithered lattice quantiser (lossy; unbiased, bounded error).

    Parameters
    ----------
    lattice : {"Z", "A2", "D4", "E8"}
        Quantisation lattice. Higher dimensions cost more per value to search but quantise
        with less error per bit (normalized second moments 0.0833, 0.0802, 0.0766, 0.0717).
    bits : float, optional
        Resolution relative to the chunk RMS (see the module docstring); default 4.
        Exclusive with ``step``.
    step : float, optional
        Absolute cell size ``s`` in data units; the error per value is ``G * step**2``.
    seed : int, optional
        Fixed 64-bit dither seed, for reproducible encodings (tests, fixtures). By default
        each chunk draws a fresh seed, which is what makes errors of different chunks
        independent.
    key : int, optional
        Derive each chunk's seed from its contents, ``BLAKE2b(chunk bytes, key=key)``
        (ours): encodings are reproducible run to run, and different chunks still get
        unrelated dithers (the keyed hash acts as a random function of the data). Ignored
        when ``seed`` is given.

    Notes
    -----
    Every block's reconstruction error lies in the Voronoi cell of the lattice scaled by
    ``s / volume**(1/n)``; its norm is at most that factor times the covering radius.
    """

    codec_id = "medustore.lattice"

    def __init__(
        self,
        lattice: str = "A2",
        bits: float | None = None,
        step: float | None = None,
        seed: int | None = None,
        key: int | None = None,
    ) -> None:
        self._lattice = get_lattice(lattice)
        self.lattice = self._lattice.name
        if bits is not None and step is not None:
            raise ValueError("LatticeCodec takes either `bits` or `step`, not both")
        if step is None:
            bits = 4.0 if bits is None else bits
            if not (isinstance(bits, (int, float)) and 0.0 < bits <= 30.0):
                raise ValueError(f"LatticeCodec `bits` must be a number in (0, 30], got {bits!r}")
            bits = float(bits)
        else:
            if not (isinstance(step, (int, float)) and np.isfinite(step) and step > 0.0):
                raise ValueError(
                    f"LatticeCodec `step` must be a finite positive number, got {step!r}"
                )
            step = float(step)
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
            raise ValueError(f"LatticeCodec `seed` must be an int in [0, 2**64), got {seed!r}")
        if key is not None and not (isinstance(key, int) and 0 <= key < 2**64):
            raise ValueError(f"LatticeCodec `key` must be an int in [0, 2**64), got {key!r}")
        self.bits = bits
        self.step = step
        self.seed = seed
        self.key = key

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict:
        config = {"id": self.codec_id, "lattice": self.lattice, "bits": self.bits,
                  "step": self.step, "seed": self.seed}
        if self.key is not None:  # absent unless used: older configs stay byte-identical
            config["key"] = self.key
        return config

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"LatticeCodec({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatticeCodec) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(self.get_config().items()))

    # ------------------------------------------------------------------ theory

    def cell_size(self, x: np.ndarray) -> float:
        """The cell size ``s`` this codec would use for chunk ``x``."""
        if self.step is not None:
            return self.step
        return _rms(np.asarray(x).ravel(order="K")) * _SQRT_2PIE * 2.0 ** -self.bits

    def error_variance(self, x: np.ndarray) -> float:
        """Expected squared error per value when encoding ``x``: ``G * s**2``."""
        return self._lattice.G * self.cell_size(x) ** 2

    # ------------------------------------------------------------------ encode

    def _seed(self, x: np.ndarray) -> int:
        if self.seed is not None:
            return self.seed
        if self.key is not None:
            digest = hashlib.blake2b(x.tobytes(), digest_size=8,
                                     key=self.key.to_bytes(8, "little")).digest()
            return int.from_bytes(digest, "little")
        return secrets.randbits(64)

    def encode(self, buf: object) -> bytes:
        x = as_float_array(buf, "LatticeCodec")
        check_finite(x, "LatticeCodec")
        lat = self._lattice
        peak = _peak(x)
        if self.step is None:
            s = _rms(x, peak) * _SQRT_2PIE * 2.0 ** -self.bits
        else:
            s = self.step
        seed = self._seed(x)
        dtype_code = DTYPE_CODES[x.dtype]
        if s == 0.0 or x.size == 0:  # all zeros (relative mode): nothing to code
            return frame(_MAGIC + bytes([_VERSION]),
                         _HEAD.pack(lat.code, dtype_code, _MODE_ZERO, x.size, 0.0, 0, 4, 0))
        t = s / lat.scale_per_dim
        peak_y = peak / t  # = max |x / t|: division rounds monotonically
        if peak_y > _MAX_INDEX:
            raise ValueError(
                f"LatticeCodec: step {s:g} is too small for values up to {peak:g} (indices "
                "would exceed 2**50); use a larger `step` or a relative `bits`"
            )
        if peak_y < FAST_LIMIT:
            width, streams = 4, _index_streams(x, t, seed, lat)
        else:  # reference path: huge indices
            blocks = -(-x.size // lat.dim)
            y = np.zeros(blocks * lat.dim, dtype=np.float64)
            y[: x.size] = x
            y = y.reshape(blocks, lat.dim) / t
            k = lat.to_index(lat.closest(y + dither(seed, blocks, lat)))
            # The width follows the indices themselves: A2's and E8's first index is
            # 2 v0, twice the magnitude of the data.
            width = 4 if -(2**31) <= k.min() and k.max() < 2**31 else 8
            streams = _split_streams(k.astype(np.int32 if width == 4 else np.int64), lat)
        payloads = [standalone.simple_compress(st, _PCO) for st in streams]
        header = _HEAD.pack(lat.code, dtype_code, _MODE_CODED, x.size, s, seed, width,
                            len(payloads))
        lengths = b"".join(_LEN.pack(len(p)) for p in payloads)
        return frame(_MAGIC + bytes([_VERSION]), header, lengths, *payloads)

    # ------------------------------------------------------------------ decode

    def decode(self, buf: object, out: object = None) -> np.ndarray:
        r = ChunkReader(buf, _MAGIC, (1,), "LatticeCodec")
        code, dtype_code, mode, count, s, seed, width, nstreams = r.unpack(_HEAD)
        lat = get_lattice(int(code))
        if dtype_code not in DTYPES:
            raise ValueError(f"LatticeCodec: unknown dtype code {dtype_code} in chunk header")
        dtype = DTYPES[dtype_code]
        out_arr = None if out is None else np.asarray(out)
        check_count(count, out_arr, "LatticeCodec")
        if mode == _MODE_CODED or out is None:  # a zero chunk with `out` fills only `out`
            check_claim(count, r.nbytes, "LatticeCodec")
        if mode == _MODE_ZERO:
            if nstreams != 0:
                raise ValueError("LatticeCodec: corrupt header (zero chunk with streams)")
            r.finish()
            return _deliver(np.zeros(count, dtype=dtype), out)
        if mode != _MODE_CODED or width not in (4, 8) or not (np.isfinite(s) and s > 0):
            raise ValueError("LatticeCodec: corrupt chunk header")
        if nstreams != lat.n_streams:
            raise ValueError(
                f"LatticeCodec: header says {nstreams} streams, lattice {lat.name} has "
                f"{lat.n_streams}"
            )
        lengths = [r.unpack(_LEN)[0] for _ in range(nstreams)]
        payloads = [r.take(n) for n in lengths]
        r.finish()
        blocks = -(-count // lat.dim)
        cur = StreamCursor(_decode_streams(payloads, blocks * lat.dim, width))
        direct = (isinstance(out, np.ndarray) and out.dtype == dtype
                  and out.flags.c_contiguous and out.flags.writeable)
        xhat = out.reshape(-1) if direct else np.empty(count, dtype=dtype)
        # x_hat = (v - u) * t, slab by slab (temporaries stay in cache)
        t = s / lat.scale_per_dim
        source = _DitherSource(seed, lat)
        slab = slab_blocks(lat.dim)
        try:
            for b0 in range(0, blocks, slab):
                nb = min(slab, blocks - b0)
                v = _scratch("dec.v", nb * lat.dim).reshape(nb, lat.dim)
                lat._points(cur, v)
                u = source.fill(_scratch("dec.u", nb * lat.dim).reshape(nb, lat.dim))
                np.subtract(v, u, out=u)
                lo = b0 * lat.dim
                hi = min(lo + nb * lat.dim, count)
                with np.errstate(over="ignore"):  # values past the dtype: saturated below
                    np.multiply(u.reshape(-1)[: hi - lo], t, out=xhat[lo:hi])  # as astype
            cur.check_consumed()
        except ValueError as err:
            raise ValueError(f"LatticeCodec: {err}") from None
        _saturate(xhat)
        return out if direct else _deliver(xhat, out)


def _saturate(xhat: np.ndarray) -> None:
    """Clamp reconstructions that overflowed the dtype to its largest finite value.

    Data near the dtype's maximum can reconstruct a little beyond it; the input was finite
    and within range, so the clamped value is at least as close to it as the overflow.
    """
    if not np.isfinite(xhat).all():
        big = np.finfo(xhat.dtype).max
        np.nan_to_num(xhat, copy=False, nan=0.0, posinf=big, neginf=-big)


def _index_streams(x: np.ndarray, t: float, seed: int, lat: Lattice) -> list[np.ndarray]:
    """Index streams (int32) of chunk ``x`` quantised at scale ``t`` with the dither of
    ``seed``; needs ``max |x / t| < FAST_LIMIT``.

    Slab by slab: ``z = y + u`` with ``y = x / t`` in float64 (the tail block
    zero-padded), as the reference rounds it, then the lattice's stream kernel; each
    stream's pieces are gathered in one row of a buffer that holds every stream.
    """
    dim = lat.dim
    blocks = -(-x.size // dim)
    slab = slab_blocks(lat.dim)
    source = _DitherSource(seed, lat)
    store = np.empty((lat.n_streams, blocks), dtype=np.int32)
    fill = [0] * store.shape[0]
    for b0 in range(0, blocks, slab):
        nb = min(slab, blocks - b0)
        z = source.fill(_scratch("enc.z", nb * dim).reshape(nb, dim))
        lo = b0 * dim
        hi = min(lo + nb * dim, x.size)
        y = _scratch("enc.y", nb * dim)
        np.divide(x[lo:hi], t, out=y[: hi - lo], dtype=np.float64)
        y[hi - lo :] = 0.0
        z += y.reshape(nb, dim)
        for i, piece in enumerate(lat._streams(z)):
            np.copyto(store[i, fill[i] : fill[i] + piece.size], piece, casting="unsafe")
            fill[i] += piece.size
    return [store[i, :n] for i, n in enumerate(fill)]


def _deliver(arr: np.ndarray, out: object) -> np.ndarray:
    return arr if out is None else ndarray_copy(arr, out)


# ---------------------------------------------------------------- index streams


def _split_streams(k: np.ndarray, lat: Lattice) -> list[np.ndarray]:
    """Index streams of indices ``k`` ``(N, dim)``: column by column, context by context."""
    out: list[np.ndarray] = []
    for j in range(lat.dim):
        ctx, n = lat.contexts(k, j)
        col = k[:, j]
        if ctx is None:
            out.append(np.ascontiguousarray(col))
        else:
            out.extend(np.compress(ctx == c, col) for c in range(n))
    return out


def chunk_streams(buf: object) -> list[np.ndarray]:
    """The integer index streams stored in a `LatticeCodec` chunk, in chunk order.

    For inspection (entropy of the stored indices, rate per stream); empty for a zero
    chunk. The contexts of each stream are given by `Lattice.contexts`.
    """
    r = ChunkReader(buf, _MAGIC, (1,), "LatticeCodec")
    code, _dtype, mode, count, _s, _seed, width, nstreams = r.unpack(_HEAD)
    lat = get_lattice(int(code))
    if mode == _MODE_ZERO:
        return []
    if mode != _MODE_CODED or nstreams != lat.n_streams or width not in (4, 8):
        raise ValueError("LatticeCodec: corrupt chunk header")
    check_claim(count, r.nbytes, "LatticeCodec")
    lengths = [r.unpack(_LEN)[0] for _ in range(nstreams)]
    payloads = [r.take(n) for n in lengths]
    r.finish()
    return _decode_streams(payloads, -(-count // lat.dim) * lat.dim, width)


def _decode_streams(payloads: list[memoryview], total: int, width: int) -> list[np.ndarray]:
    """Decode a chunk's index streams into consecutive runs of one buffer.

    A valid chunk codes every index once, so the streams hold ``total`` values together;
    whether each holds what its contexts need is checked while they are consumed.
    """
    store = np.empty(total, dtype=np.int32 if width == 4 else np.int64)
    streams: list[np.ndarray] = []
    pos = 0
    for payload in payloads:
        try:
            progress = standalone.simple_decompress_into(bytes(payload), store[pos:])
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"LatticeCodec: corrupt index stream ({err})") from None
        if not progress.finished:
            raise ValueError(
                f"LatticeCodec: index streams hold more than the {total} values of the chunk"
            )
        streams.append(store[pos : pos + progress.n_processed])
        pos += progress.n_processed
    if pos != total:
        raise ValueError(
            f"LatticeCodec: index streams hold {pos} values, the chunk has {total}"
        )
    return streams


_ = LATTICES  # re-exported for `from medustore.codecs.lattice import LATTICES`
