"""Whole models: a torch.nn model against the same model after ``nl.surgery.from_torch``.

Each row is one model, one mode and one execution: a training step (forward, cross-entropy,
backward, SGD step) at the row's batch, or eval inference at batch 1 without autograd;
eager or under ``torch.compile`` (the first calls, which compile, are timed apart and left
out). The two models run round-robin (:func:`interleaved_medians`), and the row reports
the median times and their ratio normlab / torch.nn.

Correctness, once per row, on the models being timed and before any timing: both start
from the same state (``from_torch`` copies it bit for bit) and take the same two steps on
the same data; the outputs of both steps, and for training the parameters and running
statistics after them, must agree within :data:`TOLERANCE` relative to their largest value.

The models are small on purpose: at these sizes the norms are a few percent of a CPU step
(convolutions and matmuls are most of it), so the rows say whether swapping the norms
costs a user anything, not how fast the norms are (``normlab bench layers`` says that).
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from .. import nn as nln
from ..core import record_dispatch
from ..surgery import from_torch
from ..surgery.interop import TWINS
from .common import device_clock, max_rel_diff, threads_kept
from .model_table import format_model_markdown, format_model_table
from .model_zoo import NUM_CLASSES, MLPStyle, ResNetStyle, ViTStyle
from .timing import interleaved_medians

__all__ = [
    "MODEL_KEYS",
    "TOLERANCE",
    "ModelBenchConfig",
    "ModelCase",
    "cases",
    "format_model_markdown",
    "format_model_table",
    "quick_config",
    "run_model_benchmark",
    "run_model_case",
    "smoke_config",
    "summary",
]

#: Largest relative difference (to the largest value) allowed between the two models'
#: outputs, parameters and statistics after the same two steps. Both sides compute in
#: float32 with different reduction orders; through ~10 layers and a step that moves
#: every weight that leaves up to 5e-6 in the outputs and 4e-5 in the state (a conv's
#: weights after two steps); a real disagreement (a wrong eps, a wrong running-stat
#: update, a wrong gradient) is 1e-3 or more.
TOLERANCE = 1e-4


# --- torch.nn → normlab ----------------------------------------------------------------------


def to_normlab(model: nn.Module) -> nn.Module:
    """What a user does: ``nl.surgery.from_torch`` on (a copy of) the model."""
    return from_torch(model).model


def to_normlab_fused(model: nn.Module) -> nn.Module:
    """``from_torch(model, fuse_activations=True)``: every BatchNorm2d → ReLU pair becomes one
    BatchNormAct2d (state bit for bit)."""
    return from_torch(model, fuse_activations=True).model


@dataclass(frozen=True)
class ModelCase:
    key: str  # what --models selects
    model: str  # what the table says
    build: Callable[[], nn.Module]  # the torch.nn model
    train_shape: tuple[int, ...]  # the training batch; eval runs the same at batch 1
    layout: str = "NCHW"  # "NCHW", "channels_last", "tokens" or "rows"
    convert: Callable[[nn.Module], nn.Module] = to_normlab
    normlab_layers: type | tuple[type, ...] = ()  # what the conversion must have put in

    @property
    def eval_shape(self) -> tuple[int, ...]:
        return (1, *self.train_shape[1:])


MODEL_KEYS = ("cnn-bn", "cnn-gn", "cnn-bnact", "cnn-bn-cl", "vit-ln", "vit-rms", "mlp-bn1d")


@dataclass(frozen=True)
class ModelBenchConfig:
    models: tuple[str, ...] = MODEL_KEYS
    modes: tuple[str, ...] = ("train", "eval")
    compiled: tuple[bool, ...] = (False, True)
    threads: tuple[int, ...] = (1, 2)
    repeats: int = 15
    # Each sample runs the call this many seconds or more (the count fixed once per row):
    # a batch-1 eval call takes about a millisecond, and a millisecond sample on a shared
    # machine is mostly scheduler noise.
    min_sample_s: float = 0.05
    # compiled rows only at the last thread count (quick: compilation is most of the run)
    compile_last_threads_only: bool = False
    device: str = "cpu"
    # the sizes (the smoke setting shrinks them to check the pipeline in seconds)
    cnn_batch: int = 32
    image: int = 32
    cnn_width: int = 32
    vit_batch: int = 16
    tokens: int = 65
    dim: int = 192
    depth: int = 4
    heads: int = 3
    mlp_batch: int = 256
    mlp_features: int = 256
    mlp_hidden: int = 512
    lr: float = 0.01
    seed: int = 0


def quick_config(**overrides) -> ModelBenchConfig:
    """Every model and mode, fewer repetitions, eager at every thread count and compiled at
    the last one."""
    return replace(ModelBenchConfig(repeats=5, min_sample_s=0.02, compile_last_threads_only=True), **overrides)


def smoke_config(**overrides) -> ModelBenchConfig:
    """Tiny shapes, one repetition: checks that every row runs and agrees; its times mean
    nothing."""
    return replace(
        ModelBenchConfig(
            repeats=1,
            min_sample_s=0.0,
            cnn_batch=4,
            image=8,
            cnn_width=8,
            vit_batch=2,
            tokens=5,
            dim=16,
            depth=1,
            heads=2,
            mlp_batch=8,
            mlp_features=12,
            mlp_hidden=16,
        ),
        **overrides,
    )


def cases(config: ModelBenchConfig = ModelBenchConfig()) -> list[ModelCase]:
    """The rows' models, in the order of ``config.models``."""
    c = config
    image = (c.cnn_batch, 3, c.image, c.image)
    width = c.cnn_width
    groups = math.gcd(8, width)  # GroupNorm(8, ·) at the default widths 32 and 64

    def cnn(key: str, title: str, norm: Callable[[int], nn.Module], layer: type, **more: Any) -> ModelCase:
        return ModelCase(
            key, f"ResNet-style CNN, {title}", lambda: ResNetStyle(norm, width), image, **more, normlab_layers=layer
        )

    def vit(key: str, title: str, norm: Callable[[int], nn.Module], layer: type) -> ModelCase:
        build = lambda: ViTStyle(norm, c.dim, c.depth, c.heads)  # noqa: E731  # one row's model
        shape = (c.vit_batch, c.tokens, c.dim)
        return ModelCase(key, f"ViT-style blocks, {title}", build, shape, layout="tokens", normlab_layers=layer)

    built = (
        cnn("cnn-bn", "BatchNorm2d", nn.BatchNorm2d, nln.BatchNorm2d),
        cnn("cnn-gn", f"GroupNorm({groups})", lambda ch: nn.GroupNorm(groups, ch), nln.GroupNorm),
        cnn("cnn-bnact", "BatchNormAct2d vs BN+ReLU", nn.BatchNorm2d, nln.BatchNormAct2d, convert=to_normlab_fused),
        cnn("cnn-bn-cl", "BatchNorm2d", nn.BatchNorm2d, nln.BatchNorm2d, layout="channels_last"),
        vit("vit-ln", "LayerNorm", nn.LayerNorm, nln.LayerNorm),
        vit("vit-rms", "RMSNorm", nn.RMSNorm, nln.RMSNorm),
        ModelCase(
            "mlp-bn1d",
            "MLP, BatchNorm1d",
            lambda: MLPStyle(c.mlp_features, c.mlp_hidden),
            (c.mlp_batch, c.mlp_features),
            layout="rows",
            normlab_layers=nln.BatchNorm1d,
        ),
    )
    all_cases = {case.key: case for case in built}
    unknown = [k for k in config.models if k not in all_cases]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODEL_KEYS)}")
    return [all_cases[k] for k in config.models]


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Give every norm layer non-trivial affine parameters and running statistics, as after
    training, so eval rows normalize with something other than mean 0, variance 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m) not in TWINS:
                continue
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


