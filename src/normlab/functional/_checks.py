"""The argument checks every per-channel functional opens with, written once.

batch_norm, batch_norm_act, batch_renorm, instance_norm and sync_batch_norm take the same
(input, running_mean, running_var, weight, bias, ..., eps) and check them the same way;
only the accepted ranks and the name in the message differ.
"""

from __future__ import annotations

import torch

from ..core import check_eps, check_floating_input, check_momentum, check_nonfinite_policy, check_param
from ..core.checks import InputError

__all__ = ["check_channel_call", "check_inplace_input", "check_update_args", "too_few_values"]


def check_channel_call(
    fn: str,
    input: object,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: object,
    *,
    shape_words: str = "(N, C) or (N, C, *spatial)",
    min_rank: int = 2,
) -> float:
    """A floating (N, C, ...) input of rank ``min_rank`` or more, a valid ``eps`` (returned
    as a float), and per-channel tensors that match the input's channels, dtype and device;
    ``running_mean`` and ``running_var`` come together or not at all."""
    check_floating_input(input)
    if input.dim() < min_rank:
        raise InputError(
            f"{fn} expects input of shape {shape_words}, got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    eps = check_eps(eps)
    channels = input.shape[1]
    what = f"{fn} over the {channels} channels of input dim 1"
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        check_param(t, name, (channels,), input, what)
    if (running_mean is None) != (running_var is None):
        raise InputError(
            f"{fn}: running_mean and running_var must be given together, got "
            f"running_mean={'a tensor' if running_mean is not None else None} and "
            f"running_var={'a tensor' if running_var is not None else None}"
        )
    return eps


def check_update_args(momentum: object, num_batches_tracked: torch.Tensor | None, on_nonfinite: object) -> float | None:
    """The arguments of a running-statistics update: ``momentum`` (None, the cumulative
    average, only with the batch counter) and the non-finite policy."""
    momentum = check_momentum(momentum, allow_none=num_batches_tracked is not None)
    check_nonfinite_policy(on_nonfinite)
    return momentum


def too_few_values(input: torch.Tensor) -> InputError:
    """The error for training with batch statistics on at most one value per channel, whose
    variance is 0 (raised by the caller, which tests the count where it is computed)."""
    return InputError(
        f"Expected more than 1 value per channel when training, got input size "
        f"{list(input.shape)}: a batch variance needs 2 or more values. Use a "
        f"batch of 2 or more, call model.eval() for inference, or use a norm that "
        f"does not depend on the batch (GroupNorm, LayerNorm)"
    )


def check_inplace_input(input: object, inplace: bool) -> None:
    """``inplace=True`` overwrites its input, which autograd allows only for a computed tensor."""
    if inplace and isinstance(input, torch.Tensor) and input.is_leaf and input.requires_grad:
        raise RuntimeError(
            "inplace=True overwrites its input, but the input is a leaf tensor that requires "
            "grad (a parameter or a user tensor); pass a computed tensor (e.g. a conv output) "
            "or use inplace=False"
        )
