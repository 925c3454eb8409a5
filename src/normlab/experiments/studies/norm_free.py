"""norm-free: transformers without normalization — DyT and Derf in place of LayerNorm.

A small decoder-only character-level language model (:mod:`normlab.experiments.char_lm`:
Pre-norm, depth 6) on a seeded synthetic language (:mod:`normlab.experiments.text`), with
LayerNorm, RMSNorm, DyT, Derf or no norm in every norm position, trained with one recipe
(nanoGPT's, at a CPU's size) at several peak learning rates. Measured: the final validation
loss (nats per character) at the base rate, which runs train at which rates, and — for DyT —
the final loss as its α is initialized from 0.1 to 2. Beside it, the norm-placement study's
small classification transformer (MNIST-1D tokens, Pre-norm, depth 6) with LayerNorm, DyT
and Derf: the counterpart of the papers' ImageNet ViT results.

Published: Zhu, Chen, He, LeCun & Liu (CVPR 2025), "Transformers without Normalization":
DyT(x) = γ·tanh(αx) + β matches LayerNorm "mostly without hyperparameter tuning" (ViT-B
82.3 → 82.5% top-1), and in language models the final loss depends on α's initialization
(LLaMA 7B: 0.8 before attention, 0.2 before the MLP; smaller for wider models). Chen, Lu,
Zhu, Sun & Liu (2025, arXiv 2512.10938), Derf(x) = γ·erf(αx + s) + β: GPT-2 (nanoGPT)
validation loss LN 2.94 / DyT 2.97 / Derf 2.94; ViT-B 82.3 / 82.5 / 82.8.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..char_lm import (
    LM_NORMS,
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
from ..data import load_mnist1d
from ..output import pyplot, save_figure
from ..runner import call, parallel_map
from ..study import Study, StudyResult
from ..text import load_text, ngram_loss
from ..training import adam, evaluate, intra_op_threads, minibatch_losses
from .norm_placement import TokenTransformer, lr_factor

NAME = "norm-free"
LABELS = {"layer": "LayerNorm", "rms": "RMSNorm", "dyt": "DyT", "derf": "Derf", "none": "no norm"}
CLASSIFIER_NORMS = {"layer": "pre", "dyt": "pre-dyt", "derf": "pre-derf"}  # norm → TokenTransformer placement

#: Chen et al. (2025), GPT-2 124M on OpenWebText (nanoGPT), final validation loss.
DERF_GPT2 = {"layer": 2.94, "dyt": 2.97, "derf": 2.94}
#: ImageNet-1K top-1 (%) of ViT-B: Zhu et al. (2025) for LN and DyT, Chen et al. (2025) for Derf.
VIT_B = {"layer": 82.3, "dyt": 82.5, "derf": 82.8}

#: Two test accuracies closer than this (points) are a tie: ±0.5–1 point is seed noise on 1000 samples.
ACCURACY_TIE = 1.0


@dataclass(frozen=True)
class Config:
    norms: tuple[str, ...] = LM_NORMS
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)  # peak learning rates of the stability sweep
    base_lr: float = 3e-3  # the rate at which the norms' losses are compared; one of ``lrs``
    alphas: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)  # DyT's α initializations, at ``base_lr``
    depth: int = 6
    width: int = 32
    heads: int = 4
    context: int = 64
    steps: int = 600
    warmup_steps: int = 60
    batch_size: int = 16
    check_every: int = 50
    final_valid_windows: int = 512
    classifier_steps: int = 600  # the MNIST-1D transformer; 0 leaves it out
    classifier_batch_size: int = 64
    classifier_lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    #: The token embedding's initial std for the DyT and Derf models (the others keep nanoGPT's
    #: 0.02). With 0.02 a squash's input, and so its output, is ~0.01 (nothing rescales it as
    #: LayerNorm does) and the model stays at the characters'-frequencies plateau: DyT at lr
    #: 3e-3, width 32, measured 3.04 nats from step 50 to 400, while at std 1 it reached 2.31
    #: by step 150 (LayerNorm 2.28).
    squash_embedding_std: float = 1.0


def lm_run(config: Config, norm: str, lr: float, alpha: float, seed: int) -> dict:
    """The task of one language-model run (:func:`~normlab.experiments.char_lm.lm_job`'s
    arguments); qk-norm's runs without QK-norm at the same rate and seed are the same runs
    as this study's LayerNorm ones, and a suite run trains them once."""
    embedding_std = config.squash_embedding_std if norm in ("dyt", "derf") else 0.02
    return {"fn": lm_job, **lm_task(config, norm, lr, seed, alpha_init=alpha, embedding_std=embedding_std)}


