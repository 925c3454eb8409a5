"""SyncBatchNorm's cost in a 2-process gloo DDP training step, and its collectives per layer."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..experiments.distributed import _free_port, init_local_group
from ..experiments.models import ConvNet1d
from ..surgery import convert_sync_batchnorm
from .timing import interleaved_medians

__all__ = ["SyncBenchConfig", "format_sync_table", "run_sync_benchmark"]


@dataclass(frozen=True)
class SyncBenchConfig:
    batch_size: int = 8  # per process
    steps_per_sample: int = 10
    repeats: int = 21
    count_steps: int = 5
    processes: int = 2


class _CollectiveCounter:
    """Counts Python-level collectives (SyncBatchNorm's; DDP's gradient buckets go
    through its C++ reducer and are not counted)."""

    def __init__(self):
        self.counts = {"all_gather": 0, "all_reduce": 0}
        self._originals = {}

    def __enter__(self):
        for name in self.counts:
            original = getattr(dist, name)
            self._originals[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _worker(rank, world, port, config, out):
    init_local_group(rank, world, port, timeout_seconds=120)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x = torch.randn(config.batch_size, 1, 40)
        y = torch.randint(0, 10, (config.batch_size,))
        models = {"local BatchNorm": ConvNet1d("batch")}
        models["SyncBatchNorm"] = convert_sync_batchnorm(ConvNet1d("batch")).model
        loss_fn = nn.CrossEntropyLoss()
        runners = {}
        for name, model in models.items():
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01)

            def run(ddp=ddp, opt=opt):
                for _ in range(config.steps_per_sample):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(ddp(x), y).backward()
                    opt.step()

            runners[name] = run
        # Both processes run the same interleaved schedule, so their collectives pair up.
        times = interleaved_medians(runners, repeats=config.repeats)
        with _CollectiveCounter() as counter:
            for _ in range(config.count_steps // config.steps_per_sample + 1):
                runners["SyncBatchNorm"]()
        steps = (config.count_steps // config.steps_per_sample + 1) * config.steps_per_sample
        layers = sum(1 for m in models["SyncBatchNorm"].modules() if type(m).__name__ == "SyncBatchNorm")
        if rank == 0:
            Path(out).write_text(
                json.dumps(
                    {
                        "ms_per_step": {k: 1e3 * v / config.steps_per_sample for k, v in times.items()},
                        "forward_collectives_per_layer_step": counter.counts["all_gather"] / (steps * layers),
                        "backward_collectives_per_layer_step": counter.counts["all_reduce"] / (steps * layers),
                        "sync_layers": layers,
                    }
                )
            )
    finally:
        dist.destroy_process_group()


def run_sync_benchmark(config: SyncBenchConfig = SyncBenchConfig()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sync.json")
        start = time.perf_counter()
        mp.spawn(_worker, args=(config.processes, _free_port(), config, out), nprocs=config.processes, join=True)
        result = json.loads(Path(out).read_text())
    result["wall_seconds"] = time.perf_counter() - start
    result["config"] = config.__dict__
    return result


def format_sync_table(result: dict) -> str:
    ms = result["ms_per_step"]
    ratio = ms["SyncBatchNorm"] / ms["local BatchNorm"]
    return "\n".join(
        [
            f"{'setting':<18}{'ms/step':>10}",
            *(f"{k:<18}{v:>10.3f}" for k, v in ms.items()),
            f"SyncBatchNorm / local: {ratio:.2f}x",
            f"collectives per SyncBatchNorm layer per step: {result['forward_collectives_per_layer_step']:.2f} in forward "
            f"(all_gather), {result['backward_collectives_per_layer_step']:.2f} in backward (all_reduce)",
        ]
    )
