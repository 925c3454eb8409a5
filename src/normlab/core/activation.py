"""Activations fused after a normalization, and the memory-saving (in-place) mode in
composed torch ops — the fallback of the C++ kernels and their test reference.

In-Place Activated BatchNorm (Rota Bulò et al., 2018) keeps only the output y = act(z),
z = γ·x̂ + β, for backward: z = act⁻¹(y) and x̂ = (z − β)/γ are recovered from it, so the
input x need not be kept alive. That needs an invertible activation — identity,
LeakyReLU with slope > 0, ELU with α > 0 — and a guard for γ ≈ 0 (here |γ| is taken as at
least 1e-5 when recovering x̂; the forward is unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as TF


__all__ = [
    "ACTIVATION_DEFAULTS",
    "INVERTIBLE_ACTIVATIONS",
    "apply_activation",
    "check_activation",
    "inplace_abn",
]

#: activation name → its parameter's default (LeakyReLU's slope, ELU's alpha).
ACTIVATION_DEFAULTS = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.01, "elu": 1.0, "silu": 0.0, "prelu": 0.25}
INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")
GAMMA_GUARD = 1e-5


def check_activation(name: str, param: float | None = None, *, inplace: bool = False) -> float:
    """Validate an activation choice; returns its parameter (the default when None)."""
    if name not in ACTIVATION_DEFAULTS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_DEFAULTS)}, got {name!r}")
    value = ACTIVATION_DEFAULTS[name] if param is None else float(param)
    if not math.isfinite(value):
        raise ValueError(f"activation parameter must be finite, got {param!r}")
    if inplace:
        if name not in INVERTIBLE_ACTIVATIONS:
            raise ValueError(
                f"inplace=True keeps only the output and recovers the input by inverting the "
                f"activation, so it needs an invertible one ({', '.join(INVERTIBLE_ACTIVATIONS)}); "
                f"{name!r} is not (ReLU maps every negative input to 0). Use "
                f"activation='leaky_relu' (slope 0.01), or inplace=False"
            )
        if name in ("leaky_relu", "elu") and value <= 0:
            raise ValueError(f"inplace=True needs {name}'s parameter > 0 to be invertible, got {value}")
    return value


def apply_activation(z: torch.Tensor, name: str, param: float, prelu_weight: torch.Tensor | None = None):
    if name == "identity":
        return z
    if name == "relu":
        return TF.relu(z)
    if name == "leaky_relu":
        return TF.leaky_relu(z, param)
    if name == "elu":
        return TF.elu(z, param)
    if name == "silu":
        return TF.silu(z)
    if name == "prelu":
        return TF.prelu(z, prelu_weight)
    raise ValueError(f"unknown activation {name!r}")


def _inverse(y, name, param):
    if name == "leaky_relu":
        return torch.where(y > 0, y, y / param)
    if name == "elu":
        return torch.where(y > 0, y, torch.log1p(y / param))
    return y


def _grad_from_output(y, name, param):
    if name == "leaky_relu":
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, param))
    if name == "elu":
        return torch.where(y > 0, torch.ones_like(y), y + param)
    return torch.ones_like(y)


class _InPlaceABN(torch.autograd.Function):
    """Normalize with batch statistics, activate, and keep only the output."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, offset, rstd, dims, name, param):
        cdtype = rstd.dtype
        xc = x.to(cdtype)
        xhat = (xc - shift - offset) * rstd
        w = weight.to(cdtype) if weight is not None else None
        b = bias.to(cdtype) if bias is not None else None
        z = xhat if w is None else xhat * w
        z = z if b is None else z + b
        y = apply_activation(z, name, param).to(x.dtype)
        ctx.dims, ctx.name, ctx.param = dims, name, param
        ctx.save_for_backward(y, weight, bias, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("second derivatives are not supported in the in-place (output-only) mode")
        y, weight, bias, rstd = ctx.saved_tensors
        cdtype = rstd.dtype
        yc, dyc = y.to(cdtype), dy.to(cdtype)
        z = _inverse(yc, ctx.name, ctx.param)
        dz = dyc * _grad_from_output(yc, ctx.name, ctx.param)
        gamma = weight.to(cdtype) if weight is not None else torch.ones((), dtype=cdtype)
        beta = bias.to(cdtype) if bias is not None else torch.zeros((), dtype=cdtype)
        safe = torch.where(gamma.abs() < GAMMA_GUARD, torch.full_like(gamma, GAMMA_GUARD).copysign(gamma), gamma)
        xhat = (z - beta) / safe
        dims = ctx.dims
        g = dz * gamma
        dx = rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
        dw = (dz * xhat).sum_to_size(weight.shape).to(weight.dtype) if weight is not None else None
        db = dz.sum_to_size(bias.shape).to(bias.dtype) if bias is not None else None
        return dx.to(y.dtype), dw, db, None, None, None, None, None, None


def inplace_abn(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor,
    offset: torch.Tensor,
    rstd: torch.Tensor,
    dims: Sequence[int],
    name: str,
    param: float,
) -> torch.Tensor:
    """act(γ·(x − shift − offset)·rstd + β) keeping only the output (composed torch ops).

    ``weight``/``bias`` and the statistics broadcast against ``x``; the statistics were
    computed from ``x`` over ``dims`` (batch statistics)."""
    return _InPlaceABN.apply(x, weight, bias, shift, offset, rstd, tuple(dims), name, param)

