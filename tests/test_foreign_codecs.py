"""An archive may name only medustore's own codecs and lossless zarr codecs: any other codec
in an array's metadata is refused before a chunk is decoded (no code of a stranger runs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import icechunk
import numpy as np
import pytest
from zarr.abc.codec import BytesBytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.registry import register_codec

import medustore

DECODED: list[str] = []


@dataclass(frozen=True)
class Tripwire(BytesBytesCodec):
    """A codec that records every decode: the test fails if medustore ever calls it."""

    is_fixed_size = True

    @classmethod
    def from_dict(cls, data: dict) -> Tripwire:
        return cls()

    def to_dict(self) -> dict:
        return {"name": "test.tripwire"}

    async def _decode_single(self, chunk_bytes, chunk_spec):  # noqa: ANN001
        DECODED.append("decoded")
        return chunk_bytes

    async def _encode_single(self, chunk_bytes, chunk_spec):  # noqa: ANN001
        return chunk_bytes

    def compute_encoded_size(self, input_byte_length: int, chunk_spec) -> int:  # noqa: ANN001
        return input_byte_length


register_codec("test.tripwire", Tripwire)


def _archive(tmp_path: Path) -> Path:
    path = tmp_path / "a"
    rng = np.random.default_rng(8)
    with medustore.open(path, "w", model=np.zeros(16, np.float32), policy="full") as store:
        store.record_round(0, {u: rng.normal(size=16).astype(np.float32) for u in "ab"})
    return path


def _edit_codecs(path: Path, array: str, codec: dict) -> None:
    """Commit a version whose ``array`` names ``codec`` after its serializer."""
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
    session = repo.writable_session("main")
    store = session.store
    key = f"{array}/zarr.json"
    meta = json.loads(sync(store.get(key, prototype=default_buffer_prototype())).to_bytes())
    meta["codecs"].append(codec)
    buf = default_buffer_prototype().buffer.from_bytes(json.dumps(meta).encode())
    sync(store.set(key, buf))
    session.commit("edit codecs")


@pytest.mark.parametrize("array", ["users", "entries", "model", "records"])
def test_registered_foreign_codec_is_never_called(tmp_path: Path, array: str) -> None:
    path = _archive(tmp_path)
    _edit_codecs(path, array, {"name": "test.tripwire"})
    DECODED.clear()
    with pytest.raises(medustore.DamagedArchiveError, match="test.tripwire"):
        medustore.open(path).latest()
    assert DECODED == []


def test_unknown_codec_is_damage_not_a_crash(tmp_path: Path) -> None:
    path = _archive(tmp_path)
    _edit_codecs(path, "model", {"name": "numcodecs.pickle"})
    with pytest.raises(medustore.DamagedArchiveError, match="model"):
        medustore.open(path).latest()
