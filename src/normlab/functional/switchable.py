"""switchable_norm: Switchable Normalization (Luo, Ren, Peng, Zhang & Li, 2019).

The mean and the variance are learned mixtures of the InstanceNorm, LayerNorm and BatchNorm
statistics of the same input — three groupings of the axes of one computation:

    μ  = Σ_k softmax(λ_μ)_k · μ_k,     σ² = Σ_k softmax(λ_σ)_k · σ²_k,     k ∈ {IN, LN, BN}
    y  = γ · (x − μ) / √(σ² + ε) + β

μ_IN, σ²_IN are the moments of each (sample, channel) over the spatial dims, LN's those of
each sample, BN's those of each channel: each one reduction (``torch.var_mean``, Welford's
algorithm) of the input less a per-channel shift — never E[x²] − E[x]², which the authors'
code uses and which cancels on large-mean data. All three variances are biased. In eval (or when frozen)
the BN statistics are the running estimates, kept as torch.nn's BatchNorm keeps them
(momentum, unbiased running variance, a non-finite batch skipped). Gradients flow through all
three sets of statistics and the two softmaxes: a closed-form backward (docs/derivations.md),
except where the path rule says "native" (export, ``jit.trace``, ``torch.func``, forward AD,
a forced "native"), where the same formula runs as differentiable torch ops.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch

from ..core import choose_path, compute_dtype, reduced_count, update_running_stats
from ..core.call_checks import check_channel_call, check_update_args, too_few_values
from ..core.checks import InputError
from ..core.closed_form import recomputed_grads
from ..core.paths import CLOSED_FORM, recomputing
from ..core.running import NonFinitePolicy
from ._params import check_kind

__all__ = ["switchable_norm"]


def switchable_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean_weight: torch.Tensor,
    var_weight: torch.Tensor,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased_running_var: bool = True,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """Switchable Normalization of an (N, C, \\*spatial) input.

    ``mean_weight`` and ``var_weight`` are the logits λ_μ, λ_σ of the mixture: 3 entries
    (IN, LN, BN) or 2 (IN, LN: no batch statistics, so nothing depends on the batch). The BN
    statistics are the batch's when ``training`` or when no running estimates are given (the
    estimates, if given, are then updated in place), else the running estimates.

    Args:
        input: (N, C, \\*spatial), at least one spatial dim.
        running_mean, running_var: (C,) running estimates of the BN statistics, or None.
        weight, bias: γ and β, shape (C,), or None.
        mean_weight, var_weight: the mixture logits, 3 entries (IN, LN, BN) or 2 (IN, LN).
        training, momentum, eps: as for :func:`batch_norm`.
        num_batches_tracked, unbiased_running_var, on_nonfinite: keyword-only, as for
            :func:`batch_norm`.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: an input with fewer than 3 dims, logits of another length or of
            different lengths, parameters of the wrong shape, a bad ``eps``/``momentum``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    fn = "switchable_norm"
    eps = check_channel_call(
        fn, input, weight, bias, running_mean, running_var, eps, shape_words="(N, C, *spatial)", min_rank=3
    )
    kinds = _check_mixture(mean_weight, var_weight, input)
    if input.numel() == 0:
        # An empty batch has no statistics to mix or to merge: an empty output and the
        # estimates unchanged, as normlab's BatchNorm (torch.nn's too, bar its counter). The
        # logits multiply the (empty) input only so that they too get their zero gradient.
        y = input * (mean_weight.sum() + var_weight.sum()).to(input.dtype)
        if weight is not None:
            y = y * weight.to(input.dtype).view((1, -1) + (1,) * (input.dim() - 2))
        if bias is not None:
            y = y + bias.to(input.dtype).view((1, -1) + (1,) * (input.dim() - 2))
        return y
    use_bn = kinds == 3
    cdtype = compute_dtype(input.dtype)
    spatial = tuple(range(2, input.dim()))
    channel_shape = (1, input.shape[1]) + (1,) * len(spatial)
    # Every mean is carried relative to a shift c (a constant to autograd): x − c keeps the
    # digits of the spread, and x − μ = d − Σ wₖ·mₖ with d = x − c and mₖ = μₖ − c. Means near
    # 1e4 rounded to float32 would each be off by up to 5e-4, 5% of a 0.01 spread, in every
    # output. c is the batch's channel mean when the batch's BN statistics are used; otherwise
    # (eval, or IN and LN only) each sample's own channel means, so that no sample's output
    # depends on another's (one sample's NaN stays in that sample, as in torch.nn's eval BatchNorm).
    batch_statistics = use_bn and (training or running_mean is None)
    if batch_statistics and input.shape[0] * reduced_count(input.shape, spatial) <= 1:
        raise too_few_values(input)
    with torch.no_grad():
        shift = input.to(cdtype).mean(((0,) if batch_statistics else ()) + spatial, keepdim=True)
        layer_shift = shift - shift.mean(1, keepdim=True)  # each channel's shift relative to their mean
        given_mean = given_var = None
        if use_bn and not batch_statistics:
            assert running_mean is not None and running_var is not None  # batch_statistics' condition
            given_mean = running_mean.to(cdtype).view(channel_shape) - shift
            given_var = running_var.to(cdtype).view(channel_shape)
    args = (
        input,
        weight,
        bias,
        mean_weight,
        var_weight,
        given_mean,
        given_var,
        shift,
        layer_shift,
        eps,
        batch_statistics,
    )
    if choose_path(input, CLOSED_FORM, fn)[0] == "native":
        y, batch_mean, batch_var = _switchable_reference(*args)
    else:
        # Function.apply is untyped in torch 2.13's stubs (typed from 2.14); forward says what it returns
        y, batch_mean, batch_var = _Switchable.apply(*args)  # type: ignore[no-untyped-call, unused-ignore]
    # a checkpoint's recompute sees this step's batch again: merged once per real step
    if batch_statistics and training and running_mean is not None and not recomputing():
        assert running_var is not None  # check_channel_call: both estimates or neither
        momentum = check_update_args(momentum, num_batches_tracked, on_nonfinite)
        update_running_stats(
            running_mean,
            running_var,
            (batch_mean.detach() + shift).flatten(),
            batch_var.detach().flatten(),
            input.shape[0] * reduced_count(input.shape, spatial),
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=unbiased_running_var,
            on_nonfinite=cast(NonFinitePolicy, on_nonfinite),  # checked by check_update_args
        )
    return y


