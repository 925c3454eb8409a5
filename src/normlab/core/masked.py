"""Masked statistics: normalization over the valid positions of a padded batch.

A mask is a bool tensor, True where a position is valid, shaped like the input without
its channel dim — (N, L) for (N, C, L), (N, H, W) for (N, C, H, W) — or broadcastable to
that. Within each statistics group, with m the mask (derivation in ``docs/derivations.md``):

    n = Σ m,   μ = Σ m·x / n,   σ² = Σ m·(x − μ)² / n,   r = 1/√(σ² + ε)
    x̂ = m·(x − μ)·r,   y = m·(γ·x̂ + β)

    dx = m·r·(g − Σ m·g / n − x̂·Σ m·g·x̂ / n),   g = γ·dy     statistics from the batch
    dx = m·r·g                                               statistics given
    dγ = Σ m·dy·x̂,   dβ = Σ m·dy

Padded positions never reach a result: the input is replaced by 0 there (``torch.where``,
so NaN/inf padding cannot leak through 0·NaN) before any arithmetic, the output there is
0, and so is the input gradient. A group without a valid position has n = 0; its
statistics are taken as mean 0, variance 0 (no 0/0), and its outputs are all padding, so 0.

Two implementations of the same map: :class:`_MaskedNormalize` binds the forward to the
closed-form backward above; :func:`masked_reference` is the same forward in plain
differentiable torch ops, for torch.func transforms, export and second derivatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from .checks import InputError, InputTypeError
from .moments import COMPUTE_DTYPES, compute_dtype
from .normalize import AcrossProcesses, NormStats, given_statistics, normalize_forward, second_order_grads
from .running import update_running_stats_if

__all__ = [
    "check_mask",
    "expand_mask",
    "masked_moments",
    "masked_normalize",
    "masked_normalize_backward",
    "masked_reference",
    "update_running_stats_if",  # defined in normlab.core.running, named here as before
]


def check_mask(mask: object, x: torch.Tensor, fn: str) -> torch.Tensor:
    """Validate ``mask`` against an (N, C, *spatial) input; return it expanded (a view, no
    copy) to (N, *spatial).

    Raises ``TypeError`` for a non-tensor or a non-bool dtype, ``ValueError`` for a shape
    that does not broadcast to the input without its channel dim, or another device.

    Args:
        mask: the value to check.
        x: the (N, C, ...) input.
        fn: the calling function's name, for the message.

    Returns:
        The mask expanded to (N, ...).
    """
    positions = (x.shape[0],) + tuple(x.shape[2:])
    words = f"(N, *spatial) = {positions}"
    if not isinstance(mask, torch.Tensor):
        raise InputTypeError(
            f"{fn}: mask must be a bool tensor shaped like the input without its channel dim, "
            f"{words}, True where a position is valid; got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise InputTypeError(
            f"{fn}: mask must have dtype torch.bool (True where a position is valid), got "
            f"{mask.dtype}; convert it, e.g. mask.bool() or torch.arange(L) < lengths[:, None]"
        )
    if mask.device != x.device:
        raise InputError(
            f"{fn}: mask is on {mask.device} but the input is on {x.device}; move the mask to the input's device"
        )
    ok = mask.dim() <= len(positions)
    for m, p in zip(reversed(mask.shape), reversed(positions)):  # a loop: a generator is a call per item
        ok = ok and (m == 1 or m == p)
    if not ok:
        raise InputError(
            f"{fn}: mask has shape {tuple(mask.shape)} but the input of shape "
            f"{tuple(x.shape)} needs a mask of shape {words} (the input without its channel "
            f"dim, dim 1), or one that broadcasts to it"
        )
    return expand_mask(mask, positions)


def expand_mask(mask: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """A checked mask broadcast to (N, *spatial), as a view — after a copy if it is not
    contiguous: elementwise results take the layout of their operands, and a permuted mask
    would hand its strides to the output instead of the input's (a bool copy, 1/C of the
    input's size)."""
    if not mask.is_contiguous():
        mask = mask.contiguous()
    return mask.expand(positions)


