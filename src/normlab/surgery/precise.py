"""Precise BN: recompute population statistics over the data instead of a moving average.

The running estimates a BatchNorm ends training with are an exponential average over the
last few hundred batches of a network that was still changing, so they lag the final
weights (Wu & Johnson, 2021, "Rethinking Batch in BatchNorm"). Recomputing them with the
final weights, over many batches, fixes the train/eval gap this causes — badly at small
batch sizes, where each batch's statistics are noisy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core import Moments, merge_moments
from .modules import class_label, copy_model, describe_norm
from .report import SurgeryReport, SurgeryResult

__all__ = ["default_forward", "precise_bn"]


def default_forward(model: nn.Module, batch) -> None:
    """model(batch) for a tensor, model(batch[0]) for an (input, target, ...) tuple."""
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        model(batch[0])
    else:
        raise TypeError(
            f"precise_bn cannot feed a batch of type {type(batch).__name__} to the model; "
            f"pass forward_fn=lambda model, batch: model(...)"
        )


class _Accumulator:
    """Exact running (count, mean, M2) per channel in float64, merged with Chan's formula."""

    def __init__(self) -> None:
        self.moments: Moments | None = None
        self.batches = 0

    def add(self, x: torch.Tensor) -> None:
        dims = (0,) + tuple(range(2, x.dim()))
        xd = x.detach().to(torch.float64)  # float64 so a mean of 1e3 and std 0.1 keeps its digits
        count = torch.full((x.shape[1],), xd.numel() // x.shape[1], dtype=torch.long, device=x.device)
        mean = xd.mean(dims)
        m2 = (xd - mean.view(1, -1, *([1] * (x.dim() - 2)))).square().sum(dims)
        part = Moments(count, mean, m2)
        self.moments = (
            part
            if self.moments is None
            else merge_moments(Moments(*(torch.stack(pair) for pair in zip(self.moments, part))))
        )
        self.batches += 1


def _all_processes(acc: dict[str, _Accumulator], order: list[str]) -> None:
    """Merge every process's accumulators (one all_gather for all layers together)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    local = torch.cat(
        [torch.cat([acc[p].moments.count.double(), acc[p].moments.mean, acc[p].moments.m2]) for p in order]
    )
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)  # (world, Σ 3C)
    offset = 0
    for p in order:
        c = acc[p].moments.mean.numel()
        block = stacked[:, offset : offset + 3 * c]
        offset += 3 * c
        acc[p].moments = merge_moments(Moments(block[:, :c].round().long(), block[:, c : 2 * c], block[:, 2 * c :]))


def precise_bn(
    model: nn.Module,
    batches: Iterable,
    num_batches: int = 200,
    forward_fn: Callable[[nn.Module, object], object] | None = None,
) -> SurgeryResult:
    """A copy of ``model`` whose BatchNorm running statistics are the exact population
    mean and unbiased variance of each layer's input over ``num_batches`` batches.

    Statistics are weighted by element count (not averaged per batch), accumulated in
    float64 with Chan's merge. During the pass only the BatchNorm layers run in training
    mode, so each normalizes with its batch statistics as in training; Dropout and
    everything else run in eval mode. A loader shorter than ``num_batches`` is used
    whole. ``forward_fn(model, batch)`` adapts any batch format (default: a tensor, or
    the first element of a tuple). When ``torch.distributed`` is initialized the
    statistics of all processes are merged, so every rank gets the same result.

    Covers normlab's and torch.nn's BatchNorm, SyncBatchNorm and BatchRenorm with running
    statistics; frozen layers keep theirs. ``num_batches_tracked`` and the model's
    training flag are left as they were. The report gives, per layer, how far the old
    running statistics were from the new ones.

    Args:
        model: the model; it is not modified.
        batches: an iterable of batches (a DataLoader, a list of tensors, ...).
        num_batches: how many batches to use at most; a positive int. Default 200.
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch; default:
            ``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list.

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: a copy with the recomputed running statistics, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.

    Raises:
        ValueError: ``num_batches`` is not a positive int, the loader is empty, or a
            BatchNorm layer never ran on the batches.
        TypeError: a batch that the default ``forward_fn`` cannot feed to the model.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    forward_fn = forward_fn or default_forward
    new = copy_model(model)
    report = SurgeryReport(f"precise_bn(num_batches={num_batches})")
    targets: dict[str, nn.Module] = {}
    for path, module in new.named_modules():
        info = describe_norm(module)
        if info is None or info.kind not in ("batch", "batch_renorm"):
            if info is not None and info.running_mean is not None:
                report.skip(path, f"{class_label(module)}: precise_bn recomputes BatchNorm statistics only")
            continue
        if info.running_mean is None:
            report.skip(path, "track_running_stats=False: no running statistics to recompute")
        elif getattr(module, "frozen", False):
            report.skip(path, "frozen: its statistics are kept")
        else:
            targets[path] = module
    if not targets:
        report.notes.append("no BatchNorm layer with running statistics: nothing to do")
        return SurgeryResult(new, report)

    acc = {path: _Accumulator() for path in targets}
    saved = {path: {k: v.clone() for k, v in m.state_dict().items()} for path, m in targets.items()}
    training_flags = {name: m.training for name, m in new.named_modules()}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, path=path: acc[path].add(args[0])) for path, m in targets.items()
    ]
    used = 0
    try:
        new.eval()
        for m in targets.values():
            m.train()
        with torch.no_grad():
            for batch in batches:
                if used >= num_batches:
                    break
                forward_fn(new, batch)
                used += 1
    finally:
        for h in handles:
            h.remove()
        for name, m in new.named_modules():
            m.training = training_flags[name]
    if used == 0:
        raise ValueError("precise_bn got no batches: the loader is empty")
    unseen = [p for p in targets if acc[p].moments is None]
    if unseen:
        raise ValueError(f"these BatchNorm layers never ran on the batches: {', '.join(unseen)}")
    _all_processes(acc, list(targets))

    for path, module in targets.items():
        m = acc[path].moments
        mean, var = m.mean, m.unbiased_var()
        old_mean = saved[path]["running_mean"].double()
        old_var = saved[path]["running_var"].double()
        module.load_state_dict(saved[path])  # undo what the pass's momentum updates did
        with torch.no_grad():
            module.running_mean.copy_(mean.to(module.running_mean.dtype))
            module.running_var.copy_(var.to(module.running_var.dtype))
        report.changed(
            path,
            "recomputed",
            class_label(module),
            class_label(module),
            batches=acc[path].batches,
            elements_per_channel=int(m.count[0]),
            max_abs_mean_change=(old_mean - mean).abs().max().item(),
            max_rel_var_change=((old_var - var).abs() / var.clamp(min=1e-12)).max().item(),
        )
    report.check = f"exact float64 statistics over {used} batches"
    if used < num_batches:
        report.notes.append(f"the loader ran out after {used} of {num_batches} batches")
    return SurgeryResult(new, report)
