"""How much faster eval inference gets when BatchNorm is folded into the convolutions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..experiments.models import ResNet18
from ..surgery import fold_batchnorm
from .common import threads_kept
from .timing import interleaved_medians

__all__ = ["FoldBenchConfig", "format_fold_table", "run_fold_benchmark"]


@dataclass(frozen=True)
class FoldBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 32)
    widths: tuple[int, ...] = (64, 16)
    image_size: int = 32
    repeats: int = 21
    threads: int = 2
    seed: int = 0


def _trained_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model.eval()


def run_fold_benchmark(config: FoldBenchConfig = FoldBenchConfig()) -> list[dict]:
    """Median eval-inference time of a torch.nn ResNet-18-style CNN, unfolded vs folded."""
    rows = []
    with threads_kept(config.threads):
        for width in config.widths:
            torch.manual_seed(config.seed)
            model = _trained_like(ResNet18(width=width), config.seed)
            example = torch.randn(2, 3, config.image_size, config.image_size)
            folded, report = fold_batchnorm(model, example)
            for batch in config.batch_sizes:
                x = torch.randn(batch, 3, config.image_size, config.image_size)
                with torch.no_grad():
                    diff = (model(x) - folded(x)).abs().max().item()
                    times = interleaved_medians(
                        {"unfolded": lambda m=model, x=x: m(x), "folded": lambda f=folded, x=x: f(x)},
                        repeats=config.repeats,
                    )
                rows.append(
                    {
                        "model": f"ResNet-18 style, width {width}, {config.image_size}x{config.image_size}",
                        "batch": batch,
                        "threads": config.threads,
                        "unfolded_ms": 1e3 * times["unfolded"],
                        "folded_ms": 1e3 * times["folded"],
                        "speedup": times["unfolded"] / times["folded"],
                        "max_abs_diff": diff,
                        "folded_pairs": len(report.changes),
                        "skipped": len(report.skipped),
                    }
                )
    return rows


def format_fold_table(rows: list[dict]) -> str:
    lines = [
        f"{'model':<44}{'batch':>6}{'unfolded ms':>13}{'folded ms':>11}{'speedup':>9}{'max |diff|':>12}{'folded':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<44}{r['batch']:>6}{r['unfolded_ms']:>13.2f}{r['folded_ms']:>11.2f}"
            f"{r['speedup']:>8.2f}x{r['max_abs_diff']:>12.2e}{r['folded_pairs']:>8}"
        )
    return "\n".join(lines)
