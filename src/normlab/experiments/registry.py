"""The registry the command line, the suite and the tests read: every study by name, and
running one (``measure → summarise → render``, then ``result.json``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from .output import write_json
from .studies import STUDIES
from .study import Study, StudyResult

__all__ = ["all_studies", "get_study", "run_study"]


def all_studies() -> dict[str, Study]:
    """Every study, in the order the report shows them."""
    return dict(STUDIES)


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise KeyError(f"no study named {name!r}; the studies are: {', '.join(STUDIES)}")
    return STUDIES[name]


def run_study(
    name: str, setting: str = "quick", out_dir: str | Path = "runs", *, seeds: Sequence[int] | None = None
) -> dict:
    """Run one study and write ``out_dir/result.json`` plus its figures; returns the result."""
    study = get_study(name)
    config = study.config(setting, seeds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = StudyResult(study.name, study.title, study.question, setting, dataclasses.asdict(config))
    result.data.update(study.measure(config, out))
    study.summarise(config, result)
    study.render(config, result, out)
    result.seconds = time.perf_counter() - start
    payload = result.to_dict()
    write_json(out / "result.json", payload)
    return payload
