"""The C++ kernels as PyTorch operators: ``torch.ops.normlab.*``.

Each kernel is registered with ``torch.library.custom_op`` together with a fake (meta)
implementation and its autograd formula, so ``torch.compile`` sees an ordinary operator
(no graph break), the meta device and FakeTensor propagate shapes, and autograd runs the
closed-form C++ backward:

    normlab::channel_norm            BatchNorm / InstanceNorm / GroupNorm (+ activation)
    normlab::channel_norm_backward   its backward (dx, dγ, dβ, dPReLU)
    normlab::row_norm                LayerNorm / RMSNorm over the trailing k elements
    normlab::row_norm_backward       its backward (dx, dγ, dβ)

The ops accept float32 CPU tensors laid out NCHW-contiguous or channels_last (channel
norms) / contiguous (row norms); :mod:`normlab.core.dispatch` decides when they run.
Everything per element happens in C++; per-group arrays (at most N×C numbers) come back
in float64.

Notation: a *unit* is one (sample, channel) plane of an NCHW tensor, or one channel of a
sample for channels_last (all samples together for BatchNorm, whose channels_last view
folds N into the spatial extent). Statistics live on groups: a channel for BatchNorm or
given statistics, a (sample, group of channels) for GroupNorm/InstanceNorm.

The in-place (output-only) mode overwrites its input, which an operator that returns
fresh tensors cannot express; it stays an ``autograd.Function`` (:func:`channel_norm_inplace`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..activation import ACTIVATIONS, abn_backward, activation_for_code, apply_activation, small_gamma_channels
from ..reference import reference_normalize
from .build import kernels

__all__ = [
    "ChannelPlan",
    "channel_norm_inplace",
    "plan_channel_norm",
]

_PRELU = ACTIVATIONS["prelu"].code

_EMPTY = torch.empty(0)


class ChannelPlan(NamedTuple):
    """How a channel-norm input maps onto the kernels (a NamedTuple: built on every call)."""

    layout: str  # "planes" (NCHW-contiguous) or "columns" (channels last)
    n: int
    c: int
    s: int  # spatial size per (sample, channel)
    groups: int  # -1: BatchNorm (one group per channel); else per-sample groups

    @property
    def units(self) -> int:  # rows of the (U, C) unit grid
        return 1 if (self.groups < 0 and self.layout == "columns") else self.n

    def view(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "planes":
            return x.view(self.n * self.c, self.s)
        if x.dim() == 2:
            return x.view(self.units, -1, self.c)
        moved = x.permute(0, *range(2, x.dim()), 1)  # channels last: a view, no copy
        return moved.view(self.units, -1, self.c)

    def unview(self, dxv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A kernel's (P, S) or (U, S, C) result shaped and laid out like ``like``."""
        if self.layout == "planes" or like.dim() == 2:
            return dxv.view(like.shape)
        spatial = like.shape[2:]
        return dxv.view(like.shape[0], *spatial, like.shape[1]).permute(0, like.dim() - 1, *range(1, like.dim() - 1))


def channel_layout(x: torch.Tensor) -> str | None:
    """ "planes", "columns" or None (a layout the kernels do not read)."""
    if x.dim() == 2:
        return "columns" if x.is_contiguous() else None
    if x.is_contiguous():
        return "planes"
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return "columns"
    return None


