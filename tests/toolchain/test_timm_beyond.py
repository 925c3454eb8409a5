"""normlab's norms beyond the classic five against timm's classes: state dicts load both ways,
and values, every gradient and the running statistics agree within float32 rounding — judged
against the float64 result, which both must approach."""

from __future__ import annotations

import copy
import importlib.util
from functools import partial

import pytest
import torch
from helpers import import_timm
from torch import nn

import normlab as nl

if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed", allow_module_level=True)

timm = import_timm()
L = timm.layers

#: (normlab layer, timm layer) built with the same arguments, and the input shape.
PAIRS = {
    "StdConv2d": (lambda: nl.nn.StdConv2d(8, 6, 3, eps=1e-8), lambda: L.StdConv2d(8, 6, 3, eps=1e-8), (2, 8, 7, 7)),
    "StdConv2dSame": (
        lambda: nl.nn.StdConv2d(8, 6, 3, stride=2, padding="same"),
        lambda: L.StdConv2dSame(8, 6, 3, stride=2),
        (2, 8, 8, 7),
    ),
    "ScaledStdConv2d": (
        lambda: nl.nn.ScaledStdConv2d(8, 6, 3, gamma=1.7, gain_init=0.8),
        lambda: L.ScaledStdConv2d(8, 6, 3, gamma=1.7, gain_init=0.8),
        (2, 8, 7, 7),
    ),
    "ScaledStdConv2dSame": (
        lambda: nl.nn.ScaledStdConv2d(8, 6, 4, stride=2, padding="same"),
        lambda: L.ScaledStdConv2dSame(8, 6, 4, stride=2),
        (2, 8, 9, 9),
    ),
    "FilterResponseNormTlu2d": (
        lambda: nl.nn.FilterResponseNormTlu2d(8),
        lambda: L.FilterResponseNormTlu2d(8),
        (3, 8, 5, 4),
    ),
    "FilterResponseNormAct2d": (
        lambda: nl.nn.FilterResponseNormAct2d(8, act_layer=nn.SiLU),
        lambda: L.FilterResponseNormAct2d(8, act_layer=nn.SiLU),
        (3, 8, 5, 4),
    ),
    "EvoNormB0": (lambda: nl.nn.EvoNormB0(8, momentum=0.2), lambda: L.EvoNorm2dB0(8, momentum=0.2), (3, 8, 5, 4)),
    "EvoNormB1": (lambda: nl.nn.EvoNormB1(8), lambda: L.EvoNorm2dB1(8), (3, 8, 5, 4)),
    "EvoNormB2": (lambda: nl.nn.EvoNormB2(8), lambda: L.EvoNorm2dB2(8), (3, 8, 5, 4)),
    "EvoNormB0-noact": (
        lambda: nl.nn.EvoNormB0(8, apply_act=False),
        lambda: L.EvoNorm2dB0(8, apply_act=False),
        (3, 8, 5, 4),
    ),
    "EvoNormS0": (lambda: nl.nn.EvoNormS0(8, groups=4), lambda: L.EvoNorm2dS0(8, groups=4), (3, 8, 5, 4)),
    "EvoNormS0a": (lambda: nl.nn.EvoNormS0a(8, group_size=4), lambda: L.EvoNorm2dS0a(8, group_size=4), (3, 8, 5, 4)),
    "EvoNormS0a-noact": (
        lambda: nl.nn.EvoNormS0a(8, group_size=4, apply_act=False),
        lambda: L.EvoNorm2dS0a(8, group_size=4, apply_act=False),
        (3, 8, 5, 4),
    ),
    "EvoNormS1": (lambda: nl.nn.EvoNormS1(8, groups=2), lambda: L.EvoNorm2dS1(8, groups=2), (3, 8, 5, 4)),
    "EvoNormS1a": (
        lambda: nl.nn.EvoNormS1a(8, groups=2, act_layer=nn.ReLU),
        lambda: L.EvoNorm2dS1a(8, groups=2, act_layer=nn.ReLU),
        (3, 8, 5, 4),
    ),
    "EvoNormS2": (lambda: nl.nn.EvoNormS2(8, groups=2), lambda: L.EvoNorm2dS2(8, groups=2), (3, 8, 5, 4)),
    "EvoNormS2a": (lambda: nl.nn.EvoNormS2a(8, groups=2), lambda: L.EvoNorm2dS2a(8, groups=2), (3, 8, 5, 4)),
    "GroupNormAct": (
        lambda: nl.nn.GroupNormAct(4, 8, activation="silu"),
        lambda: L.GroupNormAct(8, num_groups=4, act_layer=nn.SiLU),
        (3, 8, 5, 4),
    ),
}


