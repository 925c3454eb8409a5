"""``normlab demo``: BatchNorm vs GroupNorm on MNIST-1D at batch 32 and 2."""

from __future__ import annotations

import argparse

from .common import SubcommandParser, out_checked, positive_int, seed, write_out

__all__ = ["add_parser"]


def run(args: argparse.Namespace) -> int:
    from ..experiments.demo import DemoConfig, demo_config_dict, format_table, run_demo

    config = DemoConfig(
        epochs=args.epochs, batch_sizes=tuple(args.batch_sizes), norms=tuple(args.norms), seed=args.seed, jobs=args.jobs
    )
    print(
        f"training {len(config.norms) * len(config.batch_sizes)} small CNNs on MNIST-1D "
        f"({config.jobs} process{'es' if config.jobs > 1 else ''}) ...",
        flush=True,
    )
    rows = run_demo(config)
    print(format_table(rows, config))
    write_out(args, {"config": demo_config_dict(config), "runs": rows})
    return 0


def add_parser(sub: argparse._SubParsersAction[SubcommandParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="BatchNorm vs GroupNorm on MNIST-1D at batch 32 and 2 (about 1 minute)",
        description="Train a small CNN on MNIST-1D (generated offline) with BatchNorm and "
        "GroupNorm at large and tiny batch sizes, and print test accuracy.",
    )
    p.add_argument("--epochs", type=positive_int, default=6, help="epochs per run (default 6)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[32, 2], metavar="B")
    p.add_argument(
        "--norms", nargs="+", default=["batch", "group"], choices=["batch", "group", "layer", "instance", "none"]
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--jobs", type=positive_int, default=2, help="parallel processes (default 2)")
    p.add_argument("--out", help="also write the numbers as JSON to this path")
    p.set_defaults(func=out_checked(run))  # --out checked before the minute of training
