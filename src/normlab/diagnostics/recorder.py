"""The Probe's recording half: the hooks it puts on a model and its optimizer, what counts
as a step, and the records each hook captures (kept under a budget per layer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from .layers import first_tensor
from .summaries import (
    DeadRule,
    Record,
    SampleIndex,
    accumulation_dtype,
    capture_activation,
    capture_batch_moments,
    capture_gradient,
    norms,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["LayerHooks", "Recorder", "Series"]


class LayerHooks(TypedDict, total=False):
    """A watched layer's hooks, made once for the Probe's life: ``forward`` always,
    ``moments`` for a BatchNorm, ``weight`` (the weight and its post-accumulate hook) where
    the weight's gradient is recorded without an optimizer."""

    forward: Callable[[nn.Module, tuple[Any, ...], object], None]
    moments: Callable[[_BatchNorm, tuple[Any, ...], dict[str, Any]], None]
    weight: tuple[nn.Parameter, Callable[[torch.Tensor], None]]


def _weight(layer: nn.Module) -> nn.Parameter:
    """The weight of a layer already found to hold one as a Parameter (nn.Module's
    ``__getattr__`` types any attribute as Tensor | Module)."""
    return cast(nn.Parameter, layer.weight)


def _weight_decay(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[float, bool]:
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


class Series:
    """A layer's records under a fixed budget, spread over the whole run.

    Records are numbered as they come; when more than ``budget`` are kept, the stride
    doubles and only numbers divisible by it stay — so the kept records are every k-th
    of the run from its first step on, k growing as the run does — plus the latest one.
    (Halving the list as it stood would halve the old part again at every fill and keep
    mostly the end.)
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.kept: list[Record] = []
        self.latest: Record | None = None
        self.stride = 1
        self.count = 0
        self.decimations = 0

    def add(self, record: Record) -> None:
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
    def records(self) -> list[Record]:
        return self.kept if self.latest is None else [*self.kept, self.latest]


class Recorder:
    """Attaching, steps and the hooks' captures; the state they share is set up by
    :class:`~normlab.diagnostics.Probe`'s constructor."""

    # The state this half reads and writes (set by Probe.__init__; what each is, is said there).
    model: nn.Module
    layers: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer | None
    every: int
    gradients: bool
    weights: bool
    record_eval: bool
    step: int
    order: list[str]
    _seen: set[str]
    _series: dict[str, Series]
    _sampler: SampleIndex
    _dead_rules: dict[str, DeadRule | None]
    _unit_dims: dict[str, int]
    _permanent: bool
    _hook_fns: dict[str, LayerHooks]
    _handles: list[RemovableHandle]
    _root_handles: list[RemovableHandle]
    _label: int
    _sampling: bool
    _recording: bool
    _current: dict[str, Record]
    _moments: dict[str, Record]
    _snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]]
    _decay: dict[str, tuple[float, bool]]
    _recorded_steps: int
    _unrecordable: dict[str, str]
    _compiled_inside: bool

    # --- attaching -------------------------------------------------------------------------

    def attach(self) -> Self:
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

    def detach(self) -> Self:
        """Stop recording and remove every hook."""
        self._remove_layer_hooks()
        for handle in self._root_handles:
            handle.remove()
        self._root_handles.clear()
        self._sampling = self._recording = False
        return self

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._root_handles)

    def _make_hooks(self, name: str, module: nn.Module) -> LayerHooks:
        record_output, record_moments = self._record_output, self._record_moments
        if self._permanent:
            # Run eagerly, as a graph break, only on recorded forwards: the hook itself is
            # traced and guards on one flag, so a compiled model has two variants, not one
            # per step.
            # (torch.compiler.disable is untyped in torch's stubs; it returns what it wraps)
            record_output = torch.compiler.disable(record_output)  # type: ignore[no-untyped-call]
            record_moments = torch.compiler.disable(record_moments)  # type: ignore[no-untyped-call]

        def forward_hook(module: nn.Module, args: tuple[Any, ...], out: object) -> None:
            if self._recording:
                record_output(name, module, args, out)

        hooks: LayerHooks = {"forward": forward_hook}
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # registered on this BatchNorm only, so the module it is called with is one
            def moments_hook(module: _BatchNorm, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
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
                # Tensor.register_post_accumulate_grad_hook is untyped in torch's stubs
                self._handles.append(weight.register_post_accumulate_grad_hook(hook))  # type: ignore[no-untyped-call]

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

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
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

    def _record_output(self, name: str, module: nn.Module, args: tuple[Any, ...], out: object) -> None:
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
            # Tensor.register_hook is untyped in torch's stubs
            tensor.register_hook(lambda g: record.update(capture_gradient(g, "grad")))  # type: ignore[no-untyped-call]

    def _record_moments(self, name: str, module: _BatchNorm, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
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

    def _before_update(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._snapshot = {}
        if not self._sampling or not self._current:
            return
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        names = [
            n
            for n in self._current
            if isinstance(getattr(self.layers[n], "weight", None), nn.Parameter)
            and id(_weight(self.layers[n])) in group_of
        ]
        if not names:
            return
        with torch.no_grad():
            weights = [_weight(self.layers[n]).detach() for n in names]
            weight_norms = norms(weights)
            if self.weights:
                with_grad = [(n, g) for n in names if (g := _weight(self.layers[n]).grad) is not None]
                grad_norms = norms([g for _, g in with_grad]) if with_grad else []
                for name, norm in zip(names, weight_norms):
                    self._current[name]["weight_norm"] = norm
                for (name, grad), norm in zip(with_grad, grad_norms):
                    record = self._current[name]
                    record["_weight_grad_norm"], record["_weight_grad_numel"] = norm, grad.numel()
                    record["_weight_grad_sum"] = grad.sum(dtype=accumulation_dtype(grad))
            copies = torch._foreach_mul(weights, 1.0)
            self._snapshot = {n: (copy, norm) for n, copy, norm in zip(names, copies, weight_norms)}
        self._decay = {n: _weight_decay(optimizer, group_of[id(_weight(self.layers[n]))]) for n in names}

    def _after_update(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._snapshot:
            names = list(self._snapshot)
            with torch.no_grad():
                before = [self._snapshot[n][0] for n in names]
                after = [_weight(self.layers[n]).detach() for n in names]
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