def _randomized(make, seed=0):
    torch.manual_seed(seed)
    module = make()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name == "running_var":
                b.uniform_(0.5, 2.0)
    return module


def _step(module, x, dy, training):
    """Output, input gradient, parameter gradients and buffers after one call."""
    module.train(training)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return [y, x.grad] + [p.grad for p in module.parameters()] + list(module.buffers())


def _error(a, b):
    """Largest difference relative to the reference's largest magnitude (at least 1)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_values_gradients_and_statistics_match_timm_within_float32_rounding(name, training):
    make_ours, make_timm, shape = PAIRS[name]
    ours = _randomized(make_ours)
    theirs = make_timm()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    exact = copy.deepcopy(theirs).double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2
    out_shape = copy.deepcopy(theirs).eval()(x).shape
    dy = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))
    results = {
        "ours": _step(ours, x, dy, training),
        "timm": _step(theirs, x, dy, training),
    }
    reference = _step(exact, x.double(), dy.double(), training)
    for i, (a, b, e) in enumerate(zip(results["ours"], results["timm"], reference)):
        ours_error, timm_error, between = _error(a, e), _error(b, e), _error(a, b)
        # float32 rounding: both near float64, and near each other, at a few ulps of the output scale
        assert ours_error <= max(4 * timm_error, 2e-6), (name, i, ours_error, timm_error)
        assert between <= max(4 * timm_error, 2e-6) + ours_error, (name, i, between)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_state_dicts_load_both_ways_bit_for_bit(name):
    make_ours, make_timm, _ = PAIRS[name]
    ours, theirs = _randomized(make_ours), _randomized(make_timm, seed=1)
    assert list(ours.state_dict()) == list(theirs.state_dict()) or set(ours.state_dict()) == set(theirs.state_dict())
    for src, dst in ((ours, make_timm()), (theirs, make_ours())):
        dst.load_state_dict(src.state_dict(), strict=True)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k
            assert dst.state_dict()[k].shape == v.shape


def test_timm_resnetv2_takes_normlab_std_conv_and_group_norm_act_by_function():
    """``conv_layer=`` takes the class; timm's norm-act lookup passes a function through as is
    (``create_model("resnetv2_50x1_bit")`` fixes its own conv_layer, so BiT is built directly)."""
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    kwargs = dict(layers=[1, 1, 1, 1], num_classes=10, stem_type="fixed")
    model = ResNetV2(
        conv_layer=partial(nl.nn.StdConv2d, eps=1e-8), norm_layer=nl.nn.timm_norm_act("relu", num_groups=32), **kwargs
    )
    kinds = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("normlab")}
    assert kinds == {"StdConv2d", "GroupNormAct"}
    assert all(
        m.num_groups == 32 and m.activation == "relu" for m in model.modules() if isinstance(m, nl.nn.GroupNormAct)
    )
    reference = ResNetV2(conv_layer=partial(L.StdConv2d, eps=1e-8), **kwargs)
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_partial_of_group_norm_act_is_refused_by_timm_and_the_function_is_the_way():
    """timm drops a partial's positional arguments and matches classes by identity or name: a
    class it does not know raises, whichever library it comes from."""
    from timm.layers import get_norm_act_layer

    with pytest.raises(AssertionError, match="groupnormact"):
        get_norm_act_layer(partial(nl.nn.GroupNormAct, 32), act_layer=nn.ReLU)
    layer = get_norm_act_layer(nl.nn.timm_norm_act("relu", num_groups=32), act_layer=nn.ReLU)(64, apply_act=False)
    assert isinstance(layer, nl.nn.GroupNormAct) and layer.num_groups == 32 and layer.activation == "identity"
