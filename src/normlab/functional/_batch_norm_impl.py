"""The one implementation behind batch_norm, batch_norm_act, batch_renorm's eval and the
BatchNorm modules: per-channel statistics from the batch or from running estimates.

Private to the package. The public functionals (``normlab.functional.tracked``) check every
argument; a module, whose constructor checked what it fixes, calls with ``validated=True``
and only what depends on the input is checked per call.
"""

from __future__ import annotations

import torch

from ..core import (
    channel_norm,
    check_floating_input,
    check_mask,
    check_param,
    masked_channel_norm,
    reduced_count,
    update_running_stats,
    update_running_stats_if,
)
from ..core.checks import InputError
from ..core.dispatch import fast_batch_norm
from ._checks import check_channel_call, check_update_args, too_few_values

__all__ = ["batch_norm_impl", "no_channels", "update_running"]


def _all_empty(*tensors) -> bool:
    return all(t is None or t.numel() == 0 for t in tensors)


def no_channels(fn: str, input: torch.Tensor, weight, bias) -> torch.Tensor:
    """torch's answer for an input with 0 channels: a copy of the (empty) input — except
    with γ or β, where torch's kernel fails with an IndexError; a clear error here."""
    if weight is not None or bias is not None:
        raise InputError(
            f"{fn}: the input has 0 channels (shape {tuple(input.shape)}), so there is no "
            "channel for weight/bias to scale or shift (torch.nn raises here too); check the "
            "layer widths, or pass weight=None and bias=None for an empty output"
        )
    return input.clone()


def batch_norm_impl(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    batch_stats,
    momentum,
    eps,
    *,
    num_batches_tracked,
    unbiased_running_var,
    on_nonfinite,
    activation="identity",
    param=0.0,
    prelu_weight=None,
    inplace=False,
    fn="batch_norm",
    validated=False,
    mask=None,
):
    """``activation(batch_norm(...))``; ``batch_stats`` is the public ``training``: normalize
    with this batch's statistics (and update the running estimates when given) or with the
    running estimates.

    ``validated``: a module's call, whose constructor already checked eps, momentum, the
    policy and the parameter shapes, and whose forward checked the input's rank and channels;
    only what depends on this input (dtype, device) is checked here."""
    if validated and mask is None and not inplace:
        # a module's call in eager float32 CPU: the whole call in C++ (None when it does not apply)
        out = fast_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            batch_stats,
            momentum,
            eps,
            num_batches_tracked=num_batches_tracked,
            unbiased_running_var=unbiased_running_var,
            on_nonfinite=on_nonfinite,
            activation=activation,
            param=param,
            prelu_weight=prelu_weight,
            operation=fn,
        )
        if out is not None:
            return out
    if validated:
        if not input.is_floating_point():
            check_floating_input(input)
        for name, t in (("weight", weight), ("running_mean", running_mean)):
            if t is not None and (t.dtype != input.dtype or t.device != input.device):
                # check_param raises with the full message
                what = f"{fn} over the {input.shape[1]} channels of input dim 1"
                check_param(t, name, (input.shape[1],), input, what)
    else:
        if (
            isinstance(input, torch.Tensor)
            and input.is_floating_point()
            and input.dim() == 1
            and input.numel() == 0
            and _all_empty(running_mean, running_var)
        ):
            # torch reads a 1-D input as one with no channel dim, i.e. 0 channels
            return no_channels(fn, input, weight, bias)
        eps = check_channel_call(fn, input, weight, bias, running_mean, running_var, eps)
    if mask is not None:
        mask = check_mask(mask, input, fn)
    if input.shape[1] == 0:
        return no_channels(fn, input, weight, bias)
    if not batch_stats:
        if running_mean is None:
            raise InputError(
                f"{fn} with training=False normalizes with running_mean and "
                "running_var, but they are None; pass them, or training=True to use "
                "batch statistics"
            )
        if mask is None:  # the eval hot path: keywords spelled out, not unpacked from a dict
            return channel_norm(
                input,
                weight,
                bias,
                eps=eps,
                running_mean=running_mean,
                running_var=running_var,
                activation=activation,
                param=param,
                prelu_weight=prelu_weight,
                operation=fn,
            )[0]
    elif eps == 0:
        raise InputError(
            f"{fn}: eps must be > 0 in training, got 0.0 (a constant channel would divide by "
            f"zero; torch.nn refuses it too). eps = 0 is accepted for normalizing with given "
            f"statistics (eval)"
        )
    if mask is not None:
        return _masked_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            batch_stats,
            momentum,
            eps,
            mask,
            num_batches_tracked=num_batches_tracked,
            unbiased_running_var=unbiased_running_var,
            on_nonfinite=on_nonfinite,
            validated=validated,
            act={"activation": activation, "param": param, "prelu_weight": prelu_weight, "operation": fn},
        )
    count = reduced_count(input.shape, (0,) + tuple(range(2, input.dim())))
    if count == 1:
        raise too_few_values(input)
    # An empty batch (N = 0 or a zero-size spatial dim) gives an empty output and leaves
    # the running estimates alone, as in torch.nn.
    track = running_mean is not None and count > 0
    if track and not validated:
        momentum = check_update_args(momentum, num_batches_tracked, on_nonfinite)
    out, mean, var = channel_norm(
        input,
        weight,
        bias,
        eps=eps,
        activation=activation,
        param=param,
        prelu_weight=prelu_weight,
        inplace=inplace,
        want_stats=track,
        operation=fn,
    )
    if track:  # the training hot path: called directly, not through update_running
        update_running_stats(
            running_mean,
            running_var,
            mean,
            var,
            count,
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=unbiased_running_var,
            on_nonfinite=on_nonfinite,
        )
    return out


def _masked_batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    batch_stats,
    momentum,
    eps,
    mask,
    *,
    num_batches_tracked,
    unbiased_running_var,
    on_nonfinite,
    validated,
    act,
):
    """:func:`batch_norm_impl` over the valid positions of ``mask`` (already checked)."""
    if not batch_stats:
        return masked_channel_norm(
            input, weight, bias, mask, eps=eps, running_mean=running_mean, running_var=running_var, **act
        )[0]
    track = running_mean is not None
    if track and not validated:
        momentum = check_update_args(momentum, num_batches_tracked, on_nonfinite)
    out, mean, var, count = masked_channel_norm(input, weight, bias, mask, eps=eps, **act)
    if track:
        update_running(
            running_mean,
            running_var,
            mean,
            var,
            count,
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased_running_var=unbiased_running_var,
            on_nonfinite=on_nonfinite,
            masked=True,
        )
    return out


def update_running(
    running_mean,
    running_var,
    mean,
    var,
    count,
    momentum,
    *,
    num_batches_tracked,
    unbiased_running_var,
    on_nonfinite,
    masked,
):
    """Merge a batch's per-channel (mean, biased var) of ``count`` values into the running
    estimates. ``masked``: the count of valid values is known only on the device, so a batch
    with fewer than 2 is not an error: it leaves the estimates untouched (a where, no host
    sync)."""
    update = (running_mean, running_var, mean, var, count, momentum)
    policy = {
        "num_batches_tracked": num_batches_tracked,
        "unbiased": unbiased_running_var,
        "on_nonfinite": on_nonfinite,
    }
    if masked:
        update_running_stats_if(count >= 2, *update, **policy)
    else:
        update_running_stats(*update, **policy)
