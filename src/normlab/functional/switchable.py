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
three sets of statistics and the two softmaxes by autograd.
"""

from __future__ import annotations

from typing import cast

import torch

from ..core import compute_dtype, reduced_count, update_running_stats
from ..core.call_checks import check_channel_call, check_update_args, too_few_values
from ..core.checks import InputError
from ..core.paths import recomputing
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
    ndim = input.dim()
    spatial = tuple(range(2, ndim))
    per_instance = reduced_count(input.shape, spatial)
    channel_shape = (1, input.shape[1]) + (1,) * len(spatial)
    # Every mean is carried relative to a shift c (a constant to autograd): x − c keeps the
    # digits of the spread, and x − μ = d − Σ wₖ·mₖ with d = x − c and mₖ = μₖ − c. Means near
    # 1e4 rounded to float32 would each be off by up to 5e-4, 5% of a 0.01 spread, in every
    # output. c is the batch's channel mean when the batch's BN statistics are used; otherwise
    # (eval, or IN and LN only) each sample's own channel means, so that no sample's output
    # depends on another's (one sample's NaN stays in that sample, as in torch.nn's eval BatchNorm).
    batch_statistics = use_bn and (training or running_mean is None)
    with torch.no_grad():
        shift = input.to(cdtype).mean(((0,) if batch_statistics else ()) + spatial, keepdim=True)
        layer_shift = shift - shift.mean(1, keepdim=True)  # each channel's shift relative to their mean
    d = input.to(cdtype) - shift
    # Each grouping's moments straight from d, one fused reduction each (torch's var_mean:
    # Welford, no E[x²] − E[x]²): fewer small ops than merging the instance moments, which is
    # what a training step of a small network pays for.
    instance_var, instance_mean = torch.var_mean(d, spatial, correction=0, keepdim=True)
    # LN pools the channels, whose shifts differ: d + (c − c̄) is x relative to one shift c̄
    layer_var, layer_mean = torch.var_mean(d + layer_shift, (1,) + spatial, correction=0, keepdim=True)
    means = [instance_mean, layer_mean - layer_shift]
    variances = [instance_var, layer_var]
    if use_bn:
        if batch_statistics:
            if input.shape[0] * per_instance <= 1:
                raise too_few_values(input)
            batch_var, batch_mean = torch.var_mean(d, (0,) + spatial, correction=0, keepdim=True)  # (1, C, 1, ...)
            # a checkpoint's recompute sees this step's batch again: merged once per real step
            if training and running_mean is not None and not recomputing():
                assert running_var is not None  # check_channel_call: both estimates or neither
                momentum = check_update_args(momentum, num_batches_tracked, on_nonfinite)
                update_running_stats(
                    running_mean,
                    running_var,
                    (batch_mean.detach() + shift).flatten(),
                    batch_var.detach().flatten(),
                    input.shape[0] * per_instance,
                    momentum,
                    num_batches_tracked=num_batches_tracked,
                    unbiased=unbiased_running_var,
                    on_nonfinite=cast(NonFinitePolicy, on_nonfinite),  # checked by check_update_args
                )
        else:
            assert running_mean is not None and running_var is not None  # the branch's condition
            batch_mean = running_mean.to(cdtype).view(channel_shape) - shift
            batch_var = running_var.to(cdtype).view(channel_shape)
        means.append(batch_mean)
        variances.append(batch_var)
    mix_mean = torch.softmax(mean_weight.to(cdtype), 0)
    mix_var = torch.softmax(var_weight.to(cdtype), 0)
    # sum() of tensors is a tensor; its stub says "or 0" for an empty iterable, which these are not
    mean = cast(torch.Tensor, sum(w * m for w, m in zip(mix_mean, means)))
    var = cast(torch.Tensor, sum(w * v for w, v in zip(mix_var, variances)))
    y = (d - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(cdtype).view(channel_shape)
    if bias is not None:
        y = y + bias.to(cdtype).view(channel_shape)
    return y.to(input.dtype)


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
