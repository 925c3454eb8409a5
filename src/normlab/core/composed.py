"""The composed path: normlab's own math (:mod:`normlab.core.normalize`,
:mod:`normlab.core.masked`) written out in torch ops — any dtype and device, normlab's
accuracy on large-mean data, the closed-form backward, and a mask on any dtype and device
(the masked kernels take float32 CPU calls).

The families' entries (:mod:`normlab.core.channel`, :mod:`normlab.core.row`) call these after
the path rule chose "composed", with the call checked and whole (a
:class:`~normlab.core.calls.ChannelCall` or :class:`~normlab.core.calls.RowCall`; LayerNorm2d's
four arguments); the rule's ``how`` selects ``"eager"``
(the autograd Functions with the closed-form backward), ``"reference"`` (masked calls under
export or ``torch.func``, and the masked kernels' second derivatives: the same forward in plain
differentiable ops) or ``"pointwise"``
(compiled BatchNorm with given statistics). Running estimates are updated by :class:`normlab.core.running.RunningStats`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast, overload

import torch

from .activation import apply_activation, inplace_abn
from .calls import ChannelCall, RowCall
from .masked import _MaskedNormalize, masked_moments, masked_reference
from .moments import COMPUTE_DTYPES, grouped_view
from .normalize import normalize_batch, normalize_given
from .paths import kernel_layout
from .running import RunningStats

__all__ = [
    "channel_norm",
    "channels_first_row_norm",
    "masked_channel_norm",
    "pointwise_given_norm",
    "row_norm",
    "update_masked",
]


@overload
def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor: ...
@overload
def channel_view(t: None, ndim: int) -> None: ...
@overload
def channel_view(t: torch.Tensor | None, ndim: int) -> torch.Tensor | None: ...


def channel_view(t: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """(C,) → (1, C, 1, …, 1), so it broadcasts against an (N, C, *spatial) input.

    Args:
        t: a (C,) tensor, or None.
        ndim: the input's rank.

    Returns:
        The view, or None for None.
    """
    return None if t is None else t.view((1, -1) + (1,) * (ndim - 2))


_affine_views = grouped_view  # the name normlab.core.decomposed imports it by


def _torch_layout(x: torch.Tensor) -> torch.Tensor:
    """x in the layout torch.nn's BatchNorm and GroupNorm give their output: its own where it
    is contiguous or channels_last (what the kernels read too), else a contiguous copy.
    Elementwise ops follow their operands' strides, so an oddly permuted input would hand its
    own to the output (a masked one: whatever the mask's broadcast made of them)."""
    return x if kernel_layout(x) else x.contiguous()


def channel_norm(call: ChannelCall) -> torch.Tensor:
    """act(norm(x)) for the channel family in composed ops (``inplace``: the output written
    over ``x``, only it kept for backward); the running estimates used or updated."""
    x, weight, bias, groups, eps, running = call.x, call.weight, call.bias, call.groups, call.eps, call.running
    act = call.act
    ndim = x.dim()
    if not call.inplace:
        x = _torch_layout(x)
    if not call.batch_stats:
        if TYPE_CHECKING:  # given statistics: the checks required the policy and its estimates
            assert running is not None and running.running_mean is not None and running.running_var is not None
        view = channel_view
        y = normalize_given(
            x,
            view(weight, ndim),
            view(bias, ndim),
            view(running.running_mean, ndim),
            view(running.running_var, ndim),
            (0,) + tuple(range(2, ndim)),
            eps,
        )
        return apply_activation(y, *act)
    if call.inplace:
        y, mean, var = inplace_abn(x, weight, bias, groups, eps, act[0], act[1])
    else:
        target, dims, w, b = grouped_view(x, weight, bias, groups)
        y, stats = normalize_batch(target, w, b, dims, eps)
        y = apply_activation(y.flatten(1, 2) if groups > 0 else y, *act)
        if TYPE_CHECKING:  # centered statistics (RMSNorm's alone have no mean)
            assert stats.mean is not None
        mean, var = stats.mean, stats.var
    if running is not None and running.running_mean is not None and x.numel() > 0:
        # keepdim statistics → (C,) for BatchNorm, (N, C) per instance for InstanceNorm
        mean, var = (mean.flatten(), var.flatten()) if groups < 0 else (mean.flatten(1), var.flatten(1))
        running.update(mean, var, call.running_count())
    return y


def pointwise_given_norm(call: ChannelCall) -> torch.Tensor:
    """act((x − μ)·(γ/√(σ² + ε)) + β) with the call's running estimates (``batch_stats``
    False), in plain differentiable ops for the compiler to fuse.

    The mean is subtracted first: torch's own eval kernel computes x·s + (β − μ·s), whose
    two large terms cancel on large-mean data (7.7e-3 off at 1e4 ± 0.01) where this form is
    as accurate as the kernels. The statistics are constants for autograd; x, γ and β get
    gradients.
    """
    x, weight, bias, running = call.x, call.weight, call.bias, call.running
    ndim = x.dim()
    if TYPE_CHECKING:  # given statistics: the checks required the policy and its estimates
        assert running is not None and running.running_mean is not None and running.running_var is not None
    mean = channel_view(running.running_mean.detach(), ndim)
    scale = torch.rsqrt(running.running_var.detach() + call.eps)
    if weight is not None:
        scale = weight * scale
    y = (x - mean) * channel_view(scale, ndim)
    if bias is not None:
        y = y + channel_view(bias, ndim)
    return apply_activation(y.to(x.dtype), *call.act)


def masked_channel_norm(call: ChannelCall, reference: bool) -> torch.Tensor:
    """The channel family over the valid positions of ``call.mask`` (checked, (N, *spatial));
    0 at padded positions (every fused activation maps 0 to 0). ``reference``: plain
    differentiable ops instead of the closed-form Function (export, torch.func, and the
    kernels' second derivatives)."""
    x, weight, bias, groups, eps = call.x, call.weight, call.bias, call.groups, call.eps
    batch_stats, running, act = call.batch_stats, call.running, call.act
    mask = cast(torch.Tensor, call.mask)  # a masked call: the family entry passes one
    x = _torch_layout(x)
    ndim = x.dim()
    # given statistics are per channel, whatever the grouping
    target, dims, w, b = grouped_view(x, weight, bias, groups if batch_stats else -1)
    m = mask.unsqueeze(1) if target.dim() == ndim else mask.unsqueeze(1).unsqueeze(1)  # (N, 1[, 1], *spatial)
    # statistics are constants to autograd (the closed-form backward accounts for them):
    # taken from a detached x, with no graph to record
    offset: torch.Tensor | None
    var: torch.Tensor | None
    count: torch.Tensor | None
    if batch_stats:
        shift, offset, var, count = masked_moments(target.detach(), m, dims)
        rstd = torch.rsqrt(var + eps)
    else:
        if TYPE_CHECKING:  # given statistics: the checks required the policy and its estimates
            assert running is not None and running.running_mean is not None and running.running_var is not None
        cdtype = COMPUTE_DTYPES.get(x.dtype, x.dtype)
        shift, offset, var, count = channel_view(running.running_mean, ndim).to(cdtype), None, None, None
        rstd = torch.rsqrt(channel_view(running.running_var, ndim).to(cdtype) + eps)
    y: torch.Tensor
    if reference:
        given = {} if batch_stats else {"mean": shift, "rstd": rstd}
        y = masked_reference(target, w, b, m, dims, eps, **given)
    else:
        y = _MaskedNormalize.apply(target, w, b, m, shift, offset, rstd, count, dims, eps, batch_stats, None)  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
    y = y.flatten(1, 2) if groups > 0 and batch_stats else y
    if act[0] != "identity":
        y = apply_activation(y, *act)
    if batch_stats and running is not None and running.running_mean is not None:
        if TYPE_CHECKING:  # batch statistics: masked_moments gave all four
            assert offset is not None and var is not None and count is not None
        update_masked(running, shift + offset, var, count, groups)
    return y


def update_masked(
    running: RunningStats, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, groups: int
) -> None:
    """Merge a masked batch: BatchNorm's statistics over the valid count (a batch with fewer
    than 2 valid values is not merged); InstanceNorm's instances each unbiased with their own
    count, then averaged over those with at least 2 — without a host sync off the CPU."""
    if groups < 0:
        running.update(mean.flatten(), var.flatten(), count.reshape(()), enough=count.reshape(()) >= 2)
        return
    mean, var, count = mean.flatten(1), var.flatten(1), count.flatten()  # (N, C), (N, C), (N,)
    with torch.no_grad():
        enough = (count >= 2).unsqueeze(1)  # (N, 1)
        if running.unbiased:
            var = var * (count / (count - 1).clamp(min=1)).unsqueeze(1)
        instances = enough.sum()
        weights = enough.to(var.dtype) / instances.clamp(min=1)
        zero = torch.zeros((), dtype=var.dtype, device=var.device)
        batch_mean = torch.where(enough, mean * weights, zero).sum(0)
        batch_var = torch.where(enough, var * weights, zero).sum(0)
    running.update(batch_mean, batch_var, 2, enough=instances > 0, unbiased=False)


def row_norm(call: RowCall) -> torch.Tensor:
    """LayerNorm (``centered``) or RMSNorm over the trailing ``normalized_shape`` dims.

    LayerNorm's output is contiguous whatever the input's layout, as torch.nn's (its kernel
    normalizes a contiguous copy) and the kernels' are; RMSNorm's follows the input's, as
    torch.nn's composed ops do (docs/conventions.md, "Output layouts")."""
    x, normalized_shape, weight, bias, centered = call.x, call.normalized_shape, call.weight, call.bias, call.centered
    eps = call.eps
    if TYPE_CHECKING:  # None only for a complex input, which the rule sends to native
        assert eps is not None
    if centered and not x.is_contiguous():
        # one copy, as torch's layer_norm makes; elementwise ops on a permuted input would
        # hand its strides to the output
        x = x.contiguous()
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    lead = (1,) * (x.dim() - len(normalized_shape))
    w = None if weight is None else weight.view(lead + tuple(normalized_shape))
    b = None if bias is None else bias.view(lead + tuple(normalized_shape))
    return normalize_batch(x, w, b, dims, eps, centered=centered, zero_scale_at_inf=not centered)[0]


def channels_first_row_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over dim 1 of (N, C, H, W): statistics over the channels of each position,
    without a permuting copy."""
    return normalize_batch(x, channel_view(weight, 4), channel_view(bias, 4), (1,), eps)[0]
