"""scale_norm: ScaleNorm (Nguyen & Salazar, 2019, "Transformers without Tears").

One learned scalar g replaces LayerNorm's per-element γ and β, and the ℓ2 norm of the
normalized dims replaces the standard deviation:

    y = g · x / max(‖x‖₂, ε)

The norm is computed from normlab's mean square (:func:`normlab.core.mean_square`, float32
for half inputs): ‖x‖₂ = √(d · mean(x²)), d the number of normalized elements.
"""

from __future__ import annotations

import torch

from ..core import check_eps, check_floating_input, compute_dtype, mean_square, normalize_shape_arg
from ..core.checks import InputError
from ..core.types import ShapeLike
from ._params import scalar_param

__all__ = ["scale_norm"]


def scale_norm(
    input: torch.Tensor, normalized_shape: ShapeLike, scale: torch.Tensor | float, eps: float = 1e-5
) -> torch.Tensor:
    r"""``scale · input / max(‖input‖₂, eps)``, the norm over the trailing ``normalized_shape``.

    Args:
        input: (\*, \*normalized_shape).
        normalized_shape: the trailing dims the ℓ2 norm is over (an int or a sequence).
        scale: the scalar g, a float or a one-element tensor.
        eps: the floor of the norm; a finite number >= 0. Default 1e-5.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: ``normalized_shape`` not the input's trailing dims, a bad ``scale`` or ``eps``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    check_floating_input(input)
    shape = normalize_shape_arg(normalized_shape)
    k = len(shape)
    if input.dim() < k or tuple(input.shape[-k:]) != shape:
        raise InputError(
            f"scale_norm: normalized_shape={list(shape)} must equal the trailing dims of the input, got input "
            f"shape {tuple(input.shape)}"
        )
    eps = check_eps(eps)
    g = scalar_param(scale, "scale", input, "scale_norm")
    dims = tuple(range(input.dim() - k, input.dim()))
    count = 1
    for d in shape:
        count *= d
    cdtype = compute_dtype(input.dtype)
    # max(‖x‖, ε) as √max(‖x‖², ε²): the clamp before the root keeps the gradient of an all-zero
    # row 0 (the root's slope at 0 is infinite, and 0·∞ is NaN)
    norm = (mean_square(input, dims) * count).clamp(min=eps * eps).sqrt()
    return (input.to(cdtype) * (g.to(cdtype) / norm)).to(input.dtype)
