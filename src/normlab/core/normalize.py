"""Normalize forward and its closed-form backward, bound in one ``autograd.Function``.

Notation (derivation in ``docs/derivations.md``): statistics are taken over the set R of
reduction dims, n = |R| elements per group;

    x̂ = (x − μ)·r,  r = 1/√(σ² + ε)        (RMSNorm: x̂ = x·r, r = 1/√(E[x²] + ε))
    y = γ·x̂ + β                             (γ, β broadcast over their own dims)

and with g = γ·dy, the gradients are

    dβ = Σ dy,  dγ = Σ dy·x̂                 (summed over the dims γ, β broadcast along)
    dx = r·(g − mean_R(g) − x̂·mean_R(g·x̂))   statistics from this batch
    dx = r·(g − x̂·mean_R(g·x̂))               RMSNorm (no mean was subtracted)
    dx = r·g                                  statistics given (eval, frozen, running)

One forward pass and one backward pass serve BatchNorm, InstanceNorm, GroupNorm,
LayerNorm and RMSNorm: only ``dims`` and the broadcast shapes of γ, β and the
statistics differ. μ is carried as ``shift + offset`` (see
:class:`normlab.core.moments.CenteredMoments`) so that x − μ keeps its digits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch

from .moments import centered_moments, compute_dtype, mean_square, reduced_count
from .reference import graph_grads, reference_normalize

__all__ = [
    "AcrossProcesses",
    "BatchStatistics",
    "NormStats",
    "normalize",
    "normalize_backward",
    "normalize_batch",
    "normalize_forward",
    "normalize_given",
]


class NormStats(NamedTuple):
    """What normalization needs per group: x̂ = (x − shift − offset) · rstd.

    ``shift`` is None for RMSNorm (nothing subtracted); ``offset`` is None when the
    shift is the mean itself (running or given statistics). All broadcast against x.

    Attributes:
        shift: what is subtracted first (the rounded mean), or None.
        offset: the rest of the mean, or None.
        rstd: 1/√(var + ε).
    """

    shift: torch.Tensor | None
    offset: torch.Tensor | None
    rstd: torch.Tensor


@dataclass(frozen=True)
class AcrossProcesses:
    """Statistics groups that span several processes (SyncBatchNorm).

    The forward statistics were already merged across processes; in backward, the two
    per-group sums the input gradient needs (Σdy and Σdy·x̂) are completed by ``reduce``
    — one collective that sums a packed tensor over all processes — and ``count`` is the
    global number of elements per group. dγ and dβ stay local sums, as DistributedDataParallel
    reduces parameter gradients itself.

    Attributes:
        reduce: sums a tensor over every process of the group and returns the sum.
        count: the global number of elements per group (a tensor where it stays on the device).
    """

    reduce: Callable[[torch.Tensor], torch.Tensor]
    count: int | torch.Tensor  # a 0-dim tensor when only the device knows it


class BatchStatistics(NamedTuple):
    """A batch's per-group statistics, for running-estimate updates.

    ``mean`` is None for RMSNorm; ``var`` is the biased variance (the mean square for
    RMSNorm); ``count`` the elements per group.

    Attributes:
        mean: the per-group mean, or None (RMSNorm).
        var: the biased variance (the mean square for RMSNorm).
        count: the elements per group.
    """

    mean: torch.Tensor | None
    var: torch.Tensor
    count: int  # type: ignore[assignment]  # a public field that shadows tuple.count()


def _centered(x: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """x − shift − offset in the statistics' dtype, as a fresh tensor safe to modify."""
    xc = x.to(stats.rstd.dtype)
    if stats.shift is None:
        return xc.clone() if xc is x else xc
    xc = xc - stats.shift  # exact where x is near the shift
    if stats.offset is not None:
        xc.sub_(stats.offset)
    return xc


def _scale_is_small(rstd: torch.Tensor, weight: torch.Tensor | None, x: torch.Tensor) -> bool:
    """True when r·γ, broadcast, is smaller than x, so it pays to precompute it.

    For BatchNorm/InstanceNorm/GroupNorm the product is (N, C)-sized at most; for
    LayerNorm (per-row r, per-column γ) it would be as large as x itself.
    """
    if weight is None:
        return rstd.numel() < x.numel()
    # Same number of dims by contract, so the broadcast size is the elementwise max.
    size = 1
    for a, b in zip(rstd.shape, weight.shape):
        size *= max(a, b)
    return size < x.numel()


