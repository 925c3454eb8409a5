"""RMSNorm of a row holding ±inf: torch.nn's divides by an infinite RMS, so the row's finite
values give 0 and only the infinite ones NaN; a loss that masks the bad position out stays
finite. The kernels and the composed ops gave NaN for the whole row. LayerNorm's row is NaN
in torch.nn too (its mean is infinite), and stays so; a mean square that overflowed from
finite values is NaN on normlab's paths, as documented (docs/conventions.md)."""

from __future__ import annotations

import pytest
import torch

import normlab as nl
from normlab import core

BACKENDS = ("kernels", "composed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [5, 33, 520])
def test_rms_norm_row_with_an_infinite_value_as_torch_nn(backend, length):
    x = torch.randn(2, length)
    x[1, length // 2] = float("inf")
    x[1, length // 3] = -float("inf")
    with core.use_backend(backend):
        got = nl.nn.RMSNorm(length)(x)
    expected = torch.nn.RMSNorm(length)(x)
    assert torch.isnan(got[1]).sum() == 2 - (length // 2 == length // 3)
    torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centered", [False, True], ids=["rms", "layer"])
def test_add_norm_row_with_an_infinite_value_as_torch_nn(backend, centered):
    x, residual = torch.randn(3, 40), torch.randn(3, 40)
    x[2, 7] = float("inf")
    norm = (nl.nn.AddLayerNorm if centered else nl.nn.AddRMSNorm)(40)
    reference = (torch.nn.LayerNorm if centered else torch.nn.RMSNorm)(40)
    with core.use_backend(backend):
        got, summed = norm(x, residual)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(got, reference(x + residual), equal_nan=True)
    assert torch.isnan(got[2]).sum() == (40 if centered else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_gradient_of_a_row_with_an_infinite_value_as_torch_nn(backend):
    x = torch.randn(2, 33)
    x[1, 4] = float("inf")
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(2, 33)
    with core.use_backend(backend):
        nl.nn.RMSNorm(33)(mine).backward(dy)
    torch.nn.RMSNorm(33)(theirs).backward(dy)
    torch.testing.assert_close(mine.grad, theirs.grad, equal_nan=True)
