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


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tlu", [False, True], ids=["frn", "frn_tlu"])
def test_filter_response_norm_paths_agree_on_a_plane_holding_inf(bad, dtype, tlu):
    """A plane whose mean square is not finite comes out NaN whole on every path (its finite
    entries too: the native path once gave 0 there, from torch's rsqrt(inf) = 0); the other
    planes are normalized as usual (docs/conventions.md, "Backends")."""
    make = nl.nn.FilterResponseNormTlu2d if tlu else nl.nn.FilterResponseNorm2d
    layer = make(2, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    x = torch.randn(2, 2, 1, 3).to(dtype)
    x[0, 0, 0, 1] = bad
    clean = x.clone()
    clean[0, 0, 0, 1] = 0.5
    outputs = {}
    for backend in BACKENDS:
        with nl.core.use_backend(backend):
            outputs[backend] = layer(x).detach()
            expected = layer(clean).detach()
        y = outputs[backend]
        assert torch.isnan(y[0, 0]).all(), (backend, y[0, 0])
        torch.testing.assert_close(y[0, 1], expected[0, 1])  # the other planes as usual
        torch.testing.assert_close(y[1], expected[1])
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(outputs[backend], outputs[BACKENDS[0]], equal_nan=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_relu_keeps_a_nan_input_nan_on_the_kernels_path(train):
    x = torch.randn(3, 2, 1, 2)
    x[0] = float("nan")
    layer = nl.nn.BatchNormAct2d(2, activation="relu").train(train)
    with warnings.catch_warnings(), nl.core.use_backend("kernels"):
        warnings.simplefilter("ignore")  # the non-finite batch is skipped, with a warning
        y = layer(x)
    assert torch.isnan(y[0]).all()
