"""``normlab study``: every study at one setting, one worker pool, one report."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from .report import machine_info, write_report
from .runner import worker_pool, write_json
from .study import all_studies, run_study

__all__ = ["run_suite"]


def run_suite(setting: str = "quick", out_dir: str | Path = "runs/study", *, only: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None, jobs: int | None = None,
              on_done: Callable[[dict], None] | None = None) -> tuple[Path, list[dict]]:
    """Run the studies (all, or ``only`` these) and write ``out_dir/index.html``,
    ``out_dir/report.json`` and one folder per study. A study that fails is reported as
    failed in the page and the JSON, and the others still run; the caller decides what a
    failure means (the command line exits non-zero)."""
    studies = all_studies()
    names = list(only) if only else list(studies)
    unknown = [n for n in names if n not in studies]
    if unknown:
        raise KeyError(f"unknown studies {unknown}; the studies are: {', '.join(studies)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    start = time.perf_counter()
    with worker_pool(jobs):
        for name in names:
            t0 = time.perf_counter()
            try:
                result = run_study(name, setting, out / name, seeds=seeds)
            except Exception as err:  # keep going: one broken study should not hide the rest
                study = studies[name]
                result = {"study": name, "title": study.title, "question": study.question, "setting": setting,
                          "seconds": time.perf_counter() - t0, "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc()}
            results.append(result)
            if on_done:
                on_done(result)
    seconds = time.perf_counter() - start
    write_json(out / "report.json", {"setting": setting, "seconds": seconds, "machine": machine_info(),
                                     "studies": results})
    return write_report(results, out, setting=setting, seconds=seconds), results
