"""The one place that decides how a normalization runs: C++ kernel, torch's native op, or
normlab's composed ops.

Two families, one function each:

* :func:`channel_norm` — BatchNorm, InstanceNorm, GroupNorm (statistics per channel or per
  (sample, group)), optionally with a fused activation or in place;
* :func:`row_norm` — LayerNorm and RMSNorm over trailing dims.

:func:`masked_channel_norm` is the channel family with a mask of valid positions
(:mod:`normlab.core.masked`): composed ops on every dtype and device — the closed-form
autograd.Function, or, under export/trace and torch.func transforms, the same forward in
plain differentiable ops.

The rule, in order:

1. ``backend "composed"`` (``normlab.core.set_backend`` / ``NORMLAB_BACKEND``) → composed.
2. ``torch.export``, ``torch.onnx.export`` and ``torch.jit.trace`` → **native**: the
   graph holds torch's own norm ops, which every exporter knows (ONNX BatchNormalization,
   LayerNormalization, GroupNormalization, InstanceNormalization).
3. ``torch.func`` transforms (vmap, grad, jacrev, jvp, …) and forward-mode AD → native:
   torch's norm ops have batching rules and forward derivatives.
4. float32 on the CPU → **fast**: ``torch.ops.normlab.*`` (C++ kernels, closed-form
   backward; an ordinary operator to ``torch.compile``). Inputs in a layout the kernels do
   not read are made contiguous first. Without the kernels (no compiler), float32 CPU runs
   composed, which keeps normlab's accuracy on large-mean data.
5. everything else (float64, float16/bfloat16, CUDA, …) → native: torch's kernels compute
   what normlab defines there (cuDNN on CUDA).

One exception to rule 4: under ``torch.compile``, BatchNorm with given statistics (eval,
frozen) runs **composed** as plain pointwise ops, ``(x − μ)·(γ/√(σ² + ε)) + β`` then the
activation — the mean subtracted first, so it keeps the kernels' accuracy on large-mean data
— which the compiler fuses into the neighbouring kernels, where an opaque operator would stop
it.

Where normlab's semantics differ from torch's — running estimates that skip non-finite
batches, ``momentum=None`` for InstanceNorm, the biased running variance option — the
difference lives in :mod:`normlab.core.running`, which every path shares; the paths here
only normalize and return the batch statistics.

``with normlab.core.record_dispatch() as log`` records ``(operation, path, reason)`` for
each call (eager mode).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as TF

from .activation import ACTIVATIONS, apply_activation, inplace_abn
from .fast import build as _build
from .fast.ops import (
    call_add_row_norm,
    call_channel_norm,
    call_row_norm,
    channel_layout,
    channel_norm_inplace,
)
from .masked import masked_moments, masked_normalize, masked_reference
from .moments import compute_dtype, reduced_count
from .normalize import NormStats, normalize_batch, normalize_given
from .running import update_running_stats

__all__ = [
    "add_row_norm",
    "channel_layer_norm",
    "channel_norm",
    "channel_view",
    "choose_path",
    "eager_kernels",
    "fast_batch_norm",
    "fast_group_norm",
    "fast_row_norm",
    "masked_channel_norm",
    "row_norm",
]


@torch.compiler.assume_constant_result
def _kernels_available() -> bool:
    # A constant to torch.compile: the build (file locks, subprocesses) never runs in a trace.
    return _build.kernels() is not None


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def _transformed() -> bool:
    """A torch.func transform or forward-mode AD is active (never true inside a compile)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0


def choose_path(x: torch.Tensor) -> tuple[str, str]:
    """("fast" | "native" | "composed", why) for a normalization of ``x``."""
    if _build.backend() == "composed":
        return "composed", "backend forced to 'composed'"
    if _exporting():
        return "native", "export/trace: torch's own norm ops"
    if _transformed():
        return "native", "torch.func transform or forward AD"
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0:
        if _kernels_available():
            return "fast", ""
        return "composed", "kernels unavailable"
    if x.numel() == 0:
        return "native", "empty input"
    return "native", "not float32 CPU"


