"""The activation registry (normlab.core.ACTIVATIONS): each entry's functional form, module,
inverse and parameter agree with torch.nn, and every table that used to be kept by hand —
the fused layers' activation modules, timm's spellings, the in-place check, the
experiments' activations — is read from it. (That the kernels switch on the same codes is
checked in tests/kernels/test_kernel_paths.py, where the kernels are built.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import core
from normlab.core.activation import FUSED_ACTIVATIONS
from normlab.experiments.models import make_activation

C = 5
# a parameter other than the default, to see that it is passed on
OTHER_PARAM = {"leaky_relu": 0.2, "elu": 0.6, "prelu": 0.1}


def _z():
    return torch.randn(4, C, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3


@pytest.mark.parametrize("name", [n for n, a in core.ACTIVATIONS.items() if a.forward is not None])
def test_the_functional_form_is_the_module(name):
    entry = core.ACTIVATIONS[name]
    param = OTHER_PARAM.get(name, entry.default_param)
    module = entry.make_module(param, C).double()
    assert type(module) is entry.module
    prelu_weight = module.weight if entry.per_channel else None
    z = _z()
    torch.testing.assert_close(entry.forward(z, param, prelu_weight), module(z), rtol=0, atol=0)


def test_the_default_parameter_is_torch_nns_and_reaches_the_module():
    for entry in core.ACTIVATIONS.values():
        if entry.param_keyword is None:
            continue
        default = entry.make_module(channels=C)
        if entry.per_channel:  # PReLU: the parameter initializes learnable slopes, one per channel
            assert default.weight.shape == (C,) and torch.all(default.weight == entry.default_param)
            assert torch.equal(default.weight, nn.PReLU(C).weight)
        else:
            value = getattr(default, entry.param_keyword)
            assert value == entry.default_param == getattr(entry.module(), entry.param_keyword)
            assert getattr(entry.make_module(0.3), entry.param_keyword) == 0.3


@pytest.mark.parametrize("name", core.INVERTIBLE_ACTIVATIONS)
def test_inverse_and_derivative_from_the_output(name):
    entry = core.ACTIVATIONS[name]
    param = OTHER_PARAM.get(name, entry.default_param)
    z = _z().requires_grad_()
    y = entry.forward(z, param, None)
    (dz,) = torch.autograd.grad(y.sum(), z)
    torch.testing.assert_close(entry.inverse(y.detach(), param), z.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entry.grad_from_output(y.detach(), param), dz, rtol=1e-12, atol=1e-12)


def test_only_invertible_activations_run_in_place():
    assert core.INVERTIBLE_ACTIVATIONS == ("identity", "leaky_relu", "elu")
    for name in FUSED_ACTIVATIONS:
        if name in core.INVERTIBLE_ACTIVATIONS:
            assert core.check_activation(name, None, inplace=True) == core.ACTIVATIONS[name].default_param
        else:
            with pytest.raises(ValueError, match="needs an invertible one"):
                core.check_activation(name, None, inplace=True)
    with pytest.raises(ValueError, match="leaky_relu's parameter > 0"):
        core.check_activation("leaky_relu", 0.0, inplace=True)


def test_unfused_activations_are_refused_by_the_fused_layers():
    assert set(core.ACTIVATIONS) - set(FUSED_ACTIVATIONS) == {"tanh", "sigmoid", "rrelu"}
    for name in ("tanh", "gelu"):
        with pytest.raises(ValueError, match="activation must be one of"):
            nl.nn.BatchNormAct2d(C, activation=name)
        with pytest.raises(ValueError, match="unknown activation"):
            core.apply_activation(_z(), name, 0.0)


@pytest.mark.parametrize("name", FUSED_ACTIVATIONS)
def test_fused_layers_and_timm_spec_read_the_registry(name):
    entry = core.ACTIVATIONS[name]
    param = OTHER_PARAM.get(name)
    layer = nl.nn.BatchNormAct2d(C, activation=name, activation_param=param)
    assert type(layer.act) is entry.module
    if entry.constant_param:
        assert getattr(layer.act, entry.param_keyword) == param
        assert f"activation_param={param}" in repr(layer)
    # a torch.nn module of that class converts back to the same choice
    spec_param = param if entry.constant_param else None
    assert nl.nn.activation_spec(entry.make_module(param, C)) == (name, spec_param)
    assert nl.nn.activation_spec(entry.module) == (name, None)
    for alias in entry.aliases:
        assert nl.nn.activation_spec(alias.upper())[0] == name


def test_the_experiments_build_their_activations_from_the_registry():
    for name, entry in core.ACTIVATIONS.items():
        module = make_activation(name, C)
        assert type(module) is entry.module
    assert make_activation("prelu", C).num_parameters == C
    with pytest.raises(ValueError, match="activation must be one of"):
        make_activation("gelu", C)
