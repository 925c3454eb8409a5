"""Find producer → consumer module pairs in any eager model, e.g. Conv → BatchNorm.

Two ways, tried in order:

1. ``torch.fx`` symbolic tracing (norm layers, convolutions and linears kept as leaves).
   The graph says exactly which module's output feeds which module, and who else uses it.
2. When fx cannot trace (data-dependent control flow), one real forward on an example
   input, watched by module hooks and a ``TorchFunctionMode`` that sees every torch op:
   a consumer whose input *is* a producer's output tensor is a candidate, and any use of
   that tensor outside the consumer (a skip connection, a second branch, an in-place
   op, the model's own output) disqualifies it.

A pair is only reported when the producer's output feeds nothing but the consumer, the
consumer takes nothing but that input (no ``mask=``), and each module runs exactly once per
forward — the conditions under which rewriting the pair cannot change what anything else
sees. Each consumer that does not qualify is listed once, with the first reason found.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.hooks import RemovableHandle

from .. import nn as nln
from .modules import call_model, evaluating, output_tensors, run_copy, watch_calls

__all__ = ["PairSearch", "extra_arguments", "find_pairs", "takes_mask"]

Predicate = Callable[[nn.Module], bool]
#: a forward pre-hook registered with ``with_kwargs=True``
PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]


@dataclass
class PairSearch:
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer, consumer)
    skipped: dict[str, str] = field(default_factory=dict)  # consumer → reason (the first found)
    method: str = ""
    output_ndim: dict[str, int] = field(default_factory=dict)  # producer → output rank, if seen
    seen: set[str] = field(default_factory=set)  # consumers called in the forward

    def skip(self, consumer: str, reason: str) -> None:
        self.skipped.setdefault(consumer, reason)


def _extra_arguments(module: nn.Module, args: tuple[object, ...], kwargs: Mapping[str, object]) -> str | None:
    """What a call passes besides its input, named as the layer's forward names it ("mask="),
    or None. ``args`` are the positional arguments after the input."""
    try:
        names = list(inspect.signature(type(module).forward).parameters)[2 : 2 + len(args)]  # after self, input
    except (TypeError, ValueError):  # no signature to read
        names = []
    if len(names) == len(args):
        kwargs = {**dict(zip(names, args)), **kwargs}
        args = ()
    extra = [f"{k}=" for k, v in kwargs.items() if v is not None]
    if args:
        extra.append(f"{len(args)} more positional argument(s)")
    return ", ".join(extra) or None


def _fold_refusal(extra: str) -> str:
    if "mask=" in extra:
        return (
            "it is called with mask=: a masked BatchNorm outputs 0 at the masked positions, "
            "which no conv/linear can compute"
        )
    return f"it is called with {extra} besides its input"


def find_pairs(
    model: nn.Module,
    is_producer: Predicate,
    is_consumer: Predicate,
    example_input: Any = None,
) -> PairSearch:
    """Pairs (producer path, consumer path) where the consumer's only input is the
    producer's output and nothing else uses it. Consumers that do not qualify are
    listed in ``skipped`` with the reason."""
    # fx runs the Python of every module it traces through, so an in-place update of a buffer
    # (a step counter) would happen for real: tracing, like any forward, works on a copy
    model = copy.deepcopy(model)
    try:
        search = _find_with_fx(model, is_producer, is_consumer)
    except Exception as err:  # fx raises many kinds of errors on untraceable code
        if example_input is None:
            raise ValueError(
                f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: "
                f"{err}); pass example_input so the pairs can be found by running one "
                f"forward pass instead"
            ) from err
        search = _find_with_hooks(model, is_producer, is_consumer, example_input)
        search.method = f"hooks (fx failed: {type(err).__name__})"
        return search
    if example_input is not None:
        search.output_ndim = _producer_output_ranks(model, is_producer, example_input)
    return search


def takes_mask(module: nn.Module) -> bool:
    """Whether the layer's forward accepts ``mask=``."""
    return "mask" in inspect.signature(type(module).forward).parameters


def extra_arguments(model: nn.Module, is_target: Predicate, example_input: Any = None) -> dict[str, str] | None:
    """For the target modules that are called with something besides their input, path → what
    ("mask="). Found with ``torch.fx`` (no input needed), or
    by one forward on ``example_input`` where fx cannot trace; None where neither works."""
    model = copy.deepcopy(model)  # fx runs the modules' Python: see find_pairs
    try:
        graph = _LeafTracer(is_target, lambda m: False).trace(model)
    except Exception:  # fx raises many kinds of errors on untraceable code
        if example_input is None:
            return None
        return _extra_arguments_by_hooks(model, is_target, example_input)
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and is_target(model.get_submodule(node.target)):
            kwargs = dict(node.kwargs)
            if not node.args:
                kwargs.pop("input", None)
            extra = _extra_arguments(model.get_submodule(node.target), node.args[1:], kwargs)
            if extra:
                found.setdefault(node.target, extra)
    return found


