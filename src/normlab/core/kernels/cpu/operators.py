"""The kernels as PyTorch operators, ``torch.ops.normlab.*``, for everything that must see an
operator: ``torch.compile``, FakeTensor and the meta device, TorchFunctionMode and
TorchDispatchMode, tensor subclasses, compiled autograd.

Each kernel is registered with ``torch.library.custom_op`` together with a fake (meta)
implementation and its autograd formula, so ``torch.compile`` sees an ordinary operator (no
graph break), the meta device and FakeTensor propagate shapes, and autograd runs the
closed-form C++ backward:

    normlab::channel_norm            BatchNorm / InstanceNorm / GroupNorm (+ activation)
    normlab::channel_norm_backward   its backward (dx, dγ, dβ, dPReLU)
    normlab::masked_channel_norm_backward   the masked one's (for compiled autograd)
    normlab::row_norm                LayerNorm / RMSNorm over the trailing k elements
    normlab::row_norm_backward       its backward (dx, dγ, dβ)
    normlab::add_row_norm            residual add + LayerNorm / RMSNorm
    normlab::add_row_norm_backward   its backward (d_sum, dγ, dβ)

Their bodies are entries.cpp's (the same kernels, the layout handled there); which calls run
them is the path rule's decision (:mod:`normlab.core.paths`). Eager calls outside any tracer
skip the operator dispatch, which costs more than the kernel on small tensors: they take the
families' direct entries (entries.cpp), whose C++ autograd nodes record the same formulas.
Per-group statistics come back in float64 for the channel norms, float32 per row for rows.

Notation: a *group* is what one (mean, variance) is taken over — a channel for BatchNorm or
given statistics, a (sample, group of channels) for GroupNorm/InstanceNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from ...activation import ACTIVATIONS
from . import build, double_backward

if TYPE_CHECKING:
    from torch._library.custom_ops import CustomOpDef

__all__ = ["add_row_norm", "channel_norm", "row_norm"]

_PRELU = ACTIVATIONS["prelu"].code

#: entries.cpp's function behind each operator: the operator's schema, and where the body takes
#: the in-place mode's flag (None: it takes none)
BODIES: dict[str, tuple[str, int | None]] = {}


def _define(
    name: str,
    schema: str,
    entry: str,
    fake: Callable[[SimpleNamespace], tuple[torch.Tensor, ...]],
    inplace_flag_at: int | None = None,
) -> CustomOpDef:
    """Register ``normlab::name`` from its schema, the one place its arguments are written.

    The operator's body is entries.cpp's ``entry``, called with the operator's arguments —
    and, where the entry also serves the in-place mode, False for that mode's flag at position
    ``inplace_flag_at``. The fake receives the arguments by their schema names.
    tests/kernels/test_build.py checks each entry's binding against its schema."""
    BODIES[entry] = (f"normlab::{name}{schema}", inplace_flag_at)
    at = inplace_flag_at

    def kernel(*args: object) -> tuple[torch.Tensor, ...]:
        if at is None:
            return tuple(getattr(build.module, entry)(*args))
        return tuple(getattr(build.module, entry)(*args[:at], False, *args[at:]))

    op = torch.library.custom_op(f"normlab::{name}", kernel, mutates_args=(), device_types="cpu", schema=schema)
    names = [argument.name for argument in torch._C.parse_schema(BODIES[entry][0]).arguments]
    op.register_fake(lambda *args, **kwargs: fake(SimpleNamespace(**dict(zip(names, args)), **kwargs)))
    return op


def _channel_groups(x: torch.Tensor, groups: int, given: bool) -> int:
    """Number of statistics groups: C for BatchNorm or given statistics, N·G otherwise."""
    return x.shape[1] if (groups < 0 or given) else x.shape[0] * groups