def normalize_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: NormStats,
    *,
    small_scale: bool | None = None,
) -> torch.Tensor:
    """y = γ·(x − μ)·r + β in the statistics' dtype (float32 for half inputs).

    The mean is subtracted *before* scaling. The algebraically equal one-pass form
    y = x·(γr) + (β − μγr) subtracts two numbers of size |μ|·γr, which for data with a
    large mean (1e4 + 0.01·randn in float32) loses about 6% of every output.
    ``small_scale``: the caller knows r·γ is per channel or group (None: find out).

    Args:
        x: the input.
        weight: γ, broadcast against ``x``, or None.
        bias: β, broadcast against ``x``, or None.
        stats: the :class:`NormStats` to normalize with.
        small_scale: keyword-only; see above. Default None.

    Returns:
        y, in the statistics' dtype.
    """
    cdtype = stats.rstd.dtype
    w = None if weight is None else weight.to(cdtype)
    b = None if bias is None else bias.to(cdtype)
    if small_scale is None:
        small_scale = _scale_is_small(stats.rstd, w, x)
    if stats.shift is not None and small_scale:
        # BatchNorm/InstanceNorm/GroupNorm: scale is (N, C)-sized at most, and the
        # offset folds into the shift term: y = (x − shift)·scale + (β − offset·scale).
        scale = stats.rstd if w is None else stats.rstd * w
        xc = x.to(cdtype) - stats.shift  # exact where x is near the shift
        bias_term = b
        if stats.offset is not None:
            bias_term = -stats.offset * scale if b is None else b - stats.offset * scale
        xc.mul_(scale)
        return xc.add_(bias_term) if bias_term is not None else xc
    # LayerNorm/RMSNorm: per-row r and per-column γ never make a small product.
    xc = _centered(x, stats).mul_(stats.rstd)
    if w is not None:
        xc.mul_(w)
    return xc.add_(b) if b is not None else xc


