"""Walking and rewriting module trees: paths, replacement, classification of norm layers,
and what a layer swap must carry over besides the state_dict."""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar, cast

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .. import nn as nln

__all__ = [
    "NormInfo",
    "adopt",
    "thaw",
    "call_model",
    "class_label",
    "compared",
    "copy_model",
    "describe_norm",
    "eval_max_abs_diff",
    "evaluating",
    "hand_over_hooks",
    "is_normalization_layer",
    "layer_template",
    "module_factory_kwargs",
    "named_like_a_norm",
    "normalization_layers",
    "output_tensors",
    "rebuild",
    "replace_module",
    "replace_everywhere",
    "run_copy",
    "shared_parameters",
    "watch_calls",
    "unrecognized_norm_note",
]


#: a module type that a function hands back as it was given (with what it did to it)
M = TypeVar("M", bound=nn.Module)


def class_label(module: nn.Module) -> str:
    """'torch.nn.BatchNorm2d', 'normlab.nn.GroupNorm', or module.Class for anything else."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn."):
        return f"torch.nn.{cls.__name__}"
    if cls.__module__.startswith("normlab.nn."):
        return f"normlab.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy: surgery never modifies the model it was given."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    try:
        return copy.deepcopy(model)
    except RuntimeError as err:  # torch's refusal to copy a non-leaf tensor held as an attribute
        raise ValueError(
            f"{type(model).__name__} cannot be copied, and surgery never modifies the model it is given: "
            f"{str(err).strip().splitlines()[0]} (torch.nn.utils.weight_norm leaves such a tensor: use "
            "torch.nn.utils.parametrizations.weight_norm, or remove_weight_norm first)"
        ) from err


def call_model(model: nn.Module, example_input: Any) -> Any:
    """model(x), model(*x) for a tuple/list, model(**x) for a dict."""
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def output_tensors(output: object) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) model output."""
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, without gradients; afterwards every module has its own training
    flag back (``model.train(was)`` would flatten a model whose BatchNorms were put in eval)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in flags:
            m.training = training


def run_copy(model: nn.Module, example_input: Any, hooks: Callable[[nn.Module], None] | None = None) -> Any:
    """``model``'s eval output on ``example_input``, computed by a copy: a forward run to look
    at a model must not move whatever state its modules keep across calls (a quantization
    observer updates in eval too). ``hooks(copy)`` may register hooks on the copy first (its
    module paths are the model's)."""
    scratch = copy.deepcopy(model)
    if hooks is not None:
        hooks(scratch)
    with evaluating(scratch):
        return call_model(scratch, example_input)


#: what :func:`watch_calls` shows of each call: the module's path, the module, and the
#: positional and keyword arguments it is called with
CallWatcher = Callable[[str, nn.Module, tuple[Any, ...], dict[str, Any]], None]


def watch_calls(model: nn.Module, example_input: Any, is_target: Callable[[nn.Module], bool], see: CallWatcher) -> None:
    """One eval forward of ``model`` on ``example_input`` in a copy (:func:`run_copy`), with
    ``see(path, module, args, kwargs)`` called before each call of a module ``is_target``
    picks (its path is the model's): how surgery learns what a layer is called with."""

    def watch(scratch: nn.Module) -> None:
        for path, m in scratch.named_modules():
            if is_target(m):
                m.register_forward_pre_hook(functools.partial(see, path), with_kwargs=True)

    run_copy(model, example_input, watch)


def eval_max_abs_diff(a: nn.Module, b: nn.Module, example_input: Any) -> float | None:
    """Max |a(x) − b(x)| over all output tensors, both in eval mode, neither modified; None
    where the outputs hold no values (the meta device)."""
    outputs = [output_tensors(run_copy(model, example_input)) for model in (a, b)]
    if any(t.is_meta for t in outputs[0] + outputs[1]):
        return None
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(*outputs)), default=0.0)


