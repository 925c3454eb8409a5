"""Cases found by probing the Triton routing against the kernels/composed paths: each is a call
where backend "triton" answered differently from the other paths and from torch.nn. Runs on
CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import warnings

import pytest
import torch

import normlab as nl
from normlab.core.kernels import triton as tk

pytestmark = pytest.mark.skipif(not tk.available(), reason=tk.status())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "make", [lambda: nl.nn.BatchNorm2d(4), lambda: nl.nn.GroupNorm(2, 4)], ids=["BatchNorm2d", "GroupNorm"]
)
def test_a_nan_sample_leaves_the_bias_gradient_finite_under_triton(make, train):
    # dβ = Σ dy does not depend on x: torch.nn, and normlab's other paths, give a finite one when
    # the input holds NaN. The kernels' identity act'(z) was z·0 + 1 — NaN where z is NaN.
    x = torch.randn(3, 4, 2, 3)
    x[0] = float("nan")
    dy = torch.randn(3, 4, 2, 3)
    bias_grads = {}
    for backend in ("composed", "triton"):
        layer = make().train(train)
        with warnings.catch_warnings(), nl.core.use_backend(backend):
            warnings.simplefilter("ignore")  # the non-finite batch is skipped, with a warning
            layer(x.clone().requires_grad_()).backward(dy)
        bias_grads[backend] = layer.bias.grad
    torch.testing.assert_close(bias_grads["triton"], dy.sum((0, 2, 3)))
    torch.testing.assert_close(bias_grads["triton"], bias_grads["composed"])


def test_fused_relu_keeps_a_nan_input_nan_under_triton():
    x = torch.randn(3, 2, 1, 2)
    x[0] = float("nan")
    layer = nl.nn.BatchNormAct2d(2, activation="relu").eval()
    with nl.core.use_backend("triton"):
        y = layer(x)
    assert torch.isnan(y[0]).all()
