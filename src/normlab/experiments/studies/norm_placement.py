"""norm-placement: where the norm sits in a transformer block, and learning-rate warm-up.

A small transformer encoder reads an MNIST-1D signal (length 40) as tokens — 10 patches of
4 samples, each embedded linearly, plus a learned position embedding — and classifies the
mean of its output tokens. Every block is self-attention and a ReLU feed-forward layer, each
with a residual add, in one of four arrangements:

- ``post``: Post-LN, the original Transformer: ``x = LN(x + F(x))`` after each sublayer;
- ``pre``: Pre-LN: ``x = x + F(LN(x))``, and one LN after the last block;
- ``pre-rms``: the same with RMSNorm (LLaMA and most recent language models);
- ``none``: ``x = x + F(x)``, no norm anywhere.

The norms are ``normlab.nn.LayerNorm`` and ``normlab.nn.RMSNorm``. Weights start Xavier-
uniform with zero biases, the initialization Xiong et al. analyse.

Measured: at initialization, the gradient norm of every block's feed-forward output
weight (W^{2,l} in Xiong et al.'s notation) on a fixed batch; then Adam (β = 0.9, 0.98)
at one learning rate, with a linear warm-up or without, and a cosine decay after it, at
depth 6 and 12.

Xiong et al. (2020), "On Layer Normalization in the Transformer Architecture": at
initialization the gradient of Post-LN's parameters near the output is large — for the
last layer's W^{2,L} it scales as O(d·√(ln d)), independent of depth, against
O(d·√(ln d / L)) for Pre-LN — and grows toward the output layer by layer (their Figure 3),
which is why Post-LN needs a warm-up of the learning rate and Pre-LN trains without one.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ... import nn as nln
from ..data import Dataset, load_mnist1d
from ..output import finite_or_none, pyplot, save_figure
from ..runner import parallel_map
from ..study import Study, StudyResult
from ..training import adam, evaluate, minibatch_losses

NAME = "norm-placement"
CHANCE = math.log(10)  # the training loss of a uniform guess over the 10 classes
PLACEMENTS = ("post", "pre", "pre-rms", "none")
#: Pre-norm with an elementwise squash in place of every norm (the norm-free study's classifier).
SQUASH_PLACEMENTS = ("pre-dyt", "pre-derf")
LABELS = {
    "post": "Post-LN",
    "pre": "Pre-LN",
    "pre-rms": "Pre-RMSNorm",
    "none": "no norm",
    "pre-dyt": "Pre-DyT",
    "pre-derf": "Pre-Derf",
}
TRAINS_BELOW = 0.8  # × ln 10, the loss of a uniform guess over the 10 classes


def _make_norm(placement: str, width: int) -> nn.Module:
    if placement in ("post", "pre"):
        return nln.LayerNorm(width)
    if placement == "pre-rms":
        return nln.RMSNorm(width)
    if placement == "pre-dyt":
        return nln.DyT(width)
    if placement == "pre-derf":
        return nln.Derf(width)
    return nn.Identity()


class SelfAttention(nn.Module):
    """Multi-head self-attention: one projection to queries, keys and values, one out."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width must be a multiple of heads, got width {width} and {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (N, H, T, w/H)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, t, w))


