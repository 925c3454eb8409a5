"""torch.nn ↔ normlab: swap layers for their twins, state bit for bit; Keras/Flax import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import nn

from .. import nn as nln
from ..core import from_decay_convention
from .fuse_act import FusedActivation, fuse_norm_activations, unfuse_norm_activations
from .modules import (
    ORIGINAL,
    SYNC_FROM,
    adopt,
    class_label,
    copy_model,
    is_normalization_layer,
    module_factory_kwargs,
    replace_everywhere,
    unrecognized_norm_note,
)
from .report import SurgeryReport, SurgeryResult
from .timm_layers import from_timm_layer, has_timm_twin, to_timm_layers
from .tracing import extra_arguments

__all__ = ["TWINS", "from_torch", "load_decay_statistics", "normlab_twin", "to_torch", "twin_of"]

#: torch.nn class → normlab class with the same constructor, parameters and buffers.
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nln.BatchNorm1d,
    nn.BatchNorm2d: nln.BatchNorm2d,
    nn.BatchNorm3d: nln.BatchNorm3d,
    nn.InstanceNorm1d: nln.InstanceNorm1d,
    nn.InstanceNorm2d: nln.InstanceNorm2d,
    nn.InstanceNorm3d: nln.InstanceNorm3d,
    nn.GroupNorm: nln.GroupNorm,
    nn.LayerNorm: nln.LayerNorm,
    nn.SyncBatchNorm: nln.SyncBatchNorm,
}
if hasattr(nn, "RMSNorm"):
    TWINS[nn.RMSNorm] = nln.RMSNorm
_TORCH_OF = {v: k for k, v in TWINS.items()}


def _constructor_args(module: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments that rebuild ``module``'s configuration."""
    factory = module_factory_kwargs(module)
    if hasattr(module, "num_groups"):  # GroupNorm
        return (module.num_groups, module.num_channels), dict(
            eps=module.eps, affine=module.affine, bias=module.bias is not None, **factory
        )
    if hasattr(module, "normalized_shape"):
        if hasattr(module, "bias"):  # LayerNorm
            return (module.normalized_shape,), dict(
                eps=module.eps, elementwise_affine=module.elementwise_affine, bias=module.bias is not None, **factory
            )
        return (module.normalized_shape,), dict(  # RMSNorm
            eps=module.eps, elementwise_affine=module.elementwise_affine, **factory
        )
    kwargs = dict(
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        bias=module.bias is not None,
        **factory,
    )
    if hasattr(module, "process_group"):  # SyncBatchNorm
        kwargs["process_group"] = module.process_group
    return (module.num_features,), kwargs  # BatchNorm, InstanceNorm, SyncBatchNorm


class _RunningStatistics(Protocol):
    """A BatchNorm-like layer as load_decay_statistics reads and writes it, whichever library
    it comes from."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    momentum: float | None
    eps: float


def twin_of(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` instance with ``module``'s configuration and mode, holding its very
    parameters and buffers (values bit for bit, ``requires_grad`` and ties kept)."""
    args, kwargs = _constructor_args(module)
    return adopt(cls(*args, **kwargs), module, drop=(ORIGINAL, SYNC_FROM))


def _origin(module: nn.Module) -> str:
    return type(module).__module__.split(".")[0]


