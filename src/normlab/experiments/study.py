"""What a study is, the registry the command line reads, and the result every study writes.

A study is a module with a frozen config dataclass (with a ``seeds`` field), named
settings — ``smoke`` (seconds, for the tests), ``quick`` (the README's main job) and
``full`` — and ``run(config, out_dir) -> dict``, which trains what it needs, saves its
figures as PNG in ``out_dir`` and returns a :class:`StudyResult` as a dict; ``run_study``
adds the timing and writes it as ``result.json`` beside the figures.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runner import write_json

__all__ = [
    "SETTINGS",
    "STUDIES",
    "Study",
    "StudyResult",
    "all_studies",
    "get_study",
    "new_result",
    "pyplot",
    "register",
    "run_study",
    "save_figure",
]

SETTINGS = ("smoke", "quick", "full")
STUDIES: dict[str, Study] = {}
_STUDY_MODULES = (
    "init_depth",
    "batch_size",
    "convergence",
    "learning_rate",
    "dead_units",
    "train_eval_gap",
    "depth",
    "regularization",
    "dropout_order",
    "weight_decay",
    "sequence",
    "norm_placement",
)


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    question: str  # the one-line claim the study tests
    run: Callable[[Any, Path], dict]
    settings: dict[str, Any]  # setting name → config instance

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


def register(study: Study) -> Study:
    missing = [s for s in SETTINGS if s not in study.settings]
    if missing:
        raise ValueError(f"study {study.name!r} lacks settings {missing}")
    STUDIES[study.name] = study
    return study


def _load_all() -> None:
    for module in _STUDY_MODULES:
        importlib.import_module(f"{__package__}.studies.{module}")


def all_studies() -> dict[str, Study]:
    """Every registered study, in the order the report shows them."""
    _load_all()
    return {name.replace("_", "-"): STUDIES[name.replace("_", "-")] for name in _STUDY_MODULES}


def get_study(name: str) -> Study:
    studies = all_studies()
    if name not in studies:
        raise KeyError(f"no study named {name!r}; the studies are: {', '.join(studies)}")
    return studies[name]


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
    seconds: float | None = None

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence], note: str = "") -> None:
        self.tables.append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows], "note": note})

    def figure(self, file: str, caption: str) -> None:
        self.figures.append({"file": file, "caption": caption})

    def compare(self, what: str, published: str, ours: str, agrees: str, why: str = "") -> None:
        """``agrees``: "yes", "partly" or "no" — said plainly, with ``why`` where not yes."""
        if agrees not in ("yes", "partly", "no"):
            raise ValueError(f"agrees must be 'yes', 'partly' or 'no', got {agrees!r}")
        self.comparison.append({"what": what, "published": published, "ours": ours, "agrees": agrees, "why": why})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def new_result(name: str, config) -> StudyResult:
    """An empty result for the registered study ``name`` (``run_study`` fills in the setting)."""
    study = STUDIES[name]
    return StudyResult(study.name, study.title, study.question, "", dataclasses.asdict(config))


def run_study(
    name: str, setting: str = "quick", out_dir: str | Path = "runs", *, seeds: Sequence[int] | None = None
) -> dict:
    """Run one study and write ``out_dir/result.json`` plus its figures; returns the result."""
    study = get_study(name)
    config = study.config(setting, seeds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = study.run(config, out)
    result["setting"] = setting
    result["seconds"] = time.perf_counter() - start
    write_json(out / "result.json", result)
    return result


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: Path, name: str) -> str:
    """Save a matplotlib figure as ``out_dir/name.png`` and close it; returns the file name."""
    plt = pyplot()

    file = f"{name}.png"
    fig.savefig(out_dir / file, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return file
