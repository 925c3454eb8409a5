"""batch_norm and instance_norm: the norms whose statistics can come from running estimates.

Both are argument-compatible with ``torch.nn.functional``; the keyword-only extras
(``num_batches_tracked``, ``unbiased_running_var``, ``on_nonfinite``) are what the
modules use to implement the cumulative average and the non-finite guard.
"""

from __future__ import annotations

import torch

from ..core import (
    NormStats,
    apply_activation,
    centered_moments,
    check_activation,
    check_eps,
    check_floating_input,
    check_momentum,
    check_nonfinite_policy,
    check_param,
    fast,
    inplace_abn,
    normalize,
    normalize_batch,
    normalize_given,
    reduced_count,
    update_running_stats,
)

__all__ = ["batch_norm", "batch_norm_act", "batch_renorm", "instance_norm"]


def _channel_view(t: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """(C,) → (1, C, 1, …, 1), so it broadcasts against an (N, C, *spatial) input."""
    return None if t is None else t.view((1, -1) + (1,) * (ndim - 2))


def _check_channel_tensors(fn, x, weight, bias, running_mean, running_var) -> None:
    channels = x.shape[1]
    what = f"{fn} over the {channels} channels of input dim 1"
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        check_param(t, name, (channels,), x, what)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{fn}: running_mean and running_var must be given together, got "
            f"running_mean={'a tensor' if running_mean is not None else None} and "
            f"running_var={'a tensor' if running_var is not None else None}"
        )


def _momentum_factor(momentum, num_batches_tracked):
    """The weight of this batch: ``momentum``, or 1/(k+1) for the cumulative average."""
    if momentum is not None:
        return momentum
    # A 0-dim tensor rather than float(num_batches_tracked): no host sync on accelerators.
    return 1.0 / (num_batches_tracked.to(torch.float64) + 1.0)


def _normalize_with_running(x, weight, bias, running_mean, running_var, dims, eps):
    """Normalize with the running estimates as constants (eval mode)."""
    ndim = x.dim()
    return normalize_given(
        x, _channel_view(weight, ndim), _channel_view(bias, ndim),
        _channel_view(running_mean, ndim), _channel_view(running_var, ndim), dims, eps,
    )


def _fold_into_running(
    running_mean, running_var, batch_mean, batch_var, count, momentum,
    num_batches_tracked, unbiased_running_var, on_nonfinite,
):
    if _fold_in_kernel(running_mean, running_var, batch_mean, batch_var, count, momentum,
                       num_batches_tracked, unbiased_running_var):
        return
    factor = _momentum_factor(momentum, num_batches_tracked)
    folded = update_running_stats(
        running_mean, running_var, batch_mean, batch_var, count, factor,
        unbiased=unbiased_running_var, on_nonfinite=on_nonfinite,
    )
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(folded.to(num_batches_tracked.dtype))


def _fold_in_kernel(running_mean, running_var, batch_mean, batch_var, count, momentum,
                    num_batches_tracked, unbiased_running_var) -> bool:
    """The same update in one C++ call (a dozen fewer tiny torch ops per training step) for
    float32/float64 CPU buffers and float64 batch statistics. False when it does not apply,
    or when the batch is not finite — then the Python path decides to skip, warn or raise."""
    kernels = fast.kernels() if running_mean.device.type == "cpu" else None
    if (kernels is None or batch_mean.dtype != torch.float64 or running_mean.dtype not in (torch.float32, torch.float64)
            or running_var.dtype != running_mean.dtype or not running_mean.is_contiguous()
            or not running_var.is_contiguous() or batch_mean.numel() != running_mean.numel()):
        return False
    if momentum is None and num_batches_tracked is None:
        return False
    with torch.no_grad():
        return kernels.running_update(
            running_mean, running_var, batch_mean.contiguous(), batch_var.contiguous(), count,
            -1.0 if momentum is None else float(momentum),
            num_batches_tracked if num_batches_tracked is not None else torch.empty(0), unbiased_running_var,
        )