def normalize_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    stats: NormStats,
    dims: Sequence[int],
    bias_shape: torch.Size | None,
    *,
    batch_stats: bool,
    needs: tuple[bool, bool, bool] = (True, True, True),
    across: AcrossProcesses | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form (dx, dγ, dβ) for :func:`normalize_forward`; see the module docstring.

    Results are in the statistics' dtype; the caller casts them to the operands' dtypes.
    With ``across``, the groups span processes (see :class:`AcrossProcesses`).

    Args:
        dy: the output gradient.
        x: the forward's input.
        weight: γ, or None.
        stats: the forward's :class:`NormStats`.
        dims: the dims each statistic was over.
        bias_shape: the shape of β (dβ is returned in it), or None without β.
        batch_stats: keyword-only; the statistics came from ``x`` (so the backward
            differentiates through them).
        needs: keyword-only; which of (dx, dγ, dβ) to compute. Default all three.
        across: keyword-only; the groups span processes, or None. Default None.

    Returns:
        (dx, dγ, dβ), None where not needed or without that parameter.
    """
    need_dx, need_dw, need_db = needs
    rstd = stats.rstd
    cdtype = rstd.dtype
    dims = tuple(dims)
    dy = dy.to(cdtype)
    xhat = _centered(x, stats).mul_(rstd)
    centered = stats.shift is not None
    n: int | torch.Tensor = reduced_count(x.shape, dims)
    w = None if weight is None else weight.to(cdtype)
    dx: torch.Tensor | None = None
    dw: torch.Tensor | None = None
    db: torch.Tensor | None = None

    # When γ is constant inside each statistics group (BatchNorm, InstanceNorm), the sums
    # that dγ and dβ need are exactly the per-group sums dx needs: compute them once.
    # (β counts too: LayerNorm with β but no γ has a β that varies inside each group.)
    per_group_affine = (w is None or all(w.shape[d] == 1 for d in dims)) and (
        bias_shape is None or all(bias_shape[d] == 1 for d in dims)
    )
    if across is not None:
        assert per_group_affine and batch_stats and centered, "only BatchNorm spans processes"
    if per_group_affine:
        # Across processes every rank must join the collective below, needed or not.
        want_sum_dy = need_db or (need_dx and batch_stats and centered) or across is not None
        want_sum_dy_xhat = need_dw or (need_dx and batch_stats) or across is not None
        sum_dy = dy.sum(dims, keepdim=True) if want_sum_dy else None
        sum_dy_xhat = (dy * xhat).sum(dims, keepdim=True) if want_sum_dy_xhat else None
        # Below, each sum is read only where its want_* above is True: the casts say so.
        if need_dw and w is not None:
            dw = cast(torch.Tensor, sum_dy_xhat).sum_to_size(w.shape)
        if need_db and bias_shape is not None:
            db = cast(torch.Tensor, sum_dy).sum_to_size(bias_shape)
        if across is not None:
            # One collective completes both per-channel sums over every process.
            local_dy, local_dy_xhat = cast(torch.Tensor, sum_dy), cast(torch.Tensor, sum_dy_xhat)
            packed = across.reduce(torch.cat([local_dy.reshape(-1), local_dy_xhat.reshape(-1)]))
            sum_dy, sum_dy_xhat = (t.view_as(local_dy) for t in packed.chunk(2))
            n = across.count
        if need_dx:
            scale = rstd if w is None else rstd * w
            if batch_stats:
                # dx = γr·(dy − mean(dy) − x̂·mean(dy·x̂)), reusing x̂'s buffer
                dx = xhat.mul_(-cast(torch.Tensor, sum_dy_xhat) / n).add_(dy)
                if centered:
                    dx.sub_(cast(torch.Tensor, sum_dy) / n)
                dx.mul_(scale)
            else:
                dx = dy * scale
    else:
        if need_dw and w is not None:
            dw = (dy * xhat).sum_to_size(w.shape)
        if need_db and bias_shape is not None:
            db = dy.sum_to_size(bias_shape)
        if need_dx:
            g = dy.clone() if w is None else dy * w  # fresh: modified in place below
            if batch_stats:
                mean_g_xhat = (g * xhat).mean(dims, keepdim=True)
                dx = xhat.mul_(-mean_g_xhat).add_(g)
                if centered:
                    dx.sub_(g.mean(dims, keepdim=True))
                dx.mul_(rstd)
            else:
                dx = g.mul_(rstd)
    return dx, dw, db


class _Normalize(torch.autograd.Function):
    """Binds :func:`normalize_forward` to :func:`normalize_backward`.

    Saves the input (not x̂) plus the per-group statistics, as torch.nn does: x̂ is
    recomputed in backward for one extra elementwise pass instead of a second
    activation-sized buffer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        shift: torch.Tensor | None,
        offset: torch.Tensor | None,
        rstd: torch.Tensor,
        dims: tuple[int, ...],
        eps: float,
        batch_stats: bool,
        across: AcrossProcesses | None,
    ) -> torch.Tensor:
        ctx.dims = dims
        ctx.eps = eps
        ctx.batch_stats = batch_stats
        ctx.across = across
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(x, weight, bias, shift, offset, rstd)
        stats = NormStats(shift, offset, rstd)
        return normalize_forward(x, weight, bias, stats).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, shift, offset, rstd = ctx.saved_tensors
        stats = NormStats(shift, offset, rstd)
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():
            given = given_statistics(ctx, shift, offset, rstd)
            centered = shift is not None
            grads = second_order_grads(
                ctx, dy, (x, weight, bias), needs, reference_normalize, centered=centered, **given
            )
        else:
            grads = normalize_backward(
                dy,
                x,
                weight,
                stats,
                ctx.dims,
                ctx.bias_shape,
                batch_stats=ctx.batch_stats,
                needs=needs,
                across=ctx.across,
            )
        dx, dw, db = (None if g is None else g.to(t.dtype) for g, t in zip(grads, (x, weight, bias)))
        return dx, dw, db, None, None, None, None, None, None, None