class Block(nn.Module):
    """Self-attention and a feed-forward layer, each with a residual add and ``placement``'s norm."""

    def __init__(self, width: int, heads: int, ffn_width: int, placement: str) -> None:
        super().__init__()
        if placement not in PLACEMENTS + SQUASH_PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS + SQUASH_PLACEMENTS}, got {placement!r}")
        self.placement = placement
        self.attn = SelfAttention(width, heads)
        self.ffn_in = nn.Linear(width, ffn_width)
        self.ffn_out = nn.Linear(ffn_width, width)  # W^{2,l}: the weight Xiong et al.'s theorem is about
        self.norm1 = _make_norm(placement, width)
        self.norm2 = _make_norm(placement, width)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_out(self.ffn_in(x).relu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post":
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.ffn(x))
        # Pre-norm (and no norm, where the norms are identities): the residual stream is never normalized.
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TokenTransformer(nn.Module):
    """A transformer encoder over the patches of a 1-D signal, mean-pooled into a linear head.

    Input (N, 1, length) or (N, length); ``length`` must be a multiple of ``patch``.
    Pre-norm models get a final norm after the last block (their residual stream is
    otherwise never normalized); Post-LN's last block already ends in one. ``"pre-dyt"`` and
    ``"pre-derf"`` are Pre-norm with DyT or Derf (α₀ 0.5) in every norm position.
    """

    def __init__(
        self,
        placement: str = "pre",
        depth: int = 6,
        width: int = 32,
        heads: int = 4,
        ffn_width: int = 64,
        patch: int = 4,
        length: int = 40,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if placement not in PLACEMENTS + SQUASH_PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS + SQUASH_PLACEMENTS}, got {placement!r}")
        if length % patch:
            raise ValueError(f"length must be a multiple of patch, got length {length} and patch {patch}")
        self.patch = patch
        self.embed = nn.Linear(patch, width)
        self.position = nn.Parameter(torch.zeros(length // patch, width))
        self.blocks = nn.ModuleList(Block(width, heads, ffn_width, placement) for _ in range(depth))
        self.final_norm = _make_norm(placement, width) if placement.startswith("pre") else nn.Identity()
        self.head = nn.Linear(width, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1, self.patch)  # (N, tokens, patch)
        x = self.embed(x) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x).mean(1))


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (6, 12)
    placements: tuple[str, ...] = PLACEMENTS
    width: int = 32
    heads: int = 4
    ffn_width: int = 64
    patch: int = 4
    steps: int = 600
    warmup_steps: int = 150
    batch_size: int = 64
    lr: float = 5e-3
    check_every: int = 30
    grad_batch: int = 512  # samples for the gradient at initialization
    seeds: tuple[int, ...] = (0, 1, 2)


def _model(config: Config, placement: str, depth: int, seed: int) -> TokenTransformer:
    torch.manual_seed(seed)
    return TokenTransformer(placement, depth, config.width, config.heads, config.ffn_width, config.patch)


def gradient_at_init(model: TokenTransformer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per block, the gradient norms of the feed-forward output weight W^{2,l} and of all
    the block's parameters, for the cross-entropy of one batch."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    ffn = [b.ffn_out.weight.grad.norm().item() for b in model.blocks]
    block = [math.sqrt(sum(p.grad.pow(2).sum().item() for p in b.parameters())) for b in model.blocks]
    model.zero_grad()
    return {"ffn_out": ffn, "block": block}


def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup_steps to 1 over ``warmup_steps`` (0: none), then a
    cosine decay to 0 at ``steps`` — the same decay with or without warm-up."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


@torch.no_grad()
def _test_loss(model: nn.Module, data: Dataset) -> float:
    model.eval()
    loss = F.cross_entropy(model(data.x_test), data.y_test).item()
    model.train()
    return loss


def one_run(config: Config, placement: str, depth: int, warmup: bool, seed: int) -> dict:
    data = load_mnist1d()
    model = _model(config, placement, depth, seed)
    grads = gradient_at_init(model, data.x_train[: config.grad_batch], data.y_train[: config.grad_batch])
    warmup_steps = config.warmup_steps if warmup else 0
    optimizer = adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.steps, warmup_steps))
    losses = minibatch_losses(
        model, data, optimizer, steps=config.steps, batch_size=config.batch_size, seed=seed, schedule=schedule
    )
    curve, window, diverged = [], [], False
    start = time.perf_counter()
    for step, loss in enumerate(losses):
        if loss is None:
            diverged = True
            break
        window.append(loss)
        if (step + 1) % config.check_every == 0 or step + 1 == config.steps:
            curve.append({"step": step + 1, "train_loss": statistics.fmean(window)})
            window = []
    return {
        "placement": placement,
        "depth": depth,
        "warmup": warmup,
        "seed": seed,
        "grad_ffn_out": grads["ffn_out"],
        "grad_block": grads["block"],
        "curve": curve,
        "diverged": diverged,
        "final_train_loss": None if diverged else curve[-1]["train_loss"],
        "test_loss": None if diverged else finite_or_none(_test_loss(model, data)),
        "test_accuracy": 0.0 if diverged else evaluate(model, data.x_test, data.y_test),
        "seconds": time.perf_counter() - start,
    }


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(max(v, 1e-300)) for v in values))


def _mean_curve(runs: list[dict]) -> tuple[list[int], list[float]]:
    """Mean training loss over seeds at each check; a diverged seed ends its run's curve,
    so the mean stops where the first seed stops."""
    length = min(len(r["curve"]) for r in runs)
    steps = [c["step"] for c in runs[0]["curve"][:length]]
    return steps, [statistics.fmean(r["curve"][i]["train_loss"] for r in runs) for i in range(length)]