def compared(max_abs_diff: float | None) -> str:
    """What a report's check says of an output comparison on example_input."""
    if max_abs_diff is None:
        return "outputs not compared: the model is on the meta device (no values)"
    return "outputs compared on example_input"


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``path`` inside ``root`` (or return it if path is the root)."""
    if path == "":
        return new
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
    return root


def replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever ``old`` is registered inside ``root`` — a module registered
    under two names (tied) stays one module — and return the root (``new`` if ``old`` was
    the root)."""
    paths = [p for p, m in root.named_modules(remove_duplicate=False) if m is old]
    for path in paths:
        root = replace_module(root, path, new)
    return root


def shared_parameters(root: nn.Module) -> dict[int, list[str]]:
    """id(parameter) → the paths of every module that holds it, for parameters that more
    than one module holds (tied weights). A module registered under two names counts once."""
    owners: dict[int, list[str]] = {}
    for path, module in root.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(path)
    return {k: v for k, v in owners.items() if len(v) > 1}


class ModuleFactoryKwargs(TypedDict, total=False):
    """The ``device=``/``dtype=`` a module's tensors have, for a replacement's constructor:
    both, or neither where the module holds no floating tensor."""

    device: torch.device
    dtype: torch.dtype


def module_factory_kwargs(module: nn.Module) -> ModuleFactoryKwargs:
    """device/dtype of a module's first floating parameter or buffer."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def conv_config(module: nn.Conv2d) -> dict[str, Any]:
    """A conv's constructor arguments after its channel counts (kernel size, stride, padding,
    dilation, groups, whether it has a bias) and its device/dtype: a twin built from them has
    the same configuration."""
    return dict(
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=module.bias is not None,
        **module_factory_kwargs(module),
    )


@dataclass(frozen=True)
class NormInfo:
    """A channel norm layer seen through one lens, whichever library it comes from.

    kind: "batch", "instance", "group", "frozen", "batch_renorm"
    spatial_rank: from the class name (1d → 1 for (N, C, L)), or None where it does not say
    """

    kind: str
    spatial_rank: int | None
    channels: int
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    momentum: float | None
    source: str  # "normlab" or "torch" or "other"


_SPATIAL_RANK_BY_SUFFIX = {"1d": 1, "2d": 2, "3d": 3}


def _spatial_rank_from_name(module: nn.Module) -> int | None:
    return _SPATIAL_RANK_BY_SUFFIX.get(type(module).__name__[-2:])


def describe_norm(module: nn.Module) -> NormInfo | None:
    """NormInfo for channel norm layers (BatchNorm, InstanceNorm, GroupNorm, frozen,
    BatchRenorm — normlab's or torch.nn's); None for anything else, LayerNorm and
    RMSNorm included (they normalize trailing dims, not channels)."""
    kind = _channel_norm_kind(module)
    if kind is None:
        return None
    library = type(module).__module__
    return NormInfo(
        *kind,
        eps=float(getattr(module, "eps", None) or 0.0),  # RMSNorm's eps may be None; a channel norm's never is
        weight=getattr(module, "weight", None),
        bias=getattr(module, "bias", None),
        running_mean=getattr(module, "running_mean", None),
        running_var=getattr(module, "running_var", None),
        num_batches_tracked=getattr(module, "num_batches_tracked", None),
        momentum=getattr(module, "momentum", None),
        source="normlab" if library.startswith("normlab.") else ("torch" if library.startswith("torch.") else "other"),
    )


def _channel_norm_kind(module: nn.Module) -> tuple[str, int | None, int] | None:
    """NormInfo's ``(kind, spatial_rank, channels)`` of a channel norm layer; None for anything else."""
    rank = _spatial_rank_from_name(module)
    if isinstance(module, (nln.BatchRenorm1d, nln.BatchRenorm2d, nln.BatchRenorm3d)):
        return "batch_renorm", rank, module.num_features
    if isinstance(module, (nln.FrozenBatchNorm1d, nln.FrozenBatchNorm2d, nln.FrozenBatchNorm3d)) or (
        type(module).__name__.startswith("FrozenBatchNorm") and hasattr(module, "running_var")
    ):
        # a class of another library, known by its name: running_var is its buffer
        return "frozen", rank, int(cast(torch.Tensor, module.running_var).numel())
    if isinstance(module, (nln.BatchNorm1d, nln.BatchNorm2d, nln.BatchNorm3d, nn.modules.batchnorm._BatchNorm)):
        return "batch", rank if not isinstance(module, nn.SyncBatchNorm) else None, module.num_features
    if isinstance(
        module, (nln.InstanceNorm1d, nln.InstanceNorm2d, nln.InstanceNorm3d, nn.modules.instancenorm._InstanceNorm)
    ):
        return "instance", rank, module.num_features
    if isinstance(module, (nln.GroupNorm, nn.GroupNorm)):
        return "group", None, module.num_channels
    return None


