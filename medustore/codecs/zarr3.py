"""Zarr v3 adapters: native ``ArrayBytesCodec`` classes around medustore's numcodecs codecs.

zarr v3 arrays refuse raw numcodecs codecs, so each codec gets a small frozen dataclass that
holds the numcodecs config and turns a chunk into bytes and back. They are registered under
the ``zarr.codecs`` entry-point group as ``medustore.lattice`` and
``medustore.diffthreshold``, so a process that never imported medustore opens the arrays.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numcodecs
import numpy as np
from numcodecs.abc import Codec
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

from medustore.codecs.lattice import LatticeCodec
from medustore.codecs.threshold import DiffThresholdCodec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec

__all__ = ["DiffThresholdZarrCodec", "LatticeZarrCodec", "NumcodecsArrayBytesCodec"]


@dataclass(frozen=True)
class NumcodecsArrayBytesCodec(ArrayBytesCodec):
    """Base adapter: a numcodecs codec that maps a whole float chunk to bytes."""

    codec_cls: ClassVar[type[Codec]]
    configuration: dict

    def __init__(self, **configuration: object) -> None:
        config = {k: v for k, v in configuration.items() if k != "id"}
        codec = self.codec_cls.from_config(dict(config))  # validates now, not at write time
        object.__setattr__(self, "configuration", {
            k: v for k, v in codec.get_config().items() if k != "id"
        })

    @property
    def codec(self) -> Codec:
        return self.codec_cls.from_config(dict(self.configuration))

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        if data.get("name") != cls.codec_cls.codec_id:
            raise ValueError(f"expected codec name {cls.codec_cls.codec_id!r}, got {data!r}")
        return cls(**(data.get("configuration") or {}))

    def to_dict(self) -> dict:
        return {"name": self.codec_cls.codec_id, "configuration": dict(self.configuration)}

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> Self:
        dtype = np.dtype(array_spec.dtype.to_native_dtype())
        if dtype.kind != "f":
            raise ValueError(
                f"{self.codec_cls.codec_id} codes float arrays; this array is {dtype}"
            )
        configured = self.configuration.get("dtype")
        if configured is not None and dtype.newbyteorder("<").str != configured:
            # refused when the array is created, not at its first write
            raise ValueError(
                f"{self.codec_cls.codec_id} has dtype={configured!r} but this array is "
                f"{dtype}; drop the codec's `dtype` or set it to {dtype.newbyteorder('<').str!r}"
            )
        return self

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        arr = np.asarray(chunk_array.as_ndarray_like())
        encoded = self.codec.encode(arr)
        return chunk_spec.prototype.buffer.from_bytes(encoded)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        dtype = np.dtype(chunk_spec.dtype.to_native_dtype())
        out = np.empty(chunk_spec.shape, dtype=dtype)
        # Sized by the array's metadata, not by the chunk: the codec refuses a header that
        # claims another count before it allocates or decodes anything.
        self.codec.decode(chunk_bytes.to_bytes(), out=out.reshape(-1))
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(out)

    # Coding is CPU work that releases the GIL in numpy and pcodec: run it in a worker
    # thread so zarr's concurrent chunk writes and reads code chunks in parallel.
    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable-size output


@dataclass(frozen=True, init=False)
class LatticeZarrCodec(NumcodecsArrayBytesCodec):
    """zarr v3 form of `LatticeCodec` (name ``medustore.lattice``)."""

    codec_cls: ClassVar[type[Codec]] = LatticeCodec


@dataclass(frozen=True, init=False)
class DiffThresholdZarrCodec(NumcodecsArrayBytesCodec):
    """zarr v3 form of `DiffThresholdCodec` (name ``medustore.diffthreshold``)."""

    codec_cls: ClassVar[type[Codec]] = DiffThresholdCodec


register_codec(LatticeCodec.codec_id, LatticeZarrCodec)
register_codec(DiffThresholdCodec.codec_id, DiffThresholdZarrCodec)
_ = numcodecs  # the numcodecs registry is filled by medustore.codecs
