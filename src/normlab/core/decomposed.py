"""Norms with batch statistics as plain differentiable torch ops, for the compiler to fuse.

Under ``torch.compile`` an opaque operator is one kernel call that inductor cannot look
into: the activation after a training BatchNorm, its running-estimate update and, in
eval, the pointwise ops around a LayerNorm, RMSNorm or GroupNorm each cost another pass
over the activations. The path rule (:mod:`normlab.core.paths`, composed, ``"decomposed"``)
hands those calls here instead; autograd differentiates the ops and inductor fuses them
with their neighbours, forward and backward, as it does torch.nn's decomposed norms.

The accuracy is normlab's, not a textbook formula's: the statistics are *shifted moments*.
Each group's first value s (detached: the output does not depend on which s is taken) is
subtracted first, d = x − s, which is exact wherever the group's values lie within a factor
2 of s (Sterbenz) — so d keeps every digit of the spread on large-mean data (1e4 ± 0.01)
where x − mean(x) would subtract a mean rounded to float32 (off by up to half an ulp of 1e4,
5 % of that spread). Mean and variance of d then come from ``torch.var_mean``, which
inductor lowers to a one-pass Welford reduction; x̂ = (d − mean(d))·rsqrt(var + ε).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .activation import apply_activation
from .composed import _affine_views, _torch_layout
from .moments import reduced_count
from .running import RunningStats

__all__ = ["ShiftedMoments", "channel_norm", "row_norm", "shifted_moments"]


class ShiftedMoments(NamedTuple):
    """A batch's statistics as the compiler sees them: the group's mean is
    ``shift + offset`` and its centred values ``d − offset``.

    Attributes:
        d: x − shift, x's shape.
        shift: each group's first value, detached (size 1 in the reduced dims).
        offset: mean(d).
        var: the biased variance (NaN where it overflowed).
    """

    d: torch.Tensor
    shift: torch.Tensor
    offset: torch.Tensor
    var: torch.Tensor


def shifted_moments(x: torch.Tensor, dims: Sequence[int]) -> ShiftedMoments:
    """Mean and biased variance of ``x`` over ``dims``, shifted by each group's first value.

    An infinite variance (an overflow) becomes NaN, as on the other paths, never
    rsqrt(inf) = 0 (which would turn the group into β).

    Args:
        x: the input.
        dims: the dims each statistic is over.

    Returns:
        The :class:`ShiftedMoments`; all but ``d`` with size 1 in ``dims``.
    """
    shift = x.detach()
    for dim in dims:
        shift = shift.narrow(dim, 0, 1)  # a view: one value per group, (…, 1, …)
    d = x - shift
    var, offset = torch.var_mean(d, tuple(dims), correction=0, keepdim=True)
    # `var < inf` rather than isinf: a comparison inductor vectorizes (isinf runs per element)
    return ShiftedMoments(d, shift, offset, torch.where(var < torch.inf, var, torch.nan))


def _stored(t: torch.Tensor) -> torch.Tensor:
    """t itself, marked for inductor to compute into a buffer of its own rather than inline
    into every consumer: an ``as_strided`` view needs its base stored (torch's group_norm
    decomposition uses the same means). In eager, a view of t."""
    t = t.contiguous()
    return t.as_strided(t.shape, t.stride())


class _ShiftedNormalize(torch.autograd.Function):
    """y = γ·(d − offset)·r + β on shifted moments, with the closed-form backward of
    :mod:`normlab.core.normalize` written in torch ops: the compiler traces both and fuses
    them, and the backward reduces Σdy and Σdy·x̂ once (differentiating through var_mean
    would make inductor sum five products per element). Returns y and the batch's mean and
    biased variance (for the running update; no gradient)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        dims: tuple[int, ...],
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        moments = shifted_moments(x, dims)
        rstd = torch.rsqrt(moments.var + eps)
        # y = d·a + c with a = γ·r and c = β − offset·a per (sample, channel), as the kernels
        # compute it: d = x − shift is exact, and offset is small beside it, so nothing cancels.
        # Written (d − offset)·r·γ + β, inductor computed r = 1/√(var/n + ε) and the products
        # inside the output loop, once per vector of 8 values (compiled GroupNorm eval 1.2x
        # torch.nn's); a and c stored once per (sample, channel) leave it a subtract, a
        # multiply-add and the activation per vector, as torch's own group_norm decomposition does.
        scale = rstd if weight is None else rstd * weight
        offset = -moments.offset * scale
        if bias is not None:
            offset = offset + bias
        y = moments.d * _stored(scale) + _stored(offset)
        mean = moments.shift + moments.offset
        ctx.save_for_backward(x, weight, moments.shift, moments.offset, rstd)
        ctx.dims = dims
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.mark_non_differentiable(mean, moments.var)
        return y, mean, moments.var

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor, _mean: torch.Tensor, _var: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight, shift, offset, rstd = ctx.saved_tensors
        dims = ctx.dims
        # not x − mean: the float32 mean is off by up to half its ulp, 5 % of σ at 1e4 ± 0.01
        xhat = ((x - shift) - offset) * rstd
        n = reduced_count(x.shape, dims)
        if weight is None or all(weight.shape[d] == 1 for d in dims):
            # γ constant inside each group (BatchNorm): the sums dγ and dβ need are dx's
            sum_dy = dy.sum(dims, keepdim=True)
            sum_dy_xhat = (dy * xhat).sum(dims, keepdim=True)
            scale = rstd if weight is None else rstd * weight
            dx = scale * (dy - sum_dy / n - xhat * (sum_dy_xhat / n))
            dw = None if weight is None else sum_dy_xhat.sum_to_size(weight.shape)
            db = None if ctx.bias_shape is None else sum_dy.sum_to_size(ctx.bias_shape)
        else:  # γ per channel inside a group (GroupNorm)
            g = dy * weight
            dx = rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
            dw = (dy * xhat).sum_to_size(weight.shape)
            db = None if ctx.bias_shape is None else dy.sum_to_size(ctx.bias_shape)
        return dx, dw, db, None, None


def channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float,
    running: RunningStats | None,
    act: tuple[str, float, torch.Tensor | None],
) -> torch.Tensor:
    """act(norm(x)) with this batch's statistics: BatchNorm (``groups=-1``, per channel over
    (N, *spatial)) or GroupNorm (``groups=G``; InstanceNorm is G = C, per (sample, group));
    the running estimates, where ``running`` holds them, updated with torch ops (no host
    sync) under the policy's conventions.

    Args:
        x: the (N, C, *spatial) input, float32.
        weight: γ, shape (C,), or None.
        bias: β, shape (C,), or None.
        groups: -1 (BatchNorm) or G.
        eps: added to the variance.
        running: the running-statistics policy, or None.
        act: the fused activation as ``(name, param, prelu_weight)``.

    Returns:
        The output, x's shape, in torch.nn's layout for x's.
    """
    x = _torch_layout(x)
    target, dims, w, b = _affine_views(x, weight, bias, groups)  # (N, C, *) or (N, G, C//G, *)
    y, mean, var = _ShiftedNormalize.apply(  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
        target, w, b, dims, eps
    )
    y = apply_activation(y.flatten(1, 2) if groups > 0 else y, *act)
    if running is not None and running.running_mean is not None:
        # (1, C, 1, …) → (C,) for BatchNorm; (N, C, 1, …) → (N, C) per instance for InstanceNorm
        mean, var = (mean.flatten(), var.flatten()) if groups < 0 else (mean.flatten(1), var.flatten(1))
        running.update(mean, var, reduced_count(target.shape, dims))
    return y


def row_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    centered: bool,
) -> torch.Tensor:
    """LayerNorm (``centered``: shifted moments, see the module) or RMSNorm
    (x·rsqrt(mean(x²) + ε), nothing subtracted, so nothing to lose) over the trailing
    ``normalized_shape`` dims; contiguous output for LayerNorm, as torch.nn's.

    Args:
        x: the input, (..., *normalized_shape), float32.
        normalized_shape: the trailing dims normalized over.
        weight: γ, of ``normalized_shape``, or None.
        bias: β, of ``normalized_shape``, or None.
        eps: added to the variance (or the mean square).
        centered: LayerNorm (False: RMSNorm).

    Returns:
        The output, x's shape.
    """
    if centered and not x.is_contiguous():
        x = x.contiguous()  # as torch's layer_norm: elementwise ops would keep a permuted layout
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    if centered:
        moments = shifted_moments(x, dims)
        y = (moments.d - moments.offset) * torch.rsqrt(moments.var + eps)
    else:
        y = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
