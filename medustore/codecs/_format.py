"""Chunk framing shared by medustore's codecs.

Every chunk a medustore codec writes starts with a fixed little-endian header (its layout
is given by the codec, after a 4-byte magic and a 1-byte format version) and ends with a
CRC-32 of everything before it. Readers check the magic, the version, the checksum and
every length against the buffer *before* acting on a header field, so a truncated,
corrupted or hostile buffer raises `ValueError` and never drives an allocation.

Bounded decoding memory. A header's element count is checked before anything is
allocated for it:

* with an output buffer ``out`` the count must equal the buffer's (`check_count`): the
  caller sized what decoding allocates;
* without one, a chunk of ``n`` bytes may claim at most
  ``VALUE_ALLOWANCE + MAX_VALUES_PER_BYTE * n`` values (`check_claim`), and never more
  than `MAX_ELEMENTS`.

A coded lattice chunk is held to the `check_claim` bound even with ``out``: its index
arrays (4 or 8 bytes per value), pcodec decompression and dither all grow with the count,
and pcodec stores a constant stream in 1/20000 byte per value, so the count, not the
buffer, would set the cost. Each codec's docstring states where the rule applies.

The constants come from what legitimate chunks produce (``python
benchmarks/bench_claims.py``, chunks of 2**22 values): coded lattice chunks of
non-constant data hold at most 11 values per byte (very coarse steps, where the dither
leaves about one bit per value); constant data packs denser on Z as it nears the middle
of a cell, where the dither leaves a single index (640 values per byte at ``bits=1.05``,
15768 exactly mid-cell: pcodec's ratio for a constant stream). Zero chunks (39 bytes) and
thresholded chunks whose mask zstd packs (93 bytes for 2**22 values, all zeroed) hold
more still. The allowance lets every chunk of up to 2**22 values through whatever its
length, at a cost of about 70 MiB and 40 ms at most; beyond it, 256 values per byte is 23
times the densest chunk of non-constant data, and bounds what a hostile chunk can make the
decoder allocate to about 4 KiB per byte it holds. Larger chunks that pack denser (zero
chunks, sparse masks) decode with ``out`` (the zarr v3 adapters always pass one); constant
chunks on Z that pack denser than 256 values per byte are refused above 2**22 values.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from numcodecs.compat import ensure_contiguous_ndarray_like, ensure_ndarray_like

__all__ = [
    "DTYPES",
    "DTYPE_CODES",
    "MAX_ELEMENTS",
    "MAX_VALUES_PER_BYTE",
    "VALUE_ALLOWANCE",
    "ChunkReader",
    "as_float_array",
    "as_out_array",
    "check_claim",
    "check_count",
    "check_finite",
    "float_dtype",
    "frame",
    "norm",
    "rms",
    "varint",
]

#: Float dtypes the codecs accept, by one-byte header code.
DTYPES: dict[int, np.dtype] = {1: np.dtype("<f2"), 2: np.dtype("<f4"), 3: np.dtype("<f8")}
DTYPE_CODES: dict[np.dtype, int] = {dt: code for code, dt in DTYPES.items()}

#: Largest element count a chunk may claim when the caller gives no output buffer
#: (2**28 float64 values are 2 GiB). With ``out`` the count must equal ``out.size``.
MAX_ELEMENTS = 2**28

#: Values any chunk may claim whatever its length: 2**22 (32 MiB as float64, and as
#: many again for int64 lattice indices). Covers zero chunks and sparse masks of that size.
VALUE_ALLOWANCE = 2**22

#: Values a chunk may claim per byte it holds, beyond `VALUE_ALLOWANCE`: 23 times the
#: densest coded chunk of non-constant data measured (11 values per byte, coarse steps).
MAX_VALUES_PER_BYTE = 256

_CRC = struct.Struct("<I")


def float_dtype(dtype: object, codec: str) -> np.dtype | None:
    """The chunk dtype a codec's ``dtype`` setting names (None: infer it from the input).

    Only the little-endian float16/32/64 of the chunk header are accepted: raw bytes are
    read in that byte order and decode in it, so they come back byte for byte.
    """
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt not in DTYPE_CODES:
        raise ValueError(
            f"{codec} `dtype` must be None (infer from a float array) or one of "
            f"'<f2', '<f4', '<f8' (float16/32/64, little-endian), got {dtype!r}"
        )
    return dt


def as_float_array(buf: object, codec: str, dtype: object = None) -> np.ndarray:
    """Flat little-endian view of a chunk's float16/32/64 values.

    Parameters
    ----------
    buf
        A float array-like; with ``dtype`` also any object exporting the buffer protocol
        (bytes, bytearray, memoryview, array.array, integer or byte arrays ...).
    codec
        Names the codec (and its setting) in error messages.
    dtype
        The codec's ``dtype`` setting (see `float_dtype`). None: ``buf`` must be a float
        array, whose dtype is the chunk's. Given: untyped or integer buffers are *viewed*
        (not converted) as that dtype; typed float data must already be of that dtype.

    Raises
    ------
    TypeError
        Not a float array (no ``dtype``), or float data of another dtype than ``dtype``:
        a silent cast would change the values' precision, so it is refused.
    ValueError
        A byte length that is not a multiple of the dtype's item size, or a strided buffer.
    """
    dt = float_dtype(dtype, codec)
    arr = None
    if dt is not None and not isinstance(buf, np.ndarray):
        try:
            arr = ensure_ndarray_like(buf)  # a view of any buffer-protocol object
        except TypeError:
            arr = None  # no buffer protocol (a list, a tensor): converted as before
    if arr is None:
        arr = np.asarray(buf)
    if dt is not None and arr.dtype.kind != "f":
        return _view_as(arr, codec, dt)
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(
            f"{codec} encodes float16, float32 or float64 arrays, got dtype {arr.dtype}; "
            "cast with .astype(np.float32) first, or set the codec's `dtype` to read raw "
            "bytes"
        )
    little = arr.dtype.newbyteorder("<")
    if dt is not None and little != dt:
        raise TypeError(
            f"{codec} has dtype={dt.str!r} but was given {arr.dtype.name} values; cast "
            f"with .astype({dt.str!r}) first, or set dtype={little.str!r} (or None to "
            "infer it from the array)"
        )
    if dt is not None and arr.flags.f_contiguous and not arr.flags.c_contiguous:
        # Memory order, as the same array's raw bytes would be read (numcodecs' order "A")
        flat = arr.reshape(-1, order="F")
    else:
        flat = np.ascontiguousarray(arr).reshape(-1)
    return flat.astype(little, copy=False)


def _view_as(arr: np.ndarray, codec: str, dt: np.dtype) -> np.ndarray:
    """``arr``'s bytes viewed (no copy) as a flat array of ``dt``."""
    if arr.dtype == object:
        raise TypeError(f"{codec} cannot read raw bytes from an object array")
    try:
        raw = ensure_contiguous_ndarray_like(arr)
    except ValueError:
        raise ValueError(
            f"{codec}: a buffer viewed as {dt.str!r} must be contiguous; pass a copy "
            "(np.ascontiguousarray) of a strided array"
        ) from None
    if raw.nbytes % dt.itemsize:
        raise ValueError(
            f"{codec} has dtype={dt.str!r} ({dt.itemsize} bytes per value) but was given "
            f"{raw.nbytes} bytes, not a whole number of values; pass the chunk's exact bytes "
            "or set `dtype` to the type they hold"
        )
    return raw.view(np.uint8).view(dt)


