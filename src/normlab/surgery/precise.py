"""Precise BN: recompute population statistics over the data instead of a moving average.

The running estimates a BatchNorm ends training with are an exponential average over the
last few hundred batches of a network that was still changing, so they lag the final
weights (Wu & Johnson, 2021, "Rethinking Batch in BatchNorm"). Recomputing them with the
final weights, over many batches, fixes the train/eval gap this causes — badly at small
batch sizes, where each batch's statistics are noisy.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from ..core import Moments, check_mask, merge_moments
from .modules import class_label, copy_model, describe_norm, normalization_layers
from .report import SurgeryReport, SurgeryResult
from .tracing import PreHook

__all__ = ["default_forward", "precise_bn"]


def default_forward(model: nn.Module, batch: Any) -> None:
    """model(batch) for a tensor, model(batch[0]) for an (input, target, ...) tuple: how
    :func:`precise_bn` feeds a batch unless given ``forward_fn``.

    Args:
        model: the model to call.
        batch: a tensor, or a tuple or list whose first item is the input tensor.

    Raises:
        TypeError: any other batch (pass ``forward_fn`` to :func:`precise_bn`).
    """
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
    """Exact running (count, mean, M2) per channel in float64, merged with Chan's formula,
    over the valid positions where the layer is called with a mask."""

    def __init__(self) -> None:
        self.moments: Moments | None = None
        self.calls = 0
        self.nonfinite = 0  # batches left out: NaN or inf in the layer's input

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        dims = (0,) + tuple(range(2, x.dim()))
        xd = x.detach().to(torch.float64)  # float64 so a mean of 1e3 and std 0.1 keeps its digits
        if mask is None:
            count = torch.full((x.shape[1],), xd.numel() // max(x.shape[1], 1), dtype=torch.long, device=x.device)
            mean = xd.mean(dims)
            m2 = (xd - mean.view(1, -1, *([1] * (x.dim() - 2)))).square().sum(dims)
        else:
            # what sits at the masked positions (padding: NaN as often as 0) is not counted, and
            # must not reach the sums either (NaN · 0 is NaN), as it does not reach the layer's
            xd = torch.where(mask.unsqueeze(1), xd, 0.0)
            valid = mask.unsqueeze(1).to(torch.float64)  # (N, 1, *spatial)
            n = valid.sum()
            count = torch.full((x.shape[1],), int(n.item()), dtype=torch.long, device=x.device)
            mean = (xd * valid).sum(dims) / n.clamp(min=1)
            m2 = ((xd - mean.view(1, -1, *([1] * (x.dim() - 2)))).square() * valid).sum(dims)
        part = Moments(count, mean, m2)
        self.calls += 1
        # one NaN or inf would make the population statistics NaN for good: such a batch is
        # left out, as a BatchNorm leaves it out of its running estimates (a host sync, once
        # per batch and layer, in a pass that is not a training step)
        if not bool(torch.isfinite(mean).all() and torch.isfinite(m2).all()):
            self.nonfinite += 1
            return
        self.moments = (
            part
            if self.moments is None
            else merge_moments(Moments(*(torch.stack(pair) for pair in zip(self.moments, part))))
        )


def _recorder(path: str, acc: _Accumulator) -> PreHook:
    """A forward pre-hook that feeds the layer's input — positional or ``input=``, and its
    ``mask=`` where it has one — to ``acc``."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(
                f"precise_bn: {path} ({class_label(module)}) was called without an (N, C, *) tensor input "
                f"(got {type(x).__name__}{'' if not isinstance(x, torch.Tensor) else f' of shape {tuple(x.shape)}'})"
            )
        acc.add(x, None if mask is None else check_mask(mask, x, f"precise_bn ({path})"))

    return hook


