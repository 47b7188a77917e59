"""The declared table of a format-2 archive's arrays: the one place that says what exists.

Creation, opening, the writer, verify and export all read `TABLE`. Every array grows along
its first dimension only, by appending; nothing a round writes is rewritten by a later
round except ``model`` (w_T), the accumulator rows of that round's participants and the
tail chunks of the index tables. Besides these arrays, the user runs of
`medustore.archive.postings` (array ``postings``) are merged LSM-style.

Dimensions::

    round    committed rounds, in increasing round number
    entry    participations (round, user), grouped by round in commit order
    record   stored records (differentials d_t^u), in commit order
    user     users in order of first appearance
    param    the flat model vector
    field    the columns of an index table (named by ``ArraySpec.fields``)

Missing data can never pass for data: every chunk is written even when it equals the fill
value (``write_empty_chunks``), index tables use fill values no valid entry takes
(`INT_FILL`, NaN), and reads check that each chunk they need exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.codecs

__all__ = ["ALLOWED_CODECS", "GROWING", "INT_FILL", "LOSSLESS", "TABLE", "ArraySpec",
           "check_array", "spec"]

#: Fill value of integer index tables: no valid entry takes it, so an unwritten cell shows.
INT_FILL = int(np.iinfo(np.int64).min)

#: Dimensions that grow as rounds are recorded (their sizes live in the archive's counts).
GROWING = ("round", "entry", "record", "user")

#: Lossless arrays carry zstd's content checksum: a damaged chunk fails to decode instead of
#: decoding to different numbers (the lossy codecs have their own CRC).
LOSSLESS = (zarr.codecs.ZstdCodec(level=1, checksum=True),)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the archive.

    Attributes
    ----------
    name
        Path of the array in the archive's root group.
    dims
        Dimension names (see the module docstring).
    dtype
        ``"f4"``, ``"f8"``, ``"i8"``, ``"str"`` (JSON text, variable length) or ``"model"``
        (the model's own float precision).
    chunks
        Chunk length per dimension; ``"param"`` means the policy's ``chunk_size`` (capped at
        the model size) and ``"field"`` the number of fields.
    role
        ``"record"`` and ``"aggregate"``: coded with the policy's serializers; ``"lossless"``:
        zstd with checksums; ``"index"``: a lossless table the index is read from.
    fields
        Column names of an index table (its last dimension).
    when
        Name of the archive setting that must be true for the array to exist.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    chunks: tuple[int | str, ...]
    role: str
    fields: tuple[str, ...] = ()
    when: str | None = None

    def field(self, name: str) -> int:
        """Column of field ``name``."""
        return self.fields.index(name)

    def fill(self) -> Any:
        """The fill value: one that valid data never takes where the reader checks it."""
        if self.dtype == "str":
            return ""
        if self.dtype == "i8":
            return INT_FILL
        if self.role == "index":
            return np.nan
        return 0.0  # coded data: zarr pads partial chunks with it before the codec sees them

    def exists(self, settings: Mapping[str, Any]) -> bool:
        return self.when is None or bool(settings.get(self.when))

    def shape(self, counts: Mapping[str, int], m: int) -> tuple[int, ...]:
        """The array's shape for the archive's ``counts`` and a model of ``m`` values."""
        sizes = {**counts, "param": m, "field": len(self.fields)}
        return tuple(int(sizes[d]) for d in self.dims)

    def chunk_shape(self, chunk: int) -> tuple[int, ...]:
        sizes = {"param": chunk, "field": len(self.fields)}
        return tuple(int(sizes[c]) if isinstance(c, str) else c for c in self.chunks)

    def numpy_dtype(self, model_dtype: str) -> Any:
        if self.dtype == "str":
            return str
        return model_dtype if self.dtype == "model" else self.dtype


_ROUND_ROWS, _ENTRY_ROWS, _USER_ROWS = 1024, 4096, 4096

TABLE: tuple[ArraySpec, ...] = (
    # Index tables: one row per round / participation / user, appended.
    ArraySpec("rounds", ("round", "field"), "i8", (_ROUND_ROWS, "field"), "index",
              fields=("round", "entries", "users")),
    ArraySpec("round_facts", ("round", "field"), "f8", (_ROUND_ROWS, "field"), "index",
              fields=("anorm", "agg_evar")),
    ArraySpec("entries", ("entry", "field"), "i8", (_ENTRY_ROWS, "field"), "index",
              fields=("user", "record", "nbytes")),
    ArraySpec("entry_facts", ("entry", "field"), "f8", (_ENTRY_ROWS, "field"), "index",
              fields=("weight", "dnorm", "znorm", "evar")),
    ArraySpec("users", ("user",), "str", (_USER_ROWS,), "index"),
    # The digest chain after each round (32 bytes as 4 int64): a reader checks the rows of
    # one round against it without reading the others.
    ArraySpec("links", ("round", "field"), "i8", (_ROUND_ROWS, "field"), "index",
              fields=("d0", "d1", "d2", "d3"), when="sparse"),
    # Data.
    ArraySpec("records", ("record", "param"), "f4", (1, "param"), "record"),
    ArraySpec("aggregate", ("round", "param"), "f4", (1, "param"), "aggregate",
              when="keep_aggregates"),
    ArraySpec("initial", ("param",), "model", ("param",), "lossless"),
    ArraySpec("model", ("param",), "model", ("param",), "lossless"),
    ArraySpec("acc", ("user", "param"), "f8", (1, "param"), "lossless", when="accumulators"),
)

_BY_NAME = {s.name: s for s in TABLE}


def spec(name: str) -> ArraySpec:
    """The declared array ``name``."""
    return _BY_NAME[name]


#: The only codecs an archive may name. Anything else (a pickle codec, say) is refused before
#: a single chunk is decoded: an archive from a stranger must not be able to run code.
ALLOWED_CODECS = frozenset({"bytes", "zstd", "vlen-utf8", "medustore.lattice",
                            "medustore.diffthreshold"})


def check_array(s: ArraySpec, arr: zarr.Array, model_dtype: str) -> str | None:
    """What is wrong with array ``arr`` against its declaration ``s`` (None: nothing)."""
    names = [c.to_dict().get("name") for c in arr.metadata.codecs]
    foreign = [n for n in names if n not in ALLOWED_CODECS]
    if foreign:
        return (f"array {s.name} names codec(s) {foreign} that medustore archives never use; "
                "refusing to decode it")
    if s.role in ("index", "lossless") and not set(names) <= {"bytes", "zstd", "vlen-utf8"}:
        return f"array {s.name} must be lossless, but names codecs {names}"
    if s.dtype == "str":
        expected, ok = "text", np.dtype(arr.dtype).kind in "TUO"
    else:
        expected = np.dtype(s.numpy_dtype(model_dtype))
        ok = np.dtype(arr.dtype) == expected
    if not ok:
        return f"array {s.name} has dtype {arr.dtype}, expected {expected}"
    if arr.ndim != len(s.dims):
        return f"array {s.name} has {arr.ndim} dimensions, expected {len(s.dims)}"
    return None


def codec_args(spec: ArraySpec, serializers: Mapping[str, dict | None]) -> dict:
    """zarr ``create_array`` codec arguments of an array."""
    serializer = serializers.get(spec.role)
    if serializer is None:
        return {"compressors": LOSSLESS}
    return {"serializer": serializer, "compressors": None}
