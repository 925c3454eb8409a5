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


# --- the norms beyond the classic five: forward formulas, each written from its paper -------------
#
# Their gradients are checked against central differences of these float64 forwards
# (``numeric_grad``), not against a hand-staged backward: the difference quotient knows nothing
# of either implementation's algebra.


def numeric_grad(f, arrays, dy, h=1e-6):
    """∂(Σ dy·f(*arrays))/∂a for each array a, by central differences in float64."""
    grads = []
    for i, a in enumerate(arrays):
        if a is None:
            grads.append(None)
            continue
        g = np.zeros_like(a, dtype=np.float64)
        for idx in np.ndindex(a.shape):
            bumped = [None if b is None else np.array(b, dtype=np.float64, copy=True) for b in arrays]
            bumped[i][idx] += h
            up = (dy * f(*bumped)).sum()
            bumped[i][idx] -= 2 * h
            down = (dy * f(*bumped)).sum()
            g[idx] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def _per_channel(p, ndim):
    return None if p is None else p.reshape((1, -1) + (1,) * (ndim - 2))


def _affine_np(y, gamma, beta):
    if gamma is not None:
        y = y * _per_channel(gamma, y.ndim)
    if beta is not None:
        y = y + _per_channel(beta, y.ndim)
    return y


def weight_standardization(w, eps, gain=None):
    """Ŵ[o] = (W[o] − mean W[o]) / √(var W[o] + ε) · gain[o], over each output channel's fan-in."""
    rows = w.reshape(w.shape[0], -1)
    mu = rows.mean(axis=1, keepdims=True)
    var = ((rows - mu) ** 2).mean(axis=1, keepdims=True)
    out = (rows - mu) / np.sqrt(var + eps)
    if gain is not None:
        out = out * gain.reshape(-1, 1)
    return out.reshape(w.shape)


def filter_response_norm(x, gamma, beta, eps, tau=None):
    """ν² = mean over the spatial dims of x², y = γ·x/√(ν² + ε) + β, then max(y, τ)."""
    axes = tuple(range(2, x.ndim))
    nu2 = (x**2).mean(axis=axes, keepdims=True)
    y = _affine_np(x / np.sqrt(nu2 + eps), gamma, beta)
    return y if tau is None else np.maximum(y, _per_channel(tau, x.ndim))


def _std(x, axes, eps):
    mu = x.mean(axis=axes, keepdims=True)
    return np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)


def _rms(x, axes, eps):
    return np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)


def evonorm_batch(x, variant, gamma, beta, v, eps, running_var=None):
    """B0: x / max(σ_B, v·x + σ_I); B1: x / max(σ_B, (x + 1)·ρ_I); B2: x / max(σ_B, ρ_I − x).
    σ_B from the batch (biased) unless ``running_var`` is given."""
    spatial = tuple(range(2, x.ndim))
    if running_var is None:
        left = _std(x, (0,) + spatial, eps)
    else:
        left = np.sqrt(_per_channel(running_var, x.ndim) + eps)
    if variant == "b0":
        right = x * _per_channel(v, x.ndim) + _std(x, spatial, eps)
    elif variant == "b1":
        right = (x + 1) * _rms(x, spatial, eps)
    else:
        right = _rms(x, spatial, eps) - x
    return _affine_np(x / np.maximum(left, right), gamma, beta)


def evonorm_sample(x, groups, gamma, beta, eps, *, numerator, stat, v=None):
    """numerator "gate": x·sigmoid(v·x), "silu": x·sigmoid(x), None: x; over the group std
    ("std") or root mean square ("rms") of each (sample, group), or nothing (None)."""
    if numerator == "gate":
        top = x / (1 + np.exp(-x * _per_channel(v, x.ndim)))
    elif numerator == "silu":
        top = x / (1 + np.exp(-x))
    else:
        top = x
    if stat is not None:
        n, c = x.shape[:2]
        grouped = x.reshape((n, groups, c // groups) + x.shape[2:])
        axes = tuple(range(2, grouped.ndim))
        d = _std(grouped, axes, eps) if stat == "std" else _rms(grouped, axes, eps)
        top = (top.reshape(grouped.shape) / d).reshape(x.shape)
    return _affine_np(top, gamma, beta)


def _softmax(a):
    e = np.exp(a - a.max())
    return e / e.sum()


def switchable_norm(x, gamma, beta, mean_logits, var_logits, eps, running=None):
    """μ = Σ softmax(λ_μ)·(μ_IN, μ_LN, μ_BN), σ² likewise, each moment taken directly over its
    own axes (biased); BN's replaced by ``running`` = (mean, var) when given."""
    spatial = tuple(range(2, x.ndim))
    means = [x.mean(axis=spatial, keepdims=True), x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)]
    variances = [x.var(axis=spatial, keepdims=True), x.var(axis=tuple(range(1, x.ndim)), keepdims=True)]
    if len(mean_logits) == 3:
        if running is None:
            means.append(x.mean(axis=(0,) + spatial, keepdims=True))
            variances.append(x.var(axis=(0,) + spatial, keepdims=True))
        else:
            means.append(_per_channel(running[0], x.ndim))
            variances.append(_per_channel(running[1], x.ndim))
    mu = sum(w * m for w, m in zip(_softmax(mean_logits), means))
    var = sum(w * s for w, s in zip(_softmax(var_logits), variances))
    return _affine_np((x - mu) / np.sqrt(var + eps), gamma, beta)


def dyt(x, alpha, gamma, beta):
    """γ·tanh(α·x) + β, γ and β over the trailing dims."""
    return np.tanh(alpha.reshape(()) * x) * gamma + beta


def derf(x, alpha, shift, gamma, beta):
    """γ·erf(α·x + s) + β."""
    from math import erf

    return np.vectorize(erf)(alpha.reshape(()) * x + shift.reshape(())) * gamma + beta


def scale_norm(x, scale, eps, ndims=1):
    """g·x / max(‖x‖₂, ε) over the trailing ``ndims`` dims."""
    axes = tuple(range(x.ndim - ndims, x.ndim))
    norm = np.sqrt((x**2).sum(axis=axes, keepdims=True))
    return scale.reshape(()) * x / np.maximum(norm, eps)
