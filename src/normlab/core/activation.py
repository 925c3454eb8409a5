"""The activation registry, activations fused after a normalization, and the
memory-saving (in-place) mode in composed torch ops — the fallback of the C++ kernels and
their test reference.

:data:`ACTIVATIONS` is the one table of the activations normlab knows: each entry's
default parameter, its code in the C++ kernels (``enum Act`` in ``kernels/cpu/activation.h``,
checked against this table when the kernels load), whether it can be inverted, its
functional form and the torch.nn module it stands for. The fused layers, the kernels'
dispatch, the module factories and the experiments read it; nothing else lists them.

In-Place Activated BatchNorm (Rota Bulò et al., 2018) keeps only the output y = act(z),
z = γ·x̂ + β, for backward: z = act⁻¹(y) and x̂ = (z − β)/γ are recovered from it, so the
input x need not be kept alive. That needs an invertible activation — identity,
LeakyReLU with slope > 0, ELU with α > 0 — and care for γ ≈ 0, where the output holds
little or nothing of x̂: for channels with |γ| < 1e-5 the input's x̂ is kept (those channels
only; nothing extra when every |γ| is larger), so every gradient stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as TF
from torch import nn

from .checks import InputError
from .moments import centered_moments, compute_dtype, grouped_view

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_DEFAULTS",
    "FUSED_ACTIVATIONS",
    "INVERTIBLE_ACTIVATIONS",
    "Activation",
    "activation_for_code",
    "apply_activation",
    "check_activation",
    "inplace_abn",
]


#: ``(z, param, prelu_weight) -> act(z)``
ActivationForward = Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor]
#: ``(y, param) -> z`` or ``(y, param) -> act'(z)``, read off the output
OutputMap = Callable[[torch.Tensor, float], torch.Tensor]
#: A fused activation as the channel family's implementations take it: ``(name, param, prelu_weight)``
ActivationArgs = tuple[str, float, torch.Tensor | None]


@dataclass(frozen=True)
class Activation:
    """One activation. Its *parameter* is a float: LeakyReLU's slope, ELU's alpha,
    PReLU's initial slope; activations without one ignore it."""

    name: str
    #: the torch.nn class it stands for (exactly that class: a subclass may compute something else)
    module: type[nn.Module]
    #: ``(z, param, prelu_weight) -> act(z)``; None where torch has no pure function for it
    forward: ActivationForward | None
    default_param: float = 0.0
    #: the keyword of ``module``'s constructor (and, but for PReLU, its attribute) that holds the parameter
    param_keyword: str | None = None
    #: the value the C++ kernels switch on; None: no fused form
    code: int | None = None
    #: ``(y, param) -> z`` and ``(y, param) -> act'(z)`` from the output; None: not invertible
    inverse: OutputMap | None = None
    grad_from_output: OutputMap | None = None
    #: one learnable parameter per channel (PReLU): the module is built with ``num_parameters=channels``
    per_channel: bool = False
    #: other names for it (timm's ``act_layer`` spellings)
    aliases: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        return self.code is not None

    @property
    def invertible(self) -> bool:
        return self.inverse is not None

    @property
    def constant_param(self) -> bool:
        """Whether the parameter is a constant of the map (LeakyReLU, ELU) rather than
        none or the initial value of learnable state (PReLU)."""
        return self.param_keyword is not None and not self.per_channel

    def make_module(self, param: float | None = None, channels: int = 1) -> nn.Module:
        """A fresh ``module`` with ``param`` (the default when None)."""
        kwargs: dict[str, float | int] = {}
        if self.param_keyword is not None:
            kwargs[self.param_keyword] = self.default_param if param is None else param
        if self.per_channel:
            kwargs["num_parameters"] = channels
        return self.module(**kwargs)


