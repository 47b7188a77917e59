"""`DiffThresholdCodec`: coordinate-level differential thresholding around an inner codec.

Entries with ``|x_i| <= tau`` become exactly zero; a bit mask (zstd-packed) records the
survivors, and only the survivors go through the inner codec: a `LatticeCodec`, or none
(the survivors' raw bytes, lossless). No other codec is accepted, from a constructor, a
config or an archive's metadata: a config naming any numcodecs id (``pickle`` included)
would otherwise run that codec's decoder on the archive's bytes. Decoded zeros are exact:
a subtractive dither alone would turn them into noise, which is why the mask exists. The
header keeps what the error budget needs without the original data: the number of
survivors and the norm of what was zeroed.

Segments (version 2): ``encode(x, segments)`` cuts the chunk into consecutive runs of
values (e.g. tensor pieces); in relative mode each run gets its own threshold
``tau_j = relative * rms(x_j)``, and the survivors of each run form one segment of the
inner `LatticeCodec` chunk (so each is coded at its own scale). The inner chunk carries
the survivors' segment table; the header's ``tau`` is the largest of the ``tau_j``.

Chunk format, versions 1 and 2 (little-endian; 2 is written, with a version-2 inner
chunk and ``tau`` the largest per-segment threshold; 1 is read)::

    magic "MDDT" | version u8 | dtype u8 | flags u8 (bit 0: mask present)
    count u64 | tau f64 | survivors u64 | zeroed norm f64 | mask bytes u64 | inner bytes u64
    mask (zstd of packbits, little bit order) | inner chunk | crc32 u32

Decoding memory is bounded before anything is allocated (rule and constants in
`medustore.codecs._format`): with ``out`` the count must be the buffer's, and the mask
and the result cost at most 1.6 times the buffer on top of it; without ``out`` a chunk
may claim at most
``VALUE_ALLOWANCE + MAX_VALUES_PER_BYTE * len(chunk)`` values. The inner chunk is decoded
into a buffer of the survivor count, under `LatticeCodec`'s own rule.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numcodecs
import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ndarray_copy

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
    norm,
    rms,
)
from medustore.codecs.lattice import LatticeCodec, normalize_segments

__all__ = ["INNER_CODEC_IDS", "DiffThresholdCodec", "ThresholdInfo", "inner_chunk",
           "inner_codec", "threshold_info"]

_MAGIC = b"MDDT"
_VERSION = 2
_READS = (1, 2)
_HEAD = struct.Struct("<BBQdQdQQ")
_MASK_PRESENT = 1
_ZSTD = numcodecs.Zstd(level=1)
#: The only inner codec id accepted (None, the default, stores survivors losslessly).
INNER_CODEC_IDS: tuple[str, ...] = (LatticeCodec.codec_id,)


def _refuse_inner(codec_id: object) -> ValueError:
    return ValueError(
        f"DiffThresholdCodec: inner codec {codec_id!r} is not accepted; `inner` must be "
        f"{' or '.join(map(repr, INNER_CODEC_IDS))} (a LatticeCodec or its config) or None "
        "(lossless)"
    )


def inner_codec(inner: object) -> LatticeCodec | None:
    """The inner codec of a `DiffThresholdCodec`, built from ``inner`` if it is a config.

    A config's id is checked before anything is built from it, so no other codec's
    constructor runs; any other codec raises ValueError naming its id.
    """
    if inner is None:
        return None
    if isinstance(inner, dict):
        config = dict(inner)
        codec_id = config.pop("id", None)
        if codec_id not in INNER_CODEC_IDS:
            raise _refuse_inner(codec_id)
        return LatticeCodec.from_config(config)
    if isinstance(inner, Codec):
        if not (isinstance(inner, LatticeCodec) and inner.codec_id in INNER_CODEC_IDS):
            raise _refuse_inner(getattr(inner, "codec_id", type(inner).__name__))
        return inner
    raise TypeError(
        "DiffThresholdCodec `inner` must be a LatticeCodec, its config dict or None, got "
        f"{type(inner).__name__}"
    )


class ThresholdInfo(tuple):
    """``(count, survivors, tau, zeroed_norm)`` read from a chunk header."""

    __slots__ = ()

    def __new__(cls, count: int, survivors: int, tau: float, zeroed_norm: float):
        return super().__new__(cls, (count, survivors, tau, zeroed_norm))

    count = property(lambda self: self[0])
    survivors = property(lambda self: self[1])
    tau = property(lambda self: self[2])
    zeroed_norm = property(lambda self: self[3])


class DiffThresholdCodec(Codec):
    """Zero the entries with ``|x| <= tau``, code the survivors with an inner codec.

    Parameters
    ----------
    threshold : float, optional
        Absolute threshold ``tau``. Exclusive with ``relative``.
    relative : float, optional
        ``tau = relative * rms(x)`` of each chunk. Default 0 (only exact zeros are dropped).
    inner : LatticeCodec or dict, optional
        Codec for the survivors (a 1-D array of the input dtype), or its config; only
        ``medustore.lattice`` is accepted (ValueError otherwise). By default the survivors
        are stored losslessly.
    dtype : {"<f2", "<f4", "<f8"}, optional
        Type of the values ``encode`` is given, as `LatticeCodec`'s ``dtype``: None infers
        it from a float array; when set, any buffer-protocol input is viewed (not
        converted) as that dtype, and float data of another dtype is refused (TypeError).
        An inner codec's own ``dtype``, if set, must agree.
    """

    codec_id = "medustore.diffthreshold"

    def __init__(
        self,
        threshold: float | None = None,
        relative: float | None = None,
        inner: LatticeCodec | dict | None = None,
        dtype: str | None = None,
    ) -> None:
        if threshold is not None and relative is not None:
            raise ValueError("DiffThresholdCodec takes `threshold` or `relative`, not both")
        for name, value in (("threshold", threshold), ("relative", relative)):
            if value is not None and not (
                isinstance(value, (int, float)) and np.isfinite(value) and value >= 0
            ):
                raise ValueError(
                    f"DiffThresholdCodec `{name}` must be a finite number >= 0, got {value!r}"
                )
        if threshold is None and relative is None:
            relative = 0.0
        self.threshold = None if threshold is None else float(threshold)
        self.relative = None if relative is None else float(relative)
        self.inner = inner_codec(inner)
        dt = float_dtype(dtype, "DiffThresholdCodec")
        self.dtype = None if dt is None else dt.str
        inner_dtype = None if self.inner is None else self.inner.dtype
        if None not in (self.dtype, inner_dtype) and self.dtype != inner_dtype:
            # the survivors keep the chunk's dtype: the inner codec would refuse them
            raise ValueError(
                f"DiffThresholdCodec dtype={self.dtype!r} disagrees with its inner codec's "
                f"dtype={inner_dtype!r}; set one of them only, or the same on both"
            )

    def get_config(self) -> dict:
        config = {"id": self.codec_id, "threshold": self.threshold,
                  "relative": self.relative,
                  "inner": None if self.inner is None else self.inner.get_config()}
        if self.dtype is not None:  # absent unless set: older configs stay byte-identical
            config["dtype"] = self.dtype
        return config

    def __repr__(self) -> str:
        dtype = "" if self.dtype is None else f", dtype={self.dtype!r}"
        return (f"DiffThresholdCodec(threshold={self.threshold!r}, relative={self.relative!r}, "
                f"inner={self.inner!r}{dtype})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DiffThresholdCodec) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(repr(self.get_config()))

    def tau(self, x: np.ndarray) -> float:
        """The threshold used for chunk ``x``."""
        if self.threshold is not None:
            return self.threshold
        return self.relative * rms(np.asarray(x)) if self.relative else 0.0

    def taus(self, x: np.ndarray, segments: Sequence[int] | None = None) -> list[float]:
        """The threshold of each segment of chunk ``x`` (normalized segments, see
        `medustore.codecs.lattice.normalize_segments`)."""
        x = np.asarray(x).reshape(-1)
        lengths = normalize_segments(segments, x.size, "DiffThresholdCodec")
        bounds = np.cumsum([0, *lengths]).tolist()
        return [self.tau(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def survivors(self, x: np.ndarray, segments: Sequence[int] | None = None
                  ) -> tuple[np.ndarray, list[int]]:
        """``(keep mask, survivors per segment)`` of chunk ``x`` cut into ``segments``."""
        x = np.asarray(x).reshape(-1)
        lengths = normalize_segments(segments, x.size, "DiffThresholdCodec")
        keep = np.empty(x.size, dtype=bool)
        counts, a = [], 0
        for n, tau in zip(lengths, self.taus(x, lengths), strict=True):
            # Compare in float64: a Python float would be rounded to a float16/32 input's
            # dtype first, and entries just above tau would be zeroed.
            np.greater(np.abs(x[a : a + n]), np.float64(tau), out=keep[a : a + n])
            counts.append(int(np.count_nonzero(keep[a : a + n])))
            a += n
        return keep, counts

    def encode(self, buf: object, segments: Sequence[int] | None = None) -> bytes:
        """Encode ``buf``; ``segments``: lengths of consecutive runs of its flat values,
        summing to its size, each thresholded (relative mode) and coded at its own scale."""
        x = as_float_array(buf, "DiffThresholdCodec", self.dtype)
        check_finite(x, "DiffThresholdCodec")
        lengths = normalize_segments(segments, x.size, "DiffThresholdCodec")
        tau = max(self.taus(x, lengths), default=self.tau(x))
        keep, counts = self.survivors(x, lengths)
        survivors = x[keep]
        zeroed_norm = norm(x[~keep])
        flags, mask = 0, b""
        if survivors.size != x.size:
            flags |= _MASK_PRESENT
            mask = bytes(_ZSTD.encode(np.packbits(keep, bitorder="little")))
        if survivors.size == 0:
            inner = b""
        elif self.inner is None:
            inner = survivors.tobytes()
        else:
            inner = bytes(self.inner.encode(survivors, segments=counts))
        header = _HEAD.pack(DTYPE_CODES[x.dtype], flags, x.size, tau, survivors.size,
                            zeroed_norm, len(mask), len(inner))
        return frame(_MAGIC + bytes([_VERSION]), header, mask, inner)

    def decode(self, buf: object, out: object = None) -> np.ndarray:
        inner = inner_codec(self.inner)  # `inner` may have been reassigned since __init__
        r = ChunkReader(buf, _MAGIC, _READS, "DiffThresholdCodec")
        dtype_code, flags, count, _tau, n_surv, _norm, mask_len, inner_len = r.unpack(_HEAD)
        if dtype_code not in DTYPES:
            raise ValueError(f"DiffThresholdCodec: unknown dtype code {dtype_code}")
        dtype = DTYPES[dtype_code]
        out_arr = as_out_array(out, "DiffThresholdCodec")  # any writable buffer
        check_count(count, out_arr, "DiffThresholdCodec")
        if out is None:
            check_claim(count, r.nbytes, "DiffThresholdCodec")
        if n_surv > count or flags & ~_MASK_PRESENT:
            raise ValueError("DiffThresholdCodec: corrupt chunk header")
        mask_bytes = r.take(mask_len)
        inner_bytes = r.take(inner_len)
        r.finish()
        if flags & _MASK_PRESENT:
            packed = np.zeros(-(-count // 8), dtype=np.uint8)
            if _frame_content_size(mask_bytes) != packed.size:
                # zstd would fill only the head of `packed` from a shorter frame
                raise ValueError(
                    "DiffThresholdCodec: corrupt survivor mask (its size disagrees with the "
                    "count)")
            try:
                _ZSTD.decode(bytes(mask_bytes), out=packed)
            except Exception as err:  # numcodecs raises RuntimeError/ValueError variants
                raise ValueError(f"DiffThresholdCodec: corrupt survivor mask ({err})") from None
            # unpackbits gives 0/1 bytes: viewed as bool without a second count-byte copy
            keep = np.unpackbits(packed, count=count, bitorder="little").view(bool)
            if int(keep.sum()) != n_surv:
                raise ValueError("DiffThresholdCodec: survivor mask disagrees with its header")
        elif n_surv != count:
            raise ValueError("DiffThresholdCodec: corrupt chunk header (mask missing)")
        else:
            keep = None
        survivors = np.empty(n_surv, dtype=dtype)
        if n_surv:
            if inner is None:
                if inner_len != n_surv * dtype.itemsize:
                    raise ValueError("DiffThresholdCodec: survivor payload has the wrong size")
                survivors[:] = np.frombuffer(inner_bytes, dtype=dtype)
            else:
                inner.decode(bytes(inner_bytes), out=survivors)
        if keep is None:
            result = survivors
        else:
            result = np.zeros(count, dtype=dtype)
            result[keep] = survivors
        return result if out is None else ndarray_copy(result, out)


def _frame_content_size(data: memoryview) -> int | None:
    """The decompressed size a zstd frame header declares (None: absent or unreadable)."""
    head = bytes(data[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = head[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or pos + size > len(head):
        return None
    value = int.from_bytes(head[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def inner_chunk(buf: object) -> memoryview:
    """The inner chunk of a `DiffThresholdCodec` chunk: the survivors as coded by the inner
    codec (a `LatticeCodec` chunk, or their raw bytes; empty when nothing survived)."""
    r = ChunkReader(buf, _MAGIC, _READS, "DiffThresholdCodec")
    *_, mask_len, inner_len = r.unpack(_HEAD)
    r.take(mask_len)
    inner = r.take(inner_len)
    r.finish()
    return inner


def threshold_info(buf: object) -> ThresholdInfo:
    """Read the header of a `DiffThresholdCodec` chunk without decoding it."""
    r = ChunkReader(buf, _MAGIC, _READS, "DiffThresholdCodec")
    _dt, _flags, count, tau, n_surv, norm, _ml, _il = r.unpack(_HEAD)
    return ThresholdInfo(count, n_surv, tau, norm)
