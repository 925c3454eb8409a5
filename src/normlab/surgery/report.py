"""What a surgery did: every change, every skip with its reason, and the numeric check."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from torch import nn

__all__ = ["Change", "Skip", "SurgeryReport", "SurgeryResult"]


@dataclass
class Change:
    path: str  # dotted module path, as in model.named_modules()
    action: str  # "folded", "frozen", "replaced", ...
    before: str  # class name(s) before
    after: str  # class name(s) after
    detail: dict = field(default_factory=dict)


@dataclass
class Skip:
    path: str
    reason: str


@dataclass
class SurgeryReport:
    """A record of one transform. ``str(report)`` is a readable summary; ``to_dict()``
    is what ``normlab surgery`` writes as JSON."""

    operation: str
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    max_abs_diff: float | None = None
    check: str = "not checked"
    notes: list[str] = field(default_factory=list)

    def changed(self, path: str, action: str, before: str, after: str, **detail) -> None:
        self.changes.append(Change(path, action, before, after, detail))

    def skip(self, path: str, reason: str) -> None:
        """Record that the layer at ``path`` was left as it was; a layer is listed once (with
        the first reason given)."""
        if all(s.path != path for s in self.skipped):
            self.skipped.append(Skip(path, reason))

    def to_dict(self) -> dict:
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
    """``model, report = fold_batchnorm(model)``: the new model and what changed."""

    model: nn.Module
    report: SurgeryReport
