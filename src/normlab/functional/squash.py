"""dyt and derf: the elementwise squashing that replaces normalization in norm-free transformers.

    DyT  (Zhu, Chen, He, LeCun & Liu, CVPR 2025):  y = γ·tanh(α·x) + β
    Derf (Chen, Lu, Zhu, Sun & Liu, 2025):          y = γ·erf(α·x + s) + β

α (and Derf's shift s) are learned scalars; γ and β are per channel. No statistics are taken:
each element is squashed on its own, which is why these layers cost one pass and need no
reduction. With z = α·x + s, t = f(z) and g = γ·dy, the gradients are

    dβ = Σ dy,   dγ = Σ dy·t,   dz = g·f'(z),   dx = α·dz,   dα = Σ dz·x,   ds = Σ dz

with f'(z) = 1 − t² for tanh and (2/√π)·exp(−z²) for erf (derivation in docs/derivations.md):
autograd's graph of the formula, which keeps t (and for Derf z) beside x. A closed form that
keeps only x must recompute tanh or erf in its backward, and measured slower: 1.0–1.6× the
forward + backward time at the language-model and bench shapes (one thread, float32 and
float64), so both run as these plain ops on every path.
"""

from __future__ import annotations

import torch

from ..core import check_floating_input, compute_dtype
from ._params import affine_view, scalar_param

__all__ = ["derf", "dyt"]


def dyt(
    input: torch.Tensor,
    alpha: torch.Tensor | float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """Dynamic Tanh: ``weight · tanh(alpha · input) + bias``.

    ``alpha`` is a scalar (a float or a one-element tensor). ``channels_last=True``: ``weight``
    and ``bias`` have the shape of the input's trailing dims ((C,) for (*, C) tokens); False:
    they have shape (C,) and apply along dim 1 of an (N, C, \\*spatial) input (ConvNeXt).

    Args:
        input: (\\*, C) tokens, or (N, C, \\*spatial) with ``channels_last=False``.
        alpha: α, a float or a one-element tensor.
        weight: γ, or None. Default None.
        bias: β, or None. Default None.
        channels_last: keyword-only; where the channels are. Default True.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: parameters of the wrong shape, a non-scalar ``alpha``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    return _squash("dyt", input, alpha, None, weight, bias, channels_last, erf=False)


def derf(
    input: torch.Tensor,
    alpha: torch.Tensor | float,
    shift: torch.Tensor | float = 0.0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """Dynamic erf: ``weight · erf(alpha · input + shift) + bias``.

    Args:
        input, alpha, weight, bias, channels_last: as for :func:`dyt`.
        shift: s, a float or a one-element tensor. Default 0.0.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: parameters of the wrong shape, a non-scalar ``alpha`` or ``shift``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    return _squash("derf", input, alpha, shift, weight, bias, channels_last, erf=True)


def _squash(
    fn: str,
    input: torch.Tensor,
    alpha: torch.Tensor | float,
    shift: torch.Tensor | float | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    channels_last: bool,
    *,
    erf: bool,
) -> torch.Tensor:
    check_floating_input(input)
    alpha_t = scalar_param(alpha, "alpha", input, fn)
    shift_t = None if shift is None else scalar_param(shift, "shift", input, fn)
    w = affine_view(weight, "weight", input, channels_last, fn)
    b = affine_view(bias, "bias", input, channels_last, fn)
    return squash_reference(input, alpha_t, shift_t, w, b, erf=erf)


def squash_reference(
    x: torch.Tensor,
    alpha: torch.Tensor,
    shift: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    erf: bool,
) -> torch.Tensor:
    """The formula in differentiable torch ops (float32 arithmetic for half inputs)."""
    cdtype = compute_dtype(x.dtype)
    z = x.to(cdtype) * alpha.to(cdtype)
    if shift is not None:
        z = z + shift.to(cdtype)
    y = torch.erf(z) if erf else torch.tanh(z)
    if weight is not None:
        y = y * weight.to(cdtype)
    if bias is not None:
        y = y + bias.to(cdtype)
    return y.to(x.dtype)
