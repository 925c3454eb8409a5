"""Masked channel norms on the kernels: BatchNorm, InstanceNorm and GroupNorm over the valid
positions of a mask, with a fused activation (masked.cpp), for plain float32 CPU tensors in a
layout the kernels read — the path rule's "kernels, masked" row.

The same map as the composed path (:mod:`normlab.core.masked`): statistics over the valid
positions, 0 at the padded ones in the output and in the input's gradient, running estimates
merged from the valid count (:func:`normlab.core.composed.update_masked`). The kernels compute
the statistics in double and the closed-form backward in two passes; an ``autograd.Function``
binds them. Second derivatives differentiate the composed reference, as the unmasked kernels'
do (:mod:`.double_backward`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import torch

from ...activation import ActivationArgs, activation_for_code
from ...composed import masked_channel_norm as composed_masked_channel_norm
from ...composed import update_masked
from . import build

if TYPE_CHECKING:
    from ...running import RunningStats
    from .build import KernelsModule

__all__ = ["masked_channel_norm"]


class _MaskedChannelNorm(torch.autograd.Function):
    """y = mask ? act(γ·x̂ + β) : 0 with x̂ over the valid positions (or given statistics).
    Returns y and the batch's (mean, var, count) per group, which carry no gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        prelu: torch.Tensor | None,
        mask: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        groups: int,
        eps: float,
        code: int,
        param: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        y, shift, offset, rstd, mean, var, count = cast("KernelsModule", build.module).masked_channel_forward(
            x, mask, weight, bias, running_mean, running_var, prelu, groups, eps, code, param
        )
        ctx.groups, ctx.eps, ctx.code, ctx.param = groups, eps, code, param
        ctx.given = running_mean is not None
        ctx.save_for_backward(x, mask, weight, bias, prelu, shift, offset, rstd, count, running_mean, running_var)
        if mean is not None:  # None with given statistics
            ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor, _mean: torch.Tensor | None, _var: torch.Tensor | None, _count: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, mask, weight, bias, prelu, shift, offset, rstd, count, running_mean, running_var = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: the composed reference carries a graph
            dx, dw, db, dp = _differentiable_backward(ctx, dy, x, weight, bias, prelu, mask, running_mean, running_var)
        else:
            if count is None:  # given statistics: no count
                count = shift.new_empty(0)
            dx, dw, db, dp = cast("KernelsModule", build.module).masked_channel_backward(
                dy, x, mask, weight, bias, prelu, shift, offset, rstd, count, ctx.groups, ctx.given, ctx.code, ctx.param
            )
            dw = dw.to(weight.dtype) if weight is not None and needs[1] else None
            db = db.to(bias.dtype) if bias is not None and needs[2] else None
            dp = dp.sum_to_size(prelu.shape).to(prelu.dtype) if prelu is not None and needs[3] else None
        return dx if needs[0] else None, dw, db, dp, None, None, None, None, None, None, None


def _differentiable_backward(
    ctx: Any,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu: torch.Tensor | None,
    mask: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    operands = (x, weight, bias, prelu)
    needs = ctx.needs_input_grad[:4]
    act = (activation_for_code(ctx.code).name, ctx.param, prelu)
    # given statistics: composed reads only the estimates, which a namespace carries
    running = (
        None
        if not ctx.given
        else cast("RunningStats", SimpleNamespace(running_mean=running_mean, running_var=running_var))
    )
    with torch.enable_grad():
        y = composed_masked_channel_norm(
            x, weight, bias, mask, ctx.groups, ctx.eps, not ctx.given, running, act, reference=True
        )
        wanted = [t for t, need in zip(operands, needs) if need and t is not None]
        found = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(found) if need and t is not None else None for t, need in zip(operands, needs))


def masked_channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    groups: int,
    eps: float,
    batch_stats: bool,
    running: RunningStats | None,
    act: ActivationArgs,
    code: int,
) -> torch.Tensor:
    """act(norm(x)) over the valid positions of ``mask`` (checked, (N, *spatial), possibly
    broadcast); ``act`` is (name, param, prelu_weight) and ``code`` its kernel code. With
    ``batch_stats`` the running estimates of ``running`` (if any) are updated from the valid
    count; otherwise its estimates normalize."""
    _, param, prelu = act
    given = not batch_stats
    estimates = cast("RunningStats", running)  # read only where given: the checks required them
    rm = estimates.running_mean if given else None
    rv = estimates.running_var if given else None
    out = _MaskedChannelNorm.apply(x, weight, bias, prelu, mask, rm, rv, groups, eps, code, param)  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
    # (mean, var, count are None with given statistics, and read only with batch statistics)
    y, mean, var, count = cast("tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]", out)
    if batch_stats and running is not None and running.running_mean is not None:
        dtype = x.dtype
        if groups < 0:  # one group per channel, every one with the same count
            valid = int(count[0])  # on the CPU: no device sync
            # a batch with fewer than 2 valid values is not merged (as update_masked decides);
            # the kernels' update in C++, where the policy's torch ops (a dozen small ops,
            # which cost more than the masked kernel itself at (32, 64, 256)) are not needed
            if valid >= 2 and not cast("KernelsModule", build.module).update_running(running, mean, var, valid):
                running.update(mean.to(dtype), var.to(dtype), valid)
        else:  # InstanceNorm: one group per (sample, channel)
            n = x.shape[0]
            update_masked(
                running,
                mean.view(n, -1).to(dtype),
                var.view(n, -1).to(dtype),
                count.view(n, -1)[:, 0].to(dtype),
                groups,
            )
    return y
