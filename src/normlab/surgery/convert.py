"""Convert channel norm layers between kinds: batch, group, layer, instance, frozen, batch-renorm.

The typical use is BatchNorm → GroupNorm for training at small batch sizes (Wu & He,
2018), or BatchNorm → FrozenBatchNorm for fine-tuning a detector backbone. γ and β move
with the layer; running statistics move where the target keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict, cast

import torch
from torch import nn

from .. import nn as nln
from .modules import (
    ORIGINAL,
    SYNC_FROM,
    ModuleFactoryKwargs,
    NormInfo,
    adopt,
    class_label,
    compared,
    copy_model,
    describe_norm,
    eval_max_abs_diff,
    is_normalization_layer,
    module_factory_kwargs,
    normalization_layers,
    replace_everywhere,
    thaw,
    unrecognized_norm_note,
    watch_calls,
)
from .report import SurgeryReport, SurgeryResult
from .tracing import extra_arguments, takes_mask

__all__ = ["TARGETS", "auto_groups", "build_norm", "convert_norms"]

#: The classic channel norms, converted here; the norms beyond them in convert_beyond.py.
CHANNEL_TARGETS = ("batch", "group", "layer", "instance", "frozen", "batch_renorm")
BEYOND_TARGETS = ("dyt", "derf", "frn", "evonorm_b0", "evonorm_s0", "group_ws")
#: Every ``to=`` that :func:`convert_norms` accepts: the classic norms, then those beyond them.
TARGETS = CHANNEL_TARGETS + BEYOND_TARGETS

# the constructors differ by kind (a frozen layer takes no momentum): build_norm passes each its own
_BY_SPATIAL_RANK: dict[str, tuple[Callable[..., nn.Module], ...]] = {
    "batch": (nln.BatchNorm1d, nln.BatchNorm2d, nln.BatchNorm3d),
    "instance": (nln.InstanceNorm1d, nln.InstanceNorm2d, nln.InstanceNorm3d),
    "frozen": (nln.FrozenBatchNorm1d, nln.FrozenBatchNorm2d, nln.FrozenBatchNorm3d),
    "batch_renorm": (nln.BatchRenorm1d, nln.BatchRenorm2d, nln.BatchRenorm3d),
}


def auto_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count ≤ ``max_groups`` that divides ``channels``.

    Args:
        channels: C, the number of channels to split into groups.
        max_groups: the most groups wanted; >= 1. Default 32.

    Returns:
        G, with ``channels % G == 0`` (1 when nothing larger divides).

    Raises:
        ValueError: ``max_groups < 1``.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


_ACT_BY_SPATIAL_RANK = (nln.BatchNormAct1d, nln.BatchNormAct2d, nln.BatchNormAct3d)


class ActivationKwargs(TypedDict):
    """The activation arguments of normlab's fused norm + activation layers."""

    activation: str
    activation_param: float | None
    inplace: bool


def _activation_of(module: nn.Module) -> ActivationKwargs | None:
    """The activation of a norm + activation layer as the fused layers take it — normlab's,
    or another library's (timm's BatchNormAct2d) whose activation normlab fuses — or None."""
    act = getattr(module, "act", None)
    if not isinstance(act, nn.Module):
        return None
    if isinstance(getattr(module, "activation", None), str):
        # a normlab fused layer (its activation is a name): the arguments it was built with
        return {
            "activation": cast(str, module.activation),
            "activation_param": cast("float | None", module.activation_param),
            "inplace": getattr(module, "inplace", False),
        }
    if not isinstance(getattr(module, "drop", None), (nn.Identity, type(None))):
        return None  # a drop layer sits between the norm and the activation: both follow
    try:
        name, param = nln.activation_spec(act)
    except ValueError:
        return None
    if isinstance(act, nn.PReLU) and act.num_parameters != getattr(module, "num_features", act.num_parameters):
        return None  # one slope for all channels: normlab's fused PReLU has one per channel
    return {"activation": name, "activation_param": param, "inplace": False}


