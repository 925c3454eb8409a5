"""Inputs with zero channels: the functionals answer as torch's do (an empty output, or an
error where torch raises); the layers refuse zero channels when built (deliberate)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normlab as nl
from normlab.core import InputError


def _none(n):
    return None


def _zeros(n):
    return torch.zeros(n)


CASES = {
    "batch_norm train": lambda F, w, b: F.batch_norm(_x(), None, None, w(0), b(0), training=True),
    "batch_norm train, running stats": lambda F, w, b: F.batch_norm(
        _x(), torch.zeros(0), torch.ones(0), w(0), b(0), training=True
    ),
    "batch_norm eval": lambda F, w, b: F.batch_norm(_x(), torch.zeros(0), torch.ones(0), w(0), b(0), training=False),
    "instance_norm": lambda F, w, b: F.instance_norm(_x(), weight=w(0), bias=b(0)),
    "instance_norm, running stats": lambda F, w, b: F.instance_norm(
        _x(), torch.zeros(0), torch.ones(0), w(0), b(0), use_input_stats=True
    ),
    "group_norm": lambda F, w, b: F.group_norm(_x(), 1, w(0), b(0)),
}


def _x():
    return torch.randn(2, 0, 3, 3, requires_grad=True) * 1


def _outcome(fn):
    try:
        y = fn()
    except Exception as err:  # noqa: BLE001 - the outcome is what is compared
        return "raises", err
    y.sum().backward()  # differentiable, as torch's clone is
    return tuple(y.shape), None


@pytest.mark.parametrize("params", ["none", "weight", "bias"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_functionals_answer_zero_channels_as_torch_does(case, params):
    w = _zeros if params == "weight" else _none
    b = _zeros if params == "bias" else _none
    theirs, their_err = _outcome(lambda: CASES[case](TF, w, b))
    ours, err = _outcome(lambda: CASES[case](nl.functional, w, b))
    assert ours == theirs
    if err is not None and not isinstance(err, InputError):
        # group_norm without γ/β is torch's own call, whose answer depends on the torch
        # version (2.13 returns an empty tensor, 2.14 raises): then ours is torch's error
        assert type(err) is type(their_err) and str(err) == str(their_err)
    elif err is not None:  # torch's IndexError comes from inside its kernel; ours says why
        assert "0 channels" in str(err)


@pytest.mark.parametrize(
    "make",
    [
        lambda lib: lib.BatchNorm2d(0),
        lambda lib: lib.BatchNorm2d(0, affine=False),
        lambda lib: lib.InstanceNorm2d(0),
        lambda lib: lib.GroupNorm(1, 0),
    ],
)
def test_layers_refuse_zero_channels_when_built(make):
    """Deliberate (docs/conventions.md): torch.nn builds these; its default BatchNorm then
    fails at the first call with an IndexError from inside the kernel, the others return an
    empty tensor. A layer over no channels is a width that came out 0: say so where it is made."""
    make(torch.nn)
    with pytest.raises(InputError, match="must be a positive int, got 0"):
        make(nl.nn)
    with pytest.raises(IndexError):
        torch.nn.BatchNorm2d(0)(torch.randn(2, 0, 3, 3))
