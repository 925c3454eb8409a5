"""The native path: torch's own norm ops (``torch.nn.functional``), where normlab's semantics
allow them — what torch.export, ONNX, ``torch.jit.trace``, ``torch.func`` transforms and tensor
subclasses know, and what runs on CUDA, float64 and half precision.

The families' entries (:mod:`normlab.core.channel`, :mod:`normlab.core.row`) call these after
the path rule chose "native", with the entry's arguments (checked) in the entry's order;
``export`` is the rule's ``how == "export"``: the graph then holds only
ops every exporter maps (ONNX BatchNormalization, InstanceNormalization, GroupNormalization,
LayerNormalization). Where normlab's conventions differ from torch's — running estimates that
skip a non-finite batch, ``momentum=None`` for InstanceNorm, the biased variance option — the
update is :class:`normlab.core.running.RunningStats`'s, shared with the composed path.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as TF

from .activation import apply_activation
from .calls import ChannelCall, RowCall
from .checks import InputError
from .moments import compute_dtype
from .running import RunningStats

__all__ = ["channel_norm", "channels_first_row_norm", "no_channels", "row_norm"]

_HALVES = (torch.float16, torch.bfloat16)


def no_channels(fn: str, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's answer for an input with 0 channels: a copy of the (empty) input — except
    with γ or β, where torch's kernel fails with an IndexError; a clear error here."""
    if weight is not None or bias is not None:
        raise InputError(
            f"{fn}: the input has 0 channels (shape {tuple(input.shape)}), so there is no "
            "channel for weight/bias to scale or shift (torch.nn raises here too); check the "
            "layer widths, or pass weight=None and bias=None for an empty output"
        )
    return input.clone()