def _rows(x: torch.Tensor, k: int, count: int) -> tuple[torch.Tensor, ...]:
    """``count`` float32 statistics of one per row of k elements (row_norm's and add_row_norm's)."""
    return tuple(x.new_empty(x.numel() // k) for _ in range(count))


def _per_group(like: torch.Tensor, size: int, count: int) -> tuple[torch.Tensor, ...]:
    """``count`` float64 vectors of ``size``: per-group statistics, per-channel or per-element gradients."""
    return tuple(like.new_empty(size, dtype=torch.float64) for _ in range(count))


def _channel_norm_fake(a: SimpleNamespace) -> tuple[torch.Tensor, ...]:
    given = a.running_mean is not None
    k = _channel_groups(a.x, a.groups, given)
    return torch.empty_like(a.x), *_per_group(a.x, k, 3), *_per_group(a.x, 0 if given else k, 2)


# --- normlab::channel_norm -----------------------------------------------------------------
#
# channel_norm: (y, shift, offset, rstd, mean, var): y = act(γ·(x − shift − offset)·rstd + β).
# Statistics come from ``x`` (groups = -1: per channel over N and space; G > 0: per sample and
# group of C/G channels) unless ``running_mean``/``running_var`` are given. ``shift, offset,
# rstd`` (float64, one per group) are what the backward needs; ``mean, var`` (float64, biased
# variance) feed running estimates — empty when given.
# channel_norm_backward: (dx, dγ, dβ, dPReLU); the parameter gradients in float64 (C,).

channel_norm = _define(
    "channel_norm",
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, Tensor? prelu_weight, "
    "SymInt groups, float eps, SymInt act, float param) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "channel_forward",
    _channel_norm_fake,
    inplace_flag_at=10,
)
channel_norm_backward = _define(
    "channel_norm_backward",
    "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? prelu_weight, Tensor shift, Tensor offset, "
    "Tensor rstd, SymInt groups, bool given, SymInt act, float param) -> (Tensor, Tensor, Tensor, Tensor)",
    "channel_backward",
    lambda a: (torch.empty_like(a.x), *_per_group(a.x, a.x.shape[1], 3)),
    inplace_flag_at=10,  # from_output: x is the forward's input
)


def _channel_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, running_mean, _, prelu_weight, groups, eps, act, param = inputs
    _, shift, offset, rstd, _, _ = output
    ctx.save_for_backward(x, weight, bias, prelu_weight, shift, offset, rstd)
    ctx.groups, ctx.eps, ctx.act, ctx.param = groups, eps, act, param
    ctx.given = running_mean is not None


def _channel_backward(
    ctx: Any, dy: torch.Tensor, *_unused_stat_grads: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias, prelu, shift, offset, rstd = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * 10
    if torch.is_grad_enabled():  # create_graph=True: the kernel's result carries no graph
        dx, dw, db, dp = double_backward.channel(
            dy, x, weight, bias, prelu, shift, rstd, ctx.groups, ctx.given, ctx.eps, ctx.act, ctx.param, needs
        )
    else:
        dx, dw, db, dp = torch.ops.normlab.channel_norm_backward(
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

# normlab::masked_channel_norm_backward: the masked channel norms' backward (dx, dγ, dβ,
# dPReLU; the parameters' float64 per channel). Eager masked calls take the kernels' masked
# entry and its C++ node (entries.cpp, autograd.cpp), which runs this kernel itself; the
# operator is what that node records where compiled autograd traces its backward.
masked_channel_norm_backward = _define(
    "masked_channel_norm_backward",
    "(Tensor dy, Tensor x, Tensor mask, Tensor? weight, Tensor? bias, Tensor? prelu_weight, Tensor shift, "
    "Tensor offset, Tensor rstd, Tensor? count, SymInt groups, bool given, SymInt act, float param) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "masked_channel_backward",
    lambda a: (torch.empty_like(a.x), *_per_group(a.x, a.x.shape[1], 3)),
)


# --- normlab::row_norm: LayerNorm and RMSNorm ------------------------------------------------


# row_norm: (y, shift, rstd, offr) over the trailing ``k`` elements of contiguous ``x``;
# x̂ = (x − shift)·rstd − offr per row (float32 row statistics).
# row_norm_backward: (dx, dγ, dβ); dγ, dβ float64 over the k normalized elements.

row_norm = _define(
    "row_norm",
    "(Tensor x, Tensor? weight, Tensor? bias, SymInt k, float eps, bool centered) -> (Tensor, Tensor, Tensor, Tensor)",
    "row_forward",
    lambda a: (torch.empty_like(a.x), *_rows(a.x, a.k, 3)),
)
row_norm_backward = _define(
    "row_norm_backward",
    "(Tensor dy, Tensor x, Tensor? weight, Tensor shift, Tensor rstd, Tensor offr, SymInt k, bool centered) "
    "-> (Tensor, Tensor, Tensor)",
    "row_backward",
    lambda a: (torch.empty_like(a.x), *_per_group(a.x, a.k, 2)),
)


def _row_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    """row_norm's and add_row_norm's: their inputs end in (weight, bias, k, eps, centered), their
    outputs in the row statistics (shift, rstd, offr); backward reads the normalized tensor
    again — x, or the sum s that add_row_norm returns second."""
    weight, bias, k, eps, centered = inputs[-5:]
    normalized = output[1] if len(output) == 5 else inputs[0]
    ctx.save_for_backward(normalized, weight, bias, *output[-3:])
    ctx.k, ctx.eps, ctx.centered = k, eps, centered


def _row_backward(
    ctx: Any, dy: torch.Tensor, *_unused_stat_grads: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias, shift, rstd, offr = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiate the composed reference
        return (*double_backward.row(dy, x, weight, bias, ctx.k, ctx.eps, ctx.centered, needs), None, None, None)
    dx, dw, db = torch.ops.normlab.row_norm_backward(dy, x, weight, shift, rstd, offr, ctx.k, ctx.centered)
    dw = dw.to(weight.dtype).view(weight.shape) if weight is not None and needs[1] else None
    db = db.to(bias.dtype).view(bias.shape) if bias is not None and needs[2] else None
    return (dx if needs[0] else None), dw, db, None, None, None


row_norm.register_autograd(_row_backward, setup_context=_row_setup)


# --- normlab::add_row_norm: residual add + LayerNorm / RMSNorm -------------------------------
#
# The pre-norm transformer step s = x + r, y = norm(s) in one pass. What backward keeps is s
# (an output the caller holds anyway, the residual stream) and three floats per row — the
# same as the unfused ops, which keep s for their norm. Both x and r receive the same
# gradient, ds + norm_backward(dy).


# add_row_norm: (y, s, shift, rstd, offr): s = x + residual and y = norm(s) over the trailing
# ``k`` elements of contiguous, same-shaped ``x`` and ``residual``; statistics as row_norm's.
# add_row_norm_backward: (d_sum, dγ, dβ): d_sum = ds + norm_backward(dy) is the gradient of x
# and of the residual; dγ, dβ float64 over the k normalized elements.

add_row_norm = _define(
    "add_row_norm",
    "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, SymInt k, float eps, bool centered) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "add_row_forward",
    lambda a: (torch.empty_like(a.x), torch.empty_like(a.x), *_rows(a.x, a.k, 3)),
)
add_row_norm_backward = _define(
    "add_row_norm_backward",
    "(Tensor dy, Tensor? ds, Tensor s, Tensor? weight, Tensor shift, Tensor rstd, Tensor offr, SymInt k, "
    "bool centered) -> (Tensor, Tensor, Tensor)",
    "add_row_backward",
    lambda a: (torch.empty_like(a.s), *_per_group(a.s, a.k, 2)),
)


def _add_row_backward(
    ctx: Any, dy: torch.Tensor | None, ds: torch.Tensor | None, *_unused_stat_grads: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    s, weight, bias, shift, rstd, offr = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if dy is None:  # only s was differentiated (a caller that does not materialize zeros)
        d_sum = ds
        dw = torch.zeros_like(weight) if weight is not None and needs[2] else None
        db = torch.zeros_like(bias) if bias is not None and needs[3] else None
    elif torch.is_grad_enabled():  # create_graph=True: differentiate the composed reference
        d_sum, dw, db = double_backward.add_row(dy, ds, s, weight, bias, ctx.k, ctx.eps, ctx.centered, needs[2:4])
    else:
        d_sum, dw, db = torch.ops.normlab.add_row_norm_backward(
            dy, ds, s, weight, shift, rstd, offr, ctx.k, ctx.centered
        )
        dw = dw.to(weight.dtype).view(weight.shape) if weight is not None and needs[2] else None
        db = db.to(bias.dtype).view(bias.shape) if bias is not None and needs[3] else None
    if d_sum is None:
        d_sum = torch.zeros_like(s)
    return (d_sum if needs[0] else None), (d_sum if needs[1] else None), dw, db, None, None, None


add_row_norm.register_autograd(_add_row_backward, setup_context=_row_setup)
