"""Grouped moments: the statistics every normalization layer is built on.

A layer is a choice of *reduction dims*: BatchNorm reduces (N, *spatial), InstanceNorm
(*spatial), GroupNorm (C//G, *spatial) after splitting C into (G, C//G), LayerNorm and
RMSNorm the trailing ``normalized_shape``. The routines here take those dims and return
statistics with ``keepdim=True`` so they broadcast against the input.

Numerics, stated rather than hidden:

* float16/bfloat16 inputs are accumulated in float32 (a sum of 10^5 halves loses every
  digit otherwise); float32 and float64 accumulate in their own dtype.
* The variance is never E[x²] − E[x]². That difference cancels catastrophically for
  data with a large mean and small spread (1e4 + 0.01·randn in float32 has E[x²] ≈ 1e8,
  whose ulp is 8 — larger than the variance 1e-4 itself) and can even go negative.
  :func:`centered_moments` uses the corrected two-pass algorithm, which is stable and,
  on the CPU, faster than ``torch.var_mean``'s Welford loop.
* Partial statistics (micro-batches, processes, shards) merge with Chan's formula,
  count-weighted, so uneven and empty parts are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .checks import LOW_PRECISION_DTYPES

__all__ = [
    "CenteredMoments",
    "Moments",
    "centered_moments",
    "compute_dtype",
    "grouped_view",
    "mean_square",
    "merge_moments",
    "reduced_count",
]


class Moments(NamedTuple):
    """Statistics of one or more groups: element count, mean and M2 = Σ(x − mean)².

    Attributes:
        count: the number of elements of each group.
        mean: the mean of each group.
        m2: the sum of squared deviations from that mean.
    """

    count: torch.Tensor  # type: ignore[assignment]  # a public field that shadows tuple.count()
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        """Biased (population) variance M2 / count; 0 where a group is empty."""
        return self.m2 / self.count.clamp(min=1)

    def unbiased_var(self) -> torch.Tensor:
        """Sample variance M2 / (count − 1); NaN where a group has fewer than 2 elements."""
        return torch.where(
            self.count > 1,
            self.m2 / (self.count - 1).clamp(min=1),
            torch.full_like(self.m2, math.nan),
        )


#: dtype → the dtype its statistics and normalization arithmetic are carried out in, where
#: that differs (half precision accumulates in float32). Hot paths read it with
#: ``COMPUTE_DTYPES.get(dtype, dtype)``, which costs no Python call.
COMPUTE_DTYPES = {dtype: torch.float32 for dtype in LOW_PRECISION_DTYPES}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and the normalization arithmetic are carried out in.

    Args:
        dtype: the input's dtype.

    Returns:
        float32 for half precision (float16, bfloat16); ``dtype`` itself otherwise.
    """
    return COMPUTE_DTYPES.get(dtype, dtype)


def reduced_count(shape: Sequence[int], dims: Sequence[int]) -> int:
    """Number of elements each statistic is computed over.

    Args:
        shape: the input's shape.
        dims: the dims each statistic is over.

    Returns:
        The product of ``shape`` over ``dims``.
    """
    count = 1
    for d in dims:  # a loop, not math.prod over a generator, which torch.compile cannot trace
        count *= shape[d]
    return count


class CenteredMoments(NamedTuple):
    """Per-group statistics as an exact shift plus a small offset.

    The group mean is ``shift + offset``: ``shift`` is the mean rounded to the compute
    dtype, ``offset`` the part of the mean that rounding lost. Normalizing with
    ``(x − shift) − offset`` keeps digits that ``x − round(mean)`` cannot: for
    1e4 + 0.01·randn in float32 the rounded mean is off by up to half an ulp (5e-4),
    which is 5% of a standard deviation, in every output.

    Attributes:
        shift: the group mean rounded to the compute dtype.
        offset: the mean minus ``shift``, as computed.
        var: the biased variance.
    """

    shift: torch.Tensor
    offset: torch.Tensor
    var: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.offset


