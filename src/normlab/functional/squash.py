"""dyt and derf: the elementwise squashing that replaces normalization in norm-free transformers.

    DyT  (Zhu, Chen, He, LeCun & Liu, CVPR 2025):  y = γ·tanh(α·x) + β
    Derf (Chen, Lu, Zhu, Sun & Liu, 2025):          y = γ·erf(α·x + s) + β

α (and Derf's shift s) are learned scalars; γ and β are per channel. No statistics are taken:
each element is squashed on its own, which is why these layers cost one pass and need no
reduction. With z = α·x + s, t = f(z) and g = γ·dy, the gradients are

    dβ = Σ dy,   dγ = Σ dy·t,   dz = g·f'(z),   dx = α·dz,   dα = Σ dz·x,   ds = Σ dz

with f'(z) = 1 − t² for tanh and (2/√π)·exp(−z²) for erf (derivation in docs/derivations.md).
Derf's closed form saves only the input for backward and recomputes z and t there (autograd
through the composed ops keeps t and z: two more activation-sized tensors per layer, and
measured no faster); it runs eagerly on every dtype and device, and where the path rule says
"native" (export, jit.trace, torch.func, forward AD, a compile, a forced "native") the same
formula runs as plain torch ops. DyT is the composed ops everywhere: its closed form, which
must recompute tanh to keep only x, measured 1.1–1.6 times autograd's time, which keeps t.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core import check_floating_input, choose_path, compute_dtype
from ..core.paths import CLOSED_FORM
from ._params import affine_view, scalar_param

__all__ = ["derf", "dyt"]

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def dyt(
    input: torch.Tensor,
    alpha: torch.Tensor | float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """Dynamic Tanh: ``weight · tanh(alpha · input) + bias``.

    ``alpha`` is a scalar (a float or a one-element tensor). ``channels_last=True``: ``weight``
    and ``bias`` have the shape of the input's trailing dims ((C,) for (*, C) tokens); False:
    they have shape (C,) and apply along dim 1 of an (N, C, \\*spatial) input (ConvNeXt).

    Args:
        input: (\\*, C) tokens, or (N, C, \\*spatial) with ``channels_last=False``.
        alpha: α, a float or a one-element tensor.
        weight: γ, or None. Default None.
        bias: β, or None. Default None.
        channels_last: keyword-only; where the channels are. Default True.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: parameters of the wrong shape, a non-scalar ``alpha``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    return _squash("dyt", input, alpha, None, weight, bias, channels_last, erf=False)


