"""Every bad-input path raises a clear TypeError/ValueError naming expected and received,
and leaves the layer's state as it was."""

from __future__ import annotations

import pytest
import torch

import normlab as nl
import normlab.functional as F


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- wrong rank -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,shape,expected",
    [
        (nl.nn.BatchNorm1d(4), (2, 4, 3, 3), r"2D \(N, C\) or 3D \(N, C, L\).*got a 4D"),
        (nl.nn.BatchNorm2d(4), (2, 4, 3), r"4D \(N, C, H, W\).*got a 3D"),
        (nl.nn.BatchNorm3d(4), (2, 4, 3, 3), r"5D \(N, C, D, H, W\).*got a 4D"),
        (nl.nn.InstanceNorm1d(4), (4,), r"2D \(C, L\) or 3D \(N, C, L\).*got a 1D"),
        (nl.nn.InstanceNorm2d(4), (2, 4, 3, 3, 3), r"got a 5D"),
        (nl.nn.InstanceNorm3d(4), (4, 3, 3), r"got a 3D"),
        (nl.nn.GroupNorm(2, 4), (4,), r"\(N, C, \*spatial\), got a 1D"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else str(v),
)
def test_wrong_rank(layer, shape, expected):
    with pytest.raises(ValueError, match=expected):
        layer(torch.randn(shape))


def test_functional_wrong_rank():
    with pytest.raises(ValueError, match=r"batch_norm expects input of shape \(N, C\).*1D"):
        F.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(ValueError, match=r"instance_norm expects.*at least one spatial dim.*2D"):
        F.instance_norm(torch.randn(5, 3))


# --- channel count ------------------------------------------------------------------------


def test_channel_mismatch_batchnorm():
    layer = nl.nn.BatchNorm2d(4)
    before = _state(layer)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\) expects 4 channels at input dim 1, got 3"):
        layer(torch.randn(2, 3, 5, 5))
    _unchanged(layer, before)


def test_channel_mismatch_instancenorm_raises_with_state_and_warns_without():
    with pytest.raises(ValueError, match="expects 4 channels at input dim 1, got 3"):
        nl.nn.InstanceNorm2d(4, affine=True)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="expects 4 channels at input dim 0, got 3"):
        nl.nn.InstanceNorm2d(4, track_running_stats=True)(torch.randn(3, 5, 5))
    with pytest.warns(UserWarning, match="num_features is unused"):
        nl.nn.InstanceNorm2d(4)(torch.randn(2, 3, 5, 5))


def test_channel_mismatch_groupnorm_and_functional_params():
    with pytest.raises(ValueError, match=r"GroupNorm\(2, 8\) expects 8 channels.*got 6"):
        nl.nn.GroupNorm(2, 8)(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match=r"weight has shape \(5,\) but batch_norm over the 4 channels"):
        F.batch_norm(torch.randn(3, 4), None, None, torch.ones(5), training=True)
    with pytest.raises(ValueError, match=r"running_var has shape \(3,\)"):
        F.batch_norm(torch.randn(3, 4), torch.zeros(4), torch.ones(3), training=True)


# --- groups -------------------------------------------------------------------------------


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r"num_channels \(10\) must be divisible by num_groups \(4\)"):
        nl.nn.GroupNorm(4, 10)
    with pytest.raises(
        ValueError, match=r"num_groups=4 must divide the 10 channels.*divisors of 10 near it: \[5, 2, 1\]"
    ):
        F.group_norm(torch.randn(2, 10, 3), 4)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        F.group_norm(torch.randn(2, 10, 3), 0)


def test_groups_of_a_single_value_are_refused():
    with pytest.raises(ValueError, match="each of the 4 groups holds a single value"):
        nl.nn.GroupNorm(4, 4)(torch.randn(8, 4))


# --- normalized_shape ------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [nl.nn.LayerNorm((4, 5)), nl.nn.RMSNorm((4, 5))], ids=["LayerNorm", "RMSNorm"])
def test_normalized_shape_mismatch(layer):
    with pytest.raises(ValueError, match=r"normalized_shape=\[4, 5\] must equal the trailing dims.*\(2, 5, 4\)"):
        layer(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="trailing dims"):
        layer(torch.randn(5))


def test_normalized_shape_argument_validation():
    with pytest.raises(ValueError, match="at least one dimension"):
        nl.nn.LayerNorm(())
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence"):
        nl.nn.LayerNorm("abc")
    with pytest.raises(ValueError, match="positive int"):
        nl.nn.RMSNorm((3, -1))
    assert nl.nn.RMSNorm((3, 0))(torch.randn(2, 3, 0)).shape == (2, 3, 0)  # empty, as in torch.nn