def classifier_run(config: Config, norm: str, seed: int) -> dict:
    """The norm-placement study's Pre-norm transformer on MNIST-1D with ``norm``: Adam, a
    10% warm-up and a cosine decay, as that study's warm-up arm."""
    data = load_mnist1d()
    torch.manual_seed(seed)
    model = TokenTransformer(CLASSIFIER_NORMS[norm], depth=6)
    steps = config.classifier_steps
    optimizer = adam(model.parameters(), lr=config.classifier_lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, steps // 10))
    with intra_op_threads(1):
        losses = list(
            minibatch_losses(
                model,
                data,
                optimizer,
                steps=steps,
                batch_size=config.classifier_batch_size,
                seed=seed,
                schedule=schedule,
            )
        )
        diverged = any(loss is None for loss in losses)
        accuracy = 0.0 if diverged else evaluate(model, data.x_test, data.y_test)
    return {"part": "classifier", "norm": norm, "seed": seed, "diverged": diverged, "test_accuracy": accuracy}


def measure(config: Config, out_dir: Path) -> dict:
    if config.base_lr not in config.lrs:
        raise ValueError(f"base_lr {config.base_lr} must be one of lrs {config.lrs}")
    if "layer" not in config.norms:
        raise ValueError(f"norms must include 'layer' (every comparison is with LayerNorm), got {config.norms}")
    lm = [
        {"norm": n, "lr": lr, "alpha": 0.5, "seed": s} for lr in config.lrs for n in config.norms for s in config.seeds
    ]
    if "dyt" in config.norms:
        lm += [
            {"norm": "dyt", "lr": config.base_lr, "alpha": a, "seed": s}
            for a in config.alphas
            if a != 0.5
            for s in config.seeds
        ]
    tasks = [lm_run(config, **run) for run in lm]
    if config.classifier_steps:
        tasks += [
            {"fn": classifier_run, "config": config, "norm": n, "seed": s}
            for n in CLASSIFIER_NORMS
            for s in config.seeds
        ]
    runs = parallel_map(call, tasks, desc=NAME, share=True)
    runs = [{"part": "lm", **run, **lm_record(r, ("valid_loss",))} for run, r in zip(lm, runs)] + runs[len(lm) :]
    data = load_text()
    return {
        "runs": runs,
        "reference": {
            "unigram_loss": ngram_loss(data, 1),
            "bigram_loss": ngram_loss(data, 2),
            "uniform_loss": math.log(data.vocab_size),
            "train_characters": len(data.train),
            "valid_characters": len(data.valid),
        },
    }


# ---------------------------------------------------------------------------------------------
# summarise


def _lm(rows: list[dict], norm: str, lr: float, alpha: float = 0.5) -> list[dict]:
    return [r for r in rows if r["part"] == "lm" and r["norm"] == norm and r["lr"] == lr and r["alpha"] == alpha]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(config: Config, result: StudyResult) -> None:
    rows, ref = result.data["runs"], result.data["reference"]
    unigram = ref["unigram_loss"]
    cells = {}  # (norm, lr) → (mean, sd) final loss
    for n in config.norms:
        for lr in config.lrs:
            cells[(n, lr)] = _mean_sd([final_loss(r) for r in _lm(rows, n, lr)])
    alpha_cells = {a: _mean_sd([final_loss(r) for r in _lm(rows, "dyt", config.base_lr, a)]) for a in config.alphas}
    # Per norm: the squashes' larger embedding (tied to the output) starts them at a higher loss.
    initial = {
        n: statistics.fmean(r["initial_valid_loss"] for r in rows if r["part"] == "lm" and r["norm"] == n)
        for n in config.norms
    }
    sensitivity = {n: lr_sensitivity({lr: cells[(n, lr)][0] for lr in config.lrs}, initial[n]) for n in config.norms}
    trained = {n: {lr: sum(trains(r, unigram) for r in _lm(rows, n, lr)) for lr in config.lrs} for n in config.norms}
    classifier = {
        n: _mean_sd([100 * r["test_accuracy"] for r in rows if r["part"] == "classifier" and r["norm"] == n])
        for n in CLASSIFIER_NORMS
        if config.classifier_steps
    }
    result.data["final_loss"] = {
        LABELS[n]: {
            "lrs": list(config.lrs),
            "mean": [cells[(n, lr)][0] for lr in config.lrs],
            "sd": [cells[(n, lr)][1] for lr in config.lrs],
        }
        for n in config.norms
    }
    result.data["dyt_alpha"] = {
        "alphas": list(config.alphas),
        "mean": [alpha_cells[a][0] for a in config.alphas],
        "sd": [alpha_cells[a][1] for a in config.alphas],
    }
    result.data["lr_sensitivity"] = {LABELS[n]: sensitivity[n] for n in config.norms}
    result.data["initial_loss"] = {LABELS[n]: initial[n] for n in config.norms}
    result.data["classifier_accuracy"] = {LABELS[n]: list(v) for n, v in classifier.items()}
    _tables(config, result, cells, alpha_cells, sensitivity, trained, classifier)
    _findings(config, result, cells, alpha_cells, sensitivity, trained, classifier)


def _fmt(cell: tuple[float, float], seeds: int, digits: int = 3) -> str:
    mean, sd = cell
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def _tables(config, result, cells, alpha_cells, sensitivity, trained, classifier) -> None:
    ref, k = result.data["reference"], len(config.seeds)
    result.table(
        f"Final validation loss (nats per character) after {config.steps} steps, by peak learning rate "
        f"(mean ± sd over seeds); seeds that train",
        ["norm"] + [f"lr {lr:g}" for lr in config.lrs] + ["trains at", "lr sensitivity"],
        [
            [LABELS[n]]
            + [f"{_fmt(cells[(n, lr)], k)} ({trained[n][lr]}/{k})" for lr in config.lrs]
            + [", ".join(f"{lr:g}" for lr in config.lrs if trained[n][lr] == k) or "none", f"{sensitivity[n]:.3f}"]
            for n in config.norms
        ],
        note=f"A run trains if it does not diverge and ends below {ref['unigram_loss']:.3f}, the loss of the "
        f"characters' frequencies alone (a bigram model: {ref['bigram_loss']:.3f}; uniform guessing: "
        f"{ref['uniform_loss']:.3f}). A diverged run counts as its loss at initialization. LR sensitivity "
        "(Wortsman et al., 2023): the mean over the rates of min(loss, loss at initialization) minus the best.",
    )
    if "dyt" in config.norms:
        result.table(
            f"DyT: final validation loss by α's initialization (lr {config.base_lr:g})",
            ["α₀"] + [f"{a:g}" for a in config.alphas],
            [["loss"] + [_fmt(alpha_cells[a], k) for a in config.alphas]],
            note=f"LayerNorm at the same rate: {_fmt(cells[('layer', config.base_lr)], k)}.",
        )
    if classifier:
        result.table(
            f"MNIST-1D transformer classifier (Pre-norm, depth 6, {config.classifier_steps} steps of Adam at lr "
            f"{config.classifier_lr:g}): test accuracy %",
            ["norm", "ours", "published: ViT-B on ImageNet, top-1 %"],
            [[LABELS[n], _fmt(classifier[n], k, 1), f"{VIT_B[n]}"] for n in classifier],
            note="Published: Zhu et al. (2025) for LayerNorm and DyT, Chen et al. (2025) for Derf.",
        )
    result.table(
        "Published: GPT-2 124M (nanoGPT, OpenWebText) final validation loss (Chen et al., 2025)",
        ["LayerNorm", "DyT", "Derf"],
        [[DERF_GPT2["layer"], DERF_GPT2["dyt"], DERF_GPT2["derf"]]],
    )


def _findings(config, result, cells, alpha_cells, sensitivity, trained, classifier) -> None:
    base, k = config.base_lr, len(config.seeds)
    ln = cells[("layer", base)]
    result.summary.append(
        f"Final validation loss at lr {base:g}: "
        + ", ".join(f"{LABELS[n]} {cells[(n, base)][0]:.3f}" for n in config.norms)
        + f" (bigram model {result.data['reference']['bigram_loss']:.3f})."
    )
    result.summary.append(
        "Learning-rate sensitivity (0 = flat): "
        + ", ".join(f"{LABELS[n]} {sensitivity[n]:.3f}" for n in config.norms)
        + "; rates at which every seed trains: "
        + "; ".join(
            f"{LABELS[n]} {', '.join(f'{lr:g}' for lr in config.lrs if trained[n][lr] == k) or 'none'}"
            for n in config.norms
        )
        + "."
    )
    squash = [n for n in ("dyt", "derf") if n in config.norms]
    if squash:
        gaps = {n: cells[(n, base)][0] - ln[0] for n in squash}
        ties = {n: loss_tie(ln, cells[(n, base)]) for n in squash}
        close = [n for n in squash if abs(gaps[n]) <= ties[n]]
        result.compare(
            f"Without normalization statistics the language model reaches LayerNorm's loss (lr {base:g}, same "
            f"recipe; the squashes' embedding at std {config.squash_embedding_std:g})",
            "Chen et al. (2025), GPT-2 124M (nanoGPT): validation loss LN 2.94 / DyT 2.97 / Derf 2.94",
            f"LN {ln[0]:.3f}"
            + "".join(f" / {LABELS[n]} {cells[(n, base)][0]:.3f} ({gaps[n]:+.3f})" for n in squash)
            + ("" if k == 1 else f" (mean of {k} seeds)"),
            "yes" if len(close) == len(squash) else "partly" if close else "no",
            ""
            if len(close) == len(squash)
            else "; ".join(
                f"{LABELS[n]} is {abs(gaps[n]):.3f} {'above' if gaps[n] > 0 else 'below'} LN, more than the "
                f"{ties[n]:.3f} read as a tie"
                for n in squash
                if n not in close
            ),
        )
    if "dyt" in config.norms:
        ln_lrs = [lr for lr in config.lrs if trained["layer"][lr] == k]
        missing = [lr for lr in ln_lrs if trained["dyt"][lr] < k]
        best_ln = min(config.lrs, key=lambda lr: cells[("layer", lr)][0])
        best_dyt = min(config.lrs, key=lambda lr: cells[("dyt", lr)][0])
        retune = cells[("dyt", best_ln)][0] - cells[("dyt", best_dyt)][0]
        tie = loss_tie(cells[("dyt", best_ln)], cells[("dyt", best_dyt)])
        result.compare(
            "DyT needs no retuning of the learning rate",
            "Zhu et al. (2025): DyT matches or exceeds its normalized counterpart 'mostly without hyperparameter "
            "tuning'",
            f"LN trains at lr {', '.join(f'{lr:g}' for lr in ln_lrs) or 'none'}; DyT fails at "
            f"{', '.join(f'{lr:g}' for lr in missing) or 'none of them'}; best lr LN {best_ln:g}, DyT {best_dyt:g}",
            "no" if missing else "yes" if retune <= tie else "partly",
            f"DyT fails at lr {', '.join(f'{lr:g}' for lr in missing)} where LN trains"
            if missing
            else ""
            if retune <= tie
            else f"DyT trains wherever LN does, but at LN's best rate it is {retune:.3f} above its own best",
        )
        losses = {a: alpha_cells[a][0] for a in config.alphas}
        best_alpha = min(losses, key=losses.get)
        # each difference judged against the two cells' own seeds (as every other finding
        # here): one unstable α₀ must not make a clear gap between two stable ones a tie
        margin, pair = max(
            (abs(losses[a] - losses[b]) - loss_tie(alpha_cells[a], alpha_cells[b]), (a, b))
            for i, a in enumerate(config.alphas)
            for b in config.alphas[i + 1 :]
        )
        spread = abs(losses[pair[0]] - losses[pair[1]])
        tie = loss_tie(alpha_cells[pair[0]], alpha_cells[pair[1]])
        gain = losses.get(0.5, math.nan) - losses[best_alpha]
        gain_tie = loss_tie(alpha_cells.get(0.5, (math.nan, math.nan)), alpha_cells[best_alpha])
        result.compare(
            "DyT's loss in a language model depends on α's initialization",
            "Zhu et al. (2025), §7: tuning α₀ improves LLMs (LLaMA 7B 0.8 / 0.2 before attention / MLP; smaller "
            "for wider models), while other tasks take 0.5–1.2 alike",
            f"loss from α₀ {min(config.alphas):g} to {max(config.alphas):g}: "
            + ", ".join(f"{losses[a]:.3f}" for a in config.alphas)
            + f"; best α₀ {best_alpha:g}, {gain:.3f} below α₀ 0.5",
            "yes" if gain > gain_tie else "partly" if margin > 0 else "no",
            ""
            if gain > gain_tie
            else f"the loss depends on α₀ (α₀ {pair[0]:g} vs {pair[1]:g}: {spread:.3f} apart, tie {tie:.3f}), "
            f"but the default 0.5 is within {gain_tie:.3f} of the best"
            if margin > 0
            else f"no two α₀ differ by more than their seeds' spread (largest gap {spread:.3f}, tie {tie:.3f})",
        )
    if classifier:
        acc_ln = classifier["layer"]
        rows = []
        for n in ("dyt", "derf"):
            rows.append((n, classifier[n][0] - acc_ln[0]))
        worse = [(n, d) for n, d in rows if d < -ACCURACY_TIE]
        result.compare(
            "In a classification transformer DyT and Derf match LayerNorm",
            "ViT-B on ImageNet, top-1: LN 82.3 / DyT 82.5 (Zhu et al., 2025) / Derf 82.8 (Chen et al., 2025)",
            f"MNIST-1D transformer, test accuracy: LN {acc_ln[0]:.1f} / DyT {classifier['dyt'][0]:.1f} / Derf "
            f"{classifier['derf'][0]:.1f}",
            "yes" if not worse else "partly" if len(worse) < len(rows) else "no",
            "" if not worse else "; ".join(f"{LABELS[n]} {-d:.1f} points below LN" for n, d in worse),
        )


# ---------------------------------------------------------------------------------------------
# render


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    plt = pyplot()
    rows = result.data["runs"]
    fig, (ax_lr, ax_curve, ax_alpha) = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    for label, cell in result.data["final_loss"].items():
        ax_lr.errorbar(cell["lrs"], cell["mean"], yerr=cell["sd"], marker="o", ms=4, capsize=3, label=label)
    ref = result.data["reference"]
    ax_lr.axhline(ref["unigram_loss"], color="grey", lw=0.8, ls=":", label="character frequencies")
    ax_lr.axhline(ref["bigram_loss"], color="grey", lw=0.8, ls="--", label="bigram model")
    ax_lr.set_xscale("log")
    ax_lr.set_ylim(0, 1.15 * ref["uniform_loss"])
    ax_lr.set_xlabel("peak learning rate")
    ax_lr.set_ylabel("final validation loss (nats / character)")
    ax_lr.set_title("loss vs learning rate", fontsize=10)
    ax_lr.legend(fontsize=8)
    for n in config.norms:
        mine = _lm(rows, n, config.base_lr)
        steps = [c["step"] for c in mine[0]["curve"] if c["valid_loss"] is not None]
        length = min(len([c for c in r["curve"] if c["valid_loss"] is not None]) for r in mine)
        mean = [
            statistics.fmean([c["valid_loss"] for c in r["curve"] if c["valid_loss"] is not None][i] for r in mine)
            for i in range(length)
        ]
        ax_curve.plot(steps[:length], mean, label=LABELS[n])
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("validation loss")
    ax_curve.set_title(f"training at lr {config.base_lr:g} (mean over seeds)", fontsize=10)
    ax_curve.legend(fontsize=8)
    alpha = result.data["dyt_alpha"]
    if "dyt" in config.norms:
        ax_alpha.errorbar(alpha["alphas"], alpha["mean"], yerr=alpha["sd"], marker="o", capsize=3, label="DyT")
        ln = result.data["final_loss"]["LayerNorm"]
        ax_alpha.axhline(ln["mean"][config.lrs.index(config.base_lr)], color="C0", ls=":", label="LayerNorm")
        ax_alpha.set_xscale("log")
        ax_alpha.legend(fontsize=8)
    ax_alpha.set_xlabel("α₀ (DyT's initial α)")
    ax_alpha.set_ylabel("final validation loss")
    ax_alpha.set_title(f"DyT's α initialization, lr {config.base_lr:g}", fontsize=10)
    result.figure(
        save_figure(fig, out_dir, "norm-free"),
        f"Character-level language model (Pre-norm, depth {config.depth}, width {config.width}): final validation "
        "loss against the peak learning rate per norm (left; dotted: the characters' frequencies alone, dashed: a "
        "bigram model), validation loss during training at the base rate (middle), and DyT's final loss against "
        "its α initialization (right).",
    )


STUDY = Study(
    name=NAME,
    title="Transformers without normalization: DyT and Derf in place of LayerNorm",
    question="Does an elementwise squash (DyT, Derf) train a language model as well and as stably as LayerNorm, "
    "and does DyT depend on α's initialization?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(
            lrs=(3e-3, 3e-2),
            alphas=(0.2, 0.5),
            classifier_steps=20,
            classifier_batch_size=32,
            **SMOKE_RECIPE,
        ),
        "quick": Config(
            lrs=(3e-3, 3e-2),
            alphas=(0.2, 0.5, 2.0),
            classifier_steps=100,
            classifier_batch_size=32,
            **QUICK_RECIPE,
        ),
        "full": Config(),
    },
)
