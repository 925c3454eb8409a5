"""``normlab study``: every study at one setting, one worker pool, one report.

The studies are measured side by side: each study's ``measure`` runs in a thread of its own
from the start, so every study's jobs are queued in the one worker pool at once (in the
report's order) and the workers never wait — neither for the last, longest job of a study
nor while this process summarises and draws a finished one. Results do not depend on it:
every job seeds itself from its config. The studies are summarised, drawn and reported in
order, each as soon as its measurements are in. Without a pool (``jobs=1``) the jobs run in
this process, one study after another.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .output import machine_info, write_json
from .registry import Measured, all_studies, finish_study, measure_study, run_study
from .report import write_report
from .runner import pool_is_open, worker_pool

__all__ = ["run_suite"]


def run_suite(
    setting: str = "quick",
    out_dir: str | Path = "runs/study",
    *,
    only: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    jobs: int | None = None,
    on_done: Callable[[dict], None] | None = None,
) -> tuple[Path, list[dict]]:
    """Run the studies (all, or ``only`` these) and write ``out_dir/index.html``,
    ``out_dir/report.json`` and one folder per study. A study that fails is reported as
    failed in the page and the JSON, and the others still run; the caller decides what a
    failure means (the command line exits non-zero).

    The page and the JSON never pass off stale or partial results as a finished run: an
    earlier run's report is replaced at the start by one marked "running", rewritten
    after each study, and marked "complete" at the end — or "interrupted", with the
    studies not finished, when the run is stopped (Ctrl-C, a signal the caller turns into
    an exception); the exception is then re-raised. A study's old ``result.json`` is
    removed before it runs again, so a folder holds one only if the study finished."""
    studies = all_studies()
    names = list(only) if only else list(studies)
    unknown = [n for n in names if n not in studies]
    if unknown:
        raise KeyError(f"unknown studies {unknown}; the studies are: {', '.join(studies)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    start = time.perf_counter()

    def publish(state: str, reason: str = "") -> Path:
        seconds = time.perf_counter() - start
        pending = names[len(results) :]
        write_json(
            out / "report.json",
            {
                "setting": setting,
                "state": state,
                "reason": reason,
                "seconds": seconds,
                "machine": machine_info(),
                "studies": results,
                "pending": pending,
            },
        )
        return write_report(results, out, setting=setting, seconds=seconds, state=state, pending=pending, reason=reason)

    publish("running")
    try:
        with worker_pool(jobs):
            for name in names:
                (out / name / "result.json").unlink(missing_ok=True)
            # Without a pool the jobs run here, one study at a time in this thread (as
            # run_study), so that Ctrl-C stops a job at once: a thread cannot be interrupted.
            measuring = (
                ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="measure") if pool_is_open() else None
            )
            try:
                ahead: dict[str, Future[Measured]] = {}
                if measuring:
                    for name in names:
                        ahead[name] = measuring.submit(measure_study, name, setting, out / name, seeds=seeds)
                for name in names:
                    t0 = time.perf_counter()
                    try:
                        if measuring:
                            result = finish_study(ahead[name].result())
                        else:
                            result = run_study(name, setting, out / name, seeds=seeds)
                    except Exception as err:  # keep going: one broken study should not hide the rest
                        study = studies[name]
                        result = {
                            "study": name,
                            "title": study.title,
                            "question": study.question,
                            "setting": setting,
                            "seconds": time.perf_counter() - t0,
                            "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc(),
                        }
                    results.append(result)
                    publish("running")
                    if on_done:
                        on_done(result)
            finally:
                # Never wait here for a measuring thread: on an interruption the pool's
                # clean-up (leaving worker_pool) cancels their jobs, which ends them.
                if measuring:
                    measuring.shutdown(wait=False, cancel_futures=True)
    except BaseException as err:
        publish("interrupted", "Ctrl-C" if isinstance(err, KeyboardInterrupt) else str(err) or type(err).__name__)
        raise
    return publish("complete"), results
