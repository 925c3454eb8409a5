"""The registry the command line, the suite and the tests read: every study by name, and
running one (``measure → summarise → render``, then ``result.json``) — in one call, or in
two steps (:func:`measure_study`, then :func:`finish_study`) so that a suite can measure
the next studies while it summarises and draws this one."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .output import write_json
from .runner import job_clock
from .studies import STUDIES
from .study import Study, StudyResult

__all__ = ["Measured", "all_studies", "finish_study", "get_study", "measure_study", "run_study"]


def all_studies() -> dict[str, Study]:
    """Every study, in the order the report shows them."""
    return dict(STUDIES)


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise KeyError(f"no study named {name!r}; the studies are: {', '.join(STUDIES)}")
    return STUDIES[name]


@dataclass
class Measured:
    """A study whose measurements are taken (:func:`measure_study`), to be summarised and drawn."""

    study: Study
    config: Any
    result: StudyResult
    out: Path
    start: float  # time.perf_counter() when its measuring began


def measure_study(
    name: str, setting: str = "quick", out_dir: str | Path = "runs", *, seeds: Sequence[int] | None = None
) -> Measured:
    """The first step of :func:`run_study`: the study's ``measure``, its jobs' worker time
    in ``result.job_seconds``."""
    study = get_study(name)
    config = study.config(setting, seeds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = StudyResult(study.name, study.title, study.question, setting, dataclasses.asdict(config))
    with job_clock() as clock:
        result.data.update(study.measure(config, out))
    result.job_seconds = clock.seconds
    return Measured(study, config, result, out, start)


def finish_study(measured: Measured) -> dict:
    """The second step of :func:`run_study`: summarise, draw, write ``result.json``."""
    study, config, result, out = measured.study, measured.config, measured.result, measured.out
    study.summarise(config, result)
    study.render(config, result, out)
    result.seconds = time.perf_counter() - measured.start
    payload = result.to_dict()
    write_json(out / "result.json", payload)
    return payload


def run_study(
    name: str, setting: str = "quick", out_dir: str | Path = "runs", *, seeds: Sequence[int] | None = None
) -> dict:
    """Run one study and write ``out_dir/result.json`` plus its figures; returns the result."""
    return finish_study(measure_study(name, setting, out_dir, seeds=seeds))