# --- what counts as a normalization layer -------------------------------------------------

# Normalization layers are recognized by class, never by name: torch.nn's and normlab's norm
# classes and their subclasses, and the classes defined in other libraries' normalization
# modules (matched by where the class is defined, so neither library is imported).
_NORM_MODULES = frozenset(
    {
        "torch.nn.modules.normalization",  # LocalResponseNorm, CrossMapLRN2d, LayerNorm, ...
        "timm.layers.norm",
        "timm.layers.norm_act",
        "timm.layers.evo_norm",
        "timm.layers.filter_response_norm",
        "timm.layers.split_batchnorm",
    }
)
_NORM_CLASSES = frozenset({("torchvision.ops.misc", "FrozenBatchNorm2d")})


def is_normalization_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer, decided by what its class is: a torch.nn
    or normlab norm class or a subclass of one, or a class (or subclass of a class) defined
    in timm's normalization modules or torchvision's ``FrozenBatchNorm2d``. A container that
    holds norm layers is not one, whatever it is called."""
    if nln.is_norm_layer(module):
        return True
    return any(
        cls.__module__ in _NORM_MODULES or (cls.__module__, cls.__name__) in _NORM_CLASSES
        for cls in type(module).__mro__
    )


def normalization_layers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) for every normalization layer, each module once (at its first path)."""
    for path, module in list(root.named_modules()):
        if is_normalization_layer(module):
            yield path, module


def named_like_a_norm(module: nn.Module) -> bool:
    """A leaf module whose class name says "norm" but whose class normlab does not recognize
    (a model's own RMSNorm, say): worth a note, since normlab cannot know what it computes."""
    return (
        "norm" in type(module).__name__.lower()
        and not is_normalization_layer(module)
        and not any(True for _ in module.children())
    )


def unrecognized_norm_note(root: nn.Module) -> str | None:
    """A note naming the leaf modules called like norms that normlab left alone, if any."""
    found = [f"{path} ({class_label(m)})" for path, m in root.named_modules() if named_like_a_norm(m)]
    if not found:
        return None
    shown = ", ".join(found[:5]) + (f", and {len(found) - 5} more" if len(found) > 5 else "")
    return (
        f"left alone, not recognized as normalization layers (their classes are no torch.nn, "
        f"normlab or timm norm): {shown}"
    )


# --- what a layer swap keeps ---------------------------------------------------------------

# Attributes surgery leaves on a normlab layer that stands in for another class, so that a later
# transform can go back. They live in the instance __dict__ (not as submodules or buffers): no
# state_dict key, no named_modules entry, and a deepcopy copies them with the model.
#: the layer (as a template) that a normlab layer stands in for while frozen
ORIGINAL = "_normlab_original"
#: the layer (as a template) that convert_sync_batchnorm replaced
SYNC_FROM = "_normlab_sync_from"
_MARKERS = (ORIGINAL, SYNC_FROM)
_FREEZE_STATE = ("frozen", "frozen_affine", "_requires_grad_before_freeze")
_NORMLAB_OPTIONS = ("unbiased_running_var", "on_nonfinite")


