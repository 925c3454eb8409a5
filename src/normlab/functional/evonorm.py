"""EvoNorm (Liu, Brock, Simonyan & Le, 2020): normalization and activation found by search.

Two families, each a normalization of the classic five on its own axes plus a nonlinearity
in the numerator or the denominator (σ_B: batch, σ_I: instance, σ_G: group standard
deviation, all √(var + ε) of normlab's :func:`normlab.core.centered_moments`; ρ the
root mean square √(mean(x²) + ε) of :func:`normlab.core.mean_square`):

    B0:  y = x / max(σ_B, v·x + σ_I) · γ + β        σ_B from the batch in training,
    B1:  y = x / max(σ_B, (x + 1)·ρ_I) · γ + β      the running variance in eval
    B2:  y = x / max(σ_B, ρ_I − x) · γ + β
    S0:  y = x·sigmoid(v·x) / σ_G · γ + β
    S1:  y = act(x) / σ_G · γ + β                   (act: SiLU by default)
    S2:  y = act(x) / ρ_G · γ + β

The batch variance of B0–B2 is biased where it normalizes and stored unbiased in the
running estimate (n/(n − 1), momentum as torch.nn's), a batch whose variance is not finite
never reaches it (:func:`normlab.core.update_running_stats`). Without the nonlinearity
(timm's ``apply_act=False``) B0–B2, S0, S1 and S2 are the affine map alone, and the "a"
variants of S (timm's S0a, S1a, S2a) still divide by σ_G or ρ_G. Each standard deviation and
root mean square has its closed-form backward (one pass, only the input kept); the max, the
gate and the affine are differentiated by autograd around them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

from ..core import (
    centered_moments,
    check_eps,
    check_floating_input,
    choose_path,
    compute_dtype,
    mean_square,
    reduced_count,
    update_running_stats,
)
from ..core.call_checks import check_update_args, too_few_values
from ..core.checks import InputError
from ..core.closed_form import recomputed_grads
from ..core.paths import CLOSED_FORM, recomputing
from ..core.running import NonFinitePolicy
from ._params import affine_view

__all__ = ["evonorm_b0", "evonorm_batch", "evonorm_s0", "evonorm_sample"]


def evonorm_b0(
    input: torch.Tensor,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-3,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased_running_var: bool = True,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """EvoNorm-B0 of an (N, C, \\*spatial) input: ``x / max(σ_B, v·x + σ_I) · weight + bias``.

    σ_B is the batch standard deviation per channel when ``training`` (``running_var``, if
    given, is then updated in place) and √(running_var + eps) otherwise. ``v`` None is the
    layer without its nonlinearity: the affine map alone, as timm's ``apply_act=False``.

    Args:
        input: (N, C, \\*spatial), at least one spatial dim.
        running_var: (C,) running variance, updated in place in training; or None (batch
            statistics always).
        weight, bias: γ and β, shape (C,), or None.
        v: the learned (C,) coefficient of x in the instance term, or None (no nonlinearity).
        training: use (and merge) the batch's statistics. Default False.
        momentum: weight of the new batch in ``running_var``. Default 0.1.
        eps: added to each variance. Default 1e-3.
        num_batches_tracked, unbiased_running_var, on_nonfinite: keyword-only, as for
            :func:`batch_norm`.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: an input with fewer than 3 dims, parameters of the wrong shape, a
            batch of one value per channel in training, a bad ``eps`` or ``momentum``.
    """
    return evonorm_batch(
        input,
        running_var,
        weight,
        bias,
        v,
        training,
        momentum,
        eps,
        variant="b0",
        num_batches_tracked=num_batches_tracked,
        unbiased_running_var=unbiased_running_var,
        on_nonfinite=on_nonfinite,
    )


def evonorm_s0(
    input: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """EvoNorm-S0 of an (N, C, \\*spatial) input: ``x·sigmoid(v·x) / σ_G · weight + bias``, σ_G
    the standard deviation of each (sample, group of C/groups channels). ``v`` None: the affine
    map alone (timm's S0 with ``apply_act=False``).

    Args:
        input: (N, C, \\*spatial), at least one spatial dim.
        groups: G, a positive int dividing C.
        weight, bias: γ and β, shape (C,), or None.
        v: the learned (C,) gate coefficient, or None (no nonlinearity).
        eps: added to each variance. Default 1e-5.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: an input with fewer than 3 dims, ``groups`` not dividing C, parameters
            of the wrong shape, a bad ``eps``.
    """
    numerator = None if v is None else "gate"
    return evonorm_sample(
        input, groups, weight, bias, eps, numerator=numerator, v=v, stat="std" if v is not None else None
    )


def _check(fn: str, input: object, eps: object) -> float:
    input = check_floating_input(input)
    if input.dim() < 3:
        raise InputError(
            f"{fn} expects input of shape (N, C, *spatial) with at least one spatial dim, got a "
            f"{input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    return check_eps(eps)


def _affine(
    y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, input: torch.Tensor, fn: str
) -> torch.Tensor:
    w = affine_view(weight, "weight", input, False, fn)
    b = affine_view(bias, "bias", input, False, fn)
    if w is not None:
        y = y * w.to(y.dtype)
    if b is not None:
        y = y + b.to(y.dtype)
    return y


class _Deviation(torch.autograd.Function):
    """√(var + ε) (``centered``) or √(mean(x²) + ε) over ``dims``, kept as size-1 dims, with
    the closed-form backward dx = dσ·(x − μ)/(n·σ) (μ = 0 for the root mean square): one pass,
    keeping only x, where autograd through the moments keeps x − μ as well. The statistic
    itself (var or mean square) comes out too, not differentiable, for the running estimate."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dims: tuple[int, ...], eps: float, centered: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if centered:
            moments = centered_moments(x, dims)
            stat, shift, offset = moments.var, moments.shift, moments.offset
        else:
            stat, shift, offset = mean_square(x, dims), None, None
        deviation = (stat + eps).sqrt()
        ctx.dims, ctx.eps, ctx.centered = dims, eps, centered
        ctx.save_for_backward(x, shift, offset, deviation)
        ctx.mark_non_differentiable(stat)
        return deviation, stat

    @staticmethod
    def backward(ctx: Any, d_deviation: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        x, shift, offset, deviation = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the moments themselves
            with torch.enable_grad():
                again = _deviation_reference(x, ctx.dims, ctx.eps, ctx.centered)
                return torch.autograd.grad(again, x, d_deviation, create_graph=True)[0], None, None, None
        scale = d_deviation / (deviation * reduced_count(x.shape, ctx.dims))
        if not ctx.centered:
            return x * scale, None, None, None
        return (x - shift).sub_(offset).mul_(scale), None, None, None


def _deviation_reference(x: torch.Tensor, dims: tuple[int, ...], eps: float, centered: bool) -> torch.Tensor:
    stat = centered_moments(x, dims).var if centered else mean_square(x, dims)
    return (stat + eps).sqrt()


def _deviation(
    x: torch.Tensor, dims: tuple[int, ...], eps: float, *, centered: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, σ² − ε as computed): the standard deviation (or root mean square) over ``dims`` —
    closed-form backward unless the path rule says native, where the moments' own ops run."""
    if choose_path(x)[0] == "native":
        stat = centered_moments(x, dims).var if centered else mean_square(x, dims)
        return (stat + eps).sqrt(), stat
    # Function.apply is untyped in torch 2.13's stubs (typed from 2.14); forward says what it returns
    out: tuple[torch.Tensor, torch.Tensor] = _Deviation.apply(x, dims, eps, centered)  # type: ignore[no-untyped-call, unused-ignore]
    return out


def evonorm_batch(
    input: torch.Tensor,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    v: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    variant: str,
    apply_act: bool = True,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased_running_var: bool = True,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """The batch family: ``variant`` "b0" (needs ``v``; None means no nonlinearity), "b1" or
    "b2" (``apply_act=False``: no nonlinearity).

    Args:
        input, running_var, weight, bias, v, training, momentum, eps: as for
            :func:`evonorm_b0` (``v`` used by "b0" only).
        variant: keyword-only; "b0", "b1" or "b2".
        apply_act: keyword-only; the nonlinearity of "b1"/"b2" (without it, the affine map
            alone). Default True.
        num_batches_tracked, unbiased_running_var, on_nonfinite: keyword-only, as for
            :func:`batch_norm`.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: an unknown ``variant``, and the errors of :func:`evonorm_b0`.
    """
    fn = f"evonorm_{variant}"
    eps = _check(fn, input, eps)
    channels = input.shape[1]
    if running_var is not None:
        affine_view(running_var, "running_var", input, False, fn)
    acts = (v is not None) if variant == "b0" else apply_act
    if not acts:
        return _affine(input, weight, bias, input, fn)
    # b0's v (not None here: b0 has its nonlinearity only with v); None for b1 and b2
    vv = affine_view(v, "v", input, False, fn) if variant == "b0" else None
    if input.numel() == 0:
        # An empty batch has no statistics to normalize by or to merge: an empty output and
        # the estimates unchanged, as normlab's BatchNorm (torch.nn's too, bar its counter);
        # every parameter still gets its (zero) gradient.
        y = input * vv.to(input.dtype) if vv is not None else input
        return _affine(y, weight, bias, input, fn)
    cdtype = compute_dtype(input.dtype)
    x = input.to(cdtype)
    spatial = tuple(range(2, input.dim()))
    batch_statistics = training or running_var is None
    count = reduced_count(input.shape, (0,) + spatial)
    if batch_statistics and count <= 1:
        raise too_few_values(input)
    batch_var: torch.Tensor | None = None
    if vv is not None and choose_path(input, CLOSED_FORM, fn)[0] != "native":
        for name, param in (("weight", weight), ("bias", bias)):
            affine_view(param, name, input, False, fn)  # checked here: the Function takes them as (C,)
        # Function.apply is untyped in torch 2.13's stubs (typed from 2.14); forward says what it returns
        y, batch_var = _EvoNormB0.apply(input, v, weight, bias, None if batch_statistics else running_var, eps)  # type: ignore[no-untyped-call, unused-ignore]
    else:
        if batch_statistics:
            left, batch_var = _deviation(x, (0,) + spatial, eps)  # (1, C, 1, ...)
        else:
            assert running_var is not None  # batch_statistics' condition
            left = (running_var.to(cdtype).view((1, channels) + (1,) * len(spatial)) + eps).sqrt()
        if vv is not None:
            right = x * vv.to(cdtype) + _deviation(x, spatial, eps)[0]
        elif variant == "b1":
            right = (x + 1) * _deviation(x, spatial, eps, centered=False)[0]
        elif variant == "b2":
            right = _deviation(x, spatial, eps, centered=False)[0] - x
        else:
            raise InputError(f"variant must be 'b0', 'b1' or 'b2', got {variant!r}")
        y = _affine(x / torch.maximum(left, right), weight, bias, input, fn).to(input.dtype)
    # a checkpoint's recompute sees this step's batch again: merged once per real step
    if training and batch_var is not None and running_var is not None and not recomputing():
        momentum = check_update_args(momentum, num_batches_tracked, on_nonfinite)
        # EvoNorm keeps no running mean: a zero stand-in, finite by construction.
        zeros = torch.zeros_like(running_var)
        update_running_stats(
            zeros,
            running_var,
            zeros,
            batch_var.detach().reshape(channels),
            count,
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=unbiased_running_var,
            on_nonfinite=cast(NonFinitePolicy, on_nonfinite),  # checked by check_update_args
        )
    return y


def evonorm_sample(
    input: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    numerator: str | Callable[[torch.Tensor], torch.Tensor] | None,
    stat: str | None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sample family: ``numerator`` "gate" (x·sigmoid(v·x)), a callable (``act(x)``) or None
    (x), divided by ``stat`` "std" (σ_G), "rms" (ρ_G) or None (no division); then the affine.

    Args:
        input, groups, weight, bias: as for :func:`evonorm_s0`.
        eps: added to each variance (or mean square).
        numerator: keyword-only; "gate", a callable, or None.
        stat: keyword-only; "std", "rms" or None.
        v: keyword-only; the (C,) gate coefficient, needed for ``numerator="gate"``.
            Default None.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: an unknown ``stat``, and the errors of :func:`evonorm_s0`.
    """
    fn = "evonorm_s"
    eps = _check(fn, input, eps)
    channels = input.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
        raise InputError(f"{fn}: groups={groups!r} must be a positive int dividing the {channels} channels of dim 1")
    if numerator is None and stat is None:
        return _affine(input, weight, bias, input, fn)
    cdtype = compute_dtype(input.dtype)
    x = input.to(cdtype)
    if numerator == "gate":
        vv = affine_view(v, "v", input, False, fn)
        if vv is None:
            raise InputError(f"{fn}: numerator='gate' needs v, a tensor of shape (C,), got None")
        if stat == "std" and input.numel() and choose_path(input, CLOSED_FORM, fn)[0] != "native":
            for name, param in (("weight", weight), ("bias", bias)):
                affine_view(param, name, input, False, fn)  # checked here: the Function takes them as (C,)
            # Function.apply is untyped in torch 2.13's stubs (typed from 2.14); forward says what it returns
            out: torch.Tensor = _EvoNormS0.apply(input, v, weight, bias, groups, eps)  # type: ignore[no-untyped-call, unused-ignore]
            return out
        top = x * torch.sigmoid(x * vv.to(cdtype))
    elif numerator is None:
        top = x
    elif isinstance(numerator, str):
        raise InputError(f"numerator must be 'gate', a callable or None, got {numerator!r}")
    else:
        top = numerator(x)
    if stat is not None:
        # (N, G, C//G, *spatial): a view; Tensor.unflatten is untyped in torch's stubs
        grouped: torch.Tensor = x.unflatten(1, (groups, channels // groups))  # type: ignore[no-untyped-call]
        dims = tuple(range(2, grouped.dim()))
        if stat not in ("std", "rms"):
            raise InputError(f"stat must be 'std', 'rms' or None, got {stat!r}")
        denominator = _deviation(grouped, dims, eps, centered=stat == "std")[0]  # (N, G, 1, ...)
        top_grouped: torch.Tensor = top.unflatten(1, (groups, channels // groups))  # type: ignore[no-untyped-call]
        top = (top_grouped / denominator).flatten(1, 2)
    return _affine(top, weight, bias, input, fn).to(input.dtype)


def _evonorm_s0_reference(
    x: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float,
) -> torch.Tensor:
    """EvoNorm-S0 in differentiable torch ops (what the closed form's second derivative
    differentiates): x·sigmoid(v·x) / σ_G · γ + β."""
    xg, vg, wg, bg = _grouped_call(x, v, weight, bias, groups, compute_dtype(x.dtype))
    var = centered_moments(xg, tuple(range(2, xg.dim()))).var
    y = xg * torch.sigmoid(xg * vg) / (var + eps).sqrt()
    y = y * wg if wg is not None else y
    y = y + bg if bg is not None else y
    return y.flatten(1, 2).to(x.dtype)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x as (N, G, C//G, *spatial): a view."""
    grouped: torch.Tensor = x.unflatten(1, (groups, x.shape[1] // groups))  # type: ignore[no-untyped-call]
    return grouped


def _group_view(param: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """A (C,) parameter viewed to broadcast against the grouped input, in its dtype."""
    return param.to(grouped.dtype).view((1,) + tuple(grouped.shape[1:3]) + (1,) * (grouped.dim() - 3))


def _grouped_call(
    x: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    cdtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """EvoNorm-S0's input in ``cdtype`` as (N, G, C//G, *spatial) and v, γ, β viewed against it
    (the reference, the forward and the backward all start here)."""
    xg = _grouped(x.to(cdtype), groups)
    wg = None if weight is None else _group_view(weight, xg)
    bg = None if bias is None else _group_view(bias, xg)
    return xg, _group_view(v, xg), wg, bg


class _EvoNormS0(torch.autograd.Function):
    """EvoNorm-S0 with its closed-form backward (docs/derivations.md): with s = sigmoid(v·x),
    r = 1/σ_G, q = x·s·r, g = γ·dy and h = g·r,

        dx = h·(s + v·x·s·(1 − s)) − r·x̂·mean_G(g·q),   dv = Σ h·x²·s·(1 − s),
        dγ = Σ dy·q,   dβ = Σ dy   (x̂ = (x − μ_G)·r)

    in one backward pass over x, keeping only x and the per-group statistics."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        groups: int,
        eps: float,
    ) -> torch.Tensor:
        xg, vg, wg, bg = _grouped_call(x, v, weight, bias, groups, compute_dtype(x.dtype))
        moments = centered_moments(xg, tuple(range(2, xg.dim())))
        rstd = (moments.var + eps).rsqrt_()  # (N, G, 1, ...)
        y = torch.sigmoid(xg * vg).mul_(xg).mul_(rstd)
        if wg is not None:
            y.mul_(wg)
        if bg is not None:
            y.add_(bg)
        ctx.groups, ctx.eps = groups, eps
        ctx.save_for_backward(x, v, weight, bias, moments.shift, moments.offset, rstd)
        return y.flatten(1, 2).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, v, weight, bias, shift, offset, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula itself
            return recomputed_grads(ctx, _evonorm_s0_reference, (x, v, weight, bias, ctx.groups, ctx.eps), dy)
        need = ctx.needs_input_grad
        cdtype = rstd.dtype
        xg, vg, wg, _ = _grouped_call(x, v, weight, None, ctx.groups, cdtype)
        dyg = _grouped(dy.to(cdtype), ctx.groups)
        positions = (0,) + tuple(range(3, xg.dim()))  # a channel's: the samples and the spatial dims
        z = xg * vg
        gate = torch.sigmoid(z)
        q = xg * gate * rstd
        g = dyg * wg if wg is not None else dyg
        d_weight = (dyg * q).sum(positions).flatten().to(weight.dtype) if need[2] else None
        d_bias = dyg.sum(positions).flatten().to(bias.dtype) if need[3] else None
        group_dims = tuple(range(2, xg.dim()))
        # −r·mean_G(g·q): the σ_G term's coefficient of x̂, one per (sample, group)
        coefficient = (g * q).mean(group_dims, keepdim=True).mul_(rstd)
        h = g * rstd
        slope = (1 - gate).mul_(gate)  # s·(1 − s)
        d_v = (h * slope * xg * xg).sum(positions).flatten().to(v.dtype) if need[1] else None
        d_x = None
        if need[0]:
            x_hat = (xg - shift).sub_(offset).mul_(rstd)
            d_x = slope.mul_(z).add_(gate).mul_(h).sub_(x_hat.mul_(coefficient))
            d_x = d_x.flatten(1, 2).to(x.dtype)
        return d_x, d_v, d_weight, d_bias, None, None


def _evonorm_b0_reference(
    x: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EvoNorm-B0 in differentiable torch ops: (y, the batch variance — empty with
    ``running_var`` given)."""
    cdtype = compute_dtype(x.dtype)
    xc = x.to(cdtype)
    view = (1, -1) + (1,) * (x.dim() - 2)
    spatial = tuple(range(2, x.dim()))
    if running_var is None:
        batch_var = centered_moments(xc, (0,) + spatial).var
        left = (batch_var + eps).sqrt()
    else:
        batch_var = xc.new_empty(0)
        left = (running_var.to(cdtype).view(view) + eps).sqrt()
    right = xc * v.to(cdtype).view(view) + (centered_moments(xc, spatial).var + eps).sqrt()
    y = xc / torch.maximum(left, right)
    y = y * weight.to(cdtype).view(view) if weight is not None else y
    y = y + bias.to(cdtype).view(view) if bias is not None else y
    return y.to(x.dtype), batch_var


class _EvoNormB0(torch.autograd.Function):
    """EvoNorm-B0 with its closed-form backward (docs/derivations.md): with the denominator
    m = max(σ_B, v·x + σ_I) (the gradient to the larger side, half each at a tie, as
    torch.maximum's), q = x/m, g = γ·dy and e = −g·q/m (dm),

        dx = g/m + v·e_I + x̂_I·Σ_I e_I / n_I + x̂_B·Σ_B e_B / n_B,   dv = Σ e_I·x,
        dγ = Σ dy·q,   dβ = Σ dy

    where e_I, e_B are e's shares on the instance and the batch side and x̂_k = (x − μ_k)/σ_k
    (no batch term with the running variance given). Keeps x and the per-channel and
    per-(sample, channel) statistics only."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cdtype = compute_dtype(x.dtype)
        xc = x.to(cdtype)
        view = (1, -1) + (1,) * (x.dim() - 2)
        spatial = tuple(range(2, x.dim()))
        batch_shift: torch.Tensor | None = None
        batch_offset: torch.Tensor | None = None
        if running_var is None:
            batch = centered_moments(xc, (0,) + spatial)
            batch_shift, batch_offset, batch_var = batch.shift, batch.offset, batch.var
            left = (batch_var + eps).sqrt()  # (1, C, 1, ...)
        else:
            batch_var = xc.new_empty(0)
            left = (running_var.to(cdtype).view(view) + eps).sqrt()
        instance = centered_moments(xc, spatial)
        instance_std = (instance.var + eps).sqrt_()  # (N, C, 1, ...)
        y = torch.maximum(left, (xc * v.to(cdtype).view(view)).add_(instance_std))
        y = torch.div(xc, y, out=y)
        if weight is not None:
            y.mul_(weight.to(cdtype).view(view))
        if bias is not None:
            y.add_(bias.to(cdtype).view(view))
        ctx.eps = eps
        ctx.save_for_backward(
            x, v, weight, bias, running_var, left, batch_shift, batch_offset, instance_std, instance.shift,
            instance.offset,
        )  # fmt: skip
        ctx.mark_non_differentiable(batch_var)
        return y.to(x.dtype), batch_var

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        x, v, weight, bias, running_var, left, batch_shift, batch_offset, instance_std, shift, offset = (
            ctx.saved_tensors
        )
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula itself
            return recomputed_grads(ctx, _evonorm_b0_reference, (x, v, weight, bias, running_var, ctx.eps), dy)
        need = ctx.needs_input_grad
        cdtype = left.dtype
        xc = x.to(cdtype)
        dyc = dy.to(cdtype)
        view = (1, -1) + (1,) * (x.dim() - 2)
        spatial = tuple(range(2, x.dim()))
        right = (xc * v.to(cdtype).view(view)).add_(instance_std)
        denominator = torch.maximum(left, right)
        q = xc / denominator
        g = dyc * weight.to(cdtype).view(view) if weight is not None else dyc
        d_weight = (dyc * q).sum((0,) + spatial).to(weight.dtype) if need[2] else None
        d_bias = dyc.sum((0,) + spatial).to(bias.dtype) if need[3] else None
        d_x = g / denominator
        d_denominator = q.mul_(g).div_(denominator).neg_()  # −g·q/m
        # torch.maximum's split: all to the larger side, half each at a tie, none at a NaN
        tie = (left == right).to(cdtype).mul_(0.5)
        d_right = (right > left).to(cdtype).add_(tie).mul_(d_denominator)
        d_v = (d_right * xc).sum((0,) + spatial).to(v.dtype) if need[1] else None
        if not need[0]:
            return None, d_v, d_weight, d_bias, None, None
        d_x.addcmul_(d_right, v.to(cdtype).view(view))
        # σ_I's gradient Σ e_I reaches x as (x − μ_I)/(n_I·σ_I)
        instance_scale = d_right.sum(spatial, keepdim=True).div_(instance_std * reduced_count(x.shape, spatial))
        d_x.addcmul_((xc - shift).sub_(offset), instance_scale)
        if running_var is None:
            d_left = (left > right).to(cdtype).add_(tie).mul_(d_denominator)
            dims = (0,) + spatial
            batch_scale = d_left.sum(dims, keepdim=True).div_(left * reduced_count(x.shape, dims))
            d_x.addcmul_((xc - batch_shift).sub_(batch_offset), batch_scale)
        return d_x.to(x.dtype), d_v, d_weight, d_bias, None, None
