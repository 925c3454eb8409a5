"""group_norm, layer_norm and rms_norm: statistics from each sample alone, never running.

Argument-compatible with ``torch.nn.functional``. They differ only in the dims reduced:
GroupNorm splits C into (G, C//G) — a view for every memory layout, so channels_last
stays channels_last — and reduces (C//G, \\*spatial); LayerNorm and RMSNorm reduce the
trailing ``normalized_shape``.
"""

from __future__ import annotations

import torch

from ..core import channel_norm, check_positive_int, normalize_shape_arg, row_norm
from ..core.call_checks import check_channel_args, check_row_args
from ..core.checks import InputError
from ..core.types import ShapeLike
from .fused_args import NO_ACTIVATION, ActivationArgs, activation_args

__all__ = ["group_norm", "group_norm_act", "layer_norm", "rms_norm"]


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

    Args:
        input: (N, C, \*spatial), C divisible by ``num_groups``.
        num_groups: G, the number of groups.
        weight: γ, shape (C,), or None. Default None.
        bias: β, shape (C,), or None. Default None.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.
        mask: keyword-only; a bool tensor, True where a position is valid, shaped like the
            input without its channel dim ((N, L) for (N, C, L)) or broadcastable to it;
            each (sample, group) is then normalized over its valid positions, and the output
            and the input gradient are 0 at padded ones (a sample with no valid position is
            all 0; ``docs/sequences.md``).

    Returns:
        The normalized tensor: the input's shape, dtype and memory format.

    Raises:
        ValueError: an input with fewer than 2 dims, a ``num_groups`` that is not a positive divisor of C,
            parameters of the wrong shape, dtype or device, a bad ``eps``, or a malformed
            ``mask`` (``docs/conventions.md#errors``).
        TypeError: a non-tensor input or a non-floating dtype.

    Examples:
        >>> y = nl.functional.group_norm(torch.randn(8, 64, 7, 7), 32)
    """
    return _group_norm(input, num_groups, weight, bias, eps, mask)


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
    """``activation(group_norm(...))`` in one pass.

    Args:
        input, num_groups, weight, bias, eps: as for :func:`group_norm`.
        activation, activation_param, prelu_weight, inplace, mask: keyword-only, as for
            :func:`batch_norm_act`.

    Returns:
        The output, the input's shape and dtype. (``input`` itself with ``inplace=True``).

    Raises:
        ValueError: the errors of :func:`group_norm`; an unknown activation, or
            ``inplace=True`` with one that cannot be inverted.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    act = activation_args(input, activation, activation_param, prelu_weight, inplace)
    return _group_norm(input, num_groups, weight, bias, eps, mask, "group_norm_act", act)


def _group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor | None,
    fn: str = "group_norm",
    act: ActivationArgs = NO_ACTIVATION,
) -> torch.Tensor:
    """group_norm, group_norm_act (and norm_act's "group"): check, then the channel family's call."""
    check_positive_int(num_groups, "num_groups")
    if isinstance(input, torch.Tensor) and input.dim() < 2:
        raise InputError(
            f"{fn} expects input of shape (N, C, *spatial), got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    eps, mask = check_channel_args(fn, input, weight, bias, eps, num_groups, True, None, act["prelu_weight"], mask)
    return channel_norm(input, weight, bias, groups=num_groups, eps=eps, mask=mask, operation=fn, checked=True, **act)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dims of each sample.

    Args:
        input: (\*, \*normalized_shape).
        normalized_shape: an int or a sequence of ints, the trailing dims to normalize over.
        weight: γ, shape ``normalized_shape`` (elementwise affine), or None. Default None.
        bias: β, shape ``normalized_shape``, or None. Default None.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.

    Returns:
        The normalized tensor, the input's shape and dtype.

    Raises:
        ValueError: trailing dims that are not ``normalized_shape``, parameters of the
            wrong shape, dtype or device, or a bad ``eps``.
        TypeError: a non-tensor input or a non-floating dtype.

    Examples:
        >>> y = nl.functional.layer_norm(torch.randn(4, 197, 768), (768,))
    """
    shape = normalize_shape_arg(normalized_shape)
    eps = check_row_args("layer_norm", input, shape, weight, bias, eps)
    return row_norm(input, shape, weight, bias, eps, operation="layer_norm", checked=True)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    r"""Root-mean-square normalization: y = x / √(mean(x²) + ε) · weight, no mean subtracted.

    Args:
        input: (\*, \*normalized_shape).
        normalized_shape: an int or a sequence of ints, the trailing dims to normalize over.
        weight: the gain, shape ``normalized_shape``, or None. Default None.
        eps: added to the mean square; None uses the machine epsilon of the computation
            dtype, as torch.nn does: ``torch.finfo(torch.float32).eps`` for
            float16/bfloat16/float32 input, float64's for float64. Default None.

    Returns:
        The normalized tensor, the input's shape and dtype.

    Raises:
        ValueError: trailing dims that are not ``normalized_shape``, a weight of the wrong
            shape, dtype or device, or a bad ``eps``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    shape = normalize_shape_arg(normalized_shape)
    eps = check_row_args("rms_norm", input, shape, weight, None, eps, centered=False)
    return row_norm(input, shape, weight, None, eps, centered=False, operation="rms_norm", checked=True)
