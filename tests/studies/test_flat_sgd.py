"""FlatSGD: torch.optim.SGD's results bit for bit, on one flat buffer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from normlab.experiments.flat_sgd import FlatSGD
from normlab.experiments.models import ColumnConvNet, ConvNet1d


def _cosine(total):
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / total))


def _train_pair(model, *, steps, lr, momentum, weight_decay, factor, skip=None, batch=4):
    """The same model trained by torch.optim.SGD (+ LambdaLR) and by FlatSGD; ``skip(step)``
    names parameters whose gradient is dropped at that step (torch then leaves them alone)."""
    ours = copy.deepcopy(model)
    theirs = copy.deepcopy(model)
    sgd = torch.optim.SGD(theirs.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(sgd, factor) if factor else None
    flat = FlatSGD(ours.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, lr_factor=factor)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(batch, 1, 40, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        for net, opt in ((theirs, sgd), (ours, flat)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            for name, p in net.named_parameters():
                if skip and name in skip(step):
                    p.grad = None
            opt.step()
        if schedule is not None:
            schedule.step()
    return ours, theirs


def _assert_same(ours, theirs):
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "momentum, weight_decay, factor",
    [(0.9, 5e-4, _cosine(30)), (0.9, 0.0, None), (0.0, 1e-3, None), (0.0, 0.0, _cosine(30))],
)
def test_bit_identical_to_torch_sgd(momentum, weight_decay, factor):
    torch.manual_seed(0)
    ours, theirs = _train_pair(
        ConvNet1d("batch"), steps=30, lr=0.05, momentum=momentum, weight_decay=weight_decay, factor=factor
    )
    _assert_same(ours, theirs)


def test_bit_identical_with_odd_sized_parameters():
    # FRN's per-channel parameters and the 10-element head bias: lengths off the vector width
    torch.manual_seed(1)
    ours, theirs = _train_pair(ColumnConvNet("frn"), steps=20, lr=0.1, momentum=0.9, weight_decay=5e-4, factor=None)
    _assert_same(ours, theirs)


def test_a_parameter_without_gradient_is_skipped_as_torch_skips_it():
    # step 3: the head's bias gets no gradient (no decay, no momentum for it); later steps go on
    torch.manual_seed(2)
    ours, theirs = _train_pair(
        ConvNet1d("group"),
        steps=8,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        factor=None,
        skip=lambda step: {"11.bias"} if step in (0, 3) else set(),
    )
    _assert_same(ours, theirs)


def test_parameters_keep_their_identity_and_values():
    torch.manual_seed(3)
    model = ConvNet1d("batch")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = {name: p for name, p in model.named_parameters()}
    FlatSGD(model.parameters(), lr=0.1)
    for name, p in model.named_parameters():
        assert p is objects[name] and isinstance(p, nn.Parameter)
        assert torch.equal(p, before[name]) and p.is_contiguous()


def test_frozen_parameters_are_left_out():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    opt = FlatSGD(model.parameters(), lr=0.1, weight_decay=0.5)
    bias = model.bias.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert torch.equal(model.bias, bias)


def test_bad_parameters_are_refused_plainly():
    with pytest.raises(ValueError, match="no parameters that require grad"):
        FlatSGD([], lr=0.1)
    mixed = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, dtype=torch.float64))]
    with pytest.raises(ValueError, match="one dtype and device"):
        FlatSGD(mixed, lr=0.1)
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="twice"):
        FlatSGD([p, p], lr=0.1)


def test_bad_hyperparameters_are_refused_as_torch_refuses_them():
    for bad in ({"lr": -0.1}, {"lr": float("nan")}, {"lr": 0.1, "momentum": -0.5}, {"lr": 0.1, "weight_decay": -1.0}):
        with pytest.raises(ValueError, match=">= 0"):
            FlatSGD([nn.Parameter(torch.ones(2))], **bad)


def test_a_model_moved_after_the_optimizer_is_built_fails_loudly():
    # .double() gives the module new tensors: the flat updates would never reach them
    model = nn.Linear(3, 2)
    opt = FlatSGD(model.parameters(), lr=0.1)
    model.double()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match="moved or recast"):
        opt.step()


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(5, 3, sparse=True)
    opt = FlatSGD(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="dense gradients"):
        opt.step()


def test_the_training_loop_equals_a_plain_torch_loop():
    """train_steps (FlatSGD, the epoch gathered once, train() only when needed) against the loop
    it replaced: torch.optim.SGD + LambdaLR, a gather per step, model.train() every step; the
    checks put the model in eval mode, so train() must still come back."""
    from normlab.experiments.data import Dataset
    from normlab.experiments.training import StepConfig, intra_op_threads, train_steps

    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(50, 1, 40, generator=generator), torch.randint(0, 10, (50,), generator=generator)
    data = Dataset("toy", x, y, x[:10], y[:10])
    config = StepConfig(
        steps=20, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", check_every=7, seed=3
    )
    torch.manual_seed(4)
    model = ConvNet1d("batch")
    reference = copy.deepcopy(model)
    result = train_steps(model, data, config, on_check=lambda step, m: (m.eval(), {})[1])

    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(sgd, _cosine(20))
    order_generator = torch.Generator().manual_seed(3)
    losses, per_epoch = [], 50 // 8
    # train_steps runs on config.threads (1) intra-op threads; the reference must too: a
    # convolution's weight gradient is summed in another order on two threads, so the bits
    # differ on a machine where oneDNN splits these small convolutions
    with intra_op_threads(config.threads):
        for step in range(20):
            if step % per_epoch == 0:
                order = torch.randperm(50, generator=order_generator)
            idx = order[(step % per_epoch) * 8 : (step % per_epoch + 1) * 8]
            reference.train()
            loss = nn.functional.cross_entropy(reference(x[idx]), y[idx])
            losses.append(loss.item())
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
            schedule.step()
            if (step + 1) % 7 == 0:
                reference.eval()
    _assert_same(model, reference)
    assert result.history[-1]["train_loss"] == sum(losses[14:]) / 6
