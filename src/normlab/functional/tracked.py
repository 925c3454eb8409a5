"""batch_norm and instance_norm: the norms whose statistics can come from running estimates.

Both are argument-compatible with ``torch.nn.functional``; the keyword-only extras
(``num_batches_tracked``, ``unbiased_running_var``, ``on_nonfinite``) are what the
modules use to implement the cumulative average and the non-finite guard.
"""

from __future__ import annotations

import torch

from ..core import batch_renorm as _renorm
from ..core import channel_norm, instance_norm_layout
from ..core.call_checks import check_channel_args, check_channel_call
from ..core.checks import InputError
from ..core.native import no_channels
from .fused_args import NO_ACTIVATION, ActivationArgs, Estimates, activation_args, running_policy

__all__ = ["batch_norm", "batch_norm_act", "batch_renorm", "instance_norm"]


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
    the running estimates are used as constants (``docs/conventions.md#running-statistics``).

    Args:
        input: (N, C) or (N, C, \*spatial).
        running_mean: (C,) running mean, updated in place in training; or None.
        running_var: (C,) running variance, updated in place in training; or None.
        weight: γ, shape (C,), or None. Default None.
        bias: β, shape (C,), or None. Default None.
        training: normalize with the batch's statistics (and update the estimates) rather
            than the running estimates. Default False.
        momentum: weight of the new batch in the running estimates, in [0, 1], or None for
            the cumulative average (needs ``num_batches_tracked``). Default 0.1.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.
        num_batches_tracked: a long 0-dim counter, incremented by one for each batch
            merged into the running estimates. With it, ``momentum=None`` selects the
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
        unbiased_running_var: keyword-only; store the unbiased batch variance (torch.nn's
            convention, default) or the biased one (Keras/Flax's).

    Returns:
        The normalized tensor: the input's shape, dtype and memory format.

    Raises:
        ValueError: an input of the wrong rank, parameters or estimates of the wrong shape,
            dtype or device, a bad ``eps``/``momentum``, or a malformed ``mask``
            (``docs/conventions.md#errors``).
        TypeError: a non-tensor input or a non-floating dtype.
        NonFiniteStatisticsError: with ``on_nonfinite="raise"``, a batch whose statistics
            are not finite.

    Examples:
        >>> x = torch.randn(8, 16, 5, 5)
        >>> mean, var = torch.zeros(16), torch.ones(16)
        >>> y = nl.functional.batch_norm(x, mean, var, training=True)
    """
    estimates = (running_mean, running_var, num_batches_tracked, momentum, unbiased_running_var, on_nonfinite)
    return _batch_norm("batch_norm", input, weight, bias, training, eps, estimates, mask)


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

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps: as for
            :func:`batch_norm`.
        activation: keyword-only; "identity", "relu" (default), "leaky_relu", "elu", "silu"
            or "prelu".
        activation_param: keyword-only; LeakyReLU's slope (default 0.01) or ELU's alpha
            (default 1.0); None for the default.
        prelu_weight: keyword-only; PReLU's slopes, shape (1,) or (C,); needed for "prelu".
        inplace: keyword-only; write the output over ``input`` (In-Place Activated
            BatchNorm, ``docs/conventions.md#in-place-mode-inplacetrue-on-batchnormactgroupnormact``).
            Default False.
        num_batches_tracked, unbiased_running_var, on_nonfinite, mask: keyword-only, as for
            :func:`batch_norm`.

    Returns:
        The activated, normalized tensor (``input`` itself with ``inplace=True``).

    Raises:
        ValueError: as :func:`batch_norm`; an unknown activation, or ``inplace=True`` with
            an activation that cannot be inverted or an input that cannot be overwritten.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    act = activation_args(input, activation, activation_param, prelu_weight, inplace)
    estimates = (running_mean, running_var, num_batches_tracked, momentum, unbiased_running_var, on_nonfinite)
    return _batch_norm("batch_norm_act", input, weight, bias, training, eps, estimates, mask, act)


def _batch_norm(
    fn: str,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    eps: float,
    estimates: Estimates,
    mask: torch.Tensor | None,
    act: ActivationArgs = NO_ACTIVATION,
) -> torch.Tensor:
    """batch_norm, batch_norm_act (and norm_act's "batch"): check, then the channel family's call."""
    running_mean, running_var = estimates[:2]
    if (
        isinstance(input, torch.Tensor)
        and input.is_floating_point()
        and input.dim() == 1
        and input.numel() == 0
        and all(t is None or t.numel() == 0 for t in (running_mean, running_var))
    ):
        # torch reads a 1-D input as one with no channel dim, i.e. 0 channels
        return no_channels(fn, input, weight, bias)
    eps = check_channel_call(fn, input, weight, bias, running_mean, running_var, eps)
    running = running_policy(estimates, training)
    eps, mask = check_channel_args(fn, input, weight, bias, eps, -1, training, running, act["prelu_weight"], mask)
    return channel_norm(
        input,
        weight,
        bias,
        eps=eps,
        batch_stats=training,
        running=running,
        mask=mask,
        operation=fn,
        checked=True,
        **act,
    )


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

    Args:
        input: (N, C, \*spatial), at least one spatial dim.
        running_mean, running_var: (C,) running estimates, updated in place when
            ``use_input_stats``; or None. Default None.
        weight, bias: γ and β, shape (C,), or None. Default None.
        use_input_stats: normalize each instance with its own statistics (True, default) or
            with the running estimates (False, which needs them).
        momentum, eps: as for :func:`batch_norm`.
        num_batches_tracked, unbiased_running_var, on_nonfinite, mask: keyword-only, as for
            :func:`batch_norm`.

    Returns:
        The normalized tensor, the input's shape and dtype.

    Raises:
        ValueError: an input with fewer than 3 dims, parameters or estimates of the wrong
            shape, ``use_input_stats=False`` without running estimates, a bad
            ``eps``/``momentum`` or ``mask``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    shape_words = "(N, C, *spatial) with at least one spatial dim"
    eps = check_channel_call(
        "instance_norm", input, weight, bias, running_mean, running_var, eps, shape_words=shape_words, min_rank=3
    )
    if input.shape[1] == 0:
        return no_channels("instance_norm", input, weight, bias)
    if not use_input_stats and running_mean is None:
        raise InputError(
            "instance_norm with use_input_stats=False normalizes with running_mean and running_var, but they are None"
        )
    estimates = (running_mean, running_var, num_batches_tracked, momentum, unbiased_running_var, on_nonfinite)
    running = running_policy(estimates, use_input_stats and input.numel() > 0)  # an empty batch updates nothing
    groups = input.shape[1]  # a group per channel: statistics per (sample, channel)
    eps, mask = check_channel_args(
        "instance_norm", input, weight, bias, eps, groups, use_input_stats, running, None, mask
    )
    out = channel_norm(
        input,
        weight,
        bias,
        groups=groups,
        eps=eps,
        batch_stats=use_input_stats,
        running=running,
        mask=mask,
        operation="instance_norm",
        checked=True,
        copy_weight=True,
    )
    return instance_norm_layout(out)


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    r_max: float | torch.Tensor = 3.0,
    d_max: float | torch.Tensor = 5.0,
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

    Args:
        input: (N, C) or (N, C, \*spatial).
        running_mean, running_var: (C,) running estimates; required (r and d measure the
            batch against them), updated in place in training.
        weight, bias, training, momentum, eps: as for :func:`batch_norm`.
        r_max: clip of r, a number >= 1 or a 0-dim tensor (a schedule on the device).
            Default 3.0.
        d_max: clip of \|d\|, a number >= 0 or a 0-dim tensor. Default 5.0.
        num_batches_tracked, unbiased_running_var, on_nonfinite: keyword-only, as for
            :func:`batch_norm`.

    Returns:
        The normalized tensor, the input's shape and dtype.

    Raises:
        ValueError: missing running estimates, ``r_max < 1`` or ``d_max < 0``, and the
            errors of :func:`batch_norm`.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    if running_mean is None or running_var is None:
        raise InputError("batch_renorm needs running_mean and running_var: r and d measure the batch against them")
    eps = check_channel_call("batch_renorm", input, weight, bias, running_mean, running_var, eps)
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
    estimates = (running_mean, running_var, num_batches_tracked, momentum, unbiased_running_var, on_nonfinite)
    running = running_policy(estimates, training)
    assert running is not None  # the estimates were required above
    return _renorm(input, weight, bias, eps=eps, batch_stats=training, running=running, r_max=r_max, d_max=d_max)
