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


@pytest.mark.xfail(
    strict=True,
    reason="an inf in a (sample, channel) plane: the native path (torch's rms_norm) gives 0 for the "
    "plane's finite entries, the composed and kernels paths (core.normalize_batch, centered=False — "
    "RMSNorm's too) NaN for the whole plane; the paths disagree, a core decision",
)
def test_filter_response_norm_paths_agree_on_a_plane_holding_inf():
    layer = nl.nn.FilterResponseNorm2d(2)
    x = torch.randn(1, 2, 1, 3)
    x[0, 0, 0, 1] = float("inf")
    outputs = {}
    for backend in BACKENDS:
        with nl.core.use_backend(backend):
            outputs[backend] = layer(x).detach()
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(outputs[backend], outputs["native"], equal_nan=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_relu_keeps_a_nan_input_nan_on_the_kernels_path(train):
    x = torch.randn(3, 2, 1, 2)
    x[0] = float("nan")
    layer = nl.nn.BatchNormAct2d(2, activation="relu").train(train)
    with warnings.catch_warnings(), nl.core.use_backend("kernels"):
        warnings.simplefilter("ignore")  # the non-finite batch is skipped, with a warning
        y = layer(x)
    assert torch.isnan(y[0]).all()
