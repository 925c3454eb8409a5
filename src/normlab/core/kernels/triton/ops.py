"""The Triton kernels as PyTorch operators, their fake (meta) implementations, and their
autograd bindings.

    normlab::triton_channel_norm            BN/IN/GN (+ mask, activation) with batch statistics;
                                            updates BatchNorm's running estimates in the launch
    normlab::triton_channel_norm_given      BatchNorm with given statistics (eval)
    normlab::triton_channel_norm_backward   (dx, dγ, dβ, dPReLU) of either
    normlab::triton_row_norm                LayerNorm / RMSNorm (+ residual add)
    normlab::triton_row_norm_backward       (d_sum, dγ, dβ)

Registered with ``torch.library.triton_op`` (``custom_op`` under the interpreter; see
``_runtime.register_op``). Autograd is an ``autograd.Function`` around the operators rather
than ``register_autograd``, because the training forward mutates the running estimates and
torch allows a registered autograd formula only on functional operators. A second
derivative (``create_graph=True``) differentiates the composed reference on the saved
operands, as the CPU kernels do. The in-place mode overwrites its input, which no functional
operator can express: it is an ``autograd.Function`` calling the kernels directly.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch

from ...activation import (
    GAMMA_GUARD,
    SECOND_DERIVATIVES,
    activation_for_code,
    apply_activation,
    rewrite_kept_channels,
    small_gamma_channels,
)
from ...masked import masked_reference
from ...reference import graph_grads, reference_normalize
from ..cpu import double_backward
from ._runtime import register_op
from .activation import PRELU_CODE
from .channel import RunningUpdate, channel_backward, channel_forward
from .row import row_backward, row_forward

__all__ = ["OperatorArgs", "ChannelNorm", "ChannelNormInPlace", "RowNorm"]


def _running_update(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    counter: torch.Tensor | None,
    momentum: float,
    unbiased: bool,
) -> RunningUpdate | None:
    """The operators' running-estimate arguments as the launcher takes them; ``momentum < 0``
    is the cumulative average."""
    if running_mean is None:
        return None
    return running_mean, running_var, counter, None if momentum < 0 else momentum, unbiased


# --- operators -------------------------------------------------------------------------------


@register_op("triton_channel_norm", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    groups: int,
    eps: float,
    act: int,
    param: float,
    momentum: float,
    unbiased: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, stats, status); ``momentum < 0`` is the cumulative average."""
    update = _running_update(running_mean, running_var, num_batches_tracked, momentum, unbiased)
    return channel_forward(x, weight, bias, prelu_weight, mask, groups, eps, act, param, update=update)


@register_op("triton_channel_norm_inplace", mutates_args=("x", "running_mean", "running_var", "num_batches_tracked"))
def _channel_norm_inplace(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    groups: int,
    eps: float,
    act: int,
    param: float,
    momentum: float,
    unbiased: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats, status); the output is written over ``x``."""
    update = _running_update(running_mean, running_var, num_batches_tracked, momentum, unbiased)
    _, stats, status = channel_forward(x, weight, bias, None, None, groups, eps, act, param, out=x, update=update)
    return stats, status


@register_op("triton_channel_norm_given")
def _channel_norm_given(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    act: int,
    param: float,
) -> torch.Tensor:
    return channel_forward(x, weight, bias, prelu_weight, mask, -1, eps, act, param, given=(running_mean, running_var))[
        0
    ]


@register_op("triton_channel_norm_backward")
def _channel_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    groups: int,
    eps: float,
    act: int,
    param: float,
    params: bool,
    inplace: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ, dPReLU), the last three float32 (C,) (empty without ``params``); with
    ``running_mean`` the eval form; ``inplace``: ``x`` is the in-place mode's output."""
    given = None if running_mean is None else (running_mean, running_var, eps)
    return channel_backward(
        dy, x, weight, bias, prelu_weight, mask, stats, groups, act, param, given=given, inplace=inplace, params=params
    )


# The row launchers are operators as they stand: their parameters are the schema.
register_op("triton_row_norm")(row_forward)
register_op("triton_row_norm_backward")(row_backward)


# --- autograd --------------------------------------------------------------------------------


def _param_grad(g: torch.Tensor, p: torch.Tensor | None, need: bool) -> torch.Tensor | None:
    if p is None or not need:
        return None
    if p.numel() == 1 and g.numel() != 1:  # a single PReLU slope shared by every channel
        g = g.sum()
    return g.reshape(p.shape).to(p.dtype)


