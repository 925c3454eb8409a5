"""sequence: normalization in a recurrent network on padded batches.

MNIST-1D read as a sequence of patches (40 values → ``40 / patch`` steps of ``patch``
features) by a hand-written LSTM. Every sample is truncated to a random valid length
(uniform in [min_steps, steps]) and right-padded to the full length with a constant
``pad_value``; the recurrence carries its state unchanged through padded steps, so the
classifier reads the state at each sample's last valid step and the padding can reach
the prediction only through normalization statistics. Five cells:

- **none**: the plain LSTM;
- **bn-naive**: BatchNorm1d on the input projection W_x x over (batch, time), padding
  counted (statistics over every position, as a plain BatchNorm does);
- **bn-masked**: the same BatchNorm1d with ``mask=valid``: statistics over the valid
  (sample, step) pairs only;
- **ln**: Ba, Kiros & Hinton (2016): LayerNorm on W_h h_{t-1} (the gates' recurrent
  pre-activations) and on the cell state before its tanh. The paper also normalizes W_x x_t;
  here a step has only ``patch`` features, so W_x x_t has rank ``patch`` and its LayerNorm
  would keep the direction of the input patch and discard its amplitude (with one feature
  per step, only its sign) — measured at the quick setting, learning rate 3e-3: that
  cell stayed at 22% where the plain LSTM reached 48% — so the input projection is left
  as it is;
- **bn-time**: Cooijmans et al. (2017), recurrent BN: BatchNorm on W_x x_t, W_h h_{t-1}
  and the cell state with separate statistics per time step (over the samples still valid
  at that step), γ shared across time and initialised to 0.1, β of the two projections
  fixed at 0 (one bias b for the gates).

Besides training, a direct measurement: the mean and variance a BatchNorm computes on a
batch whose padding share grows from 0 to 0.8, without and with the mask, against the
float64 mean and variance of the valid positions alone.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ... import nn as nln
from ..data import load_mnist1d
from ..output import pyplot, save_figure
from ..runner import grid, parallel_map
from ..study import Study, StudyResult
from ..training import adam

NAME = "sequence"
NORMS = ("none", "bn-naive", "bn-masked", "ln", "bn-time")
LABELS = {
    "none": "no norm",
    "bn-naive": "BN, padding counted",
    "bn-masked": "BN, masked",
    "ln": "LN in the recurrence (Ba 2016)",
    "bn-time": "BN per time step (Cooijmans 2017)",
}


@dataclass(frozen=True)
class Config:
    patch: int = 2  # values of the 40-long signal per step: 40 / patch steps
    min_fraction: float = 0.5  # shortest valid length, as a fraction of the steps
    pad_value: float = 3.0  # what the padding holds (nonzero: naive BN's error is visible)
    hidden: int = 48
    batch_size: int = 64
    steps: int = 1500
    lr: float = 1e-2
    check_every: int = 100
    pad_shares: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    seeds: tuple[int, ...] = (0, 1, 2)


# ---------------------------------------------------------------------------- data


def as_sequences(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 1, 40) signals → (N, 40 / patch, patch) sequences of patches."""
    n, _, length = x.shape
    if length % patch:
        raise ValueError(f"patch must divide the signal length {length}, got {patch}")
    return x.reshape(n, length // patch, patch)


def random_lengths(n: int, steps: int, min_steps: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(min_steps, steps + 1, (n,), generator=generator)


def pad(x: torch.Tensor, lengths: torch.Tensor, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate each sequence of ``x`` (N, T, F) to its length and right-pad it with
    ``value``; returns the padded batch and the (N, T) bool mask of valid steps."""
    mask = torch.arange(x.shape[1]) < lengths[:, None]
    return torch.where(mask[..., None], x, torch.full_like(x, value)), mask


# --------------------------------------------------------------------------- model


class StepBatchNorm(nn.Module):
    """Recurrent BN (Cooijmans et al., 2017): one set of statistics per time step, one γ
    (initialised to ``gamma``) and β shared by every step; statistics over the samples
    valid at that step (``mask``). A step beyond the last seen in training uses the last
    step's statistics, as in the paper."""

    def __init__(self, features: int, steps: int, gamma: float = 0.1, shift: bool = True) -> None:
        super().__init__()
        self.per_step = nn.ModuleList(nln.BatchNorm1d(features, affine=False) for _ in range(steps))
        self.weight = nn.Parameter(torch.full((features,), gamma))
        self.bias = nn.Parameter(torch.zeros(features)) if shift else None

    def forward(self, x: torch.Tensor, t: int, mask: torch.Tensor) -> torch.Tensor:
        y = self.per_step[min(t, len(self.per_step) - 1)](x, mask=mask) * self.weight
        return y if self.bias is None else y + self.bias


class LSTMClassifier(nn.Module):
    """A one-layer LSTM written step by step, with the normalization ``norm`` (see the
    module's docstring), reading (N, T, F) sequences with an (N, T) mask of valid steps;
    the state is held through padded steps and the last valid state is classified."""

    def __init__(self, norm: str, features: int, steps: int, hidden: int = 48, num_classes: int = 10) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm, self.hidden = norm, hidden
        gates = 4 * hidden
        self.input = nn.Linear(features, gates, bias=False)
        self.recurrent = nn.Linear(hidden, gates, bias=False)
        nn.init.orthogonal_(self.recurrent.weight)
        self.bias = nn.Parameter(torch.zeros(gates))
        with torch.no_grad():
            self.bias[hidden : 2 * hidden] = 1.0  # forget gate open at the start
        if norm in ("bn-naive", "bn-masked"):
            self.input_norm = nln.BatchNorm1d(gates)
        elif norm == "ln":
            self.recurrent_norm = nln.LayerNorm(gates)
            self.cell_norm = nln.LayerNorm(hidden)
        elif norm == "bn-time":
            # β of the two projections is redundant with self.bias, so fixed at 0 (the paper).
            self.input_norm = StepBatchNorm(gates, steps, shift=False)
            self.recurrent_norm = StepBatchNorm(gates, steps, shift=False)
            self.cell_norm = StepBatchNorm(hidden, steps)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, steps, _ = x.shape
        projected = self.input(x)  # (N, T, 4H), every step at once
        if self.norm == "bn-naive":
            projected = self.input_norm(projected.transpose(1, 2)).transpose(1, 2)
        elif self.norm == "bn-masked":
            projected = self.input_norm(projected.transpose(1, 2), mask=mask).transpose(1, 2)
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        for t in range(steps):
            valid = mask[:, t]
            wx, wh = projected[:, t], self.recurrent(h)
            if self.norm == "ln":
                wh = self.recurrent_norm(wh)
            elif self.norm == "bn-time":
                wx, wh = self.input_norm(wx, t, valid), self.recurrent_norm(wh, t, valid)
            i, f, g, o = (wx + wh + self.bias).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if self.norm == "ln":
                out = self.cell_norm(c_new)
            elif self.norm == "bn-time":
                out = self.cell_norm(c_new, t, valid)
            else:
                out = c_new
            h_new = torch.sigmoid(o) * torch.tanh(out)
            # a finished sequence keeps its state: padding never enters the recurrence
            keep = valid[:, None]
            h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
        return self.head(h)


# ------------------------------------------------------------------------ training


@torch.no_grad()
def accuracy(
    model: nn.Module, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, batch_size: int, train_mode: bool = False
) -> float:
    """Test accuracy in eval mode (running statistics), or in train mode on batches of
    ``batch_size`` normalized with their own statistics (on a copy: the model's running
    estimates are not touched)."""
    m = copy.deepcopy(model).train() if train_mode else model.eval()
    usable = (len(y) // batch_size) * batch_size if train_mode else len(y)
    step = batch_size if train_mode else 500
    correct = sum(
        (m(x[i : i + step], mask[i : i + step]).argmax(1) == y[i : i + step]).sum().item()
        for i in range(0, usable, step)
    )
    model.train()
    return correct / usable


def one_run(config: Config, norm: str, seed: int) -> dict:
    data = load_mnist1d()
    x_train, x_test = as_sequences(data.x_train, config.patch), as_sequences(data.x_test, config.patch)
    steps = x_train.shape[1]
    min_steps = max(1, math.ceil(config.min_fraction * steps))
    # The test set is padded once, with its own fixed lengths, the same for every run.
    x_test, test_mask = pad(
        x_test, random_lengths(len(x_test), steps, min_steps, torch.Generator().manual_seed(7)), config.pad_value
    )
    torch.manual_seed(seed)
    model = LSTMClassifier(norm, config.patch, steps, config.hidden)
    optimizer = adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    n, per_epoch = len(data.y_train), len(data.y_train) // config.batch_size
    loss_fn = nn.CrossEntropyLoss()
    history, losses, diverged, order = [], [], False, None
    for step in range(config.steps):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        idx = order[(step % per_epoch) * config.batch_size : (step % per_epoch + 1) * config.batch_size]
        xb, mb = pad(x_train[idx], random_lengths(len(idx), steps, min_steps, generator), config.pad_value)
        loss = loss_fn(model(xb, mb), data.y_train[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the usual guard for an RNN
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % config.check_every == 0 or step + 1 == config.steps:
            history.append(
                {
                    "step": step + 1,
                    "train_loss": statistics.fmean(losses),
                    "test_accuracy": accuracy(model, x_test, test_mask, data.y_test, config.batch_size),
                }
            )
            losses = []
    row = {"norm": norm, "seed": seed, "diverged": diverged, "history": history}
    if diverged:
        row.update(eval_mode=0.0, train_mode=0.0)
        return row
    row["eval_mode"] = history[-1]["test_accuracy"]
    row["train_mode"] = accuracy(model, x_test, test_mask, data.y_test, config.batch_size, train_mode=True)
    return row


# --------------------------------------------------------------- statistics error


def statistics_error(
    pad_shares, pad_value: float, patch: int = 2, channels: int = 64, batch: int = 256, seed: int = 0
) -> list[dict]:
    """For each padding share p: a batch of MNIST-1D sequences projected to ``channels``
    features by a fixed random linear map, each truncated to (1 − p)·T steps and padded with
    ``pad_value``; the batch mean and variance that ``normlab.nn.BatchNorm1d`` computes
    (read from its running estimates after one step with momentum 1) without and with the
    mask, against the float64 mean and variance of the valid positions. Errors per channel,
    averaged: |μ − μ_ref| / σ_ref and |σ² / σ²_ref − 1|."""
    data = load_mnist1d()
    x = as_sequences(data.x_test[:batch], patch)
    steps = x.shape[1]
    torch.manual_seed(seed)
    projection = nn.Linear(patch, channels)
    rows = []
    for share in pad_shares:
        length = max(2, round((1 - share) * steps))
        xb, mask = pad(x, torch.full((len(x),), length), pad_value)
        with torch.no_grad():
            features = projection(xb).transpose(1, 2)  # (N, C, T)
        valid = features.double().transpose(1, 2)[mask]  # (valid pairs, C)
        ref_mean, ref_var = valid.mean(0), valid.var(0, unbiased=True)
        row = {"pad_share": 1 - mask.double().mean().item()}
        for kind, kwargs in (("naive", {}), ("masked", {"mask": mask})):
            bn = nln.BatchNorm1d(channels, momentum=1.0)
            with torch.no_grad():
                bn(features, **kwargs)
            mean, var = bn.running_mean.double(), bn.running_var.double()
            row[f"{kind}_mean_error"] = ((mean - ref_mean).abs() / ref_var.sqrt()).mean().item()
            row[f"{kind}_var_error"] = (var / ref_var - 1).abs().mean().item()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------- report


def measure(config: Config, out_dir: Path) -> dict:
    stats_rows = statistics_error(config.pad_shares, config.pad_value, config.patch)
    # bn-time and the masked runs are the slowest: first, so the pool ends together
    order = ("bn-time", "bn-masked", "ln", "bn-naive", "none")
    tasks = grid({"config": config}, norm=order, seed=config.seeds)
    rows = parallel_map(one_run, tasks, desc=NAME)
    return {"statistics_error": stats_rows, "runs": rows}


def summarise(config: Config, result: StudyResult) -> None:
    rows, stats_rows = result.data["runs"], result.data["statistics_error"]
    summary = {}
    for norm in NORMS:
        mine = [r for r in rows if r["norm"] == norm]
        curves = [r["history"] for r in mine if not r["diverged"]]
        curve = (
            [
                {"step": h["step"], "test_accuracy": statistics.fmean(c[i]["test_accuracy"] for c in curves)}
                for i, h in enumerate(curves[0])
            ]
            if curves
            else []
        )
        summary[norm] = {
            "eval_mode": statistics.fmean(r["eval_mode"] for r in mine),
            "train_mode": statistics.fmean(r["train_mode"] for r in mine),
            "spread": statistics.stdev(r["eval_mode"] for r in mine) if len(mine) > 1 else None,
            "diverged": sum(r["diverged"] for r in mine),
            "runs": len(mine),
            "curve": curve,
        }
    result.data["by_norm"] = summary
    _tables(summary, stats_rows, result)
    _findings(config, rows, summary, stats_rows, result)


def _tables(summary: dict, stats_rows: list[dict], result: StudyResult) -> None:
    result.table(
        "Test accuracy % after training (mean over seeds)",
        ["cell", "eval mode", "train mode", "train − eval", "diverged"],
        [
            [
                LABELS[n],
                f"{100 * summary[n]['eval_mode']:.1f}",
                f"{100 * summary[n]['train_mode']:.1f}",
                f"{100 * (summary[n]['train_mode'] - summary[n]['eval_mode']):+.1f}",
                f"{summary[n]['diverged']}/{summary[n]['runs']}",
            ]
            for n in NORMS
        ],
    )
    result.table(
        "BatchNorm1d statistics on a padded batch vs those of the valid positions (mean over channels)",
        ["padding share", "naive |Δμ|/σ", "naive |σ²/σ²_ref − 1|", "masked |Δμ|/σ", "masked |σ²/σ²_ref − 1|"],
        [
            [
                f"{r['pad_share']:.2f}",
                f"{r['naive_mean_error']:.3g}",
                f"{r['naive_var_error']:.3g}",
                f"{r['masked_mean_error']:.1e}",
                f"{r['masked_var_error']:.1e}",
            ]
            for r in stats_rows
        ],
    )


def _findings(config: Config, rows: list[dict], summary: dict, stats_rows: list[dict], result: StudyResult) -> None:
    """The summary lines and the comparison with Ba et al. (2016) and Cooijmans et al. (2017)."""
    steps = rows[0]["history"][-1]["step"] if rows and rows[0]["history"] else config.steps

    def reach(norm: str, target: float) -> int | None:
        return next((p["step"] for p in summary[norm]["curve"] if p["test_accuracy"] >= target), None)

    target = 0.9 * summary["none"]["eval_mode"]
    reached = {n: reach(n, target) for n in NORMS}
    result.data["steps_to_90pct_of_plain_final"] = reached
    worst = stats_rows[-1]
    masked_max = max(max(r["masked_mean_error"], r["masked_var_error"]) for r in stats_rows)
    naive_grows = all(b["naive_mean_error"] > a["naive_mean_error"] for a, b in zip(stats_rows, stats_rows[1:]))
    gap = {n: summary[n]["train_mode"] - summary[n]["eval_mode"] for n in NORMS}

    def fmt(norm):
        return f"{LABELS[norm]} {100 * summary[norm]['eval_mode']:.1f}%"

    result.summary += [
        f"After {steps} steps (eval mode): " + ", ".join(fmt(n) for n in NORMS) + ".",
        f"Steps to reach {100 * target:.1f}% (90% of the plain LSTM's final accuracy): "
        + ", ".join(f"{n} {reached[n] if reached[n] is not None else 'not reached'}" for n in NORMS)
        + ".",
        f"At padding share {worst['pad_share']:.2f}, BatchNorm without the mask is off by "
        f"{worst['naive_mean_error']:.2f} σ in the mean and {100 * worst['naive_var_error']:.0f}% in the variance; "
        f"with the mask, at most {masked_max:.1e} at any share.",
        "Train-mode minus eval-mode test accuracy: "
        + ", ".join(f"{n} {100 * gap[n]:+.1f}" for n in NORMS)
        + " points.",
    ]
    result.compare(
        "Padding counted in BatchNorm's statistics corrupts them; a mask removes the error",
        "the reason BN is hard to use on padded sequences (qualitative; no paper number)",
        f"naive error grows with the padding share to {worst['naive_mean_error']:.2f} σ (mean) and "
        f"{100 * worst['naive_var_error']:.0f}% (variance) at {worst['pad_share']:.2f}; masked ≤ {masked_max:.1e}",
        "yes" if naive_grows and masked_max < 1e-4 else "no",
    )
    ln_faster = reached["ln"] is not None and (reached["none"] is None or reached["ln"] < reached["none"])
    result.compare(
        "LayerNorm inside the recurrence speeds up training",
        "Ba, Kiros & Hinton (2016): LN-LSTM converges faster than the LSTM (qualitative here; "
        "their tasks are much larger), and its statistics do not depend on the batch",
        f"steps to {100 * target:.1f}%: LN {reached['ln']}, plain {reached['none']}; final "
        f"{100 * summary['ln']['eval_mode']:.1f} vs {100 * summary['none']['eval_mode']:.1f}%; train − eval "
        f"{100 * gap['ln']:+.1f} points",
        "yes"
        if ln_faster and summary["ln"]["eval_mode"] >= summary["none"]["eval_mode"]
        else "partly"
        if ln_faster or summary["ln"]["eval_mode"] >= summary["none"]["eval_mode"]
        else "no",
        ""
        if ln_faster and summary["ln"]["eval_mode"] >= summary["none"]["eval_mode"]
        else "only one of: faster to the target, at least as accurate at the end",
    )
    bt_faster = reached["bn-time"] is not None and (reached["none"] is None or reached["bn-time"] < reached["none"])
    bt_better = summary["bn-time"]["eval_mode"] >= summary["none"]["eval_mode"]
    result.compare(
        "Recurrent BN (per-time-step statistics, γ = 0.1) trains faster than the LSTM",
        "Cooijmans et al. (2017), Table 1: BN-LSTM 99.0% / 95.4% test accuracy on sequential / permuted MNIST "
        "vs LSTM 98.9% / 90.2%, and faster convergence (784 steps of one pixel; here 10–20 steps)",
        f"steps to {100 * target:.1f}%: BN-time {reached['bn-time']}, plain {reached['none']}; final "
        f"{100 * summary['bn-time']['eval_mode']:.1f} vs {100 * summary['none']['eval_mode']:.1f}%",
        "yes" if bt_faster and bt_better else "partly" if bt_faster or bt_better else "no",
        "" if bt_faster and bt_better else "only one of: faster to the target, at least as accurate at the end",
    )
    lead = summary["bn-masked"]["eval_mode"] - summary["bn-naive"]["eval_mode"]
    spreads = [summary[n]["spread"] for n in ("bn-masked", "bn-naive") if summary[n]["spread"] is not None]
    noise = max(spreads) if spreads else None  # sd over seeds; unknown with one seed
    masked_ok = lead >= 0
    masked_clear = masked_ok and noise is not None and lead > noise
    result.compare(
        "Masked BN is at least as good as BN that counts the padding",
        "follows from the statistics above (no paper number)",
        f"final {100 * summary['bn-masked']['eval_mode']:.1f}% masked vs {100 * summary['bn-naive']['eval_mode']:.1f}% "
        f"naive; train − eval {100 * gap['bn-masked']:+.1f} vs {100 * gap['bn-naive']:+.1f} points",
        "yes" if masked_clear else "partly" if masked_ok else "no",
        ""
        if masked_clear
        else ("ahead by less than the spread between seeds" if noise is not None else "one seed: no spread to judge by")
        if masked_ok
        else "the network learns around the offset the padding adds to the statistics",
    )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    summary, stats_rows = result.data["by_norm"], result.data["statistics_error"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for norm in NORMS:
        c = summary[norm]["curve"]
        ax.plot([p["step"] for p in c], [100 * p["test_accuracy"] for p in c], label=LABELS[norm])
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy % (eval mode)")
    ax.set_title(f"LSTM({config.hidden}) on padded MNIST-1D, mean of {len(config.seeds)} seed(s)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    shares = [100 * r["pad_share"] for r in stats_rows]
    floor = 1e-12  # an exact 0 (no padding) has no place on a log axis
    for kind, style in (("naive", "-"), ("masked", "--")):
        for stat, marker in (("mean", "o"), ("var", "s")):
            ax.plot(
                shares,
                [max(floor, r[f"{kind}_{stat}_error"]) for r in stats_rows],
                style,
                marker=marker,
                label=f"{kind}: {'mean' if stat == 'mean' else 'variance'}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("padding share of the batch %")
    ax.set_ylabel("error vs the valid positions' statistics")
    ax.set_title(f"BatchNorm1d statistics, padding = {config.pad_value:g}", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    xs = range(len(NORMS))
    ax.bar([i - 0.2 for i in xs], [100 * summary[n]["train_mode"] for n in NORMS], 0.4, label="train mode")
    ax.bar([i + 0.2 for i in xs], [100 * summary[n]["eval_mode"] for n in NORMS], 0.4, label="eval mode")
    ax.set_xticks(list(xs), [n for n in NORMS], fontsize=8)
    ax.set_ylabel("test accuracy %")
    low = min(min(summary[n]["train_mode"], summary[n]["eval_mode"]) for n in NORMS)
    ax.set_ylim(max(0, 100 * low - 10), 100)
    ax.set_title(f"train mode (test batches of {config.batch_size}) vs eval mode", fontsize=10)
    ax.legend(fontsize=8)
    result.figure(
        save_figure(fig, out_dir, "sequence"),
        "Test accuracy vs steps; the error of BatchNorm's statistics with and without the mask as the "
        "padding share grows (masked: float32 rounding; 1e-12 stands for 0); test accuracy in train "
        "mode vs eval mode.",
    )


STUDY = Study(
    name=NAME,
    title="Sequence: norms in an LSTM on padded batches",
    question="On padded sequences, what does counting the padding do to BatchNorm, and how do masked BN, "
    "LayerNorm and per-time-step BN train an LSTM?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(patch=4, hidden=16, steps=30, check_every=15, pad_shares=(0.0, 0.4, 0.8), seeds=(0,)),
        "quick": Config(patch=4, hidden=32, steps=400, check_every=50, seeds=(0,)),
        "full": Config(),
    },
)
