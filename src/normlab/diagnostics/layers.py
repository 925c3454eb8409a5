"""Which layers a Probe watches, and what their outputs hold: layer selection, the dim
of an output that holds its units, the dead-unit rule of a (fused) activation."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import cast

import torch
from torch import nn

from .. import nn as nln
from .summaries import ACTIVATIONS, DeadRule, dead_unit_rule

__all__ = ["DEFAULT_LAYER_TYPES", "LayerSpec", "select_layers", "unit_dims"]

#: The layers with a weight that transforms activations (linear and convolutional).
WEIGHT_LAYERS: tuple[type, ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

#: What a Probe watches when not told otherwise: layers that transform activations.
DEFAULT_LAYER_TYPES: tuple[type, ...] = (*WEIGHT_LAYERS, *ACTIVATIONS)

#: What :func:`select_layers` (and a Probe's ``layers``) takes: a class or classes, a name,
#: names or fnmatch patterns, a predicate ``f(name, module)``, or None for the default.
LayerSpec = type | Iterable[type] | Iterable[str] | Callable[[str, nn.Module], bool] | None

#: Layers whose output is act(norm(x)), with the activation a child module ``act``.
FUSED_NORM_ACT: tuple[type, ...] = (
    nln.BatchNormAct1d,
    nln.BatchNormAct2d,
    nln.BatchNormAct3d,
    nln.GroupNormAct,
    nln.SyncBatchNormAct,
    nln.FilterResponseNormAct2d,
)

# torch.compile's wrapper keeps the original model as this child; names are shown without it.
_COMPILED_CHILD = "_orig_mod"


def display_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != _COMPILED_CHILD)


def _never_called(model: nn.Module) -> set[int]:
    """Submodules not watched by default because their own forward is never called or
    their output is not the layer's: MultiheadAttention passes ``out_proj.weight`` to a
    functional; a fused norm + activation layer applies its ``act`` inside its kernel (its
    own output is the activation's); EvoNorm uses its ``act`` inside the formula."""
    skipped = set()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            skipped.add(id(module.out_proj))
        act = getattr(module, "act", None)
        if nln.is_norm_layer(module) and isinstance(act, nn.Module):
            skipped.add(id(act))
    return skipped


def select_layers(model: nn.Module, layers: LayerSpec = None) -> dict[str, nn.Module]:
    """Modules of ``model`` to watch, by type (a class or tuple of classes), by name
    (exact names or fnmatch patterns such as ``"layers.*.conv1"``), or by a predicate
    ``f(name, module)``. The default is every Linear/Conv, activation and norm layer,
    except submodules whose forward is never called (MultiheadAttention's ``out_proj``,
    a fused norm + activation layer's ``act``). Names leave out torch.compile's
    ``_orig_mod``, so a compiled model's layers have the names of the original's.

    Args:
        model: the model whose submodules are chosen.
        layers: a class or tuple of classes, names or patterns, a predicate, or None for the
            default. Default None.

    Returns:
        Name → module, in ``model.named_modules()`` order.

    Raises:
        ValueError: ``layers`` matches no module.
        TypeError: ``layers`` of another kind.
    """
    named = [(display_name(n), m) for n, m in model.named_modules()]
    named = [(n, m) for n, m in named if n]
    if layers is None:
        skipped = _never_called(model)
        chosen = [
            (n, m)
            for n, m in named
            if (isinstance(m, DEFAULT_LAYER_TYPES) or nln.is_norm_layer(m)) and id(m) not in skipped
        ]
    elif callable(layers) and not isinstance(layers, type):
        chosen = [(n, m) for n, m in named if layers(n, m)]
    else:
        items = (layers,) if isinstance(layers, (type, str)) else tuple(layers)
        if items and all(isinstance(i, type) for i in items):
            classes = cast("tuple[type, ...]", items)  # each checked just above
            chosen = [(n, m) for n, m in named if isinstance(m, classes)]
        elif items and all(isinstance(i, str) for i in items):
            patterns = cast("tuple[str, ...]", items)  # each checked just above
            chosen = [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        else:
            raise TypeError("layers must be types, names/patterns, or a predicate f(name, module)")
    if not chosen:
        raise ValueError(f"no layer of {type(model).__name__} matches layers={layers!r}")
    return dict(chosen)


def _unit_axis(module: nn.Module) -> int | None:
    """Where a layer's output keeps its units: dim 1 for channels-first layers (conv,
    BatchNorm, GroupNorm, InstanceNorm, LayerNorm2d, FRN, EvoNorm, SwitchableNorm), the
    last dim for feature-last ones (Linear, LayerNorm, RMSNorm, ScaleNorm, Embedding,
    attention, RNN/LSTM/GRU, transformer layers), DyT and Derf as their ``channels_last`` says; None for layers that keep
    their input's layout (activations, pooling, dropout, ...)."""
    if isinstance(module, nln.LayerNorm2d):
        return 1
    if isinstance(module, (nln.DyT, nln.Derf)):
        return -1 if module.channels_last else 1
    if isinstance(module, nln.ScaleNorm):
        return -1  # over the trailing dims, as LayerNorm
    if isinstance(module, (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)):
        return -1
    if isinstance(module, (nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return -1  # (batch, time, hidden) or (time, batch, hidden): hidden units last either way
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return -1
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1
    if nln.is_norm_layer(module):
        return 1  # normlab's other norms (frozen BatchNorm, ...) are channels-first
    return None


def unit_dims(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, int]:
    """For each layer of ``layers`` whose dead fraction can be measured, the dim of its
    output that holds the units: its own (a fused norm + activation layer) or that of the
    nearest layer before it in ``model`` that fixes one — dim 1 after a conv or
    BatchNorm, the last dim after a Linear or LayerNorm, so a ReLU on a (batch, time,
    features) output counts features, not time steps. Layers with no such layer before
    them are left out: on a 3-D or larger output their units are unknown (2-D outputs
    have one answer).

    Args:
        model: the model the layers belong to (its module order is read).
        layers: name → module, as :func:`select_layers` returns.

    Returns:
        Name → the dim of its output that holds the units.
    """
    out: dict[str, int] = {}
    last = None
    for name, module in model.named_modules():
        name = display_name(name)
        own = _unit_axis(module)
        if name in layers:
            axis = own if own is not None else last
            if axis is not None:
                out[name] = axis
        if own is not None:
            last = own
    return out


def dead_rule_of(module: nn.Module) -> DeadRule | None:
    if isinstance(module, FUSED_NORM_ACT):
        # Its output is act(norm(x)), but its input is not the activation's: only a rule
        # that reads the output applies.
        # the fused layers hold their activation as the child ``act``; nn.Module's
        # __getattr__ types a child as Tensor | Module
        rule = dead_unit_rule(cast(nn.Module, module.act))
        return rule if rule is not None and rule.source == "output" else None
    return dead_unit_rule(module)


def first_tensor(out: object) -> torch.Tensor | None:
    """The tensor a layer's output is recorded by: itself, or the first tensor of a tuple
    or list (``AddRMSNorm`` returns ``(normalized, sum)``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    return None


def contains_compiled(model: nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return any(isinstance(m, OptimizedModule) for m in model.modules())
