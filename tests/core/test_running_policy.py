"""The running-statistics policy (normlab.core.RunningStats): one object per layer, built when
its settings change, reading the layer's buffers at every call — so the tensors updated are
always the ones the layer holds, whoever swapped them in."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import normlab as nl
from normlab import core


def _pair(**kwargs):
    torch.manual_seed(0)
    return nl.nn.BatchNorm2d(3, **kwargs), torch.nn.BatchNorm2d(3, **kwargs)


def _same_buffers(ours, theirs):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-6, atol=1e-7)


def test_a_layer_builds_its_policy_once_and_again_after_a_setting_changes():
    layer = nl.nn.BatchNorm2d(3)
    first = layer._make_running_stats()
    layer(torch.randn(4, 3, 2, 2))
    assert layer.__dict__["_running_stats"] is first  # not rebuilt per call
    layer.momentum = 0.5
    assert "_running_stats" not in layer.__dict__
    before = layer.running_mean.clone()
    x = torch.randn(4, 3, 2, 2) + 3
    layer(x)
    assert layer.__dict__["_running_stats"].momentum == 0.5
    torch.testing.assert_close(layer.running_mean, 0.5 * before + 0.5 * x.mean((0, 2, 3)))


@pytest.mark.parametrize(
    "setting,value,match", [("momentum", 2.0, "momentum must lie"), ("on_nonfinite", "ignore", "on_nonfinite")]
)
def test_a_bad_setting_is_refused_before_anything_is_updated(setting, value, match):
    layer = nl.nn.BatchNorm2d(3)
    setattr(layer, setting, value)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(4, 3, 2, 2))
    assert torch.equal(layer.running_mean, torch.zeros(3)) and int(layer.num_batches_tracked) == 0


def test_buffers_replaced_by_to_and_by_load_state_dict_assign_are_the_ones_updated():
    ours, theirs = _pair()
    ours.double()
    theirs.double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    ours(x)
    theirs(x)
    _same_buffers(ours, theirs)
    state = {k: v.clone() + 1 for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, assign=True)
    theirs.load_state_dict(state, assign=True)
    ours(x)
    theirs(x)
    _same_buffers(ours, theirs)
    assert ours.running_mean is ours._buffers["running_mean"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_call_updates_the_buffers_it_was_given(dtype):
    ours, theirs = _pair(dtype=dtype)
    x = torch.randn(4, 3, 2, 2, dtype=dtype)
    results = []
    for layer in (ours, theirs):
        given = {name: b.clone() for name, b in layer.named_buffers()}
        kept = {name: b.clone() for name, b in layer.named_buffers()}
        functional_call(layer, given, (x,))
        for name, b in layer.named_buffers():  # the layer's own buffers are untouched
            assert torch.equal(b, kept[name]), name
        results.append(given)
    for name in results[1]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0]["running_mean"], ours.running_mean)


def test_a_copy_updates_its_own_buffers():
    layer = nl.nn.BatchNorm2d(3)
    twin = copy.deepcopy(layer)
    twin(torch.randn(4, 3, 2, 2) + 1)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and not torch.equal(twin.running_mean, torch.zeros(3))
    assert twin.__dict__["_running_stats"].buffers is twin._buffers


def test_the_functional_policy_checks_its_arguments():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="momentum=None"):
        core.RunningStats.of(rm, rv, momentum=None)
    with pytest.raises(ValueError, match="on_nonfinite"):
        core.RunningStats.of(rm, rv, on_nonfinite="warn")
    policy = core.RunningStats.of(rm, rv, torch.tensor(0), momentum=None)
    assert policy.momentum is None and policy.skips_nonfinite and policy.running_mean is rm
    assert "RunningStats" in repr(policy)


def test_an_update_where_there_are_too_few_values_changes_nothing():
    rm, rv, counter = torch.zeros(3), torch.ones(3), torch.tensor(0)
    policy = core.RunningStats.of(rm, rv, counter, momentum=0.1)
    policy.update(torch.ones(3), torch.ones(3), 5, enough=torch.tensor(False))
    assert torch.equal(rm, torch.zeros(3)) and int(counter) == 0
    policy.update(torch.ones(3), torch.ones(3), 5, enough=torch.tensor(True))
    torch.testing.assert_close(rm, torch.full((3,), 0.1)) and int(counter) == 1


def test_instance_statistics_are_averaged_over_the_batch():
    rm, rv = torch.zeros(2), torch.ones(2)
    policy = core.RunningStats.of(rm, rv, momentum=1.0, unbiased=False)
    policy.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), torch.tensor([[1.0, 1.0], [3.0, 5.0]]), 4)
    torch.testing.assert_close(rm, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(rv, torch.tensor([2.0, 3.0]))