def _grad_key(depth: int, placement: str) -> str:
    return f"{LABELS[placement]}, depth {depth}"


def _cell(rows: list[dict], depth: int, placement: str, warmup: bool | None = None) -> list[dict]:
    return [
        r
        for r in rows
        if r["depth"] == depth and r["placement"] == placement and (warmup is None or r["warmup"] == warmup)
    ]


def measure(config: Config, out_dir: Path) -> dict:
    if "post" not in config.placements or "pre" not in config.placements:
        raise ValueError(
            f"placements must include 'post' and 'pre' (the comparison is between them), got {config.placements}"
        )
    # Deepest first, so the pool's last jobs are its shortest.
    tasks = [
        {"config": config, "placement": p, "depth": d, "warmup": w, "seed": s}
        for d in sorted(config.depths, reverse=True)
        for p in config.placements
        for w in (False, True)
        for s in config.seeds
    ]
    rows = parallel_map(one_run, tasks, desc=NAME)
    return {"runs": rows}


def _trains(r: dict) -> bool:
    return not r["diverged"] and r["final_train_loss"] < TRAINS_BELOW * CHANCE


def _final_loss(rows: list[dict], depth: int, placement: str, warmup: bool) -> float:
    """Mean final training loss over seeds; a diverged seed counts as chance level."""
    return statistics.fmean(
        CHANCE if r["diverged"] else r["final_train_loss"] for r in _cell(rows, depth, placement, warmup)
    )


def summarise(config: Config, result: StudyResult) -> None:
    rows = result.data["runs"]
    # Gradient at initialization: the model and batch are the same with or without warm-up.
    grads = {}
    for d in config.depths:
        for p in config.placements:
            mine = _cell(rows, d, p, False)
            per_layer = [_geomean([r["grad_ffn_out"][layer] for r in mine]) for layer in range(d)]
            grads[(d, p)] = per_layer
    result.data["grad_ffn_out_at_init"] = {_grad_key(d, p): g for (d, p), g in grads.items()}
    _tables(config, rows, grads, result)
    _findings(config, rows, grads, result)


def _tables(config: Config, rows: list[dict], grads: dict, result: StudyResult) -> None:
    table = []
    for d in config.depths:
        for p in config.placements:
            row = [str(d), LABELS[p]]
            for warmup in (False, True):
                mine = _cell(rows, d, p, warmup)
                ok = sum(_trains(r) for r in mine)
                acc = statistics.fmean(r["test_accuracy"] for r in mine)
                row += [f"{_final_loss(rows, d, p, warmup):.3f}", f"{100 * acc:.1f}", f"{ok}/{len(mine)}"]
            table.append(row)
    result.table(
        f"After {config.steps} steps of Adam at lr {config.lr:g}: final training loss (mean of the "
        f"last {config.check_every} steps), test accuracy %, seeds that train",
        ["depth", "norm", "loss, no warm-up", "accuracy", "train", "loss, warm-up", "accuracy", "train"],
        table,
        note=f"A run trains if its final training loss is below {TRAINS_BELOW:g} × ln 10 (chance) "
        f"and it did not diverge; a diverged run's loss counts as ln 10. Warm-up: linear over "
        f"{config.warmup_steps} steps; both then decay along a cosine to 0.",
    )
    result.table(
        "Gradient norm of the feed-forward output weight W² at initialization (geometric mean over seeds)",
        ["depth", "norm", "first layer", "last layer", "last / first"],
        [
            [
                str(d),
                LABELS[p],
                f"{grads[(d, p)][0]:.3g}",
                f"{grads[(d, p)][-1]:.3g}",
                f"{grads[(d, p)][-1] / grads[(d, p)][0]:.2f}",
            ]
            for d in config.depths
            for p in config.placements
        ],
    )


