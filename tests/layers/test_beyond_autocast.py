"""The norms beyond the classic five under CPU autocast (bfloat16) on float32 inputs: like
torch.nn's norms there, they compute in float32 — outputs and every gradient as without
autocast, within float32 rounding. A matmul-family op (tensordot, mm, einsum) inside a layer
would be run in bfloat16 by autocast: 0.4 % off on 100 ± 0.01 data, and a closed-form backward
that mixes the saved bfloat16 and float32 statistics fails."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab as nl

_LAYERS = {
    "SwitchableNorm2d": (lambda: nl.nn.SwitchableNorm2d(4), (3, 4, 3, 3)),
    "SwitchableNorm2d-no-bn": (lambda: nl.nn.SwitchableNorm2d(4, using_bn=False), (3, 4, 3, 3)),
    "EvoNormB0": (lambda: nl.nn.EvoNormB0(4), (3, 4, 3, 3)),
    "EvoNormS0": (lambda: nl.nn.EvoNormS0(4, groups=2), (3, 4, 3, 3)),
    "DyT": (lambda: nl.nn.DyT(4), (3, 5, 4)),
    "Derf": (lambda: nl.nn.Derf(4), (3, 5, 4)),
}


def _step(layer: nn.Module, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return [y.detach().float(), x.grad] + [p.grad for p in layer.parameters()] + list(layer.buffers())


# SwitchableNorm's closed form mixes its statistics in elementwise ops: with torch.tensordot,
# which autocast runs in bfloat16, the forward was 2e-4 to 4e-3 off and the backward raised.
_NAMES = list(_LAYERS)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", _NAMES)
def test_autocast_computes_in_float32(name, training):
    make, shape = _LAYERS[name]
    torch.manual_seed(0)
    layer = make().train(training)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(shape) * 0.01 + 100  # large-mean data: a bfloat16 statistic is far off
    expected = _step(copy.deepcopy(layer), x, autocast=False)
    got = _step(copy.deepcopy(layer), x, autocast=True)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