# --- batch statistics of a single value ------------------------------------------------------


@pytest.mark.parametrize(
    "layer,shape",
    [(nl.nn.BatchNorm1d(4), (1, 4)), (nl.nn.BatchNorm2d(4), (1, 4, 1, 1)), (nl.nn.BatchNorm1d(4), (1, 4, 1))],
    ids=["1d", "2d", "1d-L1"],
)
def test_training_batchnorm_with_one_value_per_channel(layer, shape):
    before = _state(layer)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training.*GroupNorm"):
        layer(torch.randn(shape))
    _unchanged(layer, before)
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape  # eval with running statistics is fine


def test_training_instancenorm_with_one_spatial_element():
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        nl.nn.InstanceNorm2d(4)(torch.randn(2, 4, 1, 1))


# --- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize(
    "layer",
    [nl.nn.BatchNorm2d(3), nl.nn.GroupNorm(1, 3), nl.nn.InstanceNorm2d(3), nl.nn.LayerNorm(4), nl.nn.RMSNorm(4)],
    ids=lambda m: type(m).__name__,
)
def test_integer_and_bool_inputs(layer, dtype):
    x = torch.ones(2, 3, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"floating-point dtype.*got {dtype}.*x.float\(\)"):
        layer(x)


def test_parameter_dtype_must_match_input():
    layer = nl.nn.BatchNorm2d(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but the input has dtype torch.float32"):
        layer(torch.randn(2, 3, 4, 4))
    # float16/bfloat16 input with float32 parameters is mixed precision: allowed.
    assert nl.nn.BatchNorm2d(3)(torch.randn(2, 3, 4, 4).half()).dtype == torch.float16


def test_non_tensor_input():
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        nl.nn.BatchNorm2d(3)([1.0, 2.0])
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        F.layer_norm([1.0, 2.0], (2,))


# --- eps, momentum and the other constructor arguments -----------------------------------------


@pytest.mark.parametrize("eps", [-1e-5, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize(
    "factory",
    [
        lambda eps: nl.nn.BatchNorm2d(3, eps=eps),
        lambda eps: nl.nn.InstanceNorm1d(3, eps=eps),
        lambda eps: nl.nn.GroupNorm(1, 3, eps=eps),
        lambda eps: nl.nn.LayerNorm(3, eps=eps),
        lambda eps: nl.nn.RMSNorm(3, eps=eps),
    ],
    ids=["bn", "in", "gn", "ln", "rms"],
)
def test_eps_must_be_finite_and_not_negative(factory, eps):
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0.*got"):
        factory(eps)
    assert factory(0.0).eps == 0.0  # torch.nn accepts 0, and so does normlab


def test_eps_in_functional_and_of_the_wrong_type():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        F.batch_norm(x, None, None, training=True, eps=-1e-3)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        F.layer_norm(x, (3,), eps=-1.0)
    with pytest.raises(TypeError, match="eps must be a non-negative float, got str"):
        nl.nn.BatchNorm1d(3, eps="1e-5")


@pytest.mark.parametrize("momentum", [-0.1, 1.5, 99.0])
def test_momentum_outside_unit_interval(momentum):
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\].*got"):
        nl.nn.BatchNorm2d(3, momentum=momentum)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
        nl.nn.InstanceNorm2d(3, momentum=momentum, track_running_stats=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
        F.batch_norm(torch.randn(4, 3), rm, rv, training=True, momentum=momentum)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_momentum_changed_after_construction_is_caught_before_any_update():
    layer = nl.nn.BatchNorm1d(3)
    layer.momentum = 2.0
    before = _state(layer)
    with pytest.raises(ValueError, match="momentum must lie"):
        layer(torch.randn(4, 3))
    _unchanged(layer, before)


def test_momentum_type_and_none_in_functional():
    with pytest.raises(TypeError, match="momentum must be a float in"):
        nl.nn.BatchNorm1d(3, momentum="0.1")
    with pytest.raises(TypeError, match="momentum=None .* needs the count of batches"):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)


def test_other_constructor_arguments():
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        nl.nn.BatchNorm2d(0)
    with pytest.raises(TypeError, match="num_features must be a positive int, got float"):
        nl.nn.BatchNorm2d(3.0)
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('skip', 'raise'\), got 'ignore'"):
        nl.nn.BatchNorm2d(3, on_nonfinite="ignore")


def test_running_statistics_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        F.batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(
        ValueError, match="training=False normalizes with running_mean and running_var, but they are None"
    ):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="use_input_stats=False"):
        F.instance_norm(torch.randn(2, 3, 4), use_input_stats=False)