def _note(operation: str, path: str, reason: str) -> None:
    if _build._logs and not torch.compiler.is_compiling():
        _build.note(operation, path, reason)


# --- a module's call: decided and run in one C++ call ------------------------------------------
#
# The common case — an eager call on a float32 CPU tensor — is decided here with the fewest
# checks in Python: the kernels' ``fast_*`` entry points (eager.cpp) check dtype, device, layout,
# parameters, jit.trace, torch.func and torch function/dispatch modes themselves, and run the
# normalization (and BatchNorm's running-estimate update) with C++ autograd. They return None,
# having done nothing, wherever the general rule above might choose otherwise or an error is
# due; the caller then takes the general path. Only modules call these: their constructor
# checked what the functionals check on every call.


def eager_kernels(x: object):
    """The kernels' module for an eager call on a plain tensor, or None (then the general path
    decides): not compiling, no forward-mode AD, backend not forced to "composed", kernels built."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or _forward_ad._current_level >= 0:
        return None
    state = _build._state
    return state["module"] if state["backend"] != "composed" else None


def fast_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    num_batches_tracked: torch.Tensor | None,
    unbiased_running_var: bool,
    on_nonfinite: str,
    activation: str,
    param: float,
    prelu_weight: torch.Tensor | None,
    operation: str,
) -> torch.Tensor | None:
    """A BatchNorm module's call, arguments as ``normlab.functional.batch_norm``'s: the output,
    with the running estimates updated in training, or None when the kernels do not take it."""
    kernels = eager_kernels(x)
    if kernels is None:
        return None
    out = kernels.fast_channel_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        -1,
        training,
        momentum,
        unbiased_running_var,
        on_nonfinite == "skip",
        eps,
        ACTIVATIONS[activation].code,
        param,
        prelu_weight,
    )
    if out is None:
        return None
    if _build._logs:
        _build.note(operation, "fast", "")
    if type(out) is tuple:  # not folded in C++: a batch that is not finite, or on_nonfinite="raise"
        y, mean, var = out
        update_running_stats(
            running_mean,
            running_var,
            mean,
            var,
            x.numel() // x.shape[1],
            momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=unbiased_running_var,
            on_nonfinite=on_nonfinite,
        )
        return y
    return out


def fast_group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    activation: str,
    param: float,
    prelu_weight: torch.Tensor | None,
    operation: str,
) -> torch.Tensor | None:
    """A GroupNorm module's call: the output, or None when the kernels do not take it."""
    kernels = eager_kernels(x)
    if kernels is None:
        return None
    y = kernels.fast_channel_norm(
        x,
        weight,
        bias,
        None,
        None,
        None,
        groups,
        True,
        None,
        True,
        False,
        eps,
        ACTIVATIONS[activation].code,
        param,
        prelu_weight,
    )
    if y is not None and _build._logs:
        _build.note(operation, "fast", "")
    return y


def fast_row_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    centered: bool,
    operation: str,
) -> torch.Tensor | None:
    """A LayerNorm (``centered``) or RMSNorm module's call: the output, or None when the
    kernels do not take it."""
    kernels = eager_kernels(x)
    if kernels is None:
        return None
    y = kernels.fast_row_norm(x, normalized_shape, weight, bias, eps, centered)
    if y is not None and _build._logs:
        _build.note(operation, "fast", "")
    return y


