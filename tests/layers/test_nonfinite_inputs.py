"""A non-finite input value must not reach outputs or gradients that do not depend on it.

Eval-mode BatchNorm is the affine map y = a·x + b per channel: ∂y/∂x = a whatever x holds, so
torch.nn gives a finite input gradient at a NaN or ±inf input, and an upstream gradient of 0
there (a loss that masks the bad value out) leaves the earlier layers' gradients finite. An
eval-mode SwitchableNorm normalizes each sample with its own IN/LN statistics and the running
BN estimates: one sample's NaN has no business in another sample's output.
"""

from __future__ import annotations

import pytest
import torch

import normlab as nl
from normlab import core

BAD_VALUES = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_eval_batch_norm_input_gradient_at_a_non_finite_input(bad, activation):
    layer = nl.nn.BatchNormAct2d(3, activation=activation).eval()
    reference = torch.nn.Sequential(torch.nn.BatchNorm2d(3), nl.core.ACTIVATIONS[activation].make_module()).eval()
    with torch.no_grad():
        for module in (layer, reference[0]):
            module.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
            module.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 3] = bad
    upstream = torch.ones(2, 3, 4, 4)
    upstream[0, 1, 2, 3] = 0.0  # the loss ignores the bad position, as a masked loss does
    grads = []
    for module in (layer, reference):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(module(leaf), leaf, upstream)
        grads.append(grad)
    assert torch.isfinite(grads[1]).all()  # torch.nn: a·0 at the bad position
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kind", ["frozen", "masked"])
def test_eval_frozen_and_masked_input_gradient_at_a_nan(kind):
    layer = (nl.nn.FrozenBatchNorm1d(3) if kind == "frozen" else nl.nn.BatchNorm1d(3)).eval()
    x = torch.randn(2, 3, 6)
    x[0, 1, 2] = float("nan")
    x.requires_grad_(True)
    upstream = torch.ones(2, 3, 6)
    upstream[0, 1, 2] = 0.0
    y = layer(x) if kind == "frozen" else layer(x, mask=torch.arange(6) < torch.tensor([[6], [4]]))
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ["auto", "composed"])
def test_eval_switchable_norm_keeps_samples_apart(backend):
    layer = nl.nn.SwitchableNorm2d(4).eval()
    x = torch.randn(3, 4, 5, 5)
    with core.use_backend(backend):
        alone = layer(x[1:])
        x[0, 2, 1, 1] = float("nan")
        together = layer(x)
    assert torch.isnan(together[0]).any()
    torch.testing.assert_close(together[1:], alone)


def test_fused_silu_far_below_zero():
    layer = nl.nn.BatchNormAct1d(1, eps=0.0, activation="silu").eval()  # z = x exactly
    z = torch.tensor([[-1e38], [-1e30], [-200.0], [-89.0]])
    torch.testing.assert_close(layer(z), torch.nn.functional.silu(z), atol=1e-38, rtol=1e-6)


def test_prelu_slope_gradient_sees_a_nan():
    layer = nl.nn.BatchNormAct1d(2, activation="prelu").eval()
    reference = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.PReLU(2)).eval()
    x = torch.randn(5, 2)
    x[3, 1] = float("nan")
    grads = [
        torch.autograd.grad(module(x).sum(), module.act.weight if module is layer else module[1].weight)[0]
        for module in (layer, reference)
    ]
    assert torch.isnan(grads[1][1])
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)


@pytest.mark.parametrize("backend", ["auto", "composed"])
def test_relu_passes_the_gradient_at_a_nan_as_torch_does(backend):
    """torch's ReLU backward is 0 where its output is ≤ 0 and dy elsewhere, a NaN included."""
    layer = nl.nn.BatchNormAct1d(2, activation="relu").eval()
    reference = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.ReLU()).eval()
    x = torch.randn(5, 2)
    x[3, 1] = float("nan")
    grads = []
    for module in (layer, reference):
        leaf = x.clone().requires_grad_(True)
        with core.use_backend(backend if module is layer else "auto"):
            (grad,) = torch.autograd.grad(module(leaf).sum(), leaf)
        grads.append(grad)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[0], grads[1])