def _valid_count(mask: torch.Tensor, shape: Sequence[int], dims: tuple[int, ...]) -> torch.Tensor:
    """Valid elements per group, keepdim, as int64: Σ m over ``dims``, times the extent of
    the dims the mask is broadcast along (C//G for GroupNorm)."""
    factor = 1
    for d in dims:
        if mask.shape[d] == 1:
            factor *= shape[d]
    return mask.sum(dims, keepdim=True, dtype=torch.int64) * factor


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, dims: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, offset, var, count) of the valid elements of ``x`` over ``dims``.

    The corrected two-pass algorithm of :func:`normlab.core.centered_moments`, with every
    sum restricted to the mask: mean = shift + offset, biased var; ``count`` in the compute
    dtype, keepdim. An empty group gets shift = offset = var = 0.

    Args:
        x: the input.
        mask: bool, broadcast against ``x``.
        dims: the dims to reduce.

    Returns:
        ``(shift, offset, var, count)``, each size 1 in ``dims``.
    """
    dims = tuple(dims)
    cdtype = COMPUTE_DTYPES.get(x.dtype, x.dtype)
    factor = 1  # _valid_count's, written out: the masked layers' hot path
    for d in dims:
        if mask.shape[d] == 1:
            factor *= x.shape[d]
    count = (mask.sum(dims, keepdim=True, dtype=torch.int64) * factor).to(cdtype)
    divisor = count.clamp(min=1)
    zero = torch.zeros((), dtype=cdtype, device=x.device)
    xm = torch.where(mask, x.to(cdtype), zero)
    shift = xm.sum(dims, keepdim=True) / divisor
    centered = torch.where(mask, xm - shift, zero)
    offset = centered.sum(dims, keepdim=True) / divisor
    var = (centered * centered).sum(dims, keepdim=True) / divisor
    var = (var - offset * offset).clamp(min=0)  # out of place: vmap has no rule for clamp_
    return shift, offset, var, count


def masked_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    dims: Sequence[int],
    eps: float,
    *,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
) -> torch.Tensor:
    """The masked forward in differentiable torch ops (statistics from ``x`` unless
    ``mean``/``rstd`` are given); autograd, vmap, jvp and export see through it.

    Args:
        x: the input.
        weight: γ, broadcast against ``x``, or None.
        bias: β, broadcast against ``x``, or None.
        mask: bool, broadcast against ``x``.
        dims: the dims each statistic is over.
        eps: added to the variance.
        mean: keyword-only; a given mean, or None. Default None.
        rstd: keyword-only; a given 1/√(var + ε), or None. Default None.

    Returns:
        The output, 0 at masked-out positions.

    Raises:
        TypeError: only one of ``mean`` and ``rstd`` given.
    """
    dims = tuple(dims)
    cdtype = compute_dtype(x.dtype)
    zero = torch.zeros((), dtype=cdtype, device=x.device)
    xm = torch.where(mask, x.to(cdtype), zero)
    if mean is None and rstd is None:
        divisor = _valid_count(mask, x.shape, dims).to(cdtype).clamp(min=1)
        mean = xm.sum(dims, keepdim=True) / divisor
        centered = torch.where(mask, xm - mean, zero)
        var = (centered * centered).sum(dims, keepdim=True) / divisor
        rstd = torch.rsqrt(var + eps)
    elif mean is None or rstd is None:
        raise InputTypeError(
            f"masked_reference: mean and rstd are given together (fixed statistics) or not at all, got "
            f"only {'mean' if rstd is None else 'rstd'}; pass both, or neither to use the batch's"
        )
    y = (xm - mean) * rstd
    if weight is not None:
        y = y * weight.to(cdtype)
    if bias is not None:
        y = y + bias.to(cdtype)
    return torch.where(mask, y, zero).to(x.dtype)


def masked_normalize_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mask: torch.Tensor,
    stats: NormStats,
    count: torch.Tensor | None,
    dims: Sequence[int],
    bias_shape: torch.Size | None,
    *,
    batch_stats: bool,
    needs: tuple[bool, bool, bool] = (True, True, True),
    across: AcrossProcesses | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form (dx, dγ, dβ) of the masked forward; see the module docstring.

    ``count`` is the valid count per group (keepdim; with ``across``, ignored for the
    global ``across.count``). Results are in the statistics' dtype.

    Args:
        dy: the output gradient.
        x: the forward's input.
        weight: γ, or None.
        mask: the forward's mask.
        stats: the forward's :class:`NormStats`.
        count: see above.
        dims: the dims each statistic was over.
        bias_shape: the shape of β, or None without β.
        batch_stats: keyword-only; the statistics came from ``x``.
        needs: keyword-only; which of (dx, dγ, dβ) to compute. Default all three.
        across: keyword-only; the groups span processes, or None. Default None.

    Returns:
        (dx, dγ, dβ), None where not needed or without that parameter.
    """
    need_dx, need_dw, need_db = needs
    dims = tuple(dims)
    rstd = stats.rstd
    cdtype = rstd.dtype
    zero = torch.zeros((), dtype=cdtype, device=x.device)
    # The output is the constant 0 at padded positions: whatever dy holds there is no gradient.
    dy = torch.where(mask, dy.to(cdtype), zero)
    shift = cast(torch.Tensor, stats.shift)  # masked statistics are always centered
    xhat = torch.where(mask, x.to(cdtype), zero).sub_(shift)
    if stats.offset is not None:
        xhat.sub_(stats.offset)
    xhat = torch.where(mask, xhat.mul_(rstd), zero)
    w = None if weight is None else weight.to(cdtype)
    dw = (dy * xhat).sum_to_size(w.shape) if need_dw and w is not None else None
    db = dy.sum_to_size(bias_shape) if need_db and bias_shape is not None else None
    dx: torch.Tensor | None = None
    if need_dx or across is not None:  # every process must join the collective
        g = dy if w is None else dy * w
        if batch_stats:
            sum_g = g.sum(dims, keepdim=True)
            sum_g_xhat = (g * xhat).sum(dims, keepdim=True)
            n: torch.Tensor | int | None = count
            if across is not None:
                # γ is per channel and identical on every process, so the sums of g = γ·dy
                # complete across processes like those of dy.
                packed = across.reduce(torch.cat([sum_g.reshape(-1), sum_g_xhat.reshape(-1)]))
                sum_g, sum_g_xhat = (t.view_as(sum_g) for t in packed.chunk(2))
                n = across.count
            divisor = torch.as_tensor(n, dtype=cdtype, device=x.device).clamp(min=1)
            dx = xhat.mul_(-sum_g_xhat / divisor).add_(g).sub_(sum_g / divisor).mul_(rstd)
        else:
            dx = g * rstd
        dx = torch.where(mask, dx, zero) if need_dx else None
    return dx, dw, db


