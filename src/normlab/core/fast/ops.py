"""Autograd glue around the C++ kernels: channel norms (BatchNorm, GroupNorm, InstanceNorm,
with a fused activation and the in-place mode) and row norms (LayerNorm, RMSNorm).

Everything per element happens in C++; what is left here is arithmetic on per-group and
per-(sample, channel) arrays — at most N×C numbers — in float64.

Notation: a *unit* is one (sample, channel) plane of an NCHW tensor, or one channel of a
sample for channels_last (all samples together for BatchNorm, whose channels_last view
folds N into the spatial extent). Units are laid out as a (U, C) grid; statistics live on
groups: a channel for BatchNorm, a (sample, group of channels) for GroupNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..activation import apply_activation
from ..reference import reference_normalize
from .build import kernels, note

__all__ = ["ACTIVATIONS", "ChannelPlan", "channel_norm", "plan_channel_norm", "row_norm", "row_eligible"]

ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "prelu": 5}
_ACTIVATION_NAMES = {v: k for k, v in ACTIVATIONS.items()}
INVERTIBLE = ("identity", "leaky_relu", "elu")

_EMPTY = torch.empty(0)


@dataclass(frozen=True)
class ChannelPlan:
    """How a channel-norm input maps onto the kernels."""

    layout: str  # "planes" (NCHW-contiguous) or "columns" (channels last)
    n: int
    c: int
    s: int  # spatial size per (sample, channel)
    groups: int | None  # None: BatchNorm (one group per channel); else per-sample groups

    @property
    def units(self) -> int:  # rows of the (U, C) unit grid
        return 1 if (self.groups is None and self.layout == "columns") else self.n

    def view(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "planes":
            return x.view(self.n * self.c, self.s)
        if x.dim() == 2:
            return x.view(self.units, -1, self.c)
        moved = x.permute(0, *range(2, x.dim()), 1)  # channels last: a view, no copy
        return moved.view(self.units, -1, self.c)  # view (never a silent copy): layouts are checked


def plan_channel_norm(x: torch.Tensor, groups: int | None) -> ChannelPlan | None:
    """A plan when the kernels apply (float32 CPU, NCHW-contiguous or channels_last), else None."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 2 or x.numel() == 0:
        return None
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if x.dim() == 2:
        if not x.is_contiguous():
            return None
        layout = "columns"
    elif x.is_contiguous():
        layout = "planes"
    elif (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        layout = "columns"
    else:
        return None
    return ChannelPlan(layout, n, c, s, groups)


# --- the autograd Functions ------------------------------------------------------------------


def _to_layout(dxv: torch.Tensor, like: torch.Tensor, plan: ChannelPlan) -> torch.Tensor:
    """A kernel's (P, S) or (U, S, C) result as a tensor shaped and laid out like ``like``."""
    if plan.layout == "planes":
        return dxv.view(like.shape)
    if like.dim() == 2:
        return dxv.view(like.shape)
    return dxv.view(like.shape[0], *like.shape[2:], like.shape[1]).permute(0, like.dim() - 1, *range(1, like.dim() - 1))


def _channel_forward(x, weight, bias, prelu, running_mean, running_var, plan, eps, act, param, inplace):
    """One kernel call: (y, (shift, offset, rstd) per group, mean, var)."""
    given = running_mean is not None
    # Written through a view of an output allocated in x's layout: returning a view made
    # inside a Function would forbid a following in-place ReLU.
    y = x if inplace else torch.empty_like(x)
    slope = _f32(prelu.detach().expand(plan.c)) if act == ACTIVATIONS["prelu"] else _EMPTY
    shift, offset, rstd, mean, var = kernels().channel_forward(
        plan.view(x), plan.layout == "planes", plan.n, plan.c, plan.s,
        -1 if plan.groups is None else plan.groups,
        _EMPTY if weight is None else weight.detach(), _EMPTY if bias is None else bias.detach(),
        _EMPTY if not given else running_mean.detach(), _EMPTY if not given else running_var.detach(),
        eps, act, param, slope, plan.view(y))
    if not given and plan.groups is not None:
        mean, var = mean.view(plan.n, plan.groups), var.view(plan.n, plan.groups)
    return y, (shift, offset, rstd), (None if given else mean), (None if given else var)


class _ChannelNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prelu, running_mean, running_var, plan, eps, act, param, inplace):
        given = running_mean is not None
        y, group_stats, mean, var = _channel_forward(x, weight, bias, prelu, running_mean, running_var, plan, eps,
                                                     act, param, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.plan, ctx.act, ctx.param, ctx.inplace, ctx.given, ctx.eps = plan, act, param, inplace, given, eps
        ctx.weight_ref, ctx.bias_ref = weight, bias  # parameters: kept alive anyway
        ctx.group_stats = group_stats
        ctx.save_for_backward(y if inplace else x, prelu)
        if given:
            return y, None, None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean=None, _dvar=None):
        if torch.is_grad_enabled():
            return _channel_double_backward(ctx, dy)
        k = kernels()
        plan = ctx.plan
        saved, prelu = ctx.saved_tensors
        weight, bias = ctx.weight_ref, ctx.bias_ref
        slope = _f32(prelu.detach().expand(plan.c)) if ctx.act == ACTIVATIONS["prelu"] else _EMPTY
        dyv = plan.view(dy.contiguous() if plan.layout == "planes" else _same_layout(dy, saved))
        dxv, dgamma, dbeta, dslope = k.channel_backward(
            dyv, plan.view(saved), plan.layout == "planes", plan.n, plan.c, plan.s,
            -1 if plan.groups is None else plan.groups, ctx.given, ctx.inplace,
            _EMPTY if weight is None else weight.detach(), _EMPTY if bias is None else bias.detach(),
            *ctx.group_stats, ctx.act, ctx.param, slope)
        dw = dgamma.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = dbeta.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        dp = None
        if ctx.act == ACTIVATIONS["prelu"] and ctx.needs_input_grad[3]:
            dp = dslope.to(prelu.dtype)
            dp = dp.sum().reshape(prelu.shape) if prelu.numel() == 1 else dp
        return _to_layout(dxv, saved, plan), dw, db, dp, None, None, None, None, None, None, None


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _channel_double_backward(ctx, dy):
    """create_graph=True: differentiate the composed reference on the saved operands, so
    second derivatives stay exact (the kernels' gradient carries no graph)."""
    if ctx.inplace:
        raise RuntimeError("second derivatives are not supported in the in-place (output-only) mode")
    x, prelu = ctx.saved_tensors
    weight, bias = ctx.weight_ref, ctx.bias_ref
    plan = ctx.plan
    view = (1, -1) + (1,) * (x.dim() - 2)
    with torch.enable_grad():
        if plan.groups is None or ctx.given:
            target, dims = x, (0,) + tuple(range(2, x.dim()))
            w = None if weight is None else weight.view(view)
            b = None if bias is None else bias.view(view)
        else:
            cg = plan.c // plan.groups
            target = x.unflatten(1, (plan.groups, cg))
            dims = tuple(range(2, target.dim()))
            shape = (1, plan.groups, cg) + (1,) * (target.dim() - 3)
            w = None if weight is None else weight.view(shape)
            b = None if bias is None else bias.view(shape)
        if ctx.given:
            shift_g, _, rstd_g = ctx.group_stats
            z = reference_normalize(target, w, b, dims, 0.0, mean=shift_g.view(view).to(x.dtype),
                                    rstd=rstd_g.view(view).to(x.dtype))
        else:
            z = reference_normalize(target, w, b, dims, ctx.eps)
        z = z.reshape(x.shape) if z.shape != x.shape else z
        name = _ACTIVATION_NAMES[ctx.act]
        y = apply_activation(z, name, ctx.param, prelu if name == "prelu" else None)
        inputs = [t for t, need in zip((x, weight, bias, prelu), ctx.needs_input_grad[:4]) if need and t is not None and t.numel()]
        found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    grads = [next(found) if need and t is not None and t.numel() else None
             for t, need in zip((x, weight, bias, prelu), ctx.needs_input_grad[:4])]
    return (*grads, None, None, None, None, None, None, None)


