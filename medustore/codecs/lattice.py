"""`LatticeCodec`: subtractive-dithered lattice quantisation with entropy-coded indices.

Encoding a chunk ``x`` (any shape, float16/32/64), cut into *segments* (consecutive runs of
values, e.g. the pieces of a model's tensors; one segment by default):

1. Pick each segment's cell size ``s_j``: the side of a cube with the volume of one
   lattice cell, in data units. With ``bits=b`` it is relative to the segment's RMS,
   ``s_j ~ rms(x_j) * sqrt(2 pi e) * 2**-b``, chosen so that ``b`` is the rate (bits per
   value) of ideal entropy-coded quantisation of Gaussian data at high resolution: the
   mean squared error is ``G * s_j**2`` per value (``G`` the lattice's normalized second
   moment), so every extra bit divides it by 4 (6.02 dB) whatever the segment's scale.
   With ``step=s`` the cell size is absolute (the same in every segment). The largest cell
   size ``s`` is the chunk's reference; the others are ``s * 2**(-k_j / 16)`` (integer
   ``k_j``, the exact ratio rounded to 1/16 octave) so that the header holds one small
   integer per segment. A segment of zeros is not coded and decodes to exact zeros.
2. Concatenate the coded segments, scale each value to natural lattice units
   ``y = x / t_j`` with ``t_j = s_j / volume**(1/n)`` (its own segment's), and split into
   blocks of the lattice dimension (the tail is zero-padded). A block may span two
   segments: its error is still uniform over the cell in natural units.
3. Add a dither ``u`` uniform over a box-shaped fundamental cell of the lattice, a pure
   function of a 64-bit seed written in the header and of the position
   (`medustore.codecs.dither`), and quantise ``q = Q_L(y + u)`` with an exact
   closest-point search. The decoder rebuilds ``x_hat = t_j * (q - u)``. The error
   ``x_hat - x = t_j * (q - (y + u))`` lies in the scaled Voronoi cell of the lattice
   (coordinate by coordinate, scaled by its own segment's ``t_j``), is uniform over it,
   zero-mean and independent of ``x`` (subtractive dither).
4. Code the indices of ``q`` as integer streams with pcodec (within ~0.01 bit of the
   streams' empirical entropy), in one of three layouts, whichever is smallest for the
   chunk: one stream per coordinate and coding context (`medustore.codecs.lattices`),
   one stream for all indices, or one stream per coordinate. The last two are tried only
   on chunks of at most `SMALL_CHUNK` coded values, where pcodec's per-stream tables
   outweigh what the contexts save.

Chunk format, version 2 (written; little-endian; ``v`` an unsigned LEB128 integer)::

    magic "MDLC" | version u8 | lattice u8 | dtype u8 | mode u8 (0 zero, 1 coded)
    count u64 | scale f64 (s, the largest cell size) | seed u64 | index width u8 (4 or 8)
    streams u16 | layout u8 (0 context streams, 1 one stream, 2 one per coordinate)
    segments v | (length v, code v) x segments (absent when segments == 1)
    stream byte lengths v x streams | streams | crc32 u32

A segment's code is 0 for a segment of zeros (not coded), else ``1 + k`` with cell size
``ldexp(s * 2**(-(k mod 16) / 16), -(k // 16))`` (the 16 factors are fixed float64
constants, `_FRACTIONS`). A zero chunk (every segment zero, or no values) is the fixed
header alone, mode 0 and no streams, as in version 1.

Chunk format, version 1 (read only)::

    magic "MDLC" | version u8 | lattice u8 | dtype u8 | mode u8 (0 zero, 1 coded)
    count u64 | scale f64 (s) | seed u64 | index width u8 (4 or 8) | streams u16
    stream byte lengths u64 x streams | streams | crc32 u32

(one segment; context streams; the dither of `dither`, from PCG64).

Decoding memory is bounded before anything is allocated (rule and constants in
`medustore.codecs._format`): with ``out`` the count must be the buffer's; a coded chunk
may claim at most ``VALUE_ALLOWANCE + MAX_VALUES_PER_BYTE * len(chunk)`` values with or
without ``out`` (its index arrays and pcodec work grow with the count); a zero chunk,
which only writes zeros, is held to that bound without ``out`` only. The segment table
is read entry by entry from the chunk's own bytes and must add up to the count; the
single-stream layouts are refused above `SMALL_CHUNK` coded values.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ndarray_copy
from pcodec import ChunkConfig, standalone

from medustore.codecs._format import (
    DTYPE_CODES,
    DTYPES,
    ChunkReader,
    as_float_array,
    as_out_array,
    check_claim,
    check_count,
    check_finite,
    float_dtype,
    frame,
    varint,
)
from medustore.codecs.dither import uniform
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

__all__ = ["SMALL_CHUNK", "LatticeCodec", "LatticeInfo", "chunk_streams", "dither",
           "lattice_info", "normalize_segments"]

_MAGIC = b"MDLC"
_VERSION = 2
_READS = (1, 2)
_HEAD = struct.Struct("<BBBQdQBH")
_LEN = struct.Struct("<Q")
_MODE_ZERO, _MODE_CODED = 0, 1
#: Stream layouts of a version-2 chunk.
LAYOUT_CONTEXTS, LAYOUT_JOINT, LAYOUT_COLUMNS = 0, 1, 2
#: Chunks of at most this many coded values try the single-stream layouts too.
SMALL_CHUNK = 2**18
_SQRT_2PIE = float(np.sqrt(2.0 * np.pi * np.e))
#: Indices stay below 2**50 so that float64 arithmetic on them is exact.
_MAX_INDEX = float(2**50)
_PCO = ChunkConfig()
#: Cell sizes of a chunk's segments are the reference times 2**(-k/16): the 16 fractions,
#: correctly rounded float64 values of 2**(-i/16), fixed here bit for bit.
_FRACTIONS = tuple(float.fromhex(h) for h in (
    "0x1.0000000000000p+0", "0x1.ea4afa2a490dap-1", "0x1.d5818dcfba487p-1",
    "0x1.c199bdd85529cp-1", "0x1.ae89f995ad3adp-1", "0x1.9c49182a3f090p-1",
    "0x1.8ace5422aa0dbp-1", "0x1.7a11473eb0187p-1", "0x1.6a09e667f3bcdp-1",
    "0x1.5ab07dd485429p-1", "0x1.4bfdad5362a27p-1", "0x1.3dea64c123422p-1",
    "0x1.306fe0a31b715p-1", "0x1.2387a6e756238p-1", "0x1.172b83c7d517bp-1",
    "0x1.0b5586cf9890fp-1"))
_OCTAVE = len(_FRACTIONS)
#: Largest segment code a reader accepts (cell sizes down to 2**-65536 of the reference).
_MAX_CODE = 2**20


def segment_step(scale: float, code: int) -> float:
    """Cell size of a segment with header ``code`` (>= 1) in a chunk of reference ``scale``."""
    k = code - 1
    return math.ldexp(scale * _FRACTIONS[k % _OCTAVE], -(k // _OCTAVE))


def normalize_segments(segments: Sequence[int] | None, size: int, codec: str) -> list[int]:
    """Segment lengths as a list of positive ints summing to ``size`` (zero lengths are
    dropped); ``None`` is one segment. ValueError for anything else."""
    if segments is None:
        return [size] if size else []
    try:
        lengths = [int(n) for n in segments]
    except (TypeError, ValueError):
        raise ValueError(f"{codec}: `segments` must be a sequence of lengths") from None
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in segments):
        raise ValueError(f"{codec}: `segments` must hold integer lengths, got {segments!r}")
    if any(n < 0 for n in lengths) or sum(lengths) != size:
        raise ValueError(
            f"{codec}: `segments` must be lengths >= 0 summing to the chunk's {size} "
            f"values, got {len(lengths)} summing to {sum(lengths)}"
        )
    return [n for n in lengths if n]


def _uniform_is_raw() -> bool:
    # Generator.random computes (next64 >> 11) * 2**-53 in C from the same PCG64 stream,
    # 2-3x faster than doing it in numpy; used only while it agrees with the definition.
    seed = 0x9E3779B97F4A7C15
    raw = np.random.PCG64(seed).random_raw(4099)
    ref = (raw >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    return bool(np.array_equal(np.random.Generator(np.random.PCG64(seed)).random(4099), ref))


_FAST_UNIFORM = _uniform_is_raw()


class _DitherSource:
    """The version-1 dither of a chunk (PCG64), produced slab by slab: consecutive `fill`
    calls continue the stream, so any slab sizes give the values of `dither`."""

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


class _CounterDither:
    """The version-2 dither (`medustore.codecs.dither`): value ``p`` of the coded vector
    is ``w[p mod n] * r(seed, p)``; `fill` continues from the last position."""

    def __init__(self, seed: int, lattice: Lattice) -> None:
        self._seed = seed
        self._pos = 0
        self._widths = [(j, w) for j, w in enumerate(lattice.widths.tolist()) if w != 1.0]

    def fill(self, out: np.ndarray) -> np.ndarray:
        uniform(self._seed, self._pos, out.size, out=out.reshape(-1))
        self._pos += out.size
        for j, w in self._widths:  # blocks start at multiples of the dimension
            out[:, j] *= w
        return out


def dither(seed: int, blocks: int, lattice: Lattice) -> np.ndarray:
    """The version-1 dither of a chunk: ``(blocks, dim)`` uniform over the box cell.

    Built from the raw 64-bit outputs of PCG64 (whose stream numpy guarantees stable
    across releases) as ``(r >> 11) * 2**-53``, so archives decode identically forever.
    Version-2 chunks use `medustore.codecs.dither.dither_values` instead.
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