class OperatorArgs(NamedTuple):
    """What a channel operator takes after x and the differentiable parameters, in the
    operators' order: the autograd Functions carry it as one argument. (Not
    :class:`normlab.core.calls.ChannelCall`, the checked call the path rule routes: this is
    the operators' flattened arguments, the running policy spelt out as tensors and numbers.)"""

    mask: torch.Tensor | None
    running_mean: torch.Tensor | None  # the estimates to update, or the given statistics
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    groups: int
    eps: float
    act: int
    param: float
    momentum: float  # < 0: the cumulative average
    unbiased: bool


class ChannelNorm(torch.autograd.Function):
    """``(y, stats, status)`` of the channel operators; gradients for x, γ, β and PReLU's slope.

    Arguments: ``x, weight, bias, prelu_weight, call, given`` — ``call`` a :class:`OperatorArgs`;
    ``given``: normalize with its ``running_mean``/``running_var`` (BatchNorm eval); otherwise
    with the batch's statistics, merging them into the running estimates when those are passed."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        prelu: torch.Tensor | None,
        call: OperatorArgs,
        given: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if given:
            y = torch.ops.normlab.triton_channel_norm_given(
                x, weight, bias, prelu, call.mask, call.running_mean, call.running_var, call.eps, call.act, call.param
            )
            stats = x.new_empty((5, 0), dtype=torch.float32)
            status = x.new_empty(1, dtype=torch.int32)
            ctx.save_for_backward(x, weight, bias, prelu, call.mask, stats, call.running_mean, call.running_var)
        else:
            y, stats, status = torch.ops.normlab.triton_channel_norm(x, weight, bias, prelu, *call)
            ctx.save_for_backward(x, weight, bias, prelu, call.mask, stats, None, None)
        ctx.groups, ctx.eps, ctx.act, ctx.param, ctx.given = call.groups, call.eps, call.act, call.param, given
        ctx.mark_non_differentiable(stats, status)
        # no zero-filled gradients for the statistics: two launches each backward otherwise
        ctx.set_materialize_grads(False)
        return y, stats, status

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor | None, _stats_grad: torch.Tensor | None, _status_grad: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, prelu, mask, stats, rm, rv = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if dy is None:
            return (None,) * 6
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composed reference
            grads = _channel_double_backward(ctx, dy, ctx.saved_tensors)
        else:
            params = any(needs[i] for i in (1, 2, 3))
            dx, dw, db, dp = torch.ops.normlab.triton_channel_norm_backward(
                dy, x, weight, bias, prelu, mask, stats, rm, rv, ctx.groups, ctx.eps, ctx.act, ctx.param, params, False
            )
            grads = (
                dx if needs[0] else None,
                _param_grad(dw, weight, needs[1]),
                _param_grad(db, bias, needs[2]),
            )
            grads += (_param_grad(dp, prelu, needs[3] and ctx.act == PRELU_CODE),)
        return (*grads, None, None)


def _grouped(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mask: torch.Tensor | None, groups: int
) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor | None, tuple[int, ...]]:
    """x (and the mask) as (N, G, C//G, *) for GroupNorm, or as is for BatchNorm; the dims
    a statistic reduces; γ, β shaped to broadcast."""
    ndim = x.dim()
    if groups < 0:
        view = (1, -1) + (1,) * (ndim - 2)
        m = None if mask is None else mask.unsqueeze(1)
        return x, (0,) + tuple(range(2, ndim)), m, view
    target = x.unflatten(1, (groups, x.shape[1] // groups))  # type: ignore[no-untyped-call]  # unannotated in torch
    m = None if mask is None else mask.unsqueeze(1).unsqueeze(1)
    view = (1, groups, x.shape[1] // groups) + (1,) * (ndim - 2)
    return target, tuple(range(2, target.dim())), m, view


def _channel_double_backward(ctx: Any, dy: torch.Tensor, saved: tuple[Any, ...]) -> tuple[torch.Tensor | None, ...]:
    """(dx, dγ, dβ, dPReLU) with a graph, from what :class:`ChannelNorm` saved."""
    x, weight, bias, prelu, mask, _, rm, rv = saved
    target, dims, m, view = _grouped(x, weight, bias, mask, ctx.groups)
    with torch.enable_grad():
        w = None if weight is None else weight.view(view)
        b = None if bias is None else bias.view(view)
        mean: torch.Tensor | None = None
        rstd: torch.Tensor | None = None
        if ctx.given:  # the estimates were saved with it
            stat = (1, -1) + (1,) * (x.dim() - 2)
            mean = cast(torch.Tensor, rm).detach().view(stat).float()
            rstd = torch.rsqrt(cast(torch.Tensor, rv).detach().view(stat).float() + ctx.eps)
        if m is not None:
            z = masked_reference(target, w, b, m, dims, ctx.eps, mean=mean, rstd=rstd)
        else:
            z = reference_normalize(target, w, b, dims, ctx.eps, mean=mean, rstd=rstd)
        name = activation_for_code(ctx.act).name
        y = apply_activation(z.reshape(x.shape), name, ctx.param, prelu if name == "prelu" else None)
        return tuple(graph_grads(y, (x, weight, bias, prelu), ctx.needs_input_grad[:4], dy))


class RowNorm(torch.autograd.Function):
    """``(y, s, stats)`` of ``normlab::triton_row_norm``; arguments ``x, residual, weight,
    bias, k, eps, centered``. x and the residual get the same gradient, that of the sum."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        k: int,
        eps: float,
        centered: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, s, stats = torch.ops.normlab.triton_row_norm(x, residual, weight, bias, k, eps, centered)
        ctx.save_for_backward(x if residual is None else s, weight, bias, stats)
        ctx.k, ctx.eps, ctx.centered, ctx.added = k, eps, centered, residual is not None
        ctx.mark_non_differentiable(stats)
        if residual is None:
            ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)
        return y, s, stats

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor | None, ds: torch.Tensor | None, _stats_grad: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        s, weight, bias, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        ds = ds if ctx.added else None
        d_sum: torch.Tensor | None
        if dy is None:  # only the sum was used
            d_sum = ds if ds is not None else torch.zeros_like(s)
            dw = torch.zeros_like(weight) if weight is not None and needs[2] else None
            db = torch.zeros_like(bias) if bias is not None and needs[3] else None
        elif torch.is_grad_enabled():
            # the CPU kernels' formula: the composed reference on the saved sum, plus ds
            d_sum, dw, db = double_backward.add_row(dy, ds, s, weight, bias, ctx.k, ctx.eps, ctx.centered, needs[2:4])
        else:
            params = bool(needs[2] or needs[3])
            d_sum, dw, db = torch.ops.normlab.triton_row_norm_backward(
                dy, ds, s, weight, stats, ctx.k, ctx.centered, params
            )
            dw, db = _param_grad(dw, weight, needs[2]), _param_grad(db, bias, needs[3])
        return (d_sum if needs[0] else None), (d_sum if needs[1] else None), dw, db, None, None, None