def _extra_arguments_by_hooks(model: nn.Module, is_target: Predicate, example_input: Any) -> dict[str, str]:
    found: dict[str, str] = {}

    def see(path: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if not args:
            kwargs.pop("input", None)
        extra = _extra_arguments(module, args[1:], kwargs)
        if extra:
            found.setdefault(path, extra)

    watch_calls(model, example_input, is_target, see)
    return found


class _LeafTracer(fx.Tracer):
    """Keeps producers, consumers and every norm layer opaque: their own forward code
    (shape checks on Python ints) is not what we are tracing."""

    def __init__(self, is_producer: Predicate, is_consumer: Predicate) -> None:
        super().__init__()
        self._opaque: Predicate = lambda m: is_producer(m) or is_consumer(m) or nln.is_norm_layer(m)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._opaque(m) or super().is_leaf_module(m, qualname)


def _find_with_fx(model: nn.Module, is_producer: Predicate, is_consumer: Predicate) -> PairSearch:
    tracer = _LeafTracer(is_producer, is_consumer)
    graph = tracer.trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    search = PairSearch(method="torch.fx")
    for node in graph.nodes:
        if node.op != "call_module" or not is_consumer(modules[node.target]):
            continue
        consumer = node.target
        search.seen.add(consumer)
        if calls[consumer] > 1:
            search.skip(consumer, f"{consumer} is called {calls[consumer]} times per forward")
            continue
        kwargs = dict(node.kwargs)
        source = node.args[0] if node.args else kwargs.pop("input", None)
        extra = _extra_arguments(modules[consumer], node.args[1:], kwargs)
        if extra:
            search.skip(consumer, _fold_refusal(extra))
            continue
        if not (isinstance(source, fx.Node) and source.op == "call_module" and is_producer(modules[source.target])):
            what = _describe_node(source)
            search.skip(consumer, f"its input comes from {what}, not a foldable conv/linear")
            continue
        producer = cast(str, source.target)  # a call_module node's target is the module's path
        if calls[producer] > 1:
            search.skip(consumer, f"{producer} is called {calls[producer]} times per forward")
            continue
        others = [u for u in source.users if u is not node]
        if others:
            uses = ", ".join(_describe_node(u) for u in others)
            search.skip(consumer, f"the output of {producer} also feeds {uses}")
            continue
        search.pairs.append((producer, consumer))
    return search


def _describe_node(node: object) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({type(node).__name__})"
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "placeholder":
        return "the model input"
    if node.op == "output":
        return "the model output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op.replace('_', ' ')} '{target}'"


def _producer_output_ranks(model: nn.Module, is_producer: Predicate, example_input: Any) -> dict[str, int]:
    ranks: dict[str, int] = {}

    def watch(scratch: nn.Module) -> None:
        for path, m in scratch.named_modules():
            if is_producer(m):

                def hook(mod: nn.Module, args: tuple[Any, ...], out: object, path: str = path) -> None:
                    if isinstance(out, torch.Tensor):
                        ranks[path] = out.dim()

                m.register_forward_hook(hook)

    run_copy(model, example_input, watch)
    return ranks


class _UseRecorder(TorchFunctionMode):
    """Records, for watched tensors, which module (innermost on the stack) used them."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.watched: dict[int, str] = {}  # id(tensor) → producer path
        self.keep: list[torch.Tensor] = []  # keep watched tensors alive: ids stay unique
        self.uses: dict[int, list[tuple[tuple[str, ...], str]]] = {}  # (module stack, op name)
        self.paused = False  # our own hooks' tensor calls are not uses

    def watch(self, tensor: torch.Tensor, producer: str) -> None:
        self.watched[id(tensor)] = producer
        self.keep.append(tensor)
        self.uses[id(tensor)] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.watched and not self.paused:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in self.watched:
                    self.uses[id(t)].append((tuple(self.stack), getattr(func, "__name__", str(func))))
        return func(*args, **kwargs)


def _find_with_hooks(
    model: nn.Module, is_producer: Predicate, is_consumer: Predicate, example_input: Any
) -> PairSearch:
    stack: list[str] = []
    recorder = _UseRecorder(stack)
    calls: Counter[str] = Counter()
    consumer_inputs: dict[str, object] = {}
    consumer_extras: dict[str, str] = {}
    ranks: dict[str, int] = {}
    handles: list[RemovableHandle] = []
    for path, m in model.named_modules():

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], path: str = path) -> None:
            stack.append(path)
            calls[path] += 1
            if is_consumer(mod):
                kwargs = dict(kwargs)
                consumer_inputs[path] = args[0] if args else kwargs.pop("input", None)
                extra = _extra_arguments(mod, args[1:], kwargs)
                if extra:
                    consumer_extras.setdefault(path, extra)

        def post(mod: nn.Module, args: tuple[Any, ...], out: object, path: str = path) -> None:
            stack.pop()
            if is_producer(mod) and isinstance(out, torch.Tensor):
                recorder.paused = True
                try:
                    ranks[path] = out.dim()
                finally:
                    recorder.paused = False
                recorder.watch(out, path)

        handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post)]
    try:
        with recorder, evaluating(model):
            output = call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()

    final_outputs = {id(t) for t in output_tensors(output)}
    search = PairSearch(output_ndim=ranks, seen=set(consumer_inputs))
    for consumer, tensor in consumer_inputs.items():
        if calls[consumer] > 1:
            search.skip(consumer, f"{consumer} is called {calls[consumer]} times per forward")
            continue
        if consumer in consumer_extras:
            search.skip(consumer, _fold_refusal(consumer_extras[consumer]))
            continue
        producer = recorder.watched.get(id(tensor))
        if producer is None:
            search.skip(consumer, "its input is not the output of a foldable conv/linear")
            continue
        if calls[producer] > 1:
            search.skip(consumer, f"{producer} is called {calls[producer]} times per forward")
            continue
        outside = sorted(
            {op if not st else f"{op} in '{st[-1]}'" for st, op in recorder.uses[id(tensor)] if consumer not in st}
        )
        if id(tensor) in final_outputs:
            outside.append("the model output")
        if outside:
            search.skip(consumer, f"the output of {producer} is also used by {', '.join(outside)}")
            continue
        search.pairs.append((producer, consumer))
    return search