# One entry per activation; aligned as a table, so kept out of the formatter's hands.
# fmt: off
_ENTRIES = (
    Activation("identity", nn.Identity, lambda z, param, prelu_weight: z, code=0,
               inverse=lambda y, param: y, grad_from_output=lambda y, param: torch.ones_like(y)),
    Activation("relu", nn.ReLU, lambda z, param, prelu_weight: TF.relu(z), code=1),
    Activation("leaky_relu", nn.LeakyReLU, lambda z, param, prelu_weight: TF.leaky_relu(z, param), code=2,
               default_param=0.01, param_keyword="negative_slope", aliases=("leakyrelu",),
               inverse=lambda y, param: torch.where(y > 0, y, y / param),
               grad_from_output=lambda y, param: torch.where(y > 0, torch.ones_like(y), torch.full_like(y, param))),
    Activation("elu", nn.ELU, lambda z, param, prelu_weight: TF.elu(z, param), code=3,
               default_param=1.0, param_keyword="alpha",
               inverse=lambda y, param: torch.where(y > 0, y, torch.log1p(y / param)),
               grad_from_output=lambda y, param: torch.where(y > 0, torch.ones_like(y), y + param)),
    Activation("silu", nn.SiLU, lambda z, param, prelu_weight: TF.silu(z), code=4, aliases=("swish",)),
    Activation("prelu", nn.PReLU, lambda z, param, prelu_weight: TF.prelu(z, cast(torch.Tensor, prelu_weight)), code=5,
               default_param=0.25, param_keyword="init", per_channel=True),
    # Not fused: the experiments' activations.
    Activation("tanh", nn.Tanh, lambda z, param, prelu_weight: torch.tanh(z)),
    Activation("sigmoid", nn.Sigmoid, lambda z, param, prelu_weight: torch.sigmoid(z)),
    # a random slope in [1/8, 1/3] in training, their mean in eval: no function of z alone
    Activation("rrelu", nn.RReLU, None),
)
# fmt: on

#: name → :class:`Activation`, every activation normlab knows.
ACTIVATIONS: dict[str, Activation] = {entry.name: entry for entry in _ENTRIES}
# why the in-place mode refuses each fused activation that has no inverse (its error says which)
_NOT_INVERTIBLE_BECAUSE = {
    "relu": "ReLU maps every negative input to 0",
    "silu": "SiLU falls to its minimum, about -0.278 at -1.278, and rises again, so two inputs share "
    "each output between -0.278 and 0",
    "prelu": "PReLU's slopes are learned and can reach 0 or below, where the negative side collapses "
    "or folds onto the positive one",
}
#: the ones the fused norm+activation layers and the kernels compute, in kernel-code order.
FUSED_ACTIVATIONS = tuple(
    sorted((a.name for a in _ENTRIES if a.fused), key=lambda name: cast(int, ACTIVATIONS[name].code))
)
#: activation name → its parameter's default, for the fused ones.
ACTIVATION_DEFAULTS = {name: ACTIVATIONS[name].default_param for name in FUSED_ACTIVATIONS}
#: the fused activations that the in-place mode can invert from the output (``inplace=True``).
INVERTIBLE_ACTIVATIONS = tuple(name for name in FUSED_ACTIVATIONS if ACTIVATIONS[name].invertible)
_BY_CODE = {ACTIVATIONS[name].code: ACTIVATIONS[name] for name in FUSED_ACTIVATIONS}
GAMMA_GUARD = 1e-5
SECOND_DERIVATIVES = (
    "the in-place (output-only) mode has no second derivatives (create_graph=True): its "
    "backward recovers the input from the output, which a second derivative would have to "
    "differentiate through the statistics it did not keep; use inplace=False for a gradient "
    "penalty or another double backward (docs/conventions.md)"
)


def activation_for_code(code: int) -> Activation:
    """The entry the kernels' ``code`` stands for."""
    return _BY_CODE[code]


def check_activation(name: str, param: float | None = None, *, inplace: bool = False) -> float:
    """Validate a fused activation choice; returns its parameter (the default when None).

    Args:
        name: "identity", "relu", "leaky_relu", "elu", "silu" or "prelu".
        param: LeakyReLU's slope or ELU's alpha, or None for the default. Default None.
        inplace: keyword-only; the in-place mode will run, so the activation must be
            invertible (identity, leaky_relu with a slope > 0, elu with alpha > 0). Default False.

    Returns:
        The parameter, a float.

    Raises:
        ValueError: an unknown name, a non-finite parameter, or an activation the in-place
            mode cannot invert.
    """
    entry = ACTIVATIONS.get(name)
    if entry is None or not entry.fused:
        raise InputError(f"activation must be one of {FUSED_ACTIVATIONS}, got {name!r}")
    value = entry.default_param if param is None else float(param)
    if not math.isfinite(value):
        raise InputError(f"activation parameter must be finite, got {param!r}")
    if inplace:
        if not entry.invertible:
            raise InputError(
                f"inplace=True keeps only the output and recovers the input by inverting the "
                f"activation, so it needs an invertible one ({', '.join(INVERTIBLE_ACTIVATIONS)}); "
                f"{name!r} is not ({_NOT_INVERTIBLE_BECAUSE[entry.name]}). Use "
                f"activation='leaky_relu' (slope 0.01), or inplace=False"
            )
        # the parameter scales the negative side: at 0 or below, that side collapses or overlaps the other
        if entry.param_keyword is not None and value <= 0:
            raise InputError(f"inplace=True needs {name}'s parameter > 0 to be invertible, got {value}")
    return value


