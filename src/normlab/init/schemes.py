"""Xavier/Glorot, He/Kaiming, LeCun and orthogonal initializers, each with ``activation=``.

Every initializer draws from a zero-mean distribution with standard deviation
``gain(activation) · base_std`` and writes into ``tensor`` in place (returning it):

    xavier   base_std = √(2 / (fan_in + fan_out))     uniform bound √3 · std
    he       base_std = 1 / √fan  (fan_in or fan_out) he_normal: std = gain/√fan
    lecun    base_std = 1 / √fan_in
    orthogonal: a (semi-)orthogonal matrix scaled by the gain

Fans follow torch's convention: for a conv weight (C_out, C_in/groups, *k),
fan_in = C_in/groups · prod(k) and fan_out = C_out · prod(k).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from ..core import InputError, InputTypeError
from .gains import gain as gain_for

__all__ = [
    "fans",
    "he_normal_",
    "he_uniform_",
    "lecun_normal_",
    "orthogonal_",
    "xavier_normal_",
    "xavier_uniform_",
]


def fans(tensor: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of shape (out, in, *kernel).

    Args:
        tensor: the weight, at least 2 dims.

    Returns:
        ``(in · prod(kernel), out · prod(kernel))``.

    Raises:
        ValueError: fewer than 2 dims.
        TypeError: a non-tensor.
    """
    if not isinstance(tensor, torch.Tensor):
        raise InputTypeError(f"expected a torch.Tensor weight, got {type(tensor).__name__}")
    if tensor.dim() < 2:
        raise InputError(f"fans need a weight of at least 2 dims (out, in, *kernel), got shape {tuple(tensor.shape)}")
    receptive = math.prod(tensor.shape[2:]) if tensor.dim() > 2 else 1
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _gain(activation: str, negative_slope: float | None, gain: float | None, convention: str) -> float:
    if gain is not None:
        if negative_slope is not None:
            raise InputError(
                f"negative_slope={negative_slope!r} would be ignored with an explicit gain={gain!r}: give one"
            )
        return float(gain)
    # gain_for refuses a slope for any activation but leaky_relu, rather than ignore it.
    return gain_for(activation, negative_slope, convention=convention)


def _is_empty(tensor: object, stacklevel: int = 4) -> bool:
    """A zero-element weight has nothing to draw (torch's initializers skip it too). The
    warning names the caller's line, as torch's does: ``stacklevel`` 4 from a ``*_std`` helper
    (caller → initializer → helper → here), 3 from an initializer itself."""
    if isinstance(tensor, torch.Tensor) and tensor.numel() == 0:
        warnings.warn("Initializing zero-element tensors is a no-op", UserWarning, stacklevel=stacklevel)
        return True
    return False


