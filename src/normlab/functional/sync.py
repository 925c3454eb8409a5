"""sync_batch_norm: BatchNorm whose statistics are those of the batch across all processes.

Works on any ``torch.distributed`` backend — gloo on CPU, nccl on GPU — because it uses
only the portable ``all_gather`` and ``all_reduce``. Per layer and training step:

* forward: each process packs its (count, mean, M2) per channel; **one** ``all_gather``
  brings every process's pack, and Chan's formula merges them, count-weighted, in
  float64. Uneven per-process batches are exact, and an empty one contributes nothing.
* backward: **one** ``all_reduce`` sums the packed (Σdy, Σdy·x̂) per channel over all
  processes; the input gradient then uses the global sums and the global count.

Every process of the group must run the layer's forward and backward (as with
DistributedDataParallel), including a process whose batch is empty. A peer that dies or
stops answering makes the others' collective fail within the process group's timeout
(``torch.distributed.init_process_group(..., timeout=timedelta(...))``); the error is
re-raised with what was being exchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..core import (
    AcrossProcesses,
    Moments,
    NormStats,
    centered_moments,
    channel_view,
    check_mask,
    compute_dtype,
    masked_moments,
    masked_normalize,
    merge_moments,
    normalize,
    reduced_count,
)
from ..core.call_checks import check_channel_call
from ..core.checks import InputError
from ..core.paths import recomputing
from ..core.running import RunningStats
from .fused_args import running_policy
from .tracked import _batch_norm, batch_norm

__all__ = ["check_peers", "distributed_world", "sync_batch_norm", "synchronized_batch_norm"]


def distributed_world(process_group: Any = None) -> int:
    """Processes in ``process_group`` (the default group if None); 1 when torch.distributed
    is not initialized — then SyncBatchNorm is plain BatchNorm."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _collective(what: str, fn: Callable[[], object], process_group: Any) -> None:
    try:
        fn()
    except Exception as err:  # gloo raises RuntimeError, nccl DistBackendError, ...
        world = distributed_world(process_group)
        raise RuntimeError(
            f"SyncBatchNorm: the {what} across {world} processes failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). A peer process may have died or "
            f"stopped answering; collectives give up after the process group's timeout, set "
            f"with torch.distributed.init_process_group(..., timeout=datetime.timedelta(...))"
        ) from err


def _gather_moments(local: torch.Tensor, process_group: Any) -> torch.Tensor:
    """(world, 1 + 2C) float64: every process's (count, mean…, M2…), in one all_gather."""
    world = distributed_world(process_group)
    parts = [torch.empty_like(local) for _ in range(world)]
    _collective(
        "all_gather of batch statistics", lambda: dist.all_gather(parts, local, group=process_group), process_group
    )
    return torch.stack(parts)


_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def check_peers(input: torch.Tensor, process_group: Any) -> None:
    """Every process must bring the same channel count, dtype and rank: one small all_gather
    of a fixed-size header, before the statistics' exchange, whose size depends on C and
    which gloo aborts on (SIGABRT) when the sizes differ. Raises the same error everywhere."""
    world = distributed_world(process_group)
    # the header travels on the input's device (nccl takes only GPU tensors)
    header = torch.tensor(
        [input.shape[1], _DTYPE_CODES.get(input.dtype, 0), input.dim()], dtype=torch.int64, device=input.device
    )
    parts = [torch.empty_like(header) for _ in range(world)]
    _collective(
        "all_gather of input shapes", lambda: dist.all_gather(parts, header, group=process_group), process_group
    )
    seen = torch.stack(parts).tolist()  # a host read, once: the layer checks at its first call
    if any(row != seen[0] for row in seen):
        names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
        described = ", ".join(
            f"rank {r}: C={c}, {names.get(d, 'other dtype')}, {n}-D" for r, (c, d, n) in enumerate(seen)
        )
        raise InputError(
            f"SyncBatchNorm: the processes disagree about the input ({described}); every "
            f"process must run the same layer on inputs with the same channel count, dtype "
            f"and rank. Nothing was updated"
        )


