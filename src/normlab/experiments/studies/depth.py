"""depth: plain (non-residual) MLPs from 10 to 50 layers — which init × norm trains.

ReLU MLPs of width 64 on MNIST-1D with Xavier (gain 1: the signal halves its variance
at every layer, so gradients vanish toward the input), He (variance-preserving) or
He × 1.5 (variance grows ×2.25 per layer: exploding), and no norm, BatchNorm or LayerNorm
before each ReLU. At initialization, on a batch of 256: the ratio of the gradient norm at
the first layer's pre-activations to that at the last one (≪ 1 vanishing, ≫ 1 exploding;
the weight-gradient ratio is recorded too). Then SGD with momentum: does it train (test
accuracy ≥ 25%, chance is 10%) — and for the cases that explode (gradient ratio > 10 at
init, or a diverged run), the same run again with the gradient norm clipped to 1.

Expected from the literature: Glorot & Bengio (2010) and He et al. (2015) for the plain
nets; for BatchNorm, Yang et al. (2019) prove that a deep plain BN network's gradients
*explode* at initialization (by a constant factor per layer), so BN alone does not make
very deep plain networks trainable — residual connections do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import load_mnist1d
from ..models import MLP
from ..output import pyplot, save_figure
from ..runner import parallel_map
from ..study import Study, StudyResult
from ..training import StepConfig, train_steps

NAME = "depth"
INITS = {"xavier": ("xavier", 1.0), "he": ("he", 1.0), "he×1.5": ("he_scaled", 1.5)}
NORM_LABELS = {"none": "no norm", "batch": "BatchNorm", "layer": "LayerNorm"}
TRAINS_ABOVE = 0.25
EXPLODING = 10.0


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (10, 20, 30, 50)
    width: int = 64
    inits: tuple[str, ...] = ("xavier", "he", "he×1.5")
    norms: tuple[str, ...] = ("none", "batch", "layer")
    steps: int = 2000
    batch_size: int = 64
    lr: float = 0.01
    clip_norm: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)


def gradient_ratios(model: MLP, x: torch.Tensor, y: torch.Tensor) -> dict:
    """First/last-layer ratios of the gradient norm at the pre-activations and at the weights."""
    pre = []

    def keep(module, args, out):  # returns None: the output is left as it is
        out.retain_grad()
        pre.append(out)

    handles = [b.linear.register_forward_hook(keep) for b in model.blocks]
    try:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    act = [p.grad.norm().item() for p in pre]
    weight = [b.linear.weight.grad.norm().item() for b in model.blocks]
    model.zero_grad()
    return {
        "preactivation_grad_ratio": act[0] / act[-1] if act[-1] > 0 else math.inf,
        "weight_grad_ratio": weight[0] / weight[-1] if weight[-1] > 0 else math.inf,
        "preactivation_grad_norms": act,
    }


def one_run(config: Config, depth: int, init: str, norm: str, seed: int, clip: bool) -> dict:
    data = load_mnist1d()
    torch.manual_seed(seed)
    scheme, scale = INITS[init]
    model = MLP(40, [config.width] * depth, 10, activation="relu", norm=norm, init=scheme, init_scale=scale, seed=seed)
    ratios = gradient_ratios(model, data.x_train[:256], data.y_train[:256])
    result = train_steps(
        model,
        data,
        StepConfig(
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            clip_norm=config.clip_norm if clip else None,
            check_every=config.steps,
            seed=seed,
        ),
    )
    finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in ratios.items()}
    return {
        "depth": depth,
        "init": init,
        "norm": norm,
        "seed": seed,
        "clipped": clip,
        **finite,
        "diverged": result.diverged,
        "test_accuracy": result.test_accuracy,
        "trains": (not result.diverged) and result.test_accuracy >= TRAINS_ABOVE,
        "seconds": result.seconds,
    }


def _cell(rows: list[dict], depth: int, init: str, norm: str) -> list[dict]:
    return [r for r in rows if r["depth"] == depth and r["init"] == init and r["norm"] == norm]


def _ratio(rows: list[dict]) -> float:
    """Geometric mean of the first/last gradient ratio over seeds; NaN if one exploded to inf."""
    vals = [r["preactivation_grad_ratio"] for r in rows]
    if any(v is None for v in vals):
        return math.nan
    return math.exp(sum(math.log(max(v, 1e-300)) for v in vals) / len(vals))


def measure(config: Config, out_dir: Path) -> dict:
    grid = [
        (d, i, n, s)
        for d in sorted(config.depths, reverse=True)
        for i in config.inits
        for n in config.norms
        for s in config.seeds
    ]
    tasks = [{"config": config, "depth": d, "init": i, "norm": n, "seed": s, "clip": False} for d, i, n, s in grid]
    rows = parallel_map(one_run, tasks, desc=NAME)
    exploding = [r for r in rows if r["diverged"] or (r["preactivation_grad_ratio"] or math.inf) > EXPLODING]
    clip_tasks = [
        {"config": config, "depth": r["depth"], "init": r["init"], "norm": r["norm"], "seed": r["seed"], "clip": True}
        for r in exploding
    ]
    clipped = parallel_map(one_run, clip_tasks, desc=f"{NAME} (clipped)") if clip_tasks else []
    return {"runs": rows + clipped}


def summarise(config: Config, result: StudyResult) -> None:
    rows = [r for r in result.data["runs"] if not r["clipped"]]
    clipped = [r for r in result.data["runs"] if r["clipped"]]
    table = []
    for d in config.depths:
        for i in config.inits:
            for n in config.norms:
                mine = _cell(rows, d, i, n)
                ratio = _ratio(mine)
                ratio_text = "inf" if math.isnan(ratio) else f"{ratio:.1e}"
                acc = sum(r["test_accuracy"] for r in mine) / len(mine)
                trains = sum(r["trains"] for r in mine)
                clip_rows = _cell(clipped, d, i, n)
                clip_text = (
                    "–"
                    if not clip_rows
                    else (
                        f"{100 * sum(r['test_accuracy'] for r in clip_rows) / len(clip_rows):.1f}% "
                        f"({sum(r['trains'] for r in clip_rows)}/{len(clip_rows)} train)"
                    )
                )
                diverged = sum(r["diverged"] for r in mine)
                table.append(
                    [
                        str(d),
                        i,
                        NORM_LABELS[n],
                        ratio_text,
                        f"{100 * acc:.1f}" + (f" ({diverged} diverged)" if diverged else ""),
                        f"{trains}/{len(mine)}",
                        clip_text,
                    ]
                )
    result.table(
        f"Depth × init × norm, ReLU MLPs of width {config.width}, {config.steps} SGD steps",
        [
            "depth",
            "init",
            "norm",
            "grad-norm ratio first/last (at init)",
            "test accuracy %",
            "train",
            f"with clipping at {config.clip_norm}",
        ],
        table,
        note=f"'train' counts seeds reaching {100 * TRAINS_ABOVE:.0f}% test accuracy without diverging; "
        f"clipping is rerun where the ratio exceeds {EXPLODING:g} or a run diverged.",
    )

    def geo(d, i, n):
        return _ratio(_cell(rows, d, i, n))

    deep = max(config.depths)
    lines = []
    for n in config.norms:
        for i in config.inits:
            lines.append(f"{i}/{NORM_LABELS[n]} {geo(deep, i, n):.1e}")
    result.summary.append(f"Gradient ratio first/last at depth {deep}: " + ", ".join(lines) + ".")
    trained = [
        f"{i}/{NORM_LABELS[n]}"
        for i in config.inits
        for n in config.norms
        if all(r["trains"] for r in _cell(rows, deep, i, n))
    ]
    result.summary.append(f"At depth {deep}, every seed trains with: {', '.join(trained) or 'none of them'}.")
    if clipped:
        # A clipped run counts as rescued only if the same run failed without clipping.
        plain = {(r["depth"], r["init"], r["norm"], r["seed"]): r for r in rows}
        key = lambda r: (r["depth"], r["init"], r["norm"], r["seed"])  # noqa: E731
        rescued = [r for r in clipped if r["trains"] and not plain[key(r)]["trains"]]
        hurt = [r for r in clipped if not r["trains"] and plain[key(r)]["trains"]]
        result.summary.append(
            f"Clipping the gradient norm to {config.clip_norm:g} was tried on {len(clipped)} exploding "
            f"runs: it made {len(rescued)} that failed without it train, and stopped {len(hurt)} "
            f"that trained without it ({sum(r['diverged'] for r in clipped)} diverged even so)."
        )
    if "none" in config.norms and "xavier" in config.inits and "he" in config.inits:
        result.compare(
            "ReLU with Xavier: gradients vanish with depth; He keeps them",
            "He et al. (2015): with Var(w) = 1/n each ReLU layer halves the signal; 2/n preserves it",
            f"depth {deep}, no norm: ratio {geo(deep, 'xavier', 'none'):.1e} (Xavier) vs "
            f"{geo(deep, 'he', 'none'):.1e} (He)",
            "yes" if geo(deep, "xavier", "none") < 0.1 * geo(deep, "he", "none") else "no",
        )
    if "batch" in config.norms and "he" in config.inits:
        bn_ratio = geo(deep, "he", "batch")
        result.compare(
            "Plain deep BN networks have exploding gradients at init",
            "Yang et al. (2019), 'A Mean Field Theory of Batch Normalization': gradients explode "
            "geometrically with depth in plain BN networks at initialization",
            f"depth {deep}, He + BN: ratio {bn_ratio:.1e}",
            "yes" if bn_ratio > EXPLODING else "no",
        )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    rows = [r for r in result.data["runs"] if not r["clipped"]]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(config.norms), figsize=(5 * len(config.norms), 4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], config.norms):
        for i in config.inits:
            ys = [_ratio(_cell(rows, d, i, n)) for d in config.depths]
            ax.plot(config.depths, ys, marker="o", label=i)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("depth")
        ax.set_title(NORM_LABELS[n], fontsize=10)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("‖∂L/∂z₁‖ / ‖∂L/∂z_L‖ at init")
    result.figure(
        save_figure(fig, out_dir, "depth-gradients"),
        "Gradient norm at the first layer's pre-activations over the last layer's, at initialization: "
        "below 1 vanishing, above 1 exploding (geometric mean over seeds).",
    )


STUDY = Study(
    name=NAME,
    title="Depth: which initialization and normalization let a plain 10–50-layer MLP train",
    question="Do gradients vanish or explode with depth, and what do init, BatchNorm, LayerNorm and clipping change?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(depths=(6, 12), inits=("xavier", "he"), norms=("none", "batch"), steps=50, seeds=(0,)),
        "quick": Config(depths=(10, 20), steps=300, seeds=(0,)),
        "full": Config(),
    },
)
