"""What the Probe measures, split by when it is paid for.

During training (in hooks) only cheap work runs: a fixed random sample of at most 4096
values of each watched output, the exact per-unit "ever positive" check for ReLU-family
layers, a one-pass sum that detects NaN/inf anywhere, and exact gradient norms. Sorting,
histograms and everything else derived from the sample is computed when the records are
read (:func:`summarize`). On a 3.5 ms training step of a small CNN a full-tensor
``std_mean`` costs 0.23 ms per layer and a sort of 8192 values 0.5 ms, which is why.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "RELU_FAMILY",
    "SATURATING",
    "SampleIndex",
    "activation_summary",
    "batch_vs_running",
    "capture_activation",
    "capture_gradient",
    "summarize",
]

#: Activations whose "dead" units are those that are never positive on the batch.
RELU_FAMILY = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
)
#: Activations that saturate, with the band counted as saturated.
SATURATING = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Hardtanh: "tanh", nn.Hardsigmoid: "sigmoid"}

_QUANTILES = (0.15, 0.50, 0.85)


class SampleIndex:
    """A fixed random subset of positions per tensor size, drawn once and reused.

    Random rather than strided: a stride that divides a spatial size would sample the
    same positions of every feature map (borders, say) and bias the statistics. With 4096
    values, percentiles are within about ±1 percentage point and the std within about
    ±1.1% (1/√(2n)) of the whole tensor's; tensors no larger than that are used whole.
    """

    def __init__(self, limit: int = 4096, seed: int = 0) -> None:
        self.limit = limit
        self._generator = torch.Generator().manual_seed(seed)
        self._cache: dict[tuple[int, str], torch.Tensor | None] = {}

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        key = (flat.numel(), str(flat.device))
        if key not in self._cache:
            if flat.numel() <= self.limit:
                self._cache[key] = None
            else:
                chosen = torch.randperm(flat.numel(), generator=self._generator)[: self.limit]
                self._cache[key] = chosen.sort().values.to(flat.device)
        index = self._cache[key]
        values = flat.clone() if index is None else flat.index_select(0, index)  # copies
        return values if values.dtype == torch.float32 else values.float()


@torch.no_grad()  # no autograd bookkeeping for the probe's own ops
def capture_activation(x: torch.Tensor, sampler: SampleIndex, module: nn.Module | None) -> dict:
    """The cheap, in-training part: a sample, a finiteness check, the dead fraction.

    Each torch op costs several microseconds of dispatch on a small tensor, so the count
    of ops here is what the probe's overhead is made of; everything else waits.
    """
    raw = {
        "numel": x.numel(),
        "_sample": sampler.take(x.reshape(-1)),
        # One reduction over everything: NaN/inf anywhere makes the sum non-finite.
        "_sum": x.sum(),
    }
    if module is not None and isinstance(module, RELU_FAMILY) and x.dim() >= 2:
        # A unit is a feature of dim 1 (a channel of a conv output): dead if it is never
        # positive for any sample or position of the batch. Needs every value, not a sample.
        reduce = (0,) + tuple(range(2, x.dim()))
        raw["_unit_max"] = x.amax(dim=reduce)
    return raw


@torch.no_grad()
def capture_gradient(g: torch.Tensor, sampler: SampleIndex, prefix: str) -> dict:
    """The exact gradient norm (NaN/inf if any entry is) and a sample for its std."""
    return {f"_{prefix}_norm": torch.linalg.vector_norm(g), f"_{prefix}_sample": sampler.take(g.reshape(-1))}


def _quantiles(sorted_values: torch.Tensor) -> list[float]:
    """Linear-interpolation quantiles of a sorted 1-D tensor (torch.quantile's rule)."""
    n = sorted_values.numel()
    positions = torch.tensor(_QUANTILES, dtype=torch.float64) * (n - 1)
    lower, upper = positions.floor().long(), positions.ceil().long()
    weight = (positions - lower).to(sorted_values.dtype)
    low, high = sorted_values[lower], sorted_values[upper]
    return (low + (high - low) * weight).tolist()


def _sample_stats(sample: torch.Tensor, *, bins: int, hist_range: tuple[float, float], kind: str | None) -> dict:
    finite = sample[torch.isfinite(sample)]
    out = {"mean": math.nan, "std": math.nan, "p15": math.nan, "p50": math.nan, "p85": math.nan}
    if finite.numel():
        std, mean = torch.std_mean(finite, correction=0)
        p15, p50, p85 = _quantiles(finite.sort().values)
        lo, hi = hist_range
        hist = torch.histc(finite.clamp(lo, hi), bins=bins, min=lo, max=hi) / finite.numel()
        out.update(mean=mean.item(), std=std.item(), p15=p15, p50=p50, p85=p85, hist=hist.tolist())
        if kind == "tanh":
            out["saturated"] = (finite.abs() > 0.99).float().mean().item()
        elif kind == "sigmoid":
            out["saturated"] = ((finite < 0.01) | (finite > 0.99)).float().mean().item()
    return out


def summarize(record: dict, *, bins: int, hist_range: tuple[float, float], kind: str | None) -> dict:
    """Turn a record's captured tensors into numbers, in place; idempotent."""
    if "_sample" in record:
        sample = record.pop("_sample")
        record.update(_sample_stats(sample, bins=bins, hist_range=hist_range, kind=kind))
        finite = bool(torch.isfinite(record.pop("_sum")))
        record["nonfinite"] = 0 if finite else max(1, int((~torch.isfinite(sample)).sum().item()))
    if "_unit_max" in record:
        record["dead"] = (record.pop("_unit_max") <= 0).float().mean().item()
    for prefix in ("grad", "weight_grad"):
        if f"_{prefix}_norm" in record:
            norm = record.pop(f"_{prefix}_norm").item()
            sample = record.pop(f"_{prefix}_sample")
            finite = math.isfinite(norm)
            record[f"{prefix}_norm"] = norm if finite else math.nan
            record[f"{prefix}_std"] = (
                sample.std(correction=0).item() if finite and sample.numel() > 1 else (0.0 if finite else math.nan)
            )
            record[f"{prefix}_nonfinite"] = 0 if finite else 1
    if "_update_change" in record:
        change, norm = record.pop("_update_change").item(), record.pop("_update_norm").item()
        record["update_ratio"] = change / norm if norm > 0 else math.inf
    for key in [k for k, v in record.items() if isinstance(v, torch.Tensor)]:
        record[key] = record[key].item()
    return record


def activation_summary(
    x: torch.Tensor,
    *,
    bins: int = 41,
    hist_range: tuple[float, float] = (-3.0, 3.0),
    module: nn.Module | None = None,
    limit: int = 4096,
) -> dict:
    """Everything at once, for one tensor (capture + summarize)."""
    kind = SATURATING.get(type(module)) if module is not None else None
    raw = capture_activation(x, SampleIndex(limit), module)
    return summarize(raw, bins=bins, hist_range=hist_range, kind=kind)


def batch_vs_running(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> dict:
    """How far this batch's per-channel statistics are from the running estimates, in
    running standard deviations: mean |μ_B − μ| / σ and mean |σ_B / σ − 1|.

    The batch moments are taken about the running mean (shifted data): the deviations
    are small where there is no drift, so E[d²] − E[d]² does not cancel.
    """
    x = x.detach()
    dims = (0,) + tuple(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    mu = running_mean.float()
    shift = x.float().mean(dims) - mu
    second = torch.linalg.vector_norm(x.float() - mu.view((1, -1) + (1,) * (x.dim() - 2)), dim=dims).square() / n
    var = (second - shift.square()).clamp(min=0)
    sigma = torch.sqrt(running_var.float() + eps)
    return {
        "mean_drift": (shift.abs() / sigma).mean().item(),
        "std_drift": (torch.sqrt(var + eps) / sigma - 1).abs().mean().item(),
    }