def _applied_after(module: nn.Module) -> list[nn.Module]:
    """The modules a norm + activation layer applies after normalizing: its drop layer (timm's),
    then its activation."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    return [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]


def build_norm(
    kind: str,
    info: NormInfo,
    *,
    spatial_rank: int | None,
    groups: int | None,
    factory: ModuleFactoryKwargs,
    activation: ActivationKwargs | None = None,
) -> nn.Module:
    """A fresh normlab layer of ``kind`` for the channels, eps and affine of ``info``; with
    ``activation`` (a fused source), the fused form where one exists."""
    affine = info.weight is not None
    bias = info.bias is not None
    if kind in ("group", "layer"):
        num_groups = groups if kind == "group" else 1
        if num_groups is None:
            raise TypeError("build_norm: kind='group' needs groups, the group count (an int), got None")
        if activation:
            return nln.GroupNormAct(
                num_groups,
                info.channels,
                eps=info.eps,
                affine=affine,
                bias=bias if affine else True,
                **factory,
                **activation,
            )
        return nln.GroupNorm(
            num_groups, info.channels, eps=info.eps, affine=affine, bias=bias if affine else True, **factory
        )
    if spatial_rank is None:
        raise TypeError(f"build_norm: kind={kind!r} builds a 1d, 2d or 3d layer, so spatial_rank is needed, got None")
    if kind == "batch" and activation:
        momentum = info.momentum if info.kind in ("batch", "batch_renorm", "instance") else 0.1
        return _ACT_BY_SPATIAL_RANK[spatial_rank - 1](
            info.channels,
            eps=info.eps,
            momentum=momentum,
            affine=affine,
            bias=bias if affine else True,
            **factory,
            **activation,
        )
    cls = _BY_SPATIAL_RANK[kind][spatial_rank - 1]
    if kind == "frozen":
        return cls(info.channels, eps=info.eps, **factory)
    if kind == "instance":
        return cls(info.channels, eps=info.eps, affine=affine, bias=bias if affine else True, **factory)
    momentum = info.momentum if info.kind in ("batch", "batch_renorm", "instance") else 0.1
    kwargs = dict(eps=info.eps, momentum=momentum, affine=affine, bias=bias if affine else True, **factory)
    return cls(info.channels, **kwargs)


def _transfer(info: NormInfo, target: nn.Module) -> str:
    """Copy γ/β and, where both keep them, running statistics; say what happened to them."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            source, dest = getattr(info, name), getattr(target, name, None)
            if source is not None and dest is not None:
                dest.copy_(source.detach())
        has_stats = info.running_mean is not None
        keeps_stats = getattr(target, "running_mean", None) is not None
        if has_stats and keeps_stats:  # both hold running_mean and running_var (checked just above)
            cast(torch.Tensor, target.running_mean).copy_(cast(torch.Tensor, info.running_mean))
            cast(torch.Tensor, target.running_var).copy_(cast(torch.Tensor, info.running_var))
            if info.num_batches_tracked is not None and getattr(target, "num_batches_tracked", None) is not None:
                cast(torch.Tensor, target.num_batches_tracked).copy_(info.num_batches_tracked)
            return "copied"
    if has_stats:
        return "dropped (the target keeps none)"
    if keeps_stats:
        return "fresh (mean 0, var 1): run precise_bn or train before eval"
    return "none"


def _not_a_channel_norm(module: nn.Module) -> str:
    if isinstance(module, (nn.LayerNorm, nln.LayerNorm, nln.RMSNorm, nln.LayerNorm2d)) or (
        hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)
    ):
        return (
            f"{class_label(module)} normalizes each position or sample over its features, not channels over the batch"
        )
    return f"{class_label(module)} is no channel norm convert_norms knows how to rebuild"