def _all_processes(acc: dict[str, _Accumulator], order: list[str]) -> None:
    """Merge every process's accumulators (one all_gather for all layers together); each has
    its moments by now (zeros where the layer never ran here)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    moments = [cast(Moments, acc[p].moments) for p in order]
    local = torch.cat([torch.cat([m.count.double(), m.mean, m.m2]) for m in moments])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)  # (world, Σ 3C)
    offset = 0
    for p, m in zip(order, moments):
        c = m.mean.numel()
        block = stacked[:, offset : offset + 3 * c]
        offset += 3 * c
        acc[p].moments = merge_moments(Moments(block[:, :c].round().long(), block[:, c : 2 * c], block[:, 2 * c :]))


def precise_bn(
    model: nn.Module,
    batches: Iterable[object],
    num_batches: int = 200,
    forward_fn: Callable[[nn.Module, object], object] | None = None,
) -> SurgeryResult:
    """A copy of ``model`` whose BatchNorm running statistics are the exact population
    mean and variance of each layer's input over ``num_batches`` batches.

    Statistics are weighted by element count (not averaged per batch), accumulated in
    float64 with Chan's merge; a layer called with ``mask=`` counts its valid positions
    only; the variance is stored in the layer's own convention (unbiased unless it was built
    with ``unbiased_running_var=False``). During the pass only the BatchNorm layers run in
    training mode, so each normalizes with its batch statistics as in training; Dropout and
    everything else run in eval mode. The pass runs on a copy of the model: nothing but the
    recomputed statistics differs in the result (a quantization observer does not move). At most ``num_batches`` batches are drawn from
    ``batches``; a shorter loader is used whole. ``forward_fn(model, batch)`` adapts any
    batch format (default: a tensor, or the first element of a tuple). When
    ``torch.distributed`` is initialized the statistics of all processes are merged, so
    every rank gets the same result.

    Covers normlab's and torch.nn's BatchNorm, SyncBatchNorm and BatchRenorm with running
    statistics; frozen layers keep theirs. ``num_batches_tracked`` and the model's
    training flag are left as they were. A batch with NaN or inf in a layer's input (at its
    valid positions) is left out of that layer's statistics, with a ``RuntimeWarning``; a layer
    whose statistics come out non-finite in its buffers' dtype keeps its own, and is skipped.
    Every other layer that keeps running statistics,
    and every BatchNorm that keeps none, is listed in ``report.skipped``. The report gives,
    per layer, how far the old running statistics were from the new ones.

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
    for path, module in normalization_layers(new):
        info = describe_norm(module)
        if info is None or info.kind not in ("batch", "batch_renorm"):
            if getattr(module, "running_mean", None) is not None or getattr(module, "running_var", None) is not None:
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
    on_meta = [path for path, m in targets.items() if m.running_mean.is_meta]
    if on_meta:
        raise ValueError(
            f"precise_bn computes statistics from data, and the running statistics of {', '.join(on_meta)} "
            "are on the meta device (no values): load the weights first"
        )

    acc = {path: _Accumulator() for path in targets}
    saved = {path: {k: v.clone() for k, v in m.state_dict().items()} for path, m in targets.items()}
    # The pass runs on a copy: what it moves (the layers' momentum updates, but also whatever
    # state other modules keep across forwards, as quantization observers) is not the result.
    scratch = copy_model(new).eval()
    for path, m in scratch.named_modules():
        if path in targets:
            m.train()
            m.register_forward_pre_hook(_recorder(path, acc[path]), with_kwargs=True)
    used = 0
    ran: dict[str, int] = dict.fromkeys(targets, 0)  # batches in which each layer ran
    with torch.no_grad():
        for batch in itertools.islice(batches, num_batches):  # never draws one more
            calls = {path: a.calls for path, a in acc.items()}
            forward_fn(scratch, batch)
            used += 1
            for path, a in acc.items():
                ran[path] += a.calls > calls[path]
    del scratch
    if used == 0:
        raise ValueError("precise_bn got no batches: the loader is empty")
    for path, module in targets.items():
        if acc[path].moments is None:  # never ran here: nothing to merge (but other processes may have)
            running_mean = cast(torch.Tensor, module.running_mean)  # a target keeps running statistics
            zeros = torch.zeros(running_mean.shape, dtype=torch.float64, device=running_mean.device)
            acc[path].moments = Moments(zeros.long(), zeros, zeros.clone())
    _all_processes(acc, list(targets))
    # every layer has its moments now (zeros where it never ran)
    if all(int(cast(Moments, acc[p].moments).count.max()) == 0 and not acc[p].nonfinite for p in targets):
        raise ValueError(
            f"none of the BatchNorm layers ({', '.join(targets)}) ran on the batches: does forward_fn call the model?"
        )

    for path, module in targets.items():
        m = cast(Moments, acc[path].moments)
        seen = int(m.count.min())
        left_out = acc[path].nonfinite
        if left_out:
            warnings.warn(
                f"precise_bn: {path}: {left_out} of the {acc[path].calls} batches it ran on had NaN or inf in its "
                "input; they were left out of its statistics",
                RuntimeWarning,
                stacklevel=2,
            )
        if seen < 2:
            if seen == 0 and left_out:
                why = f"every batch it ran on ({left_out}) had NaN or inf in its input"
            else:
                why = (
                    "it never ran on the batches" if seen == 0 else "1 value per channel over the batches: no variance"
                )
            report.skip(path, f"{why}; its statistics are kept")
            continue
        # the layer's own convention: unbiased (n/(n−1)) unless built with unbiased_running_var=False
        mean, var = m.mean, m.unbiased_var() if getattr(module, "unbiased_running_var", True) else m.var
        running_mean, running_var = cast(torch.Tensor, module.running_mean), cast(torch.Tensor, module.running_var)
        if not bool(
            torch.isfinite(mean.to(running_mean.dtype)).all() and torch.isfinite(var.to(running_var.dtype)).all()
        ):
            report.skip(
                path,
                f"its statistics (largest variance {var.max().item():.3g}) overflow its {running_var.dtype} running "
                "estimates; they are kept",
            )
            continue
        old_mean = saved[path]["running_mean"].double()
        old_var = saved[path]["running_var"].double()
        with torch.no_grad():
            running_mean.copy_(mean.to(running_mean.dtype))
            running_var.copy_(var.to(running_var.dtype))
        report.changed(
            path,
            "recomputed",
            class_label(module),
            class_label(module),
            batches=ran[path],
            elements_per_channel=int(m.count[0]),
            max_abs_mean_change=(old_mean - mean).abs().max().item(),
            max_rel_var_change=((old_var - var).abs() / var.clamp(min=1e-12)).max().item(),
            **({"nonfinite_batches_left_out": left_out} if left_out else {}),
        )
    report.check = f"exact float64 statistics over {used} batches"
    if used < num_batches:
        report.notes.append(f"the loader ran out after {used} of {num_batches} batches")
    return SurgeryResult(new, report)
