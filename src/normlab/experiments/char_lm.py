"""A small decoder-only character-level transformer (GPT-style, Pre-norm) and its training
loop: the model of the norm-free and qk-norm studies.

Each block is ``x = x + Attn(norm₁(x)); x = x + MLP(norm₂(x))`` with one more norm before the
output projection, as GPT-2 and nanoGPT. The norm is normlab's ``LayerNorm``, ``RMSNorm``,
``DyT`` or ``Derf`` — or nothing (``"none"``). Attention is causal (torch's fused kernel;
every few training steps the logits are also written out to record the largest); ``qk_norm`` puts a
:class:`normlab.nn.QKNorm` on the queries and keys of every head. Initialization as nanoGPT:
N(0, 0.02²) weights, the two residual projections of each block scaled by 1/√(2·depth), the
output projection tied to the embedding, no biases in the linear layers.

Training: AdamW (β = 0.9, 0.95) with weight decay on the matrices only, a linear warm-up and
a cosine decay to a tenth of the peak rate, gradient norm clipped at 1 — nanoGPT's recipe —
on random windows of the training text.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .. import nn as nln
from .text import TextData, load_text
from .training import adam, intra_op_threads

__all__ = [
    "CURVE_KEYS",
    "LM_NORMS",
    "LOSS_TIE",
    "CharTransformer",
    "LMResult",
    "LMTrainConfig",
    "final_loss",
    "lm_job",
    "lm_record",
    "lm_task",
    "loss_tie",
    "lr_sensitivity",
    "make_row_norm",
    "train_lm",
    "trains",
]

#: The norms of the language model, named as ``surgery.convert_norms`` names its targets
#: where it has them ("rms" is RMSNorm).
LM_NORMS = ("layer", "rms", "dyt", "derf", "none")


def make_row_norm(kind: str, width: int, *, alpha_init: float = 0.5) -> nn.Module:
    """The norm ``kind`` over the last dim of (N, T, width) tokens; ``alpha_init`` is DyT's and
    Derf's initial α."""
    if kind == "layer":
        return nln.LayerNorm(width)
    if kind == "rms":
        return nln.RMSNorm(width)
    if kind == "dyt":
        return nln.DyT(width, alpha_init_value=alpha_init)
    if kind == "derf":
        return nln.Derf(width, alpha_init_value=alpha_init)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {LM_NORMS}, got {kind!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. While ``record_logits`` is set, each call also writes
    out the logits and keeps the largest |logit| (over visible query-key pairs, heads and
    batch) in ``max_logit``; otherwise only the fused kernel runs."""

    def __init__(self, width: int, heads: int, qk_norm: str | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width must be a multiple of heads, got width {width} and {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.qk_norm = nln.QKNorm(self.head_dim, qk_norm) if qk_norm else None
        scale = self.qk_norm.softmax_scale if self.qk_norm is not None else None
        self.scale = 1 / math.sqrt(self.head_dim) if scale is None else scale
        self.record_logits = False
        self.max_logit: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (N, H, T, d)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        if self.record_logits:
            # Wortsman et al. (2023) watch the largest attention logit: when it grows, softmax
            # saturates to one key per query and training becomes unstable.
            with torch.no_grad():
                logits = (q @ k.transpose(-2, -1)) * self.scale  # (N, H, T, T)
                future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                self.max_logit = logits.masked_fill_(future, 0.0).abs_().amax().item()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (N, H, T, d)
        return self.out(y.transpose(1, 2).reshape(n, t, w))


class Block(nn.Module):
    """Pre-norm: ``x + Attn(norm₁(x))``, then ``x + MLP(norm₂(x))``; a 4× GELU MLP."""

    def __init__(self, width: int, heads: int, norm: str, qk_norm: str | None, alpha_init: float) -> None:
        super().__init__()
        self.norm1 = make_row_norm(norm, width, alpha_init=alpha_init)
        self.attn = CausalSelfAttention(width, heads, qk_norm)
        self.norm2 = make_row_norm(norm, width, alpha_init=alpha_init)
        self.mlp_in = nn.Linear(width, 4 * width, bias=False)
        self.mlp_out = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x))))


class CharTransformer(nn.Module):
    """A decoder-only transformer over characters: ids (N, T) → next-character logits (N, T, vocab).

    Args:
        vocab_size: the number of characters.
        norm: one of :data:`LM_NORMS`, used in every block and before the output.
        depth, width, heads, context: blocks, model width, attention heads, longest input.
        qk_norm: None, or a :class:`normlab.nn.QKNorm` kind ("layer", "rms", "l2") for every head.
        alpha_init: DyT's and Derf's initial α.
        embedding_std: the initial std of the (tied) token embedding; nanoGPT's 0.02 by default.
            DyT and Derf pass their input's scale on (no statistics rescale it), so with 0.02
            the first block sees α·x ≈ 0.01 — the norm-free study gives them a larger one.
    """

    def __init__(
        self,
        vocab_size: int,
        norm: str = "layer",
        depth: int = 6,
        width: int = 64,
        heads: int = 4,
        context: int = 64,
        *,
        qk_norm: str | None = None,
        alpha_init: float = 0.5,
        embedding_std: float = 0.02,
    ) -> None:
        super().__init__()
        if norm not in LM_NORMS:
            raise ValueError(f"norm must be one of {LM_NORMS}, got {norm!r}")
        self.context = context
        self.embedding_std = embedding_std
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, norm, qk_norm, alpha_init) for _ in range(depth))
        self.final_norm = make_row_norm(norm, width, alpha_init=alpha_init)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        depth = len(self.blocks)
        nn.init.normal_(self.embed.weight, std=self.embedding_std)
        nn.init.normal_(self.position, std=0.02)
        for block in self.blocks:
            for layer in (block.attn.qkv, block.mlp_in):
                nn.init.normal_(layer.weight, std=0.02)
            for layer in (block.attn.out, block.mlp_out):  # the residual projections
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"input of {t} characters is longer than the context of {self.context}")
        x = self.embed(ids) + self.position[:t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    def record_attention_logits(self, on: bool) -> None:
        """Record (or stop recording) each block's largest |attention logit| in its calls."""
        for block in self.blocks:
            block.attn.record_logits = on

    def max_attention_logit(self) -> list[float | None]:
        """Per block, the largest |attention logit| of the last call that recorded it."""
        return [block.attn.max_logit for block in self.blocks]


#: The character model's size and training recipe at the studies' smoke and quick settings,
#: shared by every study that trains it (norm-free, qk-norm), so that their runs stay comparable.
SMOKE_RECIPE = {
    "width": 32,
    "context": 32,
    "steps": 30,
    "warmup_steps": 5,
    "batch_size": 8,
    "check_every": 10,
    "final_valid_windows": 32,
    "seeds": (0,),
}
QUICK_RECIPE = {
    "width": 32,
    "context": 32,
    "steps": 150,
    "warmup_steps": 15,
    "check_every": 50,
    "final_valid_windows": 256,
    "seeds": (0,),
}


@dataclass(frozen=True)
class LMTrainConfig:
    """nanoGPT's recipe at a CPU's size."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of ``lr``
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float | None = 1.0
    check_every: int = 50
    logit_every: int = 5  # steps between recordings of the largest attention logit
    valid_windows: int = 64  # windows of the validation text scored at each check
    final_valid_windows: int = 512
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.check_every, self.logit_every) < 1:
            raise ValueError("steps, batch_size, check_every and logit_every must be >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} of {self.steps}")


@dataclass
class LMResult:
    final_valid_loss: float | None  # nats per character; None when diverged
    initial_valid_loss: float
    diverged: bool
    steps: int
    seconds: float
    max_attention_logit: float  # the largest over training, all blocks
    history: list[dict] = field(default_factory=list)


def lr_factor(step: int, config: LMTrainConfig) -> float:
    """Linear warm-up from lr/warmup to lr, then a cosine to ``min_lr_ratio``·lr at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _windows(text: torch.Tensor, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(length + 1)
    chunk = text[idx]  # (N, length + 1)
    return chunk[:, :-1], chunk[:, 1:]


def fixed_windows(text: torch.Tensor, count: int, length: int, seed: int = 1234) -> torch.Tensor:
    """``count`` window starts in ``text``, the same for every run that asks with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(text) - length - 1, (count,), generator=generator)


@torch.no_grad()
def validation_loss(model: CharTransformer, text: torch.Tensor, starts: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-character cross-entropy (nats) over the windows starting at ``starts``."""
    was_training = model.training
    model.eval()
    model.record_attention_logits(False)
    total = 0.0
    for i in range(0, len(starts), batch_size):
        x, y = _windows(text, starts[i : i + batch_size], model.context)
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (len(starts) * model.context)


def _optimizer(model: nn.Module, config: LMTrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices (and the tied embedding), none on norms' parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return adam(groups, decoupled=True, lr=config.lr, betas=config.betas)


def train_lm(
    model: CharTransformer,
    data: TextData,
    config: LMTrainConfig,
    *,
    on_check: Callable[[int, CharTransformer], dict] | None = None,
) -> LMResult:
    """Train ``model`` for ``config.steps`` steps on random windows of ``data.train``;
    deterministic for a given seed. Every ``check_every`` steps (and after the last) the history
    gets the mean training loss since the last check, the validation loss on
    ``valid_windows`` fixed windows, the learning rate and, per block, the largest |attention
    logit| recorded (every ``logit_every`` steps) since the last check. A non-finite loss
    stops training and marks the run diverged."""
    with intra_op_threads(config.threads):
        return _train_lm(model, data, config, on_check)


#: Every curve key a run of :func:`lm_job` records; a study keeps those it reads (:func:`lm_record`).
CURVE_KEYS = ("valid_loss", "max_attention_logit")


def lm_task(config, norm: str, lr: float, seed: int, **options: object) -> dict:
    """The arguments of :func:`lm_job` for one run of a character-LM study (norm-free, qk-norm):
    a model of ``config``'s size (``depth``, ``width``, ``heads``, ``context``) with ``norm``,
    trained at peak rate ``lr`` with ``config``'s recipe (``steps``, ``batch_size``,
    ``warmup_steps``, ``check_every``, ``final_valid_windows``); ``options`` are
    :func:`lm_job`'s others. Every argument is explicit, so two studies that ask for the same
    run give equal tasks (``parallel_map(..., share=True)`` then runs it once)."""
    task = {
        "norm": norm,
        "lr": lr,
        "seed": seed,
        **{k: getattr(config, k) for k in ("depth", "width", "heads", "context")},
        **{k: getattr(config, k) for k in ("steps", "batch_size", "warmup_steps", "check_every")},
        "final_valid_windows": config.final_valid_windows,
        "logit_every": LMTrainConfig.logit_every,
        "qk_norm": None,
        "alpha_init": 0.5,
        "embedding_std": 0.02,
    }
    unknown = set(options) - set(task)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    return {**task, **options}


def lm_job(
    *,
    norm: str,
    lr: float,
    seed: int,
    depth: int,
    width: int,
    heads: int,
    context: int,
    steps: int,
    batch_size: int,
    warmup_steps: int,
    check_every: int,
    final_valid_windows: int,
    logit_every: int,
    qk_norm: str | None,
    alpha_init: float,
    embedding_std: float,
) -> dict:
    """One run of :func:`lm_task`'s arguments: the run's numbers and its curve (the step and
    :data:`CURVE_KEYS` of each check)."""
    data = load_text()
    torch.manual_seed(seed)
    model = CharTransformer(
        data.vocab_size,
        norm,
        depth,
        width,
        heads,
        context,
        qk_norm=qk_norm,
        alpha_init=alpha_init,
        embedding_std=embedding_std,
    )
    train = LMTrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        check_every=check_every,
        logit_every=logit_every,
        final_valid_windows=final_valid_windows,
        seed=seed,
    )
    result = train_lm(model, data, train)
    return {
        "final_valid_loss": result.final_valid_loss,
        "initial_valid_loss": result.initial_valid_loss,
        "diverged": result.diverged,
        "steps": result.steps,
        "seconds": result.seconds,
        "max_attention_logit": result.max_attention_logit,
        "curve": [{"step": h["step"], **{key: h.get(key) for key in CURVE_KEYS}} for h in result.history],
    }


def lm_record(run: dict, curve_keys: tuple[str, ...]) -> dict:
    """A study's record of an :func:`lm_job` run: a copy with its curve cut to ``curve_keys``."""
    return {**run, "curve": [{"step": c["step"], **{key: c[key] for key in curve_keys}} for c in run["curve"]]}


def _train_lm(model, data, config, on_check):
    generator = torch.Generator().manual_seed(config.seed)
    check_starts = fixed_windows(data.valid, config.valid_windows, model.context)
    final_starts = fixed_windows(data.valid, config.final_valid_windows, model.context, seed=4321)
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    start = time.perf_counter()
    initial = validation_loss(model, data.valid, check_starts)
    history: list[dict] = [{"step": 0, "train_loss": None, "valid_loss": initial}]
    losses: list[float] = []
    window_max = [0.0] * len(model.blocks)
    overall_max, diverged, step = 0.0, False, 0
    model.train()
    model.record_attention_logits(False)
    for step in range(1, config.steps + 1):
        starts = torch.randint(0, len(data.train) - model.context - 1, (config.batch_size,), generator=generator)
        x, y = _windows(data.train, starts, model.context)
        recording = step % config.logit_every == 0 or step == 1
        model.record_attention_logits(recording)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if recording:
            window_max = [max(a, b) for a, b in zip(window_max, model.max_attention_logit())]
        if not torch.isfinite(loss):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % config.check_every == 0 or step == config.steps:
            record = {
                "step": step,
                "train_loss": sum(losses) / len(losses),
                "valid_loss": validation_loss(model, data.valid, check_starts),
                "lr": optimizer.param_groups[0]["lr"],
                "max_attention_logit": window_max,
            }
            if on_check is not None:
                record.update(on_check(step, model))
            history.append(record)
            overall_max = max([overall_max, *window_max])
            losses, window_max = [], [0.0] * len(model.blocks)
    if diverged:
        overall_max = max([overall_max, *(m for m in window_max if math.isfinite(m))])
        history.append({"step": step, "train_loss": None, "diverged": True, "max_attention_logit": window_max})
    final = None if diverged else validation_loss(model, data.valid, final_starts)
    if final is not None and not math.isfinite(final):
        final, diverged = None, True
    return LMResult(
        final_valid_loss=final,
        initial_valid_loss=initial,
        diverged=diverged,
        steps=step if not diverged else step - 1,
        seconds=time.perf_counter() - start,
        max_attention_logit=overall_max,
        history=history,
    )


# What the studies read from a run's numbers (a run: a dict with ``final_valid_loss``,
# ``initial_valid_loss`` and ``diverged``, as the studies record them).

#: Two final losses closer than this (nats per character) are read as a tie, unless the seeds'
#: own spread is larger: the published gaps between norms are 0.03 of 2.94 (1%).
LOSS_TIE = 0.02


def final_loss(run: dict) -> float:
    """A run's final validation loss; a diverged run's counts as its loss at initialization
    (it ends having learned nothing)."""
    return run["initial_valid_loss"] if run["final_valid_loss"] is None else run["final_valid_loss"]


def trains(run: dict, unigram_loss: float) -> bool:
    """A run trains if it did not diverge and ends below the loss of a model that ignores the
    context (the characters' frequencies alone)."""
    return not run["diverged"] and run["final_valid_loss"] is not None and run["final_valid_loss"] < unigram_loss


def lr_sensitivity(losses_by_lr: dict[float, float], initial: float) -> float:
    """Wortsman et al. (2023)'s learning-rate sensitivity: the mean over the rates of
    min(loss, loss at initialization) − the best loss over the rates. 0: flat."""
    capped = [min(v, initial) for v in losses_by_lr.values()]
    return statistics.fmean(capped) - min(capped)


def loss_tie(*cells: tuple[float, float]) -> float:
    """The difference read as a tie between (mean, sd) cells: LOSS_TIE, or twice the largest sd."""
    return max([LOSS_TIE] + [2 * sd for _, sd in cells if math.isfinite(sd)])
