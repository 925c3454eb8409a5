"""qk-norm: attention-logit growth at high learning rates, and QK-layernorm.

The norm-free study's character-level language model (Pre-LN, depth 6) trained at peak
learning rates from 1e-3 to 3e-1, with and without QK-layernorm (a
:class:`normlab.nn.QKNorm` of kind "layer" on the queries and keys of every head). Every few
steps the largest |attention logit| (q·k/√d over the visible query-key pairs of the batch,
every head and block) is recorded. Measured per run: the largest over training, and the final
validation loss; per arm, the loss-vs-learning-rate curve and its learning-rate sensitivity.

Published: Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training
instabilities": the attention logits of small models grow at high learning rates — the
instability Dehghani et al. (2023) met in ViT-22B, where near-one-hot attention made the loss
diverge until q and k were layer-normalized — and QK-layernorm removes it and lowers the
learning-rate sensitivity (the loss-vs-learning-rate curve flattens).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..char_lm import (
    QUICK_RECIPE,
    SMOKE_RECIPE,
    final_loss,
    lm_job,
    lm_record,
    lm_task,
    loss_tie,
    lr_sensitivity,
    trains,
)
from ..output import pyplot, save_figure
from ..runner import parallel_map
from ..study import Study, StudyResult
from ..text import load_text, ngram_loss

NAME = "qk-norm"
ARMS = ("none", "layer")  # QKNorm kind, or none
LABELS = {"none": "without QK-norm", "layer": "QK-layernorm", "rms": "QK-RMSNorm", "l2": "QK-ℓ2"}
#: The largest logit grows with the rate "by an order of magnitude" to count as growth.
GROWTH = 10.0


@dataclass(frozen=True)
class Config:
    arms: tuple[str, ...] = ARMS
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    norm: str = "layer"  # the model's own norm (Pre-LN)
    depth: int = 6
    width: int = 32
    heads: int = 4
    context: int = 64
    steps: int = 600
    warmup_steps: int = 60
    batch_size: int = 16
    check_every: int = 50
    logit_every: int = 5
    final_valid_windows: int = 512
    seeds: tuple[int, ...] = (0, 1, 2)


def one_run(config: Config, arm: str, lr: float, seed: int) -> dict:
    """One run's task (:func:`~normlab.experiments.char_lm.lm_job`'s arguments); the arm without
    QK-norm is the norm-free study's LayerNorm run at the same rate and seed, trained once in a
    suite run that has both."""
    return lm_task(
        config, config.norm, lr, seed, qk_norm=None if arm == "none" else arm, logit_every=config.logit_every
    )


def measure(config: Config, out_dir: Path) -> dict:
    if "none" not in config.arms or len(config.arms) < 2:
        raise ValueError(f"arms must include 'none' and a QKNorm kind to compare with, got {config.arms}")
    tasks = [
        {"config": config, "arm": a, "lr": lr, "seed": s}
        for lr in sorted(config.lrs)
        for a in config.arms
        for s in config.seeds
    ]
    runs = parallel_map(lm_job, [one_run(**task) for task in tasks], desc=NAME, share=True)
    keys = ("valid_loss", "max_attention_logit")
    runs = [{"arm": t["arm"], "lr": t["lr"], "seed": t["seed"], **lm_record(r, keys)} for t, r in zip(tasks, runs)]
    return {"runs": runs, "unigram_loss": ngram_loss(load_text(), 1)}


def _cell(rows: list[dict], arm: str, lr: float) -> list[dict]:
    return [r for r in rows if r["arm"] == arm and r["lr"] == lr]


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(max(v, 1e-12)) for v in values))


def summarise(config: Config, result: StudyResult) -> None:
    rows = result.data["runs"]
    unigram = result.data["unigram_loss"]
    initial = statistics.fmean(r["initial_valid_loss"] for r in rows)
    stats = {}
    for a in config.arms:
        for lr in config.lrs:
            mine = _cell(rows, a, lr)
            losses = [final_loss(r) for r in mine]
            stats[(a, lr)] = {
                "loss": statistics.fmean(losses),
                "sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "max_logit": _geomean([r["max_attention_logit"] for r in mine]),
                "trains": sum(trains(r, unigram) for r in mine),
            }
    sensitivity = {a: lr_sensitivity({lr: stats[(a, lr)]["loss"] for lr in config.lrs}, initial) for a in config.arms}
    result.data["initial_loss"] = initial
    result.data["by_arm"] = {
        a: {
            "lrs": list(config.lrs),
            "final_loss": [stats[(a, lr)]["loss"] for lr in config.lrs],
            "sd": [stats[(a, lr)]["sd"] for lr in config.lrs],
            "max_attention_logit": [stats[(a, lr)]["max_logit"] for lr in config.lrs],
            "seeds_that_train": [stats[(a, lr)]["trains"] for lr in config.lrs],
            "lr_sensitivity": sensitivity[a],
        }
        for a in config.arms
    }
    k = len(config.seeds)
    result.table(
        f"Largest |attention logit| over {config.steps} steps (geometric mean over seeds), by peak learning rate",
        ["arm"] + [f"lr {lr:g}" for lr in config.lrs],
        [[LABELS[a]] + [f"{stats[(a, lr)]['max_logit']:.3g}" for lr in config.lrs] for a in config.arms],
        note=f"Recorded every {config.logit_every} steps on the training batch: q·k/√d over every visible "
        "query-key pair, head and block.",
    )
    result.table(
        "Final validation loss (nats per character; mean ± sd over seeds), seeds that train",
        ["arm"] + [f"lr {lr:g}" for lr in config.lrs] + ["lr sensitivity"],
        [
            [LABELS[a]]
            + [
                (
                    f"{stats[(a, lr)]['loss']:.3f} ± {stats[(a, lr)]['sd']:.3f}"
                    if k > 1
                    else f"{stats[(a, lr)]['loss']:.3f}"
                )
                + f" ({stats[(a, lr)]['trains']}/{k})"
                for lr in config.lrs
            ]
            + [f"{sensitivity[a]:.3f}"]
            for a in config.arms
        ],
        note=f"A run trains if it does not diverge and ends below {unigram:.3f}, the characters' frequencies alone; "
        "a diverged run counts as its loss at initialization. LR sensitivity (Wortsman et al., 2023): the mean over "
        "the rates of min(loss, loss at initialization) minus the best.",
    )
    _findings(config, result, stats, sensitivity)


def _findings(config: Config, result: StudyResult, stats: dict, sensitivity: dict) -> None:
    low, high = min(config.lrs), max(config.lrs)
    arm = next(a for a in config.arms if a != "none")
    k = len(config.seeds)
    result.summary.append(
        "Largest |attention logit| over training, lowest → highest rate: "
        + "; ".join(
            f"{LABELS[a]} {stats[(a, low)]['max_logit']:.3g} → {stats[(a, high)]['max_logit']:.3g}" for a in config.arms
        )
        + "."
    )
    result.summary.append(
        "Best final loss: "
        + "; ".join(
            f"{LABELS[a]} {min(stats[(a, lr)]['loss'] for lr in config.lrs):.3f} at lr "
            f"{min(config.lrs, key=lambda lr, a=a: stats[(a, lr)]['loss']):g}"
            for a in config.arms
        )
        + "; learning-rate sensitivity: "
        + ", ".join(f"{LABELS[a]} {sensitivity[a]:.3f}" for a in config.arms)
        + "."
    )
    growth = stats[("none", high)]["max_logit"] / stats[("none", low)]["max_logit"]
    result.compare(
        "Attention logits grow at high learning rates, already in a small model",
        "Wortsman et al. (2023): without QK-layernorm the largest attention logit grows with the learning rate in "
        "small models; Dehghani et al. (2023): in ViT-22B such logits made attention near one-hot and the loss "
        "diverge",
        f"without QK-norm, largest |logit| {stats[('none', low)]['max_logit']:.3g} at lr {low:g} → "
        f"{stats[('none', high)]['max_logit']:.3g} at lr {high:g} (×{growth:.3g})",
        "yes" if growth >= GROWTH else "partly" if growth >= GROWTH**0.5 else "no",
        ""
        if growth >= GROWTH
        else f"it grows ×{growth:.3g} over the rates, less than the ×{GROWTH:g} read as growth here",
    )
    with_growth = stats[(arm, high)]["max_logit"] / stats[(arm, low)]["max_logit"]
    below = stats[("none", high)]["max_logit"] / stats[(arm, high)]["max_logit"]
    removed = with_growth < GROWTH**0.5 and below >= GROWTH**0.5
    result.compare(
        f"{LABELS[arm]} removes the logit growth",
        "Wortsman et al. (2023); Dehghani et al. (2023): with q and k layer-normalized the logits stay bounded",
        f"{LABELS[arm]}: largest |logit| {stats[(arm, low)]['max_logit']:.3g} → {stats[(arm, high)]['max_logit']:.3g} "
        f"(×{with_growth:.3g}); at lr {high:g} ×{1 / below:.3g} of the model's without it",
        "yes" if removed else "partly" if below > 1 else "no",
        ""
        if removed
        else f"the logits still grow ×{with_growth:.3g} over the rates with {LABELS[arm]}"
        if below > 1
        else f"{LABELS[arm]} does not lower the largest logit at lr {high:g}",
    )
    trained = {a: [lr for lr in config.lrs if stats[(a, lr)]["trains"] == k] for a in config.arms}
    lost = [lr for lr in trained["none"] if lr not in trained[arm]]
    flatter = sensitivity[arm] < sensitivity["none"]
    tie = loss_tie((0.0, 0.0))
    clearly = flatter and sensitivity["none"] - sensitivity[arm] > tie and not lost
    result.compare(
        f"{LABELS[arm]} flattens the loss-vs-learning-rate curve",
        "Wortsman et al. (2023): QK-layernorm lowers the learning-rate sensitivity and widens the range of rates "
        "that train",
        f"LR sensitivity {sensitivity['none']:.3f} without, {sensitivity[arm]:.3f} with; every seed trains at lr "
        f"{', '.join(f'{lr:g}' for lr in trained['none']) or 'none'} without, "
        f"{', '.join(f'{lr:g}' for lr in trained[arm]) or 'none'} with",
        "yes" if clearly else "partly" if flatter else "no",
        ""
        if clearly
        else (
            f"it fails at lr {', '.join(f'{lr:g}' for lr in lost)} where the model without it trains"
            if lost
            else f"lower by {sensitivity['none'] - sensitivity[arm]:.3f} only, within the {tie:.3f} read as a tie"
        )
        if flatter
        else "the curve is not flatter with it here",
    )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    plt = pyplot()
    rows, by_arm = result.data["runs"], result.data["by_arm"]
    fig, axes = plt.subplots(
        1, 2 + len(config.arms), figsize=(5 * (2 + len(config.arms)), 4.2), constrained_layout=True
    )
    ax_logit, ax_loss, *ax_curves = axes
    for a in config.arms:
        ax_logit.plot(config.lrs, by_arm[a]["max_attention_logit"], marker="o", label=LABELS[a])
        ax_loss.errorbar(
            config.lrs, by_arm[a]["final_loss"], yerr=by_arm[a]["sd"], marker="o", capsize=3, label=LABELS[a]
        )
    ax_logit.set(
        xscale="log", yscale="log", xlabel="peak learning rate", ylabel="largest |attention logit| in training"
    )
    ax_loss.axhline(result.data["unigram_loss"], color="grey", lw=0.8, ls=":", label="character frequencies")
    ax_loss.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss (nats / character)")
    ax_loss.set_ylim(0, 1.15 * result.data["initial_loss"])
    for ax in (ax_logit, ax_loss):
        ax.legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    for ax, a in zip(ax_curves, config.arms):
        for i, lr in enumerate(config.lrs):
            run = _cell(rows, a, lr)[0]  # the first seed
            points = [(c["step"], max(c["max_attention_logit"])) for c in run["curve"] if c.get("max_attention_logit")]
            if points:
                ax.plot(*zip(*points), color=cmap(i / max(1, len(config.lrs) - 1)), label=f"lr {lr:g}")
        ax.set(
            yscale="log",
            xlabel="step",
            ylabel="largest |attention logit|",
            title=f"{LABELS[a]} (seed {config.seeds[0]})",
        )
        ax.legend(fontsize=7)
    result.figure(
        save_figure(fig, out_dir, "qk-norm"),
        "Largest attention logit over training against the peak learning rate (left), final validation loss "
        "against the rate (second), and the largest logit during training at each rate, without and with "
        "QK-layernorm (right).",
    )


STUDY = Study(
    name=NAME,
    title="QK-norm: attention-logit growth at high learning rates",
    question="Do attention logits grow at high learning rates in a small language model, and does normalizing "
    "queries and keys (QK-layernorm) stop it and flatten the loss-vs-learning-rate curve?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(lrs=(1e-3, 1e-1), logit_every=2, **SMOKE_RECIPE),
        "quick": Config(lrs=(3e-3, 3e-2, 3e-1), **QUICK_RECIPE),
        "full": Config(),
    },
)
