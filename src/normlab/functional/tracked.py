"""batch_norm and instance_norm: the norms whose statistics can come from running estimates.

Both are argument-compatible with ``torch.nn.functional``; the keyword-only extras
(``num_batches_tracked``, ``unbiased_running_var``, ``on_nonfinite``) are what the
modules use to implement the cumulative average and the non-finite guard.
"""

from __future__ import annotations

import torch

from ..core import (
    centered_moments,
    channel_norm,
    channel_view,
    check_activation,
    check_eps,
    check_floating_input,
    check_mask,
    check_momentum,
    check_nonfinite_policy,
    check_param,
    masked_channel_norm,
    reduced_count,
    update_running_stats,
    update_running_stats_if,
)
from ..core.checks import InputError
from ..core.dispatch import fast_batch_norm

__all__ = ["batch_norm", "batch_norm_act", "batch_renorm", "instance_norm"]


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
        raise InputError(
            f"{fn}: running_mean and running_var must be given together, got "
            f"running_mean={'a tensor' if running_mean is not None else None} and "
            f"running_var={'a tensor' if running_var is not None else None}"
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
    mask: torch.Tensor | None = None,
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
        mask: a bool tensor, True where a position is valid, shaped like the input
            without its channel dim — (N,) for (N, C), (N, L) for (N, C, L), (N, H, W) for
            (N, C, H, W) — or broadcastable to it. Statistics are then taken over the valid
            (sample, position) pairs only, the running variance is unbiased with the valid
            count, and the output and the input gradient are 0 at padded positions. A
            batch with fewer than 2 valid values leaves the running estimates untouched
            (see ``docs/sequences.md``).
    """
    return _batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        num_batches_tracked=num_batches_tracked,
        unbiased_running_var=unbiased_running_var,
        on_nonfinite=on_nonfinite,
        mask=mask,
    )


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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``activation(batch_norm(...))`` in one pass: the Conv → BN → activation order.

    ``activation`` is "identity", "relu", "leaky_relu" (``activation_param`` = slope,
    default 0.01), "elu" (alpha, default 1), "silu" or "prelu" (``prelu_weight``: one or C
    slopes). Only the input is kept for backward (torch.nn's BN + activation keeps two
    tensors). ``inplace=True`` is In-Place Activated BatchNorm: the output overwrites the
    input's memory and is all that is kept; the input is recovered in backward by
    inverting the activation, so it must be invertible (identity, leaky_relu, elu).
    ``mask`` is as for :func:`batch_norm` (every activation here maps 0 to 0, so padded
    outputs stay 0); with a mask the layer computes out of place.
    """
    param = check_activation(activation, activation_param, inplace=inplace)
    _check_inplace_input(input, inplace)
    return _batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        num_batches_tracked=num_batches_tracked,
        unbiased_running_var=unbiased_running_var,
        on_nonfinite=on_nonfinite,
        activation=activation,
        param=param,
        prelu_weight=prelu_weight,
        inplace=inplace,
        fn="batch_norm_act",
        mask=mask,
    )


