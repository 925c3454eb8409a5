"""train-eval-gap: what BatchNorm at small batch does to test time, and four ways to test.

The MNIST-1D CNN trained with BatchNorm at batch B (lr 0.1·B/32, cosine), then tested:

- **train mode**: batches of B test samples normalized with their own statistics — what
  the network saw in training (and how a model left in ``train()`` by mistake behaves);
- **eval mode**: the running averages (momentum 0.1) — the default;
- **precise BN**: population statistics recomputed over the training set at batch B
  (``normlab.surgery.precise_bn``);
- **frozen BN + 1 epoch**: statistics frozen (``normlab.surgery.freeze_norms`` with the
  affine left trainable), then one more epoch at a small constant rate, so the layers
  above adapt to the fixed normalization used at test time; beside it the same extra epoch
  *unfrozen*, as the control.

GroupNorm, trained the same way, has no train/test difference and is shown beside.
At batch 32 the four agree; at batch 2 BatchNorm's 2-sample statistics are noise the
network learned to live with, and the test-time normalization differs from it.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ...surgery import freeze_norms, precise_bn
from ..data import load_mnist1d
from ..models import ConvNet1d
from ..output import pyplot, save_figure
from ..runner import grid, parallel_map
from ..study import Study, StudyResult
from ..training import StepConfig, TrainConfig, epoch_batches, evaluate, train_classifier, train_steps

NAME = "train-eval-gap"
COLUMNS = ("train_mode", "eval_mode", "precise_bn", "frozen_finetune", "unfrozen_finetune")
LABELS = {
    "train_mode": "train mode (batch statistics)",
    "eval_mode": "eval mode (running averages)",
    "precise_bn": "precise BN",
    "frozen_finetune": "frozen BN + 1 epoch",
    "unfrozen_finetune": "+1 epoch unfrozen (control)",
}


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple[int, ...] = (2, 4, 8, 32)
    epochs: int = 6
    finetune_lr_fraction: float = 0.1  # of the training rate, constant, for the extra epoch
    seeds: tuple[int, ...] = (0, 1, 2)
    #: Training steps at batches up to this size use torch's native convolution (faster there;
    #: equal to oneDNN's to float rounding): see ``training.native_convolution``. 0: oneDNN's.
    native_conv_max_batch: int = 0


@torch.no_grad()
def train_mode_accuracy(model, x, y, batch_size: int) -> float:
    """Accuracy with every norm layer using the statistics of test batches of ``batch_size``
    (on a copy: the running averages of ``model`` are not touched)."""
    m = copy.deepcopy(model).train()
    correct = 0
    usable = (len(y) // batch_size) * batch_size  # whole batches only, as in training
    for i in range(0, usable, batch_size):
        correct += (m(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / usable


def one_run(config: Config, norm: str, batch_size: int, seed: int) -> dict:
    data = load_mnist1d()
    torch.manual_seed(seed)
    model = ConvNet1d(norm)
    train = TrainConfig(
        batch_size=batch_size, epochs=config.epochs, seed=seed, native_conv_max_batch=config.native_conv_max_batch
    )
    result = train_classifier(model, data, train, test_every_epoch=False)
    row = {
        "norm": norm,
        "batch_size": batch_size,
        "seed": seed,
        "diverged": result.diverged,
        "eval_mode": result.test_accuracy,
    }
    if result.diverged:
        return row
    per_epoch = len(data.y_train) // batch_size
    finetune = StepConfig(
        steps=per_epoch,
        batch_size=batch_size,
        lr=train.lr * config.finetune_lr_fraction,
        weight_decay=train.weight_decay,
        check_every=per_epoch,
        seed=seed + 1,
        native_conv_max_batch=config.native_conv_max_batch,
    )
    control = copy.deepcopy(model)
    train_steps(control, data, finetune)
    row["unfrozen_finetune"] = evaluate(control, data.x_test, data.y_test)
    if norm == "batch":
        row["train_mode"] = train_mode_accuracy(model, data.x_test, data.y_test, batch_size)
        batches = epoch_batches(data, batch_size, seed + 1000)
        row["precise_bn"] = evaluate(
            precise_bn(model, batches, num_batches=len(batches)).model, data.x_test, data.y_test
        )
        frozen = freeze_norms(model, affine=False).model
        train_steps(frozen, data, finetune)
        row["frozen_finetune"] = evaluate(frozen, data.x_test, data.y_test)
    return row


def measure(config: Config, out_dir: Path) -> dict:
    tasks = grid({"config": config}, batch_size=sorted(config.batch_sizes), seed=config.seeds, norm=("batch", "group"))
    rows = parallel_map(one_run, tasks, desc=NAME)
    return {"runs": rows}


def summarise(config: Config, result: StudyResult) -> None:
    rows = result.data["runs"]

    def mean(norm, b, key):
        values = [r[key] for r in rows if r["norm"] == norm and r["batch_size"] == b and key in r]
        return statistics.fmean(values) if values else None

    table, cells = [], {}
    for b in config.batch_sizes:
        cells[b] = {k: mean("batch", b, k) for k in COLUMNS}
        cells[b]["group"] = mean("group", b, "eval_mode")
        cells[b]["group_finetune"] = mean("group", b, "unfrozen_finetune")
        table.append(
            [str(b)]
            + [
                ("–" if cells[b][k] is None else f"{100 * cells[b][k]:.1f}")
                for k in (*COLUMNS, "group", "group_finetune")
            ]
        )
    result.data["mean_accuracy"] = {str(b): v for b, v in cells.items()}
    result.table(
        f"Test accuracy % (mean over {len(config.seeds)} seed(s))",
        ["batch", *[f"BN: {LABELS[k]}" for k in COLUMNS], "GroupNorm", "GroupNorm +1 epoch"],
        table,
    )

    small, big = min(config.batch_sizes), max(config.batch_sizes)
    c = cells[small]
    result.summary += [
        f"At batch {small}: train mode {100 * c['train_mode']:.1f}%, eval mode {100 * c['eval_mode']:.1f}%, "
        f"precise BN {100 * c['precise_bn']:.1f}%, frozen BN + 1 epoch {100 * c['frozen_finetune']:.1f}% "
        f"(control +1 epoch unfrozen {100 * c['unfrozen_finetune']:.1f}%); GroupNorm {100 * c['group']:.1f}%.",
        f"At batch {big} the BN columns span {100 * (max(cells[big][k] for k in COLUMNS) - min(cells[big][k] for k in COLUMNS)):.1f} "
        f"points; at batch {small}, {100 * (max(c[k] for k in COLUMNS) - min(c[k] for k in COLUMNS)):.1f}.",
    ]
    result.compare(
        "Small-batch BN: the test-time statistics differ from training's",
        "Wu & He (2018), Ioffe (2017): with small batches, batch statistics are noisy and the running "
        "estimates used at inference do not match what training saw; GN avoids the issue",
        f"batch {small}: train mode {100 * c['train_mode']:.1f}% vs eval {100 * c['eval_mode']:.1f}% "
        f"vs GN {100 * c['group']:.1f}%",
        "yes" if c["group"] > c["eval_mode"] else "partly",
        "" if c["group"] > c["eval_mode"] else "GN does not beat BN here at this scale",
    )
    result.compare(
        "Precise BN and frozen fine-tuning recover part of the loss",
        "Wu & Johnson (2021) 'Rethinking Batch in BatchNorm': precise population statistics "
        "improve on EMA estimates, most where the EMA is poor",
        f"batch {small}: precise {100 * c['precise_bn']:.1f}%, frozen+1 epoch "
        f"{100 * c['frozen_finetune']:.1f}% vs eval {100 * c['eval_mode']:.1f}%",
        "yes" if max(c["precise_bn"], c["frozen_finetune"]) > c["eval_mode"] else "no",
    )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    cells = {b: result.data["mean_accuracy"][str(b)] for b in config.batch_sizes}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    xs = list(range(len(config.batch_sizes)))
    for key in (*COLUMNS, "group"):
        ys = [None if cells[b][key] is None else 100 * cells[b][key] for b in config.batch_sizes]
        ax.plot(
            xs,
            ys,
            marker="o",
            ls="--" if key == "group" else "-",
            label="GroupNorm (eval = train)" if key == "group" else f"BN, {LABELS[key]}",
        )
    ax.set_xticks(xs, [str(b) for b in config.batch_sizes])
    ax.set_xlabel("training batch size")
    ax.set_ylabel("test accuracy %")
    ax.set_title("BatchNorm at small batch: four ways to normalize at test time", fontsize=10)
    ax.legend(fontsize=7)
    result.figure(
        save_figure(fig, out_dir, "train-eval-gap"),
        "Test accuracy of the same BatchNorm networks under each test-time normalization, and GroupNorm.",
    )


STUDY = Study(
    name=NAME,
    title="Train/eval gap: BatchNorm at small batch, and how to test it",
    question="At batch 2, how do train-mode, running, precise and frozen statistics compare — and GroupNorm?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(batch_sizes=(8, 32), epochs=1, seeds=(0,), native_conv_max_batch=16),
        # torch's native convolution at batch 2 (not 32, where oneDNN's is faster): 0.55x the
        # CPU per step; the full setting keeps oneDNN's, with which its documented numbers were run
        "quick": Config(batch_sizes=(2, 32), epochs=4, seeds=(0,), native_conv_max_batch=16),
        "full": Config(),
    },
)
