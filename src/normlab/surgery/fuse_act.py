"""A norm followed by its activation, folded into normlab's fused layer (``from_torch(model,
fuse_activations=True)``) and unfolded again (``to_torch``).

A pair is fused only where the fused layer provably computes the same function:

- the norm is normlab's BatchNorm1d/2d/3d or GroupNorm (exactly those classes: a subclass may
  compute something else), the activation a module the fused kernels compute (ReLU, LeakyReLU,
  ELU, SiLU) with no state of its own (PReLU's slopes would move to another state-dict key);
- each of the two is registered once in the model and carries no hooks (a hook on the norm
  would see the activated output);
- the activation's only input is the norm's output, and nothing else reads that output, in
  the data flow ``torch.fx`` traces of the whole model's forward (each module called once, the
  norm's output feeding only the activation, which takes nothing else). Adjacent children of
  a plain ``nn.Sequential`` are candidates too, but only the traced data flow proves them:
  the forward around a Sequential may call its children on their own, slice it, or never
  reach the activation. Where fx cannot trace the model, nothing is fused and every
  candidate is reported with that reason;
- no global module hook is registered (``torch.nn.modules.module.register_module_forward_hook``
  and the like would see the activated output where they saw the norm's).

The norm's place takes the fused layer (the very parameters and buffers, so the state dict is
unchanged) and the activation's place a :class:`FusedActivation`, an identity that remembers the
activation so that ``to_torch`` can put it back. Everything else is left as it is; the report
lists each norm → activation pair that was found and not fused, with the reason.
"""

from __future__ import annotations

import copy

from torch import nn

from .. import nn as nln
from .modules import adopt, class_label, is_normalization_layer, replace_module
from .report import SurgeryReport
from .tracing import find_pairs

__all__ = ["FusedActivation", "fuse_norm_activations", "unfuse_norm_activations"]

#: normlab norm class → its fused norm + activation class (the same constructor and state).
FUSED_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nln.BatchNorm1d: nln.BatchNormAct1d,
    nln.BatchNorm2d: nln.BatchNormAct2d,
    nln.BatchNorm3d: nln.BatchNormAct3d,
    nln.GroupNorm: nln.GroupNormAct,
}
_UNFUSED_CLASS = {fused: plain for plain, fused in FUSED_CLASS.items()}

_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


