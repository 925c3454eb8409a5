"""convergence: the Batch Normalization paper's Figure 1 on MNIST-1D.

A 3 × 100 sigmoid MLP from small Gaussian weights N(0, 0.01²), with and without
BatchNorm before each sigmoid, trained by SGD on minibatches of 60 (Ioffe & Szegedy, 2015,
§4.1 used MNIST and 50,000 steps; MNIST-1D is harder for an MLP — its published MLP
accuracy is 68% — and the step count is scaled to a CPU). Recorded every
``check_every`` steps: test accuracy, and the 15th/50th/85th percentiles over the test set
of the input to each sigmoid of the last hidden layer (BatchNorm's output where present;
measured in eval mode). Without BN those distributions drift as the layers below change;
with BN they stay put.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import load_mnist1d
from ..models import MLP
from ..output import finite_or_none, pyplot, save_figure
from ..runner import grid, parallel_map
from ..study import Study, StudyResult
from ..training import StepConfig, evaluate, train_steps

NAME = "convergence"

LABELS = {"none": "without BN", "batch": "with BN"}


@dataclass(frozen=True)
class Config:
    steps: int = 20000
    batch_size: int = 60
    lr: float = 0.1
    momentum: float = 0.9
    init_std: float = 0.01
    hidden: tuple[int, ...] = (100, 100, 100)
    check_every: int = 500
    unit: int = 0  # the "typical sigmoid" drawn in the figure (all units are summarized)
    seeds: tuple[int, ...] = (0, 1, 2)


def one_run(config: Config, norm: str, seed: int) -> dict:
    data = load_mnist1d()
    torch.manual_seed(seed)
    model = MLP(
        40, config.hidden, 10, activation="sigmoid", norm=norm, init="normal", init_std=config.init_std, seed=seed
    )
    captured = {}
    model.blocks[-1].norm.register_forward_hook(lambda m, a, out: captured.__setitem__("z", out.detach()))
    q = torch.tensor([0.15, 0.5, 0.85])

    @torch.no_grad()
    def check(step, m):
        accuracy = evaluate(m, data.x_test, data.y_test)
        m.eval()  # one pass over the whole test set for the hook (evaluate() goes in chunks)
        m(data.x_test)
        z = captured["z"]
        m.train()
        pct = torch.quantile(z, q, dim=0)  # (3, units)
        return {"test_accuracy": accuracy, "p15": pct[0].tolist(), "p50": pct[1].tolist(), "p85": pct[2].tolist()}

    result = train_steps(
        model,
        data,
        StepConfig(
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            check_every=config.check_every,
            seed=seed,
        ),
        on_check=check,
    )
    return {
        "norm": norm,
        "seed": seed,
        "diverged": result.diverged,
        "seconds": result.seconds,
        "final_accuracy": result.test_accuracy,
        "history": result.history,
    }


def _drift(history: list[dict]) -> float:
    """How far the sigmoid inputs wandered: per unit, the path length of its median over
    the checks (Σ|Δ median|, from initialization on) in units of its final 15–85 spread,
    averaged over the units."""
    values = []
    for unit in range(len(history[0]["p50"])):
        path = sum(abs(b["p50"][unit] - a["p50"][unit]) for a, b in zip(history, history[1:]))
        spread = history[-1]["p85"][unit] - history[-1]["p15"][unit]
        values.append(path / max(spread, 1e-12))
    return statistics.fmean(values)


def _steps_to(history: list[dict], level: float) -> int | None:
    for h in history:
        if h.get("test_accuracy", 0) >= level:
            return h["step"]
    return None


def measure(config: Config, out_dir: Path) -> dict:
    tasks = grid({"config": config}, seed=config.seeds, norm=("batch", "none"))
    return {"runs": parallel_map(one_run, tasks, desc=NAME)}


def summarise(config: Config, result: StudyResult) -> None:
    runs = result.data["runs"]
    rows, summary = [], {}
    for norm in ("none", "batch"):
        mine = [r for r in runs if r["norm"] == norm]
        finals = [r["final_accuracy"] for r in mine]
        drifts = [_drift(r["history"]) for r in mine]
        half = [_steps_to(r["history"], 0.5) for r in mine]
        summary[norm] = {"final_accuracy": finals, "drift": drifts, "steps_to_50": half}
        rows.append(
            [
                LABELS[norm],
                _pm(finals),
                _pm(drifts, pct=False),
                ", ".join("never" if s is None else str(s) for s in half),
            ]
        )
    result.data["summary"] = summary
    result.table(
        f"After {config.steps} steps ({len(config.seeds)} seed(s))",
        [
            "model",
            "test accuracy %",
            "path length of sigmoid-input medians (× final 15–85 spread)",
            "steps to 50% test accuracy",
        ],
        rows,
    )
    acc_bn = statistics.fmean(summary["batch"]["final_accuracy"])
    acc_none = statistics.fmean(summary["none"]["final_accuracy"])
    d_bn = statistics.fmean(summary["batch"]["drift"])
    d_none = statistics.fmean(summary["none"]["drift"])
    result.summary += [
        f"With BN the MLP reaches {100 * acc_bn:.1f}% test accuracy in {config.steps} steps, without "
        f"{100 * acc_none:.1f}%.",
        f"The medians of the last layer's sigmoid inputs travel {d_none:.2f}× their final 15–85 spread "
        f"over training without BN and {d_bn:.2f}× with BN (mean over the {config.hidden[-1]} units).",
    ]
    result.compare(
        "BN trains faster and reaches higher accuracy",
        "Ioffe & Szegedy (2015) Fig. 1a: on MNIST, the BN network reaches higher test accuracy, sooner",
        f"{100 * acc_bn:.1f}% vs {100 * acc_none:.1f}% after {config.steps} steps",
        "yes" if acc_bn > acc_none else "no",
    )
    result.compare(
        "BN keeps the sigmoid inputs' distribution stable",
        "Fig. 1b, c: without BN the 15/50/85th percentiles drift over training; with BN they stay put",
        f"median path {d_none:.2f}× (no BN) vs {d_bn:.2f}× (BN) the final 15–85 spread",
        "yes" if d_bn < d_none else "no",
        "" if d_bn < d_none else "at this scale the drift is not smaller with BN",
    )
    result.data["final_accuracy"] = {"batch": finite_or_none(acc_bn), "none": finite_or_none(acc_none)}


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    runs = result.data["runs"]
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for norm, color in (("none", "tab:red"), ("batch", "tab:blue")):
        mine = [r for r in runs if r["norm"] == norm]
        steps = [h["step"] for h in mine[0]["history"]]
        accs = [[h["test_accuracy"] for h in r["history"]] for r in mine]
        mean = [statistics.fmean(a) for a in zip(*accs)]
        axes[0].plot(steps, mean, color=color, label=LABELS[norm])
        if len(accs) > 1:
            lo = [min(a) for a in zip(*accs)]
            hi = [max(a) for a in zip(*accs)]
            axes[0].fill_between(steps, lo, hi, color=color, alpha=0.2)
        ax = axes[1 if norm == "none" else 2]
        h = mine[0]["history"]
        for key, style in (("p15", ":"), ("p50", "-"), ("p85", ":")):
            ax.plot(steps, [x[key][config.unit] for x in h], style, color=color, label=f"{key[1:]}th")
        ax.set_title(f"input to one last-layer sigmoid, {LABELS[norm]}", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0].set_title("test accuracy (band: min–max over seeds)", fontsize=10)
    axes[0].set_xlabel("step")
    axes[0].legend()
    lims = [min(a.get_ylim()[0] for a in axes[1:]), max(a.get_ylim()[1] for a in axes[1:])]
    for a in axes[1:]:
        a.set_ylim(lims)
    result.figure(
        save_figure(fig, out_dir, "convergence"),
        "Left: test accuracy vs training step (Ioffe & Szegedy Fig. 1a). Middle and right: the 15th, "
        "50th and 85th percentiles of one sigmoid's input over the test set (Fig. 1b, c).",
    )


def _pm(values, pct=True) -> str:
    scale = 100 if pct else 1
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}" if pct else f"{mean:.2f}"
    sd = statistics.stdev(values) * scale
    return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.2f} ± {sd:.2f}"


STUDY = Study(
    name=NAME,
    title="Convergence: BatchNorm's Figure 1 on MNIST-1D",
    question="Does BatchNorm make a sigmoid MLP train faster, and keep its layers' input distributions fixed?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(steps=300, check_every=100, seeds=(0,)),
        "quick": Config(steps=3000, check_every=250, seeds=(0,)),
        "full": Config(),
    },
)