def derf(
    input: torch.Tensor,
    alpha: torch.Tensor | float,
    shift: torch.Tensor | float = 0.0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """Dynamic erf: ``weight · erf(alpha · input + shift) + bias``.

    Args:
        input, alpha, weight, bias, channels_last: as for :func:`dyt`.
        shift: s, a float or a one-element tensor. Default 0.0.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: parameters of the wrong shape, a non-scalar ``alpha`` or ``shift``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    return _squash("derf", input, alpha, shift, weight, bias, channels_last, erf=True)


def _squash(
    fn: str,
    input: torch.Tensor,
    alpha: torch.Tensor | float,
    shift: torch.Tensor | float | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    channels_last: bool,
    *,
    erf: bool,
) -> torch.Tensor:
    check_floating_input(input)
    alpha_t = scalar_param(alpha, "alpha", input, fn)
    shift_t = None if shift is None else scalar_param(shift, "shift", input, fn)
    w = affine_view(weight, "weight", input, channels_last, fn)
    b = affine_view(bias, "bias", input, channels_last, fn)
    # DyT runs as plain ops everywhere: recomputing tanh in a closed-form backward (to keep only
    # x) measured 1.1-1.6 times the time of autograd keeping tanh(αx) (docs/derivations.md)
    if not erf or choose_path(input, CLOSED_FORM, fn)[0] == "native":
        return squash_reference(input, alpha_t, shift_t, w, b, erf=erf)
    # Function.apply is untyped in torch 2.13's stubs (typed from 2.14); forward says what it returns
    out: torch.Tensor = _Derf.apply(input, alpha_t, shift_t, w, b)  # type: ignore[no-untyped-call, unused-ignore]
    return out


def squash_reference(
    x: torch.Tensor,
    alpha: torch.Tensor,
    shift: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    erf: bool,
) -> torch.Tensor:
    """The formula in differentiable torch ops (float32 arithmetic for half inputs)."""
    cdtype = compute_dtype(x.dtype)
    z = x.to(cdtype) * alpha.to(cdtype)
    if shift is not None:
        z = z + shift.to(cdtype)
    y = torch.erf(z) if erf else torch.tanh(z)
    if weight is not None:
        y = y * weight.to(cdtype)
    if bias is not None:
        y = y + bias.to(cdtype)
    return y.to(x.dtype)


class _Derf(torch.autograd.Function):
    """y = γ·erf(αx + s) + β with the closed-form backward of the module docstring; saves x only."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        alpha: torch.Tensor,
        shift: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(x, alpha, shift, weight)
        cdtype = compute_dtype(x.dtype)
        z = x.to(cdtype) * alpha.to(cdtype)  # a fresh tensor: the rest runs in place on it
        if shift is not None:
            z.add_(shift.to(cdtype))
        y = torch.erf_(z)
        if weight is not None:
            y.mul_(weight.to(cdtype))
        if bias is not None:
            y.add_(bias.to(cdtype))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, alpha, shift, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: ops autograd can differentiate again
            return _derf_backward_differentiable(ctx, dy, x, alpha, shift, weight)
        need_x, need_alpha, need_shift, need_w, need_b = ctx.needs_input_grad
        cdtype = compute_dtype(x.dtype)
        xc = x.to(cdtype)
        dyc = dy.to(cdtype)
        z = xc * alpha.to(cdtype)  # recomputed: only x was kept
        if shift is not None:
            z.add_(shift.to(cdtype))
        g = dyc * weight.to(cdtype) if weight is not None else dyc.clone()
        t = torch.erf(z) if need_w else None
        dz = g.mul_(z.square_().neg_().exp_()).mul_(_TWO_OVER_SQRT_PI)  # g·f'(z), f' = 2/√π·exp(−z²)
        dw = (dyc * t).sum_to_size(weight.shape).to(weight.dtype) if need_w and t is not None else None
        db = dyc.sum_to_size(ctx.bias_shape).to(weight.dtype if weight is not None else dy.dtype) if need_b else None
        # Σ dz·x and Σ dz as dot products: no activation-sized temporary
        flat = dz.reshape(-1)
        dalpha = torch.dot(flat, xc.reshape(-1)).reshape(alpha.shape).to(alpha.dtype) if need_alpha else None
        dshift = flat.sum().reshape(shift.shape).to(shift.dtype) if need_shift else None
        dx = dz.mul_(alpha.to(cdtype)).to(x.dtype) if need_x else None
        return dx, dalpha, dshift, dw, db


def _derf_backward_differentiable(
    ctx: Any,
    dy: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    shift: torch.Tensor | None,
    weight: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """The closed form in out-of-place ops, for second derivatives."""
    need_x, need_alpha, need_shift, need_w, need_b = ctx.needs_input_grad
    cdtype = compute_dtype(x.dtype)
    xc = x.to(cdtype)
    dyc = dy.to(cdtype)
    z = xc * alpha.to(cdtype)
    if shift is not None:
        z = z + shift.to(cdtype)
    t = torch.erf(z)
    slope = torch.exp(-z * z) * _TWO_OVER_SQRT_PI
    dz = (dyc * weight.to(cdtype) if weight is not None else dyc) * slope
    dx = (dz * alpha.to(cdtype)).to(x.dtype) if need_x else None
    dalpha = (dz * xc).sum().reshape(alpha.shape).to(alpha.dtype) if need_alpha else None
    # a gradient is needed only for a tensor that was given: the None checks never decide
    dshift = dz.sum().reshape(shift.shape).to(shift.dtype) if need_shift and shift is not None else None
    dw = (dyc * t).sum_to_size(weight.shape).to(weight.dtype) if need_w and weight is not None else None
    db = dyc.sum_to_size(ctx.bias_shape).to(dy.dtype if weight is None else weight.dtype) if need_b else None
    return dx, dalpha, dshift, dw, db