def plan_channel_norm(x: torch.Tensor, groups: int) -> ChannelPlan:
    layout = channel_layout(x)
    if layout is None:  # the dispatcher makes such inputs contiguous first
        raise RuntimeError(f"normlab::channel_norm: unsupported memory layout, strides {x.stride()}")
    n, c = x.shape[0], x.shape[1]
    return ChannelPlan(layout, n, c, x.numel() // (n * c), groups)


def _detached(t: torch.Tensor | None) -> torch.Tensor:
    # the kernels read raw memory and never record autograd: no need to detach
    return _EMPTY if t is None else t


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _slope(prelu: torch.Tensor | None, act: int, channels: int) -> torch.Tensor:
    return _f32(prelu.expand(channels)) if act == _PRELU and prelu is not None else _EMPTY


def _channel_groups(x: torch.Tensor, groups: int, given: bool) -> int:
    """Number of statistics groups: C for BatchNorm or given statistics, N·G otherwise."""
    return x.shape[1] if (groups < 0 or given) else x.shape[0] * groups


# --- normlab::channel_norm -----------------------------------------------------------------


def _channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    groups: int,
    eps: float,
    act: int,
    param: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, shift, offset, rstd, mean, var): y = act(γ·(x − shift − offset)·rstd + β).

    Statistics come from ``x`` (groups = -1: per channel over N and space; G > 0: per
    sample and group of C/G channels) unless ``running_mean``/``running_var`` are given.
    ``shift, offset, rstd`` (float64, one per group) are what the backward needs;
    ``mean, var`` (float64, biased variance) feed running estimates — empty when given.
    """
    y, shift, offset, rstd, mean, var = _channel_forward(
        x, weight, bias, running_mean, running_var, prelu_weight, groups, eps, act, param
    )
    if mean is None:  # an operator returns tensors, and never one object twice
        mean, var = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    return y, shift, offset, rstd, mean, var


def _channel_forward(x, weight, bias, running_mean, running_var, prelu_weight, groups, eps, act, param):
    """The kernel call behind :func:`_channel_norm`; ``mean, var`` are None when given."""
    plan = plan_channel_norm(x, groups)
    y = torch.empty_like(x)
    shift, offset, rstd, mean, var = kernels().channel_forward(
        plan.view(x),
        plan.layout == "planes",
        plan.n,
        plan.c,
        plan.s,
        groups,
        _detached(weight),
        _detached(bias),
        _detached(running_mean),
        _detached(running_var),
        eps,
        act,
        param,
        _slope(prelu_weight, act, plan.c),
        plan.view(y),
    )
    if running_mean is not None:
        return y, shift, offset, rstd, None, None
    return y, shift, offset, rstd, mean, var


channel_norm = torch.library.custom_op("normlab::channel_norm", mutates_args=(), device_types="cpu")(_channel_norm)


@channel_norm.register_fake
def _(x, weight, bias, running_mean, running_var, prelu_weight, groups, eps, act, param):
    given = running_mean is not None
    k = _channel_groups(x, groups, given)
    stat = x.new_empty(k, dtype=torch.float64)
    empty = x.new_empty(0 if given else k, dtype=torch.float64)
    return torch.empty_like(x), stat, stat.clone(), stat.clone(), empty, empty.clone()


def _channel_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    shift: torch.Tensor,
    offset: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    given: bool,
    act: int,
    param: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ, dPReLU) of :func:`channel_norm`; the parameter gradients in float64 (C,)."""
    plan = plan_channel_norm(x, groups)
    dyv = plan.view(dy.contiguous() if plan.layout == "planes" else _same_layout(dy, x))
    dxv, dgamma, dbeta, dslope = kernels().channel_backward(
        dyv,
        plan.view(x),
        plan.layout == "planes",
        plan.n,
        plan.c,
        plan.s,
        groups,
        given,
        False,
        _detached(weight),
        _detached(bias),
        shift,
        offset,
        rstd,
        act,
        param,
        _slope(prelu_weight, act, plan.c),
    )
    return plan.unview(dxv, x), dgamma, dbeta, dslope


channel_norm_backward = torch.library.custom_op("normlab::channel_norm_backward", mutates_args=(), device_types="cpu")(
    _channel_norm_backward
)


@channel_norm_backward.register_fake
def _(dy, x, weight, bias, prelu_weight, shift, offset, rstd, groups, given, act, param):
    c = x.shape[1]
    per_channel = x.new_empty(c, dtype=torch.float64)
    return torch.empty_like(x), per_channel, per_channel.clone(), per_channel.clone()


def _channel_setup(ctx, inputs, output):
    x, weight, bias, running_mean, _, prelu_weight, groups, eps, act, param = inputs
    _, shift, offset, rstd, _, _ = output
    ctx.save_for_backward(x, weight, bias, prelu_weight, shift, offset, rstd)
    ctx.groups, ctx.eps, ctx.act, ctx.param = groups, eps, act, param
    ctx.given = running_mean is not None


