"""Masked channel norms on the kernels: BatchNorm, InstanceNorm and GroupNorm over the valid
positions of a mask, with a fused activation (masked.cpp), for plain float32 CPU tensors in a
layout the kernels read — the path rule's "kernels, masked" row.

The call crosses into C++ once, as an unmasked one does: the entry ``masked_channel_norm``
(entries.cpp) checks what the kernels need (the mask's shape among it), runs the masked kernel,
updates BatchNorm's running estimates from the valid count (running.cpp) and records the
autograd node (autograd.cpp) whose backward runs the masked backward kernel; second
derivatives differentiate the composed ops' masked reference (:mod:`.double_backward`). The
same map as the composed path (:mod:`normlab.core.masked`): statistics over the valid
positions, 0 at the padded ones in the output and in the input's gradient.

What the entry leaves to Python is here: the running update it hands back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...composed import update_masked

if TYPE_CHECKING:
    import torch

    from ...running import RunningStats

__all__ = ["update_from_kernels"]


def update_from_kernels(
    running: RunningStats, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, groups: int
) -> None:
    """Merge the batch statistics the masked entry handed back (float64, one per group, with
    the valid ``count`` of each) in the policy's torch ops: BatchNorm's where the kernels'
    update leaves it (a batch that is not finite warns or raises there, buffers it does not
    write), InstanceNorm's always — each instance unbiased with its own valid count, then
    averaged over those with at least 2 (:func:`normlab.core.composed.update_masked`)."""
    dtype = x.dtype
    if groups < 0:  # one group per channel, every one with the same count (the entry merged < 2 itself)
        running.update(mean.to(dtype), var.to(dtype), int(count[0]))  # on the CPU: no device sync
        return
    n = x.shape[0]  # one group per (sample, channel)
    update_masked(
        running, mean.view(n, -1).to(dtype), var.view(n, -1).to(dtype), count.view(n, -1)[:, 0].to(dtype), groups
    )
