"""Training memory of BatchNorm + LeakyReLU: torch.nn's two modules, normlab's fused layer,
and the in-place (output-only) mode, in a small ResNet-style network.

Each variant runs in a fresh process, so its peak resident set size (ru_maxrss) is its own —
on CUDA, the peak of the caching allocator's allocated bytes; the bytes kept for backward are
counted with ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages, activations only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["MemoryBenchConfig", "format_memory_table", "run_memory_benchmark"]

VARIANTS = (
    "torch.nn BatchNorm2d + LeakyReLU(inplace)",
    "normlab BatchNormAct2d",
    "normlab BatchNormAct2d inplace=True",
)


@dataclass(frozen=True)
class MemoryBenchConfig:
    batch: int = 64
    image: int = 64
    width: int = 32
    blocks: int = 4
    threads: int = 2
    device: str = "cpu"


_CHILD = r"""
import json, resource, sys
import torch
from torch import nn
import normlab as nl

variant, batch, image, width, blocks, threads = sys.argv[1], *map(int, sys.argv[2:7])
device = torch.device(sys.argv[7])
torch.set_num_threads(threads)
torch.manual_seed(0)

def norm_act(c):
    if variant.startswith("torch"):
        return nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True))
    return nl.nn.BatchNormAct2d(c, activation="leaky_relu", inplace=variant.endswith("inplace=True"))

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm_act(c)
        self.conv2, self.act2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm_act(c)
    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x)))) + x

model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), norm_act(width),
                      *[Block(width) for _ in range(blocks)], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
model = model.to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(batch, 3, image, image).to(device)
y = torch.randint(0, 10, (batch,)).to(device)
loss_fn = nn.CrossEntropyLoss()
storages = {}
def pack(t):
    s = t.untyped_storage()
    storages[s.data_ptr()] = s.nbytes()
    return t
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for step in range(3):
    opt.zero_grad(set_to_none=True)
    if step == 2:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model(x), y)
    else:
        loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
saved = sum(v for v in storages.values() if v > 64 * 1024)
if device.type == "cuda":
    peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "CUDA allocated"
else:
    peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "RSS"
print(json.dumps({"variant": variant, "peak_mb": peak, "peak_kind": kind, "rss_before_mb": before / 1024,
                  "saved_for_backward_mb": saved / 2**20, "loss": float(loss)}))
"""


def run_memory_benchmark(config: MemoryBenchConfig = MemoryBenchConfig()) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                variant,
                str(config.batch),
                str(config.image),
                str(config.width),
                str(config.blocks),
                str(config.threads),
                config.device,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        r["peak_vs_torch"] = r["peak_mb"] / base["peak_mb"]
        r["saved_vs_torch"] = r["saved_for_backward_mb"] / base["saved_for_backward_mb"]
    return rows


def format_memory_table(rows: list[dict]) -> str:
    kind = rows[0]["peak_kind"] if rows else "RSS"
    lines = [f"{'variant':<44}{'peak ' + kind + ' MB':>22}{'vs torch':>9}{'saved MB':>10}{'vs torch':>9}"]
    for r in rows:
        lines.append(
            f"{r['variant']:<44}{r['peak_mb']:>22.0f}{r['peak_vs_torch']:>8.2f}x"
            f"{r['saved_for_backward_mb']:>10.0f}{r['saved_vs_torch']:>8.2f}x"
        )
    return "\n".join(lines)