def _check_update_args(momentum, num_batches_tracked, on_nonfinite):
    momentum = check_momentum(momentum, allow_none=num_batches_tracked is not None)
    check_nonfinite_policy(on_nonfinite)
    return momentum


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased_running_var: bool = True,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    r"""Batch normalization of an (N, C, \*spatial) input, one statistic per channel.

    Same arguments and results as :func:`torch.nn.functional.batch_norm`. In training,
    normalizes with the batch mean and *biased* batch variance over (N, \*spatial) and,
    when running estimates are given, updates them in place:
    ``running = (1 − momentum)·running + momentum·batch`` with the *unbiased* variance
    (or the biased one with ``unbiased_running_var=False``). With ``training=False``
    the running estimates are used as constants.

    Keyword-only extras:
        num_batches_tracked: a long 0-dim counter, incremented by one for each batch
            folded into the running estimates. With it, ``momentum=None`` selects the
            cumulative average (momentum 1/k for the k-th batch).
        on_nonfinite: ``"skip"`` (default) leaves the running estimates untouched when
            the batch statistics are NaN/inf; ``"raise"`` raises
            :class:`normlab.core.NonFiniteStatisticsError`. The *output* is computed from
            the batch statistics either way, so NaN/inf shows in the loss.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked=num_batches_tracked, unbiased_running_var=unbiased_running_var,
                       on_nonfinite=on_nonfinite)


def batch_norm_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    activation_param: float | None = None,
    prelu_weight: torch.Tensor | None = None,
    inplace: bool = False,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased_running_var: bool = True,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    """``activation(batch_norm(...))`` in one pass: the Conv → BN → activation order.

    ``activation`` is "identity", "relu", "leaky_relu" (``activation_param`` = slope,
    default 0.01), "elu" (alpha, default 1), "silu" or "prelu" (``prelu_weight``: one or C
    slopes). Only the input is kept for backward (torch.nn's BN + activation keeps two
    tensors). ``inplace=True`` is In-Place Activated BatchNorm: the output overwrites the
    input's memory and is all that is kept; the input is recovered in backward by
    inverting the activation, so it must be invertible (identity, leaky_relu, elu).
    """
    param = check_activation(activation, activation_param, inplace=inplace)
    _check_inplace_input(input, inplace)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked=num_batches_tracked, unbiased_running_var=unbiased_running_var,
                       on_nonfinite=on_nonfinite, activation=activation, param=param,
                       prelu_weight=prelu_weight, inplace=inplace, fn="batch_norm_act")


def _check_inplace_input(input, inplace: bool) -> None:
    if inplace and isinstance(input, torch.Tensor) and input.is_leaf and input.requires_grad:
        raise RuntimeError(
            "inplace=True overwrites its input, but the input is a leaf tensor that requires "
            "grad (a parameter or a user tensor); pass a computed tensor (e.g. a conv output) "
            "or use inplace=False"
        )


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, *,
                num_batches_tracked, unbiased_running_var, on_nonfinite, activation="identity", param=0.0,
                prelu_weight=None, inplace=False, fn="batch_norm"):
    check_floating_input(input)
    if input.dim() < 2:
        raise ValueError(
            f"{fn} expects input of shape (N, C) or (N, C, *spatial), got a "
            f"{input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    eps = check_eps(eps)
    _check_channel_tensors(fn, input, weight, bias, running_mean, running_var)
    dims = (0,) + tuple(range(2, input.dim()))
    if not training:
        if running_mean is None:
            raise ValueError(
                f"{fn} with training=False normalizes with running_mean and "
                "running_var, but they are None; pass them, or training=True to use "
                "batch statistics"
            )
        result = fast.channel_norm(input, weight, bias, eps=eps, running_mean=running_mean,
                                   running_var=running_var, activation=activation, param=param,
                                   prelu_weight=prelu_weight, inplace=inplace, operation=fn)
        if result is not None:
            return result[0]
        out = _normalize_with_running(input, weight, bias, running_mean, running_var, dims, eps)
        out = apply_activation(out, activation, param, prelu_weight)
        return input.copy_(out) if inplace else out

    count = reduced_count(input.shape, dims)
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}: the batch variance of a single value is 0. Use a "
            f"batch of 2 or more, call model.eval() for inference, or use a norm that "
            f"does not depend on the batch (GroupNorm, LayerNorm)"
        )
    track = running_mean is not None
    if track:
        momentum = _check_update_args(momentum, num_batches_tracked, on_nonfinite)
    result = fast.channel_norm(input, weight, bias, eps=eps, activation=activation, param=param,
                               prelu_weight=prelu_weight, inplace=inplace, operation=fn)
    if result is not None:
        out, mean, var = result
    else:
        out, mean, var = _composed_channel_norm(input, weight, bias, dims, eps, activation, param,
                                                prelu_weight, inplace)
        mean, var = mean.flatten(), var.flatten()  # (1, C, 1, …) → (C,)
    if track:
        _fold_into_running(running_mean, running_var, mean, var, count, momentum,
                           num_batches_tracked, unbiased_running_var, on_nonfinite)
    return out


def _composed_channel_norm(input, weight, bias, dims, eps, activation, param, prelu_weight, inplace,
                           weight_view=None, bias_view=None):
    """The composed path: (y, mean, var) with statistics kept as size-1 dims."""
    w = _channel_view(weight, input.dim()) if weight_view is None else weight_view
    b = _channel_view(bias, input.dim()) if bias_view is None else bias_view
    if inplace:
        with torch.no_grad():
            moments = centered_moments(input, dims)
            rstd = torch.rsqrt(moments.var + eps)
        y = inplace_abn(input, w, b, moments.shift, moments.offset, rstd, dims, activation, param)
        return y, moments.mean, moments.var
    out, stats = normalize_batch(input, w, b, dims, eps)
    return apply_activation(out, activation, param, prelu_weight), stats.mean, stats.var


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased_running_var: bool = True,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    r"""Instance normalization of an (N, C, \*spatial) input: one statistic per (sample, channel).

    Same arguments and results as :func:`torch.nn.functional.instance_norm`. With
    ``use_input_stats`` each (n, c) plane is normalized by its own mean and biased
    variance; given running estimates are updated with the average over the batch of
    the per-instance means and *unbiased* variances (as torch.nn does). Without
    ``use_input_stats`` the running estimates are used as constants.

    Unlike torch.nn, ``momentum=None`` (with ``num_batches_tracked``) is a cumulative
    average here too; torch.nn's InstanceNorm silently never updates in that case.
    The keyword-only extras are those of :func:`batch_norm`.
    """
    check_floating_input(input)
    if input.dim() < 3:
        raise ValueError(
            f"instance_norm expects input of shape (N, C, *spatial) with at least one "
            f"spatial dim, got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    eps = check_eps(eps)
    _check_channel_tensors("instance_norm", input, weight, bias, running_mean, running_var)
    dims = tuple(range(2, input.dim()))
    if not use_input_stats:
        if running_mean is None:
            raise ValueError(
                "instance_norm with use_input_stats=False normalizes with running_mean "
                "and running_var, but they are None"
            )
        result = fast.channel_norm(input, weight, bias, groups=input.shape[1], eps=eps,
                                   running_mean=running_mean, running_var=running_var,
                                   operation="instance_norm")
        if result is not None:
            return result[0]
        return _normalize_with_running(
            input, weight, bias, running_mean, running_var, dims, eps
        )

    count = reduced_count(input.shape, dims)
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size "
            f"{list(input.shape)}: each (sample, channel) plane needs 2 or more values"
        )
    track = running_mean is not None
    if track:
        momentum = _check_update_args(momentum, num_batches_tracked, on_nonfinite)
    result = fast.channel_norm(input, weight, bias, groups=input.shape[1], eps=eps, operation="instance_norm")
    if result is not None:
        out, mean, var = result  # (N, C)
    else:
        out, stats = normalize_batch(
            input, _channel_view(weight, input.dim()), _channel_view(bias, input.dim()),
            dims, eps,
        )
        mean, var = stats.mean.flatten(1), stats.var.flatten(1)  # (N, C, 1, …) → (N, C)
    if track:
        # The running estimate of a channel is the batch average of its instance stats;
        # every instance has the same count, so unbiasing after averaging is exact.
        _fold_into_running(
            running_mean, running_var, mean.mean(0), var.mean(0),
            count, momentum, num_batches_tracked, unbiased_running_var, on_nonfinite,
        )
    return out


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased_running_var: bool = True,
    on_nonfinite: str = "skip",
) -> torch.Tensor:
    r"""Batch Renormalization (Ioffe, 2017) of an (N, C, \*spatial) input.

    In training, with the batch's μ_B, σ_B = √(σ²_B + ε) and the running μ, σ = √(var + ε):

        r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)
        y = γ·((x − μ_B)/σ_B · r + d) + β

    with r and d treated as constants in backward. The output then depends on the batch
    only through a correction that the running statistics bound, so small or
    non-i.i.d. batches train as in eval. r_max = 1, d_max = 0 is plain BatchNorm. In
    eval (``training=False``) it is BatchNorm with the running estimates. The running
    estimates are required and are updated as :func:`batch_norm` updates them.
    """
    check_floating_input(input)
    if input.dim() < 2:
        raise ValueError(
            f"batch_renorm expects input of shape (N, C) or (N, C, *spatial), got a "
            f"{input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    eps = check_eps(eps)
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_renorm needs running_mean and running_var: r and d measure the batch "
            "against them"
        )
    _check_channel_tensors("batch_renorm", input, weight, bias, running_mean, running_var)
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not r_max >= 1:
        raise ValueError(f"r_max must be a number >= 1 (1 is plain BatchNorm), got {r_max!r}")
    if isinstance(d_max, bool) or not isinstance(d_max, (int, float)) or not d_max >= 0:
        raise ValueError(f"d_max must be a number >= 0 (0 is plain BatchNorm), got {d_max!r}")
    dims = (0,) + tuple(range(2, input.dim()))
    ndim = input.dim()
    if not training:  # exactly BatchNorm's eval
        return _batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                           num_batches_tracked=None, unbiased_running_var=unbiased_running_var,
                           on_nonfinite=on_nonfinite, fn="batch_renorm")

    count = reduced_count(input.shape, dims)
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}"
        )
    momentum = _check_update_args(momentum, num_batches_tracked, on_nonfinite)
    with torch.no_grad():
        moments = centered_moments(input, dims)  # (1, C, 1, …)
        cdtype = moments.var.dtype
        batch_std = torch.sqrt(moments.var + eps)
        running_std = torch.sqrt(_channel_view(running_var, ndim).to(cdtype) + eps)
        running_mu = _channel_view(running_mean, ndim).to(cdtype)
        r = (batch_std / running_std).clamp(1.0 / r_max, r_max)
        d = ((moments.mean - running_mu) / running_std).clamp(-d_max, d_max)
    # y = γr·x̂ + (γd + β): BatchNorm with an effective affine; r, d carry no gradient.
    w = _channel_view(weight, ndim)
    b = _channel_view(bias, ndim)
    w_eff = r if w is None else w * r
    b_eff = d if w is None else w * d
    if b is not None:
        b_eff = b_eff + b
    result = fast.channel_norm(input, w_eff.flatten().to(input.dtype), b_eff.flatten().to(input.dtype),
                               eps=eps, operation="batch_renorm")
    if result is not None:
        out, mean, var = result
    else:
        stats = NormStats(moments.shift, moments.offset, torch.rsqrt(moments.var + eps))
        out = normalize(input, w_eff, b_eff, stats, dims, eps, batch_stats=True)
        mean, var = moments.mean.flatten(), moments.var.flatten()
    _fold_into_running(
        running_mean, running_var, mean, var, count,
        momentum, num_batches_tracked, unbiased_running_var, on_nonfinite,
    )
    return out
