"""Activation checkpointing: the running estimates are updated once per real step.

``torch.utils.checkpoint`` runs a segment's forward a second time inside backward. torch.nn's
BatchNorm merges that recompute in as a second batch (6 updates over 3 steps); normlab merges
each step's batch once, whatever follows the norm in the segment and in both reentrant modes
(docs/conventions.md). Outputs and gradients equal the un-checkpointed run's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import normlab as nl

STEPS = 3


def _segment(shape: str) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    return {
        "BN": lambda: nl.nn.BatchNorm2d(4),
        "Conv-BN": lambda: nn.Sequential(conv, nl.nn.BatchNorm2d(4)),
        "BN-ReLU": lambda: nn.Sequential(nl.nn.BatchNorm2d(4), nn.ReLU()),
        "BatchNormAct2d": lambda: nl.nn.BatchNormAct2d(4, activation="leaky_relu"),
        "Conv-BatchNormAct2d-inplace": lambda: nn.Sequential(
            conv, nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True)
        ),
        "GroupNormAct": lambda: nn.Sequential(conv, nl.nn.GroupNormAct(2, 4)),
        "InstanceNorm-tracking": lambda: nl.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        "BN-cumulative": lambda: nn.Sequential(nl.nn.BatchNorm2d(4, momentum=None), nn.ReLU()),
        # the newer norms with running estimates of their own update them once per step too
        "Conv-EvoNormB0": lambda: nn.Sequential(conv, nl.nn.EvoNormB0(4)),
        "Conv-SwitchableNorm2d": lambda: nn.Sequential(conv, nl.nn.SwitchableNorm2d(4)),
    }[shape]()


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nl.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, mask=x[:, 0] > -1.0)


def _run(module: nn.Module, reentrant: bool | None):
    torch.manual_seed(1)
    outputs, grads = [], []
    for _ in range(STEPS):
        x = torch.randn(3, 4, 5, 5, requires_grad=True)
        y = module(x) if reentrant is None else checkpoint(module, x, use_reentrant=reentrant)
        (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()
        outputs.append(y.detach())
        grads.append(x.grad)
    return outputs, grads, {k: v.clone() for k, v in module.state_dict().items()}, module


SHAPES = [
    "BN",
    "Conv-BN",
    "BN-ReLU",
    "BatchNormAct2d",
    "Conv-BatchNormAct2d-inplace",
    "GroupNormAct",
    "InstanceNorm-tracking",
    "BN-cumulative",
    "Conv-EvoNormB0",
    "Conv-SwitchableNorm2d",
    "masked",
]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("shape", SHAPES)
def test_checkpointed_segment_updates_once_per_step_and_matches_the_plain_run(shape, reentrant):
    make = _Masked if shape == "masked" else (lambda: _segment(shape))
    plain_y, plain_g, plain_state, _ = _run(make(), None)
    ckpt_y, ckpt_g, ckpt_state, module = _run(make(), reentrant)
    for a, b in zip(ckpt_y + ckpt_g, plain_y + plain_g):
        torch.testing.assert_close(a, b)
    assert ckpt_state.keys() == plain_state.keys()
    for key in plain_state:
        torch.testing.assert_close(ckpt_state[key], plain_state[key], msg=key)
    counters = [v for k, v in ckpt_state.items() if k.endswith("num_batches_tracked")]
    if shape not in ("GroupNormAct", "Conv-EvoNormB0"):  # EvoNorm keeps no counter (timm's state dict)
        assert counters and all(int(c) == STEPS for c in counters)
    for p_ckpt, p_plain in zip(module.parameters(), make().parameters()):
        assert p_ckpt.grad is not None and p_ckpt.shape == p_plain.shape


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_torch_nn_counts_the_recompute_as_a_second_batch(reentrant):
    """The deliberate difference, pinned: torch.nn's BatchNorm updates twice per step."""
    torch.manual_seed(0)
    ours, theirs = nl.nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    for _ in range(STEPS):
        x = torch.randn(3, 4, 5, 5, requires_grad=True)
        for layer in (ours, theirs):
            checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    assert int(ours.num_batches_tracked) == STEPS
    assert int(theirs.num_batches_tracked) == 2 * STEPS


def test_a_forward_outside_backward_still_updates():
    """The recompute test reads autograd's state, not a flag left behind by a backward."""
    layer = nl.nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    layer(x)
    with torch.no_grad():
        layer(x)
    assert int(layer.num_batches_tracked) == 3


