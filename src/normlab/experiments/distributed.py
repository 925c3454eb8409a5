"""Multi-process training on MNIST-1D: DistributedDataParallel over gloo, on the CPU.

Launch with torchrun::

    torchrun --nproc_per_node=2 -m normlab.experiments.distributed --norm sync --batch-size 2

``--norm sync`` converts every BatchNorm to :class:`normlab.nn.SyncBatchNorm`, so two
processes with 2 samples each normalize over the global batch of 4: the same training as
one process at batch 4 (same data order, same initial weights — identical up to float
rounding). ``--norm local`` keeps per-process BatchNorm, whose statistics come from 2
samples only. ``normlab sync-demo`` runs that comparison and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..surgery import convert_sync_batchnorm
from .data import load_mnist1d
from .models import ConvNet1d
from .training import TrainConfig, evaluate, train_classifier

__all__ = [
    "DistributedConfig",
    "init_local_group",
    "main",
    "run_sync_comparison",
    "spawn_training",
    "train_distributed",
]


@dataclass(frozen=True)
class DistributedConfig:
    norm: str = "sync"  # "sync": SyncBatchNorm; "local": per-process BatchNorm
    batch_size: int = 2  # per process; the global batch is world × batch_size
    epochs: int = 6
    seed: int = 0
    base_lr: float = 0.1  # at a global batch of 32, scaled linearly
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_steps: int | None = None  # stop early (tests, smoke runs)
    timeout_seconds: float = 120.0


def _model(config: DistributedConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    model = ConvNet1d("batch")
    if config.norm == "sync":
        model = convert_sync_batchnorm(model).model
    elif config.norm != "local":
        raise ValueError(f"norm must be 'sync' or 'local', got {config.norm!r}")
    return model


def train_distributed(config: DistributedConfig, *, return_model: bool = False):
    """Train on this process's shard of every global batch; call in every process of an
    initialized (gloo) process group. Returns the result (test accuracy on rank 0), and
    the trained model too with ``return_model``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # tiny per-process batches: one thread is fastest
    data = load_mnist1d()
    model = nn.parallel.DistributedDataParallel(_model(config))
    global_batch = world * config.batch_size
    lr = config.base_lr * global_batch / 32
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = len(data.y_train) // global_batch
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps_per_epoch * config.epochs)))
    )
    generator = torch.Generator().manual_seed(config.seed)  # the same order in every process
    loss_fn = nn.CrossEntropyLoss()
    start, step = time.perf_counter(), 0
    model.train()
    while step < total:
        order = torch.randperm(len(data.y_train), generator=generator)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            batch = order[i * global_batch : (i + 1) * global_batch]
            mine = batch[rank * config.batch_size : (rank + 1) * config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(data.x_train[mine]), data.y_train[mine]).backward()
            optimizer.step()
            schedule.step()
            step += 1
    seconds = time.perf_counter() - start
    result = {
        **asdict(config),
        "world": world,
        "global_batch": global_batch,
        "lr": lr,
        "steps": step,
        "seconds": seconds,
    }
    if rank == 0:
        result["test_accuracy"] = evaluate(model.module, data.x_test, data.y_test)
    return (result, model.module) if return_model else result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_group(rank: int, world: int, port: int, timeout_seconds: float) -> None:
    """Join a gloo process group of ``world`` processes on this machine (``port`` from
    :func:`_free_port`), giving up after ``timeout_seconds`` instead of hanging on a peer
    that died."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_seconds),
    )


def _spawned(rank, world, port, config, out):
    init_local_group(rank, world, port, config.timeout_seconds)
    try:
        result = train_distributed(config)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn_training(config: DistributedConfig, world: int = 2) -> dict:
    """Run :func:`train_distributed` in ``world`` local processes; rank 0's result."""
    load_mnist1d()  # fail here, not in a child, if the data cannot be generated
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_spawned, args=(world, _free_port(), config, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def run_sync_comparison(epochs: int = 6, seed: int = 0) -> list[dict]:
    """SyncBN at 2 processes × batch 2 next to one process at batch 4 and at batch 2, and
    to per-process BatchNorm at 2 × 2."""
    rows = []
    data = load_mnist1d()
    for batch in (4, 2):
        torch.manual_seed(seed)
        result = train_classifier(ConvNet1d("batch"), data, TrainConfig(batch_size=batch, epochs=epochs, seed=seed))
        rows.append(
            {
                "setting": f"1 process, BatchNorm, batch {batch}",
                "processes": 1,
                "global_batch": batch,
                "test_accuracy": result.test_accuracy,
                "seconds": result.seconds,
            }
        )
    for norm, label in (("sync", "SyncBatchNorm"), ("local", "local BatchNorm")):
        result = spawn_training(DistributedConfig(norm=norm, batch_size=2, epochs=epochs, seed=seed), world=2)
        rows.append(
            {
                "setting": f"2 processes x batch 2, {label}",
                "processes": 2,
                "global_batch": 4,
                "test_accuracy": result["test_accuracy"],
                "seconds": result["seconds"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m normlab.experiments.distributed",
        description="DDP training of a small CNN on MNIST-1D over gloo; launch with torchrun.",
    )
    parser.add_argument("--norm", choices=["sync", "local"], default="sync")
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds before a collective gives up on a silent peer"
    )
    parser.add_argument("--out", help="rank 0 writes its result as JSON here")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error(
            "run under torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); "
            "for a single-process comparison use `normlab sync-demo`"
        )
    config = DistributedConfig(
        norm=args.norm,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        max_steps=args.max_steps,
        timeout_seconds=args.timeout,
    )
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=config.timeout_seconds))
    try:
        result = train_distributed(config)
    finally:
        dist.destroy_process_group()
    if result.get("test_accuracy") is not None:
        print(
            f"{result['world']} processes x batch {config.batch_size}, {config.norm} BatchNorm: "
            f"test accuracy {100 * result['test_accuracy']:.1f}% after {result['steps']} steps "
            f"({result['seconds']:.0f} s)"
        )
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