def as_out_array(out: object, codec: str) -> np.ndarray | None:
    """A view of a decoder's ``out`` (any writable buffer-protocol object, or None)."""
    if out is None:
        return None
    try:
        arr = ensure_ndarray_like(out)
    except TypeError:
        raise TypeError(
            f"{codec}: `out` must be a writable array or buffer (bytearray, memoryview, "
            f"numpy array ...), got {type(out).__name__}"
        ) from None
    if not arr.flags.writeable:
        raise ValueError(
            f"{codec}: `out` is read-only ({type(out).__name__}); pass a writable buffer "
            "such as a bytearray or a numpy array"
        )
    return arr


def norm(x: np.ndarray) -> float:
    """Euclidean norm in float64, scaled by the peak first so that squaring huge or tiny
    values neither overflows nor underflows."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        return 0.0
    scaled = np.asarray(x, dtype=np.float64).reshape(-1) / peak
    return peak * float(np.sqrt(np.dot(scaled, scaled)))


def rms(x: np.ndarray) -> float:
    """Root mean square in float64, overflow-safe like `norm`."""
    return norm(x) / float(np.sqrt(x.size)) if x.size else 0.0


def check_finite(x: np.ndarray, codec: str) -> None:
    """Raise ValueError naming how many values are NaN or infinite and where the first is."""
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x))
        raise ValueError(
            f"{codec} cannot encode non-finite values: {bad.size} NaN or infinite "
            f"value(s), the first at flat index {int(bad[0])} ({x[bad[0]]!r})"
        )


def frame(header: bytes, *parts: bytes) -> bytes:
    """Join header and payload parts and append the CRC-32 of the whole."""
    body = b"".join((header, *parts))
    return body + _CRC.pack(zlib.crc32(body))


class ChunkReader:
    """Bounds-checked cursor over a framed chunk.

    Parameters
    ----------
    buf
        The encoded chunk (any buffer-protocol object).
    magic, version, codec
        Expected magic and format version; ``codec`` names the codec in error messages.
    """

    def __init__(self, buf: object, magic: bytes, versions: tuple[int, ...], codec: str) -> None:
        try:
            data = memoryview(buf).cast("B")
        except TypeError as err:
            raise ValueError(f"{codec}: cannot read a chunk from {type(buf).__name__}") from err
        self.codec = codec
        self.nbytes = len(data)
        if len(data) < len(magic) + 1 + _CRC.size:
            raise ValueError(f"{codec}: chunk of {len(data)} bytes is too short to be valid")
        if bytes(data[: len(magic)]) != magic:
            raise ValueError(
                f"{codec}: not a {codec} chunk (magic {bytes(data[:len(magic)])!r}, "
                f"expected {magic!r})"
            )
        self.version = data[len(magic)]
        if self.version not in versions:
            raise ValueError(
                f"{codec}: chunk format version {self.version} is not supported by this "
                f"medustore (reads {', '.join(map(str, versions))}); upgrade medustore"
            )
        (crc,) = _CRC.unpack(data[-_CRC.size :])
        self._data = data[: -_CRC.size]
        if zlib.crc32(self._data) != crc:
            raise ValueError(f"{codec}: chunk checksum mismatch (corrupted or truncated data)")
        self._pos = len(magic) + 1

    def unpack(self, fmt: struct.Struct) -> tuple:
        """Read a fixed-size record."""
        return fmt.unpack(self.take(fmt.size))

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes, or ValueError if the chunk is shorter."""
        if n < 0 or self._pos + n > len(self._data):
            raise ValueError(
                f"{self.codec}: chunk is truncated or corrupt (needs {n} bytes at offset "
                f"{self._pos}, has {len(self._data) - self._pos})"
            )
        view = self._data[self._pos : self._pos + n]
        self._pos += n
        return view

    def varint(self, limit: int = 2**64 - 1) -> int:
        """An unsigned LEB128 integer (at most 10 bytes, minimal form), at most ``limit``."""
        value, shift = 0, 0
        for i in range(10):
            (byte,) = self.take(1)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise ValueError(f"{self.codec}: corrupt chunk (overlong integer)")
                if value > limit:
                    raise ValueError(
                        f"{self.codec}: corrupt chunk (field value {value} above {limit})")
                return value
            shift += 7
        raise ValueError(f"{self.codec}: corrupt chunk (integer longer than 10 bytes)")

    def finish(self) -> None:
        """Refuse trailing bytes: a well-formed chunk is consumed exactly."""
        if self._pos != len(self._data):
            raise ValueError(
                f"{self.codec}: {len(self._data) - self._pos} unexpected trailing bytes"
            )


