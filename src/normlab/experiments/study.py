"""What a study is, and the result every study writes.

A study is a module with a frozen config dataclass (with a ``seeds`` field), named
settings — ``smoke`` (seconds, for the tests), ``quick`` (the README's main job) and
``full`` — and three steps that :func:`run_study` calls in turn:

- ``measure(config, out_dir) -> dict``: trains and probes what it needs, its jobs run by
  ``runner.parallel_map``; returns the raw measurements (every run's numbers). It writes
  to ``out_dir`` only a figure that just a job can draw (init-depth's histogram grids come
  from probes that stay in the worker);
- ``summarise(config, result)``: from ``result.data``, the derived numbers (back into
  ``result.data``), tables, findings and the published comparison;
- ``render(config, result, out_dir)``: the figures, saved as PNG in ``out_dir``.

:func:`normlab.experiments.registry.run_study` adds the timing and writes the
:class:`StudyResult` as ``result.json`` beside the figures. The studies are listed once, in
``studies.STUDIES``; this module imports none of them (they import it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SETTINGS", "Study", "StudyResult"]

SETTINGS = ("smoke", "quick", "full")


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    question: str  # the one-line claim the study tests
    measure: Callable[[Any, Path], dict]
    summarise: Callable[[Any, StudyResult], None]
    render: Callable[[Any, StudyResult, Path], None]
    settings: dict[str, Any]  # setting name → config instance

    def __post_init__(self) -> None:
        missing = [s for s in SETTINGS if s not in self.settings]
        if missing:
            raise ValueError(f"study {self.name!r} lacks settings {missing}")

    def config(self, setting: str = "quick", seeds: Sequence[int] | None = None):
        if setting not in self.settings:
            raise ValueError(f"setting must be one of {tuple(self.settings)}, got {setting!r}")
        config = self.settings[setting]
        if seeds is not None:
            seeds = tuple(int(s) for s in seeds)
            if not seeds:
                raise ValueError("seeds must not be empty")
            config = dataclasses.replace(config, seeds=seeds)
        return config


@dataclass
class StudyResult:
    """The numbers, tables, figures and published comparison of one study run."""

    study: str
    title: str
    question: str
    setting: str
    config: dict
    summary: list[str] = field(default_factory=list)  # findings, in words, with numbers
    tables: list[dict] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)
    comparison: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # every number behind the tables and figures
    seconds: float | None = None  # wall time, measuring to drawing (in a suite, shared with other studies)
    job_seconds: float | None = None  # its jobs' wall time in the workers: what the study costs

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence], note: str = "") -> None:
        self.tables.append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows], "note": note})

    def figure(self, file: str, caption: str, *, folded: bool = False) -> None:
        """``folded``: a detail figure the report shows only on a click (one of many alike)."""
        self.figures.append({"file": file, "caption": caption, **({"folded": True} if folded else {})})

    def compare(self, what: str, published: str, ours: str, agrees: str, why: str = "") -> None:
        """``agrees``: "yes", "partly" or "no" — said plainly, with ``why`` where not yes."""
        if agrees not in ("yes", "partly", "no"):
            raise ValueError(f"agrees must be 'yes', 'partly' or 'no', got {agrees!r}")
        self.comparison.append({"what": what, "published": published, "ours": ours, "agrees": agrees, "why": why})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
