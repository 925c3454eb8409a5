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
@pytest.mark.parametrize("activation", ["relu", "elu", "leaky_relu", "silu", "prelu"])
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
    # (ReLU's passes the gradient at a NaN, as torch's does), and PReLU's slope gradient is NaN
    # where torch.nn's is (it summed dy·z over z <= 0, which a NaN z is not)
    inputs = [leaf, layer.act.weight] if activation == "prelu" else [leaf]
    reference_inputs = [reference_leaf, reference[1].weight] if activation == "prelu" else [reference_leaf]
    grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
    expected_grads = torch.autograd.grad(expected, reference_inputs, torch.ones_like(expected))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert torch.equal(grad.isnan(), expected_grad.isnan())