def varint(n: int) -> bytes:
    """Unsigned LEB128 encoding of ``0 <= n < 2**64`` (the inverse of `ChunkReader.varint`)."""
    if not 0 <= n < 2**64:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def check_count(count: int, out: np.ndarray | None, codec: str) -> None:
    """Validate a header's element count against ``out`` or the sanity cap.

    ``out`` is an array of values, or a raw byte buffer (``bytearray``, ``uint8`` array:
    numcodecs allows any buffer) sized for ``count`` values of one of the chunk dtypes;
    copying into it checks the exact dtype.
    """
    if out is not None:
        if out.dtype.itemsize == 1:
            fits = out.nbytes in {count * dt.itemsize for dt in DTYPES.values()}
        else:
            fits = count == out.size
        if not fits:
            raise ValueError(
                f"{codec}: chunk holds {count} values but `out` has room for {out.size}"
            )
    elif count > MAX_ELEMENTS:
        raise ValueError(
            f"{codec}: chunk claims {count} values, above the limit of {MAX_ELEMENTS} "
            "without an output buffer; pass `out=` of the right size"
        )


def check_claim(count: int, nbytes: int, codec: str) -> None:
    """Refuse a count out of proportion to the chunk that claims it (see the module
    docstring): at most ``VALUE_ALLOWANCE + MAX_VALUES_PER_BYTE * nbytes`` values."""
    limit = VALUE_ALLOWANCE + MAX_VALUES_PER_BYTE * nbytes
    if count > limit:
        raise ValueError(
            f"{codec}: a chunk of {nbytes} bytes claims {count} values, more than the "
            f"{limit} its size allows ({VALUE_ALLOWANCE} + {MAX_VALUES_PER_BYTE} per byte); "
            "corrupt or hostile chunk, refused before allocating"
        )