# --- one row ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _inductor_threads(threads: int):
    """Inductor bakes the thread count into the code it generates (and keys its cache on
    this setting): compile for the row's count, not the count at some earlier compile."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.threads": threads}):
        yield


def _state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters, then floating buffers, in registration order: the fused layer registers
    its weight, bias and statistics in the order of the BatchNorm it replaced, so the two
    lists pair up even where the names differ ('1.0.weight' and '1.weight')."""
    buffers = [(k, b) for k, b in model.named_buffers() if b.is_floating_point()]
    return [(k, t.detach().clone()) for k, t in [*model.named_parameters(), *buffers]]


def _compare(
    ours: list[torch.Tensor], theirs: list[torch.Tensor], state_ours: list[tuple], state_torch: list[tuple]
) -> dict:
    """Largest relative difference in the outputs, and in the state tensor by tensor."""
    if [t.shape for _, t in state_ours] != [t.shape for _, t in state_torch]:
        raise RuntimeError(
            "the two models' parameters and buffers do not pair up "
            f"({len(state_ours)} normlab, {len(state_torch)} torch.nn): the comparison would be partial"
        )
    out = max(max_rel_diff(a, b) for a, b in zip(ours, theirs))
    state, worst = max(
        ((max_rel_diff(a, b), name) for (_, a), (name, b) in zip(state_ours, state_torch)), default=(0.0, "")
    )
    # worst_state names the torch.nn model's tensor that differs most (say, which running_var)
    return {"output_rel_diff": out, "state_rel_diff": state, "worst_state": worst}