def _channel_backward(ctx, dy, *_unused_stat_grads):
    x, weight, bias, prelu, shift, offset, rstd = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * 10
    if torch.is_grad_enabled():  # create_graph=True: the kernel's result carries no graph
        dx, dw, db, dp = _channel_double_backward(ctx, dy, x, weight, bias, prelu, shift, rstd)
    else:
        backward = _channel_norm_backward if is_eager(dy) else torch.ops.normlab.channel_norm_backward
        dx, dw, db, dp = backward(
            dy, x, weight, bias, prelu, shift, offset, rstd, ctx.groups, ctx.given, ctx.act, ctx.param
        )
        dw = dw.to(weight.dtype) if weight is not None and needs[1] else None
        db = db.to(bias.dtype) if bias is not None and needs[2] else None
        if ctx.act == _PRELU and prelu is not None and needs[5]:
            dp = dp.to(prelu.dtype)
            dp = dp.sum().reshape(prelu.shape) if prelu.numel() == 1 else dp
        else:
            dp = None
    return (dx if needs[0] else None), dw, db, None, None, dp, None, None, None, None


channel_norm.register_autograd(_channel_backward, setup_context=_channel_setup)


def _channel_double_backward(ctx, dy, x, weight, bias, prelu, shift, rstd):
    """Differentiate the composed reference on the saved operands, so second derivatives
    stay exact (the kernels' gradient carries no graph)."""
    groups, given = ctx.groups, ctx.given
    view = (1, -1) + (1,) * (x.dim() - 2)
    with torch.enable_grad():
        if groups < 0 or given:
            target, dims = x, (0,) + tuple(range(2, x.dim()))
            w = None if weight is None else weight.view(view)
            b = None if bias is None else bias.view(view)
        else:
            cg = x.shape[1] // groups
            target = x.unflatten(1, (groups, cg))
            dims = tuple(range(2, target.dim()))
            shape = (1, groups, cg) + (1,) * (target.dim() - 3)
            w = None if weight is None else weight.view(shape)
            b = None if bias is None else bias.view(shape)
        if given:
            # detached: the statistics are outputs of this very op, constants here
            z = reference_normalize(
                target,
                w,
                b,
                dims,
                0.0,
                mean=shift.detach().view(view).to(x.dtype),
                rstd=rstd.detach().view(view).to(x.dtype),
            )
        else:
            z = reference_normalize(target, w, b, dims, ctx.eps)
        z = z.reshape(x.shape) if z.shape != x.shape else z
        name = activation_for_code(ctx.act).name
        y = apply_activation(z, name, ctx.param, prelu if name == "prelu" else None)
        operands = (x, weight, bias, prelu)
        needs = tuple(ctx.needs_input_grad) + (False,) * 10  # shorter when nested in create_graph
        wanted = [needs[i] for i in (0, 1, 2, 5)]
        inputs = [t for t, need in zip(operands, wanted) if need and t is not None]
        found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(found) if need and t is not None else None for t, need in zip(operands, wanted))


