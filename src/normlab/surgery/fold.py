"""Fold eval-mode BatchNorm into the convolution or linear layer that produces its input.

Eval-mode BatchNorm is the per-channel affine map y = a·z + b with

    a = γ / √(running_var + ε),     b = β − a·running_mean

and z = W∗x + c is itself affine in x, so a·z + b = (a·W)∗x + (a·c + b): scale the
producer's output channels by a, give it the bias a·c + b (it gets one if it had none),
and the BatchNorm disappears. The arithmetic is done in float64 and cast back.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from .fold_ws import standardizes_weight
from .modules import (
    class_label,
    compared,
    copy_model,
    describe_norm,
    eval_max_abs_diff,
    normalization_layers,
    replace_everywhere,
    shared_parameters,
)
from .report import SurgeryReport, SurgeryResult
from .tracing import find_pairs

__all__ = ["bn_affine", "fold_batchnorm", "fold_into"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: the layers a BatchNorm folds into (what _is_producer accepts)
Producer = nn.Linear | nn.modules.conv._ConvNd


def _is_producer(m: nn.Module) -> bool:
    # a standardized convolution re-normalizes its weight on every call, which would undo the
    # scaling folded into it (fold_weight_standardization makes it a plain Conv2d first)
    return isinstance(m, _CONV + _CONV_T + (nn.Linear,)) and not standardizes_weight(m)


def _foldable_reason(m: nn.Module) -> str | None:
    """None when ``m`` is an eval-mode affine map with known statistics, else why not."""
    info = describe_norm(m)
    if info is None or info.kind not in ("batch", "batch_renorm", "frozen"):
        return "not a BatchNorm"
    if info.running_mean is None or info.running_var is None:
        return "track_running_stats=False: it normalizes with batch statistics even in eval"
    return None


def _is_consumer(m: nn.Module) -> bool:
    info = describe_norm(m)
    return info is not None and info.kind in ("batch", "batch_renorm", "frozen")


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of a BatchNorm's eval-mode map y = a·x + b, per channel, in float64:
    a = γ/√(running_var + ε), b = β − a·running_mean (``docs/surgery.md``).

    Args:
        bn: a BatchNorm-like layer with running statistics (torch.nn's, normlab's, timm's).

    Returns:
        ``(a, b)``, each of shape (C,), float64.

    Raises:
        TypeError: ``bn`` is no BatchNorm-like layer.
        ValueError: ``bn`` keeps no running statistics (``track_running_stats=False``).
    """
    info = describe_norm(bn)
    if info is None:
        raise TypeError(f"bn_affine expects a BatchNorm-like layer, got {class_label(bn)}")
    if info.running_var is None or info.running_mean is None:
        raise ValueError(
            f"bn_affine needs running statistics, and this {class_label(bn)} keeps none (track_running_stats=False)"
        )
    var = info.running_var.detach().double()
    mean = info.running_mean.detach().double()
    a = torch.rsqrt(var + info.eps)
    if info.weight is not None:
        a = a * info.weight.detach().double()
    b = -a * mean
    if info.bias is not None:
        b = b + info.bias.detach().double()
    return a, b


def fold_into(producer: Producer, a: torch.Tensor, b: torch.Tensor) -> None:
    """Make ``producer`` compute a·producer(x) + b per output channel, in place."""
    weight = producer.weight
    w = weight.detach().double()
    if isinstance(producer, nn.Linear):
        out_channels = producer.out_features
        w = w * a[:, None]
    elif isinstance(producer, _CONV):
        out_channels = producer.out_channels
        w = w * a.view(-1, *([1] * (w.dim() - 1)))
    elif isinstance(producer, _CONV_T):
        # weight is (C_in, C_out / groups, *k): output channel g·(C_out/G) + j lives at
        # [g·(C_in/G) : (g+1)·(C_in/G), j].
        out_channels = producer.out_channels
        g = producer.groups
        grouped = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        scale = a.view(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        w = (grouped * scale).view_as(w)
    else:  # pragma: no cover - guarded by _is_producer
        raise TypeError(f"cannot fold into {type(producer).__name__}")
    if a.numel() != out_channels:
        raise ValueError(f"BatchNorm has {a.numel()} channels but {type(producer).__name__} produces {out_channels}")
    old_bias = producer.bias.detach().double() if producer.bias is not None else torch.zeros_like(a)
    new_bias = a * old_bias + b
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))
    if producer.bias is None:  # trained (or not) as the weight is
        producer.bias = nn.Parameter(new_bias.to(device=weight.device, dtype=weight.dtype), weight.requires_grad)
    else:
        with torch.no_grad():
            producer.bias.copy_(new_bias.to(producer.bias.dtype))