def _foreign_twin(module: nn.Module) -> nn.Module | str | None:
    """For a norm layer of another library (timm, torchvision), matched by module and
    class name so neither is imported: its normlab twin (state bit for bit, same mode),
    the reason there is none, or None for a module that is no norm layer."""
    origin, name = _origin(module), type(module).__name__
    beyond = from_timm_layer(module)  # timm's norms beyond the classic five (timm_layers.py)
    if beyond is not None:
        return beyond
    if origin == "timm" and name == "BatchNormAct2d":
        # timm's forward: F.batch_norm exactly as torch.nn.BatchNorm2d, then drop, then act.
        if not isinstance(module.drop, nn.Identity):
            return f"timm BatchNormAct2d with drop layer {type(module.drop).__name__}: the fused layer has none"
        try:
            activation, param = nln.activation_spec(cast(nn.Module, module.act))  # timm's act: a module
        except ValueError as err:
            return str(err)
        if isinstance(module.act, nn.PReLU) and module.act.num_parameters != module.num_features:
            return "timm BatchNormAct2d with a single-slope PReLU: normlab's has one slope per channel"
        args, kwargs = _constructor_args(module)
        twin: nn.Module = nln.BatchNormAct2d(*args, **kwargs, activation=activation, activation_param=param)
    elif origin == "timm" and name == "LayerNorm" and not getattr(module, "_fast_norm", True):
        args, kwargs = _constructor_args(module)  # forward is F.layer_norm, as torch.nn's
        twin = nln.LayerNorm(*args, **kwargs)
    elif origin == "timm" and name == "LayerNorm2d" and not getattr(module, "_fast_norm", True):
        # forward: permute, F.layer_norm over (C,), permute back — LayerNorm2d's map
        layer_norm = cast(nn.LayerNorm, module)  # timm's LayerNorm2d subclasses nn.LayerNorm
        twin = nln.LayerNorm2d(
            layer_norm.normalized_shape[0],
            eps=layer_norm.eps,
            affine=layer_norm.elementwise_affine,
            bias=layer_norm.bias is not None,
            **module_factory_kwargs(module),
        )
    elif origin == "torchvision" and name == "FrozenBatchNorm2d":
        # x·w·rsqrt(var + eps) + (b − mean·w·rsqrt(var + eps)): the same affine map.
        # torchvision's class: weight is a buffer of shape (C,), eps a float
        channels, eps = cast(torch.Tensor, module.weight).shape[0], cast(float, module.eps)
        twin = nln.FrozenBatchNorm2d(channels, eps=eps, **module_factory_kwargs(module))
    elif is_normalization_layer(module):
        return _no_twin_reason(module)
    else:
        return None
    if set(twin.state_dict()) != set(module.state_dict()):  # a version of timm with other state
        return f"{class_label(module)} holds state its normlab twin has no place for"
    return adopt(twin, module)


def normlab_twin(module: nn.Module) -> nn.Module | str | None:
    """For a normalization layer that is not normlab's: its normlab twin (the same
    computation, holding the same parameter and buffer objects, in the same mode), or the
    reason there is none; None for a module that is no normalization layer, or normlab's."""
    if _origin(module) == "normlab":
        return None  # normlab's layers are torch.nn subclasses too; they stay as they are
    cls = TWINS.get(type(module))
    return twin_of(module, cls) if cls is not None else _foreign_twin(module)


def _no_twin_reason(module: nn.Module) -> str:
    cls = type(module)
    if _origin(module) == "timm" and cls.__name__ == "LayerNorm":
        return "timm LayerNorm with fast_norm on: its forward is timm's low-precision kernel"
    if _origin(module) == "timm" and cls.__name__ == "LayerNorm2d":
        return "timm LayerNorm2d with fast_norm on: its forward is timm's low-precision kernel"
    if _origin(module) == "timm" and "LayerNorm2d" in cls.__name__:
        return (
            f"{class_label(module)} normalizes each position over the channels in its own way "
            "(float32 upcast or another formula): no exact normlab twin"
        )
    bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("torch.nn.") and b in TWINS]
    if bases:
        return (
            f"{class_label(module)} subclasses torch.nn.{bases[0].__name__} but has its own "
            "forward or state: no exact normlab twin"
        )
    return f"{class_label(module)} is a normalization layer with no exact normlab twin"


