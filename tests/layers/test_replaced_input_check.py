"""torch.nn's BatchNorm forward calls ``self._check_input_dim`` on every call, so a check
assigned to the class after it was made (a library patching the layer) or to one instance is
called; normlab's forward, which tests the common case inline, must call it as well."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl


@pytest.mark.parametrize(
    "base", [nn.BatchNorm1d, nl.nn.BatchNorm1d, nl.nn.BatchNormAct1d], ids=["torch.nn", "normlab", "normlab-act"]
)
@pytest.mark.parametrize("where", ["instance", "class"])
def test_a_check_assigned_later_is_called(base, where):
    calls = []

    def strict(self, input):
        calls.append(input.dim())
        if not input.is_contiguous():
            raise ValueError("Strict: a contiguous input")

    subclass = type("Patched", (base,), {})  # a fresh class: patching it leaves the library's alone
    layer = subclass(3)
    if where == "class":
        subclass._check_input_dim = strict
    else:
        layer._check_input_dim = strict.__get__(layer)
    layer(torch.randn(4, 3, 5))
    assert calls == [3]
    with pytest.raises(ValueError, match="Strict"):
        layer(torch.randn(4, 5, 3).transpose(1, 2))
