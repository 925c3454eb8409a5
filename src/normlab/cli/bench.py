"""``normlab bench``: benchmarks that print ratios measured in the same run."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from .common import atomic_write_json

__all__ = ["add_parser"]


def _machine() -> dict:
    import os

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def run_fold(args: argparse.Namespace) -> int:
    from ..bench.fold import FoldBenchConfig, format_fold_table, run_fold_benchmark

    config = FoldBenchConfig(repeats=7 if args.quick else 21, threads=args.threads,
                             widths=(64,) if args.quick else (64, 16))
    rows = run_fold_benchmark(config)
    print("eval inference, torch.nn BatchNorm unfolded vs folded into the convolutions "
          f"(median of {config.repeats}, interleaved, {config.threads} threads)")
    print(format_fold_table(rows))
    if args.out:
        atomic_write_json(Path(args.out), {"benchmark": "fold", "machine": _machine(), "rows": rows})
        print(f"wrote {args.out}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from ..bench.probe import ProbeBenchConfig, format_probe_table, run_probe_benchmark

    config = ProbeBenchConfig(repeats=15 if args.quick else 61)
    rows = run_probe_benchmark(config)
    print(f"training step of a small CNN (batch {config.batch_size}, {config.threads} thread) "
          f"with a Probe on every layer, median of {config.repeats} x {config.steps_per_sample} steps, "
          f"interleaved, process CPU time")
    print(format_probe_table(rows))
    if args.out:
        atomic_write_json(Path(args.out), {"benchmark": "probe", "machine": _machine(), "rows": rows})
        print(f"wrote {args.out}")
    return 0


def run_sync(args: argparse.Namespace) -> int:
    from ..bench.sync import SyncBenchConfig, format_sync_table, run_sync_benchmark

    config = SyncBenchConfig(repeats=7 if args.quick else 21)
    result = run_sync_benchmark(config)
    print(f"2-process gloo DDP training step of a small CNN (3 BatchNorm layers), batch {config.batch_size} "
          f"per process, one thread each, median of {config.repeats} interleaved blocks of {config.steps_per_sample} steps")
    print(format_sync_table(result))
    if args.out:
        atomic_write_json(Path(args.out), {"benchmark": "sync", "machine": _machine(), **result})
        print(f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios measured in the same run)")
    kinds = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    fold = kinds.add_parser("fold", help="ResNet-18-style eval inference, BatchNorm unfolded vs folded")
    fold.add_argument("--quick", action="store_true", help="fewer repetitions, one width")
    fold.add_argument("--threads", type=int, default=2)
    fold.add_argument("--out", help="write the rows as JSON to this path")
    fold.set_defaults(func=run_fold)
    probe = kinds.add_parser("probe", help="training-step slowdown of a Probe at every step and every 10th")
    probe.add_argument("--quick", action="store_true", help="fewer repetitions")
    probe.add_argument("--out", help="write the rows as JSON to this path")
    probe.set_defaults(func=run_probe)
    sync = kinds.add_parser("sync", help="SyncBatchNorm vs local BatchNorm in a 2-process gloo DDP step")
    sync.add_argument("--quick", action="store_true", help="fewer repetitions")
    sync.add_argument("--out", help="write the result as JSON to this path")
    sync.set_defaults(func=run_sync)