def _dropped_options(path: str, source: nn.Module, target: nn.Module) -> list[str]:
    """Notes for what ``source`` had that ``target`` cannot keep."""
    notes = []
    if getattr(source, "unbiased_running_var", True) is False and not hasattr(target, "unbiased_running_var"):
        notes.append(f"{path}: unbiased_running_var=False dropped ({class_label(target)} keeps no running variance)")
    on_nonfinite = getattr(source, "on_nonfinite", "skip")
    if on_nonfinite != "skip" and not hasattr(target, "on_nonfinite"):
        notes.append(
            f"{path}: on_nonfinite={on_nonfinite!r} dropped ({class_label(target)} keeps no running statistics)"
        )
    if getattr(source, "frozen", False) and getattr(target, "running_mean", None) is None:
        what = "its γ/β stay frozen" if source.frozen_affine else "the layer is no longer frozen"
        notes.append(f"{path}: frozen statistics dropped ({class_label(target)} keeps none); {what}")
    if getattr(source, "running_mean", 0) is None and getattr(target, "running_mean", None) is not None:
        notes.append(
            f"{path}: track_running_stats=False cannot be kept: {class_label(target)} normalizes with its "
            "running statistics in eval"
        )
    target_info = describe_norm(target)
    if (
        isinstance(source, (nn.SyncBatchNorm, nln.SyncBatchNorm))
        and target_info is not None
        and target_info.kind == "batch_renorm"
    ):
        notes.append(f"{path}: {class_label(target)} computes its statistics on each process alone, not synchronized")
    return notes


