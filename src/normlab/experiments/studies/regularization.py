"""regularization: which regularizers does BatchNorm make unnecessary — dropout, L2, both?

The MNIST-1D CNN (3 × [Conv1d(32) → norm → ReLU → dropout] → linear) and a 3 × 100 ReLU
MLP, trained on a reduced training set (1000 of the 4000 samples) so that they overfit,
over the grid {no norm, BatchNorm} × dropout p ∈ {0, 0.1, 0.3, 0.5} × weight decay
λ ∈ {0, small, large} (large = 5 × small, the factor by which Ioffe & Szegedy reduced
BN-Inception's L2). SGD with momentum 0.9, cosine schedule, batch 32; tested in eval mode
on the full 1000-sample test set; the train accuracy is measured the same way, on the
training subset, so train − test is the generalization gap.

A regularizer is "needed" where the best cell using it beats the best cell without it by
more than the noise (``noise_points``). Ioffe & Szegedy (2015, §4.2.1) removed dropout from
BN-Inception and reduced its L2 weight ×5, and both improved held-out accuracy; they give
no ablation numbers for either change alone, so the comparison is qualitative.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import load_mnist1d, subset
from ..output import heatmap, pyplot, save_figure
from ..runner import grid, parallel_map
from ..study import Study, StudyResult
from ..training import TrainConfig, evaluate, train_classifier
from .dropout_nets import conv_net, mlp

NAME = "regularization"
MODEL_LABELS = {"cnn": "CNN", "mlp": "MLP 3×100"}
NORM_LABELS = {"none": "no norm", "batch": "BatchNorm"}


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("cnn", "mlp")
    dropouts: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)
    weight_decays: tuple[float, ...] = (0.0, 5e-4, 2.5e-3)  # 0, small, large = 5 × small
    train_samples: int = 1000
    epochs: int = 40
    lr: dict | None = None  # per model at batch 32; None: CNN 0.1, MLP 0.05
    noise_points: float = 0.5  # accuracy differences below this are called equal
    seeds: tuple[int, ...] = (0, 1, 2)

    def lr_for(self, model: str) -> float:
        return (self.lr or {"cnn": 0.1, "mlp": 0.05})[model]


def one_run(config: Config, model: str, norm: str, dropout: float, weight_decay: float, seed: int) -> dict:
    data = subset(load_mnist1d(), config.train_samples)
    torch.manual_seed(seed)
    net = conv_net(norm, dropout) if model == "cnn" else mlp(norm, dropout)
    train = TrainConfig(
        batch_size=32, epochs=config.epochs, base_lr=config.lr_for(model), weight_decay=weight_decay, seed=seed
    )
    result = train_classifier(net, data, train, test_every_epoch=False)
    train_accuracy = 0.0 if result.diverged else evaluate(net, data.x_train, data.y_train)
    return {
        "model": model,
        "norm": norm,
        "dropout": dropout,
        "weight_decay": weight_decay,
        "seed": seed,
        "diverged": result.diverged,
        "test_accuracy": result.test_accuracy,
        "train_accuracy": train_accuracy,
        "gap": train_accuracy - result.test_accuracy,
        "seconds": result.seconds,
    }


def _cells(config: Config, rows: list[dict]) -> dict:
    cells = {}
    for m in config.models:
        for n in ("none", "batch"):
            for p in config.dropouts:
                for wd in config.weight_decays:
                    mine = [
                        r for r in rows if (r["model"], r["norm"], r["dropout"], r["weight_decay"]) == (m, n, p, wd)
                    ]
                    test = [100 * r["test_accuracy"] for r in mine]
                    cells[(m, n, p, wd)] = {
                        "test": statistics.fmean(test),
                        "test_sd": statistics.stdev(test) if len(test) > 1 else 0.0,
                        "gap": statistics.fmean(100 * r["gap"] for r in mine),
                        "train": statistics.fmean(100 * r["train_accuracy"] for r in mine),
                        "diverged": sum(r["diverged"] for r in mine),
                    }
    return cells


def gains(config: Config, cells: dict, model: str, norm: str) -> dict:
    """What each regularizer adds at its best: best test accuracy of the cells using it
    minus the best of the cells without it (points), and the best cell overall."""
    mine = {k[2:]: v["test"] for k, v in cells.items() if k[:2] == (model, norm)}
    best = max(mine, key=mine.get)
    without_dropout = max(v for (p, _), v in mine.items() if p == 0)
    with_dropout = max(v for (p, _), v in mine.items() if p > 0)
    without_l2 = max(v for (_, wd), v in mine.items() if wd == 0)
    with_l2 = max(v for (_, wd), v in mine.items() if wd > 0)
    positive = sorted(wd for wd in config.weight_decays if wd > 0)
    small_vs_large = None
    if len(positive) > 1 and 0.0 in config.dropouts:
        # no dropout: the smallest L2 against the largest (×5 apart by default), the paper's change
        small_vs_large = mine[(0.0, positive[0])] - mine[(0.0, positive[-1])]
    return {
        "best": {"dropout": best[0], "weight_decay": best[1], "test": mine[best]},
        "dropout_gain": with_dropout - without_dropout,
        "l2_gain": with_l2 - without_l2,
        "small_vs_large_l2": small_vs_large,
    }


def _heatmaps(config: Config, cells: dict, out_dir: Path) -> str:
    plt = pyplot()
    cols = [("test", "none"), ("test", "batch"), ("gap", "none"), ("gap", "batch")]
    fig, axes = plt.subplots(len(config.models), 4, figsize=(16, 3.6 * len(config.models)), squeeze=False)
    for i, m in enumerate(config.models):
        for j, (key, n) in enumerate(cols):
            ax = axes[i][j]
            grid = [[cells[(m, n, p, wd)][key] for wd in config.weight_decays] for p in config.dropouts]
            # one colour scale per model and quantity, so the BN and no-norm panels compare directly
            same = [v[key] for k, v in cells.items() if k[0] == m]
            heatmap(ax, grid, cmap="viridis" if key == "test" else "magma", vmin=min(same), vmax=max(same))
            ax.set_xticks(range(len(config.weight_decays)), [f"{wd:g}" for wd in config.weight_decays])
            ax.set_yticks(range(len(config.dropouts)), [f"{p:g}" for p in config.dropouts])
            ax.set_xlabel("weight decay λ")
            ax.set_ylabel("dropout p")
            what = "test accuracy %" if key == "test" else "train − test gap (points)"
            ax.set_title(f"{MODEL_LABELS[m]}, {NORM_LABELS[n]}: {what}", fontsize=9)
    fig.suptitle(
        f"MNIST-1D, {config.train_samples} training samples, {config.epochs} epochs, "
        f"mean of {len(config.seeds)} seed(s)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, out_dir, "regularization")


def measure(config: Config, out_dir: Path) -> dict:
    # CNN jobs are the long ones: first, so the workers finish together.
    tasks = grid(
        {"config": config},
        model=sorted(config.models),
        seed=config.seeds,
        norm=("batch", "none"),
        dropout=config.dropouts,
        weight_decay=config.weight_decays,
    )
    rows = parallel_map(one_run, tasks, desc=NAME)
    return {"runs": rows}


def summarise(config: Config, result: StudyResult) -> None:
    rows = result.data["runs"]
    cells = _cells(config, rows)
    result.data["cells"] = [
        {"model": k[0], "norm": k[1], "dropout": k[2], "weight_decay": k[3], **v} for k, v in cells.items()
    ]
    _tables(config, cells, result)
    summary = _gains_table(config, cells, result)
    _findings(config, cells, summary, result)


def _tables(config: Config, cells: dict, result: StudyResult) -> None:
    sd = len(config.seeds) > 1
    for m in config.models:
        rows_ = []
        for p in config.dropouts:
            row = [f"{p:g}"]
            for n in ("none", "batch"):
                for wd in config.weight_decays:
                    c = cells[(m, n, p, wd)]
                    row.append(
                        f"{c['test']:.1f}"
                        + (f" ± {c['test_sd']:.1f}" if sd else "")
                        + f" (gap {c['gap']:.1f})"
                        + (f" {c['diverged']} diverged" if c["diverged"] else "")
                    )
            rows_.append(row)
        result.table(
            f"{MODEL_LABELS[m]}: test accuracy % (train − test gap, points)",
            ["dropout"] + [f"{NORM_LABELS[n]}, λ={wd:g}" for n in ("none", "batch") for wd in config.weight_decays],
            rows_,
            note=f"{config.train_samples} training samples, {config.epochs} epochs, lr "
            f"{config.lr_for(m):g} cosine, {len(config.seeds)} seed(s).",
        )


def _gains_table(config: Config, cells: dict, result: StudyResult) -> dict:
    """What dropout and L2 add at their best, per model and norm (also the summary lines)."""
    eps = config.noise_points
    summary = {}
    verdict_rows = []
    for m in config.models:
        g = {n: gains(config, cells, m, n) for n in ("none", "batch")}
        summary[m] = g
        for n in ("none", "batch"):
            b = g[n]["best"]
            verdict_rows.append(
                [
                    MODEL_LABELS[m],
                    NORM_LABELS[n],
                    f"{b['test']:.1f} (p={b['dropout']:g}, λ={b['weight_decay']:g})",
                    f"{g[n]['dropout_gain']:+.1f}",
                    f"{g[n]['l2_gain']:+.1f}",
                    "–" if g[n]["small_vs_large_l2"] is None else f"{g[n]['small_vs_large_l2']:+.1f}",
                ]
            )
        plain = (
            {n: cells[(m, n, 0.0, 0.0)] for n in ("none", "batch")}
            if 0.0 in config.dropouts and 0.0 in config.weight_decays
            else None
        )
        needs = {
            n: [name for name, key in (("dropout", "dropout_gain"), ("L2", "l2_gain")) if g[n][key] > eps]
            for n in ("none", "batch")
        }
        result.summary.append(
            f"{MODEL_LABELS[m]}: best without BN {g['none']['best']['test']:.1f}%, with BN {g['batch']['best']['test']:.1f}%. "
            f"Regularizers that add more than {eps:g} points — without BN: {', '.join(needs['none']) or 'none'}; "
            f"with BN: {', '.join(needs['batch']) or 'none'}."
            + (
                f" With neither dropout nor L2 the gap is {plain['none']['gap']:.1f} points without BN and "
                f"{plain['batch']['gap']:.1f} with BN."
                if plain
                else ""
            )
        )
    result.data["gains"] = summary
    result.table(
        "What each regularizer adds at its best (test accuracy points)",
        [
            "model",
            "norm",
            "best cell",
            "dropout: best with − best without",
            "L2: best with − best without",
            "no dropout: small L2 − large L2 (×5)",
        ],
        verdict_rows,
        note=f"Differences under {eps:g} points are within seed noise on 1000 test samples.",
    )
    return summary


def _findings(config: Config, cells: dict, summary: dict, result: StudyResult) -> None:
    """The comparison with Ioffe & Szegedy (2015) §3.4 and §4.2.1."""
    eps = config.noise_points
    main = "cnn" if "cnn" in config.models else config.models[0]
    g = summary[main]
    d_bn, d_none = g["batch"]["dropout_gain"], g["none"]["dropout_gain"]
    if d_bn <= eps and d_none > eps:
        agrees, why = "yes", ""
    elif d_bn <= eps:
        fit = max(c["train"] for k, c in cells.items() if k[:2] == (main, "none"))
        agrees, why = (
            "partly",
            (
                f"dropout does not help here even without BN ({d_none:+.1f} points), so BN has "
                f"nothing to replace: without BN this network fits at most {fit:.0f}% of its "
                "training set, and dropout only makes fitting harder"
            ),
        )
    else:
        agrees, why = "no", f"dropout still adds {d_bn:+.1f} points with BN"
    result.compare(
        "With BN, dropout can be removed",
        "Ioffe & Szegedy (2015) §4.2.1: removing dropout from BN-Inception gave higher validation "
        "accuracy (qualitative: no number for this change alone)",
        f"{MODEL_LABELS[main]}: best with dropout − best without, with BN {d_bn:+.1f} points "
        f"(without BN {d_none:+.1f})",
        agrees,
        why,
    )
    svl = g["batch"]["small_vs_large_l2"]
    if svl is not None:
        svl_none = g["none"]["small_vs_large_l2"]
        result.compare(
            "With BN, L2 can be made ×5 smaller",
            "§4.2.1: BN-Inception's L2 weight reduced ×5, which improved held-out accuracy (qualitative)",
            f"{MODEL_LABELS[main]}, no dropout: λ small − λ large = {svl:+.1f} points with BN "
            f"({svl_none:+.1f} without)",
            "yes" if svl >= -eps else "no",
            "" if svl >= -eps else "the larger L2 is better with BN here",
        )
    plain = cells.get((main, "batch", 0.0, 0.0)), cells.get((main, "none", 0.0, 0.0))
    if all(plain):
        bn_cell, none_cell = plain
        better = bn_cell["test"] > none_cell["test"] + eps
        result.compare(
            "BN itself regularizes",
            "Ioffe & Szegedy (2015) §3.4: BN regularizes the model and reduces the need for dropout (qualitative)",
            f"{MODEL_LABELS[main]}, no dropout or L2: test {bn_cell['test']:.1f}% with BN vs "
            f"{none_cell['test']:.1f}% without; gap {bn_cell['gap']:.1f} vs {none_cell['gap']:.1f} points",
            "yes" if better and bn_cell["gap"] < none_cell["gap"] else "partly" if better else "no",
            ""
            if better and bn_cell["gap"] < none_cell["gap"]
            else "BN tests better but also fits the training set harder, so its train − test gap is not "
            "smaller: better optimization, not only regularization"
            if better
            else "BN does not test better here",
        )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    cells = _cells(config, result.data["runs"])
    result.figure(
        _heatmaps(config, cells, out_dir),
        "Test accuracy and train − test gap for every dropout × weight-decay cell, without and with "
        "BatchNorm (each panel coloured on its own model's range).",
    )


STUDY = Study(
    name=NAME,
    title="Regularization: what BatchNorm makes unnecessary — dropout, L2",
    question="With BatchNorm, do dropout and weight decay still improve test accuracy on a small training set?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(
            models=("cnn",),
            dropouts=(0.0, 0.5),
            weight_decays=(0.0, 2.5e-3),
            train_samples=500,
            epochs=6,
            seeds=(0,),
        ),
        # dropout 0 and 0.1: every verdict reads the best cell with and without dropout, and p = 0.5
        # was the worst with and without BN (62 and 46% against 92 and 60% at 0.1), its runs the slowest
        "quick": Config(models=("cnn",), dropouts=(0.0, 0.1), epochs=20, seeds=(0,)),
        "full": Config(),
    },
)
