"""convert_norms to the norms beyond the classic five: DyT, Derf, FRN, EvoNorm-B0/S0, and
GroupNorm with standardized convolutions (GN + WS).

Two families of sources. DyT and Derf replace the transformers' LayerNorm and RMSNorm
(channels-last, or channels-first as ConvNeXt's LayerNorm2d): each becomes an elementwise
squash with the source's γ and β. FRN, EvoNorm and GN + WS replace the convolutional nets'
channel norms (BatchNorm, GroupNorm, InstanceNorm, their fused norm+activation forms, frozen
and renormalized BatchNorm): γ and β move, and EvoNorm-B0 takes BatchNorm's running variance.
A fused norm+activation source gives its activation to the layer that replaces it: TLU
replaces ReLU (the FRN paper's pairing), EvoNorm's own nonlinearity replaces any. Every norm
layer the target cannot replace is listed in ``skipped`` with the reason.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from .. import nn as nln
from .convert import BEYOND_TARGETS, _activation_of, _factory, _inputs_seen, auto_groups, convert_norms
from .modules import (
    ORIGINAL,
    SYNC_FROM,
    ModuleFactoryKwargs,
    NormInfo,
    adopt,
    class_label,
    conv_config,
    copy_model,
    describe_norm,
    is_normalization_layer,
    replace_everywhere,
)
from .report import SurgeryReport, SurgeryResult
from .tracing import extra_arguments, takes_mask

__all__ = ["BEYOND_TARGETS", "convert_beyond", "convert_convs_to_std"]

_SQUASH: dict[str, type[nln.DyT] | type[nln.Derf]] = {"dyt": nln.DyT, "derf": nln.Derf}


def _row_norm_source(
    module: nn.Module,
) -> tuple[tuple[int, ...], bool, torch.Tensor | None, torch.Tensor | None] | None:
    """(normalized_shape, channels_last, γ, β) of a LayerNorm/RMSNorm-like layer, or None."""
    name = type(module).__name__
    from_timm = type(module).__module__.split(".")[0] == "timm"
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, nln.LayerNorm2d) or (from_timm and name.startswith(("LayerNorm2d", "RmsNorm2d"))):
        # normalized_shape: (C,) on these layers (a class of timm's is known by its name only)
        channels = weight.shape[0] if weight is not None else cast("tuple[int, ...]", module.normalized_shape)[0]
        return (channels,), False, weight, bias
    rms = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    if isinstance(module, (nn.LayerNorm, *rms)) or (from_timm and name.startswith(("LayerNorm", "RmsNorm"))):
        return tuple(cast("tuple[int, ...]", module.normalized_shape)), True, weight, bias
    return None


def _squash_from(
    kind: str, module: nn.Module, alpha_init_value: float, factory: ModuleFactoryKwargs
) -> nn.Module | None:
    source = _row_norm_source(module)
    if source is None:
        return None
    shape, channels_last, weight, bias = source
    target = _SQUASH[kind](
        shape if channels_last else shape[0],
        channels_last,
        alpha_init_value,
        elementwise_affine=weight is not None,
        **factory,
    )
    with torch.no_grad():
        if weight is not None and target.weight is not None:  # built with elementwise_affine: it has one
            target.weight.copy_(weight.detach().reshape(target.weight.shape))
        if bias is not None and target.bias is not None:
            target.bias.copy_(bias.detach().reshape(target.bias.shape))
    return target


def _channel_target(
    kind: str, info: NormInfo, module: nn.Module, groups: int | str, max_groups: int, factory: ModuleFactoryKwargs
) -> tuple[nn.Module, str | None]:
    """The FRN / EvoNorm layer for a channel norm, and what happened to its activation."""
    activation = _activation_of(module)
    act_name = None if activation is None else activation["activation"]
    note = None
    target: nln.FilterResponseNormTlu2d | nln.FilterResponseNormAct2d | nln.EvoNormB0 | nln.EvoNormS0
    if kind == "frn":
        if act_name in (None, "relu", "identity"):
            target = nln.FilterResponseNormTlu2d(info.channels, **factory)
            if act_name == "relu":
                note = "relu replaced by TLU"
        else:
            act = cast(nn.Module, module.act)  # the activation module _activation_of found
            target = nln.FilterResponseNormAct2d(info.channels, act_layer=act, **factory)
            note = f"{act_name} kept after FRN"
    elif kind == "evonorm_b0":
        momentum = info.momentum if isinstance(info.momentum, float) else 0.1
        target = nln.EvoNormB0(info.channels, momentum=momentum, **factory)
        if info.running_var is not None:
            with torch.no_grad():
                target.running_var.copy_(info.running_var)
    else:
        # "auto" is the only str convert_beyond lets through
        n_groups = auto_groups(info.channels, max_groups) if isinstance(groups, str) else groups
        target = nln.EvoNormS0(info.channels, groups=n_groups, **factory)
    if kind.startswith("evonorm") and act_name not in (None, "identity"):
        note = f"{act_name} replaced by EvoNorm's own nonlinearity"
    with torch.no_grad():
        for name in ("weight", "bias"):
            source = getattr(info, name)
            if source is not None:
                getattr(target, name).copy_(source.detach())
    return target, note


def convert_beyond(
    model: nn.Module,
    to: str,
    *,
    groups: int | str = "auto",
    max_groups: int = 32,
    alpha_init_value: float = 0.5,
    example_input: Any = None,
) -> SurgeryResult:
    """:func:`normlab.surgery.convert_norms` for the targets in :data:`BEYOND_TARGETS`."""
    if to not in BEYOND_TARGETS:
        raise ValueError(f"to must be one of {BEYOND_TARGETS}, got {to!r}")
    if to == "group_ws":
        grouped, report = convert_norms(
            model, "group", groups=groups, max_groups=max_groups, example_input=example_input
        )
        standardized, conv_report = convert_convs_to_std(grouped)
        report.operation = "convert_norms(to='group_ws')"
        report.changes += conv_report.changes
        report.skipped += conv_report.skipped
        report.check = "not compared: the new layers compute different statistics and standardized weights"
        return SurgeryResult(standardized, report)
    if groups != "auto" and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
        raise ValueError(f"groups must be a positive int or 'auto', got {groups!r}")
    new = copy_model(model)
    report = SurgeryReport(f"convert_norms(to={to!r})")
    seen = _inputs_seen(new, example_input) if example_input is not None else {}
    masked = extra_arguments(new, is_normalization_layer, example_input)
    for path, module in list(new.named_modules()):
        if to in _SQUASH and isinstance(module, (nln.AddLayerNorm, nln.AddRMSNorm)):
            # found by class, not by its calls: where fx cannot trace and no example_input is
            # given, nothing else would stop it (every call of it passes a residual)
            report.skip(
                path,
                f"{class_label(module)} takes (x, residual) and returns (normalized, sum): "
                f"normlab.nn.{_SQUASH[to].__name__} takes one input and returns one tensor",
            )
            continue
        if to in _SQUASH:
            target = _squash_from(to, module, alpha_init_value, _factory(module, seen.get(path), new))
            if target is None:
                if isinstance(module, _SQUASH[to]):
                    report.skip(path, f"already a {to} layer")
                elif is_normalization_layer(module):
                    report.skip(path, f"{class_label(module)} is not a LayerNorm or RMSNorm: {to} replaces those")
                continue
            detail: dict[str, object] = {
                "alpha_init_value": alpha_init_value,
                "affine": "copied" if target.weight is not None else "none",
            }
        else:
            info = describe_norm(module)
            if info is None:
                if _already(module, to):
                    report.skip(path, f"already a {to} layer")
                elif is_normalization_layer(module):
                    report.skip(
                        path, f"{class_label(module)} is not a channel norm (BatchNorm, GroupNorm, InstanceNorm)"
                    )
                continue
            rank = (
                info.spatial_rank if info.spatial_rank is not None else (seen[path].dim() - 2 if path in seen else None)
            )
            if rank is None:
                report.skip(
                    path,
                    f"{class_label(module)} does not say its spatial rank; pass example_input so that "
                    f"{to} (a 2d layer) is used only where the input is (N, C, H, W)",
                )
                continue
            if rank != 2:
                report.skip(path, f"{rank} spatial dims: {to} normalizes (N, C, H, W) inputs")
                continue
            if to == "evonorm_s0" and not isinstance(groups, str) and info.channels % groups:  # str: "auto"
                report.skip(path, f"groups={groups} does not divide its {info.channels} channels")
                continue
            factory = _factory(module, seen.get(path), new)
            target, note = _channel_target(to, info, module, groups, max_groups, factory)
            detail = {"affine": "copied" if info.weight is not None else "fresh"}
            if to == "evonorm_b0":
                detail["statistics"] = "running_var copied" if info.running_var is not None else "fresh"
            if to == "evonorm_s0":
                detail["groups"] = target.groups
            if note:
                detail["activation"] = note
        if masked is None and takes_mask(module) and not takes_mask(target):
            report.notes.append(
                f"torch.fx cannot trace this model, so whether {path} is called with mask= (which "
                f"{class_label(target)} does not take) was not checked: pass example_input"
            )
        elif masked and path in masked and not takes_mask(target):
            report.skip(path, f"it is called with {masked[path]}: {class_label(target)} takes no mask")
            continue
        # γ, β (and an activation's parameters) stay the very tensors: requires_grad and ties kept
        target = adopt(target, module, drop=(ORIGINAL, SYNC_FROM))
        new = replace_everywhere(new, module, target)
        report.changed(path, "replaced", class_label(module), class_label(target), **detail)
    report.check = f"not compared: {to} computes something else than the layers it replaces"
    return SurgeryResult(new, report)


def _already(module: nn.Module, to: str) -> bool:
    kinds = {"frn": nln.FilterResponseNormTlu2d, "evonorm_b0": nln.EvoNormB0, "evonorm_s0": nln.EvoNormS0}
    return isinstance(module, kinds.get(to, ()))


def convert_convs_to_std(model: nn.Module, eps: float = 1e-6) -> SurgeryResult:
    """Every ``nn.Conv2d`` of ``model`` (exactly that class) as a :class:`normlab.nn.StdConv2d`
    with the same configuration and weights: Weight Standardization (Qiao et al., 2019).

    The new layers hold the very weight and bias tensors (``requires_grad`` and ties kept);
    their output differs from the convolution's until the model is trained or fine-tuned
    with standardized weights.

    Args:
        model: the model to convert; it is not modified.
        eps: the standardization's eps for every new layer. Default 1e-6.

    Returns:
        ``(model, report)``: a :class:`SurgeryResult`, one "replaced" change per convolution.
    """
    new = copy_model(model)
    report = SurgeryReport("convert_convs_to_std")
    for path, module in list(new.named_modules()):
        if type(module) is not nn.Conv2d:
            continue
        target = nln.StdConv2d(module.in_channels, module.out_channels, eps=eps, **conv_config(module))
        target.padding_mode = module.padding_mode
        target._reversed_padding_repeated_twice = copy.copy(module._reversed_padding_repeated_twice)
        target.load_state_dict(module.state_dict(), strict=True)
        target = adopt(target, module)  # the very weight and bias: requires_grad and ties kept
        new = replace_everywhere(new, module, target)
        report.changed(path, "replaced", class_label(module), class_label(target), weights="standardized")
    return SurgeryResult(new, report)
