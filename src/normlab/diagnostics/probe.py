"""Probe: a recorder of per-layer activation, gradient and weight statistics during training."""

from __future__ import annotations

import csv
import fnmatch
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .. import nn as nln
from .summaries import (
    RELU_FAMILY,
    SATURATING,
    SampleIndex,
    batch_vs_running,
    capture_activation,
    capture_gradient,
    summarize,
)

__all__ = ["DEFAULT_LAYER_TYPES", "Probe", "select_layers"]

#: What a Probe watches when not told otherwise: layers that transform activations.
DEFAULT_LAYER_TYPES: tuple[type, ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    *RELU_FAMILY,
    *SATURATING,
)

LayerSpec = Iterable[type] | Iterable[str] | Callable[[str, nn.Module], bool] | None


def select_layers(model: nn.Module, layers: LayerSpec = None) -> dict[str, nn.Module]:
    """Modules of ``model`` to watch, by type (a class or tuple of classes), by name
    (exact names or fnmatch patterns such as ``"layers.*.conv1"``), or by a predicate
    ``f(name, module)``. The default is every Linear/Conv, activation and norm layer."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if layers is None:
        chosen = [(n, m) for n, m in named if isinstance(m, DEFAULT_LAYER_TYPES) or nln.is_norm_layer(m)]
    elif callable(layers) and not isinstance(layers, type):
        chosen = [(n, m) for n, m in named if layers(n, m)]
    else:
        items = (layers,) if isinstance(layers, (type, str)) else tuple(layers)
        if all(isinstance(i, type) for i in items):
            chosen = [(n, m) for n, m in named if isinstance(m, items)]
        elif all(isinstance(i, str) for i in items):
            chosen = [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in items)]
        else:
            raise TypeError("layers must be types, names/patterns, or a predicate f(name, module)")
    if not chosen:
        raise ValueError(f"no layer of {type(model).__name__} matches layers={layers!r}")
    return dict(chosen)


def _nice_bound(value: float) -> float:
    """The smallest of 1, 2, 5 × 10^k that is ≥ value (histogram ranges people can read)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        if step * 10**exponent >= value:
            return step * 10**exponent
    return 10.0 ** (exponent + 1)


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value):
    """A text cell a spreadsheet would run as a formula (a layer named ``=cmd|...``) is
    prefixed with ``'`` so it is shown as text (OWASP's advice on CSV injection); numbers
    are written as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


class _Series:
    """A layer's records under a fixed budget: when full, every other record is dropped
    (the latest is kept), so old history thins out instead of memory growing."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.records: list[dict] = []
        self.decimations = 0

    def add(self, record: dict) -> None:
        self.records.append(record)
        if len(self.records) > self.budget:
            self.records = self.records[:-1][::2] + [self.records[-1]]
            self.decimations += 1