def _swap(
    model: nn.Module, operation: str, twin_fn: Callable[[str, nn.Module], nn.Module | str | None]
) -> SurgeryResult:
    """Replace each module by ``twin_fn(path, module)``: a module, a reason (skipped: a
    normalization layer with no twin) or None (not a module this swap is about). Besides the
    normalization layers, the standardized convolutions have twins."""
    new = copy_model(model)
    report = SurgeryReport(operation)
    for path, module in list(new.named_modules()):
        outcome = twin_fn(path, module)
        if isinstance(outcome, str):
            report.skip(path, outcome)
        elif outcome is not None:
            new = replace_everywhere(new, module, outcome)
            report.changed(path, "replaced", class_label(module), class_label(outcome))
    report.check = "the same parameter and buffer tensors: bit for bit"
    return SurgeryResult(new, report)


def from_torch(model: nn.Module, *, fuse_activations: bool = False) -> SurgeryResult:
    """Swap every torch.nn norm layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm,
    RMSNorm) for its normlab twin, and the layers of other libraries that have one:
    timm's ``BatchNormAct2d`` (for ReLU, LeakyReLU, ELU, SiLU, PReLU or no activation)
    becomes :class:`normlab.nn.BatchNormAct2d`, timm's ``LayerNorm`` and ``LayerNorm2d``
    (fast_norm off) :class:`normlab.nn.LayerNorm` and :class:`normlab.nn.LayerNorm2d`,
    torchvision's ``FrozenBatchNorm2d``
    :class:`normlab.nn.FrozenBatchNorm2d`. The twins hold the very parameter and buffer
    tensors (values bit for bit, ``requires_grad`` and tied parameters kept) and the
    ``training`` flag. Every other normalization layer (a subclass of a torch.nn norm, whose
    forward may differ; timm's LayerNorm2dFp32, EvoNorm, ...) is left as it is and listed in
    ``report.skipped`` with the reason; normlab layers are left alone. Normalization layers
    are recognized by class (:func:`normlab.surgery.modules.is_normalization_layer`), never
    by name; leaf modules merely named like norms are named in a note.

    ``fuse_activations=True``: then each norm followed by its activation (BatchNorm or
    GroupNorm → ReLU, LeakyReLU, ELU or SiLU) becomes one fused layer (``BatchNormAct*``,
    ``GroupNormAct``) where that is provably the same function — adjacent in an
    ``nn.Sequential``, or, in other forward code, where ``torch.fx`` shows the activation
    takes the norm's output and nothing else does; the activation's place holds a
    :class:`~normlab.surgery.fuse_act.FusedActivation` (an identity), so the state dict is
    unchanged, and :func:`to_torch` splits the pair again. Pairs that cannot be fused are
    listed in ``report.skipped`` with the reason.

    Args:
        model: the model; it is not modified.
        fuse_activations: keyword-only; fuse norm → activation pairs as above. Default False.

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: a copy with normlab's layers, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.
    """
    result = _swap(model, "from_torch", lambda path, module: normlab_twin(module))
    if fuse_activations:
        result = SurgeryResult(fuse_norm_activations(result.model, result.report), result.report)
    for change in result.report.changes:
        layer = model.get_submodule(change.path)
        if (
            type(layer) in TWINS
            and isinstance(layer, nn.modules.instancenorm._InstanceNorm)
            and layer.track_running_stats
        ):
            result.report.notes.append(
                f"{change.path}: normlab's InstanceNorm counts num_batches_tracked"
                + (" and, with momentum=None, updates a cumulative average" if layer.momentum is None else "")
                + " (torch.nn's does not)"
            )
    note = unrecognized_norm_note(model)
    if note:
        result.report.notes.append(note)
    return result


def _torch_incompatible(module: nn.Module) -> str | None:
    if getattr(module, "frozen", False):
        return "frozen: torch.nn has no frozen flag (unfreeze_norms first, or keep normlab)"
    return None


def _torch_twin(module: nn.Module) -> nn.Module | str | None:
    if _origin(module) != "normlab" or not is_normalization_layer(module):
        return None
    cls = _TORCH_OF.get(type(module))
    if cls is not None:
        return _torch_incompatible(module) or twin_of(module, cls)
    timm_hint = "; timm has one: to_torch(model, timm=True)" if has_timm_twin(module) else ""
    if hasattr(module, "activation"):
        return f"{class_label(module)}: torch.nn has no fused norm+activation layer{timm_hint}"
    return f"{class_label(module)}: torch.nn has no such layer{timm_hint}"


