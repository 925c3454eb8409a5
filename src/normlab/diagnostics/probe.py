"""Probe: a recorder of per-layer activation, gradient and weight statistics during training."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from .export import csv_text, json_safe, output_path, rank_and_world
from .layers import (
    LayerSpec,
    contains_compiled,
    dead_rule_of,
    first_tensor,
    select_layers,
    unit_dims,
)
from .summaries import (
    SampleIndex,
    accumulation_dtype,
    capture_activation,
    capture_batch_moments,
    capture_gradient,
    norms,
    saturation_band,
    summarize_records,
)

__all__ = ["Probe"]


def _nice_bound(value: float) -> float:
    """The smallest of 1, 2, 5 × 10^k that is ≥ value (histogram ranges people can read)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        if step * 10**exponent >= value:
            return step * 10**exponent
    return 10.0 ** (exponent + 1)


def _weight_decay(optimizer: torch.optim.Optimizer, group: dict) -> tuple[float, bool]:
    """(the shrink lr · weight decay, whether the step's learning part can be split off) of
    a parameter group. Decoupled decay (AdamW, or ``decoupled_weight_decay=True``)
    multiplies the weight by 1 − lr·wd apart from the step: it can. Coupled decay (SGD,
    Adam, ...) adds wd·w to the gradient the step uses: it cannot, nor can a decay whose
    learning rate is not a number (a custom optimizer)."""
    try:
        decay = float(group.get("weight_decay", 0.0) or 0.0)
    except (TypeError, ValueError):
        return 0.0, False
    if not decay:
        return 0.0, True
    if not (group.get("decoupled_weight_decay", False) or isinstance(optimizer, torch.optim.AdamW)):
        return 0.0, False
    try:
        return float(group["lr"]) * decay, True
    except (KeyError, TypeError, ValueError):
        return 0.0, False


