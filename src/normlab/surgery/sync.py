"""Convert BatchNorm layers to SyncBatchNorm for multi-process training, and back."""

from __future__ import annotations

from typing import Any, cast

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import nn as nln
from .freeze import settle
from .interop import TWINS, twin_of
from .modules import (
    ORIGINAL,
    SYNC_FROM,
    ModuleFactoryKwargs,
    adopt,
    class_label,
    copy_model,
    describe_norm,
    layer_template,
    module_factory_kwargs,
    normalization_layers,
    rebuild,
    replace_everywhere,
)
from .report import SurgeryReport, SurgeryResult

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

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


class _SyncKwargs(ModuleFactoryKwargs, total=False):
    bias: bool


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> SurgeryResult:
    """Replace every BatchNorm (normlab's or torch.nn's, 1d/2d/3d, and torch.nn's
    SyncBatchNorm) with :class:`normlab.nn.SyncBatchNorm` — a BatchNormAct with
    :class:`normlab.nn.SyncBatchNormAct` — holding the same parameter and buffer tensors
    (values bit for bit, ``requires_grad`` and ties kept), with momentum (``None``
    included), eps, the normlab-only options, the frozen state and the training flag.
    Unlike ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` the result runs on any backend,
    CPU included. Other BatchNorms (BatchRenorm, FrozenBatchNorm, subclasses, timm's
    BatchNormAct2d) are left alone and listed in ``report.skipped``.

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
    for path, module in normalization_layers(new):
        if type(module) not in _BATCHNORMS + _FUSED:
            info = describe_norm(module)
            if (
                info is not None
                and info.kind in ("batch", "batch_renorm", "frozen")
                and not isinstance(module, nln.SyncBatchNorm)
            ):
                report.skip(path, f"{class_label(module)} is not a plain BatchNorm")
            continue
        bn = cast(_BatchNorm, module)  # every class in _BATCHNORMS and _FUSED is a torch.nn _BatchNorm
        kwargs: _SyncKwargs = {"bias": bn.bias is not None, **module_factory_kwargs(bn)}
        args = (
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            process_group,
        )
        synced: nln.SyncBatchNorm
        if type(module) in _FUSED:  # the activation stays; the in-place mode does not sync
            fused = cast("nln.BatchNormAct1d | nln.BatchNormAct2d | nln.BatchNormAct3d", module)
            synced = nln.SyncBatchNormAct(
                *args, activation=fused.activation, activation_param=fused.activation_param, **kwargs
            )
            if fused.inplace:
                report.notes.append(f"{path}: inplace=True dropped (SyncBatchNormAct keeps its input)")
        else:
            synced = nln.SyncBatchNorm(*args, **kwargs)
        synced = adopt(synced, module)
        synced.__dict__[SYNC_FROM] = layer_template(module)  # what revert_sync_batchnorm gives back
        new = replace_everywhere(new, module, synced)
        report.changed(path, "synced", class_label(module), class_label(synced))
    report.check = "the same parameter and buffer tensors; identical to BatchNorm without a process group"
    return SurgeryResult(new, report)


def revert_sync_batchnorm(model: nn.Module) -> SurgeryResult:
    """Undo :func:`convert_sync_batchnorm`: every SyncBatchNorm it created goes back to the
    class it replaced, with its current state (the same tensors) and frozen state — a torch.nn
    layer that is frozen now comes back as its normlab twin, frozen, and becomes torch.nn's
    again at :func:`unfreeze_norms`. SyncBatchNorm layers built directly (no record of a
    rank-specific class) are skipped.

    Args:
        model: the model to revert; it is not modified.

    Returns:
        ``(model, report)``: a :class:`SurgeryResult`, one "unsynced" change per layer.
    """
    new = copy_model(model)
    report = SurgeryReport("revert_sync_batchnorm")
    for path, module in normalization_layers(new):
        if not isinstance(module, nln.SyncBatchNorm):
            continue
        template = module.__dict__.get(SYNC_FROM)
        if template is None:
            report.skip(path, "built as SyncBatchNorm, so its BatchNorm rank (1d/2d/3d) is unknown")
            continue
        restored = rebuild(template, module, drop=(SYNC_FROM,))
        if module.frozen and not isinstance(restored, nln.FreezableNorm):
            # torch.nn's class has no frozen flag: its normlab twin stands in until unfrozen
            original = restored
            restored = adopt(twin_of(original, TWINS[type(original)]), module, drop=(SYNC_FROM,))
            restored.__dict__[ORIGINAL] = layer_template(original)
        restored = settle(restored)
        new = replace_everywhere(new, module, restored)
        detail = {"frozen": "until unfreeze_norms"} if ORIGINAL in restored.__dict__ else {}
        report.changed(path, "unsynced", class_label(module), class_label(restored), **detail)
    return SurgeryResult(new, report)
