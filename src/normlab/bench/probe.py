"""What recording costs: training-step time with a Probe at every step, every 10th, and none;
and what reading the records back costs, per record."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..diagnostics import Probe
from ..experiments.models import ConvNet1d
from .common import threads_kept
from .timing import interleaved_medians

__all__ = ["ProbeBenchConfig", "format_probe_table", "run_probe_benchmark"]


@dataclass(frozen=True)
class ProbeBenchConfig:
    batch_size: int = 32
    steps_per_sample: int = 10  # training steps per timed call
    repeats: int = 61
    intervals: tuple[int, ...] = (1, 10)
    threads: int = 1
    seed: int = 0


def run_probe_benchmark(config: ProbeBenchConfig = ProbeBenchConfig()) -> list[dict]:
    """Median time per training step of ConvNet1d (3 conv + BN + ReLU, MNIST-1D shaped
    input) without a probe and with one at each interval, interleaved round-robin; then,
    per interval, the time to read every record back (sorting, histograms) per record."""
    with threads_kept(config.threads):
        torch.manual_seed(config.seed)
        base = ConvNet1d("batch")
        x = torch.randn(config.batch_size, 1, 40)
        y = torch.randint(0, 10, (config.batch_size,))
        loss_fn = nn.CrossEntropyLoss()

        probes: dict[str, Probe] = {}

        def trainer(probe_every: int | None):
            model = copy.deepcopy(base)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if probe_every is not None:
                probes[f"every {probe_every}"] = Probe(model, every=probe_every, optimizer=optimizer).attach()

            def run():
                for _ in range(config.steps_per_sample):
                    optimizer.zero_grad(set_to_none=True)
                    loss_fn(model(x), y).backward()
                    optimizer.step()

            return run

        fns = {"no probe": trainer(None)}
        fns.update({f"every {k}": trainer(k) for k in config.intervals})
        # Single-threaded, so CPU time of this process is the quantity to compare.
        times = interleaved_medians(fns, repeats=config.repeats, clock=time.process_time)
        reads = {}
        for name, probe in probes.items():
            start = time.process_time()
            count = sum(len(probe.records(layer)) for layer in probe.layer_names)
            reads[name] = ((time.process_time() - start) / count, count)
    base_time = times["no probe"] / config.steps_per_sample
    return [
        {
            "setting": name,
            "ms_per_step": 1e3 * t / config.steps_per_sample,
            "slowdown": (t / config.steps_per_sample) / base_time - 1.0,
            **({"records": reads[name][1], "read_ms_per_record": 1e3 * reads[name][0]} if name in reads else {}),
        }
        for name, t in times.items()
    ]


def format_probe_table(rows: list[dict]) -> str:
    lines = [f"{'setting':<12}{'ms/step':>10}{'slowdown':>10}{'read ms/record':>16}"]
    lines += [
        f"{r['setting']:<12}{r['ms_per_step']:>10.3f}{100 * r['slowdown']:>9.1f}%"
        + (f"{r['read_ms_per_record']:>16.3f}" if "read_ms_per_record" in r else f"{'-':>16}")
        for r in rows
    ]
    return "\n".join(lines)