class _Series:
    """A layer's records under a fixed budget, spread over the whole run.

    Records are numbered as they come; when more than ``budget`` are kept, the stride
    doubles and only numbers divisible by it stay — so the kept records are every k-th
    of the run from its first step on, k growing as the run does — plus the latest one.
    (Halving the list as it stood would halve the old part again at every fill and keep
    mostly the end.)
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.kept: list[dict] = []
        self.latest: dict | None = None
        self.stride = 1
        self.count = 0
        self.decimations = 0

    def add(self, record: dict) -> None:
        index, self.count = self.count, self.count + 1
        if index % self.stride:
            self.latest = record
            return
        self.kept.append(record)
        self.latest = None
        if len(self.kept) > self.budget:
            self.stride *= 2
            self.decimations += 1
            self.kept = self.kept[::2]  # kept[i] is number i·stride/2: the even i remain on the grid
            if index % self.stride:
                self.latest = record

    @property
    def records(self) -> list[dict]:
        return self.kept if self.latest is None else [*self.kept, self.latest]


class Probe:
    """Records what happens inside ``model`` while it trains, layer by layer.

    Per watched layer and recorded step: the output's mean, std, 15/50/85th percentiles
    and a fixed-bin histogram; the dead fraction (units whose activation's slope is below
    1e-6 at every position of the batch; see
    :func:`~normlab.diagnostics.summaries.dead_unit_rule`) or the saturated fraction
    (tanh |a| ≥ 0.99, sigmoid outside [0.01, 0.99], Hardtanh/Hardsigmoid at their
    bounds); the norm and std of the gradient
    reaching the output and of the weight's gradient, and their ratio to the weight's
    norm; the update-to-weight ratio per optimizer step (pass ``optimizer``), also without its
    weight decay (``learning_ratio``, where the decay can be split off); and, for
    BatchNorm layers in training, how far the batch statistics (over the valid positions
    when the layer is given a ``mask``) are from the running ones.

    A *step* is one optimizer step when ``optimizer`` is given — every forward and
    backward before ``optimizer.step()`` belongs to it, so gradient accumulation is one
    step, whose weight gradients and update are the accumulated ones (its activation and
    output-gradient statistics are those of its first forward) — and otherwise one
    training-mode forward of ``model``. Every ``every``-th step is recorded (the first
    always is).

    Use as a context manager (``with Probe(model) as probe: ...``) or with
    :meth:`attach` / :meth:`detach`. Memory is bounded: each layer keeps at most
    ``budget`` records, every k-th of the run with k doubling as needed, plus the latest.

    Args:
        model: the model to watch; hooks are added on :meth:`attach` (or entering ``with``).
        layers: which layers — types, names or fnmatch patterns, or ``f(name, module)``.
            Default: :data:`DEFAULT_LAYER_TYPES`.
        every: record every ``every``-th training step (the first always); >= 1. Default 1.
        budget: keyword-only; records kept per layer at most (every k-th of the run with k
            doubling as needed, plus the latest). Default 256.
        optimizer: keyword-only; with it, each step's update-to-weight ratio is recorded.
        bins: histogram bins. Default 41.
        hist_range: (lo, hi) for every layer's histogram; by default each layer's range is
            fixed at its first record (a saturating activation's output range, [−1, 1] for
            tanh, [0, 1] for sigmoid, else ± the next 1-2-5 bound above its largest |value|)
            so its histograms stay comparable across steps.
        gradients: record the gradient reaching each output. Default True.
        weights: record each weight's gradient. Default True.
        record_eval: also record eval-mode forwards (without an optimizer, each counts as
            a step).
        sample_size: values per output kept for percentiles, histogram, mean and std (a
            fixed random subset; outputs no larger are used whole). The dead fraction,
            gradient norms and the non-finite check always see every value.
        unit_dim: the dim of an activation's output that holds its units, for the dead
            fraction: one int for every layer or ``{name: dim}``; by default inferred
            from the layer before it (see :func:`unit_dims`).
        rank_files: under torch.distributed (world size > 1) every rank records its own
            batches; the writers (``to_json``, ``to_csv``, ``to_tensorboard``,
            ``report``) write on rank 0 only and return None elsewhere, or, with
            ``rank_files=True``, on every rank to ``name.rank<r>.ext``.

    Cost is kept out of the training step: hooks only capture (a sample, a few exact
    reductions) and never wait for the device; sorting and histogramming happen when
    records are read. The per-layer hooks are attached for a recorded step only, so
    unrecorded steps run at (almost) full speed. Inside ``torch.compile`` attach the Probe
    to the compiled module (``Probe(torch.compile(model))``): its hooks then stay
    registered and record eagerly through graph breaks, with no recompilation per step
    (see docs/diagnostics.md for what that costs).
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
        unit_dim: int | dict[str, int] | None = None,
        rank_files: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Probe needs an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        for name, value, least in (("budget", budget, 2), ("bins", bins, 1), ("sample_size", sample_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if hist_range is not None and not hist_range[0] < hist_range[1]:
            raise ValueError(f"hist_range must be (lo, hi) with lo < hi, got {hist_range}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.layers = select_layers(model, layers)
        self.every, self.bins, self.hist_range = every, bins, hist_range
        self.gradients, self.weights, self.optimizer = gradients, weights, optimizer
        self.record_eval, self.rank_files = record_eval, rank_files
        self.step = 0
        self.order: list[str] = []
        self._seen: set[str] = set()
        self._series = {name: _Series(budget) for name in self.layers}
        self._ranges: dict[str, tuple[float, float]] = {}
        self._sampler = SampleIndex(sample_size)
        self._dead_rules = {name: dead_rule_of(m) for name, m in self.layers.items()}
        inferred = unit_dims(model, self.layers)
        if isinstance(unit_dim, int):
            inferred = dict.fromkeys(self.layers, unit_dim)
        elif unit_dim is not None:
            inferred.update(unit_dim)
        self._unit_dims = inferred
        # One hook object per layer for the Probe's life, so torch.compile sees the same
        # functions every time it looks.
        self._permanent = contains_compiled(model)
        self._hook_fns = {name: self._make_hooks(name, module) for name, module in self.layers.items()}
        self._handles: list = []  # per-layer hooks, while registered
        self._root_handles: list = []
        self._label = 0  # the number of the step in progress
        self._sampling = False  # the step in progress is recorded
        self._recording = False  # the forward in progress is recorded
        self._current: dict[str, dict] = {}
        self._moments: dict[str, dict] = {}
        self._snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decay: dict[str, tuple[float, bool]] = {}  # layer → (lr·weight decay to undo, splittable)
        self._recorded_steps = 0
        self._unrecordable: dict[str, str] = {}  # layer → why its output cannot be recorded
        self._compiled_inside = False
        self._warned: set[str] = set()

    # --- attaching -------------------------------------------------------------------------

    def attach(self) -> Probe:
        """Start recording: a forward pre-hook on ``model`` (and pre/post-step hooks on
        the optimizer) stay registered; the per-layer hooks are registered for recorded
        steps only (for the Probe's whole life on a compiled model)."""
        if self._root_handles:
            return self
        self._root_handles.append(self.model.register_forward_pre_hook(self._on_forward))
        if self.optimizer is not None:
            self._root_handles.append(self.optimizer.register_step_pre_hook(self._before_update))
            self._root_handles.append(self.optimizer.register_step_post_hook(self._after_update))
        if self._permanent:
            self._register_layer_hooks()
        if self.optimizer is not None:
            self._begin_step(self.step + 1)
        return self

    def detach(self) -> Probe:
        """Stop recording and remove every hook."""
        self._remove_layer_hooks()
        for handle in self._root_handles:
            handle.remove()
        self._root_handles.clear()
        self._sampling = self._recording = False
        return self

    def __enter__(self) -> Probe:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._root_handles)

    def _make_hooks(self, name: str, module: nn.Module) -> dict:
        record_output, record_moments = self._record_output, self._record_moments
        if self._permanent:
            # Run eagerly, as a graph break, only on recorded forwards: the hook itself is
            # traced and guards on one flag, so a compiled model has two variants, not one
            # per step.
            record_output = torch.compiler.disable(record_output)
            record_moments = torch.compiler.disable(record_moments)

        def forward_hook(module, args, out):
            if self._recording:
                record_output(name, module, args, out)

        hooks = {"forward": forward_hook}
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def moments_hook(module, args, kwargs):
                if self._recording:
                    record_moments(name, module, args, kwargs)

            hooks["moments"] = moments_hook
        weight = getattr(module, "weight", None)
        if self.weights and self.optimizer is None and isinstance(weight, nn.Parameter) and weight.requires_grad:
            hooks["weight"] = (weight, lambda param: self._record_weight_grad(name, param))
        return hooks

    def _register_layer_hooks(self) -> None:
        if self._handles:
            return
        for name, module in self.layers.items():
            hooks = self._hook_fns[name]
            self._handles.append(module.register_forward_hook(hooks["forward"]))
            if "moments" in hooks:
                self._handles.append(module.register_forward_pre_hook(hooks["moments"], with_kwargs=True))
            if "weight" in hooks:
                weight, hook = hooks["weight"]
                self._handles.append(weight.register_post_accumulate_grad_hook(hook))

    def _remove_layer_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- steps -----------------------------------------------------------------------------

    def _begin_step(self, label: int) -> None:
        self._label = label
        self._sampling = (label - 1) % self.every == 0
        self._current = {}
        self._moments = {}
        if self._sampling:
            self._recorded_steps += 1
        if not self._permanent:
            if self._sampling:
                self._register_layer_hooks()
            else:
                self._remove_layer_hooks()

    def _on_forward(self, module, args) -> None:
        if torch.compiler.is_compiling():
            # The model was compiled after the Probe was attached: this hook is traced,
            # and the graph keeps whatever per-layer hooks it saw first. Noted (this
            # assignment is replayed on every call) and reported when records are read.
            self._compiled_inside = True
            return
        counted = module.training or self.record_eval
        if self.optimizer is None and counted:
            self.step += 1
            self._begin_step(self.step)
        self._recording = self._sampling and counted

    # --- hooks -----------------------------------------------------------------------------

    def _record_output(self, name: str, module: nn.Module, args, out) -> None:
        if name in self._current:
            return  # a second call of the layer in this step
        tensor = first_tensor(out)
        if tensor is None or not tensor.is_floating_point():
            what = type(out).__name__ if tensor is None else f"a {tensor.dtype} tensor"
            self._unrecordable[name] = f"its output is {what}, not a floating-point tensor"
            return
        if tensor.is_meta:
            self._unrecordable[name] = "its output is on the meta device (shapes only, no values to record)"
            return
        inputs = args[0] if args else None
        # A 2-D output (batch, units) has one answer whatever came before the layer.
        unit_dim = self._unit_dims.get(name, 1 if tensor.dim() == 2 else None)
        record = {
            "step": self._label,
            **capture_activation(tensor, self._sampler, self._dead_rules[name], unit_dim, inputs),
        }
        record.update(self._moments.pop(name, {}))
        self._series[name].add(record)
        self._current[name] = record
        if name not in self._seen:
            self._seen.add(name)
            self.order.append(name)
        if self.gradients and tensor.requires_grad:
            tensor.register_hook(lambda g: record.update(capture_gradient(g, "grad")))

    def _record_moments(self, name: str, module: nn.Module, args, kwargs) -> None:
        if not module.training or module.running_mean is None or module.running_var is None:
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.is_meta or x.dim() < 2 or x.shape[1] != module.running_mean.numel():
            return
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.numel() * x.shape[1] != x.numel()):
            return  # a mask this hook cannot place: no number rather than a wrong one
        self._moments[name] = capture_batch_moments(x, mask, module.running_mean, module.running_var, module.eps)

    def _record_weight_grad(self, name: str, param: torch.Tensor) -> None:
        record = self._current.get(name)
        if not self._sampling or record is None or param.grad is None:
            return
        record.update(capture_gradient(param.grad, "weight_grad"))
        record["weight_norm"] = norms([param.detach()])[0]

    def _before_update(self, optimizer, args, kwargs) -> None:
        self._snapshot = {}
        if not self._sampling or not self._current:
            return
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        names = [
            n
            for n in self._current
            if isinstance(getattr(self.layers[n], "weight", None), nn.Parameter)
            and id(self.layers[n].weight) in group_of
        ]
        if not names:
            return
        with torch.no_grad():
            weights = [self.layers[n].weight.detach() for n in names]
            weight_norms = norms(weights)
            if self.weights:
                with_grad = [(n, self.layers[n].weight.grad) for n in names if self.layers[n].weight.grad is not None]
                grad_norms = norms([g for _, g in with_grad]) if with_grad else []
                for name, norm in zip(names, weight_norms):
                    self._current[name]["weight_norm"] = norm
                for (name, grad), norm in zip(with_grad, grad_norms):
                    record = self._current[name]
                    record["_weight_grad_norm"], record["_weight_grad_numel"] = norm, grad.numel()
                    record["_weight_grad_sum"] = grad.sum(dtype=accumulation_dtype(grad))
            copies = torch._foreach_mul(weights, 1.0)
            self._snapshot = {n: (copy, norm) for n, copy, norm in zip(names, copies, weight_norms)}
        self._decay = {n: _weight_decay(optimizer, group_of[id(self.layers[n].weight)]) for n in names}

    def _after_update(self, optimizer, args, kwargs) -> None:
        if self._snapshot:
            names = list(self._snapshot)
            with torch.no_grad():
                before = [self._snapshot[n][0] for n in names]
                after = [self.layers[n].weight.detach() for n in names]
                changes = norms(torch._foreach_sub(after, before))
                # Decoupled decay first shrinks w by lr·wd, then the step proper moves it:
                # the learning part is what is left after that shrink.
                shrunk = [n for n in names if self._decay[n][0]]
                learned = dict(zip(names, changes))
                if shrunk:
                    kept = [self._snapshot[n][0].mul_(1.0 - self._decay[n][0]) for n in shrunk]
                    learned.update(
                        zip(shrunk, norms(torch._foreach_sub([after[names.index(n)] for n in shrunk], kept)))
                    )
            for name, change in zip(names, changes):
                # ‖Δw‖ / ‖w‖, kept as tensors; divided when the records are read.
                record = self._current[name]
                record["_update_change"] = change
                record["_update_norm"] = self._snapshot[name][1]
                if self._decay[name][1]:  # coupled decay is inside the step: no learning part to split off
                    record["_learning_change"] = learned[name]
            self._snapshot = {}
        self.step += 1
        self._begin_step(self.step + 1)

    # --- reading ---------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """Watched layers that have run, in execution order."""
        return list(self.order)

    @property
    def unrecorded(self) -> dict[str, str]:
        """Selected layers with no record although recorded steps ran, and why."""
        if not self._recorded_steps:
            return {}
        out = {}
        for name in self.layers:
            if name in self._seen:
                continue
            if name in self._unrecordable:
                out[name] = self._unrecordable[name]
            else:
                out[name] = "never called during a recorded forward"
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _check_coverage(self) -> None:
        if not self._recorded_steps:
            self._warn_once(
                "nothing",
                "the Probe recorded nothing: no training-mode forward of the probed model itself ran while it was "
                "attached (calling one of its submodules directly does not count; eval-mode forwards count "
                "only with record_eval=True)",
            )
        if self._compiled_inside:
            self._warn_once(
                "compiled",
                "the model ran inside torch.compile after the Probe was attached, so the compiled graph "
                "keeps the hooks it first saw and the records are incomplete; attach the Probe to the "
                "compiled module instead: Probe(torch.compile(model))",
            )
        missing = self.unrecorded
        if self._permanent and missing and len(missing) == len(self.layers):
            self._warn_once(
                "compiled-before",
                f"no layer recorded in {self._recorded_steps} recorded steps: torch.compile had compiled this "
                "model's code before the Probe's hooks were registered, and it does not look at hooks again; "
                "attach the Probe before the compiled model's first call (or call torch._dynamo.reset() first)",
            )
        elif missing:
            listed = "; ".join(f"{name}: {why}" for name, why in missing.items())
            self._warn_once("unrecorded:" + ",".join(missing), f"selected layers have no records: {listed}")

    def _range(self, layer: str) -> tuple[float, float]:
        if self.hist_range is not None:
            return self.hist_range
        if layer not in self._ranges:
            band = saturation_band(self.layers[layer])
            if band is not None:
                self._ranges[layer] = band[0]
            else:
                first = next((r for r in self._series[layer].records if "_sample" in r), None)
                if first is None:
                    return (-1.0, 1.0)  # nothing to read yet; not fixed
                extremes = torch.stack([first["_min"], first["_max"]]).float()
                if not torch.isfinite(extremes).all():
                    sample = first["_sample"].float()
                    extremes = sample[torch.isfinite(sample)]
                bound = extremes.abs().max().item() if extremes.numel() else 1.0
                self._ranges[layer] = (-_nice_bound(bound), _nice_bound(bound))
        return self._ranges[layer]

    def _summarized(self, layer: str) -> list[dict]:
        records = self._series[layer].records
        band = saturation_band(self.layers[layer])
        summarize_records(records, bins=self.bins, hist_range=self._range(layer), band=band)
        return records

    def records(self, layer: str) -> list[dict]:
        """The layer's records, oldest first, as dicts of numbers."""
        if layer not in self._series:
            raise KeyError(f"{layer!r} is not a watched layer; watched: {list(self.layers)}")
        return [dict(r) for r in self._summarized(layer)]

    def series(self, layer: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one recorded quantity of one layer."""
        rows = [(r["step"], r[key]) for r in self._summarized(layer) if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def latest(self, key: str, window: int = 1, *, finite_only: bool = True) -> dict[str, float]:
        """Per layer (execution order), the median of ``key`` over its last ``window``
        records that have it. With ``finite_only`` (the default) NaN values are ignored
        (a quantity that could not be computed that step, e.g. a drift when the batch was
        NaN; non-finite steps are reported as such by ``findings``); without, a NaN among
        them makes the value NaN."""
        out = {}
        for name in self.order:
            values = [r[key] for r in self._summarized(name) if key in r][-window:]
            if not values:
                continue
            tensor = torch.tensor(values, dtype=torch.float64)
            median = tensor.nanmedian().item() if finite_only else tensor.median().item()
            if not finite_only or not math.isnan(median):
                out[name] = float(median)
        return out

    def histogram(self, layer: str, step: int | None = None) -> tuple[list[float], list[float]]:
        """(bin edges, fractions) of ``layer`` at ``step`` (default: its latest record
        with a histogram; see :meth:`histogram_step` for which step that is)."""
        record = self._histogram_record(layer, step)
        lo, hi = self._range(layer)
        edges = torch.linspace(lo, hi, self.bins + 1).tolist()
        return edges, record["hist"]

    def histogram_step(self, layer: str, step: int | None = None) -> int:
        """The step whose histogram :meth:`histogram` returns (the nearest recorded one
        that has finite values)."""
        return self._histogram_record(layer, step)["step"]

    def _histogram_record(self, layer: str, step: int | None) -> dict:
        records = [r for r in self._summarized(layer) if "hist" in r]
        if not records:
            raise ValueError(f"no histogram recorded for layer {layer!r}")
        return records[-1] if step is None else min(records, key=lambda r: abs(r["step"] - step))

    # --- export ----------------------------------------------------------------------------

    def _output_path(self, path: str | Path) -> Path | None:
        return output_path(path, self.rank_files)

    def to_dict(self) -> dict:
        """Everything recorded, as plain numbers; a quantity that is not finite is NaN
        here and null in :meth:`to_json`."""
        self._check_coverage()
        return {
            "steps": self.step,
            "every": self.every,
            "step_is": "optimizer step" if self.optimizer is not None else "training forward",
            "order": self.order,
            "unrecorded": self.unrecorded,
            "layers": {
                name: {
                    "type": type(self.layers[name]).__name__,
                    "hist_range": self._range(name),
                    "decimations": self._series[name].decimations,
                    "records": self.records(name),
                }
                for name in self.order
            },
        }

    def to_json(self, path: str | Path) -> Path | None:
        """Write :meth:`to_dict` as strict JSON (NaN/inf as null)."""
        path = self._output_path(path)
        if path is None:
            return None
        path.write_text(json.dumps(json_safe(self.to_dict()), allow_nan=False))
        return path

    def to_csv(self, path: str | Path) -> Path | None:
        """One row per (layer, recorded step), scalar quantities only (histograms: JSON).
        Text cells that start like a spreadsheet formula (``= + - @``, tab, CR) get a
        leading ``'``."""
        path = self._output_path(path)
        if path is None:
            return None
        self._check_coverage()
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
            writer.writerows({k: csv_text(v) for k, v in row.items()} for row in rows)
        return path

    def to_tensorboard(self, log_dir: str | Path | None = None, *, writer=None) -> None:
        """Write every scalar and histogram to TensorBoard (needs the tensorboard package,
        or any ``writer`` with ``add_scalar``/``add_histogram_raw``). Under
        torch.distributed a default writer is made on rank 0 only, or per rank in
        ``log_dir/rank<r>`` with ``rank_files``."""
        if writer is None:
            rank, world = rank_and_world()
            if world > 1:
                if not self.rank_files and rank != 0:
                    return
                if self.rank_files:
                    log_dir = Path(log_dir or "runs") / f"rank{rank}"
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("to_tensorboard needs the tensorboard package: pip install tensorboard") from err
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self._check_coverage()
        for name in self.order:
            lo, hi = self._range(name)
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

        self._check_coverage()
        return diagnose(self, **thresholds)

    def report(self, path: str | Path, title: str = "normlab probe report", **thresholds) -> Path | None:
        """A self-contained HTML report: figures embedded, findings listed."""
        from .report import write_report

        path = self._output_path(path)
        if path is None:
            return None
        return write_report(self, path, title=title, **thresholds)
