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


@pytest.mark.parametrize("backend", ["auto", "composed", "native"])
@pytest.mark.parametrize("name", ["StdConv2d", "ScaledStdConv2d"])
def test_standardized_weight_gradient_at_an_infinite_input(name, backend):
    """An inf input makes one entry c of each filter's upstream gradient g infinite (a 1×1
    convolution, one inf). The weight gradient is Jᵀg with J the standardization's Jacobian,
    finite at a finite weight: every entry of the row is J_ci·g_c = ±inf, with the sign of
    −g_c·(1 + x̂ᵢ·x̂_c) off c. The closed form r·(g − mean(g) − x̂·mean(g·x̂)) subtracts two
    infinite terms: ±inf where their signs agree (that value, exact), NaN where they do not.
    The textbook chain (float64 autograd of mean, var, rsqrt) gives NaN everywhere: its
    variance branch adds Σ(wⱼ − mean)·dσ², 0·inf. torch's own F.layer_norm and timm's
    F.batch_norm-based StdConv2d give ±inf entries as normlab does. So ±inf is right where it
    appears: the test asserts no finite entry in an infinite row and every ±inf one exact."""
    torch.manual_seed(0)
    layer = getattr(nl.nn, name)(8, 16, 1)
    x = torch.randn(2, 8, 6, 6)
    x[0, 1, 0, 0] = float("inf")
    dy = torch.randn(2, 16, 6, 6)
    with core.use_backend(backend):
        layer(x).backward(dy)
    got = layer.weight.grad.double().reshape(16, 8)
    # the exact answer: g (the conv's weight gradient, one inf per row) through the Jacobian
    gain = None if name == "StdConv2d" else (layer.gain * layer.scale).detach().double()
    w = layer.weight.detach().double()
    conv_weight = nl.functional.weight_standardization(w, layer.eps, gain=gain).requires_grad_()
    torch.nn.functional.conv2d(x.double(), conv_weight).backward(dy.double())
    g = conv_weight.grad.reshape(16, 8)
    assert bool(g[:, 1].isinf().all()) and bool(g[:, [0, *range(2, 8)]].isfinite().all())
    jacobian = torch.autograd.functional.jacobian(
        lambda v: nl.functional.weight_standardization(v, layer.eps, gain=gain), w
    ).reshape(16, 8, 16, 8)
    # row o's gradient: J[o, 1, o, i]·g[o, 1] (the infinite term dominates the finite ones)
    exact = torch.stack([jacobian[o, 1, o] * g[o, 1] for o in range(16)])
    assert bool(exact.isinf().all())
    assert not bool(got.isfinite().any())
    infinite = got.isinf()
    assert bool(infinite.any())
    assert torch.equal(got[infinite], exact[infinite])
