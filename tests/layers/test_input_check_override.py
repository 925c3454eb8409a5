"""torch.nn's BatchNorm forward calls ``self._check_input_dim(input)`` on every call, so a check
assigned to one layer (an instance attribute, as a model's code may patch it) runs each call."""

from __future__ import annotations

import pytest
import torch

import normlab as nl


@pytest.mark.parametrize("make", [lambda: nl.nn.BatchNorm2d(4), lambda: nl.nn.BatchNormAct2d(4)], ids=["bn", "bnact"])
def test_a_check_assigned_to_the_layer_is_called(make):
    calls = []
    layer = make()
    layer._check_input_dim = calls.append  # records each input it is asked about
    reference = torch.nn.BatchNorm2d(4)
    reference_calls = []
    reference._check_input_dim = reference_calls.append
    x = torch.randn(2, 4, 3, 3)
    layer(x)
    reference(x)
    assert len(reference_calls) == 1
    assert len(calls) == 1