class LatticeInfo(NamedTuple):
    """What a `LatticeCodec` chunk header says (`lattice_info`)."""

    version: int
    lattice: str
    dtype: np.dtype
    count: int
    scale: float
    seed: int
    layout: int
    #: ``(length, cell size)`` of every segment (cell size 0: a segment of zeros)
    segments: tuple[tuple[int, float], ...]
    #: stored byte length of every stream
    stream_bytes: tuple[int, ...]


class _Piece(NamedTuple):
    start: int  # in the chunk
    length: int
    t: float  # natural-unit scale of the segment


class LatticeCodec(Codec):
    """Subtractive-dithered lattice quantiser (lossy; unbiased, bounded error).

    Parameters
    ----------
    lattice : {"Z", "A2", "D4", "E8"}
        Quantisation lattice. Higher dimensions cost more per value to search but quantise
        with less error per bit (normalized second moments 0.0833, 0.0802, 0.0766, 0.0717).
    bits : float, optional
        Resolution relative to each segment's RMS (see the module docstring); default 4.
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
    dtype : {"<f2", "<f4", "<f8"}, optional
        Type of the values ``encode`` is given (any spelling numpy reads, e.g.
        ``"float32"``; stored as ``"<f4"``). By default it is inferred from a float array.
        When set, any buffer-protocol input (bytes, bytearray, memoryview, array.array,
        integer arrays, as numcodecs passes chunks) is viewed, not converted, as that
        dtype; float data of another dtype is refused (TypeError) rather than silently
        cast to another precision. Decoding always returns the dtype the chunk records.

    Notes
    -----
    Every block's reconstruction error, divided coordinate by coordinate by its segment's
    ``t_j = s_j / volume**(1/n)``, lies in the Voronoi cell of the lattice; with one
    segment its norm is at most ``t`` times the covering radius.
    """

    codec_id = "medustore.lattice"

    def __init__(
        self,
        lattice: str = "A2",
        bits: float | None = None,
        step: float | None = None,
        seed: int | None = None,
        key: int | None = None,
        dtype: str | None = None,
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
        dt = float_dtype(dtype, "LatticeCodec")
        self.dtype = None if dt is None else dt.str  # "<f4": JSON-able, byte order explicit

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict:
        config = {"id": self.codec_id, "lattice": self.lattice, "bits": self.bits,
                  "step": self.step, "seed": self.seed}
        if self.key is not None:  # absent unless used: older configs stay byte-identical
            config["key"] = self.key
        if self.dtype is not None:  # likewise: absent unless set
            config["dtype"] = self.dtype
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
        """The cell size ``s`` this codec would use for chunk ``x`` as one segment."""
        if self.step is not None:
            return self.step
        return _rms(np.asarray(x).ravel(order="K")) * _SQRT_2PIE * 2.0 ** -self.bits

    def error_variance(self, x: np.ndarray) -> float:
        """Expected squared error per value when encoding ``x`` as one segment (nonzero):
        ``G * s**2``."""
        return self._lattice.G * self.cell_size(x) ** 2

    def segment_steps(self, x: np.ndarray, segments: Sequence[int] | None = None
                      ) -> tuple[float, list[int], list[float]]:
        """``(scale, codes, steps)`` of encoding chunk ``x`` cut into ``segments``.

        ``steps[j]`` is the cell size of segment ``j`` of the normalized segments (zero
        lengths dropped; see `normalize_segments`), 0 for a segment that is not coded
        (all zeros); its values are coded with mean squared error ``G * steps[j]**2``.
        ``scale`` is the reference written in the header, ``codes`` the table entries.
        """
        x = np.asarray(x).reshape(-1)
        lengths = normalize_segments(segments, x.size, "LatticeCodec")
        bounds = np.cumsum([0, *lengths]).tolist()
        ideal = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            part = x[a:b]
            peak = _peak(part)
            if peak == 0.0:
                ideal.append(0.0)
            elif self.step is not None:
                ideal.append(self.step)
            else:
                ideal.append(_rms(part, peak) * _SQRT_2PIE * 2.0 ** -self.bits)
        scale = max(ideal, default=0.0)
        codes, steps = [], []
        for s in ideal:
            if s == 0.0:
                codes.append(0)
                steps.append(0.0)
                continue
            k = 0 if s == scale else max(0, round(_OCTAVE * (math.log2(scale) - math.log2(s))))
            step = segment_step(scale, k + 1)
            while step == 0.0:  # past float64's range below the reference: coarser
                k -= _OCTAVE
                step = segment_step(scale, k + 1)
            codes.append(k + 1)
            steps.append(step)
        return scale, codes, steps

    def expected_error(self, x: np.ndarray, segments: Sequence[int] | None = None,
                       real: int | None = None) -> float:
        """``E||x_hat - x||^2`` of encoding ``x`` with ``segments``, counting only the first
        ``real`` values (default all): the zero padding of a partial chunk is coded but its
        error is dropped."""
        x = np.asarray(x).reshape(-1)
        real = x.size if real is None else real
        lengths = normalize_segments(segments, x.size, "LatticeCodec")
        _scale, _codes, steps = self.segment_steps(x, lengths)
        total, a = 0.0, 0
        for n, s in zip(lengths, steps, strict=True):
            inside = max(0, min(a + n, real) - a)
            total += self._lattice.G * s**2 * inside  # as error_variance(x) * n
            a += n
        return total

    # ------------------------------------------------------------------ encode

    def _seed(self, x: np.ndarray) -> int:
        if self.seed is not None:
            return self.seed
        if self.key is not None:
            digest = hashlib.blake2b(x.tobytes(), digest_size=8,
                                     key=self.key.to_bytes(8, "little")).digest()
            return int.from_bytes(digest, "little")
        return secrets.randbits(64)

    def encode(self, buf: object, segments: Sequence[int] | None = None) -> bytes:
        """Encode ``buf`` (a chunk); ``segments``: lengths of consecutive runs of its flat
        values, summing to its size, each coded with its own cell size (None: one)."""
        x = as_float_array(buf, "LatticeCodec", self.dtype)
        check_finite(x, "LatticeCodec")
        lat = self._lattice
        lengths = normalize_segments(segments, x.size, "LatticeCodec")
        scale, codes, steps = self.segment_steps(x, lengths)
        seed = self._seed(x)
        dtype_code = DTYPE_CODES[x.dtype]
        version = _MAGIC + bytes([_VERSION])
        if scale == 0.0:  # every segment zero (or no values): nothing to code
            return frame(version, _HEAD.pack(lat.code, dtype_code, _MODE_ZERO, x.size, 0.0, 0,
                                             4, 0))
        pieces, a, peak_y = [], 0, 0.0
        for n, s in zip(lengths, steps, strict=True):
            if s:
                t = s / lat.scale_per_dim
                pieces.append(_Piece(a, n, t))
                peak_y = max(peak_y, _peak(x[a : a + n]) / t)  # division rounds monotonically
            a += n
        if peak_y > _MAX_INDEX:
            raise ValueError(
                f"LatticeCodec: step {scale:g} is too small for the values of this chunk "
                "(indices would exceed 2**50); use a larger `step` or a relative `bits`"
            )
        coded = sum(p.length for p in pieces)
        blocks = -(-coded // lat.dim)
        if peak_y < FAST_LIMIT:
            width, streams = 4, _index_streams(x, pieces, seed, lat)
            k = None
        else:  # reference path: huge indices
            y = np.zeros(blocks * lat.dim, dtype=np.float64)
            _gather(x, pieces, 0, coded, y)
            y = y.reshape(blocks, lat.dim)
            u = _CounterDither(seed, lat).fill(np.empty((blocks, lat.dim)))
            k = lat.to_index(lat.closest(y + u))
            # The width follows the indices themselves: A2's and E8's first index is
            # 2 v0, twice the magnitude of the data.
            width = 4 if -(2**31) <= k.min() and k.max() < 2**31 else 8
            k = k.astype(np.int32 if width == 4 else np.int64)
            streams = _split_streams(k, lat)
        layout, payloads = _smallest_layout(streams, k, blocks, lat, coded)
        header = _HEAD.pack(lat.code, dtype_code, _MODE_CODED, x.size, scale, seed, width,
                            len(payloads))
        table = [bytes([layout]), varint(len(lengths))]
        if len(lengths) > 1:
            table.extend(varint(n) + varint(c) for n, c in zip(lengths, codes, strict=True))
        table.extend(varint(len(p)) for p in payloads)
        return frame(version, header, b"".join(table), *payloads)

    # ------------------------------------------------------------------ decode

    def decode(self, buf: object, out: object = None) -> np.ndarray:
        r = ChunkReader(buf, _MAGIC, _READS, "LatticeCodec")
        head = _read_header(r)
        out_arr = as_out_array(out, "LatticeCodec")  # any writable buffer
        check_count(head.count, out_arr, "LatticeCodec")
        if head.mode == _MODE_CODED or out is None:  # a zero chunk with `out` fills only `out`
            check_claim(head.count, r.nbytes, "LatticeCodec")
        head = _read_table(r, head)
        dtype = head.dtype
        if head.mode == _MODE_ZERO:
            r.finish()
            return _deliver(np.zeros(head.count, dtype=dtype), out)
        payloads = [r.take(n) for n in head.stream_bytes]
        r.finish()
        lat = head.lat
        coded = sum(p.length for p in head.pieces)
        blocks = -(-coded // lat.dim)
        direct = (isinstance(out, np.ndarray) and out.dtype == dtype
                  and out.flags.c_contiguous and out.flags.writeable)
        xhat = out.reshape(-1) if direct else np.empty(head.count, dtype=dtype)
        try:
            kernels = (_compiled(lat, blocks * lat.dim)
                       if head.version == 2 and head.width == 4 else None)
            if kernels is not None:
                # compiled, the same values bit for bit: every slab in one call
                streams = _decode_streams(payloads, blocks * lat.dim, head.width)
                _fill_gaps(xhat, head.pieces, head.count)
                kernels.decode_into(streams, head.layout, lat, head.seed, head.pieces,
                                     blocks, xhat)
            else:
                points = _points_source(payloads, head, blocks)
                kind = _DitherSource if head.version == 1 else _CounterDither
                source = kind(head.seed, lat)
                _fill_gaps(xhat, head.pieces, head.count)
                slab = slab_blocks(lat.dim)
                # x_hat = (v - u) * t_j, slab by slab (temporaries stay in cache)
                for b0 in range(0, blocks, slab):
                    nb = min(slab, blocks - b0)
                    v = points(b0, nb)
                    u = source.fill(_scratch("dec.u", nb * lat.dim).reshape(nb, lat.dim))
                    np.subtract(v, u, out=u)
                    lo = b0 * lat.dim
                    _scatter(u.reshape(-1), head.pieces, lo, min(lo + nb * lat.dim, coded),
                             xhat)
                points(blocks, 0)  # every stream consumed
        except ValueError as err:
            raise ValueError(f"LatticeCodec: {err}") from None
        _saturate(xhat)
        return out if direct else _deliver(xhat, out)


class _Header(NamedTuple):
    version: int
    lat: Lattice
    dtype: np.dtype
    mode: int
    count: int
    scale: float
    seed: int
    width: int
    nstreams: int
    layout: int = LAYOUT_CONTEXTS
    segments: tuple[tuple[int, float], ...] = ()
    pieces: tuple[_Piece, ...] = ()
    stream_bytes: tuple[int, ...] = ()


def _read_header(r: ChunkReader) -> _Header:
    """The fixed header (versions 1 and 2 share it), checked field by field."""
    code, dtype_code, mode, count, s, seed, width, nstreams = r.unpack(_HEAD)
    lat = get_lattice(int(code))
    if dtype_code not in DTYPES:
        raise ValueError(f"LatticeCodec: unknown dtype code {dtype_code} in chunk header")
    if mode not in (_MODE_ZERO, _MODE_CODED):
        raise ValueError("LatticeCodec: corrupt chunk header")
    return _Header(r.version, lat, DTYPES[dtype_code], mode, count, s, seed, width, nstreams)


def _read_table(r: ChunkReader, h: _Header) -> _Header:
    """Layout, segment table and stream lengths (after the count was checked)."""
    lat, count = h.lat, h.count
    if h.mode == _MODE_ZERO:
        if h.nstreams != 0:
            raise ValueError("LatticeCodec: corrupt header (zero chunk with streams)")
        return h
    s = h.scale
    if h.width not in (4, 8) or not (np.isfinite(s) and s > 0):
        raise ValueError("LatticeCodec: corrupt chunk header")
    layout = LAYOUT_CONTEXTS
    if h.version == 1:
        segments = ((count, s),)
    else:
        (layout,) = r.unpack(struct.Struct("<B"))
        nseg = r.varint(count)
        if nseg == 0:
            raise ValueError("LatticeCodec: corrupt header (coded chunk without segments)")
        if nseg == 1:
            segments = ((count, s),)
        else:
            entries, total = [], 0
            for _ in range(nseg):
                n = r.varint(count)
                c = r.varint(_MAX_CODE)
                if n == 0:
                    raise ValueError("LatticeCodec: corrupt segment table (empty segment)")
                step = segment_step(s, c) if c else 0.0
                if c and not (np.isfinite(step) and step > 0):
                    raise ValueError("LatticeCodec: corrupt segment table (cell size)")
                total += n
                if total > count:
                    break
                entries.append((n, step))
            if total != count:
                raise ValueError(
                    f"LatticeCodec: segment table covers {total} values, the chunk has {count}")
            if not any(step for _, step in entries):
                raise ValueError("LatticeCodec: corrupt segment table (nothing coded)")
            segments = tuple(entries)
    pieces, a = [], 0
    for n, step in segments:
        if step:
            pieces.append(_Piece(a, n, step / lat.scale_per_dim))
        a += n
    coded = sum(p.length for p in pieces)
    expected = {LAYOUT_CONTEXTS: lat.n_streams, LAYOUT_JOINT: 1, LAYOUT_COLUMNS: lat.dim}
    if layout not in expected:
        raise ValueError(f"LatticeCodec: unknown stream layout {layout}")
    if layout != LAYOUT_CONTEXTS and coded > SMALL_CHUNK:
        raise ValueError("LatticeCodec: corrupt header (single-stream layout on a large chunk)")
    if h.nstreams != expected[layout]:
        raise ValueError(
            f"LatticeCodec: header says {h.nstreams} streams, lattice {lat.name} has "
            f"{expected[layout]} in layout {layout}"
        )
    if h.version == 1:
        lengths = tuple(r.unpack(_LEN)[0] for _ in range(h.nstreams))
    else:
        lengths = tuple(r.varint() for _ in range(h.nstreams))
    return h._replace(layout=layout, segments=segments, pieces=tuple(pieces),
                      stream_bytes=lengths)


def _points_source(payloads: list[memoryview], h: _Header, blocks: int):
    """A function ``(b0, nb) -> (nb, dim)`` float64 lattice points of the next blocks;
    called with ``nb == 0`` at the end, it checks every stream was consumed."""
    lat = h.lat
    total = blocks * lat.dim
    streams = _decode_streams(payloads, total, h.width)
    if h.layout == LAYOUT_CONTEXTS:
        cur = StreamCursor(streams)

        def points(b0: int, nb: int) -> np.ndarray:
            if nb == 0:
                cur.check_consumed()
                return np.empty((0, lat.dim))
            v = _scratch("dec.v", nb * lat.dim).reshape(nb, lat.dim)
            lat._points(cur, v)
            return v
        return points
    if h.layout == LAYOUT_JOINT:
        k = streams[0].reshape(lat.dim, blocks).T
    else:
        if any(st.size != blocks for st in streams):
            raise ValueError("index streams do not hold one value per block each")
        k = np.stack(streams, axis=1)
    v_all = lat.from_index(k.astype(np.int64))

    def points_all(b0: int, nb: int) -> np.ndarray:
        return v_all[b0 : b0 + nb]
    return points_all


def _fill_gaps(xhat: np.ndarray, pieces: tuple[_Piece, ...], count: int) -> None:
    """Zero the values of ``xhat`` outside the coded pieces (segments of zeros)."""
    a = 0
    for p in pieces:
        xhat[a : p.start] = 0
        a = p.start + p.length
    xhat[a:count] = 0


def _gather(x: np.ndarray, pieces: Sequence[_Piece], lo: int, hi: int, y: np.ndarray) -> None:
    """``y[: hi - lo] = x / t_j`` for coded positions ``[lo, hi)`` (float64)."""
    c = 0
    for p in pieces:
        a, b = max(lo, c), min(hi, c + p.length)
        if a < b:
            src = x[p.start + a - c : p.start + b - c]
            np.divide(src, p.t, out=y[a - lo : b - lo], dtype=np.float64)
        c += p.length
        if c >= hi:
            break


def _scatter(w: np.ndarray, pieces: Sequence[_Piece], lo: int, hi: int, xhat: np.ndarray
             ) -> None:
    """``x_hat = w * t_j`` for coded positions ``[lo, hi)`` (into the chunk's places)."""
    c = 0
    for p in pieces:
        a, b = max(lo, c), min(hi, c + p.length)
        if a < b:
            with np.errstate(over="ignore"):  # values past the dtype: saturated later
                np.multiply(w[a - lo : b - lo], p.t,
                            out=xhat[p.start + a - c : p.start + b - c])  # as astype
        c += p.length
        if c >= hi:
            break


def _smallest_layout(streams: list[np.ndarray], k: np.ndarray | None, blocks: int,
                     lat: Lattice, coded: int) -> tuple[int, list[bytes]]:
    """The stream layout and pcodec payloads of a chunk's indices: the context streams,
    or on small chunks whichever layout is smallest (ties: the lower layout)."""
    best = (LAYOUT_CONTEXTS, [standalone.simple_compress(st, _PCO) for st in streams])
    if lat.dim == 1 or coded > SMALL_CHUNK:
        return best
    if k is None:
        k = lat.to_index(lat.stream_points(streams, blocks)).astype(np.int32)
    size = _stored_size(best[1])
    for layout, arrays in ((LAYOUT_JOINT, [np.ascontiguousarray(k.T).reshape(-1)]),
                           (LAYOUT_COLUMNS, [np.ascontiguousarray(k[:, j])
                                             for j in range(lat.dim)])):
        payloads = [standalone.simple_compress(a, _PCO) for a in arrays]
        if _stored_size(payloads) < size:
            best, size = (layout, payloads), _stored_size(payloads)
    return best


def _stored_size(payloads: list[bytes]) -> int:
    return sum(len(p) + len(varint(len(p))) for p in payloads)


def _saturate(xhat: np.ndarray) -> None:
    """Clamp reconstructions that overflowed the dtype to its largest finite value.

    Data near the dtype's maximum can reconstruct a little beyond it; the input was finite
    and within range, so the clamped value is at least as close to it as the overflow.
    """
    if not np.isfinite(xhat).all():
        big = np.finfo(xhat.dtype).max
        np.nan_to_num(xhat, copy=False, nan=0.0, posinf=big, neginf=-big)


def _index_streams(x: np.ndarray, pieces: Sequence[_Piece], seed: int, lat: Lattice
                   ) -> list[np.ndarray]:
    """Index streams (int32) of the coded pieces of chunk ``x``, each quantised at its own
    scale ``t_j``, with the version-2 dither of ``seed``; needs ``max |x / t_j| <
    FAST_LIMIT``.

    Slab by slab: ``z = y + u`` with ``y = x / t_j`` in float64 (the tail block
    zero-padded), as the reference rounds it, then the lattice's stream kernel; each
    stream's pieces are gathered in one row of a buffer that holds every stream. With
    numba, `medustore.codecs._kernels` computes the same streams in one compiled pass.
    """
    kernels = _compiled(lat, sum(p.length for p in pieces), encode=True)
    if kernels is not None:
        return kernels.index_streams(x, pieces, seed, lat)
    dim = lat.dim
    coded = sum(p.length for p in pieces)
    blocks = -(-coded // dim)
    slab = slab_blocks(lat.dim)
    source = _CounterDither(seed, lat)
    store = np.empty((lat.n_streams, blocks), dtype=np.int32)
    fill = [0] * store.shape[0]
    for b0 in range(0, blocks, slab):
        nb = min(slab, blocks - b0)
        z = source.fill(_scratch("enc.z", nb * dim).reshape(nb, dim))
        lo = b0 * dim
        hi = min(lo + nb * dim, coded)
        y = _scratch("enc.y", nb * dim)
        _gather(x, pieces, lo, hi, y)
        y[hi - lo :] = 0.0
        z += y.reshape(nb, dim)
        for i, piece in enumerate(lat._streams(z)):
            np.copyto(store[i, fill[i] : fill[i] + piece.size], piece, casting="unsafe")
            fill[i] += piece.size
    return [store[i, :n] for i, n in enumerate(fill)]


#: Values a process codes with numpy before it loads the compiled kernels. Loading them
#: (importing numba, reading its cache) takes ~0.4 s, about what the numpy path spends on
#: 2**25 values (~130 MB at ~300 MB/s): switching then (as in renting skis until the rent
#: paid equals the price) costs a one-off command at most twice the better choice, and a
#: server gets the kernels after its first rounds. Both paths give the same bytes, so where
#: the switch happens changes nothing but time.
KERNEL_WARMUP = 2**25
_coded = {"values": 0}
_coded_lock = threading.Lock()


def _compiled(lat: Lattice, values: int, encode: bool = False) -> Any:
    """`medustore.codecs._kernels` if it should code these ``values`` of ``lat``, else None.

    ``MEDUSTORE_KERNELS``: ``numpy`` never, ``numba`` always; unset, once this process has
    coded `KERNEL_WARMUP` values (read on every call, so tests can switch paths).
    """
    setting = os.environ.get("MEDUSTORE_KERNELS", "").lower()
    if setting == "numpy":
        return None
    if setting != "numba" and "medustore.codecs._kernels" not in sys.modules:
        with _coded_lock:
            _coded["values"] += values
            if _coded["values"] < KERNEL_WARMUP:
                return None
    try:
        from medustore.codecs import _kernels  # imports numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return None
    return _kernels if _kernels.enabled(lat, encode=encode) else None


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


def _read_chunk(buf: object) -> tuple[_Header, list[memoryview]]:
    r = ChunkReader(buf, _MAGIC, _READS, "LatticeCodec")
    head = _read_header(r)
    if head.mode == _MODE_CODED:
        check_claim(head.count, r.nbytes, "LatticeCodec")
    head = _read_table(r, head)
    payloads = [r.take(n) for n in head.stream_bytes]
    r.finish()
    return head, payloads


def chunk_streams(buf: object) -> list[np.ndarray]:
    """The integer index streams stored in a `LatticeCodec` chunk, in chunk order.

    For inspection (entropy of the stored indices, rate per stream); empty for a zero
    chunk. In the context layout the contexts of each stream are given by
    `Lattice.contexts`; see `lattice_info` for a chunk's layout.
    """
    head, payloads = _read_chunk(buf)
    if head.mode == _MODE_ZERO:
        return []
    coded = sum(p.length for p in head.pieces)
    return _decode_streams(payloads, -(-coded // head.lat.dim) * head.lat.dim, head.width)


def lattice_info(buf: object) -> LatticeInfo:
    """The header of a `LatticeCodec` chunk (any version), checked, without decoding it."""
    head, _ = _read_chunk(buf)
    return LatticeInfo(head.version, head.lat.name, head.dtype, head.count, head.scale,
                       head.seed, head.layout, head.segments, head.stream_bytes)


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