class Probe:
    """Records what happens inside ``model`` while it trains, layer by layer.

    Per watched layer and sampled step: the output's mean, std, 15/50/85th percentiles
    and a fixed-bin histogram; the dead fraction (ReLU family: units never positive on
    the batch) or saturated fraction (tanh |a| > 0.99, sigmoid outside [0.01, 0.99]); the
    norm and std of the gradient reaching the output and of the weight's gradient; the
    weight's update-to-weight ratio per optimizer step (pass ``optimizer``); and, for
    BatchNorm-type layers in training, how far the batch statistics are from the running
    ones. A *step* is one training-mode forward of ``model``; every ``every``-th step is
    recorded (the first always is).

    Use as a context manager (``with Probe(model) as probe: ...``) or with
    :meth:`attach` / :meth:`detach`. Memory is bounded: each layer keeps at most
    ``budget`` records, thinning older ones by half when full.

    Args:
        layers: which layers — types, names or fnmatch patterns, or ``f(name, module)``.
        bins: histogram bins. ``hist_range``: (lo, hi) for every layer; by default each
            layer's range is fixed at its first record ([−1, 1] for tanh, [0, 1] for
            sigmoid, else ± the next 1-2-5 bound above its largest |value|) so its
            histograms stay comparable across steps.
        gradients, weights: record output gradients / weight gradients.
        record_eval: also record eval-mode forwards (counted as steps).
        sample_size: values per output kept for percentiles, histogram, mean and std (a
            fixed random subset; outputs no larger are used whole). The dead fraction,
            gradient norms and the non-finite check always see every value.

    Cost is kept out of the training step: hooks only capture (a sample, a few exact
    reductions); sorting and histogramming happen when records are read.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        every: int = 1,
        *,
        bins: int = 41,
        hist_range: tuple[float, float] | None = None,
        budget: int = 256,
        gradients: bool = True,
        weights: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        record_eval: bool = False,
        sample_size: int = 4096,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Probe needs an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if budget < 2:
            raise ValueError(f"budget must be >= 2 records per layer, got {budget}")
        if hist_range is not None and not hist_range[0] < hist_range[1]:
            raise ValueError(f"hist_range must be (lo, hi) with lo < hi, got {hist_range}")
        self.model = model
        self.layers = select_layers(model, layers)
        self.every, self.bins, self.hist_range = every, bins, hist_range
        self.gradients, self.weights, self.optimizer = gradients, weights, optimizer
        self.record_eval = record_eval
        self.step = 0
        self.order: list[str] = []
        self._series = {name: _Series(budget) for name in self.layers}
        self._ranges: dict[str, tuple[float, float]] = {}
        self._current: dict[str, dict] = {}
        self._drift: dict[str, dict] = {}
        self._snapshot: dict[str, torch.Tensor] = {}
        self._sampling = False
        self._handles: list = []  # per-layer hooks of the step being recorded
        self._root_handle = None
        self._sampler = SampleIndex(sample_size)

    # --- attaching -------------------------------------------------------------------------

    def attach(self) -> Probe:
        """Start recording. Only a forward pre-hook on ``model`` stays registered between
        recorded steps; the per-layer hooks are attached for a recorded step and removed
        at the next forward, so unrecorded steps run at (almost) full speed."""
        if self._root_handle is None:
            self._root_handle = self.model.register_forward_pre_hook(self._on_step)
        return self

    def detach(self) -> Probe:
        """Stop recording and remove every hook."""
        self._remove_step_hooks()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        self._sampling = False
        return self

    def _remove_step_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _add_step_hooks(self) -> None:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
            if getattr(module, "running_mean", None) is not None:
                self._handles.append(module.register_forward_pre_hook(self._drift_hook(name)))
            weight = getattr(module, "weight", None)
            # With an optimizer the weight statistics are taken in its pre-step hook, for
            # all layers in a few fused (_foreach) ops; without, per weight after backward.
            if self.weights and self.optimizer is None and isinstance(weight, nn.Parameter) and weight.requires_grad:
                self._handles.append(weight.register_post_accumulate_grad_hook(self._weight_hook(name)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_update))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_update))

    def __enter__(self) -> Probe:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return self._root_handle is not None

    # --- hooks -----------------------------------------------------------------------------

    def _on_step(self, module, args) -> None:
        # A new forward of the model: the previous step's backward and update are done.
        self._remove_step_hooks()
        if module.training or self.record_eval:
            self.step += 1
            self._sampling = (self.step - 1) % self.every == 0
            self._current = {}
            if self._sampling:
                self._add_step_hooks()
        else:
            self._sampling = False

    def _range_for(self, name: str, module: nn.Module, out: torch.Tensor) -> tuple[float, float]:
        if self.hist_range is not None:
            return self.hist_range
        if name not in self._ranges:
            kind = SATURATING.get(type(module))
            if kind == "tanh":
                self._ranges[name] = (-1.0, 1.0)
            elif kind == "sigmoid":
                self._ranges[name] = (0.0, 1.0)
            else:
                finite = out.detach()[torch.isfinite(out.detach())]
                bound = _nice_bound(finite.abs().max().item() if finite.numel() else 1.0)
                self._ranges[name] = (-bound, bound)
        return self._ranges[name]

    def _forward_hook(self, name: str):
        def hook(module, args, out):
            if not self._sampling or not isinstance(out, torch.Tensor) or name in self._current:
                return  # not a sampled step, or a second call of the layer in this step
            if name not in self.order:
                self.order.append(name)
            self._range_for(name, module, out)
            record = {"step": self.step, **capture_activation(out, self._sampler, module)}
            record.update(self._drift.pop(name, {}))
            self._series[name].add(record)
            self._current[name] = record
            if self.gradients and out.requires_grad:
                out.register_hook(lambda g: record.update(capture_gradient(g, self._sampler, "grad")))

        return hook

    def _drift_hook(self, name: str):
        def hook(module, args):
            if not (self._sampling and module.training and args and isinstance(args[0], torch.Tensor)):
                return
            if getattr(module, "frozen", False) or module.running_var is None or args[0].dim() < 2:
                return
            self._drift[name] = batch_vs_running(
                args[0], module.running_mean, module.running_var, getattr(module, "eps", 1e-5)
            )

        return hook

    def _weight_hook(self, name: str):
        def hook(param):
            record = self._current.get(name)
            if record is None or param.grad is None:
                return
            record.update(capture_gradient(param.grad, self._sampler, "weight_grad"))
            record["weight_norm"] = torch.linalg.vector_norm(param.detach())

        return hook

    def _before_update(self, optimizer, args, kwargs) -> None:
        self._snapshot = {}
        names = [n for n in self._current if isinstance(getattr(self.layers[n], "weight", None), nn.Parameter)]
        if not names:
            return
        with torch.no_grad():
            weights = [self.layers[n].weight.detach() for n in names]
            if self.weights:
                weight_norms = torch._foreach_norm(weights)
                with_grad = [(n, w) for n, w in zip(names, weights) if self.layers[n].weight.grad is not None]
                grads = [self.layers[n].weight.grad for n, _ in with_grad]
                grad_norms = torch._foreach_norm(grads) if grads else []
                for name, norm in zip(names, weight_norms):
                    self._current[name]["weight_norm"] = norm
                for (name, _), grad, norm in zip(with_grad, grads, grad_norms):
                    self._current[name]["_weight_grad_norm"] = norm
                    self._current[name]["_weight_grad_sample"] = self._sampler.take(grad.reshape(-1))
            self._snapshot = dict(zip(names, torch._foreach_mul(weights, 1.0)))  # copies

    def _after_update(self, optimizer, args, kwargs) -> None:
        if not self._snapshot:
            return
        names = list(self._snapshot)
        with torch.no_grad():
            before = list(self._snapshot.values())
            after = [self.layers[n].weight.detach() for n in names]
            changes = torch._foreach_norm(torch._foreach_sub(after, before))
            norms = torch._foreach_norm(before)
            for name, change, norm in zip(names, changes, norms):
                # ‖Δw‖ / ‖w‖, kept as tensors; divided when the records are read.
                self._current[name]["_update_change"] = change
                self._current[name]["_update_norm"] = norm
        self._snapshot = {}

    # --- reading ---------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """Watched layers that have run, in execution order."""
        return list(self.order)

    def _summarized(self, layer: str) -> list[dict]:
        kind = SATURATING.get(type(self.layers[layer]))
        hist_range = self._ranges.get(layer, self.hist_range or (-1.0, 1.0))
        for record in self._series[layer].records:
            summarize(record, bins=self.bins, hist_range=hist_range, kind=kind)
        return self._series[layer].records

    def records(self, layer: str) -> list[dict]:
        """The layer's records, oldest first, as dicts of numbers."""
        if layer not in self._series:
            raise KeyError(f"{layer!r} is not a watched layer; watched: {list(self.layers)}")
        return [dict(r) for r in self._summarized(layer)]

    def series(self, layer: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one recorded quantity of one layer."""
        rows = [(r["step"], r[key]) for r in self._summarized(layer) if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def latest(self, key: str, window: int = 1) -> dict[str, float]:
        """Per layer (execution order), the median of ``key`` over its last ``window``
        records that have it, ignoring NaN (a quantity that could not be computed that
        step, e.g. a drift when the batch was NaN; non-finite steps are reported as such
        by ``findings``)."""
        out = {}
        for name in self.order:
            values = [r[key] for r in self._summarized(name) if key in r][-window:]
            if values:
                median = torch.tensor(values, dtype=torch.float64).nanmedian().item()
                if not math.isnan(median):
                    out[name] = float(median)
        return out

    def histogram(self, layer: str, step: int | None = None) -> tuple[list[float], list[float]]:
        """(bin edges, fractions) of ``layer`` at ``step`` (default: its latest record)."""
        records = [r for r in self._summarized(layer) if "hist" in r]
        if not records:
            raise ValueError(f"no histogram recorded for layer {layer!r}")
        record = records[-1] if step is None else min(records, key=lambda r: abs(r["step"] - step))
        lo, hi = self._ranges.get(layer, self.hist_range or (-1.0, 1.0))
        edges = torch.linspace(lo, hi, self.bins + 1).tolist()
        return edges, record["hist"]

    # --- export ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "steps": self.step,
            "every": self.every,
            "order": self.order,
            "layers": {
                name: {
                    "type": type(self.layers[name]).__name__,
                    "hist_range": self._ranges.get(name, self.hist_range),
                    "decimations": self._series[name].decimations,
                    "records": self.records(name),
                }
                for name in self.order
            },
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), allow_nan=True))
        return path

    def to_csv(self, path: str | Path) -> Path:
        """One row per (layer, recorded step), scalar quantities only (histograms: JSON).
        Text cells that start like a spreadsheet formula (``= + - @``, tab, CR) get a
        leading ``'``."""
        path = Path(path)
        rows = [
            {
                "layer": name,
                "type": type(self.layers[name]).__name__,
                **{k: v for k, v in r.items() if not isinstance(v, list)},
            }
            for name in self.order
            for r in self.records(name)
        ]
        columns = ["layer", "type"] + sorted({k for row in rows for k in row} - {"layer", "type"})
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: _csv_text(v) for k, v in row.items()} for row in rows)
        return path

    def to_tensorboard(self, log_dir: str | Path | None = None, *, writer=None) -> None:
        """Write every scalar and histogram to TensorBoard (needs the tensorboard package,
        or any ``writer`` with ``add_scalar``/``add_histogram_raw``)."""
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("to_tensorboard needs the tensorboard package: pip install tensorboard") from err
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        for name in self.order:
            lo, hi = self._ranges.get(name, self.hist_range or (-1.0, 1.0))
            edges = torch.linspace(lo, hi, self.bins + 1)
            for r in self.records(name):
                for key, value in r.items():
                    if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                        writer.add_scalar(f"{name}/{key}", value, r["step"])
                if "hist" in r:
                    counts = torch.tensor(r["hist"]) * r.get("numel", 1)
                    writer.add_histogram_raw(
                        f"{name}/activation",
                        min=lo,
                        max=hi,
                        num=float(counts.sum()),
                        sum=0.0,
                        sum_squares=0.0,
                        bucket_limits=edges[1:].tolist(),
                        bucket_counts=counts.tolist(),
                        global_step=r["step"],
                    )
        if hasattr(writer, "flush"):
            writer.flush()

    # --- interpretation --------------------------------------------------------------------

    def findings(self, **thresholds):
        """Plain diagnoses with layer names, numbers and a suggestion each; see
        :func:`normlab.diagnostics.findings.diagnose` for the thresholds."""
        from .findings import diagnose

        return diagnose(self, **thresholds)

    def report(self, path: str | Path, title: str = "normlab probe report", **thresholds) -> Path:
        """A self-contained HTML report: figures embedded, findings listed."""
        from .report import write_report

        return write_report(self, path, title=title, **thresholds)