def given_statistics(
    ctx: Any, shift: torch.Tensor | None, offset: torch.Tensor | None, rstd: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    """The statistics a normalize Function's reference is given for :func:`second_order_grads`:
    none with batch statistics (the reference recomputes them from x, so that they carry the
    graph), else the mean (None uncentered: RMSNorm) and 1/σ the forward used."""
    if ctx.batch_stats:
        return {}
    mean = shift if shift is None or offset is None else shift + offset
    return {"mean": mean, "rstd": rstd}


def second_order_grads(
    ctx: Any,
    dy: torch.Tensor,
    operands: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    needs: tuple[bool, ...],
    reference: Callable[..., torch.Tensor],
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of a normalize Function's ``operands`` (x, γ, β) for
    ``create_graph=True``: autograd through ``reference(*operands, *args, ctx.dims, ctx.eps,
    **kwargs)``, the forward in plain differentiable ops.

    The closed form is written on detached tensors, so its result would carry no graph;
    rebuilding the forward from the saved (graph-connected) operands keeps second
    derivatives exact. Statistics merged over processes (``ctx.across``) cannot be rebuilt
    from this process's operands: refused.
    """
    if ctx.across is not None:
        raise RuntimeError(
            "second derivatives (create_graph=True) through SyncBatchNorm are not "
            "supported: the statistics span processes"
        )
    with torch.enable_grad():
        y = reference(*operands, *args, ctx.dims, ctx.eps, **kwargs)
        return tuple(graph_grads(y, operands, needs, dy))


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: NormStats,
    dims: Sequence[int],
    eps: float,
    *,
    batch_stats: bool,
    across: AcrossProcesses | None = None,
) -> torch.Tensor:
    """Normalize ``x`` with per-group ``stats`` taken over ``dims``.

    ``batch_stats=True`` says the statistics were computed from this ``x`` (training
    BatchNorm, every GroupNorm/LayerNorm), so the backward differentiates through
    them; ``False`` treats them as constants (eval BatchNorm, frozen statistics).
    ``across`` marks statistics merged over several processes (SyncBatchNorm).
    ``weight``, ``bias`` and the statistics must broadcast against ``x`` with the same
    number of dims.

    Args:
        x: the input.
        weight: γ, broadcast against ``x``, or None.
        bias: β, broadcast against ``x``, or None.
        stats: the :class:`NormStats`.
        dims: the dims each statistic is over.
        eps: the eps the statistics were computed with.
        batch_stats: keyword-only; see above.
        across: keyword-only; see above. Default None.

    Returns:
        The normalized tensor, ``x``'s dtype.
    """
    y: torch.Tensor = _Normalize.apply(  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
        x,
        weight,
        bias,
        stats.shift,
        stats.offset,
        stats.rstd,
        tuple(dims),
        eps,
        batch_stats,
        across,
    )
    return y


def normalize_batch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dims: Sequence[int],
    eps: float,
    *,
    centered: bool = True,
    zero_scale_at_inf: bool = False,
) -> tuple[torch.Tensor, BatchStatistics]:
    """Normalize ``x`` with its own statistics over ``dims``; also return them.

    ``centered=False`` is RMSNorm: no mean is subtracted and the "variance" is E[x²].
    The statistics are computed without autograd (the closed-form backward accounts
    for them) and returned with ``keepdim=True`` for running-estimate updates.

    Args:
        x: the input.
        weight: γ, broadcast against ``x``, or None.
        bias: β, broadcast against ``x``, or None.
        dims: the dims to reduce.
        eps: added to the variance.
        centered: keyword-only; subtract the mean (False: RMSNorm). Default True.
        zero_scale_at_inf: keyword-only; with ``centered=False``, a group holding ±inf is
            scaled by rsqrt(inf) = 0 — its finite values give 0 (plus β), the infinite ones
            NaN — as torch.nn's RMSNorm; otherwise (FilterResponseNorm) any infinite mean
            square gives NaN for the whole group. A mean square that overflowed from finite
            values gives NaN either way. Default False.

    Returns:
        (y, :class:`BatchStatistics`).
    """
    dims = tuple(dims)
    shift: torch.Tensor | None
    offset: torch.Tensor | None
    mean: torch.Tensor | None
    with torch.no_grad():
        if centered:
            moments = centered_moments(x, dims)
            shift, offset, var = moments
            mean = moments.mean
        else:
            shift = offset = mean = None
            var = mean_square(x, dims)
        # A variance that overflowed gives NaN (as documented), never rsqrt(inf) = 0 → β.
        overflowed = torch.isinf(var)
        if zero_scale_at_inf:  # an infinite mean square from ±inf in x is torch.nn's rsqrt(inf) = 0
            overflowed = overflowed & ~torch.isinf(x).any(dims, keepdim=True)
        rstd = torch.where(overflowed, torch.nan, torch.rsqrt(var + eps))
    y = normalize(x, weight, bias, NormStats(shift, offset, rstd), dims, eps, batch_stats=True)
    return y, BatchStatistics(mean, var, reduced_count(x.shape, dims))


def normalize_given(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    dims: Sequence[int],
    eps: float,
) -> torch.Tensor:
    """Normalize ``x`` with fixed statistics (running or frozen estimates).

    ``mean`` and ``var`` broadcast against ``x``; they are constants for autograd.

    Args:
        x: the input.
        weight: γ, broadcast against ``x``, or None.
        bias: β, broadcast against ``x``, or None.
        mean: the mean to subtract.
        var: the variance (eps is added to it).
        dims: the dims the statistics stand for.
        eps: added to the variance.

    Returns:
        The normalized tensor, ``x``'s dtype.
    """
    cdtype = compute_dtype(x.dtype)
    with torch.no_grad():
        rstd = torch.rsqrt(var.to(cdtype) + eps)
        shift = mean.to(cdtype)
    return normalize(x, weight, bias, NormStats(shift, None, rstd), dims, eps, batch_stats=False)
