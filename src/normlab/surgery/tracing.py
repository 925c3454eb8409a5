"""Find producer → consumer module pairs in any eager model, e.g. Conv → BatchNorm.

Two ways, tried in order:

1. ``torch.fx`` symbolic tracing (norm layers, convolutions and linears kept as leaves).
   The graph says exactly which module's output feeds which module, and who else uses it.
2. When fx cannot trace (data-dependent control flow), one real forward on an example
   input, watched by module hooks and a ``TorchFunctionMode`` that sees every torch op:
   a consumer whose input *is* a producer's output tensor is a candidate, and any use of
   that tensor outside the consumer (a skip connection, a second branch, an in-place
   op, the model's own output) disqualifies it.

A pair is only reported when the producer's output feeds nothing but the consumer and
each module runs exactly once per forward — the conditions under which rewriting the
pair cannot change what anything else sees.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .. import nn as nln
from .modules import call_model, output_tensors

__all__ = ["PairSearch", "find_pairs"]

Predicate = Callable[[nn.Module], bool]


@dataclass
class PairSearch:
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer, consumer)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (consumer, reason)
    method: str = ""
    output_ndim: dict[str, int] = field(default_factory=dict)  # producer → output rank, if seen


def find_pairs(
    model: nn.Module,
    is_producer: Predicate,
    is_consumer: Predicate,
    example_input=None,
) -> PairSearch:
    """Pairs (producer path, consumer path) where the consumer's only input is the
    producer's output and nothing else uses it. Consumers that do not qualify are
    listed in ``skipped`` with the reason."""
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


class _LeafTracer(fx.Tracer):
    """Keeps producers, consumers and every norm layer opaque: their own forward code
    (shape checks on Python ints) is not what we are tracing."""

    def __init__(self, is_producer: Predicate, is_consumer: Predicate) -> None:
        super().__init__()
        self._opaque = lambda m: is_producer(m) or is_consumer(m) or nln.is_norm_layer(m)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._opaque(m) or super().is_leaf_module(m, qualname)


def _find_with_fx(model, is_producer, is_consumer) -> PairSearch:
    tracer = _LeafTracer(is_producer, is_consumer)
    graph = tracer.trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    search = PairSearch(method="torch.fx")
    for node in graph.nodes:
        if node.op != "call_module" or not is_consumer(modules[node.target]):
            continue
        consumer = node.target
        source = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if not (isinstance(source, fx.Node) and source.op == "call_module" and is_producer(modules[source.target])):
            what = _describe_node(source)
            search.skipped.append((consumer, f"its input comes from {what}, not a foldable conv/linear"))
            continue
        producer = source.target
        if calls[producer] > 1 or calls[consumer] > 1:
            search.skipped.append(
                (
                    consumer,
                    f"{producer if calls[producer] > 1 else consumer} "
                    f"is called {max(calls[producer], calls[consumer])} times per forward",
                )
            )
            continue
        others = [u for u in source.users if u is not node]
        if others:
            uses = ", ".join(_describe_node(u) for u in others)
            search.skipped.append((consumer, f"the output of {producer} also feeds {uses}"))
            continue
        search.pairs.append((producer, consumer))
    return search


def _describe_node(node) -> str:
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


def _producer_output_ranks(model, is_producer, example_input) -> dict[str, int]:
    ranks: dict[str, int] = {}
    handles = []
    for path, m in model.named_modules():
        if is_producer(m):

            def hook(mod, args, out, path=path):
                if isinstance(out, torch.Tensor):
                    ranks[path] = out.dim()

            handles.append(m.register_forward_hook(hook))
    try:
        _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return ranks


def _run(model, example_input):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, example_input)
    finally:
        model.train(was_training)


class _UseRecorder(TorchFunctionMode):
    """Records, for watched tensors, which module (innermost on the stack) used them."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.watched: dict[int, str] = {}  # id(tensor) → producer path
        self.keep: list[torch.Tensor] = []  # keep watched tensors alive: ids stay unique
        self.uses: dict[int, list[tuple[str, ...]]] = {}
        self.paused = False  # our own hooks' tensor calls are not uses

    def watch(self, tensor: torch.Tensor, producer: str) -> None:
        self.watched[id(tensor)] = producer
        self.keep.append(tensor)
        self.uses[id(tensor)] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watched and not self.paused:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in self.watched:
                    self.uses[id(t)].append((tuple(self.stack), getattr(func, "__name__", str(func))))
        return func(*args, **kwargs)


def _find_with_hooks(model, is_producer, is_consumer, example_input) -> PairSearch:
    stack: list[str] = []
    recorder = _UseRecorder(stack)
    calls: Counter = Counter()
    consumer_inputs: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    handles = []
    for path, m in model.named_modules():

        def pre(mod, args, path=path):
            stack.append(path)
            calls[path] += 1
            if is_consumer(mod) and args and isinstance(args[0], torch.Tensor):
                consumer_inputs[path] = args[0]

        def post(mod, args, out, path=path):
            stack.pop()
            if is_producer(mod) and isinstance(out, torch.Tensor):
                recorder.paused = True
                try:
                    ranks[path] = out.dim()
                finally:
                    recorder.paused = False
                recorder.watch(out, path)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with recorder:
            output = _run(model, example_input)
    finally:
        for h in handles:
            h.remove()

    final_outputs = {id(t) for t in output_tensors(output)}
    search = PairSearch(output_ndim=ranks)
    for consumer, tensor in consumer_inputs.items():
        producer = recorder.watched.get(id(tensor))
        if producer is None:
            search.skipped.append((consumer, "its input is not the output of a foldable conv/linear"))
            continue
        if calls[producer] > 1 or calls[consumer] > 1:
            search.skipped.append(
                (consumer, f"{producer if calls[producer] > 1 else consumer} is called more than once per forward")
            )
            continue
        outside = sorted(
            {op if not st else f"{op} in '{st[-1]}'" for st, op in recorder.uses[id(tensor)] if consumer not in st}
        )
        if id(tensor) in final_outputs:
            outside.append("the model output")
        if outside:
            search.skipped.append((consumer, f"the output of {producer} is also used by {', '.join(outside)}"))
            continue
        search.pairs.append((producer, consumer))
    return search
