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
from ..core.paths import recomputing
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
    if training or running_var is None:
        count = reduced_count(input.shape, (0,) + spatial)
        if count <= 1:
            raise too_few_values(input)
        left, batch_var = _deviation(x, (0,) + spatial, eps)  # (1, C, 1, ...)
        # a checkpoint's recompute sees this step's batch again: merged once per real step
        if training and running_var is not None and not recomputing():
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
    else:
        left = (running_var.to(cdtype).view((1, channels) + (1,) * len(spatial)) + eps).sqrt()
    if vv is not None:
        right = x * vv.to(cdtype) + _deviation(x, spatial, eps)[0]
    elif variant == "b1":
        right = (x + 1) * _deviation(x, spatial, eps, centered=False)[0]
    elif variant == "b2":
        right = _deviation(x, spatial, eps, centered=False)[0] - x
    else:
        raise InputError(f"variant must be 'b0', 'b1' or 'b2', got {variant!r}")
    y = x / torch.maximum(left, right)
    return _affine(y, weight, bias, input, fn).to(input.dtype)


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