def to_torch(model: nn.Module, example_input: Any = None, *, timm: bool = False) -> SurgeryResult:
    """Swap every normlab twin back for its torch.nn class (state bit for bit).

    ``timm=True``: normlab layers that have a timm twin and no torch.nn one (BatchNormAct2d,
    GroupNormAct, LayerNorm2d, StdConv2d, ScaledStdConv2d, FilterResponseNorm*, EvoNorm*)
    become timm's classes first (timm is imported for it), so a model that ``from_torch`` took
    from timm goes back to timm's layers.

    torch.nn's (and timm's) layers take no ``mask=``: a layer the model calls with one is
    skipped. Such calls are found with ``torch.fx``, or — where fx cannot trace the model — by
    one forward on ``example_input`` (without it, a note says they could not be looked for).

    Options torch.nn lacks are reported as notes: ``unbiased_running_var=False``,
    ``on_nonfinite``, and InstanceNorm's ``momentum=None`` (torch.nn then never updates
    the running estimates). Frozen layers, and normlab layers torch.nn has no class for
    (BatchNormAct, GroupNormAct, BatchRenorm, FrozenBatchNorm, SyncBatchNormAct), are
    skipped and listed with the reason. normlab's SyncBatchNorm becomes
    ``torch.nn.SyncBatchNorm``, which trains only on a GPU once a process group exists.

    Args:
        model: the model; it is not modified.
        example_input: an input for one forward pass (on a copy), to find the layers called
            with a mask where ``torch.fx`` cannot trace the model. Default None.
        timm: keyword-only; convert layers that only timm has a class for to timm's (needs
            timm installed). Default False.

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: a copy with torch.nn's (and, with ``timm``, timm's) layers, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.
    """
    unfused = None
    if any(isinstance(m, FusedActivation) for m in model.modules()):  # from_torch(..., fuse_activations=True)
        unfused = SurgeryReport("to_torch")
        model, _ = unfuse_norm_activations(copy_model(model), unfused)
    masked = extra_arguments(model, lambda m: _origin(m) == "normlab" and is_normalization_layer(m), example_input)
    to_timm = to_timm_layers(copy_model(model), refuse=masked or {}) if timm else None

    def twin(path: str, module: nn.Module) -> nn.Module | str | None:
        if masked is not None and path in masked and type(module) in _TORCH_OF:
            return f"it is called with {masked[path]}: torch.nn's {_TORCH_OF[type(module)].__name__} takes none"
        return _torch_twin(module)

    result = _swap(to_timm.model if to_timm is not None else model, "to_torch", twin)  # not None: timm=True
    if to_timm is not None:
        result.report.operation = "to_torch(timm=True)"
        result.report.changes[:0] = to_timm.report.changes
        refused = {s.path for s in to_timm.report.skipped}  # said once, with timm's reason
        result.report.skipped = to_timm.report.skipped + [s for s in result.report.skipped if s.path not in refused]
    if unfused is not None:
        result.report.changes[:0] = unfused.changes
        result.report.skipped[:0] = unfused.skipped
    if masked is None and result.report.changes:
        result.report.notes.append(
            "torch.fx cannot trace this model, so calls with mask= (which torch.nn's layers do not take) "
            "were not looked for: pass example_input"
        )
    for path, module in model.named_modules():
        if type(module) not in _TORCH_OF or _torch_incompatible(module):
            continue
        if getattr(module, "unbiased_running_var", True) is False:
            result.report.notes.append(f"{path}: torch.nn stores the unbiased running variance")
        if (
            isinstance(module, (nln.InstanceNorm1d, nln.InstanceNorm2d, nln.InstanceNorm3d))
            and module.track_running_stats
            and module.momentum is None
        ):
            result.report.notes.append(f"{path}: torch.nn's InstanceNorm ignores momentum=None and stops updating")
        if isinstance(module, nln.SyncBatchNorm):
            result.report.notes.append(
                f"{path}: torch.nn.SyncBatchNorm refuses CPU tensors in training once a process group exists"
            )
    if result.report.changes:
        result.report.notes.append("torch.nn layers let a non-finite batch into the running statistics")
    return result


