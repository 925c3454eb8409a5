"""timm's normalization layers beyond the classic five and their normlab twins, both ways.

``from_torch`` recognizes timm's layers by module and class name, so timm is never imported
there; ``to_torch(model, timm=True)`` imports it to build timm's classes back. Every twin has
timm's constructor arguments, parameters, buffers and state-dict keys: state moves bit for bit.

    timm                                     normlab
    StdConv2d, StdConv2dSame                 StdConv2d (padding="same" for the Same variant)
    ScaledStdConv2d, ScaledStdConv2dSame     ScaledStdConv2d
    FilterResponseNormTlu2d                  FilterResponseNormTlu2d
    FilterResponseNormAct2d                  FilterResponseNormAct2d (the activation module copied)
    EvoNorm2dB0 … EvoNorm2dS2a               EvoNormB0 … EvoNormS2a
    GroupNorm, GroupNorm1, GroupNorm1NoBias  GroupNorm (fast_norm off)
    GroupNormAct, GroupNorm1Act              GroupNormAct (fused activations, no drop layer)
    LayerNorm2dNoBias, LayerNormNoBias       LayerNorm2d, LayerNorm (bias=False)
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from .. import nn as nln
from .modules import ModuleFactoryKwargs, adopt, class_label, conv_config, module_factory_kwargs, replace_everywhere
from .report import SurgeryReport, SurgeryResult

__all__ = ["TIMM_TWINS", "from_timm_layer", "has_timm_twin", "to_timm_layers"]

#: One of timm's layers (or, as type[TimmLayer], one of its classes). from_torch recognizes them by
#: class name and to_torch(timm=True) imports them by name, and timm ships no type information: to
#: the type checker they are Any, as ``import timm`` makes them (pyproject's mypy overrides); their
#: attributes are those their classes define.
TimmLayer = Any

_EVONORMS = ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a")

#: normlab class → (timm module, timm class name) of its twin.
TIMM_TWINS: dict[type[nn.Module], tuple[str, str]] = {
    nln.StdConv2d: ("timm.layers", "StdConv2d"),
    nln.ScaledStdConv2d: ("timm.layers", "ScaledStdConv2d"),
    nln.FilterResponseNormTlu2d: ("timm.layers", "FilterResponseNormTlu2d"),
    nln.FilterResponseNormAct2d: ("timm.layers", "FilterResponseNormAct2d"),
    nln.GroupNormAct: ("timm.layers", "GroupNormAct"),
    nln.BatchNormAct2d: ("timm.layers", "BatchNormAct2d"),
    nln.LayerNorm2d: ("timm.layers", "LayerNorm2d"),
    **{getattr(nln, f"EvoNorm{v}"): ("timm.layers", f"EvoNorm2d{v}") for v in _EVONORMS},
}


def has_timm_twin(module: nn.Module) -> bool:
    return type(module) in TIMM_TWINS or getattr(module, "_timm_origin", None) in _ORIGINS


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "timm"


def _fast_norm_reason(module: nn.Module) -> str | None:
    if getattr(module, "_fast_norm", False):
        return f"{class_label(module)} with fast_norm on: its forward is timm's low-precision kernel"
    return None


def _conv_args(module: TimmLayer) -> dict[str, Any]:
    """The standardized conv's configuration: timm's SAME padding (computed per input) as "same"."""
    same = bool(getattr(module, "same_pad", False))
    return {**conv_config(module), "padding": "same" if same else module.padding, "eps": module.eps}


def _std_conv(module: TimmLayer) -> nln.StdConv2d | str:
    if module.padding_mode != "zeros":
        return f"{class_label(module)} with padding_mode={module.padding_mode!r}: timm's forward pads with zeros"
    return nln.StdConv2d(module.in_channels, module.out_channels, **_conv_args(module))


def _scaled_std_conv(module: TimmLayer) -> nln.ScaledStdConv2d | str:
    if module.padding_mode != "zeros":
        return f"{class_label(module)} with padding_mode={module.padding_mode!r}: timm's forward pads with zeros"
    twin = nln.ScaledStdConv2d(
        module.in_channels, module.out_channels, gain_init=module.gain_init, **_conv_args(module)
    )
    twin.scale = module.scale  # γ/√fan_in is not state: carried over as a number
    return twin


def _group_norm(module: TimmLayer) -> nln.GroupNorm | str:
    reason = _fast_norm_reason(module)
    if reason:
        return reason
    return nln.GroupNorm(
        module.num_groups,
        module.num_channels,
        eps=module.eps,
        affine=module.affine,
        bias=module.bias is not None,
        **module_factory_kwargs(module),
    )


def _group_norm_act(module: TimmLayer) -> nln.GroupNormAct | str:
    reason = _fast_norm_reason(module)
    if reason:
        return reason
    if not isinstance(module.drop, nn.Identity):
        return f"{class_label(module)} with drop layer {type(module.drop).__name__}: the fused layer has none"
    try:
        activation, param = nln.activation_spec(module.act)
    except ValueError as err:
        return str(err)
    if isinstance(module.act, nn.PReLU) and module.act.num_parameters != module.num_channels:
        return f"{class_label(module)} with a single-slope PReLU: normlab's has one slope per channel"
    return nln.GroupNormAct(
        module.num_groups,
        module.num_channels,
        eps=module.eps,
        affine=module.affine,
        activation=activation,
        activation_param=param,
        bias=module.bias is not None,
        **module_factory_kwargs(module),
    )


def _evonorm(variant: str) -> Callable[[TimmLayer], nn.Module]:
    cls: type[nn.Module] = getattr(nln, f"EvoNorm{variant}")

    def build(module: TimmLayer) -> nn.Module:
        factory = module_factory_kwargs(module)
        channels = module.weight.numel()
        if variant.startswith("B"):
            return cls(channels, apply_act=module.apply_act, momentum=module.momentum, eps=module.eps, **factory)
        kwargs: dict[str, object] = dict(groups=module.groups, apply_act=module.apply_act, eps=module.eps, **factory)
        if variant.startswith(("S1", "S2")):
            kwargs["act_layer"] = module.act if module.apply_act else None
        return cls(channels, **kwargs)

    return build


def _frn_tlu(module: TimmLayer) -> nln.FilterResponseNormTlu2d:
    return nln.FilterResponseNormTlu2d(
        module.weight.numel(), apply_act=module.tau is not None, eps=module.eps, **module_factory_kwargs(module)
    )


def _frn_act(module: TimmLayer) -> nln.FilterResponseNormAct2d:
    return nln.FilterResponseNormAct2d(
        module.weight.numel(), act_layer=module.act, eps=module.eps, **module_factory_kwargs(module)
    )


def _layer_norm2d_no_bias(module: TimmLayer) -> nln.LayerNorm2d | str:
    reason = _fast_norm_reason(module)
    if reason:
        return reason
    return nln.LayerNorm2d(
        module.normalized_shape[0],
        eps=module.eps,
        affine=module.elementwise_affine,
        bias=module.bias is not None,
        **module_factory_kwargs(module),
    )


def _layer_norm_no_bias(module: TimmLayer) -> nln.LayerNorm:
    return nln.LayerNorm(
        module.normalized_shape,
        eps=module.eps,
        elementwise_affine=module.elementwise_affine,
        bias=module.bias is not None,
        **module_factory_kwargs(module),
    )


#: timm class name → the builder of its normlab twin (or of the reason there is none)
_FROM_TIMM: dict[str, Callable[[TimmLayer], nn.Module | str]] = {
    "StdConv2d": _std_conv,
    "StdConv2dSame": _std_conv,
    "ScaledStdConv2d": _scaled_std_conv,
    "ScaledStdConv2dSame": _scaled_std_conv,
    "FilterResponseNormTlu2d": _frn_tlu,
    "FilterResponseNormAct2d": _frn_act,
    "GroupNorm": _group_norm,
    "GroupNorm1": _group_norm,
    "GroupNorm1NoBias": _group_norm,
    "GroupNormAct": _group_norm_act,
    "GroupNorm1Act": _group_norm_act,
    "LayerNorm2dNoBias": _layer_norm2d_no_bias,
    "LayerNormNoBias": _layer_norm_no_bias,
    **{f"EvoNorm2d{v}": _evonorm(v) for v in _EVONORMS},
}


def from_timm_layer(module: nn.Module) -> nn.Module | str | None:
    """The normlab twin of one of timm's layers in the table above (state bit for bit, same
    mode), the reason there is none, or None for a module the table does not cover."""
    if not _is_timm(module):
        return None
    build = _FROM_TIMM.get(type(module).__name__)
    if build is None:
        return None
    twin = build(module)
    if isinstance(twin, str):
        return twin
    twin.load_state_dict(module.state_dict(), strict=True)  # checks the state has the same keys
    twin = adopt(twin, module)  # the very tensors: requires_grad and ties kept
    if type(module).__name__ in _ORIGINS:  # remembered, so that to_torch(timm=True) restores it
        twin.__dict__["_timm_origin"] = type(module).__name__  # a plain attribute, as the surgery markers
    return twin


def _rebuild(cls: type[TimmLayer], module: nn.Module, **kwargs: Any) -> TimmLayer:
    channels = (
        module.num_channels
        if hasattr(module, "num_channels")
        else cast("tuple[int, ...]", module.normalized_shape)[0]  # a LayerNorm's: (C,)
    )
    twin = cls(channels, **kwargs)
    twin._fast_norm = False  # its forward is then F.group_norm / F.layer_norm, as normlab's
    return twin


#: timm classes that become a normlab layer also used for other sources (GroupNorm, LayerNorm2d,
#: LayerNorm): where to find them again and how to build them from that layer.
_ORIGINS: dict[str, tuple[str, Callable[[type[TimmLayer], nn.Module, ModuleFactoryKwargs], TimmLayer]]] = {
    "GroupNorm": (
        "timm.layers",
        lambda cls, m, f: _rebuild(cls, m, num_groups=m.num_groups, eps=m.eps, affine=m.affine, **f),
    ),
    "GroupNorm1": ("timm.layers", lambda cls, m, f: _rebuild(cls, m, eps=m.eps, affine=m.affine, **f)),
    "GroupNorm1NoBias": ("timm.models.metaformer", lambda cls, m, f: _rebuild(cls, m, eps=m.eps, affine=m.affine, **f)),
    "GroupNorm1Act": ("timm.layers", lambda cls, m, f: _rebuild(cls, m, eps=m.eps, affine=m.affine, **f)),
    "LayerNorm2dNoBias": (
        "timm.models.metaformer",
        lambda cls, m, f: _rebuild(cls, m, eps=m.eps, affine=m.elementwise_affine, **f),
    ),
    "LayerNormNoBias": ("timm.models.metaformer", lambda cls, m, f: cls(m.normalized_shape, eps=m.eps, **f)),
}


def _to_origin(module: nn.Module) -> nn.Module | str:
    """The timm class a normlab layer came from (``_timm_origin``), rebuilt around its state."""
    name = cast(str, module._timm_origin)  # the timm class name from_timm_layer recorded
    where, build = _ORIGINS[name]
    try:
        cls = getattr(importlib.import_module(where), name)
    except Exception as err:
        return (
            f"timm is needed for {class_label(module)} -> timm {name} and does not import: {type(err).__name__}: {err}"
        )
    twin: nn.Module = build(cls, module, module_factory_kwargs(module))
    if hasattr(module, "act"):
        twin.act = copy.deepcopy(module.act)
    return twin


def _timm_class(module: nn.Module) -> type[TimmLayer] | str:
    where, name = TIMM_TWINS[type(module)]
    try:
        cls: type[TimmLayer] = getattr(importlib.import_module(where), name)
        return cls
    except Exception as err:  # timm missing, or an import that fails in this environment
        return (
            f"timm is needed for {class_label(module)} -> timm {name} and does not import: {type(err).__name__}: {err}"
        )


def _to_timm(module: nn.Module) -> nn.Module | str:
    if getattr(module, "frozen", False):
        return f"{class_label(module)} is frozen: timm's layer has no frozen flag (unfreeze_norms first)"
    if getattr(module, "_timm_origin", None) in _ORIGINS:
        restored = _to_origin(module)
        if isinstance(restored, str):
            return restored
        restored.load_state_dict(module.state_dict(), strict=True)
        return adopt(restored, module)
    cls = _timm_class(module)
    if isinstance(cls, str):
        return cls
    factory = module_factory_kwargs(module)
    if isinstance(module, nln.ScaledStdConv2d | nln.StdConv2d):
        kwargs: dict[str, object] = dict(gain_init=module.gain_init) if isinstance(module, nln.ScaledStdConv2d) else {}
        if module.same_pad:
            cls = getattr(importlib.import_module("timm.layers"), cls.__name__ + "Same")
        twin = cls(module.in_channels, module.out_channels, **kwargs, **_conv_args(module))
        if isinstance(module, nln.ScaledStdConv2d):
            twin.scale = module.scale
    elif isinstance(module, nln.GroupNormAct):
        if module.inplace:
            return f"{class_label(module)} with inplace=True: timm's GroupNormAct has no in-place mode"
        # torch infers bias as a Parameter from GroupNorm's __init__; it is None with bias=False
        if cast("torch.Tensor | None", module.bias) is None and module.affine:
            return f"{class_label(module)} with bias=False: timm's GroupNormAct always has β"
        twin = cls(module.num_channels, num_groups=module.num_groups, eps=module.eps, affine=module.affine, **factory)
        twin.act = copy.deepcopy(module.act)
    elif isinstance(module, nln.BatchNormAct2d):
        if module.inplace:
            return f"{class_label(module)} with inplace=True: timm's BatchNormAct2d has no in-place mode"
        if cast("torch.Tensor | None", module.bias) is None and module.affine:  # None with bias=False
            return f"{class_label(module)} with bias=False: timm's BatchNormAct2d always has β"
        if not module.unbiased_running_var or module.on_nonfinite != "skip":
            return f"{class_label(module)}: timm's BatchNormAct2d stores the unbiased variance and lets a non-finite batch in"
        twin = cls(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            **factory,
        )
        twin.act = copy.deepcopy(module.act)
    elif isinstance(module, nln.LayerNorm2d):
        if cast("torch.Tensor | None", module.bias) is None and module.elementwise_affine:  # as above
            return f"{class_label(module)} with bias=False: timm's LayerNorm2d always has β"
        twin = cls(module.num_channels, eps=module.eps, affine=module.elementwise_affine, **factory)
        twin._fast_norm = False  # its forward is then F.layer_norm, as normlab's
    elif isinstance(module, nln.FilterResponseNormAct2d):
        twin = cls(module.num_features, eps=module.eps, **factory)
        twin.act = copy.deepcopy(module.act)
    elif isinstance(module, nln.FilterResponseNormTlu2d):
        twin = cls(module.num_features, apply_act=module.apply_act, eps=module.eps, **factory)
    elif type(module).__name__.startswith("EvoNormB"):
        if not module.unbiased_running_var or module.on_nonfinite != "skip":
            return f"{class_label(module)}: timm's EvoNorm stores the unbiased variance and lets a non-finite batch in"
        twin = cls(module.num_features, apply_act=module.apply_act, momentum=module.momentum, eps=module.eps, **factory)
    else:  # the sample family
        kwargs = dict(groups=module.groups, apply_act=module.apply_act, eps=module.eps, **factory)
        twin = cls(module.num_features, **kwargs)
        if hasattr(module, "act"):
            twin.act = copy.deepcopy(module.act)
    twin.load_state_dict(module.state_dict(), strict=True)
    # an instance of timm's (untyped) class: an nn.Module
    return adopt(cast(nn.Module, twin), module)  # the very tensors: requires_grad and ties kept


def to_timm_layers(model: nn.Module, refuse: dict[str, str] | None = None) -> SurgeryResult:
    """Swap, in place on ``model``, each normlab layer that has a timm twin for it; report it.
    ``refuse``: path → what the model passes the layer besides its input (``mask=``), which
    timm's layers do not take: those are skipped."""
    report = SurgeryReport("to_timm")
    refuse = refuse or {}
    for path, module in list(model.named_modules()):
        if type(module) not in TIMM_TWINS and getattr(module, "_timm_origin", None) not in _ORIGINS:
            continue
        if path in refuse:
            report.skip(path, f"it is called with {refuse[path]}: timm's layers take none")
            continue
        twin = _to_timm(module)
        if isinstance(twin, str):
            report.skip(path, twin)
            continue
        model = replace_everywhere(model, module, twin)  # a layer registered twice: under both names
        report.changed(path, "replaced", class_label(module), class_label(twin))
    return SurgeryResult(model, report)
