"""group_norm, layer_norm and rms_norm: statistics from each sample alone, never running.

Argument-compatible with ``torch.nn.functional``. They differ only in the dims reduced:
GroupNorm splits C into (G, C//G) — a view for every memory layout, so channels_last
stays channels_last — and reduces (C//G, \\*spatial); LayerNorm and RMSNorm reduce the
trailing ``normalized_shape``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from ..core import (
    channel_norm,
    check_activation,
    check_eps,
    check_floating_input,
    check_mask,
    check_param,
    check_positive_int,
    compute_dtype,
    masked_channel_norm,
    normalize_shape_arg,
    reduced_count,
    row_norm,
)
from ..core.checks import InputError
from ..core.dispatch import fast_group_norm, fast_row_norm
from ._checks import check_inplace_input

__all__ = ["group_norm", "group_norm_act", "layer_norm", "rms_norm"]

_FLOAT32_EPS = torch.finfo(torch.float32).eps


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Group normalization of an (N, C, \*spatial) input: one statistic per (sample, group).

    Channels are split into ``num_groups`` contiguous groups of C // num_groups;
    ``weight`` and ``bias`` are per channel. GroupNorm(1) is LayerNorm over
    (C, \*spatial) with per-channel affine; GroupNorm(C) is InstanceNorm.

    ``mask``: a bool tensor, True where a position is valid, shaped like the input without
    its channel dim ((N, L) for (N, C, L)) or broadcastable to it; each (sample, group) is
    then normalized over its valid positions, and the output and the input gradient are 0
    at padded ones (a sample with no valid position is all 0).
    """
    return _group_norm(input, num_groups, weight, bias, eps, mask=mask)


def group_norm_act(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    activation_param: float | None = None,
    prelu_weight: torch.Tensor | None = None,
    inplace: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``activation(group_norm(...))`` in one pass; arguments as for
    :func:`normlab.functional.batch_norm_act` (``inplace`` and ``mask`` included)."""
    param = check_activation(activation, activation_param, inplace=inplace)
    check_inplace_input(input, inplace)
    return _group_norm(
        input,
        num_groups,
        weight,
        bias,
        eps,
        activation=activation,
        param=param,
        prelu_weight=prelu_weight,
        inplace=inplace,
        fn="group_norm_act",
        mask=mask,
    )


def _group_norm(
    input,
    num_groups,
    weight,
    bias,
    eps,
    *,
    activation="identity",
    param=0.0,
    prelu_weight=None,
    inplace=False,
    fn="group_norm",
    validated=False,
    mask=None,
):
    """``validated``: a module's call (constructor-checked groups, eps and parameter shapes;
    the module checked the channels): only what depends on this input is checked here."""
    if validated and mask is None and not inplace:
        out = fast_group_norm(
            input,
            num_groups,
            weight,
            bias,
            eps,
            activation=activation,
            param=param,
            prelu_weight=prelu_weight,
            operation=fn,
        )
        if out is not None:
            return out
    act = {"activation": activation, "param": param, "prelu_weight": prelu_weight, "operation": fn}
    if not (
        validated
        and mask is None
        and input.dim() >= 2
        and input.is_floating_point()
        and _same_kind(weight, input)
        and (reduced_count(input.shape, range(2, input.dim())) * (input.shape[1] // num_groups) > 1)
    ):
        eps = _check_group_call(fn, input, num_groups, weight, bias, eps)
        if mask is not None:
            mask = check_mask(mask, input, fn)
            return masked_channel_norm(input, weight, bias, mask, groups=num_groups, eps=eps, **act)[0]
    return channel_norm(input, weight, bias, groups=num_groups, eps=eps, inplace=inplace, want_stats=False, **act)[0]


def _check_group_call(fn, input, num_groups, weight, bias, eps) -> float:
    """Everything group_norm checks on a call a module has not validated; returns eps."""
    check_floating_input(input)
    check_positive_int(num_groups, "num_groups")
    if input.dim() < 2:
        raise InputError(
            f"{fn} expects input of shape (N, C, *spatial), got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    channels = input.shape[1]
    if channels % num_groups != 0:
        raise InputError(
            f"{fn}: num_groups={num_groups} must divide the {channels} channels of "
            f"input dim 1 (input shape {tuple(input.shape)}); divisors of {channels} "
            f"near it: {_nearby_divisors(channels, num_groups)}"
        )
    eps = check_eps(eps)
    what = f"{fn} over the {channels} channels of input dim 1"
    check_param(weight, "weight", (channels,), input, what)
    check_param(bias, "bias", (channels,), input, what)
    if channels // num_groups * reduced_count(input.shape, range(2, input.dim())) == 1:
        raise InputError(
            f"{fn}: each of the {num_groups} groups holds a single value (input "
            f"shape {tuple(input.shape)}), so its variance is 0 and the output would be "
            f"the bias whatever the input; use fewer groups or a spatial extent > 1"
        )
    return eps


def _same_kind(param: torch.Tensor | None, input: torch.Tensor) -> bool:
    """The parameter needs no check against this input: absent, or same dtype and device."""
    return param is None or (param.dtype == input.dtype and param.device == input.device)


def _nearby_divisors(n: int, target: int) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divisors, key=lambda d: (abs(d - target), d))[:3]


def _trailing_dims(fn: str, input: torch.Tensor, normalized_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = normalize_shape_arg(normalized_shape)
    k = len(shape)
    if input.dim() < k or tuple(input.shape[-k:]) != shape:
        raise InputError(
            f"{fn}: normalized_shape={list(shape)} must equal the trailing dims of the "
            f"input, got input shape {tuple(input.shape)} (expected (*, "
            f"{', '.join(map(str, shape))}))"
        )
    return shape, tuple(range(input.dim() - k, input.dim()))


def layer_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims of each sample.

    ``weight`` and ``bias`` have shape ``normalized_shape`` (elementwise affine).
    """
    return _layer_norm(input, normalized_shape, weight, bias, eps)


