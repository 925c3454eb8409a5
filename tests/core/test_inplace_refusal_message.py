"""The in-place mode's refusal says why the activation asked for cannot be inverted."""

from __future__ import annotations

import pytest

from normlab import core
from normlab.core.activation import ACTIVATIONS

REASONS = {"relu": "ReLU", "silu": "SiLU", "prelu": "PReLU"}
NOT_INVERTIBLE = sorted(entry.name for entry in ACTIVATIONS.values() if entry.fused and not entry.invertible)


def test_every_fused_activation_without_an_inverse_has_its_reason():
    assert NOT_INVERTIBLE == sorted(REASONS)


@pytest.mark.parametrize("activation", NOT_INVERTIBLE)
def test_refusal_names_the_activation_refused(activation):
    with pytest.raises(ValueError, match="inplace=True") as refusal:
        core.check_activation(activation, inplace=True)
    others = [name for key, name in REASONS.items() if key != activation]
    assert f"({REASONS[activation]}" in str(refusal.value)
    assert not any(f"({name} " in str(refusal.value) for name in others)