def _inputs_seen(model: nn.Module, example_input: Any) -> dict[str, torch.Tensor]:
    """Each normalization layer's (first) input on one eval forward of ``example_input``, as
    an empty tensor of its rank, dtype, device and sizes past the batch dim (the spatial
    extent says whether a group or an instance of the new layer holds more than one value)."""
    seen: dict[str, torch.Tensor] = {}

    def see(path: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            seen.setdefault(path, x.new_empty((0, *x.shape[1:])))

    watch_calls(model, example_input, is_normalization_layer, see)
    return seen


def _factory(module: nn.Module, seen: torch.Tensor | None, model: nn.Module) -> ModuleFactoryKwargs:
    """device/dtype for a layer's replacement: its own tensors', else its input's on
    example_input, else the model's (a layer without parameters or buffers says nothing)."""
    if module_factory_kwargs(module):
        return module_factory_kwargs(module)
    if seen is not None:
        return {"device": seen.device, "dtype": seen.dtype}
    for m in model.modules():
        if module_factory_kwargs(m):
            return module_factory_kwargs(m)
    return {}


def convert_norms(
    model: nn.Module,
    to: str,
    *,
    groups: int | str = "auto",
    max_groups: int = 32,
    example_input: Any = None,
    alpha_init_value: float = 0.5,
) -> SurgeryResult:
    """Replace every channel norm layer of ``model`` with one of kind ``to``.

    Args:
        model: the model; it is not modified.
        to: ``"batch"``, ``"group"``, ``"layer"`` (GroupNorm with one group, i.e. LayerNorm
            over (C, \\*spatial) with per-channel affine), ``"instance"``, ``"frozen"``
            (FrozenBatchNorm) or ``"batch_renorm"``.
        groups: for ``"group"``: an int that must divide each layer's channels, or
            ``"auto"`` — per layer, the largest divisor of its channels ≤ ``max_groups``.
        max_groups: the most groups ``groups="auto"`` picks. Default 32.
        example_input: learns the spatial rank of layers whose class does not say it
            (GroupNorm, SyncBatchNorm) when the target is rank-specific, and which layers
            see one position per channel (``(N, C)``, a 1×1 map): those are not made
            instance norms, nor group norms with one value per group (skipped with the reason).
        alpha_init_value: α's initial value for ``"dyt"`` and ``"derf"``.

    The norms beyond the classic five (:mod:`normlab.surgery.convert_beyond`): ``"dyt"`` and
    ``"derf"`` replace LayerNorm and RMSNorm (channels-last or, for LayerNorm2d, channels-first)
    by :class:`~normlab.nn.DyT` / :class:`~normlab.nn.Derf` with their γ and β; ``"frn"``,
    ``"evonorm_b0"`` and ``"evonorm_s0"`` replace 2d channel norms by FRN + TLU, EvoNorm-B0
    (running variance copied) and EvoNorm-S0; ``"group_ws"`` is ``"group"`` plus every
    ``nn.Conv2d`` made a :class:`~normlab.nn.StdConv2d` (GroupNorm + Weight Standardization).

    Sources are normlab's and torch.nn's BatchNorm, SyncBatchNorm, InstanceNorm,
    GroupNorm, FrozenBatchNorm and BatchRenorm; LayerNorm and RMSNorm over trailing
    dims are not channel norms and are left alone. Layers already of kind ``to`` are
    left alone. Every replacement is recorded with what happened to its statistics.
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    if to in BEYOND_TARGETS:
        from .convert_beyond import convert_beyond  # built on this module's helpers: imported when used

        return convert_beyond(
            model,
            to,
            groups=groups,
            max_groups=max_groups,
            alpha_init_value=alpha_init_value,
            example_input=example_input,
        )
    if groups != "auto" and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
        raise ValueError(f"groups must be a positive int or 'auto', got {groups!r}")
    new = copy_model(model)
    report = SurgeryReport(f"convert_norms(to={to!r})")
    seen = _inputs_seen(new, example_input) if example_input is not None else {}
    masked = extra_arguments(new, lambda m: describe_norm(m) is not None, example_input)
    unchecked = []  # layers that take a mask, converted into ones that do not, without a way to check
    widened: list[str] = []  # 1d layers given wider groups: their input, unseen, may be (N, C)
    for path, module in normalization_layers(new):
        info = describe_norm(module)
        if info is None:
            report.skip(path, _not_a_channel_norm(module))
            continue
        if info.kind == to:
            report.skip(path, f"already a {to} norm ({class_label(module)}); from_torch/to_torch switch libraries")
            continue
        rank = info.spatial_rank if info.spatial_rank is not None else (seen[path].dim() - 2 if path in seen else None)
        if to not in ("group", "layer") and rank is None:
            report.skip(
                path,
                f"{class_label(module)} does not say its spatial rank; pass "
                f"example_input so a {to} layer of the right rank can be built",
            )
            continue
        if rank == 0:
            rank = 1  # an (N, C) input: the 1d layers take it (an instance norm is refused below)
        if to not in ("group", "layer") and rank is not None and not 1 <= rank <= 3:
            # a GroupNorm takes any rank; the other kinds have 1d, 2d and 3d layers
            report.skip(path, f"{rank} spatial dims: no {to} layer for that rank")
            continue
        # positions per channel on example_input: 1 for an (N, C) input (BatchNorm1d after a
        # Linear) or a 1×1 map, where an instance, or a group of one channel, holds one value
        # (variance 0): such a layer would refuse the input, or output its bias whatever came in
        positions = seen[path].shape[2:].numel() if path in seen and seen[path].dim() >= 2 else None
        # a 1d layer whose input was not seen may take (N, C) as well as (N, C, L)
        maybe_one = positions is None and info.spatial_rank == 1
        if to == "instance" and maybe_one:
            report.skip(
                path,
                f"{class_label(module)} takes (N, C) as well as (N, C, L), and no example_input showed "
                "which one it sees: on (N, C) instance statistics would be over a single value "
                "(pass example_input to convert the layers that see (N, C, L))",
            )
            continue
        if to == "instance" and positions == 1:
            report.skip(
                path,
                f"its input on example_input has one position per channel (shape (N, {', '.join(map(str, seen[path].shape[1:]))})): "
                "instance statistics would be over a single value",
            )
            continue
        n_groups = None
        if to == "group":
            if isinstance(groups, str):  # "auto": any other str was refused above
                # with one position per channel a group needs two channels at least
                one = positions == 1 or maybe_one  # groups of two channels at least
                n_groups = auto_groups(info.channels, max(1, info.channels // 2) if one else max_groups)
                if maybe_one and n_groups != auto_groups(info.channels, max_groups):
                    widened.append(path)
            elif info.channels % groups:
                report.skip(path, f"groups={groups} does not divide its {info.channels} channels")
                continue
            else:
                n_groups = groups
        if to in ("group", "layer") and (positions == 1 or maybe_one) and info.channels // (n_groups or 1) == 1:
            seen_as = (
                "its input on example_input has one position per channel"
                if positions == 1
                else f"{class_label(module)} may take (N, C) (no example_input showed it does not)"
            )
            report.skip(
                path,
                f"{seen_as}, so each of {n_groups or 1} groups of {info.channels} channels would hold a "
                "single value: use fewer groups",
            )
            continue
        activation = _activation_of(module)
        target = build_norm(
            to,
            info,
            spatial_rank=rank,
            groups=n_groups,
            factory=_factory(module, seen.get(path), new),
            activation=activation,
        )
        fused = activation is not None and hasattr(target, "act")
        after = [] if fused else _applied_after(module)  # what follows the new layer as modules of its own
        if takes_mask(module) and (after or not takes_mask(target)):
            if masked is None:
                unchecked.append(path)
            elif path in masked:
                what = " then ".join([class_label(target)] + [type(m).__name__ for m in after])
                report.skip(path, f"it is called with {masked[path]}: {what} takes no mask")
                continue
        statistics = _transfer(info, target)
        # γ, β (and a PReLU's slopes) stay the very tensors: requires_grad and ties kept
        adopt(target, module, drop=(ORIGINAL, SYNC_FROM))
        report.notes += _dropped_options(path, module, target)
        if target.__dict__.get("frozen") and not target.frozen_affine and getattr(target, "running_mean", None) is None:
            # a freeze of statistics the new layer does not have: nothing left frozen
            thaw(cast(nln.FreezableNorm, target))
        if after:  # no fused form of this kind (or of this activation): they follow as modules
            target = nn.Sequential(target, *after)
            target.training = module.training
        new = replace_everywhere(new, module, target)
        detail: dict[str, object] = {"statistics": statistics}
        if after:
            detail["activation"] = " then ".join(type(m).__name__ for m in after) + " (separate modules)"
        elif activation is not None:
            detail["activation"] = activation["activation"]
        if n_groups is not None:
            detail["groups"] = n_groups
        report.changed(path, "replaced", class_label(module), class_label(target), **detail)
    note = unrecognized_norm_note(model)
    if note:
        report.notes.append(note)
    if widened:
        report.notes.append(
            f"{', '.join(widened)}: groups of two channels at least, as no example_input showed whether "
            "these 1d layers see (N, C), where a group of one channel would hold a single value"
        )
    if unchecked:
        report.notes.append(
            f"torch.fx cannot trace this model, so whether {', '.join(unchecked)} are called with mask= "
            "(which the new layers do not take) was not checked: pass example_input"
        )
    all_copied = all(c.detail.get("statistics") == "copied" for c in report.changes)
    if to in ("group", "layer", "instance"):
        report.check = "not compared: the new layers compute different statistics"
    elif not all_copied:
        report.check = "not compared: some layers start with fresh statistics"
    elif example_input is None:
        report.check = "no example_input, not compared"
    else:
        # In eval mode a BatchNorm with copied statistics is the same affine map as before.
        report.max_abs_diff = eval_max_abs_diff(model, new, example_input)
        report.check = f"eval-mode {compared(report.max_abs_diff)}"
    return SurgeryResult(new, report)