def _layer_norm(input, normalized_shape, weight, bias, eps, *, validated=False):
    """``validated``: a module's call, whose constructor checked the shape, eps and γ/β."""
    if validated:
        out = fast_row_norm(input, normalized_shape, weight, bias, eps, centered=True, operation="layer_norm")
        if out is not None:
            return out
    if (
        validated
        and isinstance(input, torch.Tensor)
        and input.is_floating_point()
        and _same_kind(weight, input)
        and input.shape[input.dim() - len(normalized_shape) :] == normalized_shape
    ):
        return row_norm(input, normalized_shape, weight, bias, eps, centered=True, operation="layer_norm")
    check_floating_input(input)
    shape, dims = _trailing_dims("layer_norm", input, normalized_shape)
    eps = check_eps(eps)
    what = f"layer_norm over normalized_shape {list(shape)}"
    check_param(weight, "weight", shape, input, what)
    check_param(bias, "bias", shape, input, what)
    return row_norm(input, shape, weight, bias, eps, centered=True, operation="layer_norm")


def rms_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Root-mean-square normalization: y = x / √(mean(x²) + ε) · weight, no mean subtracted.

    ``eps=None`` uses the machine epsilon of the computation dtype, as torch.nn does:
    ``torch.finfo(torch.float32).eps`` for float16/bfloat16/float32 input, float64's
    for float64.
    """
    return _rms_norm(input, normalized_shape, weight, eps)


def _rms_norm(input, normalized_shape, weight, eps, *, validated=False):
    """``validated``: a module's call, whose constructor checked the shape, eps and γ."""
    if validated:
        out = fast_row_norm(
            input,
            normalized_shape,
            weight,
            None,
            _FLOAT32_EPS if eps is None else eps,
            centered=False,
            operation="rms_norm",
        )
        if out is not None:  # the kernels take float32 only, whose machine epsilon eps=None means
            return out
    if (
        validated
        and isinstance(input, torch.Tensor)
        and input.is_floating_point()
        and _same_kind(weight, input)
        and input.shape[input.dim() - len(normalized_shape) :] == normalized_shape
    ):
        if eps is None:
            eps = torch.finfo(compute_dtype(input.dtype)).eps
        return row_norm(input, normalized_shape, weight, None, eps, centered=False, operation="rms_norm")
    if isinstance(input, torch.Tensor) and input.is_complex():
        return _complex_rms_norm(input, normalized_shape, weight, eps)
    check_floating_input(input)
    shape, dims = _trailing_dims("rms_norm", input, normalized_shape)
    cdtype = compute_dtype(input.dtype)
    eps = torch.finfo(cdtype).eps if eps is None else check_eps(eps)
    check_param(weight, "weight", shape, input, f"rms_norm over normalized_shape {list(shape)}")
    return row_norm(input, shape, weight, None, eps, centered=False, operation="rms_norm")


def _complex_rms_norm(input, normalized_shape, weight, eps):
    """complex64/128 as torch.nn computes it (its kernels' definition: the mean of x², not of
    |x|², under the square root); the checks are normlab's."""
    shape, _ = _trailing_dims("rms_norm", input, normalized_shape)
    eps = None if eps is None else check_eps(eps)
    if weight is not None and tuple(weight.shape) != shape:
        raise InputError(
            f"weight has shape {tuple(weight.shape)} but rms_norm over normalized_shape {list(shape)} "
            f"needs shape {shape} (input shape {tuple(input.shape)})"
        )
    return TF.rms_norm(input, list(shape), weight, eps)
