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

import torch

from ...activation import activation_for_code
from ...composed import masked_channel_norm as composed_masked_channel_norm
from ...composed import update_masked
from . import build

__all__ = ["masked_channel_norm"]


class _MaskedChannelNorm(torch.autograd.Function):
    """y = mask ? act(γ·x̂ + β) : 0 with x̂ over the valid positions (or given statistics).
    Returns y and the batch's (mean, var, count) per group, which carry no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, prelu, mask, running_mean, running_var, groups, eps, code, param):
        y, shift, offset, rstd, mean, var, count = build.module.masked_channel_forward(
            x, mask, weight, bias, running_mean, running_var, prelu, groups, eps, code, param
        )
        ctx.groups, ctx.eps, ctx.code, ctx.param = groups, eps, code, param
        ctx.given = running_mean is not None
        ctx.save_for_backward(x, mask, weight, bias, prelu, shift, offset, rstd, count, running_mean, running_var)
        if mean is not None:  # None with given statistics
            ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _mean, _var, _count):
        x, mask, weight, bias, prelu, shift, offset, rstd, count, running_mean, running_var = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: the composed reference carries a graph
            dx, dw, db, dp = _differentiable_backward(ctx, dy, x, weight, bias, prelu, mask, running_mean, running_var)
        else:
            if count is None:  # given statistics: no count
                count = shift.new_empty(0)
            dx, dw, db, dp = build.module.masked_channel_backward(
                dy, x, mask, weight, bias, prelu, shift, offset, rstd, count, ctx.groups, ctx.given, ctx.code, ctx.param
            )
            dw = dw.to(weight.dtype) if weight is not None and needs[1] else None
            db = db.to(bias.dtype) if bias is not None and needs[2] else None
            dp = dp.sum_to_size(prelu.shape).to(prelu.dtype) if prelu is not None and needs[3] else None
        return dx if needs[0] else None, dw, db, dp, None, None, None, None, None, None, None


def _differentiable_backward(ctx, dy, x, weight, bias, prelu, mask, running_mean, running_var):
    operands = (x, weight, bias, prelu)
    needs = ctx.needs_input_grad[:4]
    act = (activation_for_code(ctx.code).name, ctx.param, prelu)
    running = None if not ctx.given else SimpleNamespace(running_mean=running_mean, running_var=running_var)
    with torch.enable_grad():
        y = composed_masked_channel_norm(
            x, weight, bias, mask, ctx.groups, ctx.eps, not ctx.given, running, act, reference=True
        )
        wanted = [t for t, need in zip(operands, needs) if need and t is not None]
        found = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(found) if need and t is not None else None for t, need in zip(operands, needs))


def masked_channel_norm(x, weight, bias, mask, groups, eps, batch_stats, running, act, code):
    """act(norm(x)) over the valid positions of ``mask`` (checked, (N, *spatial), possibly
    broadcast); ``act`` is (name, param, prelu_weight) and ``code`` its kernel code. With
    ``batch_stats`` the running estimates of ``running`` (if any) are updated from the valid
    count; otherwise its estimates normalize."""
    _, param, prelu = act
    given = not batch_stats
    rm = running.running_mean if given else None
    rv = running.running_var if given else None
    y, mean, var, count = _MaskedChannelNorm.apply(x, weight, bias, prelu, mask, rm, rv, groups, eps, code, param)
    if batch_stats and running is not None and running.running_mean is not None:
        dtype = x.dtype
        if groups < 0:  # one group per channel, every one with the same count
            valid = int(count[0])  # on the CPU: no device sync
            # a batch with fewer than 2 valid values is not merged (as update_masked decides);
            # the kernels' update in C++, where the policy's torch ops (a dozen small ops,
            # which cost more than the masked kernel itself at (32, 64, 256)) are not needed
            if valid >= 2 and not build.module.update_running(running, mean, var, valid):
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