def _stat_dims(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The tensor and dims batch statistics reduce: BatchNorm (N, *spatial) of x; GroupNorm
    (C//G, *spatial) of x viewed as (N, G, C//G, *spatial)."""
    if groups < 0:
        return x, (0,) + tuple(range(2, x.dim()))
    grouped = x.unflatten(1, (groups, x.shape[1] // groups))  # type: ignore[no-untyped-call]  # unannotated in torch
    return grouped, tuple(range(2, grouped.dim()))


def _batch_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance for running estimates: (C,) or (N, G), float32 for halves."""
    target, dims = _stat_dims(x, groups)
    with torch.no_grad():
        var, mean = torch.var_mean(target.to(compute_dtype(x.dtype)), dims, correction=0)
    return mean, var


_is_batched = torch._C._functorch.is_batchedtensor


def _tracked_batch_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm with batch statistics in torch's kernel, and the batch's mean and unbiased
    variance for the running estimates — from the same kernel, in one pass.

    torch's kernel computes the running estimates from the batch variance itself (as
    torch.nn gets them); it is handed zeroed buffers and momentum 1, so that they come back
    holding this batch's mean and n/(n − 1)·variance, which :class:`RunningStats` then merges
    under normlab's conventions (momentum=None, non-finite batches skipped). Rebuilding the
    variance from the 1/√(var + ε) the kernel returns instead cancels when the variance is
    near ε: 12 % off at std 1e-6 in float16, 2.5e-9 in float64.
    """
    stats_dtype = compute_dtype(x.dtype)
    if x.dtype in _HALVES:
        # the kernel keeps its statistics in the parameters' dtype: float32 for half inputs
        weight = weight if weight is None or weight.dtype == stats_dtype else weight.to(stats_dtype)
        bias = bias if bias is None or bias.dtype == stats_dtype else bias.to(stats_dtype)
    param_dtype = stats_dtype if weight is None else weight.dtype
    mean = torch.zeros(x.shape[1], dtype=param_dtype, device=x.device)
    var = torch.zeros(x.shape[1], dtype=param_dtype, device=x.device)
    y = torch.native_batch_norm(x, weight, bias, mean, var, True, 1.0, eps)[0]
    return y, mean, var


def channel_norm(call: ChannelCall, export: bool, instance: bool = False) -> torch.Tensor:
    """act(norm(x)) for the channel family with torch's ops, the running estimates of the
    call's policy used (``batch_stats`` False) or updated (True); ``export`` is the rule's
    ``how == "export"``; ``instance``: an InstanceNorm (torch.nn's op for it, rather than
    GroupNorm's)."""
    x, weight, bias, groups, eps, running = call.x, call.weight, call.bias, call.groups, call.eps, call.running
    if not call.batch_stats:
        given = cast(RunningStats, running)  # given statistics: the checks required the estimates
        y = TF.batch_norm(x, given.running_mean, given.running_var, weight, bias, False, 0.0, eps)
        return apply_activation(y, *call.act)
    count = call.running_count() if x.numel() else 0
    track = running is not None and running.running_mean is not None and count > 0
    if groups < 0 and weight is None and x.dtype in _HALVES and (bias is None or bias.dtype == torch.float32):
        # Without a float32 parameter torch's kernel keeps the batch mean and 1/σ in the
        # half dtype (torch.nn passes float32 running estimates, which avoids that):
        # γ = 1 in float32 keeps the statistics float32, as documented
        weight = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    if groups < 0 and track and not export and type(x) is torch.Tensor and not _is_batched(x):
        # (a tensor subclass — DTensor — or vmap's batched tensor would meet plain buffers
        # in the kernel: they take the batch statistics below, and RunningStats' checks)
        tracked = cast(RunningStats, running)  # track: it holds estimates
        y, mean, unbiased_var = _tracked_batch_norm(x, weight, bias, eps, count)
        var = unbiased_var if tracked.unbiased or count < 2 else unbiased_var * ((count - 1) / count)
        tracked.update(mean, var, count, unbiased=False)  # the kernel unbiased it already
        return apply_activation(y, *call.act)
    if groups < 0:
        y = TF.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    elif groups == x.shape[1] and x.dim() > 2 and (export or instance) and x.numel():  # (torch's fails on empty)
        # InstanceNorm: torch.nn's own op (ONNX InstanceNormalization when exporting), whose
        # variance keeps its digits where torch's group_norm kernel loses them (large means,
        # groups of a few values: 1e-3 off in float32 where torch.nn is 1e-5); GroupNorm
        # keeps torch.nn's GroupNorm op
        y = TF.instance_norm(x, None, None, weight, bias, True, 0.0, eps)
    else:
        if weight is None and bias is not None:
            # torch's group_norm backward fails with β but no γ ("tensor does not have a
            # device"); γ = 1 is the same map
            weight = torch.ones_like(bias)
        y = TF.group_norm(x, groups, weight, bias, eps)
    if track:
        cast(RunningStats, running).update(*_batch_stats(x, groups), count)  # (N, C) per instance: averaged there
    return apply_activation(y, *call.act)


def row_norm(call: RowCall) -> torch.Tensor:
    """LayerNorm (``centered``) or RMSNorm over the trailing ``normalized_shape`` dims."""
    if call.centered:  # eps None is RMSNorm's alone
        return TF.layer_norm(call.x, call.normalized_shape, call.weight, call.bias, cast(float, call.eps))
    return TF.rms_norm(call.x, call.normalized_shape, call.weight, call.eps)


def channels_first_row_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, channels: int
) -> torch.Tensor:
    """LayerNorm over dim 1 of (N, C, H, W): torch's ``layer_norm`` on the permuted view, the
    graph exporters know for this layer. ``channels`` is a Python int, not ``x.shape[1]``: a
    tracer records a size read as a graph value, which TorchScript's ONNX exporter cannot
    take as a normalized shape once an axis is dynamic."""
    return TF.layer_norm(x.permute(0, 2, 3, 1), (channels,), weight, bias, eps).permute(0, 3, 1, 2)
