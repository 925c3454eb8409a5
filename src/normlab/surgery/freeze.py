"""Freeze norm layers so that ``model.train()`` cannot undo it, and unfreeze them again."""

from __future__ import annotations

from typing import cast

from torch import nn

from .. import nn as nln
from .interop import normlab_twin
from .modules import (
    ORIGINAL,
    SYNC_FROM,
    class_label,
    copy_model,
    describe_norm,
    layer_template,
    normalization_layers,
    rebuild,
    replace_everywhere,
    shared_parameters,
    thaw,
    unrecognized_norm_note,
)
from .report import SurgeryReport, SurgeryResult

__all__ = ["freeze_norms", "settle", "unfreeze_norms"]


def _frozen_by_construction(module: nn.Module) -> bool:
    info = describe_norm(module)
    return info is not None and info.kind == "frozen"


def _what_to_freeze(module: nn.Module, affine: bool) -> list[str]:
    # EvoNorm-B0 keeps a running variance and no running mean
    has_statistics = any(getattr(module, name, None) is not None for name in ("running_mean", "running_var"))
    parts = ["statistics"] if has_statistics else []
    if affine and any(True for _ in module.parameters(recurse=False)):
        parts.append("affine")
    return parts


def freeze_norms(model: nn.Module, affine: bool = True) -> SurgeryResult:
    """Freeze every norm layer's statistics (and γ/β when ``affine``).

    A frozen BatchNorm/InstanceNorm normalizes with its running estimates and never
    updates them, in ``train()`` mode as well — the flag is read in ``forward``, so
    ``model.train()`` cannot undo it (torch.nn's usual recipe, calling ``.eval()`` on
    the BN layers, is undone by the next ``model.train()``). ``affine=True`` also sets
    ``requires_grad=False`` on γ and β; ``affine=False`` leaves ``requires_grad`` as it was.
    Layers without running estimates (GroupNorm, LayerNorm, RMSNorm,
    ``track_running_stats=False``) can only have their affine frozen.

    Layers of other classes are swapped for their normlab twins (the same parameter and
    buffer tensors): torch.nn's norms, ``torch.nn.SyncBatchNorm`` and every timm layer
    :func:`~normlab.surgery.from_torch` converts (``BatchNormAct2d``, ``LayerNorm``,
    ``LayerNorm2d``, ``GroupNorm1``, FRN, EvoNorm, ...); :func:`unfreeze_norms` gives the
    original class back.
    Every normalization layer that is not frozen by this call is in ``report.skipped`` with
    the reason (already frozen, nothing to freeze, no normlab twin).

    Args:
        model: the model; it is not modified.
        affine: also freeze γ and β (``requires_grad=False``). Default True.

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: a copy with its norm layers frozen, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.
    """
    new = copy_model(model)
    report = SurgeryReport(f"freeze_norms(affine={affine})")
    # requires_grad as it is before this call: a γ tied between two layers must be restored as
    # it was, not as the first layer's freeze left it when the second one looked
    requires_grad = {id(p): p.requires_grad for p in new.parameters()}
    for path, module in normalization_layers(new):
        if _frozen_by_construction(module):
            report.skip(path, f"{class_label(module)} is frozen by construction")
            continue
        parts = _what_to_freeze(module, affine)
        if getattr(module, "frozen", False):  # a layer with a frozen flag: a normlab FreezableNorm
            if module.frozen_affine or "affine" not in parts:
                report.skip(path, "already frozen")
                continue
            cast(nln.FreezableNorm, module).freeze(affine=True)  # a freeze without affine, completed
            report.changed(path, "frozen", class_label(module), class_label(module), frozen="affine")
            continue
        if not parts:
            reason = "no running statistics to freeze, and affine=False" if not affine else "no statistics, no γ/β"
            report.skip(path, f"nothing to freeze: {reason}")
            continue
        target = module
        if not isinstance(module, nln.FreezableNorm):
            twin = normlab_twin(module)
            if not isinstance(twin, nn.Module):
                report.skip(path, f"cannot carry a frozen flag: {twin or 'no normlab twin'}")
                continue
            twin.__dict__[ORIGINAL] = layer_template(module)  # what unfreeze_norms gives back
            target = twin
            new = replace_everywhere(new, module, target)
        freezable = cast(nln.FreezableNorm, target)  # a normlab layer, or the normlab twin just built
        freezable.freeze(affine=affine)
        freezable._requires_grad_before_freeze = {
            name: requires_grad.get(id(p), p.requires_grad) for name, p in target.named_parameters(recurse=False)
        }
        report.changed(path, "frozen", class_label(module), class_label(target), frozen=" and ".join(parts))
    _report_shared(report, new, requires_grad)
    note = unrecognized_norm_note(model)
    if note:
        report.notes.append(note)
    report.check = "frozen layers compute what they computed in eval mode"
    return SurgeryResult(new, report)


def _report_shared(report: SurgeryReport, new: nn.Module, requires_grad_before: dict[int, bool]) -> None:
    """A γ/β whose requires_grad this call changed and that a module outside the changes holds
    too (tied parameters) changed there as well: say so, in the change and in a note."""
    shared = shared_parameters(new)
    changed = {c.path for c in report.changes}
    for change in report.changes:
        layer = new.get_submodule(change.path)
        others = sorted(
            {
                holder
                for p in layer.parameters(recurse=False)
                if p.requires_grad != requires_grad_before.get(id(p), p.requires_grad)
                for holder in shared.get(id(p), [])
                if holder not in changed
            }
        )
        if others:
            change.detail["shared_with"] = others
            report.notes.append(
                f"{change.path}: its γ/β are tied to {', '.join(others)}, whose requires_grad changed with them"
            )


def settle(module: nn.Module) -> nn.Module:
    """``module`` itself, or — for a normlab layer that stood in for another class only while
    it was frozen — that class again, holding the same tensors."""
    template: nn.Module | None = module.__dict__.get(ORIGINAL)
    if template is None or getattr(module, "frozen", False) or SYNC_FROM in module.__dict__:
        return module
    return rebuild(template, module)


def unfreeze_norms(model: nn.Module) -> SurgeryResult:
    """Undo :func:`freeze_norms`: clear the flag, restore each γ/β's ``requires_grad`` as it
    was before a freeze with affine (a freeze of statistics alone leaves it as it is now), and
    give back the original class of layers that freezing swapped
    (torch.nn's, timm's). Layers frozen by construction (FrozenBatchNorm) are skipped:
    ``convert_norms(model, "batch")`` makes trainable BatchNorms of them.

    Args:
        model: the model; it is not modified.

    Returns:
        ``(model, report)``, a :class:`SurgeryResult`: a copy with its norm layers unfrozen, and a
        :class:`SurgeryReport` of what changed, what was skipped and why.
    """
    new = copy_model(model)
    report = SurgeryReport("unfreeze_norms")
    requires_grad = {id(p): p.requires_grad for p in new.parameters()}
    for path, module in normalization_layers(new):
        if _frozen_by_construction(module):
            report.skip(path, f"{class_label(module)} is frozen by construction: convert_norms(model, 'batch')")
            continue
        if not getattr(module, "frozen", False):
            continue
        thaw(cast(nln.FreezableNorm, module))  # a layer with a frozen flag: a normlab FreezableNorm
        after = settle(module)
        if after is not module:
            new = replace_everywhere(new, module, after)
        report.changed(path, "unfrozen", class_label(module), class_label(after))
    _report_shared(report, new, requires_grad)
    return SurgeryResult(new, report)
