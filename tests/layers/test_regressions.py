"""Defects found by adversarial testing, each pinned by the test that found it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF

import normlab as nl
from normlab import core

F = nl.functional
BACKENDS = ["auto", "composed"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_layer_norm_with_bias_but_no_weight(backend, dtype):
    """float32 CPU ignored β without γ; the composed backward crashed ("not expandable")."""
    x = torch.tensor([[0.0, 1, 2, 3], [1.0, -2, 5, 0]], dtype=dtype, requires_grad=True)
    b = torch.tensor([10.0, 20, 30, 40], dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 4, dtype=dtype)
    with core.use_backend(backend):
        y = F.layer_norm(x, (4,), None, b)
        gx, gb = torch.autograd.grad(y, (x, b), dy)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = TF.layer_norm(x64, (4,), None, b64)
    gx64, gb64 = torch.autograd.grad(y64, (x64, b64), dy.double())
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    for ours, exact in ((y, y64), (gx, gx64), (gb, gb64)):
        torch.testing.assert_close(ours.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_group_norm_with_bias_but_no_weight(backend, dtype):
    """The composed backward crashed; torch's own group_norm backward fails here too."""
    x = torch.randn(3, 4, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(4, dtype=dtype, requires_grad=True)
    with core.use_backend(backend):
        y = F.group_norm(x, 2, None, b)
        gx, gb = torch.autograd.grad(y.float().square().sum(), (x, b))
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = TF.group_norm(x64, 2, torch.ones(4, dtype=torch.float64), b64)
    gx64, gb64 = torch.autograd.grad(y64.square().sum(), (x64, b64))
    tol = 2e-2 if dtype == torch.float16 else 1e-5
    for ours, exact in ((y, y64), (gx, gx64), (gb, gb64)):
        torch.testing.assert_close(ours.double(), exact, rtol=tol, atol=tol)


def test_float16_running_var_that_would_overflow_is_skipped():
    """The batch statistics are finite, but the float16 estimate would become inf."""
    layer = nl.nn.BatchNorm1d(3, dtype=torch.float16)
    before = layer.running_var.clone()
    x = (torch.randn(64, 3) * 400).half()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
    assert torch.isfinite(layer.running_var).all()
    assert torch.equal(layer.running_var, before)
    assert int(layer.num_batches_tracked) == 0
    assert any("not finite" in str(w.message) for w in caught)
    layer.eval()
    assert layer(x).abs().max() > 0  # eval does not collapse to 0


def test_in_place_under_no_grad_bumps_the_version_counter():
    """The kernel wrote through a raw pointer: a tensor another op saved changed silently."""
    layer = nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    h = torch.randn(2, 4, 5, 5)
    saved = TF.conv2d(h, w, padding=1)  # conv saves its input h for the weight gradient
    with torch.no_grad():
        version = h._version
        layer(h)
        assert h._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_modules_are_torch_nn_instances_and_keep_num_batches_tracked_on_partial_load():
    layer = nl.nn.BatchNorm2d(3)
    assert isinstance(layer, torch.nn.BatchNorm2d)
    layer(torch.randn(4, 3, 2, 2))
    state = {k: v for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
    layer.load_state_dict(state, strict=False)
    assert int(layer.num_batches_tracked) == 1  # torch keeps it; it used to reset to 0


def test_prelu_slope_is_reset_with_the_layer():
    layer = nl.nn.BatchNormAct2d(4, activation="prelu")
    with torch.no_grad():
        layer.act.weight.fill_(3.0)
    layer.reset_parameters()
    assert torch.equal(layer.act.weight, torch.full((4,), 0.25))


def test_expanded_running_statistics_get_a_clear_error():
    running_mean, running_var = torch.zeros(1).expand(3), torch.ones(1).expand(3)
    with pytest.raises(RuntimeError, match="running_mean is an expanded view"):
        F.batch_norm(torch.randn(4, 3), running_mean, running_var, training=True)


def test_errors_are_catchable_as_torch_raises_them():
    with pytest.raises(RuntimeError, match="running_mean has shape"):
        F.batch_norm(torch.rand(2, 10), torch.rand(9), torch.rand(10))
    with pytest.raises(ValueError):
        F.batch_norm(torch.rand(2, 10), torch.rand(9), torch.rand(10))
    with pytest.raises(RuntimeError, match="must divide"):
        F.group_norm(torch.randn(2, 7, 4), 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: nl.nn.BatchNorm2d(3),
        lambda: nl.nn.GroupNorm(1, 3),
        lambda: nl.nn.InstanceNorm2d(3),
        lambda: nl.nn.LayerNorm([3, 4, 4]),
    ],
    ids=["batch", "group", "instance", "layer"],
)
def test_a_variance_that_overflows_gives_nan_not_beta(backend, make):
    """float32 input ×1e19: the squares overflow; the output used to be β everywhere."""
    x = torch.randn(8, 3, 4, 4) * 1e19
    with core.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the running-statistics guard warns, as it should
        y = make()(x)
    assert torch.isnan(y).all()


def test_normlab_imports_with_docstrings_stripped():
    """``python -OO`` strips docstrings: FrozenBatchNorm1d/2d/3d built theirs from their base
    class's ``__doc__``, None there, and ``import normlab`` raised TypeError."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(nl.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = "import normlab as nl; m = nl.nn.FrozenBatchNorm2d(3); assert nl.nn.activation_spec.__doc__ is None; print('ok')"
    done = subprocess.run([sys.executable, "-OO", "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_residual_sum_whose_variance_overflows_gives_nan_not_beta(backend):
    """x + r ×1e19: the add-then-LayerNorm kernel took 1/√∞ = 0 and returned β everywhere."""
    x = torch.randn(8, 16) * 1e19
    with core.use_backend(backend):
        y, s = nl.nn.AddLayerNorm(16)(x, torch.zeros_like(x))
    assert torch.equal(s, x)
    assert torch.isnan(y).all()
