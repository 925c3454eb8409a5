"""LayerNorm2d: LayerNorm over the channels of each position of an (N, C, H, W) tensor —
values and gradients against a float64 reference, both layouts and every path, no
permuting copy, timm's state dict, the toolchain (compile, export, fx, vmap), errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import DENSE_LAYOUTS, assert_close_scaled, memory_format
from torch import nn

import normlab as nl
from normlab import core

# every test here runs once per backend (conftest.BACKENDS)
pytestmark = pytest.mark.usefixtures("backend")


def _reference(x, w, b, eps):
    """timm's formula in float64: permute, layer_norm over C, permute back."""
    x = x.double().permute(0, 2, 3, 1)
    w = None if w is None else w.double()
    b = None if b is None else b.double()
    return TF.layer_norm(x, (x.shape[-1],), w, b, eps).permute(0, 3, 1, 2)


def _run(fn, x, params, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    return (y, *torch.autograd.grad(y, [x, *params], dy))


def _affine(c, which):
    w = (torch.rand(c) + 0.5).requires_grad_() if which in ("both", "weight") else None
    b = torch.randn(c).requires_grad_() if which in ("both", "bias") else None
    return w, b


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
def test_values_and_gradients_match_float64_reference(layout, affine, backend):
    x = (torch.randn(3, 12, 5, 7) * 2 + 3).contiguous(memory_format=memory_format(layout))
    dy = torch.randn(3, 12, 5, 7).contiguous(memory_format=memory_format(layout))
    w, b = _affine(12, affine)
    params = [p for p in (w, b) if p is not None]
    with core.use_backend(backend):
        got = _run(lambda z: nl.functional.layer_norm2d(z, w, b, 1e-6), x, params, dy)
    want = _run(lambda z: _reference(z, w, b, 1e-6), x.double(), params, dy.double())
    assert got[0].dtype == torch.float32
    for a, e in zip(got, want):
        assert_close_scaled(a.double(), e.double(), rtol=1e-5)


@pytest.mark.backends("kernels")
@pytest.mark.skipif(not core.kernels_available(), reason="kernels unavailable here")
def test_channels_last_runs_the_row_kernel_in_place_of_the_permute():
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    with core.record_dispatch() as log:
        y = nl.nn.LayerNorm2d(16)(x)
    assert [path for _, path, _ in log] == ["kernels"]
    assert y.is_contiguous(memory_format=torch.channels_last)


#: (backend, layout) → how that path differs (docs/conventions.md, "Backends"): strict xfails.
LAYOUT_DIFFERENCES = {
    ("native", "contiguous"): "torch's layer_norm on the permuted view: the output keeps the permuted "
    "(channels_last) strides, as timm's LayerNorm2d's does",
    ("composed", "channels_last"): "the composed ops keep one intermediate as large as the input",
}


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
def test_no_activation_sized_copy_and_layout_kept(layout, backend, request):
    """No permuted copy of the input (timm's permute → layer_norm copies NCHW input)."""
    if (backend, layout) in LAYOUT_DIFFERENCES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=LAYOUT_DIFFERENCES[backend, layout]))
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=memory_format(layout))
    layer = nl.nn.LayerNorm2d(16)
    copies = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = out if isinstance(out, (tuple, list)) else (out,)
            for t in flat:
                if isinstance(t, torch.Tensor) and t.numel() == x.numel():
                    copies.append((str(func), t.untyped_storage().data_ptr()))
            return out

    with torch.no_grad(), Count():
        y = layer(x)
    assert y.is_contiguous(memory_format=memory_format(layout))
    if layout == "channels_last":  # the row kernel on the permuted view: the output is all it allocates
        storages = {ptr for _, ptr in copies} - {x.untyped_storage().data_ptr()}
        assert len(storages) == 1, copies
    assert not any(
        name.startswith(("aten.clone", "aten.contiguous", "aten._to_copy", "aten.copy")) for name, _ in copies
    ), copies


def test_float64_and_other_paths_match_reference():
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    layer = nl.nn.LayerNorm2d(6).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    torch.testing.assert_close(layer(x), _reference(x, layer.weight, layer.bias, 1e-6))
    assert torch.autograd.gradcheck(
        lambda z, w, b: nl.functional.layer_norm2d(z, w, b),
        (
            x.clone().requires_grad_(),
            layer.weight.detach().clone().requires_grad_(),
            layer.bias.detach().clone().requires_grad_(),
        ),
    )
    with core.use_backend("composed"):
        for fmt in map(memory_format, DENSE_LAYOUTS):
            z = x.contiguous(memory_format=fmt).requires_grad_()
            assert torch.autograd.gradcheck(lambda t: nl.functional.layer_norm2d(t, layer.weight, layer.bias), (z,))


def test_is_a_torch_layernorm_with_timms_constructor_and_state_dict():
    layer = nl.nn.LayerNorm2d(8)
    assert isinstance(layer, nn.LayerNorm) and layer.normalized_shape == (8,) and layer.eps == 1e-6
    assert {k: v.shape for k, v in layer.state_dict().items()} == {"weight": (8,), "bias": (8,)}
    torch_ln = nn.LayerNorm(8, eps=1e-6)
    torch_ln.load_state_dict(layer.state_dict())
    layer.load_state_dict(torch_ln.state_dict())
    assert nl.nn.LayerNorm2d(8, affine=False).weight is None
    assert nl.nn.LayerNorm2d(8, bias=False).bias is None
    assert nl.nn.is_norm_layer(layer)
    assert repr(layer) == "LayerNorm2d(8, eps=1e-06, affine=True)"


def test_compile_fullgraph_export_fx_and_vmap():
    layer = nl.nn.LayerNorm2d(6)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    for fmt in map(memory_format, DENSE_LAYOUTS):
        x = torch.randn(2, 6, 4, 5).contiguous(memory_format=fmt)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)
        program = torch.export.export(layer, (x,))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert "aten.layer_norm.default" in targets and not any("normlab" in t for t in targets), targets
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-5)
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 6, 1), layer))
    assert any(n.op == "call_module" and n.target == "1" for n in traced.graph.nodes)
    xs = torch.randn(3, 2, 6, 4, 5)
    torch.testing.assert_close(torch.vmap(layer)(xs), torch.stack([layer(x) for x in xs]), rtol=1e-5, atol=1e-5)


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        nl.nn.LayerNorm2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="num_channels=6"):
        nl.nn.LayerNorm2d(4)(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="weight has shape"):
        nl.functional.layer_norm2d(torch.randn(2, 6, 3, 3), torch.ones(4))
    with pytest.raises(TypeError, match="positive int"):
        nl.nn.LayerNorm2d(0.5)
    with pytest.raises(ValueError, match="eps"):
        nl.nn.LayerNorm2d(4, eps=-1e-6)  # 0 is accepted, as torch.nn's LayerNorm accepts it