class FusedActivation(nn.Identity):
    """Where an activation was before :func:`normlab.surgery.from_torch` fused it into the
    norm before it: the identity (the fused layer applies the activation). It holds the
    original activation module, unregistered (no state, no parameters), for
    :func:`normlab.surgery.to_torch`, and the fused layer it went into.

    Args:
        activation: the torch.nn activation module that was fused (kept, not registered).
        fused_into: the fused norm + activation layer that now applies it.
    """

    # plain instance attributes (set in __init__ through __dict__), declared for the type checker
    activation: nn.Module
    fused_into: nn.Module

    def __init__(self, activation: nn.Module, fused_into: nn.Module) -> None:
        super().__init__()
        # plain attributes, not submodules: the state dict and the module tree stay those of
        # an identity, and a deep copy of the model keeps pointing at its own fused layer
        self.__dict__["activation"] = activation
        self.__dict__["fused_into"] = fused_into

    def extra_repr(self) -> str:
        return f"fused into the norm before it: {self.activation!r}"


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def _refusal(norm: nn.Module, act: nn.Module, counts: dict[int, int]) -> str:
    """Why (norm, act) cannot be fused, "" where it can (apart from the data flow)."""
    if type(norm) not in FUSED_CLASS:
        return f"{class_label(norm)} has no fused norm + activation form"
    try:
        name, _ = nln.activation_spec(act)
    except ValueError as error:
        return str(error)
    if name == "identity":
        return "the activation is an identity"
    if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
        return f"{class_label(act)} holds state (its slopes): fusing would move it to another state-dict key"
    if counts.get(id(norm), 0) > 1 or counts.get(id(act), 0) > 1:
        return "the norm or the activation is registered more than once in the model"
    if _has_hooks(norm) or _has_hooks(act):
        return "the norm or the activation has hooks, which would see another tensor once fused"
    if getattr(norm, "frozen", False):
        return "the norm is frozen"
    return ""


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(norm path, activation path) for a norm layer followed by a torch.nn activation among the
    children of a plain nn.Sequential (the pairs that cannot be fused are reported)."""
    pairs = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            continue
        children = list(module.named_children())
        for (norm_name, norm), (act_name, act) in zip(children, children[1:]):
            if is_normalization_layer(norm) and _is_activation(act):
                prefix = f"{path}." if path else ""
                pairs.append((prefix + norm_name, prefix + act_name))
    return pairs


def _global_hooks() -> bool:
    """Whether a hook registered for every module (torch.nn.modules.module's globals) exists."""
    from torch.nn.modules import module as torch_module

    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(getattr(torch_module, name, None) for name in names)


def _is_activation(module: nn.Module) -> bool:
    """torch.nn's activation modules, fused or not (those the fused layers lack are reported)."""
    return type(module).__module__ == "torch.nn.modules.activation"


def fuse_norm_activations(model: nn.Module, report: SurgeryReport) -> nn.Module:
    """Fuse, in ``model`` itself (a copy the caller made), every provable norm → activation
    pair; each fused pair and each refused one goes into ``report``."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    candidates = dict(_sequential_pairs(model))  # norm path → activation path
    flow: dict[str, str] = {}  # norm path → why the data flow does not prove its pair
    if _global_hooks():
        why = "a global module hook is registered, which would see the activated output where it saw the norm's"
        flow = dict.fromkeys(candidates, why)
    else:
        try:
            search = find_pairs(model, lambda m: type(m) in FUSED_CLASS, _is_activation)
        except ValueError as error:  # fx cannot trace this forward: nothing proves a pair
            why = (
                "torch.fx cannot trace the model's forward, so nothing proves the pair is only called as "
                f"norm then activation ({str(error).split(';')[0]})"
            )
            flow = dict.fromkeys(candidates, why)
            report.notes.append(f"fuse_activations: nothing fused: {why}")
        else:
            for norm_path, act_path in search.pairs:
                candidates.setdefault(norm_path, act_path)
            # an activation a fusable norm feeds, but not it alone (or one of them runs twice)
            refused = {act: why for act, why in search.skipped.items() if not why.startswith("its input comes from")}
            for act_path in sorted(set(refused) - set(candidates.values())):
                report.skip(act_path, f"not fused into the norm before it: {refused[act_path]}")
            for norm_path, act_path in candidates.items():
                if act_path in refused:
                    flow[norm_path] = refused[act_path]
                elif (norm_path, act_path) in search.pairs:
                    continue
                elif act_path in search.seen:
                    flow[norm_path] = "its input is not only this norm's output"
                else:  # adjacent in a Sequential, but the traced forward never runs them as a pair
                    flow[norm_path] = "the traced forward does not call the activation on this norm's output"
    for norm_path, act_path in candidates.items():
        norm, act = model.get_submodule(norm_path), model.get_submodule(act_path)
        why = _refusal(norm, act, counts) or flow.get(norm_path, "")
        if why:
            report.skip(norm_path, f"not fused with {act_path}: {why}")
            continue
        fused = _fused_twin(norm, act)
        model = replace_module(model, norm_path, fused)
        model = replace_module(model, act_path, FusedActivation(act, fused))
        report.changed(
            norm_path, "fused", f"{class_label(norm)} + {class_label(act)}", class_label(fused), activation_at=act_path
        )
    return model


def _fused_twin(norm: nn.Module, act: nn.Module) -> nn.Module:
    """The fused layer of ``norm``'s configuration and ``act``'s activation, holding the
    norm's very parameters and buffers (its state dict: the norm's)."""
    from .interop import _constructor_args  # interop imports this module

    activation, param = nln.activation_spec(act)
    args, kwargs = _constructor_args(norm)
    fused = FUSED_CLASS[type(norm)](*args, **kwargs, activation=activation, activation_param=param)
    return adopt(fused, norm)


def unfuse_norm_activations(model: nn.Module, report: SurgeryReport) -> tuple[nn.Module, set[int]]:
    """Undo :func:`fuse_norm_activations` in ``model`` itself (a copy): each
    :class:`FusedActivation` gets its activation back and the fused layer it points to becomes
    the plain normlab norm again. Returns the model and the ids of the norms so restored."""
    from .interop import twin_of  # interop imports this module

    restored: set[int] = set()
    placeholders = [(p, m) for p, m in model.named_modules() if isinstance(m, FusedActivation)]
    by_module = {id(m): p for p, m in model.named_modules()}
    for act_path, placeholder in placeholders:
        fused = placeholder.fused_into
        norm_path = by_module.get(id(fused))
        if norm_path is None or type(fused) not in _UNFUSED_CLASS:
            report.skip(act_path, "the fused layer it belongs to is no longer in the model")
            continue
        act = placeholder.activation
        name, param = nln.activation_spec(act)
        if name != fused.activation or (param is not None and param != fused.activation_param):
            report.skip(act_path, f"the fused layer's activation was changed to {fused.activation!r} since")
            continue
        plain = twin_of(fused, _UNFUSED_CLASS[type(fused)])
        model = replace_module(model, norm_path, plain)
        model = replace_module(model, act_path, copy.deepcopy(act))
        restored.add(id(plain))
        report.changed(norm_path, "unfused", class_label(fused), f"{class_label(plain)} + {class_label(act)}")
    return model, restored