def apply_activation(
    z: torch.Tensor, name: str, param: float, prelu_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(z)`` for a fused activation (``prelu_weight``: PReLU's slopes).

    Args:
        z: the normalized tensor.
        name: a fused activation's name (:func:`check_activation`).
        param: its parameter (slope or alpha).
        prelu_weight: PReLU's slopes, shape (1,) or (C,) along dim 1, or None. Default None.

    Returns:
        ``act(z)``, a new tensor.

    Raises:
        ValueError: a name that is not a fused activation.
    """
    entry = ACTIVATIONS.get(name)
    if entry is None or not entry.fused:
        raise InputError(f"unknown activation {name!r}")
    return cast(ActivationForward, entry.forward)(z, param, prelu_weight)  # every fused entry has one


def small_gamma_channels(weight: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the channels whose |γ| is below :data:`GAMMA_GUARD`, or None when there are
    none (the GPU kernels' criterion; the CPU paths use :func:`unrecoverable_channels`)."""
    if weight is None:
        return None
    small = (weight.detach().abs() < GAMMA_GUARD).nonzero().flatten()
    return small if small.numel() else None


#: The error the in-place mode lets the x̂ it recovers from the output carry, relative to x̂,
#: per dtype (docs/conventions.md): where the output cannot give x̂ back that well, the layer
#: keeps the input of that channel instead.
RECOVERY_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def unrecoverable_channels(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, name: str, param: float
) -> torch.Tensor | None:
    """Indices of the channels whose x̂ the in-place mode cannot recover from the output to
    within :data:`RECOVERY_TOLERANCE`, or None when there are none. Read before the forward
    overwrites ``x``.

    x̂ = (z − β)/γ carries the rounding of z, about 2·ulp(|β|)/|γ| (β = 0.5, γ = 1e-4: 1e-3 in
    float32); so a channel whose 4·eps·|β| exceeds tolerance·|γ| — or whose |γ| is below
    :data:`GAMMA_GUARD` — is kept. ELU's inverse log1p(y/α) loses eps/eˢ of z where z is very
    negative (−inf where y rounds to −α), so a channel whose smallest z falls below
    log(eps/tolerance) is kept too. Reading the data costs a host synchronization on a GPU;
    on the meta device there is nothing to read, and nothing is kept."""
    if x.device.type == "meta" or x.numel() == 0:
        return None
    eps = torch.finfo(x.dtype).eps
    tolerance = RECOVERY_TOLERANCE[x.dtype]
    channels = x.shape[1]
    with torch.no_grad():
        gamma = torch.ones(channels, device=x.device) if weight is None else weight.detach().abs().float()
        beta = torch.zeros(channels, device=x.device) if bias is None else bias.detach().abs().float()
        keep = (gamma < GAMMA_GUARD) | (4 * eps * beta > tolerance * gamma)
        if name == "elu":
            keep |= _lowest_z(x, weight, bias, groups) < math.log(eps / tolerance)
    kept = keep.nonzero().flatten()
    return kept if kept.numel() else None


def _lowest_z(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """The smallest z = γ·x̂ + β of each channel, from the input's extremes and statistics
    (no tensor as large as x is made)."""
    target, dims, w, b = grouped_view(x, weight, bias, groups)
    cdtype = compute_dtype(x.dtype)
    var, mean = torch.var_mean(target, dims, keepdim=True, correction=0)
    rstd = torch.rsqrt(var.to(cdtype) + 1e-30)
    spatial = dims if groups < 0 else tuple(range(3, target.dim()))  # per channel (and sample)
    low = (target.amin(spatial, keepdim=True).to(cdtype) - mean.to(cdtype)) * rstd
    high = (target.amax(spatial, keepdim=True).to(cdtype) - mean.to(cdtype)) * rstd
    if w is not None:
        low, high = low * w.to(cdtype), high * w.to(cdtype)
    z = torch.minimum(low, high)
    if b is not None:
        z = z + b.to(cdtype)
    z = z.flatten(1) if groups > 0 else z.flatten()  # (N, C) for GroupNorm, (C,) for BatchNorm
    return z.amin(0) if groups > 0 else z


def abn_backward(
    y: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    rstd: torch.Tensor,
    name: str,
    param: float,
    small: torch.Tensor | None = None,
    xhat_small: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dγ, dβ) of the in-place mode from its output ``y`` alone.

    ``rstd`` broadcasts against ``y`` grouped as :func:`normlab.core.moments.grouped_view` makes it and sets the
    compute dtype. ``small``: the channels whose x̂ cannot be recovered from ``y`` (see
    :func:`small_gamma_channels`), ``xhat_small`` their x̂ in (N, len(small), *spatial)."""
    cdtype = rstd.dtype
    target, dims, w, b = grouped_view(y, weight, bias, groups)
    yc, dyc = target.to(cdtype), dy.view(target.shape).to(cdtype)
    entry = ACTIVATIONS[name]
    # the in-place mode runs only invertible activations (check_activation), which have both maps
    z = cast(OutputMap, entry.inverse)(yc, param)
    dz = dyc * cast(OutputMap, entry.grad_from_output)(yc, param)
    gamma = w.to(cdtype) if w is not None else torch.ones((), dtype=cdtype, device=y.device)
    beta = b.to(cdtype) if b is not None else torch.zeros((), dtype=cdtype, device=y.device)
    safe = torch.where(gamma.abs() < GAMMA_GUARD, torch.full_like(gamma, GAMMA_GUARD).copysign(gamma), gamma)
    xhat = (z - beta) / safe
    if small is not None:
        # the kept channels' z may be −inf (ELU's output at −α): replaced below, kept finite
        # here so that nothing non-finite reaches the sums
        xhat = torch.nan_to_num(xhat, nan=0.0, posinf=0.0, neginf=0.0)
    if small is not None:
        flat = xhat.flatten(1, 2) if groups > 0 else xhat
        flat = flat.index_copy(1, small, cast(torch.Tensor, xhat_small).to(cdtype))  # given with small
        xhat = flat.unflatten(1, target.shape[1:3]) if groups > 0 else flat  # type: ignore[no-untyped-call]  # unannotated in torch
        dz = _exact_dz(dz, dyc, xhat, gamma, beta, small, target.shape, groups, entry, param)
    g = dz * gamma
    dx = rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    # w and b are weight and bias viewed by grouped_view: None exactly where those are
    dw = (
        (dz * xhat).sum_to_size(cast(torch.Tensor, w).shape).view(weight.shape).to(weight.dtype)
        if weight is not None
        else None
    )
    db = dz.sum_to_size(cast(torch.Tensor, b).shape).view(bias.shape).to(bias.dtype) if bias is not None else None
    return dx.view(y.shape).to(y.dtype), dw, db


def rewrite_kept_channels(
    ctx: Any,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    statistics: tuple[torch.Tensor, ...] | torch.Tensor,
    y: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    x_small: torch.Tensor,
) -> None:
    """The kernels' in-place backward (CPU and Triton end alike) redone on the channels whose
    x̂ the output does not hold (``ctx.small``, whose input ``x_small`` the forward kept) —
    for GroupNorm, on every channel of their groups, whose dx depends on them — by
    :func:`abn_backward`, given x̂ from the kept input: the kernel's dx, dγ and dβ
    (``grads``) of those channels are overwritten with the result, each in its own dtype, and
    an empty dγ/dβ — a parameter no gradient was asked for — is left. The first three
    ``statistics`` are the forward's shift, offset and rstd (per channel for BatchNorm,
    ``ctx.groups < 0``; per (sample, group) otherwise; the mean is shift + offset); they set
    the compute dtype. ``ctx`` holds the call's groups, activation code and parameter. dβ is
    rewritten too: ELU's dβ read off y + α has lost its digits near −α."""
    dx, dgamma, dbeta = grads
    small, groups = ctx.small, ctx.groups
    mean, rstd = statistics[0] + statistics[1], statistics[2]
    ndim = y.dim()
    if groups < 0:  # BatchNorm: channels are independent; statistics per channel
        channels, sub_groups = small, -1
        position = torch.arange(small.numel(), device=small.device)
        stat = (1, -1) + (1,) * (ndim - 2)
        xhat_small = (x_small.to(mean.dtype) - mean[small].view(stat)) * rstd[small].view(stat)
        sub_rstd = rstd[channels].view(stat)
    else:  # GroupNorm: redo every group holding such a channel; statistics per (sample, group)
        per = y.shape[1] // groups
        touched = torch.unique(small // per)
        channels = (touched[:, None] * per + torch.arange(per, device=small.device)).flatten()
        position = torch.searchsorted(channels, small)
        stat = (y.shape[0], -1) + (1,) * (ndim - 2)
        n_mean, n_rstd = mean.view(y.shape[0], groups), rstd.view(y.shape[0], groups)
        xhat_small = (x_small.to(mean.dtype) - n_mean[:, small // per].view(stat)) * n_rstd[:, small // per].view(stat)
        sub_groups = touched.numel()
        sub_rstd = n_rstd[:, touched].view((y.shape[0], -1) + (1,) * (ndim - 1))
    dx_c, dw_c, db_c = abn_backward(
        y.index_select(1, channels),
        dy.index_select(1, channels),
        None if weight is None else weight.detach().float().index_select(0, channels),
        None if bias is None else bias.detach().float().index_select(0, channels),
        sub_groups,
        sub_rstd,
        activation_for_code(ctx.act).name,
        ctx.param,
        position,
        xhat_small,
    )
    dx.index_copy_(1, channels, dx_c.to(dx.dtype))
    if dgamma.numel():  # asked for: there is a γ, so dγ of the redone channels
        dgamma.index_copy_(0, channels, cast(torch.Tensor, dw_c).to(dgamma.dtype))
    if db_c is not None and dbeta.numel():
        dbeta.index_copy_(0, channels, db_c.to(dbeta.dtype))


def _exact_dz(
    dz: torch.Tensor,
    dy: torch.Tensor,
    xhat: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    kept: torch.Tensor,
    shape: torch.Size,
    groups: int,
    entry: Activation,
    param: float,
) -> torch.Tensor:
    """dz = dy·act'(z) with z = γ·x̂ + β from the kept channels' exact x̂ — the derivative read
    off the output (ELU's y + α) has lost its digits where the output nears −α."""
    channel_shape = [1, *shape[1 : 3 if groups > 0 else 2]] + [1] * (len(shape) - (3 if groups > 0 else 2))
    mask = torch.zeros(math.prod(channel_shape), dtype=torch.bool, device=dz.device)
    mask[kept] = True
    with torch.enable_grad():
        z = (xhat * gamma + beta).detach().requires_grad_()
        (exact,) = torch.autograd.grad(cast(ActivationForward, entry.forward)(z, param, None), z, dy)
    return torch.where(mask.view(channel_shape), exact, dz)


class _InPlaceABN(torch.autograd.Function):
    """Normalize with batch statistics, activate, write the result over ``x`` and keep only it
    (and the x̂ of channels whose γ is too small to recover it from the output).

    Returns the output alone — autograd supports an in-place Function on a view only then —
    and puts the batch statistics into ``stats_out``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        groups: int,
        eps: float,
        name: str,
        param: float,
        stats_out: list[torch.Tensor],
    ) -> torch.Tensor:
        target, dims, w, b = grouped_view(x, weight, bias, groups)
        cdtype = compute_dtype(x.dtype)
        moments = centered_moments(target, dims)
        rstd = torch.rsqrt(moments.var + eps)
        xhat = (target.to(cdtype) - moments.shift - moments.offset) * rstd
        small = unrecoverable_channels(x, weight, bias, groups, name, param)
        xhat_small = None
        if small is not None:
            xhat_small = (xhat.flatten(1, 2) if groups > 0 else xhat).index_select(1, small)
        z = xhat if w is None else xhat * w.to(cdtype)
        z = z if b is None else z + b.to(cdtype)
        x.copy_(apply_activation(z, name, param).view(x.shape))
        ctx.mark_dirty(x)
        stats_out.extend((moments.mean, moments.var))
        ctx.groups, ctx.name, ctx.param, ctx.small = groups, name, param, small
        ctx.save_for_backward(x, weight, bias, rstd, xhat_small)
        return x

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVES)
        y, weight, bias, rstd, xhat_small = ctx.saved_tensors
        dx, dw, db = abn_backward(y, dy, weight, bias, ctx.groups, rstd, ctx.name, ctx.param, ctx.small, xhat_small)
        return dx, dw, db, None, None, None, None, None


def inplace_abn(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float,
    name: str,
    param: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act(γ·x̂ + β) written over ``x``, keeping only the output (composed torch ops).

    ``groups < 0``: BatchNorm statistics per channel; else GroupNorm with ``groups``.
    Returns ``(x, mean, var)`` with keepdim statistics of the batch.

    Args:
        x: the (N, C, ...) input, overwritten.
        weight: γ, shape (C,), or None.
        bias: β, shape (C,), or None.
        groups: < 0 for BatchNorm, else the number of groups.
        eps: added to the variance.
        name: the invertible activation's name.
        param: its parameter.
    """
    stats: list[torch.Tensor] = []
    y: torch.Tensor = _InPlaceABN.apply(x, weight, bias, groups, eps, name, param, stats)  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
    return y, stats[0], stats[1]