def _same_layout(dy: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The incoming gradient in the saved tensor's memory format (a copy only if needed)."""
    if like.dim() == 2:
        return dy.contiguous()
    fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    return dy.contiguous(memory_format=fmt)


def channel_norm(x, weight, bias, *, groups=None, eps=1e-5, running_mean=None, running_var=None,
                 activation="identity", param=0.0, prelu_weight=None, inplace=False, operation="norm"):
    """Normalize with the kernels, or return None when they do not apply (caller falls back).

    ``groups=None`` is BatchNorm (batch statistics unless running_mean/var are given — then
    a fixed per-channel map); an int is GroupNorm with that many groups per sample
    (InstanceNorm: groups = C). Returns (y, mean, var): group statistics (float64; None
    when given) for running-estimate updates.
    """
    plan = plan_channel_norm(x, groups)
    reason = "" if plan is not None else "not float32 CPU NCHW/channels_last"
    if plan is not None and kernels() is None:
        plan, reason = None, "kernels unavailable"
    if plan is None:
        note(operation, "composed", reason)
        return None
    note(operation, "fast", plan.layout)
    act = ACTIVATIONS[activation]
    prelu = prelu_weight if prelu_weight is not None else _EMPTY
    if not _needs_grad(x, weight, bias, prelu):  # inference: no autograd bookkeeping at all
        y, _, mean, var = _channel_forward(x, weight, bias, prelu, running_mean, running_var, plan, float(eps), act,
                                           float(param), bool(inplace))
        return y, mean, var
    return _ChannelNorm.apply(x, weight, bias, prelu, running_mean, running_var, plan, float(eps), act,
                              float(param), bool(inplace))


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- rows: LayerNorm and RMSNorm -----------------------------------------------------------


def row_eligible(x: torch.Tensor, k: int) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and x.numel() > 0 and k > 0


class _RowNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, eps, centered):
        y = torch.empty_like(x)  # not a view: a later in-place op on it must stay legal
        w = weight.detach().reshape(-1).contiguous() if weight is not None else _EMPTY
        b = bias.detach().reshape(-1).contiguous() if bias is not None else _EMPTY
        ctx.stats = kernels().row_forward(x.view(-1, k), w, b, eps, centered, y.view(-1, k))
        ctx.save_for_backward(x, weight)
        ctx.bias_ref, ctx.eps, ctx.k, ctx.centered = bias, eps, k, centered
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composed reference
            return _row_double_backward(ctx, dy, x, weight)
        w = weight.detach().reshape(-1).contiguous() if weight is not None else _EMPTY
        dx, dw, db = kernels().row_backward(dy.contiguous().view(-1, ctx.k), x.view(-1, ctx.k), w, *ctx.stats,
                                            ctx.centered)
        dw = dw.to(weight.dtype).view(weight.shape) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(ctx.bias_ref.dtype).view(ctx.bias_ref.shape) if ctx.bias_ref is not None and ctx.needs_input_grad[2] else None
        return dx.view_as(x), dw, db, None, None, None


