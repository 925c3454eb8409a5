"""The in-place (output-only) mode on the kernels: In-Place Activated BatchNorm/GroupNorm.

The output overwrites the input and is all that backward keeps: it recovers z = act⁻¹(y) and
x̂ = (z − β)/γ from it (see :mod:`normlab.core.activation`) — except for channels with |γ|
below the guard, whose input is kept and whose gradients are redone exactly. Writing into its
input is what an operator returning fresh tensors cannot express, so the mode is an
``autograd.Function`` over the kernels' forward and backward (entries.cpp's operator bodies,
which handle the layout); the path rule sends it here for plain float32 CPU tensors in a
layout the kernels read, and to the composed ops (:func:`normlab.core.activation.inplace_abn`)
otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ...activation import (
    ACTIVATIONS,
    GAMMA_GUARD,
    RECOVERY_TOLERANCE,
    SECOND_DERIVATIVES,
    activation_for_code,
    rewrite_kept_channels,
    unrecoverable_channels,
)
from . import build

if TYPE_CHECKING:
    from ...calls import ChannelCall
    from .build import KernelsModule

__all__ = ["channel_norm_inplace"]

_ELU = ACTIVATIONS["elu"].code
# unrecoverable_channels's float32 constants, for the kernels' kept_channels
_FOUR_EPS = 4 * torch.finfo(torch.float32).eps
_TOLERANCE = RECOVERY_TOLERANCE[torch.float32]


class _ChannelNormInPlace(torch.autograd.Function):
    """Overwrites ``x`` with y = act(γ·x̂ + β) (batch statistics) and keeps only y. Returns y
    alone (autograd allows an in-place Function on a view only then); the batch statistics go
    into ``stats_out``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        groups: int,
        eps: float,
        act: int,
        param: float,
        stats_out: list[torch.Tensor],
    ) -> torch.Tensor:
        kernels = cast("KernelsModule", build.module)
        if act == _ELU or x.dtype != torch.float32:  # ELU's test reads the data
            small = unrecoverable_channels(x, weight, bias, groups, activation_for_code(act).name, param)
        else:  # the same test on γ and β alone, in one call
            small = kernels.kept_channels(weight, bias, x.shape[1], _FOUR_EPS, _TOLERANCE, GAMMA_GUARD)
        x_small = x.index_select(1, small) if small is not None else None  # before it is overwritten
        _, shift, offset, rstd, mean, var = kernels.channel_forward(  # the kernels' path
            x, weight, bias, None, None, None, groups, eps, act, param, True
        )
        ctx.mark_dirty(x)
        stats_out.extend((mean, var))
        ctx.groups, ctx.act, ctx.param, ctx.small = groups, act, param, small
        ctx.stats = (shift, offset, rstd)
        ctx.save_for_backward(x, weight, bias, x_small)
        return x

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVES)
        y, weight, bias, x_small = ctx.saved_tensors
        shift, offset, rstd = ctx.stats
        dx, dgamma, dbeta, _ = cast("KernelsModule", build.module).channel_backward(
            dy, y, weight, bias, None, shift, offset, rstd, ctx.groups, False, True, ctx.act, ctx.param
        )
        if ctx.small is not None:  # the channels the kernel could not recover x̂ for
            rewrite_kept_channels(ctx, (dx, dgamma, dbeta), ctx.stats, y, dy, weight, bias, x_small)
        dw = dgamma.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = dbeta.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None


def channel_norm_inplace(call: ChannelCall, code: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var) of a channel-family call in the in-place mode, y written over its
    input; ``code`` is the activation's kernel code. The statistics float64 per group."""
    x, weight, bias = call.x, call.weight, call.bias
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    stats: list[torch.Tensor] = []
    out: torch.Tensor = _ChannelNormInPlace.apply(x, weight, bias, call.groups, call.eps, code, call.act[1], stats)  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
    if not recorded:
        # The kernel wrote through a raw pointer; without a graph mark_dirty did nothing, so
        # bump the version ourselves: a tensor some other op saved must not change silently.
        torch.autograd.graph.increment_version(x)
    return out, stats[0], stats[1]