def run_model_case(
    case: ModelCase, mode: str, compiled: bool, threads: int, config: ModelBenchConfig = ModelBenchConfig()
) -> dict:
    """One row: times, ratio and the correctness check."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    device = torch.device(config.device)
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    theirs = _trained_like(case.build(), config.seed + 1)
    ours = case.convert(copy.deepcopy(theirs))
    converted = sum(isinstance(m, case.normlab_layers) for m in ours.modules()) if case.normlab_layers else 0
    if case.normlab_layers and not converted:
        raise RuntimeError(
            f"{case.model}: the conversion put in no {case.normlab_layers}; the row would time torch.nn twice"
        )
    memory_format = torch.channels_last if case.layout == "channels_last" else torch.preserve_format
    for m in (theirs, ours):
        m.to(device=device, memory_format=memory_format)
        m.train(mode == "train")

    g = torch.Generator().manual_seed(config.seed + 2)
    shape = case.train_shape if mode == "train" else case.eval_shape
    x = torch.randn(shape, generator=g).to(device)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (shape[0],), generator=g).to(device)

    def runner(model: nn.Module) -> Callable[[], torch.Tensor]:
        fn = model
        if compiled:
            fn = torch.compile(model)
        if mode == "eval":

            def infer():
                with torch.no_grad():
                    return fn(x)

            return infer
        opt = torch.optim.SGD(model.parameters(), lr=config.lr)

        def step():
            opt.zero_grad(set_to_none=True)
            out = fn(x)
            F.cross_entropy(out, y).backward()
            opt.step()
            return out.detach()

        return step

    clock = device_clock(device)
    if compiled:
        # Every row compiles fresh models whose forwards share code objects (Sequential's,
        # the blocks'); past dynamo's recompile limit a forward would silently run eager.
        torch._dynamo.reset()
    run_torch, run_ours = runner(theirs), runner(ours)
    # The check's two steps are also the warm-up: compilation happens in the first, timed
    # here so the table can say what it cost, and left out of the medians.
    outputs: dict[str, list[torch.Tensor]] = {"torch": [], "normlab": []}
    first_call_s, graphs = {}, {}
    with _inductor_threads(threads) if compiled else contextlib.nullcontext():
        for name, fn in (("torch", run_torch), ("normlab", run_ours)):
            counters.clear()
            start = clock()
            outputs[name].append(fn())
            first_call_s[name] = clock() - start
            outputs[name].append(fn())
            graphs[name] = _compiled_graphs() if compiled else None
        check = _compare(outputs["normlab"], outputs["torch"], _state(ours), _state(theirs))
        paths = _dispatch_paths(ours, x, mode)
        calls = _calls_per_sample((run_torch, run_ours), config.min_sample_s, clock)
        # the check's calls were the warm-up, one round more settles the allocator
        times = interleaved_medians(
            {"torch": _repeated(run_torch, calls), "normlab": _repeated(run_ours, calls)},
            repeats=config.repeats,
            warmup=1,
            clock=clock,
            shuffle=True,
        )
        times = {k: v / calls for k, v in times.items()}
    worst = max(check["output_rel_diff"], check["state_rel_diff"])
    return {
        "model": case.key,
        "name": case.model,
        "layout": case.layout,
        "mode": mode,
        "input": "x".join(map(str, shape)),
        "compiled": compiled,
        "threads": threads,
        "device": str(device),
        "torch_ms": 1e3 * times["torch"],
        "normlab_ms": 1e3 * times["normlab"],
        "ratio": times["normlab"] / times["torch"],
        "repeats": config.repeats,
        "calls_per_sample": calls,
        "first_call_s_torch": first_call_s["torch"],
        "first_call_s_normlab": first_call_s["normlab"],
        **check,
        "max_rel_diff": worst,
        "agrees": worst <= TOLERANCE,
        "normlab_layers": converted,
        # (graphs, graph breaks) dynamo compiled for each side's two calls; None when eager
        "graphs_torch": graphs["torch"],
        "graphs_normlab": graphs["normlab"],
        "paths": paths,
    }


def _compiled_graphs() -> list[int]:
    """[graphs compiled, graph breaks] since ``counters.clear()``."""
    return [int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))]


def _calls_per_sample(fns, min_sample_s: float, clock) -> int:
    """How many calls make a sample of at least ``min_sample_s`` for the faster side."""
    if min_sample_s <= 0:
        return 1
    fastest = math.inf
    for fn in fns:
        start = clock()
        fn()
        fastest = min(fastest, clock() - start)
    return max(1, math.ceil(min_sample_s / max(fastest, 1e-6)))


def _repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    if calls == 1:
        return fn

    def many():
        for _ in range(calls):
            fn()

    return many


def _dispatch_paths(model: nn.Module, x: torch.Tensor, mode: str) -> dict[str, int]:
    """Which path (kernels, torch native, composed) each norm call took, counted over
    one eager forward of a copy (the timed model's statistics stay untouched)."""
    probe = copy.deepcopy(model)
    with torch.no_grad(), record_dispatch() as log:
        probe(x)
    counts: dict[str, int] = {}
    for _, path, _ in log:
        counts[path] = counts.get(path, 0) + 1
    return counts


def run_model_benchmark(
    config: ModelBenchConfig = ModelBenchConfig(), progress: Callable[[dict], None] | None = None
) -> list[dict]:
    """Every (model, mode, eager/compiled, threads) row of ``config``."""
    rows = []
    with threads_kept():
        for n in config.threads:
            for compiled in config.compiled:
                if compiled and config.compile_last_threads_only and n != config.threads[-1]:
                    continue
                for case in cases(config):
                    for mode in config.modes:
                        start = time.perf_counter()
                        row = run_model_case(case, mode, compiled, n, config)
                        row["row_s"] = time.perf_counter() - start
                        rows.append(row)
                        if progress:
                            progress(row)
    return rows


def summary(rows: list[dict]) -> dict:
    """How many rows meet the goal (normlab no slower than torch.nn) and agree."""
    ratios = [r["ratio"] for r in rows]
    return {
        "rows": len(rows),
        "not_slower_than_torch": sum(r <= 1.0 for r in ratios),
        "median_ratio": statistics.median(ratios) if ratios else float("nan"),
        "max_ratio": max(ratios, default=float("nan")),
        "agree": sum(r["agrees"] for r in rows),
        "tolerance": TOLERANCE,
        "disagreeing": [
            f"{r['model']} {r['mode']} {'compiled' if r['compiled'] else 'eager'} {r['threads']} thr"
            for r in rows
            if not r["agrees"]
        ],
        "max_rel_diff": max((r["max_rel_diff"] for r in rows), default=0.0),
    }
