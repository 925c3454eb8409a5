"""``normlab sync-demo``: SyncBatchNorm at 2 processes x batch 2 vs one process at batch 4."""

from __future__ import annotations

import argparse

from .common import SubcommandParser, out_checked, positive_int, seed, write_out

__all__ = ["add_parser"]


def run(args: argparse.Namespace) -> int:
    from ..experiments.distributed import run_sync_comparison

    print(
        "training on MNIST-1D: 1 process at batch 4 and 2; 2 gloo processes x batch 2 with "
        "SyncBatchNorm and with local BatchNorm ...",
        flush=True,
    )
    rows = run_sync_comparison(epochs=args.epochs, seed=args.seed)
    print(f"{'setting':<40}{'global batch':>13}{'test acc':>10}{'time':>8}")
    for r in rows:
        print(f"{r['setting']:<40}{r['global_batch']:>13}{100 * r['test_accuracy']:>9.1f}%{r['seconds']:>7.0f}s")
    write_out(args, {"epochs": args.epochs, "seed": args.seed, "rows": rows})
    return 0


def add_parser(sub: argparse._SubParsersAction[SubcommandParser]) -> None:
    p = sub.add_parser("sync-demo", help="SyncBatchNorm at 2 processes x batch 2 vs 1 process at batch 4 (minutes)")
    p.add_argument("--epochs", type=positive_int, default=6)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", help="write the rows as JSON to this path")
    p.set_defaults(func=out_checked(run))