def _replacement_for(bn: nn.Module) -> nn.Module:
    """What stays where the BatchNorm was: nothing, or what a norm + activation layer applies
    after normalizing (its activation; timm's drop layer before it)."""
    found = [getattr(bn, name, None) for name in ("drop", "act")]  # BatchNormAct*: these stay
    after = [m for m in found if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not after:
        return nn.Identity()
    return after[0] if len(after) == 1 else nn.Sequential(*after)


def fold_batchnorm(model: nn.Module, example_input: Any = None) -> SurgeryResult:
    """Return an eval-mode copy of ``model`` with every foldable BatchNorm folded away.

    Producer → BatchNorm pairs are found by tracing (``torch.fx``, or one forward on
    ``example_input`` when fx cannot trace). A pair is folded only when the producer
    (Conv1d/2d/3d — grouped and depthwise too — ConvTranspose1d/2d/3d, or Linear) feeds
    nothing but the BatchNorm, holds no parameter another module holds too (tied weights:
    scaling them would change that module) and no parametrized weight (weight_norm: the
    fold could not be written into it), the BatchNorm is called on its input alone (a
    masked BatchNorm is not an affine map), neither has hooks (they would not see what they
    saw), and both run once per forward; BatchNorm means
    normlab's or torch.nn's BatchNorm1d/2d/3d, SyncBatchNorm, BatchRenorm and FrozenBatchNorm.
    Every other BatchNorm stays and is listed once in ``report.skipped`` with the reason. A
    fused norm + activation layer leaves its activation behind.

    With ``example_input`` the folded model is checked against the original (both in
    eval) and ``report.max_abs_diff`` says how far apart they are.

    Args:
        model: the model; it is not modified.
        example_input: optional; one input (a tensor, or a tuple/dict of arguments) for the
            check, and for finding pairs when ``torch.fx`` cannot trace the model.

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: an eval-mode copy with the BatchNorms folded away, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.

    Examples:
        >>> folded, report = nl.surgery.fold_batchnorm(model, example_input=torch.randn(1, 3, 32, 32))
        >>> print(report)
    """
    folded = copy_model(model).eval()
    report = SurgeryReport("fold_batchnorm")
    search = find_pairs(folded, _is_producer, _is_consumer, example_input)
    report.check = f"pairs found by {search.method}"
    modules = dict(folded.named_modules())
    for consumer, why in search.skipped.items():
        report.skip(consumer, why)
    shared = shared_parameters(folded)
    unverified_linear: list[str] = []
    for producer_path, bn_path in search.pairs:
        # find_pairs pairs only the producers _is_producer accepted
        producer, bn = cast(Producer, modules[producer_path]), modules[bn_path]
        reason = (
            _foldable_reason(bn)
            or _computed_reason(producer_path, producer)
            or _shared_reason(producer_path, producer, shared)
            or _hooks_reason(producer_path, producer, bn_path, bn)
        )
        if reason is not None:
            report.skip(bn_path, reason)
            continue
        if isinstance(producer, nn.Linear):
            rank = search.output_ndim.get(producer_path)
            if rank is not None and rank != 2:
                report.skip(
                    bn_path,
                    f"{producer_path} outputs a {rank}D tensor: BatchNorm1d then "
                    f"normalizes dim 1, not the Linear's features",
                )
                continue
            if rank is None:
                unverified_linear.append(producer_path)
        a, b = bn_affine(bn)
        if a.numel() != _out_channels(producer):
            report.skip(bn_path, f"{a.numel()} channels but {producer_path} produces {_out_channels(producer)}")
            continue
        fold_into(producer, a.to(producer.weight.device), b.to(producer.weight.device))
        replacement = _replacement_for(bn)
        folded = replace_everywhere(folded, bn, replacement)
        report.changed(
            bn_path,
            "folded",
            class_label(bn),
            class_label(replacement),
            into=producer_path,
            producer=type(producer).__name__,
        )
    done = {c.path for c in report.changes} | {s.path for s in report.skipped}
    for path, module in normalization_layers(model):
        if path not in done and _is_consumer(module):
            where = "on example_input" if search.method.startswith("hooks") else "in the traced forward"
            report.skip(path, f"not called {where} (or only inside another layer)")
    if unverified_linear:
        report.notes.append(
            "Linear -> BatchNorm1d folds assume (N, C) activations; pass example_input to "
            f"verify ({', '.join(unverified_linear)})"
        )
    if example_input is not None:
        report.max_abs_diff = eval_max_abs_diff(model, folded, example_input)
        report.check = f"{report.check}; {compared(report.max_abs_diff)}"
    else:
        report.check = f"{report.check}; no example_input, outputs not compared"
    return SurgeryResult(folded, report)


def _computed_reason(path: str, producer: nn.Module) -> str | None:
    """A parametrized weight (weight_norm, spectral_norm, any parametrize) is recomputed from
    its originals on every access: scaling the computed tensor would change nothing."""
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(producer, name):
            # what parametrize installs: a ModuleDict of each tensor's chain of parametrizations
            chain = cast(parametrize.ParametrizationList, cast(nn.ModuleDict, producer.parametrizations)[name])
            return (
                f"the {name} of {path} is computed by a parametrization "
                f"({', '.join(type(p).__name__ for p in chain)}): "
                "a fold cannot be written into it"
            )
    return None


def _hooks_reason(producer_path: str, producer: nn.Module, bn_path: str, bn: nn.Module) -> str | None:
    """A hook on the BatchNorm would vanish with it; a hook on the producer would see (or
    change, or rewrite the weight of) the folded layer."""
    for path, module, registries in (
        (bn_path, bn, _HOOKS),
        (producer_path, producer, _HOOKS),
    ):
        kinds = sorted({kind for registry, kind in registries.items() if getattr(module, registry, None)})
        if kinds:
            return (
                f"{path} has {' and '.join(kinds)} hooks: a fold removes {bn_path} and changes what "
                f"{producer_path} computes, so they would no longer see what they saw"
            )
    return None


_HOOKS = {
    "_forward_pre_hooks": "forward pre",
    "_forward_hooks": "forward",
    "_backward_pre_hooks": "backward pre",
    "_backward_hooks": "backward",
}


def _shared_reason(path: str, producer: nn.Module, shared: dict[int, list[str]]) -> str | None:
    for name in ("weight", "bias"):
        param = getattr(producer, name, None)
        if param is not None and id(param) in shared:
            others = ", ".join(p for p in shared[id(param)] if p != path)
            return f"the {name} of {path} is shared with {others}: folding into it would change {others} too"
    return None


def _out_channels(producer: Producer) -> int:
    return producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
