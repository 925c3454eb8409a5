"""The channel family's one entry: BatchNorm, InstanceNorm and GroupNorm — statistics per
channel or per (sample, group) — masked or not, with a fused activation, in place or not.

Modules and functionals call :func:`channel_norm` the same way. It asks the path rule
(:func:`normlab.core.paths.choose_path`) once and runs what it answers:

* kernels, direct — the kernels' eager C++ entry (one crossing: checks, kernel, running
  update, autograd node); where that entry refuses (a parameter that does not fit the input,
  eps = 0 or one value per group in training) the checks below report why;
* kernels, operator — ``torch.ops.normlab.channel_norm`` (and the in-place Function);
* kernels, masked — the masked kernels' eager C++ entry, the same one crossing for a call with
  a mask of valid positions (:mod:`normlab.core.kernels.cpu.masked`);
* native — torch's ops (:mod:`normlab.core.native`);
* composed — normlab's ops (:mod:`normlab.core.composed`), masks included;
* triton — the Triton kernels' backend (:mod:`normlab.core.kernels.triton.backend`): masks,
  a fused activation, in place, and BatchNorm's running update in one launch.

A module's call arrives unchecked: its constructor checked what it fixes, and everything
that depends on the input is checked here (:func:`normlab.core.call_checks.check_channel_args`)
off the direct path. A functional checks first and says so (``checked=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from . import composed, decomposed, native
from .activation import ACTIVATIONS, ActivationArgs
from .call_checks import check_channel_args, check_inplace_input
from .calls import ChannelCall
from .kernels.cpu import build as _cpu
from .kernels.cpu.inplace import channel_norm_inplace
from .kernels.cpu.masked import update_from_kernels
from .paths import (
    CHANNEL,
    COMPOSED,
    KERNELS,
    KERNELS_DIRECT,
    KERNELS_MASKED,
    NATIVE,
    Decision,
    _gpu_kernels,
    _graph_task_id,
    choose_path,
    computes_in_place,
    kernel_layout,
    recomputing,
)
from .recompute import checkpoint_recompute_on_stack
from .running import DiscardingStats, RunningStats

if TYPE_CHECKING:
    from .kernels import KernelBackend
    from .kernels.cpu.build import KernelsModule

__all__ = ["channel_norm", "instance_norm_layout", "masked_channel_norm"]


def channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    groups: int = -1,
    eps: float,
    batch_stats: bool = True,
    running: RunningStats | None = None,
    activation: str = "identity",
    param: float = 0.0,
    prelu_weight: torch.Tensor | None = None,
    inplace: bool = False,
    mask: torch.Tensor | None = None,
    operation: str = "channel_norm",
    checked: bool = False,
    copy_weight: bool = False,
) -> torch.Tensor:
    """act(norm(x)) for an (N, C, *spatial) input.

    ``groups=-1`` is BatchNorm: statistics per channel over (N, *spatial); ``groups=G`` is
    GroupNorm (InstanceNorm: G = C), statistics per (sample, group). ``batch_stats``: the
    statistics come from this batch — and, with a ``running`` policy, the running estimates
    are updated — or, when False, from ``running``'s estimates (eval, frozen). ``activation``
    is a fused one (``param`` its slope or alpha, ``prelu_weight`` PReLU's slopes).
    ``inplace`` writes the output over ``x`` and keeps only it for backward (batch statistics
    only; with given statistics or a mask the layer computes out of place). ``mask``: bool,
    True at valid positions, shaped like x without dim 1 or broadcastable to it; statistics
    over the valid positions, 0 at the others. ``operation`` names the call in
    :func:`normlab.core.record_dispatch`; ``checked``: the caller ran
    :func:`~normlab.core.call_checks.check_channel_args` already. ``copy_weight``
    (InstanceNorm): backward uses a copy of γ taken now, as torch.nn's ``instance_norm``
    (it saves ``weight.repeat(N)``) — so an in-place change of the parameter between forward
    and backward (another loss's ``opt.step()`` first, a common GAN pattern) neither raises
    nor changes this backward's γ.

    Args:
        x: the (N, C, ...) input.
        weight: γ, shape (C,), or None.
        bias: β, shape (C,), or None.
        groups: keyword-only; -1 (BatchNorm) or G. Default -1.
        eps: keyword-only; added to the variance.
        batch_stats: keyword-only; see above. Default True.
        running: keyword-only; the :class:`RunningStats` policy, or None. Default None.
        activation: keyword-only; see above. Default "identity".
        param: keyword-only; the activation's parameter. Default 0.0.
        prelu_weight: keyword-only; PReLU's slopes, or None. Default None.
        inplace: keyword-only; see above. Default False.
        mask: keyword-only; see above. Default None.
        operation: keyword-only; see above. Default "channel_norm".
        checked: keyword-only; see above. Default False.
        copy_weight: keyword-only; see above. Default False.

    Returns:
        The output, ``x``'s shape and dtype (``x`` itself with ``inplace``).

    Raises:
        ValueError, TypeError: the arguments' checks (unless ``checked``), as
            :func:`normlab.functional.batch_norm` raises them.
    """
    if inplace and (not batch_stats or mask is not None or not computes_in_place()):
        # nothing to save memory on: given statistics or a mask compute out of place; and a
        # compile takes the out-of-place route (the memory saving is eager's, see computes_in_place)
        inplace = False
    decision = choose_path(
        x,
        CHANNEL,
        operation,
        given=not batch_stats,
        mask=mask,
        inplace=inplace,
        call=(weight, bias, running, groups, activation, prelu_weight),
    )
    if (
        running is not None
        and batch_stats
        # the direct and masked kernels are never compiled: one C call there, no Python frame
        and (
            _graph_task_id() != -1 and checkpoint_recompute_on_stack()
            if decision is KERNELS_DIRECT or decision is KERNELS_MASKED
            else recomputing()
        )
    ):
        # a checkpoint's recompute: this step's batch was merged in already. torch's ops take
        # the same route as in the forward (their saved tensors must match it), merging nothing
        running = DiscardingStats(running) if decision.path == NATIVE else None
    if copy_weight and weight is not None and decision.path != NATIVE and torch.is_grad_enabled():
        weight = weight.clone()  # torch's own op (native) copies it itself: not twice, and traces as torch.nn
    if decision is KERNELS_DIRECT and not inplace:
        code = ACTIVATIONS[activation].code
        if TYPE_CHECKING:  # what the checker cannot see, said without a call on the direct path:
            # KERNELS_DIRECT is answered only once the kernels are loaded; a fused activation has a code
            assert _cpu.module is not None and code is not None
        out = _cpu.module.channel_norm(x, weight, bias, running, groups, batch_stats, eps, code, param, prelu_weight)
        if type(out) is torch.Tensor:
            return out
        if out is not None:  # the running update is left to the policy's torch ops
            y, mean, var, count = cast("tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]", out)
            if groups >= 0:  # one statistic per (sample, channel): InstanceNorm
                mean, var = mean.view(x.shape[0], -1), var.view(x.shape[0], -1)
            cast(RunningStats, running).update(mean, var, count)  # a tuple comes back only for a policy
            return y
        decision, checked = _refused(mask), False  # checked below: what does not fit is said as every path says it
    if decision is KERNELS_MASKED:  # the same one crossing, with the mask (checked in C++ too)
        code = ACTIVATIONS[activation].code
        if TYPE_CHECKING:  # as on the direct path: KERNELS_MASKED is answered with the kernels loaded
            assert _cpu.module is not None and code is not None and mask is not None
        masked = _cpu.module.masked_channel_norm(
            x, weight, bias, mask, running, groups, batch_stats, eps, code, param, prelu_weight
        )
        if type(masked) is torch.Tensor:
            return masked
        if masked is not None:  # the running update is left to the policy's torch ops
            y, mean, var, valid = cast("tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]", masked)
            update_from_kernels(cast(RunningStats, running), x, mean, var, valid, groups)
            return y
        decision, checked = _refused(mask), False
    if not checked:
        eps, mask = check_channel_args(
            operation, x, weight, bias, eps, groups, batch_stats, running, prelu_weight, mask
        )
    if x.shape[1] == 0 and groups <= 0:  # BatchNorm, InstanceNorm: torch's answer (GroupNorm: torch's op)
        return native.no_channels(operation, x, weight, bias)
    if inplace:  # before anything is written
        check_inplace_input(x, inplace)
        _check_overwritable(x, weight, bias)
    path, how = decision.path, decision.how
    act: ActivationArgs = (activation, param, prelu_weight)  # the fused activation, as the implementations take it
    call = ChannelCall(x, weight, bias, groups, eps, batch_stats, running, act, inplace, mask)
    if path == KERNELS:
        return _kernels(call, how == "traced")
    if path == NATIVE:
        if not inplace:
            return native.channel_norm(call, how == "export", operation == "instance_norm")
        # in place under export or torch.func: torch's ops on a copy (theirs saves its input),
        # the output then written over x
        copy = ChannelCall(x.clone(), weight, bias, groups, eps, batch_stats, running, act)
        return x.copy_(native.channel_norm(copy, False))
    if path == COMPOSED:
        if mask is not None:
            return composed.masked_channel_norm(call, how == "reference")
        if how == "pointwise":  # given statistics
            return composed.pointwise_given_norm(call)
        if how == "decomposed":
            return decomposed.channel_norm(x, weight, bias, groups, eps, running, act)
        return composed.channel_norm(call)
    # triton: the running estimates are updated by the kernels' backend (inside the launch for
    # BatchNorm), never a second time here
    gpu = cast("KernelBackend", _gpu_kernels[0])  # the rule answers "triton" only with them loaded
    return gpu.channel_norm(call)


def masked_channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`channel_norm` with a ``mask`` of valid positions (the former separate entry).

    Args:
        x, weight, bias, mask: as for :func:`channel_norm`.
        **kwargs: :func:`channel_norm`'s other keywords.
    """
    return channel_norm(x, weight, bias, mask=mask, **kwargs)


def _refused(mask: torch.Tensor | None) -> Decision:
    """The path of a call a kernels' entry refused, whose arguments are then checked (the
    C++ entries write no message of their own: the check says what does not fit, with the
    message every path gives). What the checks accept is a parameter or running estimate the
    kernels do not read, as torch.nn's layers do (a tensor subclass such as a wrapper
    parameter, a lazily negated view ``z.conj().imag``): the call's path then, torch's ops
    (the composed ones with a mask)."""
    if mask is not None:
        return Decision(COMPOSED, "eager", "mask: a parameter the kernels do not read")
    return Decision(NATIVE, "eager", "a parameter the kernels do not read: torch's ops")


def instance_norm_layout(y: torch.Tensor) -> torch.Tensor:
    """InstanceNorm's output as torch.nn's: contiguous for any input layout (code after it
    may ``.view()`` it; a permuted 3-D input too), where the kernels and GroupNorm keep a
    channels_last input's layout.

    Args:
        y: the InstanceNorm output.

    Returns:
        ``y``, made contiguous where it was not.
    """
    return y if y.is_contiguous() else y.contiguous()


def _kernels(call: ChannelCall, traced: bool) -> torch.Tensor:
    """The kernels off the direct entry: the in-place mode, or the registered operator that a
    compile or a mode must see. The running estimates are updated as the direct entry updates
    them, in C++, on real tensors; with torch ops where the call is ``traced`` (fake tensors)
    or the kernel leaves it (a batch that is not finite warns or raises there)."""
    x, groups, running = call.x, call.groups, call.running
    activation, param, prelu_weight = call.act
    code = cast(int, ACTIVATIONS[activation].code)  # a fused activation: it has one
    given = not call.batch_stats
    y: torch.Tensor
    if call.inplace:
        y, mean, var = channel_norm_inplace(call, code)
    else:
        if not kernel_layout(x):
            x = x.contiguous()
        y, _, _, _, mean, var = torch.ops.normlab.channel_norm(
            x,
            call.weight,
            call.bias,
            cast(RunningStats, running).running_mean if given else None,  # given: the checks required it
            cast(RunningStats, running).running_var if given else None,
            prelu_weight,
            groups,
            call.eps,
            code,
            param,
        )
    if call.batch_stats and running is not None and running.running_mean is not None:
        mean, var = mean.detach(), var.detach()
        count = call.running_count()
        if traced or not cast("KernelsModule", _cpu.module).update_running(running, mean, var, count):
            if groups >= 0:  # one statistic per (sample, channel): InstanceNorm
                mean, var = mean.view(x.shape[0], -1), var.view(x.shape[0], -1)
            running.update(mean, var, count)
    return y


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
