"""SwitchableNorm's derivatives with create_graph=True (gradient penalties, meta-learning) at a
large spread. autograd's derivative of the formula's rsqrt forms (σ² + ε)^(-3/2), which
underflows float32 above σ ≈ 1e12.6 (the first derivative was 100 % off at σ = 1e16, while the
same gradient without create_graph, the closed form that never forms r³, was right): the
create_graph backward differentiates the formula on the input scaled by a power of two."""

from __future__ import annotations

import pytest
import torch

import normlab as nl


def _layer(training: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = nl.nn.SwitchableNorm2d(4).train(training)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def _grads(layer, x, dy, dtype, create_graph, v=None):
    """First derivatives (against dy) of the input and the parameters; with v, the second:
    the derivatives of Σ v·dx."""
    m = layer.to(dtype)
    xx = x.to(dtype).requires_grad_(True)
    params = list(m.parameters())
    out = torch.autograd.grad(m(xx), [xx, *params], dy.to(dtype), create_graph=create_graph)
    if v is not None:
        out = torch.autograd.grad(
            (out[0] * v.to(dtype)).sum(), [xx, *params], allow_unused=True, materialize_grads=True
        )
    return [g.detach().double() for g in out]


def _assert_close(got, expected):
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_create_graph_gradients_at_a_large_spread_are_float32_accurate(training):
    layer = _layer(training)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64) * 1e16
    dy = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    _assert_close(_grads(layer, x, dy, torch.float32, True), _grads(layer, x, dy, torch.float64, False))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_at_a_large_spread_are_float32_accurate(training):
    layer = _layer(training)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64) * 1e16
    dy, v = torch.randn(2, 3, 4, 3, 3, dtype=torch.float64)
    _assert_close(_grads(layer, x, dy, torch.float32, True, v), _grads(layer, x, dy, torch.float64, True, v))


def test_create_graph_gradients_of_samples_at_far_apart_scales():
    """Eval without BN statistics (IN, LN): one sample at 1e16, one at 1e-3 — one scale for the
    whole call would leave the small sample's r³ out of float32's range; each (sample, channel)
    gets its own."""
    torch.manual_seed(0)
    layer = nl.nn.SwitchableNorm2d(4, using_bn=False).eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64) * torch.tensor([1e16, 1e-3], dtype=torch.float64).view(2, 1, 1, 1)
    dy = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    got = _grads(layer, x, dy, torch.float32, True)
    assert all(bool(g.isfinite().all()) for g in got)
    _assert_close(got, _grads(layer, x, dy, torch.float64, False))
