"""What the Probe measures, split by when it is paid for.

During training (in hooks) only cheap work runs, and nothing waits for the device: a
fixed random sample of at most 4096 values of each watched output, one ``aminmax`` over
the whole output (NaN and ±inf survive it, and unlike a sum it cannot overflow in half
precision), the exact per-unit check for dead units, exact gradient norms, and per-channel
moments for BatchNorm drift. Everything stays a tensor on the device it was computed on.
Sorting, histograms and the conversion to Python numbers happen when records are read
(:func:`summarize_records`), a whole layer's records at once: one sort and one histogram
of a (records × sample) matrix, one transfer to the host per quantity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "DEAD_SLOPE",
    "Record",
    "SaturationBand",
    "SATURATING",
    "DeadRule",
    "SampleIndex",
    "saturation_band",
    "activation_summary",
    "batch_vs_running",
    "capture_activation",
    "capture_batch_moments",
    "accumulation_dtype",
    "capture_gradient",
    "norms",
    "dead_unit_rule",
    "summarize",
    "summarize_records",
]

#: Activation modules a Probe watches by default.
ACTIVATIONS: tuple[type, ...] = (
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
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
)
#: Activations that saturate.
SATURATING: tuple[type, ...] = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid)

#: One layer's record of one step, quantity name → value: tensors as captured (names with a
#: leading ``_`` are pending), plain numbers (a histogram: a list of them) once summarized.
#: The values differ by key, so they are ``Any``.
Record = dict[str, Any]

#: An activation's (output range, lo, hi): an output ≤ lo or ≥ hi is saturated.
SaturationBand = tuple[tuple[float, float], float, float]

_T = TypeVar("_T")


def saturation_band(module: nn.Module | None) -> SaturationBand | None:
    """(the activation's output range, lo, hi): an output ≤ lo or ≥ hi is saturated, where
    the slope is (almost) 0 — tanh |a| ≥ 0.99 (slope ≤ 0.02), sigmoid outside
    [0.01, 0.99], Hardtanh and Hardsigmoid at their bounds (their flat parts; inside them
    the slope is the full 1 or 1/6). None for other layers. Exact types only (ReLU6 is a
    Hardtanh subclass that does not saturate in this sense)."""
    # type(module) at each test rather than once: a type checker narrows ``module`` by it
    if type(module) is nn.Tanh:
        return (-1.0, 1.0), -0.99, 0.99
    if type(module) is nn.Sigmoid:
        return (0.0, 1.0), 0.01, 0.99
    if type(module) is nn.Hardtanh:
        return (module.min_val, module.max_val), module.min_val, module.max_val
    if type(module) is nn.Hardsigmoid:
        return (0.0, 1.0), 0.0, 1.0
    return None


_QUANTILES = (0.15, 0.50, 0.85)


#: A unit is dead when its activation's slope stays below this at every position of the
#: batch: it passes less than a millionth of the gradient back (ReLU's is exactly 0).
DEAD_SLOPE = 1e-6

# Activations whose slope is a smooth function of the input (never exactly 0 on an
# interval, but below DEAD_SLOPE far enough on their flat side: GELU at −10, ELU at −14).
_SMOOTH = (nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus)
# Read from the input as well: Hardswish outputs 0 both where it is flat (input ≤ −3) and
# at the input 0, where its slope is 1/2 — a zero-initialized layer before it is alive.
_BY_INPUT = (*_SMOOTH, nn.Hardswish)


class DeadRule:
    """How to find where an activation passes gradient back: ``score(tensor) > 0`` exactly
    there, computed from its ``output`` (piecewise-linear activations: in-place ones too)
    or from its ``input`` (smooth ones: their slope, by their backward kernel)."""

    def __init__(self, source: str, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.source, self.score = source, score


def dead_unit_rule(module: nn.Module) -> DeadRule | None:
    """The :class:`DeadRule` of an activation module, or None where no unit can be dead
    or it cannot be told.

    A unit is *dead* when its activation's slope is below :data:`DEAD_SLOPE` at every
    position of the batch, so (almost) no gradient reaches the weights before it: ReLU
    where its input is ≤ 0 (output 0); ReLU6 where the output is 0 or 6; Hardswish where
    its input is below −3 (read from the input: its output is 0 at the input 0 too, where
    it passes half the gradient); ELU, CELU, SELU, GELU, SiLU, Mish and Softplus only far out on
    their flat side (GELU at −10, ELU at −14) — with a moderately negative input they
    still pass gradient, so they are not dead there. LeakyReLU, and RReLU, with a slope of
    at least DEAD_SLOPE pass gradient everywhere: none (slope 0 is ReLU). None also for
    PReLU (its slope is learned) and for an in-place smooth activation or Hardswish (its
    input is overwritten). Exact types only: a subclass may change the function.

    Args:
        module: an activation module.

    Returns:
        Its :class:`DeadRule`, or None.
    """
    # type(module) at each test rather than once: a type checker narrows ``module`` by it
    if type(module) is nn.ReLU:
        return DeadRule("output", _positive)
    if type(module) is nn.LeakyReLU:
        return DeadRule("output", _positive) if abs(module.negative_slope) < DEAD_SLOPE else None
    if type(module) is nn.RReLU:
        return DeadRule("output", _positive) if max(abs(module.lower), abs(module.upper)) < DEAD_SLOPE else None
    if type(module) is nn.ReLU6:
        return DeadRule("output", _strictly_inside(module.min_val, module.max_val))
    if type(module) in _BY_INPUT and not getattr(module, "inplace", False):
        return DeadRule("input", _slope_above(module))
    return None


def _positive(y: torch.Tensor) -> torch.Tensor:
    return y


def _strictly_inside(lo: float, hi: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def score(y: torch.Tensor) -> torch.Tensor:
        return (y - lo) * (hi - y)  # > 0 exactly on the open interval (lo, hi)

    return score


# SELU's constants, as torch's kernel has them.
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _slope(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """x ↦ f'(x) of a smooth activation, by the backward kernel autograd itself would run
    (bit-identical to autograd's, one op, nothing of the training graph touched)."""
    aten = torch.ops.aten
    # type(module) at each test rather than once: a type checker narrows ``module`` by it
    if type(module) is nn.GELU:
        return lambda g, x: aten.gelu_backward(g, x, approximate=module.approximate)
    if type(module) is nn.SiLU:
        return aten.silu_backward
    if type(module) is nn.Mish:
        return aten.mish_backward
    if type(module) is nn.ELU:
        return lambda g, x: aten.elu_backward(g, module.alpha, 1.0, 1.0, False, x)
    if type(module) is nn.CELU:
        return lambda g, x: aten.elu_backward(g, module.alpha, 1.0, 1.0 / module.alpha, False, x)
    if type(module) is nn.SELU:
        return lambda g, x: aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1.0, False, x)
    if type(module) is nn.Hardswish:
        return aten.hardswish_backward
    softplus = cast(nn.Softplus, module)  # the one smooth activation left
    return lambda g, x: aten.softplus_backward(g, x, softplus.beta, softplus.threshold)


def _slope_above(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    slope = _slope(module)

    def score(x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)  # no allocation
        return slope(ones, x).abs() - DEAD_SLOPE

    return score


class SampleIndex:
    """A fixed random subset of positions per tensor size, drawn once and reused.

    Random rather than strided: a stride that divides a spatial size would sample the
    same positions of every feature map (borders, say) and bias the statistics. With 4096
    values, percentiles are within about ±1 percentage point and the std within about
    ±1.1% (1/√(2n)) of the whole tensor's; tensors no larger than that are used whole.
    The sample keeps the tensor's dtype and device; it is converted when read.

    Args:
        limit: the most values sampled from a tensor. Default 4096.
        seed: the seed of the draw, so that runs sample the same positions. Default 0.
    """

    def __init__(self, limit: int = 4096, seed: int = 0) -> None:
        self.limit = limit
        self._generator = torch.Generator().manual_seed(seed)
        self._cache: dict[tuple[int, torch.device], torch.Tensor | None] = {}

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        key = (flat.numel(), flat.device)
        if key not in self._cache:
            if flat.numel() <= self.limit:
                self._cache[key] = None
            else:
                chosen = torch.randperm(flat.numel(), generator=self._generator)[: self.limit]
                self._cache[key] = chosen.sort().values.to(flat.device)
        index = self._cache[key]
        return flat.clone() if index is None else flat.index_select(0, index)  # copies


def _unit_max(score: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """Per unit (the entries of ``unit_dim``), the largest score over every other dim."""
    unit_dim %= score.dim()
    if unit_dim == score.dim() - 1:  # (..., features): a column reduction
        return score.reshape(-1, score.shape[-1]).amax(0)
    if unit_dim == 1:  # (N, C, ...): the contiguous spatial dims first, then the batch
        return (score.flatten(2).amax(2) if score.dim() > 2 else score).amax(0)
    return score.movedim(unit_dim, -1).reshape(-1, score.shape[unit_dim]).amax(0)


def capture_activation(
    x: torch.Tensor,
    sampler: SampleIndex,
    dead_rule: DeadRule | None = None,
    unit_dim: int | None = None,
    inputs: object = None,
) -> Record:
    """The cheap, in-training part: a sample, the extremes, the per-unit liveness
    (``inputs``: the activation's input, for a rule that reads it).

    Each torch op costs several microseconds of dispatch on a small tensor, so the count
    of ops here is what the probe's overhead is made of; everything else waits.
    """
    x = x.detach()
    raw: Record = {"numel": x.numel()}
    if x.numel() == 0:
        return raw
    raw["_sample"] = sampler.take(x.reshape(-1))
    # NaN anywhere makes both extremes NaN, ±inf shows in one of them; exact in every
    # dtype (a float16 sum of finite values overflows past 65504, a max cannot).
    raw["_min"], raw["_max"] = torch.aminmax(x)
    if dead_rule is not None and unit_dim is not None and x.dim() >= 2:
        source = x if dead_rule.source == "output" else inputs
        if isinstance(source, torch.Tensor) and source.shape == x.shape and not torch.is_inference_mode_enabled():
            raw["_unit_max"] = _unit_max(dead_rule.score(source.detach()), unit_dim)
    return raw


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype to accumulate and return a float16/bfloat16 reduction in: float32, since
    the norm of finite float16 values can pass 65504 (None: the tensor's own)."""
    return torch.float32 if t.dtype in _LOW_PRECISION else None


def norms(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Euclidean norms, one fused call per kind; float32 for low-precision tensors."""
    wide = [t for t in tensors if t.dtype in _LOW_PRECISION]
    if not wide:
        return list(torch._foreach_norm(tensors))
    if len(wide) == len(tensors):
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return [torch.linalg.vector_norm(t, dtype=accumulation_dtype(t)) for t in tensors]


def capture_gradient(g: torch.Tensor, prefix: str) -> Record:
    """The gradient's exact norm (NaN/inf if any entry is) and sum, for its exact std."""
    g = g.detach()
    return {
        f"_{prefix}_norm": torch.linalg.vector_norm(g, dtype=accumulation_dtype(g)),
        f"_{prefix}_sum": g.sum(dtype=accumulation_dtype(g)),
        f"_{prefix}_numel": g.numel(),
    }


def capture_batch_moments(
    x: torch.Tensor, mask: torch.Tensor | None, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> Record:
    """Per channel, this batch's first two moments about the running mean, over the valid
    positions only when ``mask`` (True = valid, shaped like ``x`` without its channel dim)
    is given — and a copy of the running variance, which the layer is about to update.

    Moments about the running mean (shifted data) are small where there is no drift, so
    E[d²] − E[d]² does not cancel. The channel-major copy makes both reductions
    contiguous row sums.
    """
    channels = x.shape[1]
    rows = x.detach().transpose(0, 1).reshape(channels, -1)  # (C, N·spatial), a copy
    wide = torch.promote_types(x.dtype, torch.float32)  # float32 at least; float64 stays float64
    deviation = rows.to(wide) - running_mean.detach().to(wide).unsqueeze(1)
    if mask is None:
        count: float | torch.Tensor = float(rows.shape[1])
        first, second = deviation.sum(1), torch.linalg.vector_norm(deviation, dim=1).square()
    else:
        weights = mask.detach().reshape(-1).to(deviation.dtype)  # same (n, spatial) order as the columns
        count = weights.sum()
        first, second = deviation @ weights, deviation.square() @ weights
    return {
        "_drift_shift": first / count,
        "_drift_second": second / count,
        "_drift_sigma2": running_var.detach().to(wide) + eps,  # a copy
        "_drift_eps": eps,
    }


def batch_vs_running(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """How far this batch's per-channel statistics are from the running estimates, in
    running standard deviations: mean |μ_B − μ| / σ and mean |σ_B / σ − 1|, over the
    valid positions only when ``mask`` is given.

    Args:
        x: the layer's input, (N, C, \\*).
        running_mean: the layer's running mean, shape (C,).
        running_var: the layer's running variance, shape (C,); σ = √(running_var + eps).
        eps: the layer's eps.
        mask: a bool tensor of valid positions, as the layer takes it, or None. Default None.

    Returns:
        ``{"mean_drift": float, "std_drift": float}``.
    """
    return _drift(capture_batch_moments(x, mask, running_mean, running_var, eps))


def _drift(raw: Record) -> dict[str, float]:
    return _drift_rows([raw])[0]


def _drift_rows(records: list[Record]) -> list[dict[str, float]]:
    """The drift numbers of records holding captured moments (popped), for records of one
    channel count at once."""
    out = []
    by_channels: dict[int, list[Record]] = {}
    for record in records:
        by_channels.setdefault(record["_drift_shift"].numel(), []).append(record)
    results: dict[int, dict[str, float]] = {}
    for group in by_channels.values():
        shift, second, sigma2 = (
            torch.stack([r.pop(key).detach().double().cpu() for r in group])
            for key in ("_drift_shift", "_drift_second", "_drift_sigma2")
        )
        eps = torch.tensor([r.pop("_drift_eps") for r in group]).unsqueeze(1)
        variance = (second - shift.square()).clamp(min=0)  # ≥ 0 by definition; rounding can dip below
        sigma = sigma2.sqrt()
        mean_drift = (shift.abs() / sigma).mean(1).tolist()
        std_drift = (torch.sqrt(variance + eps) / sigma - 1).abs().mean(1).tolist()
        for record, m, d in zip(group, mean_drift, std_drift):
            results[id(record)] = {"mean_drift": m, "std_drift": d}
    for record in records:
        out.append(results[id(record)])
    return out


# --- reading: a layer's pending records at once ------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator for norms: NaN when either is not finite (a NaN weight has
    no meaningful ratio), 0 for 0/0, inf only for a change away from exactly zero."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)):
        return math.nan
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / denominator


def _sample_stats(
    samples: list[torch.Tensor], *, bins: int, hist_range: tuple[float, float], band: SaturationBand | None
) -> list[Record]:
    """Mean, std, percentiles, histogram (and saturation) of each sample's finite values,
    for samples of one length at once, on the host: one transfer, then NumPy (whose sort
    is some 20x faster than torch's on the CPU at these sizes)."""
    # (records, values): float32, or float64 for a float64 model (float32 would round 1e6 + x
    # to steps of 1/16)
    wide = torch.float64 if any(sample.dtype == torch.float64 for sample in samples) else torch.float32
    stacked = torch.stack(samples).detach().to(wide).cpu().numpy()
    finite = np.isfinite(stacked)
    everywhere = bool(finite.all())  # the usual case: no masking passes needed
    count = finite.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a row with no finite value: NaN
        safe = stacked if everywhere else np.where(finite, stacked, 0.0)
        mean = safe.sum(1, dtype=np.float64) / count
        centered = stacked - mean[:, None]
        std = np.sqrt(((centered if everywhere else np.where(finite, centered, 0.0)) ** 2).sum(1) / count)
        # Non-finite values sort to the end; each row's quantiles index its finite prefix.
        ordered = np.sort(stacked if everywhere else np.where(finite, stacked, np.inf), axis=1)
        positions = np.maximum(count[:, None] - 1, 0) * np.array(_QUANTILES)
        lower, upper = np.floor(positions).astype(np.int64), np.ceil(positions).astype(np.int64)
        low, high = np.take_along_axis(ordered, lower, 1), np.take_along_axis(ordered, upper, 1)
        quantiles = low + (high - low) * (positions - lower)  # linear interpolation, torch.quantile's rule
        lo, hi = hist_range
        # histc's bins: width (hi − lo)/bins, values clamped into [lo, hi], hi in the last bin.
        which = np.clip(np.floor((np.clip(safe, lo, hi) - lo) * (bins / (hi - lo))), 0, bins - 1).astype(np.int64)
        if not everywhere:
            which[~finite] = bins  # one more bin per row for the non-finite values, dropped below
        rows = np.arange(stacked.shape[0])[:, None] * (bins + 1)
        counts = np.bincount((which + rows).ravel(), minlength=stacked.shape[0] * (bins + 1))
        hist = counts.reshape(-1, bins + 1)[:, :bins] / count[:, None]
        columns = {"mean": mean, "std": std, "p15": quantiles[:, 0], "p50": quantiles[:, 1], "p85": quantiles[:, 2]}
        if band is not None:
            _, low_end, high_end = band
            columns["saturated"] = (finite & ((stacked <= low_end) | (stacked >= high_end))).sum(1) / count
    lists = {key: values.tolist() for key, values in columns.items()}
    hist_rows = hist.tolist()
    out = []
    for i, n in enumerate(count.tolist()):
        if n == 0:
            out.append({key: math.nan for key in ("mean", "std", "p15", "p50", "p85")})
            continue
        row = {key: values[i] for key, values in lists.items()}
        row["hist"] = hist_rows[i]
        out.append(row)
    return out


def _grouped(records: list[Record], key: str, compute: Callable[[torch.Tensor], Iterable[_T]]) -> dict[int, _T]:
    """``compute`` applied to the tensors under ``key``, stacked by shape (one call per
    shape, not per record): record index → that record's result."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, record in enumerate(records):
        if isinstance(record.get(key), torch.Tensor):
            by_shape.setdefault(tuple(record[key].shape), []).append(i)
    out: dict[int, _T] = {}
    for indices in by_shape.values():
        results = compute(torch.stack([records[i][key].detach() for i in indices]))
        out.update(zip(indices, results))
    return out


def _dead_fractions(unit_max: torch.Tensor) -> list[float]:
    return (~(unit_max > 0)).float().mean(1).tolist()  # a NaN unit counts as alive


def _to_host(records: list[Record], keys: tuple[str, ...]) -> list[dict[str, float]]:
    """The scalar tensors under ``keys`` of every record, as floats, in one transfer."""
    found = [(i, key) for i, record in enumerate(records) for key in keys if isinstance(record.get(key), torch.Tensor)]
    values = torch.stack([records[i][key].detach().double().cpu() for i, key in found]).tolist() if found else []
    out: list[dict[str, float]] = [{} for _ in records]
    for (i, key), value in zip(found, values):
        out[i][key] = value
    return out


_SCALARS = (
    "_min",
    "_max",
    "_grad_norm",
    "_grad_sum",
    "_weight_grad_norm",
    "_weight_grad_sum",
    "weight_norm",
    "_update_change",
    "_update_norm",
    "_learning_change",
)


def summarize_records(
    records: list[Record], *, bins: int, hist_range: tuple[float, float], band: SaturationBand | None = None
) -> None:
    """Turn the captured tensors of ``records`` (one layer's) into numbers, in place;
    records with nothing pending are left alone, so reading twice costs nothing.
    ``band``: the layer's :func:`saturation_band`, for the saturated fraction."""
    pending = [r for r in records if any(k.startswith("_") or isinstance(v, torch.Tensor) for k, v in r.items())]
    if not pending:
        return
    scalars = _to_host(pending, _SCALARS)
    by_length: dict[int, list[int]] = {}
    for i, record in enumerate(pending):
        if "_sample" in record:
            by_length.setdefault(record["_sample"].numel(), []).append(i)
    for indices in by_length.values():
        stats = _sample_stats([pending[i]["_sample"] for i in indices], bins=bins, hist_range=hist_range, band=band)
        for i, row in zip(indices, stats):
            sample = pending[i].pop("_sample")
            pending[i].update(row)
            extremes = (scalars[i].get("_min", math.nan), scalars[i].get("_max", math.nan))
            finite = all(math.isfinite(v) for v in extremes)
            pending[i]["nonfinite"] = 0 if finite else max(1, int((~torch.isfinite(sample)).sum()))
    dead = _grouped(pending, "_unit_max", _dead_fractions)
    drift = _grouped(pending, "_drift_shift", lambda shift: [None] * shift.shape[0])  # which records
    drifts = _drift_rows([pending[i] for i in drift])
    for i, record in enumerate(pending):
        host = scalars[i]
        record.pop("_min", None), record.pop("_max", None)
        if i in dead:
            record.pop("_unit_max")
            record["dead"] = dead[i]
        for prefix in ("grad", "weight_grad"):
            if f"_{prefix}_norm" in record:
                record.pop(f"_{prefix}_norm"), record.pop(f"_{prefix}_sum")
                count = record.pop(f"_{prefix}_numel")
                norm, total = host[f"_{prefix}_norm"], host[f"_{prefix}_sum"]
                finite = math.isfinite(norm)
                record[f"{prefix}_norm"] = norm if finite else math.nan
                # E[g²] − E[g]², clamped: gradients have a mean near 0 beside their spread.
                variance = max(norm * norm / count - (total / count) ** 2, 0.0) if count else 0.0
                record[f"{prefix}_std"] = math.sqrt(variance) if finite else math.nan
                record[f"{prefix}_nonfinite"] = 0 if finite else 1
        if "weight_norm" in host:
            record["weight_norm"] = host["weight_norm"]
        if "weight_grad_norm" in record and "weight_norm" in record:
            record["relative_grad"] = _ratio(record["weight_grad_norm"], record["weight_norm"])
        if "_update_change" in record:
            record.pop("_update_change"), record.pop("_update_norm")
            record["update_ratio"] = _ratio(host["_update_change"], host["_update_norm"])
        if "_learning_change" in record:
            record.pop("_learning_change")
            record["learning_ratio"] = _ratio(host["_learning_change"], host["_update_norm"])
    for record, numbers in zip([pending[i] for i in drift], drifts):
        record.update(numbers)
    for record in pending:
        for key in [k for k, v in record.items() if isinstance(v, torch.Tensor)]:
            record[key] = record[key].item()


def summarize(
    record: dict[str, Any],
    *,
    bins: int,
    hist_range: tuple[float, float],
    band: tuple[tuple[float, float], float, float] | None = None,
) -> dict[str, Any]:
    """One record's captured tensors as numbers, in place (see :func:`summarize_records`).

    Args:
        record: a record as captured (tensors pending).
        bins: keyword-only; the number of histogram bins.
        hist_range: keyword-only; the histogram's (low, high).
        band: keyword-only; the layer's :func:`saturation_band`, or None. Default None.

    Returns:
        ``record``, its tensors replaced by numbers.
    """
    summarize_records([record], bins=bins, hist_range=hist_range, band=band)
    return record


def activation_summary(
    x: torch.Tensor,
    *,
    bins: int = 41,
    hist_range: tuple[float, float] = (-3.0, 3.0),
    module: nn.Module | None = None,
    unit_dim: int = 1,
    limit: int = 4096,
) -> dict[str, Any]:
    """Everything at once, for one tensor (capture + summarize); ``module`` is the
    activation that produced it (for the dead fraction and saturation).

    Args:
        x: the tensor.
        bins: keyword-only; the number of histogram bins. Default 41.
        hist_range: keyword-only; the histogram's (low, high). Default (-3.0, 3.0).
        module: keyword-only; the activation that produced ``x``, or None. Default None.
        unit_dim: keyword-only; the dim of ``x`` that holds the units. Default 1.
        limit: keyword-only; the most values sampled (:class:`SampleIndex`). Default 4096.

    Returns:
        The numbers, by name: ``mean``, ``std``, ``p15``, ``p50``, ``p85``, ``hist``,
        ``numel``, ``nonfinite`` and, where ``module`` has a dead rule, ``dead``.
    """
    band = saturation_band(module)
    rule = dead_unit_rule(module) if module is not None else None
    if rule is not None and rule.source == "input":
        rule = None  # only the output is given here
    raw = capture_activation(x, SampleIndex(limit), rule, unit_dim)
    return summarize(raw, bins=bins, hist_range=hist_range, band=band)