def grouped_view(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int
) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor | None, torch.Tensor | None]:
    """x as the channel family's statistics see it — (N, C, *spatial) for BatchNorm
    (``groups < 0``), (N, G, C//G, *spatial) for GroupNorm — the dims they reduce, and γ, β
    (shape (C,), or None) viewed to broadcast against it.

    Args:
        x: the (N, C, *spatial) input.
        weight: γ, or None.
        bias: β, or None.
        groups: < 0 for BatchNorm, else G.

    Returns:
        ``(target, dims, weight_view, bias_view)``; views, no copy where x's layout allows it.
    """
    ndim = x.dim()
    if groups < 0:
        view = (1, -1) + (1,) * (ndim - 2)
        target, dims = x, (0,) + tuple(range(2, ndim))
    else:
        view = (1, groups, x.shape[1] // groups) + (1,) * (ndim - 2)
        target = x.unflatten(1, (groups, x.shape[1] // groups))  # type: ignore[no-untyped-call]  # unannotated in torch
        dims = tuple(range(2, target.dim()))
    w = None if weight is None else weight.view(view)
    b = None if bias is None else bias.view(view)
    return target, dims, w, b


def centered_moments(x: torch.Tensor, dims: Sequence[int]) -> CenteredMoments:
    """Mean and biased variance of ``x`` over ``dims`` by the corrected two-pass algorithm.

    Chan, Golub & LeVeque (1983): with d = x − shift and shift ≈ mean,

        offset = mean(d),   var = mean(d²) − offset²

    ``x − shift`` is exact where x lies within a factor of 2 of the shift, so d carries
    every digit of the spread; ``offset`` is of the order of the shift's rounding error,
    so ``offset²`` removes only a rounding-sized correction — no cancellation. The clamp
    at 0 covers constant groups, where rounding can leave −1 ulp. Returned with
    ``keepdim=True`` in :func:`compute_dtype` of ``x``; works on any strides.

    Args:
        x: the input, any shape and strides.
        dims: the dims to reduce.

    Returns:
        The :class:`CenteredMoments`, each of ``x``'s rank with size 1 in ``dims``.
    """
    dims = tuple(dims)
    xc = x.to(compute_dtype(x.dtype))  # upcast only for float16/bfloat16
    shift = xc.mean(dims, keepdim=True)
    centered = xc - shift
    offset = centered.mean(dims, keepdim=True)
    var = (centered * centered).mean(dims, keepdim=True)
    var = var.sub_(offset * offset).clamp_min_(0)  # clamp_min_, not clamp_: torch.func.vmap has a rule for it
    return CenteredMoments(shift, offset, var)


def mean_square(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Mean of x² over ``dims`` (RMSNorm's statistic), kept as size-1 dims.

    Args:
        x: the input.
        dims: the dims to reduce.

    Returns:
        E[x²] in :func:`compute_dtype` of ``x``, size 1 in ``dims``.
    """
    xc = x.to(compute_dtype(x.dtype))
    return xc.square().mean(dim=tuple(dims), keepdim=True)


def merge_moments(parts: Moments, dim: int = 0) -> Moments:
    """Merge partial statistics stacked along ``dim`` into one set (Chan et al., 1979).

    For parts with counts nᵢ, means μᵢ and M2ᵢ:  n = Σnᵢ, μ = Σnᵢμᵢ / n,
    M2 = ΣM2ᵢ + Σnᵢ(μᵢ − μ)². Each part's M2 is taken about its own mean, so no large
    sums of squares are ever subtracted. A part with nᵢ = 0 contributes nothing, whatever
    its (possibly NaN) mean says.

    Args:
        parts: the partial :class:`Moments`, stacked along ``dim``.
        dim: the dim that holds the parts. Default 0.

    Returns:
        The merged :class:`Moments`, without ``dim``.
    """
    count = parts.count.sum(dim)
    weights = parts.count.to(parts.mean.dtype)
    present = parts.count > 0
    # An empty part's mean is 0/0; zero it so that 0 · NaN cannot leak into the sums.
    part_mean = torch.where(present, parts.mean, torch.zeros_like(parts.mean))
    part_m2 = torch.where(present, parts.m2, torch.zeros_like(parts.m2))
    total = weights.sum(dim)
    mean = (weights * part_mean).sum(dim) / total.clamp(min=1)
    spread = weights * (part_mean - mean.unsqueeze(dim)).square()
    m2 = part_m2.sum(dim) + spread.sum(dim)
    return Moments(count, mean, m2)
