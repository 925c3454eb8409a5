"""The checks of one call of a norm family, written once.

A functional runs them before it calls its family's entry; a module, whose constructor
checked what it fixes, does not — its call goes to the entry unchecked, and the entry runs
them where the kernels' eager entry refused the call (a parameter that does not fit the
input, eps = 0 or one value per group in training) and on every other path. Either way the
same function raises the same error: the C++ kernels never write a message of their own.

Each check opens with the common case in one expression and returns, so that a masked
call's checks cost one Python call; the messages are built only when something is wrong.
"""

from __future__ import annotations

import math
from typing import cast, overload

import torch

from .checks import InputError, check_eps, check_floating_input, check_momentum, check_param
from .masked import check_mask
from .moments import compute_dtype
from .running import RunningStats, check_nonfinite_policy

__all__ = [
    "check_channel_args",
    "check_channel_call",
    "check_inplace_input",
    "check_row_args",
    "check_update_args",
    "nearby_divisors",
    "too_few_values",
]


def _fits(t: torch.Tensor, x: torch.Tensor, numel: int) -> bool:
    """No check needed: a tensor of ``numel`` values of x's dtype and device."""
    return type(t) in _TENSORS and t.dtype == x.dtype and t.device == x.device and t.numel() == numel


_TENSORS = (torch.Tensor, torch.nn.Parameter)


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
    input = check_floating_input(input)
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


def check_channel_args(
    fn: str,
    x: object,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: object,
    groups: int,
    batch_stats: bool,
    running: RunningStats | None,
    prelu_weight: torch.Tensor | None = None,
    mask: object = None,
) -> tuple[float, torch.Tensor | None]:
    """Everything a channel-norm call depends on besides what a module's constructor fixed:
    returns ``(eps, mask)``, the mask checked and expanded to (N, *spatial)
    (:func:`normlab.core.masked.check_mask`).

    ``groups`` -1 is BatchNorm (per channel); G divides the channels (InstanceNorm: G = C).
    With ``batch_stats`` the batch must give each statistic two or more values (unless it is
    empty, or masked: a mask's count is only known on the device) and BatchNorm's eps must be
    > 0, as torch.nn's (GroupNorm and InstanceNorm take 0, as torch's do); without it the
    running estimates must be there.
    """
    mean = None if running is None else running.running_mean
    var = None if running is None else running.running_var
    if (
        (type(x) is torch.Tensor or type(x) is torch.nn.Parameter)  # _TENSORS, spelt so the checker narrows x
        and x.is_floating_point()
        and x.dim() >= 2
        and type(eps) is float
        and 0.0 <= eps < math.inf
        and (eps > 0 or groups >= 0)
    ):
        # the common case, in one pass and no further call; anything else is sorted out below
        dtype, device, channels = x.dtype, x.device, x.shape[1]
        for t in (weight, bias, mean, var):
            if t is not None and not (
                type(t) in _TENSORS and t.dtype == dtype and t.device == device and t.numel() == channels
            ):
                break
        else:
            if (
                (groups < 0 or (groups > 0 and channels % groups == 0))
                and (mean is None) == (var is None)
                and (prelu_weight is None or _fits(prelu_weight, x, 1) or _fits(prelu_weight, x, channels))
                and (mean is not None or batch_stats)
                and (not batch_stats or mask is not None or x.numel() == 0 or _values_per_group(x, groups) > 1)
                and (
                    mask is None or (type(mask) is torch.Tensor and mask.dtype == torch.bool and mask.device == device)
                )
            ):
                if mask is None:
                    return eps, None
                try:  # broadcasting to (N, *spatial) is the shape test; check_mask says what is wrong
                    # expand_mask's rule, written out: no extra frame on a masked call's path
                    return eps, (mask if mask.is_contiguous() else mask.contiguous()).expand(
                        (x.shape[0],) + x.shape[2:]
                    )
                except RuntimeError:
                    return eps, check_mask(mask, x, fn)
    return _raise_channel_errors(fn, x, weight, bias, eps, groups, batch_stats, mean, var, prelu_weight, mask)


