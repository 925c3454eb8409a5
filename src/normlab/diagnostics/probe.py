"""Probe: a recorder of per-layer activation, gradient and weight statistics during training.

The recording (hooks, steps, captures) is :mod:`.recorder`, the reading (summaries,
series, coverage warnings) :mod:`.reading`, the writers :mod:`.export`; the Probe puts
them together and keeps its state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .export import TensorBoardWriter, json_safe, output_path, tensorboard_writer, write_csv, write_tensorboard
from .layers import LayerSpec, contains_compiled, dead_rule_of, select_layers, unit_dims
from .reading import Reader
from .recorder import Recorder, Series
from .summaries import Record, SampleIndex

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .findings import Finding, Thresholds

__all__ = ["Probe"]


class Probe(Recorder, Reader):
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
        self._series = {name: Series(budget) for name in self.layers}
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
        self._handles: list[RemovableHandle] = []  # per-layer hooks, while registered
        self._root_handles: list[RemovableHandle] = []
        self._label = 0  # the number of the step in progress
        self._sampling = False  # the step in progress is recorded
        self._recording = False  # the forward in progress is recorded
        self._current: dict[str, Record] = {}
        self._moments: dict[str, Record] = {}
        self._snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decay: dict[str, tuple[float, bool]] = {}  # layer → (lr·weight decay to undo, splittable)
        self._recorded_steps = 0
        self._unrecordable: dict[str, str] = {}  # layer → why its output cannot be recorded
        self._compiled_inside = False
        self._warned: set[str] = set()

    # --- export ----------------------------------------------------------------------------

    def _output_path(self, path: str | Path) -> Path | None:
        return output_path(path, self.rank_files)

    def to_dict(self) -> dict[str, Any]:
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
        target = self._output_path(path)
        if target is None:
            return None
        target.write_text(json.dumps(json_safe(self.to_dict()), allow_nan=False))
        return target

    def to_csv(self, path: str | Path) -> Path | None:
        """One row per (layer, recorded step), scalar quantities only (histograms: JSON).
        Text cells that start like a spreadsheet formula (``= + - @``, tab, CR) get a
        leading ``'``."""
        target = self._output_path(path)
        if target is None:
            return None
        self._check_coverage()
        return write_csv(self, target)

    def to_tensorboard(self, log_dir: str | Path | None = None, *, writer: TensorBoardWriter | None = None) -> None:
        """Write every scalar and histogram to TensorBoard (needs the tensorboard package,
        or any ``writer`` with ``add_scalar``/``add_histogram_raw``). Under
        torch.distributed a default writer is made on rank 0 only, or per rank in
        ``log_dir/rank<r>`` with ``rank_files``."""
        if writer is None:
            writer = tensorboard_writer(log_dir, self.rank_files)
            if writer is None:
                return
        self._check_coverage()
        write_tensorboard(self, writer)

    # --- interpretation --------------------------------------------------------------------

    def findings(self, **thresholds: Unpack[Thresholds]) -> list[Finding]:
        """Plain diagnoses with layer names, numbers and a suggestion each; see
        :func:`normlab.diagnostics.findings.diagnose` for the thresholds."""
        from .findings import diagnose

        self._check_coverage()
        return diagnose(self, **thresholds)

    def report(
        self, path: str | Path, title: str = "normlab probe report", **thresholds: Unpack[Thresholds]
    ) -> Path | None:
        """A self-contained HTML report: figures embedded, findings listed."""
        from .report import write_report

        target = self._output_path(path)
        if target is None:
            return None
        return write_report(self, target, title=title, **thresholds)
