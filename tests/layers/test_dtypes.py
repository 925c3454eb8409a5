"""float16/bfloat16: statistics in float32, results within stated tolerances of float32.

Stated tolerances (max |half − float32| over max(1, max |float32|)), set by the output's
own rounding — a half result can be no closer than half an ulp of itself:

    float16   outputs 2e-3, gradients 4e-3      (ulp(1) = 9.8e-4)
    bfloat16  outputs 1.6e-2, gradients 3.2e-2  (ulp(1) = 7.8e-3)
"""

from __future__ import annotations

import pytest
import torch

import normlab as nl

TOLERANCE = {torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3.2e-2)}

LAYERS = {
    "BatchNorm2d": lambda: nl.nn.BatchNorm2d(8),
    "InstanceNorm2d": lambda: nl.nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
    "GroupNorm": lambda: nl.nn.GroupNorm(4, 8),
    "LayerNorm": lambda: nl.nn.LayerNorm((8, 6, 6)),
    "RMSNorm": lambda: nl.nn.RMSNorm(6),
}


def _scaled_error(a, b):
    return ((a.float() - b).abs().max() / max(1.0, b.abs().max().item())).item()


def _run(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_half_precision_within_stated_tolerance_of_float32(name, dtype, layout):
    out_tol, grad_tol = TOLERANCE[dtype]
    x32 = torch.randn(4, 8, 6, 6) * 2 + 1
    if layout == "channels_last":
        x32 = x32.contiguous(memory_format=torch.channels_last)
    dy32 = torch.randn(4, 8, 6, 6)
    ref_layer = LAYERS[name]()
    half_layer = LAYERS[name]()
    half_layer.load_state_dict(ref_layer.state_dict())
    half_layer.to(dtype)

    # Round the input first: the comparison measures the layer, not the input cast.
    x_half = x32.to(dtype)
    y32, gx32, gp32 = _run(ref_layer, x_half.float(), dy32.to(dtype).float())
    yh, gxh, gph = _run(half_layer, x_half, dy32.to(dtype))

    assert yh.dtype == dtype and gxh.dtype == dtype
    assert _scaled_error(yh, y32) < out_tol
    assert _scaled_error(gxh, gx32) < grad_tol
    for k in gp32:
        assert gph[k].dtype == dtype
        assert _scaled_error(gph[k], gp32[k]) < grad_tol, k
    for buf in ("running_mean", "running_var"):
        if getattr(ref_layer, buf, None) is not None:
            assert _scaled_error(getattr(half_layer, buf), getattr(ref_layer, buf)) < out_tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_half_input_float32_parameters(dtype):
    layer = nl.nn.BatchNorm2d(8)  # float32 parameters and buffers, as under autocast
    x = torch.randn(4, 8, 5, 5).to(dtype).requires_grad_()
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == dtype
    assert layer.weight.grad.dtype == torch.float32
    assert layer.running_mean.dtype == torch.float32
    expected = nl.nn.BatchNorm2d(8)(x.detach().float())
    assert _scaled_error(y, expected) < TOLERANCE[dtype][0]


def test_half_statistics_do_not_overflow_where_float16_sums_would():
    # 4096 values of 60 square to a sum of 1.5e7: beyond float16's max of 65504.
    x = (60 + torch.randn(16, 4, 16, 16)).half()
    y = nl.nn.BatchNorm2d(4)(x)
    assert torch.isfinite(y).all()
    expected = nl.nn.BatchNorm2d(4)(x.float())
    assert _scaled_error(y, expected) < TOLERANCE[torch.float16][0]
