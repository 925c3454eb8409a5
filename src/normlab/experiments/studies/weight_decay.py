"""weight-decay: with BatchNorm, L2 sets the effective learning rate, not the function.

A weight w feeding a BatchNorm is scale-invariant: the network's output is the same for
w and a·w (a > 0), so L2 cannot make the function "simpler" through it. Its gradient is
orthogonal to w and shrinks as 1/‖w‖, so a step of size η turns w by about η‖g‖/‖w‖: the
effective learning rate is η/‖w‖² (van Laarhoven, 2017). Without weight decay each step
lengthens w (the update is orthogonal to it), so the effective rate decays; weight decay
shrinks w back, and the two balance where the angle turned per step is √(2ηλ/(1+μ)) for
SGD with momentum μ (Wan et al., 2021) — a function of η·λ alone, so at that balance the
training depends on the product η·λ, not on η and λ apart (Li, Lyu & Arora, 2020: the
"intrinsic learning rate"; Zhang et al., 2019 and Hoffer et al., 2018 on the same effect).

The MNIST-1D CNN with and without BatchNorm, SGD with momentum 0.9 at a constant learning
rate η, weight decay λ on the conv weights only (with BN exactly the scale-invariant ones;
the head, biases and BN's γ and β get none, so λ acts on nothing else), over a grid of η
and λ. ``normlab.diagnostics.Probe`` records each conv weight's norm and relative update
‖Δw‖/‖w‖ per step (the angular update when the update is orthogonal to w, as it is with
BN up to the small radial part of weight decay, ηλ/(1−μ)).

The notes' own claim is checked literally too: "L2 keeps the weights small, which keeps
gradients from exploding". Plain deep ReLU MLPs as in the ``depth`` study (He init, no
norm), trained with and without L2 on all weights, with the total gradient norm recorded
through training.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...diagnostics import Probe
from ..data import load_mnist1d
from ..models import MLP, ConvNet1d
from ..output import heatmap, pyplot, save_figure
from ..runner import grid, parallel_map
from ..study import Study, StudyResult
from ..training import evaluate, minibatch_losses

NAME = "weight-decay"
NORM_LABELS = {"none": "no norm", "batch": "BatchNorm"}


@dataclass(frozen=True)
class Config:
    norms: tuple[str, ...] = ("batch", "none")
    lrs: tuple[float, ...] = (0.05, 0.1, 0.2)  # geometric, with the same ratio as the λ > 0 below
    weight_decays: tuple[float, ...] = (0.0, 1e-3, 2e-3, 4e-3)
    steps: int = 2000
    batch_size: int = 32
    momentum: float = 0.9
    record_every: int = 25
    deep_depth: int = 20
    deep_width: int = 64
    deep_weight_decays: tuple[float, ...] = (0.0, 5e-4, 5e-3)
    deep_steps: int = 1000
    deep_lr: float = 0.01
    noise_points: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)


def _train(model: nn.Module, data, optimizer, steps: int, batch_size: int, seed: int, probe: Probe) -> dict:
    """Plain minibatch SGD for ``steps`` steps (epochs of a seeded random order), recorded
    by ``probe``; stops at a non-finite loss."""
    losses: list[float] = []
    diverged = False
    with probe:
        for loss in minibatch_losses(model, data, optimizer, steps=steps, batch_size=batch_size, seed=seed):
            if loss is None:
                diverged = True
                break
            losses.append(loss)
    return {"diverged": diverged, "final_loss": statistics.fmean(losses[-100:]) if losses else None}


def one_run(config: Config, norm: str, lr: float, weight_decay: float, seed: int) -> dict:
    data = load_mnist1d()
    torch.manual_seed(seed)
    model = ConvNet1d(norm)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv1d)]
    conv_weights = [model.get_submodule(name).weight for name in convs]
    others = [p for p in model.parameters() if all(p is not w for w in conv_weights)]
    optimizer = torch.optim.SGD(
        [{"params": conv_weights, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=lr,
        momentum=config.momentum,
        foreach=True,
    )
    probe = Probe(model, layers=convs, every=config.record_every, optimizer=optimizer, gradients=False, sample_size=256)
    outcome = _train(model, data, optimizer, config.steps, config.batch_size, seed, probe)
    row = {
        "norm": norm,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        **outcome,
        "test_accuracy": 0.0 if outcome["diverged"] else evaluate(model, data.x_test, data.y_test),
        "layers": {},
    }
    for name in convs:
        steps, norms = probe.series(name, "weight_norm")
        _, updates = probe.series(name, "update_ratio")
        row["layers"][name] = {"steps": steps, "weight_norm": norms, "update_ratio": updates}
    return row


def deep_run(config: Config, weight_decay: float, seed: int) -> dict:
    """A plain He-initialized ReLU MLP of ``deep_depth`` layers, L2 on every weight."""
    data = load_mnist1d()
    torch.manual_seed(seed)
    model = MLP(40, [config.deep_width] * config.deep_depth, 10, activation="relu", norm="none", init="he", seed=seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.deep_lr, momentum=config.momentum, weight_decay=weight_decay, foreach=True
    )
    every = max(1, config.deep_steps // 40)
    probe = Probe(model, layers=nn.Linear, every=every, gradients=False, sample_size=256)
    outcome = _train(model, data, optimizer, config.deep_steps, 64, seed, probe)
    layers = probe.layer_names
    records = [probe.records(name) for name in layers]
    steps = [r["step"] for r in records[0] if "weight_grad_norm" in r]
    grad, weight = [], []
    for i in range(len(steps)):
        grad.append(math.sqrt(sum(rec[i]["weight_grad_norm"] ** 2 for rec in records)))
        weight.append(math.sqrt(sum(rec[i]["weight_norm"] ** 2 for rec in records)))
    return {
        "weight_decay": weight_decay,
        "seed": seed,
        **outcome,
        "steps": steps,
        "grad_norm": grad,
        "weight_norm": weight,
        "test_accuracy": 0.0 if outcome["diverged"] else evaluate(model, data.x_test, data.y_test),
    }


def _tail(values: list[float], fraction: float = 0.25) -> float:
    """Mean of the last ``fraction`` of a series (the balance, once reached)."""
    k = max(1, int(len(values) * fraction))
    return statistics.fmean(values[-k:])


def _layer_mean(row: dict, fn) -> float:
    return statistics.fmean(fn(layer) for layer in row["layers"].values())


def summarize_run(row: dict, momentum: float) -> dict:
    """Per run: ‖w‖ growth (last / first record), the effective rate's change
    (η/‖w‖² last / first), the angular update at the end, and the balance predicted."""
    growth = _layer_mean(row, lambda L: L["weight_norm"][-1] / L["weight_norm"][0])
    effective = _layer_mean(row, lambda L: (L["weight_norm"][0] / L["weight_norm"][-1]) ** 2)
    angular = _layer_mean(row, lambda L: _tail(L["update_ratio"]))
    predicted = math.sqrt(2 * row["lr"] * row["weight_decay"] / (1 + momentum))
    return {
        "growth": growth,
        "effective_lr_change": effective,
        "angular_update": angular,
        "predicted_angular_update": predicted,
    }


def product_pairs(cells: dict, lrs: list[float], wds: list[float]) -> dict | None:
    """Mean |Δ accuracy| between grid neighbours that keep η·λ fixed (η up one step, λ down
    one) against neighbours that change only λ or only η (η·λ changes by one step). The grid
    must be geometric with the same ratio in η and λ; None otherwise."""
    if len(lrs) < 2 or len(wds) < 2:
        return None
    ratios = {round(b / a, 6) for a, b in itertools.pairwise(lrs)} | {
        round(b / a, 6) for a, b in itertools.pairwise(wds)
    }
    if len(ratios) != 1:
        return None
    pairs: dict[str, list[float]] = {"same product": [], "same η": [], "same λ": []}
    for i, lr in enumerate(lrs):
        for j, wd in enumerate(wds):
            here = cells[(lr, wd)]
            if i + 1 < len(lrs) and j >= 1:
                pairs["same product"].append(abs(cells[(lrs[i + 1], wds[j - 1])] - here))
            if j + 1 < len(wds):
                pairs["same η"].append(abs(cells[(lr, wds[j + 1])] - here))
            if i + 1 < len(lrs):
                pairs["same λ"].append(abs(cells[(lrs[i + 1], wd)] - here))
    return {k: statistics.fmean(v) for k, v in pairs.items() if v}


def measure(config: Config, out_dir: Path) -> dict:
    tasks = grid(
        {"config": config}, seed=config.seeds, norm=config.norms, lr=config.lrs, weight_decay=config.weight_decays
    )
    deep_tasks = grid({"config": config}, seed=config.seeds, weight_decay=config.deep_weight_decays)
    rows = parallel_map(one_run, tasks, desc=NAME)
    deep = parallel_map(deep_run, deep_tasks, desc=f"{NAME} (deep MLP)")
    return {"runs": rows, "deep_runs": deep}


def summarise(config: Config, result: StudyResult) -> None:
    rows, deep = result.data["runs"], result.data["deep_runs"]
    for row in rows:
        if not row["diverged"]:
            row.update(summarize_run(row, config.momentum))

    def cell(norm, lr, wd, key):
        values = [
            r[key]
            for r in rows
            if (r["norm"], r["lr"], r["weight_decay"]) == (norm, lr, wd)
            and not r["diverged"]
            and r.get(key) is not None
        ]
        return statistics.fmean(values) if values else math.nan

    def failed(norm, lr, wd):
        return sum(r["diverged"] for r in rows if (r["norm"], r["lr"], r["weight_decay"]) == (norm, lr, wd))

    _grid_table(config, cell, failed, result)
    deep_summary = _deep_table(config, deep, result)
    _findings(config, cell, deep_summary, result)


def _grid_table(config: Config, cell, failed, result: StudyResult) -> None:
    table = []
    for n in config.norms:
        for lr in config.lrs:
            for wd in config.weight_decays:
                pred = math.sqrt(2 * lr * wd / (1 + config.momentum))
                f = failed(n, lr, wd)
                table.append(
                    [
                        NORM_LABELS[n],
                        f"{lr:g}",
                        f"{wd:g}",
                        f"{lr * wd:.1e}",
                        f"{100 * cell(n, lr, wd, 'test_accuracy'):.1f}" + (f" ({f} diverged)" if f else ""),
                        f"{cell(n, lr, wd, 'growth'):.2f}",
                        f"{cell(n, lr, wd, 'effective_lr_change'):.3f}",
                        f"{cell(n, lr, wd, 'angular_update'):.4f}",
                        f"{pred:.4f}" if wd else "–",
                    ]
                )
    result.table(
        f"Constant η, {config.steps} steps, {len(config.seeds)} seed(s); conv weights, mean over the 3 layers",
        [
            "norm",
            "η",
            "λ",
            "η·λ",
            "test accuracy %",
            "‖w‖ last / first",
            "η/‖w‖² last / first",
            "‖Δw‖/‖w‖ per step (last quarter)",
            "balance √(2ηλ/(1+μ))",
        ],
        table,
        note="With BatchNorm, ‖Δw‖/‖w‖ is the angle turned per step; without, only a relative step size.",
    )


def _deep_table(config: Config, deep: list[dict], result: StudyResult) -> dict:
    # The gradient norm of a plain deep net first falls (the loss drops from chance), then
    # can climb again as the weights grow: growth is measured from its lowest point.
    deep_rows, deep_summary = [], {}
    for wd in config.deep_weight_decays:
        mine = [r for r in deep if r["weight_decay"] == wd and r["grad_norm"]]
        start = statistics.fmean(r["grad_norm"][0] for r in mine)
        low = statistics.fmean(min(r["grad_norm"]) for r in mine)
        growth = statistics.fmean(_tail(r["grad_norm"], 0.2) / min(r["grad_norm"]) for r in mine)
        w_growth = statistics.fmean(r["weight_norm"][-1] / r["weight_norm"][0] for r in mine)
        acc = statistics.fmean(r["test_accuracy"] for r in mine)
        div = sum(r["diverged"] for r in deep if r["weight_decay"] == wd)
        deep_summary[wd] = {
            "start": start,
            "low": low,
            "growth": growth,
            "weight_growth": w_growth,
            "accuracy": acc,
            "diverged": div,
        }
        deep_rows.append(
            [
                f"{wd:g}",
                f"{start:.2f}",
                f"{low:.2f}",
                f"{growth:.2f}",
                f"{w_growth:.3f}",
                f"{100 * acc:.1f}" + (f" ({div} diverged)" if div else ""),
            ]
        )
    result.data["deep_summary"] = {str(k): v for k, v in deep_summary.items()}
    result.table(
        f"Plain {config.deep_depth}-layer ReLU MLP (He init, no norm), lr {config.deep_lr:g}, "
        f"{config.deep_steps} steps: total gradient norm over training",
        ["L2 λ", "‖∇‖ at step 0", "lowest ‖∇‖", "last fifth / lowest", "‖w‖ end / start", "test accuracy %"],
        deep_rows,
    )
    return deep_summary


def _findings(config: Config, cell, deep_summary: dict, result: StudyResult) -> None:
    """The summary lines and the comparison with the published claims."""
    mid = sorted(config.lrs)[len(config.lrs) // 2]
    top = max(config.weight_decays)
    if "batch" in config.norms and 0.0 in config.weight_decays and top > 0:
        g0, g1 = cell("batch", mid, 0.0, "growth"), cell("batch", mid, top, "growth")
        e0, e1 = cell("batch", mid, 0.0, "effective_lr_change"), cell("batch", mid, top, "effective_lr_change")
        result.summary.append(
            f"BatchNorm, η = {mid:g}: without weight decay the conv weights' norm grows ×{g0:.2f} in {config.steps} "
            f"steps and the effective rate η/‖w‖² falls to {e0:.3f} of its start; with λ = {top:g}, ×{g1:.2f} "
            f"and {e1:.3f}."
        )
        result.compare(
            "Without weight decay ‖w‖ grows and the effective learning rate decays",
            "van Laarhoven (2017): with BN, L2 has no regularizing effect on the function; the effective "
            "learning rate is η/‖w‖², and without L2 ‖w‖ grows so it decays (qualitative); Hoffer et al. "
            "(2018), Zhang et al. (2019): weight decay acts through this effective rate",
            f"BN, η = {mid:g}: ‖w‖ ×{g0:.2f} (λ = 0) vs ×{g1:.2f} (λ = {top:g}); η/‖w‖² ×{e0:.3f} vs ×{e1:.3f}",
            "yes" if g0 > 1.2 and g0 > g1 else "no",
            "" if g0 > 1.2 and g0 > g1 else "the norm did not grow more without weight decay here",
        )
    positive = [wd for wd in config.weight_decays if wd > 0]
    if "batch" in config.norms and positive:
        measured = [cell("batch", lr, wd, "angular_update") for lr in config.lrs for wd in positive]
        predicted = [math.sqrt(2 * lr * wd / (1 + config.momentum)) for lr in config.lrs for wd in positive]
        errors = [abs(m / p - 1) for m, p in zip(measured, predicted) if not math.isnan(m)]
        worst = max(errors) if errors else math.nan
        result.summary.append(
            f"With BatchNorm and λ > 0 the angle turned per step settles within {100 * worst:.0f}% of "
            f"√(2ηλ/(1+μ)) in every cell (median {100 * statistics.median(errors):.0f}%)."
        )
        result.compare(
            "With weight decay, the angular update settles at √(2ηλ/(1+μ))",
            "Wan et al. (2021), spherical motion dynamics: at equilibrium the angular update of a "
            "scale-invariant weight is √(2ηλ/(1+μ)) under SGD with momentum μ",
            f"{len(errors)} cells with BN: measured/predicted − 1 at most {100 * worst:.0f}% "
            f"(median {100 * statistics.median(errors):.0f}%)",
            "yes" if worst < 0.25 else "partly",
            "" if worst < 0.25 else "the smallest η·λ has not reached its balance within the run",
        )
    if "batch" in config.norms:
        acc = {(lr, wd): 100 * cell("batch", lr, wd, "test_accuracy") for lr in config.lrs for wd in positive}
        pairs = product_pairs(acc, sorted(config.lrs), sorted(positive))
        if pairs:
            result.data["product_pairs"] = pairs
            product_wins = pairs["same product"] < min(pairs["same η"], pairs["same λ"])
            result.summary.append(
                "BatchNorm, test accuracy between grid neighbours (mean |Δ|, points): same η·λ "
                f"{pairs['same product']:.2f}, same η {pairs['same η']:.2f}, same λ {pairs['same λ']:.2f}."
            )
            none_pairs = None
            if "none" in config.norms:
                none_acc = {
                    (lr, wd): 100 * cell("none", lr, wd, "test_accuracy") for lr in config.lrs for wd in positive
                }
                none_pairs = product_pairs(none_acc, sorted(config.lrs), sorted(positive))
                result.data["product_pairs_none"] = none_pairs
            result.compare(
                "With BN, the final accuracy depends on η·λ more than on η or λ alone",
                "Li, Lyu & Arora (2020): for scale-invariant weights SGD with weight decay depends on "
                "the 'intrinsic learning rate' η·λ; van Laarhoven (2017), Zhang et al. (2019) "
                "(qualitative)",
                f"mean |Δ accuracy| between neighbours: same η·λ {pairs['same product']:.2f}, same η "
                f"{pairs['same η']:.2f}, same λ {pairs['same λ']:.2f} points"
                + (
                    f" (no norm: {none_pairs['same product']:.2f} / {none_pairs['same η']:.2f} / "
                    f"{none_pairs['same λ']:.2f})"
                    if none_pairs
                    else ""
                ),
                "yes" if product_wins and pairs["same η"] > config.noise_points else "partly" if product_wins else "no",
                ""
                if product_wins and pairs["same η"] > config.noise_points
                else "all cells are within seed noise of each other, so the grid cannot tell"
                if product_wins
                else "accuracy varies as much along a fixed η·λ as across it: the head and the start "
                "of training (before the balance) depend on η itself",
            )
    if deep_summary and 0.0 in deep_summary and len(deep_summary) > 1:
        base, top_wd = deep_summary[0.0], max(deep_summary)
        strongest = deep_summary[top_wd]
        grows = base["growth"] > 1.5
        helps = strongest["growth"] < 0.8 * base["growth"]
        result.summary.append(
            f"Plain {config.deep_depth}-layer MLP without a norm: after its early drop the total gradient norm climbs "
            f"×{base['growth']:.2f} from its lowest point without L2 and ×{strongest['growth']:.2f} with λ = {top_wd:g}; "
            f"the weights' norm ends ×{base['weight_growth']:.3f} vs ×{strongest['weight_growth']:.3f} its start."
        )
        result.compare(
            "The notes: L2 keeps the weights small, which keeps gradients from exploding",
            "the notes' claim (no paper measures it in this form); He et al. (2015) and the depth study: "
            "whether a plain net's gradients explode is set by the init's scale, at initialization",
            f"depth {config.deep_depth}, He init: gradient norm last fifth / lowest ×{base['growth']:.2f} "
            f"without L2, ×{strongest['growth']:.2f} with λ = {top_wd:g}; ‖w‖ end/start "
            f"×{base['weight_growth']:.3f} vs ×{strongest['weight_growth']:.3f}",
            "yes" if grows and helps else "partly" if grows and strongest["growth"] < base["growth"] else "no",
            ""
            if grows and helps
            else "the gradient norm does not climb during training here, so there is nothing for L2 to hold down"
            if not grows
            else "L2 damps the climb only a little: it shrinks ‖w‖ by a few percent in this many steps, and "
            "the climb comes with fitting the data, not with the weights' size"
            if strongest["growth"] < base["growth"]
            else "the gradient norm climbs as much with L2 as without, or more, although L2 shrinks the weights",
        )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    rows, deep = result.data["runs"], result.data["deep_runs"]
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    mid = sorted(config.lrs)[len(config.lrs) // 2]
    seed = config.seeds[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, wd in enumerate(config.weight_decays):
        for n, style in (("batch", "-"), ("none", ":")):
            row = next(
                (
                    r
                    for r in rows
                    if (r["norm"], r["lr"], r["weight_decay"], r["seed"]) == (n, mid, wd, seed) and not r["diverged"]
                ),
                None,
            )
            if row is None:
                continue
            layers = list(row["layers"].values())
            steps = layers[0]["steps"]
            norm = [
                statistics.fmean(L["weight_norm"][i] / L["weight_norm"][0] for L in layers) for i in range(len(steps))
            ]
            eff = [statistics.fmean(mid / L["weight_norm"][i] ** 2 for L in layers) for i in range(len(steps))]
            label = f"{NORM_LABELS[n]}, λ={wd:g}"
            axes[0][0].plot(steps, norm, style, color=colors[k % len(colors)], label=label)
            axes[0][1].plot(steps, eff, style, color=colors[k % len(colors)], label=label)
            if n == "batch":
                upd = [statistics.fmean(L["update_ratio"][i] for L in layers) for i in range(len(steps))]
                axes[0][2].plot(steps, upd, color=colors[k % len(colors)], lw=0.9, label=label)
                if wd:
                    axes[0][2].axhline(
                        math.sqrt(2 * mid * wd / (1 + config.momentum)), color=colors[k % len(colors)], ls="--", lw=0.8
                    )
    axes[0][0].set_title(f"‖w‖ / ‖w₀‖ of the conv weights, η = {mid:g}", fontsize=10)
    axes[0][1].set_title("effective learning rate η/‖w‖²", fontsize=10)
    axes[0][1].set_yscale("log")
    axes[0][2].set_title("BN: angle per step ‖Δw‖/‖w‖ (dashed: √(2ηλ/(1+μ)))", fontsize=10)
    axes[0][2].set_yscale("log")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)

    positive = sorted(wd for wd in config.weight_decays if wd > 0)
    for ax, n in zip(axes[1][:2], ("batch", "none")):
        if n not in config.norms or not positive:
            ax.axis("off")
            continue
        grid = []
        for lr in sorted(config.lrs, reverse=True):
            grid.append(
                [
                    100
                    * statistics.fmean(
                        r["test_accuracy"] for r in rows if (r["norm"], r["lr"], r["weight_decay"]) == (n, lr, wd)
                    )
                    for wd in config.weight_decays
                ]
            )
        heatmap(ax, grid)
        ax.set_xticks(range(len(config.weight_decays)), [f"{wd:g}" for wd in config.weight_decays])
        ax.set_yticks(range(len(config.lrs)), [f"{lr:g}" for lr in sorted(config.lrs, reverse=True)])
        ax.set_xlabel("weight decay λ (conv weights)")
        ax.set_ylabel("η")
        ax.set_title(f"{NORM_LABELS[n]}: test accuracy % (equal η·λ on the anti-diagonals)", fontsize=10)

    ax = axes[1][2]
    for k, wd in enumerate(config.deep_weight_decays):
        row = next((r for r in deep if r["weight_decay"] == wd and r["seed"] == seed), None)
        if row and row["grad_norm"]:
            ax.plot(row["steps"], row["grad_norm"], color=colors[k % len(colors)], label=f"L2 λ={wd:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"plain {config.deep_depth}-layer ReLU MLP, no norm: total gradient norm", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    result.figure(
        save_figure(fig, out_dir, "weight-decay"),
        "Top: the conv weights' norm, the effective learning rate and (BN) the angle turned per step, "
        "with and without weight decay (solid BN, dotted no norm; one seed). Bottom: final test accuracy "
        "over η × λ, and the gradient norm of a deep plain MLP with and without L2.",
    )


STUDY = Study(
    name=NAME,
    title="Weight decay with BatchNorm: an effective learning rate, not a regularizer of the function",
    question="With BN, does L2 act through ‖w‖ and the effective rate η/‖w‖² — and does η·λ decide the outcome?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(
            lrs=(0.1,),
            weight_decays=(0.0, 4e-3),
            steps=200,
            record_every=10,
            deep_depth=10,
            deep_steps=100,
            seeds=(0,),
        ),
        "quick": Config(lrs=(0.05, 0.2), weight_decays=(0.0, 1e-3, 4e-3), steps=800, deep_steps=300, seeds=(0,)),
        "full": Config(),
    },
)
