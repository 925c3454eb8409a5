"""Statistics conventions: momentum vs cumulative average, unbiased vs biased running
variance, Keras/Flax decay, and the guard against non-finite batches."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import core


def _batches(k, shape=(6, 3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (i + 1) + i for i in range(k)]


def _per_channel(x):
    dims = (0,) + tuple(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    return x.mean(dims), x.var(dims, correction=0), n


def test_momentum_none_is_the_cumulative_average_for_batchnorm():
    ours, theirs = nl.nn.BatchNorm2d(3, momentum=None), nn.BatchNorm2d(3, momentum=None)
    batches = _batches(5)
    for x in batches:
        ours(x)
        theirs(x)
    stats = [_per_channel(x) for x in batches]
    expected_mean = torch.stack([m for m, _, _ in stats]).mean(0)
    expected_var = torch.stack([v * n / (n - 1) for _, v, n in stats]).mean(0)
    torch.testing.assert_close(ours.running_mean, expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, expected_var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-5)
    assert ours.num_batches_tracked.item() == 5


def test_momentum_none_updates_instancenorm_where_torch_nn_does_not():
    ours = nl.nn.InstanceNorm2d(3, momentum=None, track_running_stats=True)
    theirs = nn.InstanceNorm2d(3, momentum=None, track_running_stats=True)
    batches = _batches(4)
    for x in batches:
        ours(x)
        theirs(x)
    spatial = 16
    per_batch_mean = torch.stack([x.mean((2, 3)).mean(0) for x in batches])
    per_batch_var = torch.stack([x.var((2, 3), correction=0).mean(0) * spatial / (spatial - 1) for x in batches])
    torch.testing.assert_close(ours.running_mean, per_batch_mean.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, per_batch_var.mean(0), rtol=1e-5, atol=1e-5)
    assert ours.num_batches_tracked.item() == 4
    # The known torch.nn behaviour this replaces: nothing moved.
    assert torch.equal(theirs.running_mean, torch.zeros(3))
    assert torch.equal(theirs.running_var, torch.ones(3))


def test_biased_running_variance_option():
    layer = nl.nn.BatchNorm1d(3, momentum=1.0, unbiased_running_var=False)
    x = torch.randn(10, 3)
    layer(x)
    torch.testing.assert_close(layer.running_var, x.var(0, correction=0))
    layer_unbiased = nl.nn.BatchNorm1d(3, momentum=1.0)
    layer_unbiased(x)
    torch.testing.assert_close(layer_unbiased.running_var, x.var(0, correction=1))


def test_keras_flax_decay_semantics_reproduced_exactly():
    decay = 0.9
    layer = nl.nn.BatchNorm2d(3, momentum=core.momentum_from_decay(decay), unbiased_running_var=False)
    moving_mean, moving_var = torch.zeros(3), torch.ones(3)
    for x in _batches(4):
        layer(x)
        mean, var, _ = _per_channel(x)
        moving_mean = decay * moving_mean + (1 - decay) * mean  # Keras/Flax update
        moving_var = decay * moving_var + (1 - decay) * var
    torch.testing.assert_close(layer.running_mean, moving_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var, moving_var, rtol=1e-6, atol=1e-6)


def test_decay_conversion_round_trip_and_bessel_rescale():
    mean, var = torch.randn(5), torch.rand(5) + 0.5
    converted = core.from_decay_convention(mean, var, 0.99, elements_per_batch=11)
    assert converted.momentum == pytest.approx(0.01)
    torch.testing.assert_close(converted.running_var, var * 11 / 10)
    back = core.to_decay_convention(
        converted.running_mean, converted.running_var, converted.momentum, elements_per_batch=11
    )
    assert back.decay == pytest.approx(0.99)
    torch.testing.assert_close(back.moving_mean, mean)
    torch.testing.assert_close(back.moving_variance, var)
    unchanged = core.from_decay_convention(mean, var, 0.5)
    torch.testing.assert_close(unchanged.running_var, var)
    with pytest.raises(ValueError, match="decay"):
        core.momentum_from_decay(1.5)
    with pytest.raises(ValueError, match="elements_per_batch"):
        core.from_decay_convention(mean, var, 0.9, elements_per_batch=1)


def test_momentum_error_points_at_decay_conversion():
    with pytest.raises(ValueError, match="1 - d"):
        nl.nn.BatchNorm2d(3, momentum=1.5)


# --- non-finite batches ---------------------------------------------------------------


def _poisoned(x, value=float("nan")):
    x = x.clone()
    x[0, 1, 0, 0] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_nonfinite_batch_leaves_running_estimates_untouched(value, momentum):
    layer = nl.nn.BatchNorm2d(3, momentum=momentum)
    good = _batches(3)
    layer(good[0])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="not finite"):
        out = layer(_poisoned(good[1], value))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    # The output is what the batch gives: the poisoned channel is not finite, the
    # others are normalized as usual, so the loss shows the problem.
    assert not torch.isfinite(out[:, 1]).all()
    assert torch.isfinite(out[:, [0, 2]]).all()
    # The next good batch folds in as if the bad one never happened.
    layer(good[2])
    reference = nl.nn.BatchNorm2d(3, momentum=momentum)
    reference(good[0])
    reference(good[2])
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v)


def test_nonfinite_batch_raises_when_asked_and_state_is_unchanged():
    layer = nl.nn.BatchNorm2d(3, on_nonfinite="raise")
    layer(_batches(1)[0])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(core.NonFiniteStatisticsError, match="unchanged"):
        layer(_poisoned(_batches(2)[1]))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_guard_covers_instancenorm_and_functional():
    layer = nl.nn.InstanceNorm2d(3, track_running_stats=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(RuntimeWarning):
        layer(_poisoned(_batches(1)[0]))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.warns(RuntimeWarning):
        nl.functional.batch_norm(_poisoned(_batches(1)[0]), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_torch_nn_is_poisoned_where_normlab_is_not():
    # The known problem this guards against: one bad batch, NaN for good.
    theirs, ours = nn.BatchNorm2d(3), nl.nn.BatchNorm2d(3)
    bad = _poisoned(_batches(1)[0])
    theirs(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours(bad)
    assert torch.isnan(theirs.running_mean).any()
    assert torch.isfinite(ours.running_mean).all()


def test_finite_batches_do_not_warn():
    layer = nl.nn.BatchNorm2d(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in _batches(3):
            layer(x)