def channel_view(t: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """(C,) → (1, C, 1, …, 1), so it broadcasts against an (N, C, *spatial) input."""
    return None if t is None else t.view((1, -1) + (1,) * (ndim - 2))


def channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    groups: int = -1,
    eps: float,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    activation: str = "identity",
    param: float = 0.0,
    prelu_weight: torch.Tensor | None = None,
    inplace: bool = False,
    want_stats: bool = True,
    operation: str = "norm",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """act(norm(x)) for the channel family; returns ``(y, mean, var)``.

    ``groups=-1`` is BatchNorm: statistics per channel over (N, *spatial) — or, with
    ``running_mean``/``running_var`` given, those as constants. ``groups=G`` is GroupNorm
    (InstanceNorm: G = C), statistics per (sample, group). ``mean``/``var`` are this
    batch's statistics, the variance biased: shape (C,) for BatchNorm, (N, G) otherwise;
    None when the statistics were given or ``want_stats`` is False. ``inplace`` writes the
    output over ``x`` and keeps only it for backward (batch statistics only; with given
    statistics the layer computes out of place, as there is nothing to save).
    """
    given = running_mean is not None
    inplace = inplace and not given
    if inplace:
        _check_overwritable(x, weight, bias)
    path, reason = choose_path(x)
    if path == "fast" and inplace and channel_layout(x) is None:
        # the kernels need a contiguous copy, and writing the output there would leave the
        # input untouched: the composed ops overwrite any strides, as on every other path
        path, reason = "composed", "in place on a non-contiguous input"
    if path == "fast" and given and torch.compiler.is_compiling():
        # an opaque operator would stop the compiler fusing the normalization into the ops
        # around it, which torch.nn's eval BatchNorm (pointwise ops once compiled) gets
        path, reason = "composed", "compiling with given statistics: pointwise ops the compiler fuses"
        _note(operation, path, reason)
        y = _fusable_given_norm(x, weight, bias, running_mean, running_var, eps, activation, param, prelu_weight)
        return y, None, None
    _note(operation, path, reason)
    if path == "fast":
        act = ACTIVATIONS[activation].code
        if channel_layout(x) is None:
            x = x.contiguous()
        if inplace:
            y, mean, var = channel_norm_inplace(x, weight, bias, groups, eps, act, param)
        else:
            y, mean, var = call_channel_norm(
                x, weight, bias, running_mean, running_var, prelu_weight, groups, eps, act, param
            )
        if given or not want_stats:
            return y, None, None
        if groups > 0:  # one statistic per (sample, group)
            mean, var = mean.view(x.shape[0], groups), var.view(x.shape[0], groups)
        return y, mean.detach(), var.detach()
    if path == "native" and not inplace:
        return _native_channel_norm(
            x, weight, bias, groups, eps, running_mean, running_var, activation, param, prelu_weight, want_stats
        )
    return _composed_channel_norm(
        x, weight, bias, groups, eps, running_mean, running_var, activation, param, prelu_weight, inplace, want_stats
    )


def _fusable_given_norm(x, weight, bias, running_mean, running_var, eps, activation, param, prelu_weight):
    """act((x − μ)·(γ/√(σ² + ε)) + β) in plain differentiable ops, for the compiler to fuse.

    The mean is subtracted first: torch's own eval kernel computes x·s + (β − μ·s), whose
    two large terms cancel on large-mean data (7.7e-3 off at 1e4 ± 0.01) where this form is
    as accurate as the kernels. The statistics are constants for autograd; x, γ and β get
    gradients.
    """
    ndim = x.dim()
    mean = channel_view(running_mean.detach(), ndim)
    scale = torch.rsqrt(running_var.detach() + eps)
    if weight is not None:
        scale = weight * scale
    y = (x - mean) * channel_view(scale, ndim)
    if bias is not None:
        y = y + channel_view(bias, ndim)
    return apply_activation(y.to(x.dtype), activation, param, prelu_weight)


def _check_overwritable(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """Refuse, before anything is written, the views autograd forbids modifying in place —
    torch's own in-place ops (``nn.ReLU(inplace=True)``) refuse them too, but the check
    that would catch them here runs only after the output has overwritten the input."""
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not (recorded and x._is_view()):
        return
    try:
        from torch._C._autograd import CreationMeta, _get_creation_meta
    except ImportError:  # a torch without the query: autograd's own (later) check remains
        return
    meta = _get_creation_meta(x)
    if meta == CreationMeta.DEFAULT:
        return  # an ordinary view: overwritten like any tensor, its base sees the output
    if x.grad_fn is not None and type(x.grad_fn).__name__ == "BackwardHookFunctionBackward":
        what = (
            "the input comes through a full backward hook (register_full_backward_hook on this "
            "layer or a module around it), whose input autograd forbids modifying in place"
        )
    else:
        what = {
            CreationMeta.MULTI_OUTPUT_NODE: "the input is one of several views returned by one op "
            "(unbind, split, chunk), which autograd forbids modifying in place",
            CreationMeta.NO_GRAD_MODE: "the input is a view made under torch.no_grad(), which autograd "
            "forbids modifying in place while recording",
        }.get(meta, f"the input is a view autograd forbids modifying in place ({meta})")
    raise RuntimeError(
        f"inplace=True overwrites its input, but {what}; torch.nn.ReLU(inplace=True) refuses it "
        "as well. Use inplace=False, or pass a copy (x.clone())"
    )


def _stat_dims(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The tensor and dims batch statistics reduce: BatchNorm (N, *spatial) of x; GroupNorm
    (C//G, *spatial) of x viewed as (N, G, C//G, *spatial)."""
    if groups < 0:
        return x, (0,) + tuple(range(2, x.dim()))
    grouped = x.unflatten(1, (groups, x.shape[1] // groups))
    return grouped, tuple(range(2, grouped.dim()))


def _batch_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance for running estimates: (C,) or (N, G), float32 for halves."""
    target, dims = _stat_dims(x, groups)
    with torch.no_grad():
        var, mean = torch.var_mean(target.to(compute_dtype(x.dtype)), dims, correction=0)
    return mean, var


_HALVES = (torch.float16, torch.bfloat16)


def _native_channel_norm(
    x, weight, bias, groups, eps, running_mean, running_var, activation, param, prelu_weight, want_stats
):
    if running_mean is not None:
        y = TF.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        mean = var = None
    else:
        if groups < 0 and weight is None and x.dtype in _HALVES and (bias is None or bias.dtype == torch.float32):
            # Without a float32 parameter torch's kernel keeps the batch mean and 1/σ in the
            # half dtype (torch.nn passes float32 running estimates, which avoids that):
            # γ = 1 in float32 keeps the statistics float32, as documented
            weight = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
        if groups < 0 and want_stats and not _exporting():
            # One pass for output and statistics: torch returns the batch mean and
            # 1/√(var + ε), from which the biased variance follows.
            y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
            with torch.no_grad():
                var = (invstd.to(compute_dtype(x.dtype)).pow(-2) - eps).clamp_(min=0)
            return apply_activation(y, activation, param, prelu_weight), mean.detach(), var
        if groups < 0:
            y = TF.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        elif groups == x.shape[1] and x.dim() > 2 and _exporting():  # ONNX InstanceNormalization
            y = TF.instance_norm(x, None, None, weight, bias, True, 0.0, eps)
        else:
            if weight is None and bias is not None:
                # torch's group_norm backward fails with β but no γ ("tensor does not have a
                # device"); γ = 1 is the same map
                weight = torch.ones_like(bias)
            y = TF.group_norm(x, groups, weight, bias, eps)
        mean, var = _batch_stats(x, groups) if want_stats else (None, None)
    return apply_activation(y, activation, param, prelu_weight), mean, var


def _composed_channel_norm(
    x, weight, bias, groups, eps, running_mean, running_var, activation, param, prelu_weight, inplace, want_stats
):
    """normlab's composed ops (:mod:`normlab.core.normalize`), written out in torch."""
    ndim = x.dim()
    if running_mean is not None:
        dims = (0,) + tuple(range(2, ndim))
        y = normalize_given(
            x,
            channel_view(weight, ndim),
            channel_view(bias, ndim),
            channel_view(running_mean, ndim),
            channel_view(running_var, ndim),
            dims,
            eps,
        )
        return apply_activation(y, activation, param, prelu_weight), None, None
    target, dims = _stat_dims(x, groups)
    if groups < 0:
        w, b = channel_view(weight, ndim), channel_view(bias, ndim)
    else:
        affine_shape = (1, groups, x.shape[1] // groups) + (1,) * (ndim - 2)
        w = None if weight is None else weight.view(affine_shape)
        b = None if bias is None else bias.view(affine_shape)
    if inplace:
        y, mean, var = inplace_abn(x, weight, bias, groups, eps, activation, param)
    else:
        y, stats = normalize_batch(target, w, b, dims, eps)
        y = y.flatten(1, 2) if groups > 0 else y
        y = apply_activation(y, activation, param, prelu_weight)
        mean, var = stats.mean, stats.var
    if not want_stats:
        return y, None, None
    # keepdim statistics → (C,) for BatchNorm, (N, G) for groups
    return y, (mean.flatten() if groups < 0 else mean.flatten(1)), (var.flatten() if groups < 0 else var.flatten(1))


def row_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    centered: bool,
    operation: str,
) -> torch.Tensor:
    """LayerNorm (``centered``) or RMSNorm over the trailing ``normalized_shape`` dims."""
    path, reason = choose_path(x)
    if path == "fast" and not centered and not x.is_contiguous():
        # RMSNorm subtracts no mean, so torch's op loses no accuracy here, and it keeps the
        # input's layout (channels_last stays channels_last) as torch.nn's RMSNorm does
        path, reason = "native", "RMSNorm on a non-contiguous input"
    _note(operation, path, reason)
    if path == "fast":
        k = reduced_count(normalized_shape, range(len(normalized_shape)))
        if k > 0 and (weight is None or weight.dtype == torch.float32):
            return call_row_norm(x.contiguous(), weight, bias, k, eps, centered)
        path = "composed"
    if path == "native":
        if centered:
            return TF.layer_norm(x, normalized_shape, weight, bias, eps)
        return TF.rms_norm(x, normalized_shape, weight, eps)
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    lead = (1,) * (x.dim() - len(normalized_shape))
    w = None if weight is None else weight.view(lead + tuple(normalized_shape))
    b = None if bias is None else bias.view(lead + tuple(normalized_shape))
    return normalize_batch(x, w, b, dims, eps, centered=centered)[0]


def add_row_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    centered: bool,
    operation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``: the residual add fused into :func:`row_norm`.

    The kernel takes same-shaped float32 operands; a residual that broadcasts or has another
    dtype is added by torch, and the sum normalized by :func:`row_norm`'s own choice. The
    native path is that addition followed by torch's ``layer_norm``/``rms_norm``, which
    every exporter and ``torch.func`` transform knows.
    """
    path, reason = choose_path(x)
    _note(operation, path, reason)
    if path == "fast":
        k = reduced_count(normalized_shape, range(len(normalized_shape)))
        if (
            k > 0
            and residual.shape == x.shape
            and residual.dtype == torch.float32
            and residual.device.type == "cpu"
            and (weight is None or weight.dtype == torch.float32)
        ):
            y, s, _, _, _ = call_add_row_norm(x.contiguous(), residual.contiguous(), weight, bias, k, eps, centered)
            return y, s
        summed = x + residual  # broadcast or mixed dtypes: the sum is torch's, the norm the kernel's
        return row_norm(summed, normalized_shape, weight, bias, eps, centered=centered, operation=operation), summed
    summed = x + residual
    if path == "native":
        if centered:
            return TF.layer_norm(summed, normalized_shape, weight, bias, eps), summed
        return TF.rms_norm(summed, normalized_shape, weight, eps), summed
    dims = tuple(range(summed.dim() - len(normalized_shape), summed.dim()))
    lead = (1,) * (summed.dim() - len(normalized_shape))
    w = None if weight is None else weight.view(lead + tuple(normalized_shape))
    b = None if bias is None else bias.view(lead + tuple(normalized_shape))
    return normalize_batch(summed, w, b, dims, eps, centered=centered)[0], summed


def channel_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    operation: str,
) -> torch.Tensor:
    """LayerNorm over dim 1 of an (N, C, H, W) tensor — each position normalized over its
    channels (ConvNeXt's LayerNorm2d) — without a permuting copy.

    channels_last: the (N, H, W, C) view is contiguous rows of C, which :func:`row_norm`
    normalizes (its own path choice, kernel included); the result viewed back is
    channels_last. Other layouts: statistics over dim 1 by normlab's composed ops — or, on
    the native path (export, torch.func, other dtypes and devices), torch's ``layer_norm``
    on the permuted view, the graph exporters know for this layer.
    """
    rows = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view
    if rows.is_contiguous():
        return row_norm(rows, (x.shape[1],), weight, bias, eps, centered=True, operation=operation).permute(0, 3, 1, 2)
    path, reason = choose_path(x)
    _note(operation, path, reason)
    if path == "native":
        return TF.layer_norm(rows, (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)
    return normalize_batch(x, channel_view(weight, 4), channel_view(bias, 4), (1,), eps)[0]


def masked_channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    groups: int = -1,
    eps: float,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    activation: str = "identity",
    param: float = 0.0,
    prelu_weight: torch.Tensor | None = None,
    operation: str = "norm",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`channel_norm` over the valid positions only; returns ``(y, mean, var, count)``.

    ``mask`` is bool, already checked and expanded to (N, *spatial)
    (:func:`normlab.core.masked.check_mask`). ``y`` is 0 at padded positions (every fused
    activation maps 0 to 0). ``mean``/``var`` (biased) are (C,) for BatchNorm, (N, G)
    otherwise, and ``count`` the valid elements behind each: a 0-dim tensor for BatchNorm,
    (N,) otherwise — tensors, as only the device knows them. All three are None with given
    statistics.
    """
    reference = _exporting() or _transformed()
    _note(operation, "composed", "mask: " + ("differentiable ops" if reference else "closed-form backward"))
    ndim = x.dim()
    if groups < 0:
        target, dims, m = x, (0,) + tuple(range(2, ndim)), mask.unsqueeze(1)
        w, b = channel_view(weight, ndim), channel_view(bias, ndim)
    else:
        target = x.unflatten(1, (groups, x.shape[1] // groups))  # (N, G, C//G, *spatial)
        dims, m = tuple(range(2, ndim + 1)), mask.unsqueeze(1).unsqueeze(1)
        affine_shape = (1, groups, x.shape[1] // groups) + (1,) * (ndim - 2)
        w = None if weight is None else weight.view(affine_shape)
        b = None if bias is None else bias.view(affine_shape)
    cdtype = compute_dtype(x.dtype)
    mean = var = count = None
    with torch.no_grad():
        if running_mean is not None:
            shift = channel_view(running_mean, ndim).to(cdtype)
            offset = None
            rstd = torch.rsqrt(channel_view(running_var, ndim).to(cdtype) + eps)
        else:
            shift, offset, var, count = masked_moments(target, m, dims)
            rstd = torch.rsqrt(var + eps)
            mean = shift + offset
    if reference:
        given = running_mean is not None
        y = masked_reference(target, w, b, m, dims, eps, mean=shift if given else None, rstd=rstd if given else None)
    else:
        y = masked_normalize(
            target, w, b, m, NormStats(shift, offset, rstd), count, dims, eps, batch_stats=running_mean is None
        )
    y = y.flatten(1, 2) if groups > 0 else y
    y = apply_activation(y, activation, param, prelu_weight)
    if mean is None:
        return y, None, None, None
    if groups < 0:
        return y, mean.flatten(), var.flatten(), count.reshape(())
    return y, mean.flatten(1), var.flatten(1), count.flatten()
