"""filter_response_norm and tlu: Filter Response Normalization (Singh & Krishnan, 2020).

FRN normalizes each (sample, channel) by the mean square of its own response over the
spatial dims — InstanceNorm without the mean subtraction, or RMSNorm over (H, W):

    ν² = mean_{H,W}(x²),   y = γ·x / √(ν² + ε) + β

The Thresholded Linear Unit that follows it, z = max(y, τ) with a learned per-channel τ,
replaces ReLU: FRN does not centre its output, so a fixed threshold at 0 could cut off
everything. The normalization is normlab's core one (:func:`normlab.core.normalize_batch`
with ``centered=False``: the closed-form backward of RMSNorm on another grouping of axes);
where the path rule says "native" it runs as the same formula in differentiable torch ops.
"""

from __future__ import annotations

import torch

from ..core import check_eps, check_floating_input, choose_path, normalize_batch, reference_normalize
from ..core.checks import InputError
from ..core.moments import compute_dtype
from ._params import affine_view

__all__ = ["filter_response_norm", "tlu"]


def filter_response_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    tau: torch.Tensor | None = None,
) -> torch.Tensor:
    """FRN of an (N, C, \\*spatial) input, with the TLU ``max(y, tau)`` fused when ``tau`` is given.

    ``weight``, ``bias`` and ``tau`` have shape (C,). The default eps is timm's (1e-5); the
    paper uses 1e-6 and, for 1×1 feature maps, a learned one.

    Args:
        input: (N, C, \\*spatial), at least one spatial dim.
        weight: γ, shape (C,), or None. Default None.
        bias: β, shape (C,), or None. Default None.
        eps: added to ν²; a finite number >= 0. Default 1e-5.
        tau: keyword-only; the TLU's threshold τ, shape (C,), or None for FRN alone.
            Default None.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: an input with fewer than 3 dims, parameters of the wrong shape, a bad ``eps``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    check_floating_input(input)
    if input.dim() < 3:
        raise InputError(
            f"filter_response_norm expects input of shape (N, C, *spatial) with at least one spatial dim "
            f"(the statistic is over them), got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    eps = check_eps(eps)
    w = affine_view(weight, "weight", input, False, "filter_response_norm")
    b = affine_view(bias, "bias", input, False, "filter_response_norm")
    t = affine_view(tau, "tau", input, False, "filter_response_norm")
    w, b, t = (None if p is None else p.unsqueeze(0) for p in (w, b, t))  # (1, C, 1, ..., 1)
    dims = tuple(range(2, input.dim()))
    if choose_path(input)[0] == "native":
        # A plane whose mean square is not finite (an inf or NaN in it) comes out NaN whole,
        # as on the other paths (docs/conventions.md, "Backends"): torch's rsqrt(inf) is 0,
        # which would turn the plane's finite entries into 0s that look normalized.
        xc = input.to(compute_dtype(input.dtype))
        ms = xc.square().mean(dims, keepdim=True)
        rstd = torch.where(torch.isfinite(ms), torch.rsqrt(ms + eps), torch.nan)
        y = reference_normalize(input, w, b, dims, eps, centered=False, rstd=rstd)
    else:
        y = normalize_batch(input, w, b, dims, eps, centered=False)[0]
    return y if t is None else torch.maximum(y, t.to(y.dtype))


def tlu(input: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    r"""Thresholded Linear Unit ``max(input, tau)``, ``tau`` of shape (C,) along dim 1.

    At a tie the gradient is shared half and half between the input and τ, as torch.maximum's is.

    Args:
        input: (N, C, \*spatial).
        tau: the threshold τ, shape (C,).

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: ``tau`` None or of the wrong shape.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    check_floating_input(input)
    t = affine_view(tau, "tau", input, False, "tlu")
    if t is None:
        raise InputError("tlu needs tau, a tensor of shape (C,), got None")
    return torch.maximum(input, t.to(input.dtype))