def _same_layout(dy: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The incoming gradient in the saved tensor's memory format (a copy only if needed)."""
    if like.dim() == 2:
        return dy.contiguous()
    fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    return dy.contiguous(memory_format=fmt)


# --- in place: the output overwrites the input and is all that is kept -----------------------


class _ChannelNormInPlace(torch.autograd.Function):
    """In-Place Activated BatchNorm/GroupNorm on the kernels (batch statistics).

    Overwrites ``x`` with y = act(z) and keeps only y: backward recovers z by inverting the
    activation and x̂ = (z − β)/γ (see :mod:`normlab.core.activation`) — except for channels
    with |γ| below the guard, whose input is kept and whose gradients are redone exactly.
    Returns y alone (autograd allows an in-place Function on a view only then); the batch
    statistics go into ``stats_out``."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, act, param, stats_out):
        plan = plan_channel_norm(x, groups)
        small = small_gamma_channels(weight)
        x_small = x.index_select(1, small) if small is not None else None  # before it is overwritten
        shift, offset, rstd, mean, var = kernels().channel_forward(
            plan.view(x),
            plan.layout == "planes",
            plan.n,
            plan.c,
            plan.s,
            groups,
            _detached(weight),
            _detached(bias),
            _EMPTY,
            _EMPTY,
            eps,
            act,
            param,
            _EMPTY,
            plan.view(x),
        )
        ctx.mark_dirty(x)
        stats_out.extend((mean, var))
        ctx.plan, ctx.act, ctx.param, ctx.small = plan, act, param, small
        ctx.stats = (shift, offset, rstd)
        ctx.save_for_backward(x, weight, bias, x_small)
        return x

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("second derivatives are not supported in the in-place (output-only) mode")
        y, weight, bias, x_small = ctx.saved_tensors
        plan = ctx.plan
        dyv = plan.view(dy.contiguous() if plan.layout == "planes" else _same_layout(dy, y))
        dxv, dgamma, dbeta, _ = kernels().channel_backward(
            dyv,
            plan.view(y),
            plan.layout == "planes",
            plan.n,
            plan.c,
            plan.s,
            plan.groups,
            False,
            True,
            _detached(weight),
            _detached(bias),
            *ctx.stats,
            ctx.act,
            ctx.param,
            _EMPTY,
        )
        dx = plan.unview(dxv, y)
        if ctx.small is not None:
            _redo_small_gamma(ctx, dx, dgamma, dy, y, weight, bias, x_small)
        dw = dgamma.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = dbeta.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None


def _redo_small_gamma(ctx, dx, dgamma, dy, y, weight, bias, x_small) -> None:
    """Overwrite dx and dγ of the channels the kernel could not recover x̂ for (|γ| below the
    guard) — and, for GroupNorm, of the rest of their groups, whose dx depends on it — with
    the composed backward on just those channels, given x̂ from the kept input."""
    small, groups = ctx.small, ctx.plan.groups
    shift, offset, rstd = ctx.stats
    mean = shift + offset
    ndim = y.dim()
    if groups < 0:  # BatchNorm: channels are independent; statistics per channel
        channels, sub_groups = small, -1
        position = torch.arange(small.numel(), device=small.device)
        stat = (1, -1) + (1,) * (ndim - 2)
        xhat_small = (x_small.double() - mean[small].view(stat)) * rstd[small].view(stat)
        sub_rstd = rstd[channels].view(stat)
    else:  # GroupNorm: redo every group holding such a channel; statistics per (sample, group)
        per = y.shape[1] // groups
        touched = torch.unique(small // per)
        channels = (touched[:, None] * per + torch.arange(per, device=small.device)).flatten()
        position = torch.searchsorted(channels, small)
        stat = (y.shape[0], -1) + (1,) * (ndim - 2)
        n_mean, n_rstd = mean.view(y.shape[0], groups), rstd.view(y.shape[0], groups)
        xhat_small = (x_small.double() - n_mean[:, small // per].view(stat)) * n_rstd[:, small // per].view(stat)
        sub_groups = touched.numel()
        sub_rstd = n_rstd[:, touched].view((y.shape[0], -1) + (1,) * (ndim - 1))
    dx_c, dw_c, _ = abn_backward(
        y.index_select(1, channels),
        dy.index_select(1, channels),
        None if weight is None else weight.detach().index_select(0, channels),
        None if bias is None else bias.detach().index_select(0, channels),
        sub_groups,
        sub_rstd,
        activation_for_code(ctx.act).name,
        ctx.param,
        position,
        xhat_small,
    )
    dx.index_copy_(1, channels, dx_c)
    dgamma.index_copy_(0, channels, dw_c.double())


def channel_norm_inplace(x, weight, bias, groups: int, eps: float, act: int, param: float):
    """(y, mean, var) with y written over ``x``: the in-place mode on the kernels."""
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    stats: list[torch.Tensor] = []
    out = _ChannelNormInPlace.apply(x, weight, bias, groups, eps, act, param, stats)
    if not recorded:
        # The kernel wrote through a raw pointer; without a graph mark_dirty did nothing, so
        # bump the version ourselves: a tensor some other op saved must not change silently.
        torch.autograd.graph.increment_version(x)
    return out, stats[0], stats[1]


# --- normlab::row_norm: LayerNorm and RMSNorm ------------------------------------------------


def _row_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, k: int, eps: float, centered: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, shift, rstd, offr) over the trailing ``k`` elements of contiguous ``x``;
    x̂ = (x − shift)·rstd − offr per row (float32 row statistics)."""
    y = torch.empty_like(x)
    w = weight.detach().reshape(-1).contiguous() if weight is not None else _EMPTY
    b = bias.detach().reshape(-1).contiguous() if bias is not None else _EMPTY
    shift, rstd, offr = kernels().row_forward(x.view(-1, k), w, b, eps, centered, y.view(-1, k))
    return y, shift, rstd, offr


row_norm = torch.library.custom_op("normlab::row_norm", mutates_args=(), device_types="cpu")(_row_norm)


@row_norm.register_fake
def _(x, weight, bias, k, eps, centered):
    rows = x.new_empty(x.numel() // k)
    return torch.empty_like(x), rows, rows.clone(), rows.clone()


def _row_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    shift: torch.Tensor,
    rstd: torch.Tensor,
    offr: torch.Tensor,
    k: int,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ) of :func:`row_norm`; dγ, dβ float64 over the k normalized elements."""
    w = weight.detach().reshape(-1).contiguous() if weight is not None else _EMPTY
    dx, dw, db = kernels().row_backward(dy.contiguous().view(-1, k), x.view(-1, k), w, shift, rstd, offr, centered)
    return dx.view_as(x), dw, db


row_norm_backward = torch.library.custom_op("normlab::row_norm_backward", mutates_args=(), device_types="cpu")(
    _row_norm_backward
)


@row_norm_backward.register_fake
def _(dy, x, weight, shift, rstd, offr, k, centered):
    per_element = x.new_empty(k, dtype=torch.float64)
    return torch.empty_like(x), per_element, per_element.clone()


def _row_setup(ctx, inputs, output):
    x, weight, bias, k, eps, centered = inputs
    _, shift, rstd, offr = output
    ctx.save_for_backward(x, weight, bias, shift, rstd, offr)
    ctx.k, ctx.eps, ctx.centered = k, eps, centered


def _row_backward(ctx, dy, *_unused_stat_grads):
    x, weight, bias, shift, rstd, offr = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiate the composed reference
        return (*_row_double_backward(ctx, dy, x, weight, bias), None, None, None)
    backward = _row_norm_backward if is_eager(dy) else torch.ops.normlab.row_norm_backward
    dx, dw, db = backward(dy, x, weight, shift, rstd, offr, ctx.k, ctx.centered)
    dw = dw.to(weight.dtype).view(weight.shape) if weight is not None and needs[1] else None
    db = db.to(bias.dtype).view(bias.shape) if bias is not None and needs[2] else None
    return (dx if needs[0] else None), dw, db, None, None, None


row_norm.register_autograd(_row_backward, setup_context=_row_setup)


def _row_double_backward(ctx, dy, x, weight, bias):
    size, dims = 1, []
    for d in range(x.dim() - 1, -1, -1):  # the trailing dims that make up k
        if size == ctx.k:
            break
        dims.insert(0, d)
        size *= x.shape[d]
    dims = tuple(dims)
    affine_shape = x.shape[dims[0] :]
    with torch.enable_grad():
        w = None if weight is None else weight.view(affine_shape)
        b = None if bias is None else bias.view(affine_shape)
        y = reference_normalize(x, w, b, dims, ctx.eps, centered=ctx.centered)
        operands = (x, weight, bias)
        inputs = [t for t, need in zip(operands, ctx.needs_input_grad[:3]) if need and t is not None]
        found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(found) if need and t is not None else None for t, need in zip(operands, ctx.needs_input_grad[:3]))


# --- eager calls without the operator machinery ----------------------------------------------
#
# An operator call costs tens of microseconds of Python dispatch (alias checks, redispatch,
# the autograd wrapper) — more than the kernel itself on small tensors. Outside any trace the
# same kernels run from eager.cpp, whose torch::autograd::Function records the same formula
# without Python on either side; traced code (torch.compile, FakeTensor, meta, functional
# tensors) always goes through the operators.


def is_eager(t: torch.Tensor) -> bool:
    """A plain CPU tensor outside any compile: safe to call the kernels directly."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call_channel_norm(x, weight, bias, running_mean, running_var, prelu_weight, groups, eps, act, param):
    """``(y, mean, var)`` of ``torch.ops.normlab.channel_norm`` — the operator where a tracer
    needs it, else the kernels directly. ``mean``/``var`` (float64, one per group) are not
    differentiable; None (eager) or empty (operator) with given statistics."""
    if is_eager(x):
        return kernels().eager_channel_norm(
            x, weight, bias, running_mean, running_var, prelu_weight, groups, eps, act, param
        )
    y, _, _, _, mean, var = torch.ops.normlab.channel_norm(
        x, weight, bias, running_mean, running_var, prelu_weight, groups, eps, act, param
    )
    return y, mean.detach(), var.detach()


def call_row_norm(x, weight, bias, k, eps, centered):
    """y of ``torch.ops.normlab.row_norm``, the operator only where a tracer needs it."""
    if is_eager(x):
        return kernels().eager_row_norm(x, weight, bias, k, eps, centered)
    return torch.ops.normlab.row_norm(x, weight, bias, k, eps, centered)[0]


class _Saved:
    """What the double-backward helpers read from an autograd context, for eager.cpp's calls."""

    def __init__(self, needs_input_grad, **fields):
        self.needs_input_grad = needs_input_grad
        self.__dict__.update(fields)


def _eager_channel_double_backward(dy, x, weight, bias, prelu, shift, rstd, groups, given, eps, act, param, needs):
    """eager.cpp's backward under create_graph=True: (dx, dγ, dβ, dPReLU) with a graph."""
    ctx = _Saved(needs, groups=groups, given=given, eps=eps, act=act, param=param)
    return _channel_double_backward(ctx, dy, x, weight, bias, prelu, shift, rstd)


def _eager_row_double_backward(dy, x, weight, bias, k, eps, centered, needs):
    """eager.cpp's backward under create_graph=True: (dx, dγ, dβ) with a graph."""
    return _row_double_backward(_Saved(needs, k=k, eps=eps, centered=centered), dy, x, weight, bias)


# --- normlab::add_row_norm: residual add + LayerNorm / RMSNorm -------------------------------
#
# The pre-norm transformer step s = x + r, y = norm(s) in one pass. What backward keeps is s
# (an output the caller holds anyway, the residual stream) and three floats per row — the
# same as the unfused ops, which keep s for their norm. Both x and r receive the same
# gradient, ds + norm_backward(dy).


def _add_row_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    eps: float,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, shift, rstd, offr): s = x + residual and y = norm(s) over the trailing ``k``
    elements of contiguous, same-shaped ``x`` and ``residual``; statistics as :func:`_row_norm`."""
    y = torch.empty_like(x)
    s = torch.empty_like(x)
    w = weight.detach().reshape(-1).contiguous() if weight is not None else _EMPTY
    b = bias.detach().reshape(-1).contiguous() if bias is not None else _EMPTY
    shift, rstd, offr = kernels().add_row_forward(
        x.view(-1, k), residual.view(-1, k), w, b, eps, centered, s.view(-1, k), y.view(-1, k)
    )
    return y, s, shift, rstd, offr


add_row_norm = torch.library.custom_op("normlab::add_row_norm", mutates_args=(), device_types="cpu")(_add_row_norm)


@add_row_norm.register_fake
def _(x, residual, weight, bias, k, eps, centered):
    rows = x.new_empty(x.numel() // k)
    return torch.empty_like(x), torch.empty_like(x), rows, rows.clone(), rows.clone()


def _add_row_norm_backward(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    shift: torch.Tensor,
    rstd: torch.Tensor,
    offr: torch.Tensor,
    k: int,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_sum, dγ, dβ) of :func:`add_row_norm`: d_sum = ds + norm_backward(dy) is the gradient
    of x and of the residual; dγ, dβ float64 over the k normalized elements."""
    w = weight.detach().reshape(-1).contiguous() if weight is not None else _EMPTY
    h = ds.contiguous().view(-1, k) if ds is not None else _EMPTY
    dx, dw, db = kernels().add_row_backward(
        dy.contiguous().view(-1, k), h, s.view(-1, k), w, shift, rstd, offr, centered
    )
    return dx.view_as(s), dw, db


