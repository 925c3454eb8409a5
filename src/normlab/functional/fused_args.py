"""What the batch_norm-style functionals pass to the channel family's entry besides the norm's
own arguments — the running estimates, and for the fused ones the activation — as one value
each, with the checks written once."""

from __future__ import annotations

from typing import TypedDict

import torch

from ..core import RunningStats, check_activation
from ..core.call_checks import check_inplace_input
from ..core.checks import InputError

__all__ = ["NO_ACTIVATION", "ActivationArgs", "Estimates", "activation_args", "running_policy"]

#: A call's running-estimate arguments: (running_mean, running_var, num_batches_tracked, momentum,
#: unbiased_running_var, on_nonfinite). A plain tuple rather than a NamedTuple, whose
#: construction would add a Python frame to every call.
Estimates = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, float | None, bool, str]


def running_policy(estimates: Estimates, update: bool) -> RunningStats | None:
    """The running-statistics policy over a call's estimates, None without any; the update
    arguments (momentum, on_nonfinite) checked when the call will ``update`` them. The
    estimates are checked first (check_channel_call): both or neither."""
    running_mean, running_var, counter, momentum, unbiased, on_nonfinite = estimates
    if running_mean is None or running_var is None:
        return None
    if update:
        return RunningStats.of(
            running_mean, running_var, counter, momentum=momentum, unbiased=unbiased, on_nonfinite=on_nonfinite
        )
    # not updated: the policy only carries the estimates, and on_nonfinite is never read (so not
    # checked, nor narrowed by a cast, whose call would cost an eval call a Python frame)
    buffers = {"running_mean": running_mean, "running_var": running_var, "num_batches_tracked": counter}
    return RunningStats(buffers, momentum, unbiased, on_nonfinite)  # type: ignore[arg-type]


class ActivationArgs(TypedDict):
    """:func:`normlab.core.channel_norm`'s activation keywords, checked."""

    activation: str
    param: float
    prelu_weight: torch.Tensor | None
    inplace: bool


#: the plain norm's: channel_norm's own defaults
NO_ACTIVATION: ActivationArgs = {"activation": "identity", "param": 0.0, "prelu_weight": None, "inplace": False}


def activation_args(
    input: torch.Tensor,
    activation: str,
    activation_param: float | None,
    prelu_weight: torch.Tensor | None,
    inplace: bool,
) -> ActivationArgs:
    """A fused functional's activation arguments checked — the activation and its parameter,
    and with ``inplace`` an input that may be overwritten — as the family entry takes them."""
    param = check_activation(activation, activation_param, inplace=inplace)
    if activation == "prelu" and prelu_weight is None:
        # the kernels read the slopes through a pointer: without them the call would crash the process
        raise InputError("activation='prelu' needs prelu_weight, its slopes: a tensor of 1 or C values, got None")
    if inplace:  # called only where it can raise: this function's frame costs no more than before
        check_inplace_input(input, inplace)
    return {"activation": activation, "param": param, "prelu_weight": prelu_weight, "inplace": inplace}
