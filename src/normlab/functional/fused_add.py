"""add_layer_norm and add_rms_norm: the pre-norm transformer step ``s = x + residual``,
``y = norm(s)``, returned as ``(y, s)`` and computed in one pass where the kernels run.

A pre-norm block keeps the residual stream ``s`` and feeds ``norm(s)`` to the next
sublayer; unfused, that is an addition that writes ``s`` and a norm that reads it back.
Fused, ``x`` and ``residual`` are read once and ``s`` and ``y`` written once, and backward
produces the one gradient that ``x`` and ``residual`` share, ``ds + norm_backward(dy)``, in
one pass too. Both outputs take part in autograd.
"""

from __future__ import annotations

import torch

from ..core import normalize_shape_arg, row_norm
from ..core.call_checks import check_row_args
from ..core.types import ShapeLike

__all__ = ["add_layer_norm", "add_rms_norm"]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(layer_norm(x + residual), x + residual)`` over the trailing ``normalized_shape``.

    Arguments after ``residual`` as for :func:`normlab.functional.layer_norm`. ``residual``
    has ``x``'s shape (or broadcasts to it); the sum is what the caller carries on as the
    residual stream, the normalized sum what the next sublayer reads.

    Args:
        x: (\*, \*normalized_shape), the sublayer's output.
        residual: the residual stream, ``x``'s shape (or broadcastable to it).
        normalized_shape: an int or a sequence of ints, the trailing dims to normalize over.
        weight: γ, shape ``normalized_shape``, or None. Default None.
        bias: β, shape ``normalized_shape``, or None. Default None.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.

    Returns:
        ``(y, s)``: ``s = x + residual`` and ``y = layer_norm(s)``.

    Raises:
        ValueError: as :func:`normlab.functional.layer_norm`, or a residual that does not
            broadcast to ``x``.

    Examples:
        >>> y, stream = nl.functional.add_layer_norm(attn_out, stream, (768,), weight, bias)
    """
    return _add_norm("add_layer_norm", x, residual, normalized_shape, weight, bias, eps, centered=True)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(rms_norm(x + residual), x + residual)`` over the trailing ``normalized_shape``.

    Arguments after ``residual`` as for :func:`normlab.functional.rms_norm`; ``eps=None`` is
    the machine epsilon of the computation dtype, as there.

    Args:
        x: (\*, \*normalized_shape), the sublayer's output.
        residual: the residual stream, ``x``'s shape (or broadcastable to it).
        normalized_shape: an int or a sequence of ints, the trailing dims to normalize over.
        weight: the gain, shape ``normalized_shape``, or None. Default None.
        eps: added to the mean square; None for the dtype's machine epsilon. Default None.

    Returns:
        ``(y, s)``: ``s = x + residual`` and ``y = rms_norm(s)``.

    Raises:
        ValueError: as :func:`normlab.functional.rms_norm`, or a residual that does not
            broadcast to ``x``.
    """
    return _add_norm("add_rms_norm", x, residual, normalized_shape, weight, None, eps, centered=False)


def _add_norm(
    fn: str,
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: ShapeLike,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
    *,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_layer_norm and add_rms_norm: check, then the row family's call with a residual."""
    normalized_shape = normalize_shape_arg(normalized_shape)
    eps = check_row_args(fn, x, normalized_shape, weight, bias, eps, centered=centered, residual=residual)
    return row_norm(
        x, normalized_shape, weight, bias, eps, centered=centered, residual=residual, operation=fn, checked=True
    )