def _values_per_group(x: torch.Tensor, groups: int) -> int:
    per_channel = x.numel() // (x.shape[0] * x.shape[1]) if x.shape[0] * x.shape[1] else 0
    return x.shape[0] * per_channel if groups < 0 else (x.shape[1] // groups) * per_channel


def _raise_channel_errors(
    fn: str,
    x: object,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: object,
    groups: int,
    batch_stats: bool,
    mean: torch.Tensor | None,
    var: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    mask: object,
) -> tuple[float, torch.Tensor | None]:
    """check_channel_args past its common case: raise what is wrong, or return what is right
    (a NumPy float eps, float32 parameters with a half input, ...)."""
    eps = check_channel_call(fn, x, weight, bias, mean, var, eps)
    x = cast(torch.Tensor, x)  # check_channel_call raised unless it is a floating tensor
    channels = x.shape[1]
    if prelu_weight is not None:
        check_param(prelu_weight, "prelu_weight", (prelu_weight.numel(),), x, f"{fn}'s PReLU slopes")
        if prelu_weight.numel() not in (1, channels):
            raise InputError(
                f"prelu_weight has {prelu_weight.numel()} slopes but {fn} over {channels} channels needs 1 or {channels}"
            )
    if channels and (groups == 0 or (groups > 0 and channels % groups != 0)):
        raise InputError(
            f"{fn}: num_groups={groups} must divide the {channels} channels of input dim 1 (input "
            f"shape {tuple(x.shape)}); divisors of {channels} near it: {nearby_divisors(channels, groups)}"
        )
    if not batch_stats:
        if mean is None:
            raise InputError(
                f"{fn} with training=False normalizes with running_mean and running_var, but they are "
                "None; pass them, or training=True to use batch statistics"
            )
    else:
        if eps == 0 and groups < 0:
            raise InputError(
                f"{fn}: eps must be > 0 in training, got 0.0 (a constant channel would divide by "
                f"zero; torch.nn refuses it too). eps = 0 is accepted for normalizing with given "
                f"statistics (eval)"
            )
        if mask is None and x.numel() > 0 and _values_per_group(x, groups) <= 1:
            if groups < 0:
                raise too_few_values(x)
            if fn == "instance_norm":
                raise InputError(
                    f"Expected more than 1 spatial element when training, got input size "
                    f"{list(x.shape)}: each (sample, channel) plane needs 2 or more values"
                )
            raise InputError(
                f"{fn}: each of the {groups} groups holds a single value (input "
                f"shape {tuple(x.shape)}), so its variance is 0 and the output would be "
                f"the bias whatever the input; use fewer groups or a spatial extent > 1"
            )
    return eps, (None if mask is None else check_mask(mask, x, fn))


@overload
def check_row_args(
    fn: str,
    x: object,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    centered: bool = ...,
    residual: object = ...,
) -> float: ...


@overload
def check_row_args(
    fn: str,
    x: object,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: object,
    *,
    centered: bool = ...,
    residual: object = ...,
) -> float | None: ...


def check_row_args(
    fn: str,
    x: object,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: object,
    *,
    centered: bool = True,
    residual: object = None,
) -> float | None:
    """A floating input whose trailing dims are ``normalized_shape``, γ/β of that shape and
    of the input's dtype and device, a residual (if any) that can be added to it, and a valid
    eps, returned as a float — ``None`` (RMSNorm only) is the machine epsilon of the
    computation dtype. A complex input is RMSNorm's alone, as torch.nn's: only the shapes
    are checked, and eps=None stays torch's default."""
    if isinstance(x, torch.Tensor) and x.is_complex() and not centered and residual is None:
        _check_trailing(fn, x, normalized_shape)
        if weight is not None and tuple(weight.shape) != tuple(normalized_shape):
            raise InputError(
                f"weight has shape {tuple(weight.shape)} but {fn} over normalized_shape {list(normalized_shape)} "
                f"needs shape {tuple(normalized_shape)} (input shape {tuple(x.shape)})"
            )
        return None if eps is None else check_eps(eps)
    x = check_floating_input(x)
    if residual is not None:
        residual = check_floating_input(residual, "residual")
        if residual.device != x.device:
            raise InputError(f"{fn}: residual is on {residual.device} but x on {x.device}; move one of them")
        # x + residual keeps x's shape: each of the residual's dims, aligned from the right, is
        # 1 or x's (torch.broadcast_shapes answers the same, but its first call imports torch's
        # symbolic-shape machinery: seconds, on a user's first residual norm)
        if residual.dim() > x.dim() or any(r not in (1, n) for r, n in zip(residual.shape[::-1], x.shape[::-1])):
            raise InputError(
                f"{fn}: residual of shape {tuple(residual.shape)} must have x's shape {tuple(x.shape)} "
                f"(or broadcast to it), since the sum replaces x as the residual stream"
            )
    _check_trailing(fn, x, normalized_shape)
    if eps is None and not centered:
        dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        eps = torch.finfo(compute_dtype(dtype)).eps
    eps = check_eps(eps)
    what = f"{fn} over normalized_shape {list(normalized_shape)}"
    check_param(weight, "weight", tuple(normalized_shape), x, what)
    check_param(bias, "bias", tuple(normalized_shape), x, what)
    return eps


def _check_trailing(fn: str, x: torch.Tensor, normalized_shape: tuple[int, ...]) -> None:
    k = len(normalized_shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k :]) != tuple(normalized_shape):
        raise InputError(
            f"{fn}: normalized_shape={list(normalized_shape)} must equal the trailing dims of the "
            f"input, got input shape {tuple(x.shape)} (expected (*, {', '.join(map(str, normalized_shape))}))"
        )


def check_update_args(momentum: object, num_batches_tracked: torch.Tensor | None, on_nonfinite: object) -> float | None:
    """The arguments of a running-statistics update: ``momentum`` (None, the cumulative
    average, only with the batch counter) and the non-finite policy."""
    momentum = check_momentum(momentum, allow_none=num_batches_tracked is not None)
    check_nonfinite_policy(on_nonfinite)
    return momentum


def too_few_values(input: torch.Tensor) -> InputError:
    """The error for training with batch statistics on at most one value per channel, whose
    variance is 0."""
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


def nearby_divisors(n: int, target: int) -> list[int]:
    """The three divisors of n closest to ``target`` (for a message about groups)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divisors, key=lambda d: (abs(d - target), d))[:3]
