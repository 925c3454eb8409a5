"""dropout-order: dropout before BatchNorm shifts its variance between training and test.

In training, dropout scales the kept units by 1/q (q = 1 − p, the keep probability), which
keeps their mean but raises their variance; at test time dropout is off. A BatchNorm that
sees dropped-out inputs learns running statistics of the *training* variance, and at test
time normalizes inputs whose variance is smaller: Li, Chen, Hu & Yang (2019) call this the
variance shift. For an input of mean c and variance v, dropped out just before the BN,

    Var_test / Var_train = v / ((c² + v) / q − c²)        (= q for zero-mean inputs).

The MNIST-1D CNN with BatchNorm is trained with dropout at three places (``dropout_nets``):
after every ReLU (the order usually taught — it feeds the next block's conv and BN), right
before every BN, and once after the last block (no BN downstream: Li et al.'s first
remedy), and without dropout as the baseline. After training, on the test set in eval
mode, per BN layer and channel: the ratio of the input's variance to the running variance
the layer will divide by (1 when test matches training), Li et al.'s shift max(ratio,
1/ratio), and for dropout right before BN the ratio their formula predicts from the
measured c and v (checked at the first BN: deeper ones also inherit the shift of the
layers above). Then ``normlab.surgery.precise_bn`` recomputes the statistics over the
training set with dropout off (BN alone in training mode) and the same is measured again.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ... import nn as nln
from ...surgery import precise_bn
from ..data import load_mnist1d, subset
from ..output import pyplot, save_figure
from ..runner import parallel_map
from ..study import Study, StudyResult
from ..training import TrainConfig, evaluate, train_classifier
from .dropout_nets import conv_net

NAME = "dropout-order"
LARGE_SHIFT = 1.5  # Li et al.'s max(r, 1/r) above which a layer counts as badly shifted
NOISE_POINTS = 0.5  # accuracy differences below this are seed noise on 1000 test samples
BATCH_NORMS = (nln.BatchNorm1d, nln.BatchNorm2d, nln.BatchNorm3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PLACEMENT_LABELS = {
    "none": "no dropout",
    "relu": "after each ReLU (→ next BN)",
    "norm": "right before each BN",
    "head": "after the last block only",
}


@dataclass(frozen=True)
class Config:
    placements: tuple[str, ...] = ("relu", "norm", "head")
    dropouts: tuple[float, ...] = (0.1, 0.3, 0.5)
    epochs: int = 10
    train_samples: int | None = None  # None: all 4000
    seeds: tuple[int, ...] = (0, 1, 2)


@torch.no_grad()
def variance_shift(model: nn.Module, x: torch.Tensor, keep: float | None = None) -> list[dict]:
    """Per BatchNorm layer (in order), on ``x`` in eval mode: the mean over channels of
    the input variance / running variance, of Li et al.'s shift max(r, 1/r), and — with
    ``keep`` — of the ratio their formula predicts for dropout (keep probability ``keep``)
    applied right before the layer."""
    layers = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, m in enumerate(layers)
    ]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for i, layer in enumerate(layers):
        z = inputs[i].double()
        dims = (0,) + tuple(range(2, z.dim()))
        var, mean = torch.var_mean(z, dim=dims, correction=0)
        ratio = var / layer.running_var.double()
        record = {
            "ratio": ratio.mean().item(),
            "shift": torch.maximum(ratio, 1 / ratio).mean().item(),
            "ratio_per_channel": ratio.tolist(),
        }
        if keep is not None:
            predicted = var / ((mean.square() + var) / keep - mean.square())
            record["predicted_ratio"] = predicted.mean().item()
        out.append(record)
    return out


def one_run(config: Config, placement: str, dropout: float, seed: int) -> dict:
    data = subset(load_mnist1d(), config.train_samples)
    torch.manual_seed(seed)
    model = conv_net("batch", dropout, placement if dropout else "relu")
    train = TrainConfig(batch_size=32, epochs=config.epochs, seed=seed)
    result = train_classifier(model, data, train, test_every_epoch=False)
    keep = 1.0 - dropout if placement == "norm" and dropout else None
    row = {
        "placement": placement,
        "dropout": dropout,
        "seed": seed,
        "diverged": result.diverged,
        "eval_accuracy": result.test_accuracy,
        "seconds": result.seconds,
    }
    if result.diverged:
        return row
    row["layers"] = variance_shift(model, data.x_test, keep)
    g = torch.Generator().manual_seed(seed + 1000)
    order = torch.randperm(len(data.y_train), generator=g)
    per_epoch = len(data.y_train) // train.batch_size
    batches = [data.x_train[order[i * train.batch_size : (i + 1) * train.batch_size]] for i in range(per_epoch)]
    # precise_bn runs only the BN layers in training mode: dropout is off while it measures.
    recalibrated = precise_bn(model, batches, num_batches=len(batches)).model
    row["precise_accuracy"] = evaluate(recalibrated, data.x_test, data.y_test)
    row["precise_layers"] = variance_shift(recalibrated, data.x_test)
    return row


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else math.nan


def _combos(config: Config) -> list[tuple[str, float]]:
    """(placement, p) of every network trained: largest p first (the slowest), no dropout last."""
    return [(pl, p) for p in sorted(config.dropouts, reverse=True) for pl in config.placements] + [("none", 0.0)]


def measure(config: Config, out_dir: Path) -> dict:
    combos = _combos(config)
    tasks = [{"config": config, "placement": pl, "dropout": p, "seed": s} for pl, p in combos for s in config.seeds]
    rows = parallel_map(one_run, tasks, desc=NAME)
    return {"runs": rows}


def summarise(config: Config, result: StudyResult) -> None:
    rows, combos = result.data["runs"], _combos(config)
    cells = {}
    for pl, p in combos:
        mine = [r for r in rows if r["placement"] == pl and r["dropout"] == p and not r["diverged"]]
        n_layers = len(mine[0]["layers"]) if mine else 0
        cells[(pl, p)] = {
            "eval": _mean(100 * r["eval_accuracy"] for r in mine),
            "precise": _mean(100 * r["precise_accuracy"] for r in mine),
            "ratio": [_mean(r["layers"][i]["ratio"] for r in mine) for i in range(n_layers)],
            "shift": [_mean(r["layers"][i]["shift"] for r in mine) for i in range(n_layers)],
            "predicted": [_mean(r["layers"][i].get("predicted_ratio") for r in mine) for i in range(n_layers)],
            "precise_shift": [_mean(r["precise_layers"][i]["shift"] for r in mine) for i in range(n_layers)],
            "diverged": sum(r["diverged"] for r in rows if r["placement"] == pl and r["dropout"] == p),
        }
    result.data["cells"] = [{"placement": pl, "dropout": p, **c} for (pl, p), c in cells.items()]
    _table(config, cells, result)
    _findings(config, cells, result)


def _table(config: Config, cells: dict, result: StudyResult) -> None:
    table = []
    for pl, p in _combos(config):
        c = cells[(pl, p)]
        table.append(
            [
                PLACEMENT_LABELS[pl],
                f"{p:g}",
                " / ".join(f"{r:.2f}" for r in c["ratio"]),
                " / ".join(f"{s:.2f}" for s in c["shift"]),
                " / ".join("–" if math.isnan(v) else f"{v:.2f}" for v in c["predicted"]),
                " / ".join(f"{s:.2f}" for s in c["precise_shift"]),
                f"{c['eval']:.1f}",
                f"{c['precise']:.1f}",
                f"{c['precise'] - c['eval']:+.1f}",
            ]
        )
    result.table(
        f"Per BN layer (1 / 2 / 3): variance ratio and shift on the test set; test accuracy % "
        f"({len(config.seeds)} seed(s), {config.epochs} epochs)",
        [
            "dropout placed",
            "p",
            "Var_test / running var",
            "shift max(r, 1/r)",
            "Li et al. predicted ratio",
            "shift after precise BN",
            "eval accuracy",
            "after precise BN",
            "recovered",
        ],
        table,
        note="Li et al.'s formula applies to dropout directly before a BN; '–' elsewhere.",
    )


def _findings(config: Config, cells: dict, result: StudyResult) -> None:
    """The summary lines and the comparison with Li et al. (2019)."""
    base = cells[("none", 0.0)]
    p_max = max(config.dropouts)

    def worst(pl):  # the most shifted layer of a placement at the largest p
        return max(cells[(pl, p_max)]["shift"])

    shifted = [pl for pl in ("relu", "norm") if pl in config.placements]
    for pl in config.placements:
        c = cells[(pl, p_max)]
        result.summary.append(
            f"p = {p_max:g}, dropout {PLACEMENT_LABELS[pl]}: variance ratio per BN layer "
            f"{', '.join(f'{r:.2f}' for r in c['ratio'])}; eval accuracy {c['eval']:.1f}%, after precise BN "
            f"{c['precise']:.1f}% (no dropout: {base['eval']:.1f}%)."
        )
    if "norm" in config.placements:
        # The formula is checked at the first BN: deeper ones also receive the shift of the
        # layers above (their test-time input is already mis-normalized), which compounds.
        c = cells[("norm", p_max)]
        measured, predicted = c["ratio"][0], c["predicted"][0]
        close = abs(measured - predicted) < 0.1 * predicted and measured < 0.9
        result.compare(
            "Dropout right before BN: test-time variance below the running variance, as predicted",
            "Li et al. (2019): Var_test/Var_train = v/((c²+v)/q − c²) for keep probability q, "
            "= q for zero-mean input (their variance-shift formula)",
            f"p = {p_max:g}, first BN: measured ratio {measured:.2f}, formula {predicted:.2f} "
            f"(no dropout {base['ratio'][0]:.2f}); deeper BNs {', '.join(f'{r:.2f}' for r in c['ratio'][1:])}"
            f" — the shift compounds",
            "yes" if close else "partly",
            "" if close else "the measured ratio is more than 10% off the formula",
        )
    if shifted and "head" in config.placements:
        gaps = {pl: cells[(pl, p_max)]["precise"] - cells[(pl, p_max)]["eval"] for pl in config.placements}
        bigger = all(worst(pl) > worst("head") for pl in shifted)
        result.compare(
            "Dropout before BN shifts the variance; dropout after every BN does not",
            "Li et al. (2019): the shift grows with the drop rate wherever dropout precedes a BN, and "
            "disappears when dropout is placed after all BN layers (qualitative here: their numbers are "
            "CIFAR ResNet/DenseNet errors)",
            f"p = {p_max:g}, largest per-layer shift: "
            + ", ".join(f"{PLACEMENT_LABELS[pl]} {worst(pl):.2f}" for pl in config.placements),
            "yes" if bigger else "no",
            "" if bigger else "the head placement is as shifted as the others",
        )
        # Recovery is expected where the shift is large; where it is small there is little to recover.
        large = [pl for pl in shifted if worst(pl) > LARGE_SHIFT]
        recovered = [pl for pl in large if gaps[pl] > NOISE_POINTS]
        if large and len(recovered) == len(large):
            agrees, why = "yes", ""
        elif recovered:
            agrees, why = "partly", "some strongly shifted placements gain less than half a point"
        else:
            agrees = "no"
            why = (
                f"no placement is shifted by more than ×{LARGE_SHIFT:g} here"
                if not large
                else "recomputing the statistics does not recover accuracy here"
            )
        result.compare(
            "Recomputing BN statistics with dropout off recovers the accuracy",
            "Li et al. (2019): re-estimating the moving means and variances with dropout off "
            "improves test accuracy (qualitative)",
            f"p = {p_max:g}, precise BN − eval: "
            + ", ".join(f"{PLACEMENT_LABELS[pl]} {gaps[pl]:+.1f}" for pl in config.placements)
            + f" points (recovery expected where the shift exceeds ×{LARGE_SHIFT:g})",
            agrees,
            why,
        )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    cells = {(c["placement"], c["dropout"]): c for c in result.data["cells"]}
    base = cells[("none", 0.0)]
    n_layers = len(base["ratio"])
    plt = pyplot()
    p_max = max(config.dropouts)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.3))
    width = 0.8 / (len(config.placements) + 1)
    xs = list(range(n_layers))
    for k, pl in enumerate(("none", *config.placements)):
        c = cells[(pl, 0.0 if pl == "none" else p_max)]
        pos = [x + (k - len(config.placements) / 2) * width for x in xs]
        ax.bar(pos, c["ratio"], width, label=PLACEMENT_LABELS[pl])
        if pl == "norm":
            ax.plot(pos, c["predicted"], "k_", ms=14, mew=2, label="Li et al.'s formula (right before BN)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(xs, [f"BN {i + 1}" for i in xs])
    ax.set_ylabel("input variance in eval / running variance")
    ax.set_title(f"Variance shift on the test set, dropout p = {p_max:g}", fontsize=10)
    ax.legend(fontsize=7)
    ps = sorted(config.dropouts)
    for pl in config.placements:
        (line,) = ax2.plot(ps, [cells[(pl, p)]["eval"] for p in ps], marker="o", label=f"{PLACEMENT_LABELS[pl]}: eval")
        ax2.plot(
            ps,
            [cells[(pl, p)]["precise"] for p in ps],
            marker="s",
            ls="--",
            color=line.get_color(),
            label="  … after precise BN (dropout off)",
        )
    ax2.axhline(base["eval"], color="grey", ls=":", label="no dropout")
    ax2.set_xlabel("dropout p")
    ax2.set_ylabel("test accuracy %")
    ax2.set_title("Accuracy lost to the shift, and recovered by recomputing BN statistics", fontsize=10)
    ax2.legend(fontsize=7)
    result.figure(
        save_figure(fig, out_dir, "dropout-order"),
        "Left: per BN layer, the test-time input variance over the running variance (1 = no shift). "
        "Right: test accuracy against the dropout rate, with the running statistics from training "
        "(solid) and after precise BN with dropout off (dashed).",
    )


STUDY = Study(
    name=NAME,
    title="Dropout and BatchNorm: the variance shift, and where dropout goes",
    question="Does dropout before a BatchNorm shift its test-time variance, and does recomputing the statistics fix it?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(dropouts=(0.5,), epochs=2, train_samples=1000, seeds=(0,)),
        "quick": Config(dropouts=(0.2, 0.5), epochs=5, seeds=(0,)),
        "full": Config(),
    },
)