class _MaskedNormalize(torch.autograd.Function):
    """Binds the masked forward to :func:`masked_normalize_backward`; saves the input, the
    mask and the per-group statistics, as :class:`normlab.core.normalize._Normalize` does."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mask: torch.Tensor,
        shift: torch.Tensor,
        offset: torch.Tensor | None,
        rstd: torch.Tensor,
        count: torch.Tensor | None,
        dims: tuple[int, ...],
        eps: float,
        batch_stats: bool,
        across: AcrossProcesses | None,
    ) -> torch.Tensor:
        ctx.dims, ctx.eps, ctx.batch_stats, ctx.across = dims, eps, batch_stats, across
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(x, weight, bias, mask, shift, offset, rstd, count)
        cdtype = rstd.dtype
        zero = torch.zeros((), dtype=cdtype, device=x.device)
        xm = torch.where(mask, x.to(cdtype), zero)  # padding (NaN, inf, anything) never enters
        y = normalize_forward(xm, weight, bias, NormStats(shift, offset, rstd), small_scale=True)
        return torch.where(mask, y, zero).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mask, shift, offset, rstd, count = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():
            given = given_statistics(ctx, shift, offset, rstd)
            grads = second_order_grads(ctx, dy, (x, weight, bias), needs, masked_reference, mask, **given)
        else:
            grads = masked_normalize_backward(
                dy,
                x,
                weight,
                mask,
                NormStats(shift, offset, rstd),
                count,
                ctx.dims,
                ctx.bias_shape,
                batch_stats=ctx.batch_stats,
                needs=needs,
                across=ctx.across,
            )
        dx, dw, db = (None if g is None else g.to(t.dtype) for g, t in zip(grads, (x, weight, bias)))
        return dx, dw, db, None, None, None, None, None, None, None, None, None


def masked_normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    stats: NormStats,
    count: torch.Tensor | None,
    dims: Sequence[int],
    eps: float,
    *,
    batch_stats: bool,
    across: AcrossProcesses | None = None,
) -> torch.Tensor:
    """Normalize the valid elements of ``x`` with per-group ``stats``; 0 where ``mask`` is
    False. ``mask``, γ, β and the statistics broadcast against ``x`` (same number of dims);
    ``count`` is the valid count per group (needed with ``batch_stats``).

    Args:
        x: the input.
        weight: γ, or None.
        bias: β, or None.
        mask: bool, True at valid positions.
        stats: the :class:`NormStats`.
        count: see above.
        dims: the dims each statistic is over.
        eps: the eps the statistics were computed with.
        batch_stats: keyword-only; the statistics came from ``x``.
        across: keyword-only; the groups span processes, or None. Default None.

    Returns:
        The output, ``x``'s dtype, 0 at masked-out positions.
    """
    y: torch.Tensor = _MaskedNormalize.apply(  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
        x, weight, bias, mask, stats.shift, stats.offset, stats.rstd, count, tuple(dims), eps, batch_stats, across
    )
    return y
