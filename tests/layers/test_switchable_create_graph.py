"""SwitchableNorm's first derivative with create_graph=True (gradient penalties, meta-learning)
at a large spread: the differentiable formula autograd then runs forms (σ² + ε)^(-3/2), which
underflows float32 above σ ≈ 1e12.6 — the gradient is 100 % off at σ = 1e16, while the same
gradient without create_graph is right (the closed form never forms r³). Pinned until the
double-backward path gets the same treatment."""

from __future__ import annotations

import pytest
import torch

import normlab as nl


@pytest.mark.xfail(strict=True, reason="create_graph runs the formula whose σ⁻³ underflows float32 at σ = 1e16")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_create_graph_gradients_at_a_large_spread_are_float32_accurate(training):
    torch.manual_seed(0)
    layer = nl.nn.SwitchableNorm2d(4).train(training)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64) * 1e16
    dy = torch.randn(3, 4, 3, 3, dtype=torch.float64)

    def grads(dtype: torch.dtype, create_graph: bool) -> list[torch.Tensor]:
        m = layer.to(dtype)
        xx = x.to(dtype).requires_grad_(True)
        out = torch.autograd.grad(m(xx), [xx, *m.parameters()], dy.to(dtype), create_graph=create_graph)
        return [g.detach().double() for g in out]

    expected = grads(torch.float64, False)
    for got, want in zip(grads(torch.float32, True), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
