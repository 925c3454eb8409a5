"""Drop-in cases matched after torch's own tests found them: complex RMSNorm, a 1-D (0,)
batch_norm input, and half-precision BatchNorm without γ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normlab as nl


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_rms_norm_computes_as_torch(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=dtype)
    ours, theirs = nl.nn.RMSNorm(5, dtype=dtype), torch.nn.RMSNorm(5, dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(5, dtype=dtype))
    theirs.load_state_dict(ours.state_dict())
    grads = []
    for layer in (ours, theirs):
        leaf = x.clone().requires_grad_()
        y = layer(leaf)
        y.abs().sum().backward()
        grads.append((y.detach(), leaf.grad, layer.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(nl.functional.rms_norm(x, (5,), eps=1e-3), TF.rms_norm(x, (5,), eps=1e-3))
    with pytest.raises(RuntimeError, match=r"weight has shape \(4,\)"):
        nl.functional.rms_norm(x, (5,), torch.ones(4, dtype=dtype))


def test_one_dimensional_empty_batch_norm_input_gives_an_empty_output():
    """torch reads a 1-D input as one with 0 channels: (0,) gives (0,), anything else raises."""
    empty = torch.empty(0)
    for training in (True, False):
        out = nl.functional.batch_norm(empty, torch.empty(0), torch.empty(0), training=training)
        assert out.shape == TF.batch_norm(empty, torch.empty(0), torch.empty(0), training=training).shape == (0,)
    with pytest.raises(RuntimeError, match="1D tensor of shape \\(3,\\)"):
        nl.functional.batch_norm(torch.randn(3), torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_batch_norm_without_gamma_equals_gamma_one(dtype, track_running_stats):
    """Without a float32 γ, torch's kernel kept the batch statistics in the half dtype:
    1 ulp off in the output and 2 in the input gradient."""
    torch.manual_seed(0)
    data = torch.rand(3, 3, 3, dtype=dtype, requires_grad=True)
    results = []
    for affine in (True, False):
        layer = nl.nn.BatchNorm1d(3, affine=affine, track_running_stats=track_running_stats)
        y = layer(data)
        (grad,) = torch.autograd.grad(y, data, torch.ones_like(y))
        results.append((y, grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
