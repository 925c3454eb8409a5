"""The composed reference: normalization written as plain torch ops, differentiated by autograd.

It is the slow, obviously-correct twin of :mod:`normlab.core.normalize`: tests compare the
closed-form backward against it, and the closed-form backward falls back on it when a
second derivative is asked for (``create_graph=True``), because autograd can
differentiate these ops as many times as needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import InputTypeError
from .moments import compute_dtype

__all__ = ["reference_normalize"]


def reference_normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dims: Sequence[int],
    eps: float,
    *,
    centered: bool = True,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = weight · (x − μ) / √(σ² + ε) + bias, statistics over ``dims`` unless given.

    With ``rstd`` given, ``mean`` (when centered) and ``rstd`` are treated as constants —
    eval-mode BatchNorm. Without, they are computed from ``x`` and differentiated
    through. ``weight``/``bias`` must already broadcast against ``x``. Computed in
    float32 for float16/bfloat16 input; the result has the input's dtype.

    Args:
        x: the input.
        weight: γ, broadcast against ``x``, or None.
        bias: β, broadcast against ``x``, or None.
        dims: the dims each statistic is over.
        eps: added to the variance.
        centered: keyword-only; subtract the mean (False: RMSNorm). Default True.
        mean: keyword-only; a given mean, or None. Default None.
        rstd: keyword-only; a given 1/√(var + ε), or None. Default None.

    Returns:
        The output, ``x``'s dtype.

    Raises:
        TypeError: ``rstd`` given with ``centered`` but no ``mean``.
    """
    xc = x.to(compute_dtype(x.dtype))
    dims = tuple(dims)
    if rstd is None:
        if centered:
            mean = xc.mean(dims, keepdim=True)
            var = (xc - mean).square().mean(dims, keepdim=True)
        else:
            var = xc.square().mean(dims, keepdim=True)
        rstd = torch.rsqrt(var + eps)
    if not centered:
        xhat = xc * rstd
    elif mean is None:
        raise InputTypeError(
            "reference_normalize: a given rstd with centered=True needs the mean too (mean=); "
            "pass it, or centered=False to normalize by rstd alone"
        )
    else:
        xhat = (xc - mean) * rstd
    y = xhat
    if weight is not None:
        y = y * weight.to(xc.dtype)
    if bias is not None:
        y = y + bias.to(xc.dtype)
    return y.to(x.dtype)


def graph_grads(
    y: torch.Tensor, operands: Sequence[torch.Tensor | None], needs: Sequence[bool], dy: torch.Tensor
) -> list[torch.Tensor | None]:
    """``d(y·dy)/d operand`` with a graph (``create_graph=True``) for each operand that needs
    one and is a tensor, None elsewhere: the second-derivative fallbacks' last step, ``y`` a
    reference computed from the saved operands with grad mode on."""
    inputs = [t for t, need in zip(operands, needs) if need and t is not None]
    found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return [next(found) if need and t is not None else None for t, need in zip(operands, needs)]
