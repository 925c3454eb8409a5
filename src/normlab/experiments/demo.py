"""The small demonstration: BatchNorm vs GroupNorm on MNIST-1D at batch 32 and batch 2.

BatchNorm's statistics come from the batch; at batch 2 they are noisy in training and
unlike the running estimates used at test time, so its test accuracy drops. GroupNorm's
statistics come from each sample alone and do not care about the batch size (Wu & He,
2018, Figure 1, reproduced at CPU scale).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from .data import load_mnist1d
from .models import ConvNet1d
from .runner import parallel_map, worker_pool
from .training import TrainConfig, train_classifier

__all__ = ["DemoConfig", "format_table", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    norms: tuple[str, ...] = ("batch", "group")
    batch_sizes: tuple[int, ...] = (32, 2)
    epochs: int = 6
    seed: int = 0
    jobs: int = min(2, os.cpu_count() or 1)


def _one_run(norm: str, batch_size: int, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = ConvNet1d(norm)
    config = TrainConfig(batch_size=batch_size, epochs=epochs, seed=seed)
    result = train_classifier(model, load_mnist1d(), config)
    return {
        "norm": norm,
        "batch_size": batch_size,
        "epochs": epochs,
        "seed": seed,
        "lr": config.lr,
        "test_accuracy": result.test_accuracy,
        "train_loss": result.train_loss,
        "seconds": result.seconds,
        "steps": result.steps,
    }


def run_demo(config: DemoConfig = DemoConfig()) -> list[dict]:
    """Train every (norm, batch size) pair once; runs in ``config.jobs`` processes.

    The studies' worker pool: Ctrl-C or SIGTERM (turned into an exception by the command
    line) stops the workers at once, and none outlives this process."""
    load_mnist1d()  # generate once in the parent so a failure shows before the workers start
    tasks = [
        {"norm": n, "batch_size": b, "epochs": config.epochs, "seed": config.seed}
        for b in config.batch_sizes
        for n in config.norms
    ]
    with worker_pool(config.jobs):
        return parallel_map(_one_run, tasks, desc="demo")


def format_table(rows: list[dict], config: DemoConfig) -> str:
    names = {
        "batch": "BatchNorm",
        "group": "GroupNorm(8)",
        "layer": "LayerNorm",
        "instance": "InstanceNorm",
        "none": "no norm",
    }
    lines = [
        f"MNIST-1D, 3 x [Conv1d(32) -> norm -> ReLU] + linear, SGD momentum 0.9, "
        f"lr 0.1*B/32 cosine, {config.epochs} epochs, seed {config.seed}, test in eval mode",
        "",
        f"{'norm':<14}" + "".join(f"{'batch ' + str(b):>12}" for b in config.batch_sizes),
    ]
    for norm in config.norms:
        cells = []
        for b in config.batch_sizes:
            row = next(r for r in rows if r["norm"] == norm and r["batch_size"] == b)
            cells.append(f"{100 * row['test_accuracy']:>11.1f}%")
        lines.append(f"{names.get(norm, norm):<14}" + "".join(cells))
    seconds = sum(r["seconds"] for r in rows)
    lines += ["", f"training time {seconds:.0f} s in total (single-threaded runs)"]
    return "\n".join(lines)


def demo_config_dict(config: DemoConfig) -> dict:
    return asdict(config)