def _row_double_backward(ctx, dy, x, weight):
    bias = ctx.bias_ref
    if weight is not None:
        dims = tuple(range(x.dim() - weight.dim(), x.dim()))
    else:
        dims, size = [], 1
        for d in range(x.dim() - 1, -1, -1):  # the trailing dims that make up k
            dims.insert(0, d)
            size *= x.shape[d]
            if size == ctx.k:
                break
        dims = tuple(dims)
    with torch.enable_grad():
        y = reference_normalize(x, weight, bias, dims, ctx.eps, centered=ctx.centered)
        inputs = [t for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3]) if need and t is not None]
        found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True))
    grads = [next(found) if need and t is not None else None for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3])]
    return (*grads, None, None, None)


def row_norm(x, weight, bias, k: int, eps: float, *, centered: bool, operation: str):
    """LayerNorm (centered) / RMSNorm over the trailing ``k`` elements, or None."""
    if not row_eligible(x, k) or (weight is not None and weight.dtype != torch.float32):
        note(operation, "composed", "not float32 CPU contiguous")
        return None
    if kernels() is None:
        note(operation, "composed", "kernels unavailable")
        return None
    note(operation, "fast", "rows")
    if not _needs_grad(x, weight, bias):
        y = torch.empty_like(x)
        w = weight.detach().reshape(-1).contiguous() if weight is not None else _EMPTY
        b = bias.detach().reshape(-1).contiguous() if bias is not None else _EMPTY
        kernels().row_forward(x.view(-1, k), w, b, float(eps), centered, y.view(-1, k))
        return y
    return _RowNorm.apply(x, weight, bias, k, float(eps), centered)