def load_decay_statistics(
    module: nn.Module,
    *,
    moving_mean: torch.Tensor,
    moving_variance: torch.Tensor,
    decay: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    epsilon: float | None = None,
    elements_per_batch: int | None = None,
) -> SurgeryResult:
    """A copy of a BatchNorm ``module`` holding Keras/Flax BatchNorm state.

    Keras' ``BatchNormalization(momentum=d)`` and Flax's ``BatchNorm(momentum=d)`` keep
    ``new = d·old + (1 − d)·batch`` of the *biased* variance; the copy gets
    ``momentum = 1 − d`` and, given ``elements_per_batch`` (batch × spatial size of
    the training batches), the variance rescaled to torch.nn's unbiased convention (see
    :func:`normlab.core.from_decay_convention`). ``gamma``/``beta`` become weight/bias,
    ``epsilon`` (Keras' default is 1e-3, Flax's 1e-5) becomes eps.

    Args:
        module: a BatchNorm layer that tracks running statistics; it is not modified.
        moving_mean: keyword-only; Keras' ``moving_mean`` (Flax's ``mean``), shape (C,).
        moving_variance: keyword-only; Keras' ``moving_variance`` (Flax's ``var``), shape (C,).
        decay: keyword-only; the framework's "momentum" d, in [0, 1].
        gamma: keyword-only; the scale, shape (C,), or None to keep the weight. Default None.
        beta: keyword-only; the offset, shape (C,), or None to keep the bias. Default None.
        epsilon: keyword-only; the framework's eps, or None to keep the module's. Default None.
        elements_per_batch: keyword-only; values per channel in a training batch (batch ×
            spatial size), to rescale the biased variance to unbiased; None keeps it as is.
            Default None.

    Returns:
        ``(module, report)``: a :class:`SurgeryResult` with the converted copy.

    Raises:
        ValueError: a module without running statistics, a tensor of another shape, a
            ``decay`` outside [0, 1].
    """
    new = copy_model(module)
    layer = cast(_RunningStatistics, new)  # what the check below makes sure of (or refuses)
    report = SurgeryReport("load_decay_statistics")
    if getattr(new, "running_mean", None) is None:
        raise ValueError(
            f"{type(module).__name__} keeps no running statistics to load into "
            f"(track_running_stats=False or not a BatchNorm)"
        )
    stats = from_decay_convention(moving_mean, moving_variance, decay, elements_per_batch=elements_per_batch)
    expected = tuple(layer.running_mean.shape)
    for name, value in (
        ("moving_mean", stats.running_mean),
        ("moving_variance", stats.running_var),
        ("gamma", gamma),
        ("beta", beta),
    ):
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, the layer needs {expected}")
    with torch.no_grad():
        layer.running_mean.copy_(stats.running_mean)
        layer.running_var.copy_(stats.running_var)
        for name, value in (("weight", gamma), ("bias", beta)):
            if value is None:
                continue
            target = getattr(new, name, None)
            if target is None:
                raise ValueError(f"{name} given but the layer has none (affine=False or bias=False)")
            target.copy_(value)
    layer.momentum = stats.momentum
    if epsilon is not None:
        layer.eps = float(epsilon)
    report.changed(
        "",
        "loaded",
        "decay convention",
        "momentum convention",
        momentum=stats.momentum,
        eps=layer.eps,
        variance="rescaled n/(n-1)" if elements_per_batch else "unchanged (biased)",
    )
    return SurgeryResult(new, report)
