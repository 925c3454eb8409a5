"""torch.nn ↔ normlab: swap layers for their twins, state bit for bit; Keras/Flax import."""

from __future__ import annotations

import torch
from torch import nn

from .. import nn as nln
from ..core import from_decay_convention
from .modules import class_label, copy_model, module_factory_kwargs, replace_module
from .report import SurgeryReport, SurgeryResult

__all__ = ["TWINS", "from_torch", "load_decay_statistics", "to_torch", "twin_of"]

#: torch.nn class → normlab class with the same constructor, parameters and buffers.
TWINS: dict[type, type] = {
    nn.BatchNorm1d: nln.BatchNorm1d,
    nn.BatchNorm2d: nln.BatchNorm2d,
    nn.BatchNorm3d: nln.BatchNorm3d,
    nn.InstanceNorm1d: nln.InstanceNorm1d,
    nn.InstanceNorm2d: nln.InstanceNorm2d,
    nn.InstanceNorm3d: nln.InstanceNorm3d,
    nn.GroupNorm: nln.GroupNorm,
    nn.LayerNorm: nln.LayerNorm,
}
if hasattr(nn, "RMSNorm"):
    TWINS[nn.RMSNorm] = nln.RMSNorm
_TORCH_OF = {v: k for k, v in TWINS.items()}


def _constructor_args(module: nn.Module) -> tuple[tuple, dict]:
    """Positional and keyword arguments that rebuild ``module``'s configuration."""
    factory = module_factory_kwargs(module)
    if hasattr(module, "num_groups"):  # GroupNorm
        return (module.num_groups, module.num_channels), dict(
            eps=module.eps, affine=module.affine, bias=module.bias is not None, **factory)
    if hasattr(module, "normalized_shape"):
        if hasattr(module, "bias"):  # LayerNorm
            return (module.normalized_shape,), dict(
                eps=module.eps, elementwise_affine=module.elementwise_affine,
                bias=module.bias is not None, **factory)
        return (module.normalized_shape,), dict(  # RMSNorm
            eps=module.eps, elementwise_affine=module.elementwise_affine, **factory)
    return (module.num_features,), dict(  # BatchNorm, InstanceNorm
        eps=module.eps, momentum=module.momentum, affine=module.affine,
        track_running_stats=module.track_running_stats, bias=module.bias is not None, **factory)


def twin_of(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance with ``module``'s configuration, state (bit for bit) and mode."""
    args, kwargs = _constructor_args(module)
    twin = cls(*args, **kwargs)
    twin.load_state_dict(module.state_dict(), strict=True)
    twin.train(module.training)
    return twin


def _swap(model: nn.Module, mapping: dict[type, type], operation: str, skip_fn) -> SurgeryResult:
    new = copy_model(model)
    report = SurgeryReport(operation)
    for path, module in list(new.named_modules()):
        cls = mapping.get(type(module))
        if cls is None:
            continue
        reason = skip_fn(module)
        if reason:
            report.skip(path, reason)
            continue
        twin = twin_of(module, cls)
        new = replace_module(new, path, twin)
        report.changed(path, "replaced", class_label(module), class_label(twin))
    report.check = "state_dict copied with strict=True: bit for bit"
    return SurgeryResult(new, report)


def from_torch(model: nn.Module) -> SurgeryResult:
    """Swap every torch.nn norm layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm,
    RMSNorm) for its normlab twin. Parameters and buffers are copied bit for bit, the
    ``training`` flag is kept, and subclasses of the torch.nn layers are left alone
    (their forward may differ)."""
    return _swap(model, TWINS, "from_torch", lambda m: None)


def _torch_incompatible(module: nn.Module) -> str | None:
    if getattr(module, "frozen", False):
        return "frozen: torch.nn has no frozen flag (unfreeze_norms first, or keep normlab)"
    return None


def to_torch(model: nn.Module) -> SurgeryResult:
    """Swap every normlab twin back for its torch.nn class (state bit for bit).

    Options torch.nn lacks are reported as notes: ``unbiased_running_var=False``,
    ``on_nonfinite``, and InstanceNorm's ``momentum=None`` (torch.nn then never updates
    the running estimates). Frozen layers are skipped.
    """
    result = _swap(model, _TORCH_OF, "to_torch", _torch_incompatible)
    for path, module in model.named_modules():
        if type(module) not in _TORCH_OF or _torch_incompatible(module):
            continue
        if getattr(module, "unbiased_running_var", True) is False:
            result.report.notes.append(f"{path}: torch.nn stores the unbiased running variance")
        if isinstance(module, (nln.InstanceNorm1d, nln.InstanceNorm2d, nln.InstanceNorm3d)) \
                and module.track_running_stats and module.momentum is None:
            result.report.notes.append(
                f"{path}: torch.nn's InstanceNorm ignores momentum=None and stops updating")
    if result.report.changes:
        result.report.notes.append(
            "torch.nn layers let a non-finite batch into the running statistics")
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
    """
    new = copy_model(module)
    report = SurgeryReport("load_decay_statistics")
    if getattr(new, "running_mean", None) is None:
        raise ValueError(
            f"{type(module).__name__} keeps no running statistics to load into "
            f"(track_running_stats=False or not a BatchNorm)"
        )
    stats = from_decay_convention(moving_mean, moving_variance, decay,
                                  elements_per_batch=elements_per_batch)
    expected = tuple(new.running_mean.shape)
    for name, value in (("moving_mean", stats.running_mean), ("moving_variance", stats.running_var),
                        ("gamma", gamma), ("beta", beta)):
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, the layer needs {expected}")
    with torch.no_grad():
        new.running_mean.copy_(stats.running_mean)
        new.running_var.copy_(stats.running_var)
        for name, value in (("weight", gamma), ("bias", beta)):
            if value is None:
                continue
            target = getattr(new, name, None)
            if target is None:
                raise ValueError(f"{name} given but the layer has none (affine=False or bias=False)")
            target.copy_(value)
    new.momentum = stats.momentum
    if epsilon is not None:
        new.eps = float(epsilon)
    report.changed("", "loaded", "decay convention", "momentum convention",
                   momentum=stats.momentum, eps=new.eps,
                   variance="rescaled n/(n-1)" if elements_per_batch else "unchanged (biased)")
    return SurgeryResult(new, report)