add_row_norm_backward = torch.library.custom_op("normlab::add_row_norm_backward", mutates_args=(), device_types="cpu")(
    _add_row_norm_backward
)


@add_row_norm_backward.register_fake
def _(dy, ds, s, weight, shift, rstd, offr, k, centered):
    per_element = s.new_empty(k, dtype=torch.float64)
    return torch.empty_like(s), per_element, per_element.clone()


def _add_row_setup(ctx, inputs, output):
    _, _, weight, bias, k, eps, centered = inputs
    _, s, shift, rstd, offr = output
    ctx.save_for_backward(s, weight, bias, shift, rstd, offr)
    ctx.k, ctx.eps, ctx.centered = k, eps, centered


def _add_row_backward(ctx, dy, ds, *_unused_stat_grads):
    s, weight, bias, shift, rstd, offr = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if dy is None:  # only s was differentiated (the eager path does not materialize zeros)
        d_sum = ds
        dw = torch.zeros_like(weight) if weight is not None and needs[2] else None
        db = torch.zeros_like(bias) if bias is not None and needs[3] else None
    elif torch.is_grad_enabled():  # create_graph=True: differentiate the composed reference
        d_sum, dw, db = _add_row_double_backward(ctx, dy, ds, s, weight, bias)
    else:
        backward = _add_row_norm_backward if is_eager(dy) else torch.ops.normlab.add_row_norm_backward
        d_sum, dw, db = backward(dy, ds, s, weight, shift, rstd, offr, ctx.k, ctx.centered)
        dw = dw.to(weight.dtype).view(weight.shape) if weight is not None and needs[2] else None
        db = db.to(bias.dtype).view(bias.shape) if bias is not None and needs[3] else None
    if d_sum is None:
        d_sum = torch.zeros_like(s)
    return (d_sum if needs[0] else None), (d_sum if needs[1] else None), dw, db, None, None, None


