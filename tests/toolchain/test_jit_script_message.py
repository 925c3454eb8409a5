"""torch.jit.script compiles torch.nn's norms; normlab's forwards take what TorchScript cannot
type (a mask, fx proxies), so scripting one must say that and what to do — not TorchScript's
"Unknown type name 'TensorOrProxy'" — and the torch.nn twins must script."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl

# torch.jit.script is deprecated in torch 2.13 (it says so on each call); still used, so still answered
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

LAYERS = {
    "BatchNorm2d": lambda: nl.nn.BatchNorm2d(4),
    "BatchNormAct2d": lambda: nl.nn.BatchNormAct2d(4),
    "GroupNorm": lambda: nl.nn.GroupNorm(2, 4),
    "LayerNorm": lambda: nl.nn.LayerNorm(4),
    "RMSNorm": lambda: nl.nn.RMSNorm(4),
}


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_scripting_a_layer_says_what_to_do(make):
    model = nn.Sequential(nn.Identity(), make())  # found inside a model too
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile normlab's layers.*to_torch"):
        torch.jit.script(model)


def test_the_torch_nn_twins_script():
    model = nn.Sequential(nl.nn.BatchNorm2d(4)).eval()
    twin = nl.surgery.to_torch(model).model
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(torch.jit.script(twin)(x), model(x))
