"""Float64 NumPy reference of the textbook normalization formulas, staged as on paper.

Deliberately *not* the compact closed form that normlab.core uses: the backward here is
the chain rule taken one intermediate at a time (CS231n's staged derivation), so agreement
between the two is evidence, not a tautology.

    μ = mean(x),  σ² = mean((x − μ)²),  x̂ = (x − μ)/√(σ² + ε),  y = γ·x̂ + β
"""

from __future__ import annotations

import numpy as np


def _sum_to_shape(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``a`` over the dims along which an array of ``shape`` was broadcast."""
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


def forward(x, gamma, beta, axes, eps, *, centered=True, stats=None):
    """Returns y and a cache of every intermediate, as a dict with named entries."""
    axes = tuple(axes)
    n = int(np.prod([x.shape[a] for a in axes]))
    if stats is None:
        mu = x.mean(axis=axes, keepdims=True) if centered else np.zeros(1)
        xmu = x - mu
        var = (xmu**2).mean(axis=axes, keepdims=True)  # biased; for RMS this is E[x²]
    else:
        mu, var = stats  # given statistics: eval-mode BatchNorm
        xmu = x - mu
    std = np.sqrt(var + eps)
    inv_std = 1.0 / std
    xhat = xmu * inv_std
    y = xhat
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    cache = dict(
        x=x,
        mu=mu,
        xmu=xmu,
        var=var,
        std=std,
        inv_std=inv_std,
        xhat=xhat,
        gamma=gamma,
        beta=beta,
        axes=axes,
        n=n,
        centered=centered,
        batch_stats=stats is None,
    )
    return y, cache


def backward(dy, cache):
    """Staged chain rule through forward(); returns (dx, dγ, dβ)."""
    c = cache
    axes, n = c["axes"], c["n"]
    dgamma = None if c["gamma"] is None else _sum_to_shape(dy * c["xhat"], c["gamma"].shape)
    dbeta = None if c["beta"] is None else _sum_to_shape(dy, c["beta"].shape)
    dxhat = dy if c["gamma"] is None else dy * c["gamma"]
    if not c["batch_stats"]:
        return dxhat * c["inv_std"], dgamma, dbeta
    # x̂ = xmu · inv_std
    dxmu = dxhat * c["inv_std"]
    dinv_std = (dxhat * c["xmu"]).sum(axis=axes, keepdims=True)
    # inv_std = 1/std, std = √(var + ε)
    dstd = -dinv_std / c["std"] ** 2
    dvar = 0.5 * dstd / c["std"]
    # var = mean(xmu²)
    dxmu = dxmu + dvar * 2.0 * c["xmu"] / n
    if not c["centered"]:
        return dxmu, dgamma, dbeta
    # xmu = x − μ, μ = mean(x)
    dmu = -dxmu.sum(axis=axes, keepdims=True)
    dx = dxmu + dmu / n
    return dx, dgamma, dbeta


def masked_forward(x, mask, gamma, beta, axes, eps, *, stats=None):
    """The masked formulas, staged: m = mask broadcast to x, n = Σm per group,
    μ = Σ m·x / n, σ² = Σ m·(x − μ)² / n, y = m·(γ·x̂ + β). Padding is replaced by 0 first,
    so whatever it holds never enters."""
    axes = tuple(axes)
    m = np.broadcast_to(mask, x.shape).astype(np.float64)
    x = np.where(m > 0, x, 0.0)
    n = m.sum(axis=axes, keepdims=True)
    if stats is None:
        mu = (m * x).sum(axis=axes, keepdims=True) / np.maximum(n, 1)
        xmu = x - mu
        var = (m * xmu**2).sum(axis=axes, keepdims=True) / np.maximum(n, 1)
    else:
        mu, var = stats
        xmu = x - mu
    std = np.sqrt(var + eps)
    inv_std = 1.0 / std
    xhat = xmu * inv_std
    y = xhat
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    y = m * y
    cache = dict(
        m=m,
        n=n,
        xmu=xmu,
        std=std,
        inv_std=inv_std,
        xhat=xhat,
        gamma=gamma,
        beta=beta,
        axes=axes,
        batch_stats=stats is None,
    )
    return y, cache


def masked_backward(dy, cache):
    """Staged chain rule through masked_forward(); returns (dx, dγ, dβ)."""
    c = cache
    axes, m, n = c["axes"], c["m"], np.maximum(c["n"], 1)
    dy = m * dy  # y = m·(…): padded outputs are constants
    dgamma = None if c["gamma"] is None else _sum_to_shape(dy * c["xhat"], c["gamma"].shape)
    dbeta = None if c["beta"] is None else _sum_to_shape(dy, c["beta"].shape)
    dxhat = dy if c["gamma"] is None else dy * c["gamma"]
    dxmu = dxhat * c["inv_std"]
    if not c["batch_stats"]:
        return m * dxmu, dgamma, dbeta
    dinv_std = (dxhat * c["xmu"]).sum(axis=axes, keepdims=True)
    dstd = -dinv_std / c["std"] ** 2
    dvar = 0.5 * dstd / c["std"]
    # var = Σ m·xmu² / n
    dxmu = dxmu + dvar * 2.0 * m * c["xmu"] / n
    # xmu = x − μ, μ = Σ m·x / n
    dmu = -dxmu.sum(axis=axes, keepdims=True)
    dx = m * (dxmu + dmu * m / n)  # x enters only where m = 1 (x was replaced by 0 elsewhere)
    return dx, dgamma, dbeta
