"""Batch Renormalization (Ioffe, 2017): BatchNorm whose batch statistics are corrected toward
the running ones, as one call of the channel family's entry.

In training, with the batch's μ_B, σ_B = √(σ²_B + ε) and the running μ, σ = √(var + ε):

    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)
    y = γ·((x − μ_B)/σ_B · r + d) + β  =  BatchNorm with γ' = γ·r and β' = γ·d + β

with r and d constants for autograd. In eval it is BatchNorm with the running estimates.
:class:`normlab.nn.BatchRenorm2d` and :func:`normlab.functional.batch_renorm` both call
:func:`batch_renorm`.
"""

from __future__ import annotations

import torch

from .call_checks import check_channel_args, too_few_values
from .channel import channel_norm
from .checks import InputError
from .composed import channel_view
from .moments import centered_moments, reduced_count
from .running import RunningStats

__all__ = ["batch_renorm"]


def batch_renorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    batch_stats: bool,
    running: RunningStats,
    r_max: float | torch.Tensor,
    d_max: float | torch.Tensor,
    operation: str = "batch_renorm",
    checked: bool = False,
) -> torch.Tensor:
    r"""Batch Renormalization of an (N, C, *spatial) input with ``running``'s estimates (used
    in eval, measured against and updated in training). ``r_max``/``d_max`` may be 0-dim
    tensors (a schedule computed on the device).

    Args:
        x: the (N, C, ...) input.
        weight: γ, shape (C,), or None.
        bias: β, shape (C,), or None.
        eps: keyword-only; added to the variances.
        batch_stats: keyword-only; training (batch statistics, corrected by r and d).
        running: keyword-only; the :class:`RunningStats` policy (required).
        r_max: keyword-only; the clip of r, >= 1.
        d_max: keyword-only; the clip of \|d\|, >= 0.
        operation: keyword-only; the name recorded. Default "batch_renorm".
        checked: keyword-only; the caller checked the arguments. Default False.

    Returns:
        The output, ``x``'s shape and dtype.

    Raises:
        ValueError: training with a policy that holds no running estimates.
    """
    if not batch_stats or x.numel() == 0:
        # eval: BatchNorm with the estimates; an empty batch: BatchNorm2d's answer (an empty
        # output, the estimates untouched), since there is no batch for r and d to measure
        return channel_norm(
            x, weight, bias, eps=eps, batch_stats=batch_stats, running=running, operation=operation, checked=checked
        )
    if not checked:
        eps, _ = check_channel_args(operation, x, weight, bias, eps, -1, True, running)
    dims = (0,) + tuple(range(2, x.dim()))
    if reduced_count(x.shape, dims) <= 1:  # r and d need batch statistics
        raise too_few_values(x)
    running_mean, running_var = running.running_mean, running.running_var
    if running_mean is None or running_var is None:
        raise InputError(
            f"{operation} measures the batch against running_mean and running_var, but the policy "
            f"{running!r} holds none; build it with RunningStats.of(running_mean, running_var)"
        )
    ndim = x.dim()
    with torch.no_grad():
        # Every temporary here is this call's own, so the arithmetic runs in place: a training
        # step of a small network pays per op, not per element (the values are the same).
        moments = centered_moments(x, dims)  # (1, C, 1, …)
        cdtype = moments.var.dtype
        running_std = (channel_view(running_var, ndim).to(cdtype) + eps).sqrt_()
        # not div_: an ensemble under vmap (stack_module_state) has batched estimates and one input
        r = (moments.var + eps).sqrt_() / running_std  # σ_B / σ
        d = (moments.mean - channel_view(running_mean, ndim).to(cdtype)).div_(running_std)  # (μ_B − μ) / σ
        if isinstance(r_max, torch.Tensor) or isinstance(d_max, torch.Tensor):
            r_top = torch.as_tensor(r_max, dtype=cdtype, device=x.device)
            d_top = torch.as_tensor(d_max, dtype=cdtype, device=x.device)
            # with tensor bounds clamp is min(max(v, lo), hi) too: one op instead of two;
            # reciprocal() is what 1.0 / r_top computes (times 1.0), one op fewer
            r = r.clamp(r_top.reciprocal(), r_top)
            d = d.clamp(-d_top, d_top)
        else:  # clamp, not clamp_: (C,) values, and torch.func's vmap has a rule only for clamp
            r = r.clamp(1.0 / r_max, r_max)
            d = d.clamp(-d_max, d_max)
        # (C,) from here: the effective affine below is then computed without views, whose
        # autograd nodes (four per call) cost a small network's training step more than the
        # arithmetic does
        r, d = r.flatten(), d.flatten()
    # y = γr·x̂ + (γd + β): BatchNorm with an effective affine; r, d carry no gradient.
    w_eff = r if weight is None else weight * r
    b_eff = d if weight is None else weight * d
    if bias is not None:
        b_eff = b_eff + bias
    # γ' and β' stay in the statistics' dtype (float32 for half inputs): cast to the input's,
    # torch's kernel would keep the batch statistics — and so the running ones — in half
    return channel_norm(
        x,
        w_eff if w_eff.dtype == cdtype else w_eff.to(cdtype),
        b_eff if b_eff.dtype == cdtype else b_eff.to(cdtype),
        eps=eps,
        running=running,
        operation=operation,
        checked=True,
    )
