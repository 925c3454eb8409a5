"""What a surgery did: every change, every skip with its reason, and the numeric check."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from torch import nn

__all__ = ["Change", "Skip", "SurgeryReport", "SurgeryResult"]


@dataclass
class Change:
    """One layer a transform changed, as listed in :class:`SurgeryReport`.

    Attributes:
        path: the dotted module path, as in ``model.named_modules()`` ("" for the root).
        action: what was done: "folded", "frozen", "replaced", ...
        before: the class name(s) before.
        after: the class name(s) after.
        detail: what else the transform records (e.g. the groups chosen); {} by default.
    """

    path: str
    action: str
    before: str
    after: str
    detail: dict[str, object] = field(default_factory=dict)


@dataclass
class Skip:
    """One layer a transform left as it was, and why.

    Attributes:
        path: the dotted module path ("" for the root).
        reason: why it was left alone, in words a user can act on.
    """

    path: str
    reason: str


@dataclass
class SurgeryReport:
    r"""A record of one transform. ``str(report)`` is a readable summary; ``to_dict()``
    is what ``normlab surgery`` writes as JSON.

    Attributes:
        operation: the transform's name ("fold_batchnorm", ...).
        changes: every :class:`Change`, in model order.
        skipped: every :class:`Skip`, one per layer.
        max_abs_diff: the largest \|output difference\| of the numeric check against the
            original model, or None where none was run.
        check: what the check compared, or why it was not run ("not checked").
        notes: anything else a user should know (e.g. a batch drawn fewer times than asked).
    """

    operation: str
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    max_abs_diff: float | None = None
    check: str = "not checked"
    notes: list[str] = field(default_factory=list)

    def changed(self, path: str, action: str, before: str, after: str, **detail: object) -> None:
        self.changes.append(Change(path, action, before, after, detail))

    def skip(self, path: str, reason: str) -> None:
        """Record that the layer at ``path`` was left as it was; a layer is listed once (with
        the first reason given)."""
        if all(s.path != path for s in self.skipped):
            self.skipped.append(Skip(path, reason))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        lines = [f"{self.operation}: {len(self.changes)} changed, {len(self.skipped)} skipped"]
        for c in self.changes:
            detail = ", ".join(f"{k}={v}" for k, v in c.detail.items())
            lines.append(
                f"  {c.action:<10} {c.path or '<root>'}: {c.before} -> {c.after}" + (f" ({detail})" if detail else "")
            )
        lines += [f"  {'skipped':<10} {s.path or '<root>'}: {s.reason}" for s in self.skipped]
        if self.max_abs_diff is not None:
            lines.append(f"  check: max |difference| {self.max_abs_diff:.3g} ({self.check})")
        else:
            lines.append(f"  check: {self.check}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(_printable(line) for line in lines)


def _printable(text: str) -> str:
    """``text`` with every unprintable character escaped: module names may hold a newline (which
    would forge a line of the report) or a terminal escape sequence."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class SurgeryResult(NamedTuple):
    """``model, report = fold_batchnorm(model)``: the new model and what changed.

    Attributes:
        model: the transformed model (a new module; the input model is left as it was).
        report: the :class:`SurgeryReport` of what changed.
    """

    model: nn.Module
    report: SurgeryReport
