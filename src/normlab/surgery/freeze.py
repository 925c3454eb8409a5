"""Freeze norm layers so that ``model.train()`` cannot undo it, and unfreeze them again."""

from __future__ import annotations

from torch import nn

from .. import nn as nln
from .interop import TWINS, twin_of
from .modules import class_label, copy_model, replace_module
from .report import SurgeryReport, SurgeryResult

__all__ = ["freeze_norms", "unfreeze_norms"]

# Set on a layer that freeze_norms converted from torch.nn, so unfreeze can convert back.
_ORIGINAL_CLASS = "_normlab_unfreeze_to"


def freeze_norms(model: nn.Module, affine: bool = True) -> SurgeryResult:
    """Freeze every norm layer's statistics (and γ/β when ``affine``).

    A frozen BatchNorm/InstanceNorm normalizes with its running estimates and never
    updates them, in ``train()`` mode as well — the flag is read in ``forward``, so
    ``model.train()`` cannot undo it (torch.nn's usual recipe, calling ``.eval()`` on
    the BN layers, is undone by the next ``model.train()``). ``affine=True`` also sets
    ``requires_grad=False`` on γ and β. torch.nn norm layers are first swapped for their
    normlab twins (same state bit for bit); :func:`unfreeze_norms` swaps them back.
    Layers without running estimates (GroupNorm, LayerNorm, RMSNorm,
    ``track_running_stats=False``) can only have their affine frozen.

    Args:
        model: the model; it is not modified.
        affine: also freeze γ and β (``requires_grad=False``). Default True.

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: a copy with its norm layers frozen, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.
    """
    new = copy_model(model)
    report = SurgeryReport(f"freeze_norms(affine={affine})")
    for path, module in list(new.named_modules()):
        from_torch = type(module) in TWINS
        if isinstance(module, (nln.FrozenBatchNorm1d, nln.FrozenBatchNorm2d, nln.FrozenBatchNorm3d)):
            report.skip(path, "FrozenBatchNorm: always frozen")
            continue
        if not (from_torch or isinstance(module, nln.FreezableNorm)):
            continue
        if getattr(module, "frozen", False):
            report.skip(path, "already frozen")
            continue
        parts = ["statistics"] if getattr(module, "running_mean", None) is not None else []
        if affine:
            parts.append("affine")
        if not parts:
            report.skip(path, "no running statistics to freeze, and affine=False")
            continue
        before = class_label(module)
        if from_torch:
            original = type(module)
            module = twin_of(module, TWINS[original])
            setattr(module, _ORIGINAL_CLASS, original)
            new = replace_module(new, path, module)
        module.freeze(affine=affine)
        report.changed(path, "frozen", before, class_label(module), frozen=" and ".join(parts))
    report.check = "frozen layers compute what they computed in eval mode"
    return SurgeryResult(new, report)


def unfreeze_norms(model: nn.Module) -> SurgeryResult:
    """Undo :func:`freeze_norms`: clear the flag, restore ``requires_grad``, and swap
    layers that were torch.nn before freezing back to their torch.nn class.

    Args:
        model: the model; it is not modified.

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: a copy with its norm layers unfrozen, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.
    """
    new = copy_model(model)
    report = SurgeryReport("unfreeze_norms")
    for path, module in list(new.named_modules()):
        if not isinstance(module, nln.FreezableNorm) or not module.frozen:
            continue
        module.unfreeze()
        after = module
        original = getattr(module, _ORIGINAL_CLASS, None)
        if original is not None:
            after = twin_of(module, original)
            new = replace_module(new, path, after)
        report.changed(path, "unfrozen", class_label(module), class_label(after))
    return SurgeryResult(new, report)
