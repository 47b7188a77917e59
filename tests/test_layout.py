"""`ModelLayout`: templates, validation of updates, and conversion back to tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medustore import ModelLayout
from medustore.layout import OUTPUT_KINDS, check_output_kind

try:
    import torch
except ImportError:  # the Python 3.12 CI lane runs without torch
    torch = None

#: Not a module-level importorskip: that would skip this whole module, numpy tests included.
needs_torch = pytest.mark.skipif(
    torch is None, reason="needs torch (pip install 'medustore[torch]'); not installed")


def np_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 3, 2)).astype(np.float32),
        "conv.bias": rng.normal(size=(4,)).astype(np.float64),
        "steps": np.array(7, dtype=np.int64),
        "scale": np.float16([1.5, -2.0]),
    }


def test_from_numpy_dict() -> None:
    model = np_model()
    lay = ModelLayout.from_template(model)
    assert not lay.flat
    assert [t.name for t in lay.tensors] == list(model)
    assert [t.shape for t in lay.tensors] == [(4, 3, 2), (4,), (), (2,)]
    assert [t.offset for t in lay.tensors] == [0, 24, 28, 29]
    assert lay.size == 31
    vec = lay.flatten(model, dtype=np.float64)
    back = lay.unflatten(vec)
    assert list(back) == list(model)
    for name, arr in model.items():
        assert isinstance(back[name], np.ndarray)  # 0-d tensors too, not numpy scalars
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        np.testing.assert_array_equal(back[name], arr)


def test_unflatten_rounds_integer_tensors() -> None:
    lay = ModelLayout.from_template({"w": np.zeros(2, np.float32), "n": np.zeros(2, np.int64)})
    out = lay.unflatten(np.array([0.5, 1.5, 2.6, -0.6]))
    np.testing.assert_array_equal(out["n"], [3, -1])
    assert out["n"].dtype == np.int64


def test_flat_vector_template() -> None:
    lay = ModelLayout.from_template(np.arange(5, dtype=np.float32))
    assert lay.flat and lay.size == 5
    out = lay.unflatten(np.arange(5.0))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    with pytest.raises(ValueError, match="flat vector"):
        lay.flatten(np.zeros(6))
    with pytest.raises(ValueError, match="flat vector"):
        ModelLayout.from_template(np.zeros((2, 2)))


def test_flat_update_for_a_structured_model() -> None:
    lay = ModelLayout.from_template(np_model())
    vec = np.arange(31, dtype=np.float32)
    np.testing.assert_array_equal(lay.flatten(vec), vec)
    with pytest.raises(ValueError, match="31"):
        lay.flatten(np.zeros(30))
    with pytest.raises(TypeError, match="dtype"):
        lay.flatten(np.zeros(31, dtype=np.complex64))
    with pytest.raises(TypeError, match="dtype"):
        lay.flatten(np.array([object()] * 31))
    bad = vec.copy()
    bad[25] = np.nan
    with pytest.raises(ValueError, match="'conv.bias'"):
        lay.flatten(bad)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(("change", "error", "pattern"), [
    (lambda u: u.pop("conv.bias"), ValueError, r"missing tensor.*'conv\.bias'"),
    (lambda u: u.update(extra=np.zeros(1)), ValueError, r"unexpected tensor.*'extra'"),
    (lambda u: u.update(steps=np.zeros(2)), ValueError, r"'steps'.*shape"),
    (lambda u: u.update({"conv.weight": np.zeros((3, 4, 2))}), ValueError,
     r"'conv\.weight'.*shape \(3, 4, 2\), expected \(4, 3, 2\)"),
    (lambda u: u.update(scale=np.zeros(2, np.complex128)), TypeError, r"'scale'.*dtype"),
    (lambda u: u.update(scale=np.array([None, None])), TypeError, r"'scale'.*dtype"),
    (lambda u: u.update(scale="ab"), TypeError, r"'scale'"),
    (lambda u: u["conv.weight"].__setitem__((1, 2, 0), np.nan), ValueError,
     r"NaN or infinite.*'conv\.weight'"),
    (lambda u: u["scale"].__setitem__(1, -np.inf), ValueError, r"NaN or infinite.*'scale'"),
    (lambda u: u.update({"conv.bias": np.full(4, 1e39)}), ValueError, r"'conv\.bias'"),
])
def test_bad_updates(change: object, error: type, pattern: str) -> None:
    lay = ModelLayout.from_template(np_model())
    update = {k: v.copy() for k, v in np_model().items()}
    change(update)  # type: ignore[operator]
    with pytest.raises(error, match=pattern):
        lay.flatten(update, "update of user 'u'")


@pytest.mark.parametrize("bad", [{}, {"a": np.zeros(0)}, {"c": np.zeros(2, complex)},
                                 {1: np.zeros(2)}, np.zeros((2, 2)), "model", 3.0])
def test_bad_templates(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        ModelLayout.from_template(bad)


def test_json_round_trip() -> None:
    lay = ModelLayout.from_template(np_model())
    back = ModelLayout.from_json(json.loads(json.dumps(lay.to_json())))
    assert back == lay
    flat = ModelLayout.from_template(np.zeros(3))
    assert ModelLayout.from_json(json.loads(json.dumps(flat.to_json()))) == flat
    with pytest.raises(ValueError, match="corrupt"):
        ModelLayout.from_json({"tensors": [{"name": "a"}]})


def test_unflatten_rejects_unknown_output() -> None:
    lay = ModelLayout.from_template(np.zeros(3))
    with pytest.raises(ValueError, match="out"):
        lay.unflatten(np.zeros(3), "jax")  # type: ignore[arg-type]


@pytest.mark.parametrize("template", [np.zeros(3), {"w": np.zeros((2, 2))}])
def test_out_torch_is_refused_naming_state_dict(template: object) -> None:
    """One name for torch output: ``"state_dict"``; the old synonym ``"torch"`` is refused
    (before torch is even imported, so the message is the same without torch)."""
    lay = ModelLayout.from_template(template)
    with pytest.raises(ValueError, match=r"out='torch'.*out='state_dict'"):
        lay.unflatten(np.zeros(lay.size), "torch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_dict"):
        check_output_kind("torch")


def test_output_kinds() -> None:
    assert OUTPUT_KINDS == ("numpy", "flat", "state_dict")
    for out in OUTPUT_KINDS:
        check_output_kind(out)
    for bad in ("Torch", "pandas", "", None, 3, ("numpy",)):
        with pytest.raises(ValueError, match="'numpy', 'flat' or 'state_dict'"):
            check_output_kind(bad)


# ---------------------------------------------------------------------------- torch


def _net() -> torch.nn.Module:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(5, 3)
            self.bn = torch.nn.BatchNorm1d(3)  # float buffers and an int64 counter
            self.head = torch.nn.Linear(3, 2).double()

    return Net()


@needs_torch
def test_torch_module_and_state_dict_templates() -> None:
    torch.manual_seed(0)
    net = _net()
    sd = net.state_dict()
    a, b = ModelLayout.from_template(net), ModelLayout.from_template(sd)
    assert a == b
    assert [t.name for t in a.tensors] == list(sd)
    vec = a.flatten(sd, dtype=np.float64)
    out = a.unflatten(vec, "state_dict")
    assert list(out) == list(sd)
    for name, tensor in sd.items():
        assert isinstance(out[name], torch.Tensor)
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor)
    with pytest.raises(ValueError, match="state_dict"):
        a.unflatten(vec, "torch")  # type: ignore[arg-type]
    _net().load_state_dict(out)  # strict: names, shapes (the 0-d counter too) and dtypes fit


@needs_torch
def test_torch_flat_template_returns_a_tensor() -> None:
    lay = ModelLayout.from_template(torch.zeros(4, dtype=torch.float64))
    out = lay.unflatten(np.arange(4.0), "state_dict")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert torch.equal(out, torch.arange(4.0, dtype=torch.float64))


@needs_torch
def test_torch_update_errors_name_the_tensor() -> None:
    net = _net()
    lay = ModelLayout.from_template(net)
    upd = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    upd["fc.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="'fc.weight'"):
        lay.flatten(upd)
    upd["fc.weight"] = torch.full((3, 5), float("nan"))
    with pytest.raises(ValueError, match="'fc.weight'"):
        lay.flatten(upd)
    upd["fc.weight"] = torch.zeros(3, 5, dtype=torch.complex64)
    with pytest.raises(TypeError, match="'fc.weight'"):
        lay.flatten(upd)