add_row_norm.register_autograd(_add_row_backward, setup_context=_add_row_setup)


def _add_row_double_backward(ctx, dy, ds, s, weight, bias):
    """The norm's part differentiated through the composed reference on the saved sum. ``s``
    is this op's own output, so its graph leads back to x and the residual: higher
    derivatives flow through the first-order formula above."""
    size, dims = 1, []
    for d in range(s.dim() - 1, -1, -1):  # the trailing dims that make up k
        if size == ctx.k:
            break
        dims.insert(0, d)
        size *= s.shape[d]
    dims = tuple(dims)
    affine_shape = s.shape[dims[0] :]
    with torch.enable_grad():
        w = None if weight is None else weight.view(affine_shape)
        b = None if bias is None else bias.view(affine_shape)
        y = reference_normalize(s, w, b, dims, ctx.eps, centered=ctx.centered)
        operands = (s, weight, bias)
        wanted = (True, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        inputs = [t for t, need in zip(operands, wanted) if need and t is not None]
        found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
        grads = [next(found) if need and t is not None else None for t, need in zip(operands, wanted)]
    d_sum = grads[0] if ds is None else grads[0] + ds
    return d_sum, grads[1], grads[2]


class _EagerAddRowNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        output = _add_row_norm(*inputs)
        _add_row_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[2:])
        # a gradient that never arrived stays None: the kernel then skips adding it
        ctx.set_materialize_grads(False)
        return output

    backward = staticmethod(_add_row_backward)


def call_add_row_norm(x, residual, weight, bias, k, eps, centered):
    """``torch.ops.normlab.add_row_norm``, called directly where no tracer needs the operator."""
    if not is_eager(x):
        return torch.ops.normlab.add_row_norm(x, residual, weight, bias, k, eps, centered)
    if _needs_grad(x, residual, weight, bias):
        return _EagerAddRowNorm.apply(x, residual, weight, bias, k, eps, centered)
    return _add_row_norm(x, residual, weight, bias, k, eps, centered)
