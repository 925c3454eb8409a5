"""weight_standardization: LayerNorm of a convolution's weight over its fan-in.

Weight Standardization (Qiao et al., 2019) normalizes each output channel's filter to zero
mean and unit variance over its C_in/groups · k_h · k_w inputs before the convolution:

    Ŵ[o] = (W[o] − mean(W[o])) / √(var(W[o]) + ε)        (biased variance)

which is the one normalization of normlab's core on the weight viewed as (C_out, fan_in):
a LayerNorm of each row, through :func:`normlab.core.row_norm` (its kernels, its closed-form
backward, its path rule). Scaled WS (NFNets, Brock et al., 2021) multiplies the result by a
per-output-channel ``gain`` (a learned gain times γ/√fan_in).
"""

from __future__ import annotations

import torch

from ..core import check_eps, check_floating_input, row_norm
from ..core.checks import InputError
from ._params import check_kind

__all__ = ["weight_standardization"]


def weight_standardization(
    weight: torch.Tensor, eps: float = 1e-6, *, gain: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The standardized ``weight`` (shape (C_out, ...), any rank ≥ 2), times ``gain`` per
    output channel when given: each output channel's filter minus its mean, over the square
    root of its biased variance plus ``eps``.

    Args:
        weight: (C_out, C_in, \*kernel) or (C_out, fan_in).
        eps: added to the variance; a finite number >= 0. Default 1e-6.
        gain: keyword-only; C_out values (e.g. shaped (C_out, 1, 1, 1)), or None. Default None.

    Returns:
        The standardized weight, ``weight``'s shape and dtype.

    Raises:
        ValueError: a weight with fewer than 2 dims, a ``gain`` of another size, a bad ``eps``.
        TypeError: a non-tensor or non-floating weight.
    """
    check_floating_input(weight, "weight")
    if weight.dim() < 2:
        raise InputError(
            f"weight_standardization expects a weight of shape (C_out, C_in, *kernel) or (C_out, fan_in), "
            f"got shape {tuple(weight.shape)}"
        )
    eps = check_eps(eps)
    out_channels = weight.shape[0]
    fan_in = weight[0].numel()
    rows = weight.reshape(out_channels, fan_in)  # (C_out, fan_in): a view of a contiguous weight
    standardized = row_norm(rows, (fan_in,), None, None, eps, centered=True, operation="weight_standardization")
    if gain is not None:
        if not isinstance(gain, torch.Tensor) or gain.numel() != out_channels:
            shape = tuple(gain.shape) if isinstance(gain, torch.Tensor) else type(gain).__name__
            raise InputError(
                f"weight_standardization: gain must hold one value per output channel ({out_channels}), got {shape}"
            )
        check_kind(gain, "gain", weight, "weight_standardization")
        standardized = standardized * gain.reshape(out_channels, 1).to(standardized.dtype)
    return standardized.reshape(weight.shape)
