"""Cases found by probing the norms beyond the classic five across backends and edge inputs:
each is a call torch.nn (or normlab's own BatchNorm) answers one way and these layers
answered another."""

from __future__ import annotations

import warnings

import pytest
import torch

import normlab as nl

BACKENDS = ["native", "composed", "kernels"]

#: the layers that take batch statistics in training, built small.
BATCH_STAT_LAYERS = {
    "EvoNormB0": lambda: nl.nn.EvoNormB0(4),
    "EvoNormB1": lambda: nl.nn.EvoNormB1(4),
    "EvoNormB2": lambda: nl.nn.EvoNormB2(4),
    "SwitchableNorm2d": lambda: nl.nn.SwitchableNorm2d(4),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(BATCH_STAT_LAYERS))
def test_an_empty_batch_in_training_gives_an_empty_output_and_keeps_the_estimates(name, backend):
    # torch.nn.BatchNorm2d and normlab's return an empty output for N = 0 in training, and
    # normlab's leaves the estimates alone; these layers raised "more than 1 value per channel".
    layer = BATCH_STAT_LAYERS[name]()
    before = {n: b.clone() for n, b in layer.named_buffers()}
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with nl.core.use_backend(backend):
            y = layer(x)
            y.sum().backward()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert x.grad is not None and x.grad.shape == x.shape
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n
    for n, b in layer.named_buffers():
        assert torch.equal(b, before[n]), n