def _check_inplace_input(input, inplace: bool) -> None:
    if inplace and isinstance(input, torch.Tensor) and input.is_leaf and input.requires_grad:
        raise RuntimeError(
            "inplace=True overwrites its input, but the input is a leaf tensor that requires "
            "grad (a parameter or a user tensor); pass a computed tensor (e.g. a conv output) "
            "or use inplace=False"
        )


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    *,
    num_batches_tracked,
    unbiased_running_var,
    on_nonfinite,
    activation="identity",
    param=0.0,
    prelu_weight=None,
    inplace=False,
    fn="batch_norm",
    validated=False,
    mask=None,
):
    """``validated``: a module's call, whose constructor already checked eps, momentum, the
    policy and the parameter shapes, and whose forward checked the input's rank and channels;
    only what depends on this input (dtype, device) is checked here."""
    if validated and mask is None and not inplace:
        out = fast_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            num_batches_tracked=num_batches_tracked,
            unbiased_running_var=unbiased_running_var,
            on_nonfinite=on_nonfinite,
            activation=activation,
            param=param,
            prelu_weight=prelu_weight,
            operation=fn,
        )
        if out is not None:
            return out
    if validated:
        if not input.is_floating_point():
            check_floating_input(input)
        # dtype and device depend on the input; check_param raises with the full message
        what = f"{fn} over the {input.shape[1]} channels of input dim 1"
        for name, t in (("weight", weight), ("running_mean", running_mean)):
            if t is not None and (t.dtype != input.dtype or t.device != input.device):
                check_param(t, name, (input.shape[1],), input, what)
    else:
        check_floating_input(input)
        if input.dim() < 2:
            raise InputError(
                f"{fn} expects input of shape (N, C) or (N, C, *spatial), got a "
                f"{input.dim()}D tensor of shape {tuple(input.shape)}"
            )
        eps = check_eps(eps)
        _check_channel_tensors(fn, input, weight, bias, running_mean, running_var)
    if mask is not None:
        mask = check_mask(mask, input, fn)
    if not training:
        if running_mean is None:
            raise InputError(
                f"{fn} with training=False normalizes with running_mean and "
                "running_var, but they are None; pass them, or training=True to use "
                "batch statistics"
            )
        if mask is not None:
            return masked_channel_norm(
                input,
                weight,
                bias,
                mask,
                eps=eps,
                running_mean=running_mean,
                running_var=running_var,
                activation=activation,
                param=param,
                prelu_weight=prelu_weight,
                operation=fn,
            )[0]
        return channel_norm(
            input,
            weight,
            bias,
            eps=eps,
            running_mean=running_mean,
            running_var=running_var,
            activation=activation,
            param=param,
            prelu_weight=prelu_weight,
            operation=fn,
        )[0]

    if eps == 0:
        raise InputError(
            f"{fn}: eps must be > 0 in training, got 0.0 (a constant channel would divide by "
            f"zero; torch.nn refuses it too). eps = 0 is accepted for normalizing with given "
            f"statistics (eval)"
        )
    track = running_mean is not None
    if mask is not None:
        # The valid count is known only on the device: no ValueError for too few values, the
        # running estimates are left untouched instead (a where, no host sync).
        if track and not validated:
            momentum = _check_update_args(momentum, num_batches_tracked, on_nonfinite)
        out, mean, var, count = masked_channel_norm(
            input,
            weight,
            bias,
            mask,
            eps=eps,
            activation=activation,
            param=param,
            prelu_weight=prelu_weight,
            operation=fn,
        )
        if track:
            update_running_stats_if(
                count >= 2,
                running_mean,
                running_var,
                mean,
                var,
                count,
                momentum,
                num_batches_tracked=num_batches_tracked,
                unbiased=unbiased_running_var,
                on_nonfinite=on_nonfinite,
            )
        return out
    count = reduced_count(input.shape, (0,) + tuple(range(2, input.dim())))
    if count == 1:
        raise InputError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}: the batch variance of a single value is 0. Use a "
            f"batch of 2 or more, call model.eval() for inference, or use a norm that "
            f"does not depend on the batch (GroupNorm, LayerNorm)"
        )
    # An empty batch (N = 0 or a zero-size spatial dim) gives an empty output and leaves
    # the running estimates alone, as in torch.nn.
    track = track and count > 0
    if track and not validated:
        momentum = _check_update_args(momentum, num_batches_tracked, on_nonfinite)
    out, mean, var = channel_norm(
        input,
        weight,
        bias,
        eps=eps,
        activation=activation,
        param=param,
        prelu_weight=prelu_weight,
        inplace=inplace,
        want_stats=track,
        operation=fn,
    )
    if track:
        update_running_stats(
            running_mean,
            running_var,
            mean,
            var,
            count,
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=unbiased_running_var,
            on_nonfinite=on_nonfinite,
        )
    return out


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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Instance normalization of an (N, C, \*spatial) input: one statistic per (sample, channel).

    Same arguments and results as :func:`torch.nn.functional.instance_norm`. With
    ``use_input_stats`` each (n, c) plane is normalized by its own mean and biased
    variance; given running estimates are updated with the average over the batch of
    the per-instance means and *unbiased* variances (as torch.nn does). Without
    ``use_input_stats`` the running estimates are used as constants.

    Unlike torch.nn, ``momentum=None`` (with ``num_batches_tracked``) is a cumulative
    average here too; torch.nn's InstanceNorm silently never updates in that case.
    The keyword-only extras are those of :func:`batch_norm`. With ``mask`` (as for
    :func:`batch_norm`) each plane is normalized over its valid positions; the running
    estimates average the instances with at least 2 valid values, each unbiased with its
    own count, and are left untouched when there is none.
    """
    check_floating_input(input)
    if input.dim() < 3:
        raise InputError(
            f"instance_norm expects input of shape (N, C, *spatial) with at least one "
            f"spatial dim, got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    eps = check_eps(eps)
    _check_channel_tensors("instance_norm", input, weight, bias, running_mean, running_var)
    if mask is not None:
        mask = check_mask(mask, input, "instance_norm")
    if not use_input_stats:
        if running_mean is None:
            raise InputError(
                "instance_norm with use_input_stats=False normalizes with running_mean "
                "and running_var, but they are None"
            )
        if mask is not None:
            out = masked_channel_norm(
                input,
                weight,
                bias,
                mask,
                eps=eps,
                running_mean=running_mean,
                running_var=running_var,
                operation="instance_norm",
            )[0]
        else:
            out = channel_norm(
                input,
                weight,
                bias,
                eps=eps,
                running_mean=running_mean,
                running_var=running_var,
                operation="instance_norm",
            )[0]
        return _instance_layout(out)

    if mask is not None:
        return _masked_instance_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            momentum,
            eps,
            mask,
            num_batches_tracked,
            unbiased_running_var,
            on_nonfinite,
        )
    count = reduced_count(input.shape, tuple(range(2, input.dim())))
    if count == 1:
        raise InputError(
            f"Expected more than 1 spatial element when training, got input size "
            f"{list(input.shape)}: each (sample, channel) plane needs 2 or more values"
        )
    track = running_mean is not None and input.numel() > 0  # an empty batch updates nothing
    if track:
        momentum = _check_update_args(momentum, num_batches_tracked, on_nonfinite)
    out, mean, var = channel_norm(
        input, weight, bias, groups=input.shape[1], eps=eps, want_stats=track, operation="instance_norm"
    )  # statistics (N, C)
    out = _instance_layout(out)
    if track:
        # The running estimate of a channel is the batch average of its instance stats;
        # every instance has the same count, so unbiasing after averaging is exact.
        update_running_stats(
            running_mean,
            running_var,
            mean.mean(0),
            var.mean(0),
            count,
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=unbiased_running_var,
            on_nonfinite=on_nonfinite,
        )
    return out


def _instance_layout(out: torch.Tensor) -> torch.Tensor:
    """torch.nn's instance_norm returns a contiguous tensor for channels_last input (code
    after it may .view() it); the kernels write in the input's layout."""
    return out if out.dim() < 4 or out.is_contiguous() else out.contiguous()