def _groupings(
    d: torch.Tensor,
    layer_shift: torch.Tensor,
    batch_statistics: bool,
    given_mean: torch.Tensor | None,
    given_var: torch.Tensor | None,
    *,
    fast: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The means (relative to the shift) and biased variances of IN, LN and (the batch's or
    the given) BN, stacked: (K, N, C, 1, ...) each, K = 3 or 2 (IN and LN only).

    ``fast`` (the closed form's forward): IN's by two passes over d = x − c (its mean, then the
    mean square about it); LN and BN pool whole (sample, channel) planes of one size, so
    theirs follow from the planes' without another pass over d: the mean of the planes'
    means and (law of total variance) the mean of their variances plus the variance of their
    means — exact, no sum of squares subtracted. Otherwise (the differentiable formula, which
    exporters and torch.func see) one torch.var_mean (Welford) per grouping: ops every
    exporter knows, at about 15 times a sum's cost per element on the CPU."""
    spatial = tuple(range(2, d.dim()))
    if fast:
        instance_mean = d.mean(spatial, keepdim=True)  # (N, C, 1, ...)
        centered = d - instance_mean
        # squares of a spread above 1.8e19 overflow float32: taken over a power of two near
        # each plane's largest |value| (an exact division) and scaled back
        exponent = torch.frexp(centered.abs().amax(spatial, keepdim=True))[1]
        unit = torch.ldexp(torch.ones_like(instance_mean), exponent)
        instance_var = centered.div_(unit).square_().mean(spatial, keepdim=True).mul_(unit).mul_(unit)
        pooled = instance_mean + layer_shift  # relative to one shift c̄ per sample (LN pools the channels)
        layer_mean = pooled.mean(1, keepdim=True)
        layer_var = _total_variance(instance_var, pooled, layer_mean, 1)
    else:
        instance_var, instance_mean = torch.var_mean(d, spatial, correction=0, keepdim=True)
        # LN pools the channels, whose shifts differ: d + (c − c̄) is x relative to one shift c̄
        layer_var, layer_mean = torch.var_mean(d + layer_shift, (1,) + spatial, correction=0, keepdim=True)
    means = [instance_mean, layer_mean - layer_shift]
    variances = [instance_var, layer_var]
    if batch_statistics:
        if fast:
            batch_mean = instance_mean.mean(0, keepdim=True)  # (1, C, 1, ...)
            batch_var = _total_variance(instance_var, instance_mean, batch_mean, 0)
        else:
            batch_var, batch_mean = torch.var_mean(d, (0,) + spatial, correction=0, keepdim=True)
        means.append(batch_mean)
        variances.append(batch_var)
    elif given_mean is not None and given_var is not None:
        means.append(given_mean)
        variances.append(given_var)
    return _stacked(means), _stacked(variances)


def _weighted(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Σₖ weightsₖ·stackedₖ over dim 0, in elementwise ops: autocast would run a tensordot in
    bfloat16 (it lists matrix products)."""
    return (weights.view((-1,) + (1,) * (stacked.dim() - 1)) * stacked).sum(0)


def _stacked(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Tensors of broadcastable shapes, broadcast and stacked along a new dim 0."""
    return torch.stack(torch.broadcast_tensors(*tensors))  # type: ignore[no-untyped-call, unused-ignore]  # unannotated in torch 2.13


def _total_variance(variances: torch.Tensor, means: torch.Tensor, pooled_mean: torch.Tensor, dim: int) -> torch.Tensor:
    """The variance of equal-sized parts pooled along ``dim``: mean of their variances plus
    the variance of their means. Each term is divided by the count before it is summed (a
    mean sums first, which overflows float32 where the variances are near 1e38)."""
    share = 1.0 / variances.shape[dim]
    spread = (means - pooled_mean).mul_(math.sqrt(share)).square_().sum(dim, keepdim=True)
    return (variances * share).sum(dim, keepdim=True).add_(spread)


def _switchable_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean_weight: torch.Tensor,
    var_weight: torch.Tensor,
    given_mean: torch.Tensor | None,
    given_var: torch.Tensor | None,
    shift: torch.Tensor,
    layer_shift: torch.Tensor,
    eps: float,
    batch_statistics: bool,
    rescaled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The formula in differentiable torch ops: (y, the batch's BN mean relative to the shift,
    its variance) — the batch statistics empty when they are not used.

    ``rescaled`` (the create_graph backward's): d = x − c times a power of two s ≈ 1/max|d|
    (at most 1, and not so small that ε·s² leaves float32's normal range), and r taken as
    √((σ'² + ε·s²)·u²)⁻¹·u with u a power of two ≈ 1/√(σ'² + ε·s²) per (sample, channel), both
    constants to autograd: y the same value (every scaling exact), and the derivatives autograd
    forms — (σ² + ε)^(-3/2) for the first, ^(-5/2) for the second — near 1, not r³ and r⁵,
    which underflow float32 above σ ≈ 1e12.6 and 1e7.6. The batch moments are then in units of s."""
    cdtype = shift.dtype
    d = x.to(cdtype) - shift
    eps_scaled: float | torch.Tensor = eps
    if rescaled:
        with torch.no_grad():
            largest = torch.frexp(d.abs().amax())[1]
            floor = _smallest_scale(eps, cdtype)
            s = torch.ldexp(torch.ones((), dtype=cdtype), largest.neg()).clamp_(floor, 1.0)
        d = d * s
        layer_shift = layer_shift * s
        if given_mean is not None and given_var is not None:
            given_mean = given_mean * s
            given_var = given_var * s * s
        eps_scaled = eps * s * s
    means, variances = _groupings(d, layer_shift, batch_statistics, given_mean, given_var, fast=False)
    mean = _weighted(torch.softmax(mean_weight.to(cdtype), 0), means)  # Σ wₖ·mₖ, (N, C, 1, ...)
    var = _weighted(torch.softmax(var_weight.to(cdtype), 0), variances)
    if rescaled:
        with torch.no_grad():
            # (σ² + ε)·u² in [½, 2); u = 1 where σ² + ε is 0 or not finite (frexp's exponent 0)
            u = torch.ldexp(
                torch.ones_like(var), torch.frexp(var + eps_scaled)[1].div_(2, rounding_mode="floor").neg_()
            )
        # u applied twice, not u²: u² may leave float32's range where u does not
        rstd = torch.rsqrt((var + eps_scaled) * u * u) * u
    else:
        rstd = torch.rsqrt(var + eps)
    y = (d - mean) * rstd
    channel_shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(cdtype).view(channel_shape)
    if bias is not None:
        y = y + bias.to(cdtype).view(channel_shape)
    return (y.to(x.dtype),) + _batch_moments(means, variances, batch_statistics)


def _batch_moments(
    means: torch.Tensor, variances: torch.Tensor, batch_statistics: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's BN mean and variance, (1, C, 1, ...), for the running estimates; empty
    tensors when the batch's BN statistics are not used."""
    if not batch_statistics:
        empty = means.new_empty(0)
        return empty, empty
    return means[2, :1], variances[2, :1]


class _Switchable(torch.autograd.Function):
    """Switchable Normalization with the closed-form backward of docs/derivations.md: with
    x̂ = (d − μ)·r, r = 1/√(σ² + ε), g = γ·dy, A = Σ g and B = Σ g·x̂ over each (sample,
    channel)'s positions, dμ = −r·A and dσ² = −½·r²·B per (sample, channel); each grouping k
    receives wₖ·dμ, wₖ·dσ² summed over the axes its statistic pools, and the input
    dx = g·r + Σₖ (dμₖ + 2·dσ²ₖ·(d − mₖ))/nₖ — never r³, which underflows float32 above
    σ ≈ 1e12.6. Keeps the input and per-(sample, channel) statistics only."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean_weight: torch.Tensor,
        var_weight: torch.Tensor,
        given_mean: torch.Tensor | None,
        given_var: torch.Tensor | None,
        shift: torch.Tensor,
        layer_shift: torch.Tensor,
        eps: float,
        batch_statistics: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cdtype = shift.dtype
        d = x.to(cdtype) - shift
        means, variances = _groupings(d, layer_shift, batch_statistics, given_mean, given_var, fast=True)
        mix_mean = torch.softmax(mean_weight.to(cdtype), 0)
        mix_var = torch.softmax(var_weight.to(cdtype), 0)
        mean = _weighted(mix_mean, means)  # (N, C, 1, ...)
        var = _weighted(mix_var, variances)
        rstd = (var + eps).rsqrt_()
        y = d.sub_(mean).mul_(rstd)  # d is this call's own
        channel_shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        if weight is not None:
            y.mul_(weight.to(cdtype).view(channel_shape))
        if bias is not None:
            y.add_(bias.to(cdtype).view(channel_shape))
        ctx.eps, ctx.batch_statistics = eps, batch_statistics
        ctx.save_for_backward(
            x, weight, bias, mean_weight, var_weight, given_mean, given_var, shift, layer_shift,
            mean, var, rstd, means, variances, mix_mean, mix_var,
        )  # fmt: skip
        batch_mean, batch_var = _batch_moments(means, variances, batch_statistics)
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return y.to(x.dtype), batch_mean, batch_var

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula itself
            inputs = (*saved[:9], ctx.eps, ctx.batch_statistics)
            reference = functools.partial(_switchable_reference, rescaled=True)
            return recomputed_grads(ctx, reference, inputs, dy)
        x, weight, _, mean_weight, var_weight, _, _, shift, _, mean, var, rstd, means, variances, mix_mean, mix_var = (
            saved
        )
        need = ctx.needs_input_grad
        cdtype = rstd.dtype
        spatial = tuple(range(2, x.dim()))
        channel_shape = (1, x.shape[1]) + (1,) * len(spatial)
        d = x.to(cdtype) - shift
        x_hat = (d - mean).mul_(rstd)
        dyc = dy.to(cdtype)
        g = dyc * weight.to(cdtype).view(channel_shape) if weight is not None else dyc
        d_weight = (dyc * x_hat).sum((0,) + spatial).to(weight.dtype) if need[1] else None
        d_bias = dyc.sum((0,) + spatial).to(dy.dtype if weight is None else weight.dtype) if need[2] else None
        d_mean = g.sum(spatial, keepdim=True).mul_(rstd).neg_()  # −r·Σ g, (N, C, 1, ...)
        d_var = (g * x_hat).sum(spatial, keepdim=True).mul_(rstd * rstd).mul_(-0.5)  # −½·r²·Σ g·x̂
        d_mean_weight = _logits_grad(d_mean, means, mean, mix_mean).to(mean_weight.dtype) if need[3] else None
        d_var_weight = _logits_grad(d_var, variances, var, mix_var).to(var_weight.dtype) if need[4] else None
        d_x = None
        if need[0]:
            # dx = g·r + a + b·d, where grouping k (pooling nₖ values) adds (wᵘₖ·Pₖ(dμ) −
            # 2·wˢₖ·Pₖ(dσ²)·mₖ)/nₖ to a and 2·wˢₖ·Pₖ(dσ²)/nₖ to b; Pₖ sums over the axes k pools
            kinds = 3 if ctx.batch_statistics else 2  # given BN statistics are constants
            counts = [reduced_count(x.shape, dims) for dims in (spatial, (1,) + spatial, (0,) + spatial)]
            # 1/nₖ as Python scalars: a tensor of them would be a host-to-device copy per call
            inverse = [1.0 / n for n in counts[:kinds]]
            pooled_mean = _stacked(_pooled(d_mean, kinds))  # (kinds, N, C, 1, ...)
            pooled_var = _stacked(_pooled(d_var, kinds))
            mean_coefficients = torch.stack([mix_mean[k] * inverse[k] for k in range(kinds)])
            var_coefficients = torch.stack([mix_var[k] * (2 * inverse[k]) for k in range(kinds)])
            b = _weighted(var_coefficients, pooled_var)
            a = _weighted(mean_coefficients, pooled_mean)
            a -= _weighted(var_coefficients, pooled_var.mul_(means[:kinds]))
            d_x = d.mul_(b).add_(a).addcmul_(g, rstd).to(x.dtype)
        return d_x, d_weight, d_bias, d_mean_weight, d_var_weight, None, None, None, None, None, None


def _smallest_scale(eps: float, dtype: torch.dtype) -> float:
    """The smallest power of two s for which ε·s² is still a normal number of ``dtype``."""
    if eps <= 0:
        return 0.0
    return 2.0 ** math.ceil(0.5 * math.log2(torch.finfo(dtype).tiny / eps))


def _pooled(per_plane: torch.Tensor, kinds: int) -> list[torch.Tensor]:
    """A (N, C, 1, ...) gradient summed over the axes each grouping pools: none (IN), the
    channels (LN), the samples (BN)."""
    sums = [per_plane, per_plane.sum(1, keepdim=True)]
    return sums + [per_plane.sum(0, keepdim=True)] if kinds == 3 else sums


def _logits_grad(d_stat: torch.Tensor, stats: torch.Tensor, mixed: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """dλ from the gradient of ``mixed`` = Σₖ softmax(λ)ₖ·statₖ: softmax's backward
    wₖ·(aₖ − Σⱼ wⱼ·aⱼ) with aₖ = Σ d_stat·statₖ, taken as wₖ·Σ d_stat·(statₖ − mixed) — the
    difference per (sample, channel) before the sum, so no two large sums cancel."""
    return mix * ((stats - mixed) * d_stat).flatten(1).sum(1)


def _check_mixture(mean_weight: object, var_weight: object, input: torch.Tensor) -> int:
    for name, t in (("mean_weight", mean_weight), ("var_weight", var_weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] not in (2, 3):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(
                f"switchable_norm: {name} must be a 1D tensor of 3 logits (IN, LN, BN) or 2 (IN, LN), got {shape}"
            )
        check_kind(t, name, input, "switchable_norm")
    assert isinstance(mean_weight, torch.Tensor) and isinstance(var_weight, torch.Tensor)  # checked just above
    if mean_weight.shape != var_weight.shape:
        raise InputError(
            f"switchable_norm: mean_weight and var_weight must mix the same statistics, got shapes "
            f"{tuple(mean_weight.shape)} and {tuple(var_weight.shape)}"
        )
    return int(mean_weight.shape[0])
