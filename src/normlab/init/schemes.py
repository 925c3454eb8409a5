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

import math

import torch

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
    """(fan_in, fan_out) of a weight of shape (out, in, *kernel)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(tensor).__name__}")
    if tensor.dim() < 2:
        raise ValueError(f"fans need a weight of at least 2 dims (out, in, *kernel), got shape {tuple(tensor.shape)}")
    receptive = math.prod(tensor.shape[2:]) if tensor.dim() > 2 else 1
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _gain(activation, negative_slope, gain, convention):
    return float(gain) if gain is not None else gain_for(activation, negative_slope, convention=convention)


def _fill_uniform(tensor, std, generator):
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def _fill_normal(tensor, std, generator):
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)


def xavier_uniform_(tensor, activation="tanh", *, gain=None, negative_slope=None, convention="glorot", generator=None):
    """Glorot & Bengio (2010): U[−b, b], b = gain · √6/√(fan_in + fan_out).

    With the default ``activation="tanh"`` this is exactly the paper's bound; pass
    ``activation="sigmoid"`` for the 4× bound sigmoid needs (see :mod:`normlab.init.gains`).
    """
    fan_in, fan_out = fans(tensor)
    std = _gain(activation, negative_slope, gain, convention) * math.sqrt(2.0 / (fan_in + fan_out))
    return _fill_uniform(tensor, std, generator)


def xavier_normal_(tensor, activation="tanh", *, gain=None, negative_slope=None, convention="glorot", generator=None):
    """Glorot & Bengio (2010), normal form: N(0, gain² · 2/(fan_in + fan_out))."""
    fan_in, fan_out = fans(tensor)
    std = _gain(activation, negative_slope, gain, convention) * math.sqrt(2.0 / (fan_in + fan_out))
    return _fill_normal(tensor, std, generator)


def _he_std(tensor, activation, negative_slope, mode, gain, convention):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = fans(tensor)
    fan = fan_in if mode == "fan_in" else fan_out
    return _gain(activation, negative_slope, gain, convention) / math.sqrt(fan)


def he_uniform_(
    tensor, activation="relu", *, mode="fan_in", negative_slope=None, gain=None, convention="glorot", generator=None
):
    """He et al. (2015): U[−b, b], b = gain · √3/√fan (gain √2 for ReLU).

    ``mode="fan_in"`` preserves the forward variance, ``"fan_out"`` the backward one;
    ``negative_slope`` is LeakyReLU's slope (``activation="leaky_relu"``).
    """
    return _fill_uniform(tensor, _he_std(tensor, activation, negative_slope, mode, gain, convention), generator)


def he_normal_(
    tensor, activation="relu", *, mode="fan_in", negative_slope=None, gain=None, convention="glorot", generator=None
):
    """He et al. (2015): N(0, gain²/fan) — Var(w) = 2/fan_in for ReLU."""
    return _fill_normal(tensor, _he_std(tensor, activation, negative_slope, mode, gain, convention), generator)


def lecun_normal_(tensor, activation="linear", *, gain=None, negative_slope=None, convention="glorot", generator=None):
    """LeCun et al. (1998): N(0, gain²/fan_in); with gain 1 the SELU recipe."""
    fan_in, _ = fans(tensor)
    std = _gain(activation, negative_slope, gain, convention) / math.sqrt(fan_in)
    return _fill_normal(tensor, std, generator)


def orthogonal_(tensor, activation="linear", *, gain=None, negative_slope=None, convention="glorot", generator=None):
    """Saxe et al. (2014): a (semi-)orthogonal matrix (rows or columns orthonormal) × gain.

    The weight is flattened to (out, in·prod(kernel)); a QR decomposition of a Gaussian
    matrix, with the signs of R's diagonal folded in, makes the draw uniform (Haar).
    """
    if tensor.dim() < 2:
        raise ValueError(f"orthogonal_ needs at least 2 dims, got shape {tuple(tensor.shape)}")
    rows = tensor.shape[0]
    cols = tensor.numel() // rows
    flat = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if rows < cols:
        q = q.T
    scale = _gain(activation, negative_slope, gain, convention)
    with torch.no_grad():
        tensor.copy_((q * scale).reshape(tensor.shape).to(tensor.dtype))
    return tensor
