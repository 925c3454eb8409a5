"""learning-rate: BatchNorm tolerates much larger learning rates.

The small MNIST-1D CNN with and without BatchNorm, trained at multiples ×1 … ×30 of a
base learning rate that trains the plain network stably (SGD, momentum 0.9, cosine,
batch 32). A run *fails* when its loss becomes non-finite (diverged) or its final test
accuracy stays below 20% (chance is 10%: the network has collapsed to a constant).

Ioffe & Szegedy (2015) trained Inception with BN at 5× and 30× the original rate
(BN-x5, BN-x30), which the network without BN does not survive; BN makes a layer's
output invariant to the scale of its weights, so large updates do not blow up the
activations, and the effective step on the weights' direction shrinks as they grow.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import load_mnist1d
from ..models import ConvNet1d
from ..output import pyplot, save_figure
from ..runner import grid, parallel_map
from ..study import Study, StudyResult
from ..training import TrainConfig, train_classifier

NAME = "learning-rate"
FAIL_BELOW = 0.2
NORMS = ("none", "batch")

LABELS = {"none": "without BN", "batch": "with BN"}


@dataclass(frozen=True)
class Config:
    base_lr: float = 0.03
    multipliers: tuple[float, ...] = (1, 2, 5, 10, 20, 30)
    batch_size: int = 32
    epochs: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)


def one_run(config: Config, norm: str, multiplier: float, seed: int) -> dict:
    torch.manual_seed(seed)
    lr = config.base_lr * multiplier
    train = TrainConfig(
        batch_size=config.batch_size, epochs=config.epochs, base_lr=lr * 32 / config.batch_size, seed=seed
    )
    result = train_classifier(ConvNet1d(norm), load_mnist1d(), train, test_every_epoch=False)
    failed = result.diverged or result.test_accuracy < FAIL_BELOW
    return {
        "norm": norm,
        "multiplier": multiplier,
        "lr": lr,
        "seed": seed,
        "test_accuracy": result.test_accuracy,
        "diverged": result.diverged,
        "failed": failed,
        "seconds": result.seconds,
        "train_loss": result.train_loss if math.isfinite(result.train_loss) else None,
    }


def measure(config: Config, out_dir: Path) -> dict:
    tasks = grid({"config": config}, seed=config.seeds, multiplier=config.multipliers, norm=NORMS)
    rows = parallel_map(one_run, tasks, desc=NAME)
    return {"runs": rows}


def summarise(config: Config, result: StudyResult) -> None:
    rows = result.data["runs"]
    stats = {}
    for norm in NORMS:
        stats[norm] = []
        for m in config.multipliers:
            mine = [r for r in rows if r["norm"] == norm and r["multiplier"] == m]
            accs = [r["test_accuracy"] for r in mine]
            stats[norm].append(
                {
                    "multiplier": m,
                    "lr": config.base_lr * m,
                    "mean_accuracy": statistics.fmean(accs),
                    "min_accuracy": min(accs),
                    "failed": sum(r["failed"] for r in mine),
                    "diverged": sum(r["diverged"] for r in mine),
                    "runs": len(mine),
                }
            )
    result.data["by_multiplier"] = stats

    result.table(
        "Final test accuracy % (mean over seeds; failed runs in brackets)",
        ["model"] + [f"×{m:g} (lr {config.base_lr * m:.3g})" for m in config.multipliers],
        [
            [LABELS[n]]
            + [
                f"{100 * x['mean_accuracy']:.1f}" + (f" [{x['failed']}/{x['runs']} failed]" if x["failed"] else "")
                for x in stats[n]
            ]
            for n in NORMS
        ],
    )

    def largest_ok(norm):
        ok = [x["multiplier"] for x in stats[norm] if not x["failed"]]
        return max(ok) if ok else None

    best = {n: max(stats[n], key=lambda x: x["mean_accuracy"]) for n in NORMS}
    plain, bn = largest_ok("none"), largest_ok("batch")
    result.data["largest_multiplier_that_trains"] = {"none": plain, "batch": bn}

    def describe(m):
        return "no rate tried" if m is None else f"×{m:g}"

    result.summary += [
        f"Every seed trains up to {describe(plain)} without BN and up to {describe(bn)} with BN "
        f"(rates tried: ×{min(config.multipliers):g} to ×{max(config.multipliers):g}).",
        f"Best mean accuracy: without BN {100 * best['none']['mean_accuracy']:.1f}% at ×{best['none']['multiplier']:g}, "
        f"with BN {100 * best['batch']['mean_accuracy']:.1f}% at ×{best['batch']['multiplier']:g}.",
    ]
    tolerates = bn is not None and (plain is None or bn > plain)
    result.compare(
        "BN tolerates much larger learning rates",
        "Ioffe & Szegedy (2015): Inception with BN trains at 5× and 30× the original rate (BN-x30 reaches "
        "74.8% top-1, above the original's 72.2%)",
        f"largest multiplier where every seed trains: {describe(plain)} without BN, {describe(bn)} with BN",
        "yes" if tolerates else "no",
    )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    stats = result.data["by_multiplier"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for norm in NORMS:
        s = stats[norm]
        ax.plot([x["multiplier"] for x in s], [100 * x["mean_accuracy"] for x in s], marker="o", label=LABELS[norm])
        bad = [x for x in s if x["failed"]]
        ax.plot([x["multiplier"] for x in bad], [100 * x["mean_accuracy"] for x in bad], "x", color="black", ms=10)
    ax.axhline(100 * FAIL_BELOW, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(f"learning rate, × the base {config.base_lr}")
    ax.set_ylabel("test accuracy %")
    ax.set_title(
        f"MNIST-1D CNN, {config.epochs} epochs, mean of {len(config.seeds)} seed(s); × = failed run(s)", fontsize=10
    )
    ax.legend()
    result.figure(
        save_figure(fig, out_dir, "learning-rate"), "Final test accuracy vs learning rate, with and without BatchNorm."
    )


STUDY = Study(
    name=NAME,
    title="Learning rate: BatchNorm tolerates much larger steps",
    question="From ×1 to ×30 of a stable learning rate, which networks still train?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(multipliers=(1, 30), epochs=1, seeds=(0,)),
        "quick": Config(multipliers=(1, 3, 10, 30), epochs=5, seeds=(0,)),
        "full": Config(),
    },
)
