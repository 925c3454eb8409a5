"""The in-place (output-only) mode: exact gradients for γ ≈ 0, inputs that are views, one
overwrite behaviour on every path, and full backward hooks."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import DENSE_LAYOUTS

import normlab as nl
from normlab import core

# every test here runs once per backend (conftest.BACKENDS)
pytestmark = [pytest.mark.usefixtures("backend"), pytest.mark.with_triton]

PATHS = {
    # float32 on the backend the fixture forces (the kernels, or the Triton kernels under
    # TRITON_INTERPRET=1; native and composed run the composed in-place ops)
    "kernels": (torch.float32, None),
    "composed": (torch.float64, "composed"),
}


def _on(backend: str | None):
    """The path's backend forced, or (None) the one the fixture forced left as it is."""
    return core.use_backend(backend) if backend else contextlib.nullcontext()


def _pair(norm: str, act: str, dtype: torch.dtype, gamma: torch.Tensor, bias=(-0.5, 0.7)):
    def make(inplace: bool):
        if norm == "batch":
            layer = nl.nn.BatchNormAct2d(8, activation=act, inplace=inplace, dtype=dtype)
        else:
            layer = nl.nn.GroupNormAct(4, 8, activation=act, inplace=inplace, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(gamma)
            layer.bias.copy_(torch.linspace(*bias, 8))
        return layer

    return make(False), make(True)


def _run(layer, x, dy):
    layer.zero_grad()
    leaf = x.clone().requires_grad_()
    y = layer(leaf * 1.0)  # a non-leaf input, as after a convolution
    y.backward(dy)
    return y.detach(), leaf.grad, layer.weight.grad, layer.bias.grad


GAMMAS = {
    "zero": torch.zeros(8),
    "1e-7": torch.full((8,), 1e-7),
    "mixed": torch.tensor([0.0, 1.3, -1e-7, 0.8, 3e-6, -0.9, 1.1, -4e-6]),
}


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("gamma", sorted(GAMMAS))
@pytest.mark.parametrize("act", ["leaky_relu", "elu"])
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_small_gamma_gradients_are_exact(path, norm, act, gamma, layout):
    """γ = 0 used to give dγ = 0 exactly (a zero-initialised residual BatchNorm could never
    leave 0) and |γ| below 1e-5 a dγ scaled by |γ|/1e-5; GroupNorm's dx was off too."""
    dtype, backend = PATHS[path]
    torch.manual_seed(0)
    normal, inplace = _pair(norm, act, dtype, GAMMAS[gamma].to(dtype))
    x = torch.randn(6, 8, 5, 3, dtype=dtype) * 2 - 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(6, 8, 5, 3, dtype=dtype)
    with _on(backend):
        expected, got = _run(normal, x, dy), _run(inplace, x, dy)
    assert expected[2].abs().max() > 0.1  # dγ is not small: the test can tell 0 from right
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_elu_dbeta_near_minus_alpha_with_small_gamma_is_exact(norm):
    """With |γ| below the guard and β far below 0, ELU's output sits at −α + e^z: dβ read off
    y + α loses its digits (relative error 8e-4 on the Triton kernels before they redid dβ
    from the kept input, as the CPU kernels do)."""
    torch.manual_seed(0)
    normal, inplace = _pair(norm, "elu", torch.float32, torch.full((8,), 1e-7), bias=(-12.0, -9.0))
    x = torch.randn(6, 8, 5, 3) * 2 - 0.5
    dy = torch.randn(6, 8, 5, 3)
    expected, got = _run(normal, x, dy), _run(inplace, x, dy)
    assert expected[3].abs().min() > 1e-6  # dβ = Σ dy·e^z is small but not zero
    torch.testing.assert_close(got[3], expected[3], rtol=1e-5, atol=0)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_nothing_more_is_kept_when_every_gamma_is_large(path):
    dtype, backend = PATHS[path]

    def kept(layer, x):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _on(backend):
            layer(x)
        return sizes

    x = torch.randn(4, 8, 6, 6, dtype=dtype, requires_grad=True) * 1
    layer = nl.nn.BatchNormAct2d(8, activation="leaky_relu", inplace=True, dtype=dtype)
    channel = x.numel() // 8  # per-channel statistics are far smaller (the Triton kernels keep 5 × 8)
    large = [n for n in kept(layer, x * 1) if n >= channel]
    assert large == [x.numel()]  # the output, nothing else of activation size
    with torch.no_grad():
        layer.weight[3] = 0.0
    small = [n for n in kept(layer, x * 1) if n >= channel]
    assert sorted(small) == sorted([x.numel(), x.numel() // 8])  # + one channel's input


def _layouts(h):
    return {
        "contiguous": h,
        "channels_last": h.contiguous(memory_format=torch.channels_last),
        "strided": h[:, :, :, ::2],
        "contiguous view": h[:2],
    }


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "contiguous view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_training_always_overwrites_the_input_and_backpropagates(dtype, layout):
    """One behaviour on every path: with batch statistics the output is written over the
    input whatever its dtype and strides — a view included, whose base then sees it, as
    with torch's in-place ops — and gradients flow through the view into its base."""
    torch.manual_seed(0)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.float16 else {"rtol": 1e-4, "atol": 1e-4}
    base = torch.randn(3, 4, 6, 6, dtype=dtype)
    grads, outputs = [], []
    for inplace in (False, True):
        layer = nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=inplace, dtype=dtype)
        leaf = base.clone().requires_grad_()
        h = leaf * 1
        x = _layouts(h)[layout]
        before = x.detach().clone()
        y = layer(x)
        overwritten = not torch.equal(x.detach(), before)
        assert overwritten == inplace
        if inplace:
            assert y.data_ptr() == x.data_ptr()
        outputs.append(y.detach().clone())
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(outputs[1], outputs[0], **tol)
    torch.testing.assert_close(grads[1], grads[0], **tol)


def test_eval_never_overwrites_the_input():
    layer = nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True).eval()
    for x in _layouts(torch.randn(3, 4, 6, 6)).values():
        before = x.clone()
        layer(x)
        assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_backward_hook_is_refused_before_the_input_changes(dtype):
    """torch.nn.ReLU(inplace=True) refuses a full backward hook (the hook's input is a view
    autograd forbids modifying); the in-place layer does the same, before overwriting."""
    relu = torch.nn.ReLU(inplace=True)
    relu.register_full_backward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="BackwardHookFunction"):
        relu(torch.randn(2, 4, requires_grad=True) * 1)

    layer = nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True, dtype=dtype)
    layer.register_full_backward_hook(lambda *args: None)
    x = torch.randn(2, 4, 3, 3, dtype=dtype, requires_grad=True) * 1
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="full backward hook.*inplace=False"):
        layer(x)
    assert torch.equal(x.detach(), before)
    assert torch.equal(layer.running_mean, torch.zeros(4))

    # without the in-place mode the hook sees the gradients
    seen = []
    plain = nl.nn.BatchNormAct2d(4, activation="leaky_relu", dtype=dtype)
    plain.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_in[0].shape))
    plain(x).sum().backward()
    assert seen == [x.shape]

    # in eval the layer computes out of place (nothing to save), so the hook works there
    layer.eval()
    seen.clear()
    layer.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_in[0].shape))
    x = torch.randn(2, 4, 3, 3, dtype=dtype, requires_grad=True) * 1
    layer(x).sum().backward()
    assert seen == [x.shape]


def test_views_autograd_forbids_modifying_are_refused_before_the_input_changes():
    layer = nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True)
    h = torch.randn(2, 4, 3, 3, requires_grad=True) * 1
    first, _ = h.unbind(0)  # one of several views of one op
    before = first.detach().clone()
    with pytest.raises(RuntimeError, match="several views"):
        layer(first.view(1, 4, 3, 3))
    with pytest.raises(RuntimeError, match="returns multiple views"):
        torch.nn.functional.leaky_relu(first, inplace=True)  # torch refuses it as well
    assert torch.equal(first.detach(), before)
