"""A plain, deterministic training loop for classifiers on in-memory tensors."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .data import Dataset
from .flat_sgd import FlatSGD

__all__ = [
    "StepConfig",
    "adam",
    "TrainConfig",
    "TrainResult",
    "epoch_batches",
    "evaluate",
    "intra_op_threads",
    "minibatch_losses",
    "native_convolution",
    "train_classifier",
    "train_steps",
]


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum and a cosine schedule; lr scales linearly with the batch size."""

    batch_size: int = 32
    epochs: int = 10
    base_lr: float = 0.1  # at batch 32; lr = base_lr · batch_size / 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    threads: int | None = 1  # one thread is faster for these tiny tensors
    #: Training steps at batches up to this size run torch's native convolution, not oneDNN's
    #: (see :func:`native_convolution`); 0: oneDNN's always, torch's default.
    native_conv_max_batch: int = 0

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 32

    @property
    def native_conv(self) -> bool:
        return self.batch_size <= self.native_conv_max_batch


@dataclass
class TrainResult:
    test_accuracy: float
    train_loss: float
    seconds: float
    steps: int
    diverged: bool = False
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Accuracy in eval mode (running statistics for BatchNorm)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(y)


@contextlib.contextmanager
def native_convolution(enabled: bool = True) -> Iterator[None]:
    """Inside the block (when ``enabled``), convolutions on the CPU run torch's native kernels
    instead of oneDNN's; the setting in force before is restored on leaving.

    Why: the studies' CNNs convolve (B, 32, ≤ 40) signals, where oneDNN's per-call set-up
    outweighs its arithmetic at small batches. A training step of the batch-size study's
    CNN, one thread, CPU time (medians of interleaved blocks), native ÷ oneDNN: 0.49–0.62 at
    batch 2–8, 0.74–0.91 at batch 16 (every norm of that study), but 1.31 at batch 32 with
    BatchNorm and 2.8 for a forward pass at batch 500 — so it is a choice by batch size,
    made per training step (:attr:`TrainConfig.native_conv_max_batch`), not for a whole run.
    The two agree to float rounding (outputs and gradients within 6e-7 of their largest
    value at batch 2 and 16), not bit for bit.
    torch's switch is process-wide: set and restored around each step, it never outlives
    the step that asked for it."""
    if not enabled:
        yield
        return
    # set_flags, as torch's own flags() context does: assigning torch.backends.mkldnn.enabled
    # raises once torch.backends.disable_global_flags() has run (torch's test utilities run it
    # on import); only `enabled` is touched (fp32_precision None: left as it is)
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.set_flags(_enabled=False, _fp32_precision=None)
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(_enabled=previous, _fp32_precision=None)


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` (None or 0: left as they are) inside the block."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_classifier(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
    test_every_epoch: bool = True,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``config``; deterministic for a given seed.

    A non-finite loss stops training and marks the result as diverged. Each epoch's record
    in ``history`` (and passed to ``on_epoch``) has its mean training loss and, after every
    epoch or with ``test_every_epoch=False`` only after the last, the test accuracy. A caller
    that reads only the final accuracy saves the other test passes (the model in eval mode
    changes nothing that training reads, so the final numbers are the same either way).
    """
    with intra_op_threads(config.threads):
        return _train(model, data, config, on_epoch, test_every_epoch)


class Optimizer(Protocol):
    """What the training loop calls: a ``torch.optim.Optimizer`` or a :class:`FlatSGD`."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> None: ...


def adam(params: Iterable, *, decoupled: bool = False, **options: object) -> torch.optim.Optimizer:
    """``torch.optim.Adam(params, **options)`` (``AdamW`` when ``decoupled``) on torch's foreach path.

    Why: on the CPU torch defaults to Adam's one-parameter-at-a-time loop (about ten kernel
    calls per parameter per step), which is a sixth of a step of the studies' small
    transformers; the foreach path does each update once over every parameter. Its results
    are the loop's bit for bit (a whole quick run of the norm-free study's language model and
    classifier: every number the same; tests/studies/test_adam_foreach.py checks a few steps)."""
    optimizer = torch.optim.AdamW if decoupled else torch.optim.Adam
    return optimizer(params, foreach=True, **options)


def _sgd(model: nn.Module, config: TrainConfig | StepConfig, lr_factor: Callable[[int], float] | None) -> FlatSGD:
    # torch.optim.SGD's arithmetic bit for bit, on one flat buffer: its step costs more than
    # these models' forward pass (see flat_sgd); lr_factor is the schedule
    return FlatSGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        lr_factor=lr_factor,
    )


def _cosine(total: int) -> Callable[[int], float]:
    """The cosine schedule's factor at each step (what a LambdaLR of it gives)."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def minibatch_losses(
    model: nn.Module,
    data: Dataset,
    optimizer: Optimizer,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    clip_norm: float | None = None,
    native_conv: bool = False,
) -> Iterator[float | None]:
    """The one training loop: ``steps`` SGD steps on minibatches of a fresh random order
    each epoch (the ragged end dropped: BN needs >= 2 samples), yielding each step's loss.
    A non-finite loss yields None and ends the loop before the step is taken. The caller
    may evaluate between steps; the model is put back in training mode before each.
    ``native_conv``: each step (forward, backward, update) under :func:`native_convolution`;
    what the caller does between steps is not."""
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    n = len(data.y_train)
    per_epoch = max(1, n // batch_size)
    modules = list(model.modules())
    x_epoch = y_epoch = data.x_train  # replaced at step 0
    for step in range(steps):
        if step % per_epoch == 0:
            # The epoch's samples gathered in its order once: each step's batch is then a
            # slice (a view), not a gather of its own. The same values, in the same order.
            order = torch.randperm(n, generator=generator)[: per_epoch * batch_size]
            x_epoch, y_epoch = data.x_train[order], data.y_train[order]
        i = step % per_epoch
        if not all(m.training for m in modules):  # model.train() walks every module: only when needed
            model.train()
        batch = slice(i * batch_size, (i + 1) * batch_size)
        # the backend is set for the step only, never across a yield (the caller's code runs there)
        with native_convolution(native_conv):
            loss = loss_fn(model(x_epoch[batch]), y_epoch[batch])
            value = loss.item()  # one read of the loss (a tensor op and a sync fewer than isfinite)
            finite = math.isfinite(value)
            if finite:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
        if not finite:
            yield None
            return
        yield value


def epoch_batches(data: Dataset, batch_size: int, seed: int) -> list[torch.Tensor]:
    """One epoch of training inputs in a seeded random order, the ragged end dropped:
    the batches a BatchNorm model's population statistics are recomputed over."""
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    per_epoch = len(data.y_train) // batch_size
    return [data.x_train[order[i : i + batch_size]] for i in range(0, per_epoch * batch_size, batch_size)]


def _train(model, data, config, on_epoch, test_every_epoch):
    steps_per_epoch = len(data.y_train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the {len(data.y_train)} training samples: "
            "no full batch to train on"
        )
    total = steps_per_epoch * config.epochs
    losses = minibatch_losses(
        model,
        data,
        _sgd(model, config, _cosine(total)),
        steps=total,
        batch_size=config.batch_size,
        seed=config.seed,
        native_conv=config.native_conv,
    )
    start = time.perf_counter()
    history, step, diverged, running, seen = [], 0, False, 0.0, 0
    for loss in losses:
        if loss is None:
            diverged = True
            history.append({"epoch": step // steps_per_epoch + 1, "train_loss": running / max(1, seen)})
            break
        running += loss
        seen += 1
        step += 1
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch - 1
            record = {"epoch": epoch + 1, "train_loss": running / seen}
            if test_every_epoch or step == total:
                record["test_accuracy"] = evaluate(model, data.x_test, data.y_test)
            history.append(record)
            if on_epoch is not None:
                on_epoch(epoch, record)
            running, seen = 0.0, 0
    accuracy = 0.0 if diverged else history[-1]["test_accuracy"]
    return TrainResult(
        test_accuracy=accuracy,
        train_loss=history[-1]["train_loss"] if history else math.nan,
        seconds=time.perf_counter() - start,
        steps=step,
        diverged=diverged,
        history=history,
    )


@dataclass(frozen=True)
class StepConfig:
    """Training by step count (the studies that plot curves): plain SGD with momentum,
    a constant or cosine learning rate, optional gradient-norm clipping."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "cosine"
    clip_norm: float | None = None
    check_every: int = 100  # steps between calls of ``on_check``
    seed: int = 0
    threads: int | None = 1
    native_conv_max_batch: int = 0  # as TrainConfig's

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.steps < 1 or self.batch_size < 1 or self.check_every < 1:
            raise ValueError("steps, batch_size and check_every must be >= 1")

    @property
    def native_conv(self) -> bool:
        return self.batch_size <= self.native_conv_max_batch


def train_steps(
    model: nn.Module,
    data: Dataset,
    config: StepConfig,
    *,
    on_check: Callable[[int, nn.Module], dict] | None = None,
) -> TrainResult:
    """Train for ``config.steps`` minibatch steps (epochs of a fixed random order, the
    ragged end dropped); ``on_check(step, model)`` runs before the first step, every
    ``check_every`` steps and after the last, and its dict goes into ``history`` with the
    step and the mean training loss since the previous check. A non-finite loss stops
    training and marks the result as diverged. Deterministic for a given seed.
    """
    with intra_op_threads(config.threads):
        return _train_steps(model, data, config, on_check)


def _train_steps(model, data, config, on_check):
    optimizer = _sgd(model, config, _cosine(config.steps) if config.schedule == "cosine" else None)
    losses_of_steps = minibatch_losses(
        model,
        data,
        optimizer,
        steps=config.steps,
        batch_size=config.batch_size,
        seed=config.seed,
        clip_norm=config.clip_norm,
        native_conv=config.native_conv,
    )
    history: list[dict] = []

    def check(step: int, losses: list[float]) -> None:
        # None, not NaN, where there is no loss yet: the history goes to JSON as it is.
        record = {"step": step, "train_loss": sum(losses) / len(losses) if losses else None}
        if on_check is not None:
            record.update(on_check(step, model))
        history.append(record)

    start = time.perf_counter()
    model.train()
    check(0, [])
    losses: list[float] = []
    diverged, step = False, 0
    for loss in losses_of_steps:
        if loss is None:
            diverged = True
            break
        losses.append(loss)
        step += 1
        if step % config.check_every == 0 or step == config.steps:
            check(step, losses)
            losses = []
            model.train()  # ``on_check`` may have left it in eval mode
    if diverged:
        history.append({"step": step, "train_loss": None, "diverged": True})
    accuracy = 0.0 if diverged else evaluate(model, data.x_test, data.y_test)
    return TrainResult(
        test_accuracy=accuracy,
        train_loss=math.nan if diverged or history[-1]["train_loss"] is None else history[-1]["train_loss"],
        seconds=time.perf_counter() - start,
        steps=step,
        diverged=diverged,
        history=history,
    )
