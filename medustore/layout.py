"""`ModelLayout`: how a model's tensors map onto one flat float vector.

A store fixes its layout when it is created, from a template: a dict of numpy arrays, a
flat vector, or a PyTorch ``state_dict`` / ``nn.Module`` (torch is imported lazily, only
when such an object is given). Updates are validated against the layout and flattened to
float32; reads are unflattened back to numpy arrays (``out="numpy"``), one flat vector
(``out="flat"``) or torch tensors (``out="state_dict"``: a dict of tensors that
``load_state_dict`` takes, or one tensor for a model recorded as a flat vector).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["OUTPUT_KINDS", "ModelLayout", "OutputKind", "TensorSpec", "check_output_kind"]

#: What reads return: ``"numpy"`` (dict of numpy arrays in the model's dtypes), ``"flat"``
#: (one vector) or ``"state_dict"`` (dict of torch tensors; needs torch).
OutputKind = Literal["numpy", "flat", "state_dict"]
OUTPUT_KINDS: tuple[str, ...] = ("numpy", "flat", "state_dict")


def check_output_kind(out: Any) -> None:
    """Refuse an ``out=`` that is not an `OutputKind`, before any work is done.

    Raises
    ------
    ValueError
        ``out`` is not ``"numpy"``, ``"flat"`` or ``"state_dict"``. ``"torch"``, an old
        synonym of ``"state_dict"``, is refused with a message naming ``"state_dict"``.
    """
    if isinstance(out, str) and out in OUTPUT_KINDS:
        return
    if out == "torch":
        raise ValueError("out='torch' is no longer accepted: use out='state_dict' (a dict "
                         "of torch tensors for load_state_dict; one tensor for a flat model)")
    raise ValueError(f"out must be 'numpy', 'flat' or 'state_dict', got {out!r}")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: its name, shape, dtype and slice of the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _is_torch(obj: Any) -> bool:
    # Through the MRO: models are user subclasses of nn.Module, defined outside torch.
    return any(c.__module__.partition(".")[0] == "torch" for c in type(obj).__mro__)


def _to_numpy(value: Any, what: str) -> np.ndarray:
    if _is_torch(value):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray | np.generic | float | int | list):
        return np.asarray(value)
    raise TypeError(f"{what}: expected a numpy array or torch tensor, got {type(value).__name__}")


def _items(obj: Any, what: str) -> tuple[bool, dict[str, np.ndarray]]:
    """``(is_flat, {name: array})`` of a template or update in any accepted form."""
    if _is_torch(obj) and hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()  # an nn.Module
    if isinstance(obj, Mapping):
        if not obj:
            raise ValueError(f"{what} has no tensors")
        out = {}
        for name, value in obj.items():
            if not isinstance(name, str):
                raise TypeError(f"{what}: tensor names must be str, got {name!r}")
            out[name] = _to_numpy(value, f"{what}, tensor {name!r}")
        return False, out
    arr = _to_numpy(obj, what)
    if arr.ndim != 1:
        raise ValueError(
            f"{what}: a bare array must be a flat vector, got shape {arr.shape}; pass a dict "
            "of named tensors for a structured model"
        )
    return True, {"": arr}


@dataclass(frozen=True)
class ModelLayout:
    """The tensors of a model, in order, and their place in the flat vector.

    Attributes
    ----------
    tensors
        One `TensorSpec` per tensor, in the template's order.
    flat
        True when the template was a bare flat vector (reads then return one too).
    """

    tensors: tuple[TensorSpec, ...]
    flat: bool = False

    @classmethod
    def from_template(cls, template: Any) -> ModelLayout:
        """Layout of a numpy dict, flat vector, torch ``state_dict`` or ``nn.Module``."""
        flat, items = _items(template, "model template")
        specs, offset = [], 0
        for name, arr in items.items():
            if arr.dtype.kind not in "fiub":
                raise TypeError(f"model template, tensor {name!r}: unsupported dtype {arr.dtype}")
            specs.append(TensorSpec(name, tuple(int(s) for s in arr.shape), arr.dtype.str, offset))
            offset += arr.size
        if offset == 0:
            raise ValueError("model template has no parameters")
        return cls(tuple(specs), flat)

    @property
    def size(self) -> int:
        """Number of values in the flat vector."""
        last = self.tensors[-1]
        return last.offset + last.size

    # ------------------------------------------------------------------ conversion

    def flatten(self, obj: Any, what: str = "update", dtype: Any = np.float32) -> np.ndarray:
        """Validate ``obj`` against the layout and return it as one flat vector.

        Raises
        ------
        ValueError
            A missing or extra tensor, a wrong shape, or NaN/Inf (all named in the message).
        """
        flat, items = _items(obj, what)
        if flat and not self.flat:
            if items[""].shape != (self.size,):
                raise ValueError(
                    f"{what}: flat vector of {items[''].size} values, the model has {self.size}"
                )
            if items[""].dtype.kind not in "fiub":
                raise TypeError(f"{what}: unsupported dtype {items[''].dtype} of the flat vector")
            vec = items[""].astype(dtype)
            _check_finite_vec(vec, self, what)
            return vec
        names = {t.name for t in self.tensors}
        missing = [n for n in names if n not in items]
        extra = [n for n in items if n not in names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing tensor(s) {sorted(missing)}")
            if extra:
                parts.append(f"unexpected tensor(s) {sorted(extra)}")
            raise ValueError(f"{what}: {'; '.join(parts)}")
        out = np.empty(self.size, dtype=dtype)
        for t in self.tensors:
            arr = items[t.name]
            if arr.shape != t.shape:
                label = "flat vector" if self.flat else f"tensor {t.name!r}"
                raise ValueError(f"{what}, {label}: shape {arr.shape}, expected {t.shape}")
            if arr.dtype.kind not in "fiub":
                raise TypeError(f"{what}, tensor {t.name!r}: unsupported dtype {arr.dtype}")
            out[t.offset : t.offset + t.size] = arr.reshape(-1)
        _check_finite_vec(out, self, what)
        return out

    def unflatten(self, vec: np.ndarray, out: OutputKind = "numpy") -> Any:
        """Split a flat vector back into the model's tensors (in their original dtypes).

        Parameters
        ----------
        vec
            The flat vector (`size` values).
        out
            ``"numpy"``: dict of numpy arrays (one array for a flat model); ``"flat"``: the
            vector itself; ``"state_dict"``: dict of torch tensors (one tensor for a flat
            model). Anything else, ``"torch"`` included, is a ValueError (see
            `check_output_kind`).
        """
        check_output_kind(out)
        if out == "flat":
            return np.asarray(vec)
        arrays = {}
        for t in self.tensors:
            part = np.asarray(vec[t.offset : t.offset + t.size]).reshape(t.shape)
            dt = np.dtype(t.dtype)
            # np.asarray: 0-d tensors (BatchNorm's step counter) must stay arrays, not scalars.
            arrays[t.name] = np.asarray((np.rint(part) if dt.kind in "iub" else part).astype(dt))
        if out == "numpy":
            return arrays[""] if self.flat else arrays
        torch = _import_torch()
        tensors = {name: torch.from_numpy(np.array(a, order="C")) for name, a in arrays.items()}
        return tensors[""] if self.flat else tensors

    # ------------------------------------------------------------------ JSON form

    def to_json(self) -> dict:
        return {"flat": self.flat, "tensors": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "offset": t.offset}
            for t in self.tensors]}

    @classmethod
    def from_json(cls, data: dict) -> ModelLayout:
        try:
            tensors = tuple(TensorSpec(str(t["name"]), tuple(int(s) for s in t["shape"]),
                                       str(np.dtype(t["dtype"]).str), int(t["offset"]))
                            for t in data["tensors"])
            return cls(tensors, bool(data.get("flat", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"corrupt model layout in archive metadata: {err}") from None


def _check_finite_vec(vec: np.ndarray, layout: ModelLayout, what: str) -> None:
    if np.isfinite(vec).all():
        return
    bad = np.flatnonzero(~np.isfinite(vec))
    first = int(bad[0])
    name = next(t.name for t in layout.tensors if t.offset <= first < t.offset + t.size)
    label = "the flat vector" if layout.flat else f"tensor {name!r}"
    raise ValueError(
        f"{what}: {bad.size} NaN or infinite value(s), the first in {label} "
        f"(flat index {first})"
    )


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            "out='state_dict' needs PyTorch: pip install 'medustore[torch]'"
        ) from None
    return torch
