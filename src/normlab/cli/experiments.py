"""``normlab list``, ``normlab run STUDY`` and ``normlab study``: the experiments."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .common import CommandError, DistinctSeeds, SubcommandParser, make_output_dir, positive_int, seed

__all__ = ["add_parsers"]


def _setting(args: argparse.Namespace) -> str:
    return "full" if args.full else "smoke" if args.smoke else "quick"


def run_list(args: argparse.Namespace) -> int:
    from ..experiments.registry import all_studies

    for name, study in all_studies().items():
        print(f"{name:<16}{study.title}")
        print(f"{'':<16}{study.question}")
    return 0


def _print_result(result: dict[str, Any]) -> None:
    if result.get("error"):
        print(f"\n== {result['study']}: FAILED — {result['error']}", flush=True)
        return
    jobs = f"; its jobs {result['job_seconds']:.0f} s" if result.get("job_seconds") is not None else ""
    print(f"\n== {result['title']} ({result['seconds']:.0f} s{jobs})")
    for line in result.get("summary", []):
        print(f"  - {line}")
    for c in result.get("comparison", []):
        print(f"  [{c['agrees']:>6}] {c['what']}: ours {c['ours']}")
    sys.stdout.flush()


def run_one(args: argparse.Namespace) -> int:
    from ..experiments.registry import all_studies, run_study
    from ..experiments.runner import worker_pool

    studies = all_studies()
    if args.study not in studies:
        raise CommandError(f"no study named {args.study!r}; `normlab list` shows them: {', '.join(studies)}")
    out = make_output_dir(Path(args.out or f"runs/{args.study}-{_setting(args)}"))
    # result.json is written last, so a folder holds one only if this run finished.
    (out / "result.json").unlink(missing_ok=True)
    try:
        with worker_pool(args.jobs):
            result = run_study(args.study, _setting(args), out, seeds=args.seeds)
    except BaseException:
        print(
            f"stopped before {args.study} finished: {out} has no result.json (figures there may be partial)",
            file=sys.stderr,
        )
        raise
    _print_result(result)
    print(f"\nwrote {out / 'result.json'} and {len(result['figures'])} figure(s) in {out}")
    return 0


def run_suite_command(args: argparse.Namespace) -> int:
    from ..experiments.registry import all_studies
    from ..experiments.suite import run_suite

    setting = _setting(args)
    names = args.only or list(all_studies())
    unknown = [n for n in names if n not in all_studies()]
    if unknown:
        raise CommandError(f"unknown studies {unknown}; `normlab list` shows them")
    out = make_output_dir(Path(args.out or f"runs/study-{setting}"))
    print(f"running {len(names)} studies at the {setting} setting into {out} ...", flush=True)
    start = time.perf_counter()
    try:
        report, results = run_suite(setting, out, only=names, seeds=args.seeds, jobs=args.jobs, on_done=_print_result)
    except BaseException:
        print(f"stopped early: {out / 'index.html'} and report.json are marked interrupted (partial)", file=sys.stderr)
        raise
    failed = [r["study"] for r in results if r.get("error")]
    jobs = sum(r.get("job_seconds") or 0 for r in results)
    print(f"\nreport: {report} ({time.perf_counter() - start:.0f} s; the studies' jobs {jobs:.0f} s)")
    if failed:
        print(f"failed: {', '.join(failed)} (tracebacks in {out / 'report.json'})", file=sys.stderr)
        return 1
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick setting (default)")
    size.add_argument("--full", action="store_true", help="the full setting (more seeds, epochs, sizes)")
    size.add_argument("--smoke", action="store_true", help="seconds per study; what the tests run")
    p.add_argument(
        "--seeds",
        type=seed,
        nargs="+",
        action=DistinctSeeds,
        help="replace the setting's seeds (distinct, 0 to 2**32 - 1)",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="worker processes, one thread each (default: the cores, at most 4)",
    )
    p.add_argument("--out", help="output folder (default runs/...)")


def add_parsers(sub: argparse._SubParsersAction[SubcommandParser]) -> None:
    p = sub.add_parser("list", help="the studies `normlab run` and `normlab study` know")
    p.set_defaults(func=run_list)
    p = sub.add_parser(
        "run", help="run one study: JSON + figures", description="Run one study and write result.json and its figures."
    )
    p.add_argument("study", help="a name from `normlab list`")
    _common(p)
    p.set_defaults(func=run_one)
    p = sub.add_parser(
        "study",
        help="run every study and write one HTML report (the main job)",
        description="Run every study (or --only some) at one setting and write index.html, "
        "report.json and one folder of figures per study.",
    )
    p.add_argument("--only", nargs="+", metavar="STUDY", help="run only these studies")
    _common(p)
    p.set_defaults(func=run_suite_command)