class ChannelNormInPlace(torch.autograd.Function):
    """In-Place Activated BatchNorm/GroupNorm in one launch each way: ``x`` is overwritten
    with y = act(γ·x̂ + β) and y is all backward keeps; x̂ comes back by inverting the
    activation and the affine map. Channels with |γ| below the guard keep their input (found
    with one host read of γ, as the CPU path does; nothing when every |γ| is larger), and their
    gradients are redone exactly by the composed ops.

    Arguments: ``x, weight, bias, call, stats_out`` — ``call`` a :class:`OperatorArgs` without a
    mask; the statistics tensor goes into ``stats_out``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        call: OperatorArgs,
        stats_out: list[torch.Tensor],
    ) -> torch.Tensor:
        # γ read on the host (3 small ops); on the meta device there is nothing to read
        small = small_gamma_channels(weight) if x.device.type != "meta" else None
        x_small = x.index_select(1, small) if small is not None else None  # before it is overwritten
        stats, status = torch.ops.normlab.triton_channel_norm_inplace(x, weight, bias, *call[1:])  # all but the mask
        ctx.mark_dirty(x)
        stats_out.extend((stats, status))
        ctx.groups, ctx.act, ctx.param, ctx.small = call.groups, call.act, call.param, small
        ctx.save_for_backward(x, weight, bias, stats, x_small)
        return x

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVES)
        y, weight, bias, stats, x_small = ctx.saved_tensors
        needs = ctx.needs_input_grad
        params = bool(needs[1] or needs[2] or ctx.small is not None)
        dx, dw, db, _ = torch.ops.normlab.triton_channel_norm_backward(
            dy, y, weight, bias, None, None, stats, None, None, ctx.groups, 0.0, ctx.act, ctx.param, params, True
        )
        if ctx.small is not None:  # |γ| below the guard: x̂ from their kept input, as the CPU kernels
            rewrite_kept_channels(ctx, (dx, dw, db), stats, y, dy, weight, bias, x_small)
        return dx, _param_grad(dw, weight, needs[1]), _param_grad(db, bias, needs[2]), None, None


assert GAMMA_GUARD == 1e-5, "the kernels' _recover guards |γ| at 1e-5"