def _masked_instance_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    momentum,
    eps,
    mask,
    num_batches_tracked,
    unbiased_running_var,
    on_nonfinite,
):
    track = running_mean is not None
    if track:
        momentum = _check_update_args(momentum, num_batches_tracked, on_nonfinite)
    out, mean, var, count = masked_channel_norm(
        input, weight, bias, mask, groups=input.shape[1], eps=eps, operation="instance_norm"
    )  # stats (N, C), count (N,)
    if track:
        with torch.no_grad():
            # Instances differ in count: unbias each with its own, then average those with
            # at least 2 valid values (fewer have no variance to speak of).
            enough = (count >= 2).unsqueeze(1)  # (N, 1)
            if unbiased_running_var:
                var = var * (count / (count - 1).clamp(min=1)).unsqueeze(1)
            instances = enough.sum()
            weights = enough.to(var.dtype) / instances.clamp(min=1)
            zero = torch.zeros((), dtype=var.dtype, device=var.device)
            batch_mean = torch.where(enough, mean * weights, zero).sum(0)
            batch_var = torch.where(enough, var * weights, zero).sum(0)
        update_running_stats_if(
            instances > 0,
            running_mean,
            running_var,
            batch_mean,
            batch_var,
            2,
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=False,
            on_nonfinite=on_nonfinite,
        )
    return _instance_layout(out)


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
        raise InputError(
            f"batch_renorm expects input of shape (N, C) or (N, C, *spatial), got a "
            f"{input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    eps = check_eps(eps)
    if running_mean is None or running_var is None:
        raise InputError("batch_renorm needs running_mean and running_var: r and d measure the batch against them")
    _check_channel_tensors("batch_renorm", input, weight, bias, running_mean, running_var)
    # Limits may be 0-dim tensors (a schedule computed on the device); those are not checked
    # here, which would need a host sync.
    if not isinstance(r_max, torch.Tensor) and (
        isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not r_max >= 1
    ):
        raise InputError(f"r_max must be a number >= 1 (1 is plain BatchNorm), got {r_max!r}")
    if not isinstance(d_max, torch.Tensor) and (
        isinstance(d_max, bool) or not isinstance(d_max, (int, float)) or not d_max >= 0
    ):
        raise InputError(f"d_max must be a number >= 0 (0 is plain BatchNorm), got {d_max!r}")
    dims = (0,) + tuple(range(2, input.dim()))
    ndim = input.dim()
    if not training:  # exactly BatchNorm's eval
        return _batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            False,
            momentum,
            eps,
            num_batches_tracked=None,
            unbiased_running_var=unbiased_running_var,
            on_nonfinite=on_nonfinite,
            fn="batch_renorm",
        )

    count = reduced_count(input.shape, dims)
    if count <= 1:
        raise InputError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
    momentum = _check_update_args(momentum, num_batches_tracked, on_nonfinite)
    with torch.no_grad():
        moments = centered_moments(input, dims)  # (1, C, 1, …)
        cdtype = moments.var.dtype
        batch_std = torch.sqrt(moments.var + eps)
        running_std = torch.sqrt(channel_view(running_var, ndim).to(cdtype) + eps)
        running_mu = channel_view(running_mean, ndim).to(cdtype)
        if isinstance(r_max, torch.Tensor) or isinstance(d_max, torch.Tensor):
            r_max = torch.as_tensor(r_max, dtype=cdtype, device=input.device)
            d_max = torch.as_tensor(d_max, dtype=cdtype, device=input.device)
            r = torch.minimum(torch.maximum(batch_std / running_std, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum((moments.mean - running_mu) / running_std, -d_max), d_max)
        else:
            r = (batch_std / running_std).clamp(1.0 / r_max, r_max)
            d = ((moments.mean - running_mu) / running_std).clamp(-d_max, d_max)
    # y = γr·x̂ + (γd + β): BatchNorm with an effective affine; r, d carry no gradient.
    w = channel_view(weight, ndim)
    b = channel_view(bias, ndim)
    w_eff = r if w is None else w * r
    b_eff = d if w is None else w * d
    if b is not None:
        b_eff = b_eff + b
    out, mean, var = channel_norm(
        input, w_eff.flatten().to(input.dtype), b_eff.flatten().to(input.dtype), eps=eps, operation="batch_renorm"
    )
    update_running_stats(
        running_mean,
        running_var,
        mean,
        var,
        count,
        momentum,
        num_batches_tracked=num_batches_tracked,
        unbiased=unbiased_running_var,
        on_nonfinite=on_nonfinite,
    )
    return out
