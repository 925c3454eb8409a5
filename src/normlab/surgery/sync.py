"""Convert BatchNorm layers to SyncBatchNorm for multi-process training, and back."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import nn as nln
from .modules import class_label, copy_model, describe_norm, module_factory_kwargs, replace_module
from .report import SurgeryReport, SurgeryResult

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

# Set on a converted layer so that revert_sync_batchnorm can restore the original class.
_ORIGINAL_CLASS = "_normlab_unsync_to"

_BATCHNORMS = (
    nln.BatchNorm1d,
    nln.BatchNorm2d,
    nln.BatchNorm3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
_FUSED = (nln.BatchNormAct1d, nln.BatchNormAct2d, nln.BatchNormAct3d)


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> SurgeryResult:
    """Replace every BatchNorm (normlab's or torch.nn's, 1d/2d/3d, and torch.nn's
    SyncBatchNorm) with :class:`normlab.nn.SyncBatchNorm`, keeping parameters and buffers
    bit for bit, momentum (``None`` included), eps, the normlab-only options, the frozen
    flag and the training flag. Unlike ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    the result runs on any backend, CPU included. BatchRenorm, FrozenBatchNorm and other
    subclasses are left alone (reported).

    Args:
        model: the model; it is not modified.
        process_group: the ``torch.distributed`` group to synchronize over; None for the
            default (whole world).

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: a copy with SyncBatchNorm layers, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.
    """
    new = copy_model(model)
    report = SurgeryReport("convert_sync_batchnorm")
    for path, module in list(new.named_modules()):
        if type(module) not in _BATCHNORMS + _FUSED:
            info = describe_norm(module)
            if (
                info is not None
                and info.kind in ("batch", "batch_renorm", "frozen")
                and not isinstance(module, nln.SyncBatchNorm)
            ):
                report.skip(path, f"{class_label(module)} is not a plain BatchNorm")
            continue
        kwargs = dict(
            bias=module.bias is not None,
            unbiased_running_var=getattr(module, "unbiased_running_var", True),
            on_nonfinite=getattr(module, "on_nonfinite", "skip"),
            **module_factory_kwargs(module),
        )
        args = (
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if type(module) in _FUSED:  # the activation stays; the in-place mode does not sync
            synced = nln.SyncBatchNormAct(
                *args, activation=module.activation, activation_param=module.activation_param, **kwargs
            )
            if module.inplace:
                report.notes.append(f"{path}: inplace=True dropped (SyncBatchNormAct keeps its input)")
        else:
            synced = nln.SyncBatchNorm(*args, **kwargs)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        if isinstance(module, nln.FreezableNorm) and module.frozen:  # torch.nn's layers have no flag
            synced.freeze(affine=module.frozen_affine)
        setattr(synced, _ORIGINAL_CLASS, type(module))
        new = replace_module(new, path, synced)
        report.changed(path, "synced", class_label(module), class_label(synced))
    report.check = "state_dict copied: bit for bit; identical to BatchNorm without a process group"
    return SurgeryResult(new, report)


def revert_sync_batchnorm(model: nn.Module) -> SurgeryResult:
    """Undo :func:`convert_sync_batchnorm`: every SyncBatchNorm it created goes back to its
    original class with its current state. SyncBatchNorm layers built directly (no record
    of a rank-specific class) are skipped."""
    new = copy_model(model)
    report = SurgeryReport("revert_sync_batchnorm")
    for path, module in list(new.named_modules()):
        if not isinstance(module, nln.SyncBatchNorm):
            continue
        original = getattr(module, _ORIGINAL_CLASS, None)
        if original is None:
            report.skip(path, "built as SyncBatchNorm, so its BatchNorm rank (1d/2d/3d) is unknown")
            continue
        kwargs = dict(bias=module.bias is not None, **module_factory_kwargs(module))
        if issubclass(original, nln._NormBase):
            kwargs.update(unbiased_running_var=module.unbiased_running_var, on_nonfinite=module.on_nonfinite)
        if issubclass(original, _FUSED):
            kwargs.update(activation=module.activation, activation_param=module.activation_param)
        args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        restored = original(*args, **kwargs)
        restored.load_state_dict(module.state_dict())
        restored.train(module.training)
        if module.frozen and hasattr(restored, "freeze"):
            restored.freeze(affine=module.frozen_affine)
        new = replace_module(new, path, restored)
        report.changed(path, "unsynced", class_label(module), class_label(restored))
    return SurgeryResult(new, report)
