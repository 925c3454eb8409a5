"""The ``normlab`` command line: a thin layer over normlab.experiments and friends."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiments.demo import DemoConfig, demo_config_dict, format_table, run_demo

    config = DemoConfig(
        epochs=args.epochs,
        batch_sizes=tuple(args.batch_sizes),
        norms=tuple(args.norms),
        seed=args.seed,
        jobs=args.jobs,
    )
    print(f"training {len(config.norms) * len(config.batch_sizes)} small CNNs on MNIST-1D "
          f"({config.jobs} process{'es' if config.jobs > 1 else ''}) ...", flush=True)
    rows = run_demo(config)
    print(format_table(rows, config))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": demo_config_dict(config), "runs": rows}, indent=2))
        print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Normalization layers, model surgery and the experiments that explain them.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="BatchNorm vs GroupNorm on MNIST-1D at batch 32 and 2 (about 2 minutes)",
        description="Train a small CNN on MNIST-1D (generated offline) with BatchNorm and "
        "GroupNorm at large and tiny batch sizes, and print test accuracy.",
    )
    demo.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    demo.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 2], metavar="B")
    demo.add_argument("--norms", nargs="+", default=["batch", "group"],
                      choices=["batch", "group", "layer", "instance", "none"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2)")
    demo.add_argument("--out", help="also write the numbers as JSON to this path")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
