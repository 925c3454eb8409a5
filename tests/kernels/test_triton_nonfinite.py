"""A non-finite value through the Triton kernels' fused activations comes out as torch.nn's
does: NaN where torch.nn has NaN (docs/conventions.md: a channel whose statistics are not
finite comes out NaN, so the loss shows the problem). ELU's forward took min(z, 0) with
Triton's default minimum, which returns the other operand for a NaN: NaN became ELU(0) = 0
(and its derivative α·e⁰ = α).
"""

from __future__ import annotations

import pytest
import torch

import normlab as nl
from normlab import core
from normlab.core.kernels import triton as tk

pytestmark = pytest.mark.skipif(not tk.available(), reason=tk.status())
DEVICE = "cpu" if tk.interpreted() else "cuda"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the non-finite batch is skipped, and says so
@pytest.mark.parametrize("activation", ["elu", "leaky_relu", "silu", "prelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_input_keeps_nan_through_the_fused_activation(activation, training):
    x = torch.randn(4, 3, 7, device=DEVICE)
    x[1, 1, 2] = float("nan")
    layer = nl.nn.BatchNormAct1d(3, activation=activation, device=DEVICE).train(training)
    norm = torch.nn.BatchNorm1d(3, device=DEVICE)
    reference = torch.nn.Sequential(norm, core.ACTIVATIONS[activation].make_module(channels=3).to(DEVICE))
    reference.train(training)
    leaf, reference_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with core.use_backend("triton"), core.record_dispatch() as log:
        y = layer(leaf)
    assert [path for _, path, _ in log] == ["triton"]
    expected = reference(reference_leaf)
    assert torch.equal(y.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(y[finite], expected[finite])
    # and the input gradient is NaN where torch.nn's is (ELU's derivative took the same minimum)
    (grad,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
    (expected_grad,) = torch.autograd.grad(expected, reference_leaf, torch.ones_like(expected))
    assert torch.equal(grad.isnan(), expected_grad.isnan())
