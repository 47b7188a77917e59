"""Per-tensor coding error of an archive's stored records or aggregates.

A lossy chunk says how it was coded: its header holds the cell size ``s_j`` of every
segment (format 2 cuts chunks at tensor boundaries), and the dithered quantiser's error is
uniform over the cell, so every value of segment ``j`` carries an expected squared error
``G s_j**2`` (``G`` the lattice's normalized second moment). Summed over a tensor's values
and over the stored vectors, and set against the decoded vectors' energy (for a
subtractive dither ``E||x_hat||^2 = ||x||^2 + E||e||^2``), this gives each tensor's
relative error ``||e|| / ||x||`` without the original data. Coordinates zeroed by
thresholding are not coding noise and are not counted here; their norm is kept per record
(``entry_znorm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from medustore.codecs.lattice import lattice_info
from medustore.codecs.lattices import get_lattice
from medustore.codecs.threshold import inner_chunk
from medustore.errors import DamagedArchiveError

if TYPE_CHECKING:
    from medustore.store import UpdateStore

__all__ = ["TensorError", "tensor_errors"]


@dataclass(frozen=True)
class TensorError:
    """The coding error of one tensor over the vectors examined.

    Attributes
    ----------
    name
        The tensor's name (``"(model)"`` for the whole model).
    params
        Values in the tensor.
    noise_rms
        Root of the mean expected squared error per value.
    relative
        ``sqrt(sum E||e||^2 / sum ||x||^2)`` over the vectors (None where the tensor's
        decoded energy does not exceed its expected noise, e.g. a tensor of zeros).
    """

    name: str
    params: int
    noise_rms: float
    relative: float | None

    def to_json(self) -> dict:
        return {"tensor": self.name, "params": self.params, "noise_rms": self.noise_rms,
                "relative": self.relative}


def _values_error(raw: bytes, decoded: np.ndarray) -> np.ndarray:
    """Expected squared coding error of every value of one chunk (0 where lossless)."""
    out = np.zeros(decoded.size)
    magic = raw[:4]
    if magic == b"MDDT":  # thresholded: the survivors are coded by the inner chunk
        inner = bytes(inner_chunk(raw))
        if inner[:4] != b"MDLC":
            return out  # nothing survived, or survivors stored losslessly
        where = np.flatnonzero(decoded)  # zeroed coordinates decode to exact zeros
        per = _segment_error(inner)
        if per.size != where.size:
            raise DamagedArchiveError("a thresholded chunk's survivors do not match its "
                                      "inner chunk's segments")
        out[where] = per
    elif magic == b"MDLC":
        out[:] = _segment_error(raw)[:decoded.size]
    return out


def _segment_error(raw: bytes) -> np.ndarray:
    info = lattice_info(raw)
    if not info.segments:  # a zero chunk: no values coded
        return np.zeros(info.count)
    G = get_lattice(info.lattice).G
    lengths = [n for n, _ in info.segments]
    return np.repeat([G * s * s for _, s in info.segments], lengths)


def tensor_errors(store: UpdateStore, array: str = "records",
                  last: int | None = None) -> list[TensorError]:
    """Per-tensor coding error of the stored ``records`` or ``aggregate`` (the last
    ``last`` of them; default all), then the whole model's as the last entry.

    Decodes every vector examined; reads each chunk's header for its cell sizes.
    """
    reader, index = store.reader, store.index
    if array not in ("records", "aggregate") or array not in reader.arrays:
        raise ValueError(f"no {array!r} in this archive (records, or aggregates when the "
                         "policy keeps them)")
    count = index.n_records if array == "records" else index.n_rounds
    leads = range(max(0, count - last) if last else 0, count)
    layout, chunk = index.layout, index.settings.chunk
    offsets = np.array([t.offset for t in layout.tensors])
    err = np.zeros(len(offsets))
    energy = np.zeros(len(offsets))
    proto = default_buffer_prototype()
    for lead in leads:
        x = reader.read(array, (lead,), f"{array} {lead}").astype(np.float64)
        var = np.zeros(x.size)
        for k, key in enumerate(reader.keys(array, (lead,))):
            got = sync(reader.group.store.get(key, proto))
            if got is None:
                raise DamagedArchiveError(f"{store.location}: chunk {key} is missing")
            lo, hi = k * chunk, min((k + 1) * chunk, x.size)
            var[lo:hi] = _values_error(got.to_bytes(), x[lo:hi])[:hi - lo]
        if x.size:
            err += np.add.reduceat(var, offsets)
            energy += np.add.reduceat(x * x, offsets)
    n = max(len(leads), 1)
    sizes = [t.size for t in layout.tensors]
    names = [t.name or "(flat)" for t in layout.tensors]
    rows = [_row(name, size, e, d, n) for name, size, e, d in zip(names, sizes, err, energy,
                                                                    strict=True)]
    return [*rows, _row("(model)", layout.size, float(err.sum()), float(energy.sum()), n)]


def _row(name: str, params: int, err: float, energy: float, n: int) -> TensorError:
    signal = energy - err
    return TensorError(name, params, math.sqrt(err / (n * params)) if params else 0.0,
                       math.sqrt(err / signal) if signal > 0 else None)