def thaw(layer: nln.FreezableNorm) -> None:
    """Unfreeze ``layer``, restoring γ/β's ``requires_grad`` only where the freeze set it (a
    freeze with affine): a freeze of statistics alone never touched it, and whatever it is now
    — set since, or through a tied parameter — stays."""
    if layer.frozen_affine:
        layer.unfreeze()
    else:
        for name in _FREEZE_STATE:
            layer.__dict__.pop(name, None)  # back to the class defaults: not frozen


def layer_template(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every parameter and buffer on the meta device: its class and
    configuration without its memory, from which :func:`rebuild` makes the layer again."""
    memo: dict[int, object] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def rebuild(template: M, current: nn.Module, *, drop: tuple[str, ...] = ()) -> M:
    """The layer of ``template``'s class and configuration holding ``current``'s state (its very
    tensors: see :func:`adopt`)."""
    restored = copy.deepcopy(template)
    device = next(itertools.chain(current.parameters(), current.buffers()), torch.empty(0)).device
    restored.to_empty(device=device)
    return adopt(restored, current, drop=drop)


# A module's hook registries. The dicts themselves are handed over, so that a handle taken on the
# replaced layer (of the same copy) still removes its hook; a registry the new class fills itself
# keeps its own entries too.
_HOOK_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def hand_over_hooks(new: nn.Module, old: nn.Module) -> None:
    """The hooks registered on ``old`` run on ``new``: a user's probe, or a hook that changes
    the output, is part of what the model computes."""
    for name in _HOOK_REGISTRIES:
        theirs, mine = old.__dict__.get(name), new.__dict__.get(name)
        if not theirs or mine is None:
            continue
        if mine:
            mine.update(theirs)
        else:
            new.__dict__[name] = theirs
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook
    if old._forward_hooks or old._forward_pre_hooks:
        # a hook may use modules attached to the layer (quantization's observer): they go along
        for name, child in old._modules.items():
            if name not in new._modules and not hasattr(new, name):
                new.add_module(name, child)


def adopt(new: M, old: nn.Module, *, drop: tuple[str, ...] = (), options: bool = True) -> M:
    """Give a freshly built ``new`` layer everything of ``old`` that a swap must keep, and return it.

    - The parameter and buffer *objects* wherever name and shape agree (values are
      loaded first where the two state_dicts have the same keys): ``requires_grad``, tied
      parameters and the values all stay as they were.
    - Each submodule's ``training`` flag and hooks (forward, backward, state-dict).
    - The frozen state (flag, affine flag, the ``requires_grad`` to restore) and normlab's
      options (``unbiased_running_var``, ``on_nonfinite``) where both layers have them
      (``options=False``: not the options).
    - The surgery markers, except those in ``drop``.
    """
    if set(new.state_dict()) == set(old.state_dict()):
        new.load_state_dict(old.state_dict(), strict=True)
    new_modules = dict(new.named_modules())
    for path, old_module in old.named_modules():
        target = new_modules.get(path)
        if target is None:
            continue
        target.training = old_module.training
        hand_over_hooks(target, old_module)
        for kind in ("_parameters", "_buffers"):
            slots, old_slots = getattr(target, kind), getattr(old_module, kind)
            for name, tensor in old_slots.items():
                mine = slots.get(name)
                if tensor is not None and mine is not None and mine.shape == tensor.shape:
                    slots[name] = tensor
    layer: nn.Module = new  # mypy narrows a Module by isinstance, not the type variable M
    if isinstance(layer, nln.FreezableNorm) and isinstance(old, nln.FreezableNorm):
        for name in _FREEZE_STATE:
            if name in old.__dict__:
                new.__dict__[name] = copy.copy(old.__dict__[name])
            else:
                new.__dict__.pop(name, None)
    if options:
        for name in _NORMLAB_OPTIONS:
            if hasattr(new, name) and hasattr(old, name):
                setattr(new, name, getattr(old, name))
    for name in _MARKERS:
        if name in old.__dict__ and name not in drop and isinstance(layer, nln.FreezableNorm):
            new.__dict__[name] = old.__dict__[name]
        else:
            new.__dict__.pop(name, None)
    return new
