"""dead-units: dying ReLUs at a high learning rate, the leaky alternatives, and BatchNorm.

An MLP (4 hidden layers of 256, He init) on MNIST-1D with ReLU, LeakyReLU(0.01), PReLU,
ELU or RReLU, with and without BatchNorm before the activation, trained by SGD with
momentum 0.9 at high learning rates. Every ``check_every`` steps, on a fixed set of 1000
training inputs (eval mode): the fraction of hidden units whose pre-activation is ≤ 0 for
every one of them. For ReLU such a unit is *dead* — its output and its gradient are 0
for all data, so no update can revive it. For the leaky variants the same unit still
passes a small gradient (slope 0.01, the learned PReLU slope, ELU's exp, RReLU's random
slope), so it can recover; the column shows how often they end up there anyway.

A large step can push a unit's bias and weights so that it never fires again; BatchNorm
re-centres every pre-activation over the batch before the activation, so a unit can only
stay negative on all inputs through its learned β.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import load_mnist1d
from ..models import MLP
from ..output import pyplot, save_figure
from ..runner import grid, parallel_map
from ..study import Study, StudyResult
from ..training import StepConfig, train_steps

NAME = "dead-units"
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "elu", "rrelu")
LABELS = {"relu": "ReLU", "leaky_relu": "LeakyReLU", "prelu": "PReLU", "elu": "ELU", "rrelu": "RReLU"}


@dataclass(frozen=True)
class Config:
    activations: tuple[str, ...] = ACTIVATIONS
    norms: tuple[str, ...] = ("none", "batch")
    lrs: tuple[float, ...] = (0.1, 0.3)
    hidden: tuple[int, ...] = (256, 256, 256, 256)
    steps: int = 3000
    batch_size: int = 32
    check_every: int = 250
    probe_samples: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)


def dead_fraction(model: MLP, x: torch.Tensor) -> list[float]:
    """Per hidden layer: the fraction of units whose pre-activation is ≤ 0 on every row of x."""
    was_training = model.training
    model.eval()
    fractions = []
    with torch.no_grad():
        h = x.flatten(1)
        for block in model.blocks:
            z = block.norm(block.linear(h))
            fractions.append((z.max(0).values <= 0).float().mean().item())
            h = block.act(z)
    model.train(was_training)
    return fractions


def one_run(config: Config, activation: str, norm: str, lr: float, seed: int) -> dict:
    data = load_mnist1d()
    probe = data.x_train[: config.probe_samples]
    torch.manual_seed(seed)
    model = MLP(40, config.hidden, 10, activation=activation, norm=norm, init="he", seed=seed)
    result = train_steps(
        model,
        data,
        StepConfig(steps=config.steps, batch_size=config.batch_size, lr=lr, check_every=config.check_every, seed=seed),
        on_check=lambda step, m: {"dead_per_layer": dead_fraction(m, probe)},
    )
    curve = [(h["step"], statistics.fmean(h["dead_per_layer"])) for h in result.history if "dead_per_layer" in h]
    return {
        "activation": activation,
        "norm": norm,
        "lr": lr,
        "seed": seed,
        "diverged": result.diverged,
        "test_accuracy": result.test_accuracy,
        "seconds": result.seconds,
        "steps": [s for s, _ in curve],
        "dead": [d for _, d in curve],
        "final_dead": curve[-1][1] if not result.diverged else None,
        "final_dead_per_layer": result.history[-2 if result.diverged else -1].get("dead_per_layer"),
    }


def measure(config: Config, out_dir: Path) -> dict:
    tasks = grid({"config": config}, seed=config.seeds, lr=config.lrs, activation=config.activations, norm=config.norms)
    rows = parallel_map(one_run, tasks, desc=NAME)
    return {"runs": rows}


def summarise(config: Config, result: StudyResult) -> None:
    rows = result.data["runs"]
    table = []
    cells = {}
    for lr in config.lrs:
        for norm in config.norms:
            for a in config.activations:
                mine = [r for r in rows if r["activation"] == a and r["norm"] == norm and r["lr"] == lr]
                ok = [r for r in mine if not r["diverged"]]
                dead = [r["final_dead"] for r in ok]
                acc = [r["test_accuracy"] for r in mine]
                cells[(lr, norm, a)] = (statistics.fmean(dead) if dead else math.nan, statistics.fmean(acc))
                table.append(
                    [
                        f"{lr:g}",
                        "BN" if norm == "batch" else "none",
                        LABELS[a],
                        f"{100 * statistics.fmean(dead):.1f}" if dead else "–",
                        f"{100 * statistics.fmean(acc):.1f}",
                        f"{len(mine) - len(ok)}/{len(mine)}",
                    ]
                )
    result.table(
        f"After {config.steps} steps (mean over {len(config.seeds)} seed(s))",
        ["lr", "norm", "activation", "% negative on every input", "test accuracy %", "diverged"],
        table,
    )
    result.data["cells"] = [
        {"lr": k[0], "norm": k[1], "activation": k[2], "dead": v[0] if math.isfinite(v[0]) else None, "accuracy": v[1]}
        for k, v in cells.items()
    ]
    hi = max(config.lrs)
    if "relu" in config.activations and "none" in config.norms:
        relu_plain = cells[(hi, "none", "relu")]
        line = (
            f"At lr {hi:g}, ReLU without BN ends with {100 * relu_plain[0]:.0f}% dead units "
            f"({100 * relu_plain[1]:.1f}% test accuracy)"
        )
        if "batch" in config.norms:
            relu_bn = cells[(hi, "batch", "relu")]
            line += f"; with BN {100 * relu_bn[0]:.0f}% ({100 * relu_bn[1]:.1f}%)."
        result.summary.append(line)
        leaky = [a for a in config.activations if a != "relu"]
        if leaky:
            parts = []
            for a in leaky:
                d, acc = cells[(hi, "none", a)]
                parts.append(
                    f"{LABELS[a]} diverged"
                    if math.isnan(d)
                    else f"{LABELS[a]} {100 * d:.0f}% negative on every input, {100 * acc:.1f}% accuracy"
                )
            result.summary.append(f"Without BN at lr {hi:g}: " + "; ".join(parts) + ".")
        if "batch" in config.norms:
            result.compare(
                "ReLU units die at high learning rates; BN reduces it",
                "widely reported (e.g. Maas et al., 2013; He et al., 2015 motivate leaky/parametric "
                "ReLUs); BN keeps pre-activations centred (Ioffe & Szegedy, 2015)",
                f"lr {hi:g}: {100 * relu_plain[0]:.0f}% dead without BN, {100 * relu_bn[0]:.0f}% with",
                "yes" if relu_bn[0] < relu_plain[0] else "no",
            )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    rows = result.data["runs"]
    plt = pyplot()
    fig, axes = plt.subplots(
        len(config.lrs),
        len(config.norms),
        figsize=(6 * len(config.norms), 3.6 * len(config.lrs)),
        squeeze=False,
        sharey=True,
    )
    for i, lr in enumerate(config.lrs):
        for j, norm in enumerate(config.norms):
            ax = axes[i][j]
            for a in config.activations:
                mine = [r for r in rows if r["activation"] == a and r["norm"] == norm and r["lr"] == lr]
                first = mine[0]
                ax.plot(
                    first["steps"],
                    [100 * d for d in first["dead"]],
                    marker="." if first["diverged"] else None,
                    label=LABELS[a] + (" (diverged)" if first["diverged"] else ""),
                )
            ax.set_title(
                f"lr {lr:g}, {'with' if norm == 'batch' else 'without'} BatchNorm (seed {config.seeds[0]})", fontsize=10
            )
            ax.set_xlabel("step")
            ax.set_ylabel("% units negative on every input")
            ax.legend(fontsize=7)
    result.figure(
        save_figure(fig, out_dir, "dead-units"),
        "Fraction of hidden units whose pre-activation is ≤ 0 on all 1000 probe inputs, over training.",
    )


STUDY = Study(
    name=NAME,
    title="Dead units: ReLU and its leaky variants at high learning rates, with and without BatchNorm",
    question="How many units stop firing for good, by activation, and does BatchNorm prevent it?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(
            activations=("relu", "leaky_relu"), lrs=(0.3,), hidden=(64, 64), steps=200, check_every=100, seeds=(0,)
        ),
        # lr 0.3 only: the comparison and the summary read the highest rate alone, and the lr 0.1
        # runs were half the study's time (its numbers at 0.3 are the same with or without them)
        "quick": Config(lrs=(0.3,), steps=1000, check_every=100, seeds=(0,)),
        "full": Config(),
    },
)
