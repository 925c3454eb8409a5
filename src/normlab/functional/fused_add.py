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

from ..core import add_row_norm, check_eps, check_floating_input, check_param, compute_dtype, normalize_shape_arg
from ..core.checks import InputError

__all__ = ["add_layer_norm", "add_rms_norm"]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + residual), x + residual)`` over the trailing ``normalized_shape``.

    Arguments after ``residual`` as for :func:`normlab.functional.layer_norm`. ``residual``
    has ``x``'s shape (or broadcasts to it); the sum is what the caller carries on as the
    residual stream, the normalized sum what the next sublayer reads.
    """
    return _add_norm("add_layer_norm", x, residual, normalized_shape, weight, bias, eps, centered=True)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` over the trailing ``normalized_shape``.

    Arguments after ``residual`` as for :func:`normlab.functional.rms_norm`; ``eps=None`` is
    the machine epsilon of the computation dtype, as there.
    """
    return _add_norm("add_rms_norm", x, residual, normalized_shape, weight, None, eps, centered=False)


def _add_norm(fn, x, residual, normalized_shape, weight, bias, eps, *, centered, validated=False):
    """``validated``: a module's call, whose constructor checked the shape, eps and γ/β."""
    if not validated:
        check_floating_input(x, "x")
        check_floating_input(residual, "residual")
        normalized_shape = normalize_shape_arg(normalized_shape)
        if residual.device != x.device:
            raise InputError(f"{fn}: residual is on {residual.device} but x on {x.device}; move one of them")
        summed_shape = _summed_shape(fn, x, residual)
        k = len(normalized_shape)
        if len(summed_shape) < k or tuple(summed_shape[-k:]) != normalized_shape:
            raise InputError(
                f"{fn}: normalized_shape={list(normalized_shape)} must equal the trailing dims of "
                f"x + residual, got shape {tuple(summed_shape)} (expected (*, "
                f"{', '.join(map(str, normalized_shape))}))"
            )
        if eps is not None or centered:
            eps = check_eps(eps)
        what = f"{fn} over normalized_shape {list(normalized_shape)}"
        check_param(weight, "weight", normalized_shape, x, what)
        check_param(bias, "bias", normalized_shape, x, what)
    if eps is None:
        eps = torch.finfo(compute_dtype(torch.promote_types(x.dtype, residual.dtype))).eps
    return add_row_norm(x, residual, tuple(normalized_shape), weight, bias, eps, centered=centered, operation=fn)


def _summed_shape(fn: str, x: torch.Tensor, residual: torch.Tensor) -> torch.Size:
    try:
        summed = torch.broadcast_shapes(x.shape, residual.shape)
    except RuntimeError:
        summed = None
    if summed is None or summed != x.shape:
        raise InputError(
            f"{fn}: residual of shape {tuple(residual.shape)} must have x's shape {tuple(x.shape)} "
            f"(or broadcast to it), since the sum replaces x as the residual stream"
        )
    return summed
