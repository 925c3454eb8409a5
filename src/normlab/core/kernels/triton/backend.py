"""The Triton kernels as a backend of the path rule: the object
:func:`normlab.core.paths.choose_path` asks (``unavailable``, ``takes``) and the families'
entries call (``channel_norm``, ``row_norm``), with the arguments those entries pass after
their checks (see :mod:`normlab.core.kernels`).

What it adds to :mod:`.entries`:

* the running-statistics policy (:class:`normlab.core.RunningStats`) handed to the kernel as
  its fields — buffers, counter, momentum (None: cumulative), unbiased, on_nonfinite —
  where BatchNorm's update runs inside the launch, so nothing updates them a second time;
  InstanceNorm's estimates (per (sample, channel) statistics, which the kernel does not
  merge) by the policy's own torch ops from the kernel's statistics, as the CPU kernels'
  path and the composed masked path merge them;
* InstanceNorm with given statistics (eval with running estimates) as what it is, a
  per-channel normalization: the kernel's BatchNorm with given statistics;
* the questions the entries' checks cannot answer for these kernels: a PReLU slope tensor
  they can index, an in-place input whose memory they can write (a contiguous copy would
  leave the caller's tensor untouched), RMSNorm's layout (torch's keeps the input's strides),
  and autocast (torch computes LayerNorm, RMSNorm and GroupNorm of a half input in float32).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

import torch

from ...composed import update_masked
from ...paths import CHANNEL, ROW
from . import entries
from ._runtime import INTERPRETED
from .channel import collapsible

if TYPE_CHECKING:
    from ...calls import ChannelCall, RowCall
    from ...running import RunningStats

__all__ = ["BACKEND", "TritonBackend"]


def _interpret_hint() -> str:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return (
            "TRITON_INTERPRET=1 is set now but was not when the Triton kernels were first imported "
            "(triton reads it once per process, when a kernel is defined): set it in the environment "
            "before Python starts"
        )
    return (
        "on CPU tensors they run only under Triton's interpreter, and TRITON_INTERPRET=1 was not set "
        "(triton reads it once per process: set it in the environment before Python starts), or "
        "pass CUDA tensors"
    )


class TritonBackend:
    """The adapter registered with the path rule (one instance, :data:`BACKEND`)."""

    name = "triton"

    def unavailable(self, x: torch.Tensor) -> str:
        """Why the kernels cannot run on ``x``'s device in this process ("" where they can)."""
        kind = x.device.type
        if kind == "meta":
            return ""  # shapes only: the operators' fake kernels answer
        if INTERPRETED:
            if kind == "cpu":
                return ""
            return f"the Triton kernels run under the interpreter (TRITON_INTERPRET=1), on CPU tensors, not {kind}"
        if kind == "cuda":
            return ""
        if kind == "cpu":
            return f"the Triton kernels cannot run on a CPU tensor here: {_interpret_hint()}"
        return f"the Triton kernels run on CUDA tensors, not {kind}"

    def takes(
        self,
        x: torch.Tensor,
        family: str,
        call: tuple[Any, ...] | None,
        *,
        given: bool = False,
        mask: torch.Tensor | None = None,
        inplace: bool = False,
        centered: bool = True,
    ) -> tuple[bool, str]:
        """``(True, "")`` where the kernels run this call, else ``(False, why)``: from the
        call's metadata only (no host read). ``call`` as :func:`normlab.core.paths.choose_path`
        documents it."""
        if not call:  # asked without the call's arguments (a norm outside the families asking)
            return False, "not a channel or row family call"
        # Under autocast torch runs layer_norm and group_norm (and rms_norm's ops) in float32 and
        # returns float32: a half input goes to torch's op, whose output dtype models expect
        autocast = x.dtype is not torch.float32 and torch.is_autocast_enabled(x.device.type)
        if family == CHANNEL:
            weight, bias, running, groups, activation, prelu_weight = call
            if type(groups) is not int or type(activation) is not str:
                return False, "arguments the checks will report"
            if autocast and groups > 0:
                return False, "autocast: torch computes GroupNorm in float32 (InstanceNorm as torch decides)"
            if inplace and not collapsible(x):
                return False, "in place on a layout the kernels do not read (a copy would leave the input untouched)"
            # the policy's buffers read from its mapping: properties cost a Python frame each
            buffers = {} if running is None else running.buffers
            running_mean = buffers.get("running_mean")
            has_running = running_mean is not None
            if given:
                if not has_running:
                    return False, "given statistics without running estimates (the checks report it)"
                if groups > 0 and groups != x.shape[1]:
                    return False, "given statistics for GroupNorm"
            if prelu_weight is not None and (
                not isinstance(prelu_weight, torch.Tensor)
                or prelu_weight.dim() != 1
                or prelu_weight.stride(0) != 1
                or prelu_weight.device != x.device
            ):
                return False, "a PReLU weight that is not a contiguous 1-D tensor on the input's device"
            merged = has_running and (given or groups < 0)  # the estimates the kernel reads or updates
            return entries.takes_channel(
                x,
                weight=weight,
                bias=bias,
                activation=activation,
                running_mean=running_mean if merged else None,
                running_var=buffers.get("running_var") if merged else None,
                batch_stats=not given,
                groups=-1 if given else groups,
            )
        if family == ROW:
            normalized_shape, weight, residual = call
            if autocast:
                return False, "autocast: torch computes LayerNorm and RMSNorm in float32"
            if not centered and not x.is_contiguous():
                # RMSNorm keeps its input's strides in torch; the kernels write contiguous rows
                return False, "RMSNorm on a non-contiguous input"
            try:
                shape = tuple(int(d) for d in normalized_shape)
            except TypeError:
                return False, "a normalized_shape the checks will report"
            return entries.takes_row(x, shape, weight, residual)
        return False, "LayerNorm2d on a layout that is not rows of C: statistics over dim 1"

    def channel_norm(self, call: ChannelCall) -> torch.Tensor:
        """The channel family's call (checked, as :func:`normlab.core.channel.channel_norm`
        hands it on): the output; the running estimates updated once."""
        x, groups, running, mask = call.x, call.groups, call.running, call.mask
        activation, param, prelu_weight = call.act
        if not call.batch_stats:  # per-channel statistics, whatever the grouping (InstanceNorm's too)
            given = cast("RunningStats", running)  # given statistics: the checks required the policy
            return entries.channel_norm(
                x,
                call.weight,
                call.bias,
                eps=call.eps,
                mask=mask,
                batch_stats=False,
                running_mean=given.running_mean,
                running_var=given.running_var,
                activation=activation,
                param=param,
                prelu_weight=prelu_weight,
            ).y
        buffers = {} if running is None else running.buffers
        tracked = buffers.get("running_mean") is not None
        in_kernel = tracked and groups < 0  # BatchNorm: merged inside the launch
        policy = cast("RunningStats", running)  # read below only where tracked: there is one
        out = entries.channel_norm(
            x,
            call.weight,
            call.bias,
            groups=groups,
            eps=call.eps,
            mask=mask,
            running_mean=buffers.get("running_mean") if in_kernel else None,
            running_var=buffers.get("running_var") if in_kernel else None,
            num_batches_tracked=buffers.get("num_batches_tracked") if in_kernel else None,
            momentum=policy.momentum if in_kernel else 0.1,
            unbiased=policy.unbiased if in_kernel else True,
            on_nonfinite=policy.on_nonfinite if in_kernel else "skip",
            activation=activation,
            param=param,
            prelu_weight=prelu_weight,
            inplace=call.inplace,
        )
        if tracked and not in_kernel:  # InstanceNorm: the per-instance statistics averaged
            # batch statistics: the result holds them
            mean, var = cast(torch.Tensor, out.mean).detach(), cast(torch.Tensor, out.var).detach()
            if mask is not None:
                update_masked(policy, mean, var, cast(torch.Tensor, out.count)[:, 0].detach(), groups)
            else:
                policy.update(mean, var, x[0, 0].numel())
        return out.y

    def row_norm(self, call: RowCall) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The row family's call (checked): y, or ``(y, x + residual)``."""
        return entries.row_norm(
            call.x,
            call.normalized_shape,
            call.weight,
            call.bias,
            cast(float, call.eps),  # None only for a complex input, which the kernels do not take
            centered=call.centered,
            residual=call.residual,
        )


#: The instance the path rule registers.
BACKEND = TritonBackend()
