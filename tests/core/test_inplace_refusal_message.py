"""The in-place mode's refusal says why the activation asked for cannot be inverted."""

from __future__ import annotations

import pytest

from normlab import core

REASONS = {"relu": "ReLU", "silu": "SiLU", "prelu": "PReLU"}


@pytest.mark.parametrize(
    "activation",
    [
        "relu",
        pytest.param(
            "silu",
            marks=pytest.mark.xfail(strict=True, reason="check_activation gives ReLU's reason for every activation"),
        ),
        pytest.param(
            "prelu",
            marks=pytest.mark.xfail(strict=True, reason="check_activation gives ReLU's reason for every activation"),
        ),
    ],
)
def test_refusal_names_the_activation_refused(activation):
    with pytest.raises(ValueError, match="inplace=True") as refusal:
        core.check_activation(activation, inplace=True)
    others = [name for key, name in REASONS.items() if key != activation]
    assert REASONS[activation] in str(refusal.value)
    assert not any(f"({name} " in str(refusal.value) for name in others)