def _all_reduce_sums(process_group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(packed: torch.Tensor) -> torch.Tensor:
        _collective(
            "all_reduce of gradient sums",
            lambda: dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group),
            process_group,
        )
        return packed

    return reduce


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    process_group: Any = None,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased_running_var: bool = True,
    on_nonfinite: str = "skip",
    peers_checked: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`normlab.functional.batch_norm` with statistics over every process's batch.

    Before the statistics are exchanged, the processes compare channel count, dtype and
    rank (:func:`check_peers`, one small collective) unless ``peers_checked`` says it was
    done — :class:`normlab.nn.SyncBatchNorm` checks at its first training call only.

    Outside training, without an initialized process group, or with a group of one
    process, it *is* ``batch_norm``. The running estimates are updated with the global
    statistics (unbiased with the global count), identically on every process; a batch
    whose global statistics are not finite is skipped by every process together.
    ``weight``/``bias`` gradients are this process's contributions (DDP sums or averages
    them); the input gradient is exact for the global batch. With ``mask`` (as for
    ``batch_norm``) each process contributes its valid positions; the global valid count
    stays on the device, and a global batch with fewer than 2 valid values leaves the
    running estimates untouched on every process.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps: as for
            :func:`batch_norm`; N may differ between processes (0 included).
        process_group: the ``torch.distributed`` group to synchronize over; None for the
            whole world.
        num_batches_tracked, unbiased_running_var, on_nonfinite, mask: keyword-only, as for
            :func:`batch_norm`.
        peers_checked: keyword-only; the peers' channels, dtype and rank were already
            compared, so skip that collective. Default False.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: the errors of :func:`batch_norm`; peers that disagree on channels,
            dtype or rank.
        RuntimeError: a peer that fails or does not answer within the process group's timeout.
    """
    estimates = (running_mean, running_var, num_batches_tracked, momentum, unbiased_running_var, on_nonfinite)
    if not training or distributed_world(process_group) == 1:
        return _batch_norm("batch_norm", input, weight, bias, training, eps, estimates, mask)
    eps = check_channel_call("sync_batch_norm", input, weight, bias, running_mean, running_var, eps)
    running = running_policy(estimates, True)
    return synchronized_batch_norm(
        input,
        weight,
        bias,
        eps=eps,
        running=running,
        process_group=process_group,
        peers_checked=peers_checked,
        mask=mask,
    )


def synchronized_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    running: RunningStats | None,
    process_group: Any = None,
    peers_checked: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The synchronized training call of :func:`sync_batch_norm` — what
    :class:`normlab.nn.SyncBatchNorm` calls in training with more than one process — with the
    running estimates as one policy (:class:`normlab.core.RunningStats`), updated with the
    global statistics. ``eps`` is checked by the caller."""
    if not peers_checked:
        check_peers(input, process_group)
    dims = (0,) + tuple(range(2, input.dim()))
    channels = input.shape[1]
    local_count = reduced_count(input.shape, dims)
    cdtype = compute_dtype(input.dtype)
    if mask is not None:
        mask = check_mask(mask, input, "sync_batch_norm").unsqueeze(1)  # (N, 1, *spatial)
    with torch.no_grad():
        if mask is not None:
            shift, offset, local_var, valid = masked_moments(input, mask, dims)
            mean = shift.double().flatten() + offset.double().flatten()
            m2 = local_var.double().flatten() * valid.double().flatten()
            count = valid.double().reshape(1)
        elif local_count > 0:
            moments = centered_moments(input, dims)
            # shift + offset carries the mean to better than the compute dtype: keep it in float64.
            mean = moments.shift.double().flatten() + moments.offset.double().flatten()
            m2 = moments.var.double().flatten() * local_count
        else:  # an empty batch on this process: it contributes nothing
            mean = torch.zeros(channels, dtype=torch.float64, device=input.device)
            m2 = torch.zeros_like(mean)
        if mask is None:
            count = torch.full((1,), float(local_count), dtype=torch.float64, device=input.device)
        gathered = _gather_moments(torch.cat([count, mean, m2]), process_group)
        counts = gathered[:, :1].round().long().expand(-1, channels)
        merged = merge_moments(Moments(counts, gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]))
        # The global count stays a tensor: reading it would stall an accelerator's stream.
        # On the CPU reading it is free, and a batch of one value is refused as BatchNorm does.
        total = merged.count[0].to(torch.float64)
        # every process's batch is empty: as BatchNorm on N = 0, an empty output and no update,
        # on every process alike (so the backward exchanges nothing either)
        all_empty = mask is None and input.device.type == "cpu" and total.item() == 0
        if mask is None and input.device.type == "cpu" and 0 < total.item() <= 1:
            raise InputError(
                f"Expected more than 1 value per channel when training, got {int(total.item())} "
                f"across {distributed_world(process_group)} processes (this process: input size "
                f"{list(input.shape)})"
            )
        # with a mask, a global batch without a valid position is not an error: keep it finite
        var = merged.m2 / (total.clamp(min=1) if mask is not None else total)
        view = (1, -1) + (1,) * (input.dim() - 2)
        shift = merged.mean.to(cdtype)
        offset = (merged.mean - shift.double()).to(cdtype)  # what rounding the mean lost
        rstd = torch.rsqrt(var + eps).to(cdtype)
    if all_empty:  # no running estimates passed, so the momentum is never used
        return batch_norm(input, None, None, weight, bias, True, 0.1, eps)
    stats = NormStats(shift.view(view), offset.view(view), rstd.view(view))
    across = AcrossProcesses(_all_reduce_sums(process_group), total)
    weight, bias = channel_view(weight, input.dim()), channel_view(bias, input.dim())
    if mask is not None:
        out = masked_normalize(input, weight, bias, mask, stats, None, dims, eps, batch_stats=True, across=across)
    else:
        out = normalize(input, weight, bias, stats, dims, eps, batch_stats=True, across=across)
    if running is not None and running.running_mean is not None and not recomputing():
        # a masked global batch with fewer than 2 valid values is not merged (no host sync)
        running.update(merged.mean, var, total, enough=None if mask is None else total >= 2)
    return out
