"""The float32 CPU kernels stay as accurate as float64 allows on data with a large mean.

Each case runs forward and backward on the kernels and compares output and every gradient
with a float64 run of torch.nn's layer. The data sit at 1e4 with a spread of 0.01 (and a
mean-zero case), where a kernel that sums x and x² in float32 — or subtracts a mean
computed from such sums — loses most digits: torch.nn's float32 BatchNorm is 0.04 off here.
Covered are the loops the performance work rewrote: LayerNorm's row kernels with and
without an affine (the weight is a compile-time branch there), fused-plane GroupNorm and
BatchNorm (NCHW), the column kernels (channels_last BatchNorm, BatchNorm1d) and eval
BatchNorm with running statistics at the same large mean.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DENSE_LAYOUTS
from torch import nn

import normlab as nl
from normlab import core

pytestmark = pytest.mark.skipif(not core.kernels_available(), reason="the kernels are not built here")

# float32 rounding of the output relative to its largest value is ~6e-8; the kernels keep
# within a few of those (the layer benchmark's bound for every row is 2.3e-7)
TOL = 1e-6


def _data(shape, large_mean, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = 1e4 + 0.01 * x if large_mean else 1.5 * x + 0.5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    # float32 values, so both sides see the same input (at 1e4 float32's spacing is 1e-3)
    return x.float().double(), dy.float().double()


def _randomized(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.75)
    return module


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _check(ours, theirs, x64, dy64, layout=None):
    """ours in float32 on the kernels against theirs in float64: output and gradients."""
    theirs = theirs.double()
    x32 = x64.float()
    if layout == "channels_last":
        x32 = x32.contiguous(memory_format=torch.channels_last)
    x32.requires_grad_()
    x_ref = x64.clone().requires_grad_()
    with core.record_dispatch() as log:
        y = ours(x32)
    assert log and all(path == "kernels" for _, path, _ in log), log
    y.backward(dy64.float())
    y_ref = theirs(x_ref)
    y_ref.backward(dy64)
    errors = {"y": _rel(y, y_ref), "dx": _rel(x32.grad, x_ref.grad)}
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        errors["d" + name] = _rel(p.grad, q.grad)
    bad = {k: v for k, v in errors.items() if v > TOL}
    assert not bad, errors


def _pair(ours, theirs):
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("large_mean", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(64, 768), (3, 37, 100)])
def test_layer_norm(shape, affine, large_mean):
    x, dy = _data(shape, large_mean)
    k = shape[-1]
    ours, theirs = _pair(
        _randomized(nl.nn.LayerNorm(k, elementwise_affine=affine)), nn.LayerNorm(k, elementwise_affine=affine)
    )
    _check(ours, theirs, x, dy)


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("k", [7, 8, 45, 520, 1100])
def test_row_lengths_every_branch_of_the_moments_loop(k, centered):
    """The rows' moments take 32 values a step, then 8, then one by one, in blocks of 512:
    lengths that end in each of those steps and cross a block, with and without grad."""
    x, dy = _data((5, k), large_mean=centered)
    make = (lambda m: m.LayerNorm(k)) if centered else (lambda m: m.RMSNorm(k, eps=1e-6))
    ours, theirs = _pair(_randomized(make(nl.nn)), make(nn))
    _check(ours, theirs, x, dy)
    with torch.no_grad():  # the eval route: no statistics kept, rows written straight
        assert _rel(ours(x.float()), theirs(x)) <= TOL


@pytest.mark.parametrize("large_mean", [True, False])
@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 64, 14, 14), (2, 32, 7, 7)])
def test_group_norm(shape, layout, large_mean):
    x, dy = _data(shape, large_mean)
    ours, theirs = _pair(_randomized(nl.nn.GroupNorm(8, shape[1])), nn.GroupNorm(8, shape[1]))
    _check(ours, theirs, x, dy, layout)


@pytest.mark.parametrize("large_mean", [True, False])
@pytest.mark.parametrize("activation", ["identity", "silu", "prelu"])
@pytest.mark.parametrize(("shape", "threads"), [((3, 64, 8, 8), 2), ((1, 64, 8, 8), 2), ((2, 32, 3, 3), 1)])
def test_group_norm_act_channels_last_both_routes(shape, threads, activation, large_mean):
    """channels_last GroupNorm takes the fused per-sample route where there is a sample for
    every thread, the two-pass route where not (N=1 on two threads): both as accurate."""
    x, dy = _data(shape, large_mean)
    c = shape[1]
    if activation == "identity":
        pair = _pair(_randomized(nl.nn.GroupNorm(8, c)), nn.GroupNorm(8, c))
    else:
        ours = _randomized(nl.nn.GroupNormAct(8, c, activation=activation))
        act = nn.SiLU() if activation == "silu" else nn.PReLU(c)
        theirs = nn.Sequential(nn.GroupNorm(8, c), act)
        theirs[0].load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("act.")})
        if activation == "prelu":
            act.load_state_dict(ours.act.state_dict())
        pair = (ours, theirs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(*pair, x, dy, "channels_last")
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("large_mean", [True, False])
@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 32, 14, 14), (3, 16, 5, 5)])
def test_batch_norm_training(shape, layout, large_mean):
    x, dy = _data(shape, large_mean)
    ours, theirs = _pair(_randomized(nl.nn.BatchNorm2d(shape[1])), nn.BatchNorm2d(shape[1]))
    _check(ours, theirs, x, dy, layout)
    # the running estimates the batch statistics fed (float32 buffers on both sides)
    torch.testing.assert_close(ours.running_mean.double(), theirs.running_mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("large_mean", [True, False])
@pytest.mark.parametrize("shape", [(512, 96), (33, 1000)])
def test_batch_norm_1d_training(shape, large_mean):
    x, dy = _data(shape, large_mean)
    ours, theirs = _pair(_randomized(nl.nn.BatchNorm1d(shape[1])), nn.BatchNorm1d(shape[1]))
    _check(ours, theirs, x, dy)


@pytest.mark.parametrize("layout", [*DENSE_LAYOUTS, "rows"])
def test_eval_batch_norm_with_large_running_mean(layout):
    # y = (x − μ)·γ/σ + β with μ ≈ x ≈ 1e4: x·scale + (β − μ·scale) in float32 would lose
    # ~1e4·6e-8/0.01 of the output; the kernel subtracts first, which is exact here
    shape = (512, 64) if layout == "rows" else (4, 64, 9, 9)
    x, _ = _data(shape, large_mean=True)
    c = shape[1]
    ours = _randomized(nl.nn.BatchNorm1d(c) if layout == "rows" else nl.nn.BatchNorm2d(c))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ours.running_mean.copy_(1e4 + 0.01 * torch.randn(c, generator=g))
        ours.running_var.copy_(1e-4 * (torch.rand(c, generator=g) + 0.5))
    theirs = (nn.BatchNorm1d(c) if layout == "rows" else nn.BatchNorm2d(c)).double()
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x32 = x.float()
    if layout == "channels_last":
        x32 = x32.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), core.record_dispatch() as log:
        y = ours(x32)
    assert [path for _, path, _ in log] == ["kernels"], log
    with torch.no_grad():
        assert _rel(y, theirs(x)) < TOL
