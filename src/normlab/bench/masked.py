"""Masked norms against the same layer unmasked, in one run.

torch.nn has no masked norm, so the yardstick is normlab's own unmasked call on the same
shape: for every row, the median forward and forward+backward time of the masked layer on
the default path (the kernels for float32 CPU) and on the composed ops (what every masked
call ran before the masked kernels), each divided by the unmasked layer's, measured
round-robin (one thread: CPU time). The mask is a padded batch's: sample i valid over its first ``lengths[i]``
positions, lengths spread evenly over [½, 1] of the extent. Accuracy: the largest
difference of each masked path's output and input gradient from a float64 run of the
composed ops, relative to the largest value.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import nn as nln
from ..core import paths
from .common import max_rel_diff, text_table
from .timing import interleaved_medians

__all__ = ["MaskedCase", "format_masked_table", "masked_cases", "run_masked_benchmark"]


@dataclass(frozen=True)
class MaskedCase:
    layer: str
    shape: tuple[int, ...]
    layout: str  # "NCL", "NCHW" or "channels_last"
    make: Callable[[int], nn.Module]


def masked_cases(quick: bool = False) -> list[MaskedCase]:
    """The benchmark rows (one per family with ``quick``)."""
    seq = (32, 64, 256)
    img = (8, 64, 28, 28)
    rows = [
        MaskedCase("BatchNorm1d", seq, "NCL", nln.BatchNorm1d),
        MaskedCase("GroupNorm(8)", seq, "NCL", lambda c: nln.GroupNorm(8, c)),
        MaskedCase("InstanceNorm1d", seq, "NCL", lambda c: nln.InstanceNorm1d(c, affine=True)),
    ]
    if not quick:
        rows += [
            MaskedCase("BatchNormAct1d relu", seq, "NCL", lambda c: nln.BatchNormAct1d(c, activation="relu")),
            MaskedCase("BatchNorm2d", img, "NCHW", nln.BatchNorm2d),
            MaskedCase("BatchNorm2d", img, "channels_last", nln.BatchNorm2d),
            MaskedCase("GroupNorm(8)", img, "channels_last", lambda c: nln.GroupNorm(8, c)),
        ]
    return rows


def padded_mask(shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *spatial) bool: sample i valid over its first lengths[i] positions (flattened)."""
    n, positions = shape[0], 1
    for s in shape[2:]:
        positions *= s
    lengths = torch.linspace(positions / 2, positions, n).round().long()
    return (torch.arange(positions) < lengths[:, None]).view((n,) + tuple(shape[2:]))


def run_masked_case(case: MaskedCase, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    layer = case.make(case.shape[1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.75)
    x = torch.randn(case.shape, generator=g) * 1.5 + 0.5
    dy = torch.randn(case.shape, generator=g)
    if case.layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    mask = padded_mask(case.shape)
    leaf = x.clone().requires_grad_(True)

    def forward(masked: bool, backend: str = "auto"):
        with paths.use_backend(backend):
            return layer(leaf, mask=mask) if masked else layer(leaf)

    def forward_backward(masked: bool, backend: str = "auto"):
        leaf.grad = None
        with paths.use_backend(backend):
            (layer(leaf, mask=mask) if masked else layer(leaf)).backward(dy)

    fns = {
        "plain_fwd": lambda: forward(False),
        "masked_fwd": lambda: forward(True),
        "composed_fwd": lambda: forward(True, "composed"),
        "plain_fb": lambda: forward_backward(False),
        "masked_fb": lambda: forward_backward(True),
        "composed_fb": lambda: forward_backward(True, "composed"),
    }
    with paths.record_dispatch() as log:
        forward(True)
    # one thread: this process's CPU time, which ignores what other tenants of the machine take
    clock = time.process_time if threads == 1 else time.perf_counter
    times = interleaved_medians(fns, repeats=repeats, shuffle=True, clock=clock)

    def outputs(module, source, backend):
        inp = source.detach().clone().requires_grad_(True)
        with paths.use_backend(backend):
            out = module(inp, mask=mask)
        out.backward(dy.to(source.dtype))
        return [out.detach(), inp.grad]

    fresh = copy.deepcopy(layer)
    reference = outputs(copy.deepcopy(fresh).double(), x.double(), "composed")
    kernels = outputs(copy.deepcopy(fresh), x, "auto")
    composed = outputs(copy.deepcopy(fresh), x, "composed")
    return {
        "layer": case.layer,
        "shape": "x".join(map(str, case.shape)),
        "layout": case.layout,
        "threads": threads,
        "path": log[0][1] if log else "",
        "plain_fwd_ms": 1e3 * times["plain_fwd"],
        "plain_fb_ms": 1e3 * times["plain_fb"],
        "fwd_masked_plain": times["masked_fwd"] / times["plain_fwd"],
        "fwd_composed_plain": times["composed_fwd"] / times["plain_fwd"],
        "fb_masked_plain": times["masked_fb"] / times["plain_fb"],
        "fb_composed_plain": times["composed_fb"] / times["plain_fb"],
        "err_masked": max(max_rel_diff(a, b) for a, b in zip(kernels, reference)),
        "err_composed": max(max_rel_diff(a, b) for a, b in zip(composed, reference)),
    }


def run_masked_benchmark(
    *, quick: bool = False, threads=(1, 2), repeats: int | None = None, progress=None
) -> list[dict]:
    previous = torch.get_num_threads()
    rows = []
    try:
        for n in threads:
            for case in masked_cases(quick):
                row = run_masked_case(case, n, repeats or (7 if quick else 15))
                rows.append(row)
                if progress:
                    progress(row)
    finally:
        torch.set_num_threads(previous)
    return rows


def format_masked_table(rows: list[dict]) -> str:
    header = (
        f"{'layer':<22}{'shape':<13}{'layout':<14}{'thr':>3} {'path':<9}| {'unmasked ms fwd/f+b':>20} | "
        f"{'masked ÷ unmasked fwd':>21} {'f+b':>5} | {'composed ÷ unmasked fwd':>23} {'f+b':>5} | "
        f"{'err vs f64 masked/composed':>26}"
    )
    return text_table(
        header,
        (
            f"{r['layer']:<22}{r['shape']:<13}{r['layout']:<14}{r['threads']:>3} {r['path']:<9}| "
            f"{r['plain_fwd_ms']:>9.3f} / {r['plain_fb_ms']:>8.3f} | {r['fwd_masked_plain']:>21.2f} "
            f"{r['fb_masked_plain']:>5.2f} | {r['fwd_composed_plain']:>23.2f} {r['fb_composed_plain']:>5.2f} | "
            f"{r['err_masked']:>13.1e} / {r['err_composed']:.1e}"
            for r in rows
        ),
    )