def test_batch_renorm_recompute_reads_the_updated_estimates():
    """The documented exception (conventions.md): BatchRenorm's r and d read the running
    estimates, which the step's first forward already updated, so a checkpointed BatchRenorm's
    gradients differ from the plain run's while its estimates are updated once per step."""
    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        layer, grads = nl.nn.BatchRenorm2d(4), []
        for _ in range(STEPS):
            x = (torch.randn(3, 4, 5, 5) * 3 + 1).requires_grad_()
            y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
            (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()
            grads.append(x.grad)
        results.append((grads, layer.running_mean.clone(), int(layer.num_batches_tracked)))
    (plain, plain_mean, plain_count), (ckpt, ckpt_mean, ckpt_count) = results
    torch.testing.assert_close(ckpt_mean, plain_mean)
    assert ckpt_count == plain_count == STEPS
    assert (ckpt[-1] - plain[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    "dtype, backend", [(torch.float64, "auto"), (torch.float32, "native")], ids=["float64", "native"]
)
def test_checkpointed_batchnorm_on_torchs_ops_recomputes_the_same_and_updates_once(dtype, backend, use_reentrant):
    """torch's ops (float64, CUDA, a forced native backend) take the same route in the
    recompute as in the forward — non-reentrant checkpointing compares the saved tensors — and
    merge the batch once."""
    torch.manual_seed(0)
    layer, reference = nl.nn.BatchNorm2d(4).to(dtype), torch.nn.BatchNorm2d(4).to(dtype)
    for _ in range(3):
        x = torch.randn(6, 4, 5, 5, dtype=dtype, requires_grad=True)
        with nl.core.use_backend(backend):
            checkpoint(layer, x, use_reentrant=use_reentrant).sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        reference(x_ref).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert int(layer.num_batches_tracked) == 3
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def _forward(layer: nn.Module) -> None:
    layer(torch.randn(3, 4, 5, 5))


def _in_a_tensor_hook(layer: nn.Module) -> None:
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    y = x * 2
    y.register_hook(lambda grad: _forward(layer))
    y.sum().backward()


def _in_a_module_backward_hook(layer: nn.Module) -> None:
    conv = nn.Conv2d(4, 4, 1)
    conv.register_full_backward_hook(lambda module, grad_in, grad_out: _forward(layer))
    conv(torch.randn(3, 4, 5, 5, requires_grad=True)).sum().backward()


def _gradient_penalty_in_a_hook(layer: nn.Module) -> None:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # a backward runs its hooks with grad mode off
            z = torch.randn(3, 4, 5, 5, requires_grad=True)
            (grad_z,) = torch.autograd.grad(layer(z).pow(2).sum(), z, create_graph=True)
        return grad + 0 * grad_z.sum()

    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    y = x * 2
    y.register_hook(hook)
    y.sum().backward()


def _in_a_function_backward(layer: nn.Module) -> None:
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            layer(torch.randn(3, 4, 5, 5))
            return grad * 2

    Twice.apply(torch.randn(3, 4, 5, 5, requires_grad=True)).sum().backward()


def _in_a_hook_inside_a_checkpointed_segment(layer: nn.Module) -> None:
    def segment(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y.register_hook(lambda grad: _forward(layer))
        return y

    checkpoint(segment, torch.randn(3, 4, 5, 5, requires_grad=True), use_reentrant=False).sum().backward()


@pytest.mark.parametrize(
    "run_during_backward",
    [
        _in_a_tensor_hook,
        _in_a_module_backward_hook,
        _gradient_penalty_in_a_hook,
        _in_a_function_backward,
        _in_a_hook_inside_a_checkpointed_segment,
    ],
    ids=["tensor-hook", "module-backward-hook", "gradient-penalty", "function-backward", "hook-in-segment"],
)
def test_a_forward_run_during_a_backward_that_is_no_recompute_updates_as_torch_nn(run_during_backward):
    """Only checkpointing's recompute is the step's batch seen again: a BatchNorm called in a
    backward hook or an autograd Function's backward sees a batch of its own, and torch.nn's
    updates its estimates there (before, normlab took any call during a backward for a recompute)."""
    layers = []
    for make in (nl.nn.BatchNorm2d, nn.BatchNorm2d):
        torch.manual_seed(0)
        layer = make(4)
        for _ in range(2):
            run_during_backward(layer)
        layers.append(layer)
    ours, theirs = layers
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the inner one in the outer forward
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_nested_checkpoints_update_once_per_step(reentrant):
    """A checkpoint inside a checkpointed segment: the outer recompute runs the inner segment's
    forward again, and the inner backward recomputes it once more (torch.nn's inner BatchNorm
    counts 3 batches per step with reentrant checkpoints, 2 without); normlab's each count one."""
    outer_norm, inner_norm = nl.nn.BatchNorm2d(4), nl.nn.BatchNorm2d(4)

    def outer(x: torch.Tensor) -> torch.Tensor:
        return checkpoint(inner_norm, outer_norm(x), use_reentrant=reentrant)

    for _ in range(STEPS):
        checkpoint(outer, torch.randn(3, 4, 5, 5, requires_grad=True), use_reentrant=reentrant).sum().backward()
    assert int(outer_norm.num_batches_tracked) == int(inner_norm.num_batches_tracked) == STEPS


@pytest.mark.parametrize(
    "make",
    [
        lambda: nl.nn.InstanceNorm2d(4, track_running_stats=True),
        lambda: nl.nn.EvoNormB0(4),
        lambda: nl.nn.SwitchableNorm2d(4),
        lambda: nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True),
    ],
    ids=["InstanceNorm-tracking", "EvoNormB0", "SwitchableNorm2d", "BatchNormAct2d-inplace"],
)
def test_the_other_norms_with_estimates_update_in_a_backward_hook_as_outside(make):
    """The layers that ask the same recompute test: a call in a hook is an ordinary batch."""
    torch.manual_seed(0)
    in_hook, outside = make(), make()
    _in_a_tensor_hook(in_hook)
    torch.manual_seed(0)
    torch.randn(3, 4, 5, 5)  # the hook's input is drawn after x
    _forward(outside)
    for (key, ours), theirs in zip(in_hook.state_dict().items(), outside.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=key)
    assert any(key.startswith("running") for key in in_hook.state_dict())