def _findings(config: Config, rows: list[dict], grads: dict, result: StudyResult) -> None:
    """The summary lines and the comparison with Xiong et al. (2020)."""
    deep, shallow = max(config.depths), min(config.depths)
    for d in config.depths:
        result.summary.append(
            f"Depth {d}, final training loss without → with warm-up: "
            + ", ".join(
                f"{LABELS[p]} {_final_loss(rows, d, p, False):.2f} → {_final_loss(rows, d, p, True):.2f}"
                for p in config.placements
            )
            + f" (chance {CHANCE:.2f})."
        )
    result.summary.append(
        f"At initialization, last-layer ‖∂L/∂W²‖ at depth {deep}: "
        + ", ".join(f"{LABELS[p]} {grads[(deep, p)][-1]:.3g}" for p in config.placements)
        + "; last/first layer: "
        + ", ".join(f"{LABELS[p]} {grads[(deep, p)][-1] / grads[(deep, p)][0]:.2f}" for p in config.placements)
        + "."
    )

    post_last = {d: grads[(d, "post")][-1] for d in config.depths}
    pre_last = {d: grads[(d, "pre")][-1] for d in config.depths}
    larger = all(post_last[d] > pre_last[d] for d in config.depths)
    post_trend = grads[(deep, "post")][-1] / grads[(deep, "post")][0]
    pre_trend = grads[(deep, "pre")][-1] / grads[(deep, "pre")][0]
    pre_level = 0.5 <= pre_trend <= 2.0  # "about the same across layers": within a factor of 2
    shape = larger and post_trend > 1 and pre_level
    result.compare(
        "At initialization Post-LN's gradients near the output are large; Pre-LN's are not",
        "Xiong et al. (2020), Figure 3 (qualitative): Post-LN's gradient norm of W² grows with the layer index, "
        "Pre-LN's stays about the same across layers; Theorem 1: the last layer's is larger for Post-LN",
        "last layer, Post-LN vs Pre-LN: "
        + ", ".join(f"depth {d}: {post_last[d]:.3g} vs {pre_last[d]:.3g}" for d in config.depths)
        + f"; last/first at depth {deep}: Post-LN {post_trend:.2f}, Pre-LN {pre_trend:.2f}",
        "yes" if shape else "partly" if larger else "no",
        ""
        if shape
        else (
            "Post-LN's last layer is larger, as published, but "
            + (
                f"Pre-LN's falls toward the output (×{pre_trend:.2f} from first to last layer) instead of staying level"
                if not pre_level
                else f"Post-LN's does not grow toward the output (×{post_trend:.2f})"
            )
        )
        if larger
        else "Post-LN's last-layer gradient is not the larger one here",
    )
    if deep > shallow:
        post_ratio, pre_ratio = post_last[deep] / post_last[shallow], pre_last[deep] / pre_last[shallow]
        theory = math.sqrt(shallow / deep)
        pre_close, post_close = abs(pre_ratio / theory - 1) <= 0.25, abs(post_ratio - 1) <= 0.35
        result.compare(
            f"Last-layer gradient from depth {shallow} to {deep}: Post-LN's independent of L, Pre-LN's ∝ 1/√L",
            "Xiong et al. (2020), Theorem 1: ‖∂L/∂W^{2,L}‖ is O(d√(ln d)) for Post-LN and O(d√(ln d / L)) for "
            f"Pre-LN (bounds, so ×1 and ×{theory:.2f} here)",
            f"×{post_ratio:.2f} for Post-LN, ×{pre_ratio:.2f} for Pre-LN",
            "yes" if pre_close and post_close else "partly" if pre_ratio < post_ratio else "no",
            ""
            if pre_close and post_close
            else f"Pre-LN's ×{pre_ratio:.2f} is {'close to' if pre_close else 'not close to'} √({shallow}/{deep}) = "
            f"{theory:.2f}; Post-LN's ×{post_ratio:.2f} {'stays level' if post_close else 'does not stay level'}. "
            "The theorem bounds the size up to constants; it does not say the bound is reached",
        )
    post_no, post_wu = _final_loss(rows, deep, "post", False), _final_loss(rows, deep, "post", True)
    post_fails = [r for r in _cell(rows, deep, "post", False) if not _trains(r)]
    result.compare(
        f"Post-LN needs learning-rate warm-up (depth {deep}, lr {config.lr:g})",
        "Xiong et al. (2020), §3.1 (qualitative here): without warm-up Post-LN trains much worse",
        f"final loss {post_no:.2f} without warm-up vs {post_wu:.2f} with; {len(post_fails)}/{len(config.seeds)} "
        "seeds fail without it",
        "yes" if post_fails and post_no > post_wu + 0.2 else "partly" if post_no > post_wu else "no",
        ""
        if post_fails and post_no > post_wu + 0.2
        else "warm-up helps, but Post-LN also trains without it at this rate"
        if post_no > post_wu
        else "warm-up did not help Post-LN here",
    )
    pre_no, pre_wu = _final_loss(rows, deep, "pre", False), _final_loss(rows, deep, "pre", True)
    pre_all = all(_trains(r) for d in config.depths for r in _cell(rows, d, "pre", False))
    beats = pre_all and pre_no <= post_wu
    warmup_matters = pre_no > pre_wu + 0.1
    result.compare(
        f"Pre-LN trains without warm-up (depth {deep})",
        "Xiong et al. (2020), §4 (qualitative here): Pre-LN without warm-up trains, and reaches "
        "Post-LN-with-warm-up's results faster",
        f"Pre-LN final loss {pre_no:.2f} without warm-up (every seed and depth trains: {'yes' if pre_all else 'no'}), "
        f"{pre_wu:.2f} with; Post-LN with warm-up {post_wu:.2f}",
        "yes" if beats and not warmup_matters else "partly" if pre_all else "no",
        ""
        if beats and not warmup_matters
        else (
            "it trains without warm-up"
            + (" and ends below Post-LN with warm-up" if beats else ", but ends above Post-LN with warm-up")
            + (
                f"; warm-up still lowers its final loss from {pre_no:.2f} to {pre_wu:.2f} here"
                if warmup_matters
                else ""
            )
        )
        if pre_all
        else "some Pre-LN runs fail without warm-up",
    )
    if "none" in config.placements:
        result.summary.append(
            "No norm: "
            + "; ".join(
                f"depth {d}, seeds that train without / with warm-up {sum(_trains(r) for r in _cell(rows, d, 'none', False))}"
                f"/{len(config.seeds)} and {sum(_trains(r) for r in _cell(rows, d, 'none', True))}/{len(config.seeds)}, "
                f"final loss {_final_loss(rows, d, 'none', False):.3g} / {_final_loss(rows, d, 'none', True):.3g}"
                for d in config.depths
            )
            + "."
        )