def _fill_uniform(tensor: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def _fill_normal(tensor: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)


_SHARED_SECTIONS = """
    Args:
        tensor: the weight, shape (out, in, \\*kernel), at least 2 dims.
        activation: the activation that follows the layer, by name (:data:`ACTIVATIONS`);
            it sets the gain. Default "{activation}".{mode}
        gain, negative_slope, convention, generator: keyword-only, as for
            :func:`xavier_uniform_`.

    Returns:
        ``tensor``, filled in place.

    Raises:
        ValueError, TypeError: as for :func:`xavier_uniform_`.
    """
_MODE = """
        mode: keyword-only; "fan_in" (default: preserves the forward variance) or
            "fan_out" (the backward one)."""

_Initializer = TypeVar("_Initializer", bound=Callable[..., torch.Tensor])


def _shared_sections(initializer: _Initializer) -> _Initializer:
    """The Args, Returns and Raises that every initializer but :func:`xavier_uniform_` shares,
    written once and appended to its docstring; ``activation``'s default and whether there is
    a ``mode`` are read from its signature, so the text cannot drift from the code."""
    parameters = inspect.signature(initializer).parameters
    sections = _SHARED_SECTIONS.format(
        activation=parameters["activation"].default, mode=_MODE if "mode" in parameters else ""
    )
    initializer.__doc__ = (initializer.__doc__ or "").rstrip() + "\n" + sections
    return initializer


def _xavier_std(
    tensor: torch.Tensor, activation: str, negative_slope: float | None, gain: float | None, convention: str
) -> float | None:
    """gain·√(2/(fan_in + fan_out)), or None for a zero-element tensor (after every
    argument is checked)."""
    fan_in, fan_out = fans(tensor)
    g = _gain(activation, negative_slope, gain, convention)
    if _is_empty(tensor):
        return None
    return g * math.sqrt(2.0 / (fan_in + fan_out))


def xavier_uniform_(
    tensor: torch.Tensor,
    activation: str = "tanh",
    *,
    gain: float | None = None,
    negative_slope: float | None = None,
    convention: str = "glorot",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Glorot & Bengio (2010): U[−b, b], b = gain · √6/√(fan_in + fan_out).

    With the default ``activation="tanh"`` this is exactly the paper's bound; pass
    ``activation="sigmoid"`` for the 4× bound sigmoid needs (see :mod:`normlab.init.gains`).

    Args:
        tensor: the weight, shape (out, in, \\*kernel), at least 2 dims.
        activation: the activation that follows the layer, by name (:data:`ACTIVATIONS`);
            it sets the gain. Default "tanh".
        gain: keyword-only; the gain itself, instead of the one ``activation`` implies.
            Default None.
        negative_slope: keyword-only; LeakyReLU's slope, for ``activation="leaky_relu"``
            only (default 0.01 there); refused together with ``gain``.
        convention: keyword-only; "glorot" (default: the papers' gains) or "torch"
            (``torch.nn.init.calculate_gain``'s); see :func:`gain`.
        generator: keyword-only; the ``torch.Generator`` to draw from; None for torch's
            global one.

    Returns:
        ``tensor``, filled in place (a zero-element tensor is returned untouched, with
        torch's warning).

    Raises:
        ValueError: a tensor with fewer than 2 dims, an unknown activation, mode or
            convention, a slope with another activation or with ``gain``.
        TypeError: a non-tensor weight.
    """
    std = _xavier_std(tensor, activation, negative_slope, gain, convention)
    return tensor if std is None else _fill_uniform(tensor, std, generator)


@_shared_sections
def xavier_normal_(
    tensor: torch.Tensor,
    activation: str = "tanh",
    *,
    gain: float | None = None,
    negative_slope: float | None = None,
    convention: str = "glorot",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Glorot & Bengio (2010), normal form: N(0, gain² · 2/(fan_in + fan_out))."""
    std = _xavier_std(tensor, activation, negative_slope, gain, convention)
    return tensor if std is None else _fill_normal(tensor, std, generator)


def _check_mode(mode: str) -> None:
    if mode not in ("fan_in", "fan_out"):
        raise InputError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


def _he_std(
    tensor: torch.Tensor, activation: str, negative_slope: float | None, mode: str, gain: float | None, convention: str
) -> float | None:
    """gain/√fan, or None for a zero-element tensor (after every argument is checked)."""
    _check_mode(mode)
    fan_in, fan_out = fans(tensor)
    g = _gain(activation, negative_slope, gain, convention)
    if _is_empty(tensor):
        return None
    return g / math.sqrt(fan_in if mode == "fan_in" else fan_out)


@_shared_sections
def he_uniform_(
    tensor: torch.Tensor,
    activation: str = "relu",
    *,
    mode: str = "fan_in",
    gain: float | None = None,
    negative_slope: float | None = None,
    convention: str = "glorot",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """He et al. (2015): U[−b, b], b = gain · √3/√fan (gain √2 for ReLU).

    ``mode="fan_in"`` preserves the forward variance, ``"fan_out"`` the backward one;
    ``negative_slope`` is LeakyReLU's slope (``activation="leaky_relu"``)."""
    std = _he_std(tensor, activation, negative_slope, mode, gain, convention)
    return tensor if std is None else _fill_uniform(tensor, std, generator)


@_shared_sections
def he_normal_(
    tensor: torch.Tensor,
    activation: str = "relu",
    *,
    mode: str = "fan_in",
    gain: float | None = None,
    negative_slope: float | None = None,
    convention: str = "glorot",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """He et al. (2015): N(0, gain²/fan) — Var(w) = 2/fan_in for ReLU."""
    std = _he_std(tensor, activation, negative_slope, mode, gain, convention)
    return tensor if std is None else _fill_normal(tensor, std, generator)


@_shared_sections
def lecun_normal_(
    tensor: torch.Tensor,
    activation: str = "linear",
    *,
    gain: float | None = None,
    negative_slope: float | None = None,
    convention: str = "glorot",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LeCun et al. (1998): N(0, gain²/fan_in); with gain 1 the SELU recipe."""
    std = _he_std(tensor, activation, negative_slope, "fan_in", gain, convention)  # He's formula, on fan_in
    return tensor if std is None else _fill_normal(tensor, std, generator)


@_shared_sections
def orthogonal_(
    tensor: torch.Tensor,
    activation: str = "linear",
    *,
    gain: float | None = None,
    negative_slope: float | None = None,
    convention: str = "glorot",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Saxe et al. (2014): a (semi-)orthogonal matrix (rows or columns orthonormal) × gain.

    The weight is flattened to (out, in·prod(kernel)); a QR decomposition of a Gaussian
    matrix, with the signs of R's diagonal folded in, makes the draw uniform (Haar)."""
    if not isinstance(tensor, torch.Tensor):
        raise InputTypeError(f"expected a torch.Tensor weight, got {type(tensor).__name__}")
    if tensor.dim() < 2:
        raise InputError(f"orthogonal_ needs at least 2 dims, got shape {tuple(tensor.shape)}")
    scale = _gain(activation, negative_slope, gain, convention)  # checked even when there is nothing to fill
    if _is_empty(tensor, stacklevel=3):
        return tensor
    rows = tensor.shape[0]
    cols = tensor.numel() // rows
    flat = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if rows < cols:
        q = q.T
    with torch.no_grad():
        tensor.copy_((q * scale).reshape(tensor.shape).to(tensor.dtype))
    return tensor