def render(config: Config, result: StudyResult, out_dir: Path) -> None:
    rows, by_key = result.data["runs"], result.data["grad_ffn_out_at_init"]
    grads = {(d, p): by_key[_grad_key(d, p)] for d in config.depths for p in config.placements}
    plt = pyplot()
    fig, axes = plt.subplots(
        len(config.depths),
        2,
        figsize=(10, 3.6 * len(config.depths)),
        sharey=True,
        squeeze=False,
        constrained_layout=True,
    )
    for row, d in zip(axes, config.depths):
        for ax, warmup in zip(row, (False, True)):
            for p in config.placements:
                steps, loss = _mean_curve(_cell(rows, d, p, warmup))
                ax.plot(steps, loss, label=LABELS[p])
            ax.axhline(CHANCE, color="grey", lw=0.8, ls=":")
            ax.set_ylim(0, 1.3 * CHANCE)  # a run far above chance (no norm, deep) would flatten the rest
            ax.set_title(
                f"depth {d}, " + (f"warm-up {config.warmup_steps} steps" if warmup else "no warm-up"), fontsize=10
            )
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        row[0].set_ylabel("training loss")
    result.figure(
        save_figure(fig, out_dir, "norm-placement-loss"),
        f"Training loss (mean over {len(config.seeds)} seed(s), each point the mean of "
        f"{config.check_every} steps), Adam at lr {config.lr:g}; dotted: chance, ln 10. The axis stops at "
        "1.3 × ln 10: a curve that leaves the top is above it.",
    )

    fig, axes = plt.subplots(
        1, len(config.depths), figsize=(5 * len(config.depths), 3.8), squeeze=False, constrained_layout=True
    )
    for ax, d in zip(axes[0], config.depths):
        for p in config.placements:
            ax.plot(range(1, d + 1), grads[(d, p)], marker="o", label=LABELS[p])
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(f"depth {d}", fontsize=10)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("‖∂L/∂W²‖ at initialization")
    result.figure(
        save_figure(fig, out_dir, "norm-placement-gradients"),
        "Gradient norm of each block's feed-forward output weight at initialization, on "
        f"{config.grad_batch} training samples (geometric mean over seeds) — Xiong et al.'s Figure 3.",
    )


STUDY = Study(
    name=NAME,
    title="Norm placement in a transformer: Post-LN, Pre-LN, Pre-RMSNorm, no norm; with and without warm-up",
    question="Where should the norm sit in a transformer block, and which placements need learning-rate warm-up?",
    measure=measure,
    summarise=summarise,
    render=render,
    settings={
        "smoke": Config(depths=(6, 12), steps=10, warmup_steps=5, check_every=5, grad_batch=256, seeds=(0,)),
        "quick": Config(steps=100, warmup_steps=30, batch_size=32, check_every=10, seeds=(0,)),
        "full": Config(),
    },
)
