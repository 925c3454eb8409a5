"""timm models with normlab layers: built through ``norm_layer=``, or converted after
building with ``surgery.from_torch``. Needs timm (and torchvision beside torch)."""

from __future__ import annotations

import collections
import importlib.util

import pytest
import torch
from helpers import import_timm
from torch import nn

import normlab as nl
from normlab import surgery

if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed", allow_module_level=True)

timm = import_timm()


def _norm_counts(model):
    return collections.Counter(
        f"{type(m).__module__.split('.')[0]}.{type(m).__name__}"
        + (f"/{m.activation}" if hasattr(m, "activation") else "")
        for m in model.modules()
        if nl.nn.is_norm_layer(m)
    )


def _compare(ours, reference, x, tol):
    """Same weights, same input: outputs in train and eval, and the running statistics."""
    missing = reference.load_state_dict(ours.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    for training in (True, False):
        ours.train(training)
        reference.train(training)
        torch.testing.assert_close(ours(x), reference(x), rtol=tol, atol=tol)
    # Statistics over few elements are ill-conditioned (two near-equal values normalize to ±1
    # whatever their difference): inputs below leave each deep BatchNorm 8 or more per channel.
    for (k, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def _backward(model, x):
    model.train()
    model.zero_grad()
    model(x).square().mean().backward()
    grads = [p.grad for m in model.modules() if nl.nn.is_norm_layer(m) for p in m.parameters(recurse=False)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_resnet_takes_normlab_batchnorm_directly():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", norm_layer=nl.nn.BatchNorm2d, num_classes=10)
    assert _norm_counts(model) == {"normlab.BatchNorm2d": 20}
    x = torch.randn(2, 3, 32, 32)
    _compare(model, timm.create_model("resnet18", num_classes=10), x, 1e-4)
    _backward(model, x)


@pytest.mark.parametrize(
    "name, activation, counts",
    [
        ("efficientnet_b0", "silu", {"normlab.BatchNormAct2d/silu": 33, "normlab.BatchNormAct2d/identity": 16}),
        ("regnetx_002", "relu", {"normlab.BatchNormAct2d/relu": 27, "normlab.BatchNormAct2d/identity": 17}),
    ],
)
def test_norm_act_models_take_the_adapter(name, activation, counts):
    # The class alone is swapped for timm's own layer (matched by name): that is why the adapter exists.
    silently = timm.create_model(name, norm_layer=nl.nn.BatchNorm2d, num_classes=10)
    assert "normlab" not in " ".join(_norm_counts(silently))
    torch.manual_seed(0)
    model = timm.create_model(name, norm_layer=nl.nn.timm_norm_act(activation), num_classes=10)
    assert _norm_counts(model) == counts
    x = torch.randn(2, 3, 64, 64)
    _compare(model, timm.create_model(name, num_classes=10), x, 1e-4)
    _backward(model, x)


def test_vit_takes_normlab_layernorm():
    kwargs = dict(img_size=32, patch_size=8, num_classes=10)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", norm_layer=nl.nn.LayerNorm, **kwargs)
    assert _norm_counts(model) == {"normlab.LayerNorm": 25}
    x = torch.randn(2, 3, 32, 32)
    _compare(model, timm.create_model("vit_tiny_patch16_224", norm_layer=nn.LayerNorm, **kwargs), x, 1e-4)
    _backward(model, x)


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnetx_002"])
def test_from_torch_converts_timm_norm_act_and_back(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    with torch.no_grad():
        model.train()
        model(torch.randn(4, 3, 32, 32))  # running statistics away from their defaults
    ours, report = surgery.from_torch(model)
    timm_layers = [p for p, m in model.named_modules() if type(m).__name__ == "BatchNormAct2d"]
    assert sorted(c.path for c in report.changes) == sorted(timm_layers) and not report.skipped
    assert "timm" not in " ".join(_norm_counts(ours))
    for path in timm_layers:  # the same activation, layer by layer
        act = model.get_submodule(path).act
        assert ours.get_submodule(path).activation == nl.nn.activation_spec(act)[0], path
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-4, atol=1e-5)
    again, report = surgery.from_torch(ours)
    assert not report.changes and not report.skipped
    _, report = surgery.to_torch(ours)
    assert len(report.skipped) == len(timm_layers) and not report.changes
    assert all("fused norm+activation" in s.reason for s in report.skipped)


def test_from_torch_on_timm_and_torchvision_layers():
    from timm.layers import EvoNorm2dB0, FrozenBatchNormAct2d, LayerNorm, LayerNorm2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(frozen, name).normal_()
        frozen.running_var.uniform_(0.5, 2)
    model = nn.Sequential(
        frozen,
        LayerNorm2d(4),
        EvoNorm2dB0(4),
        FrozenBatchNormAct2d(4),
        nn.Flatten(),
        LayerNorm(4 * 3 * 3),
        timm.layers.BatchNormAct2d(4, act_layer=nn.GELU).eval(),
    )
    ours, report = surgery.from_torch(model[:6])
    assert {c.path: c.after for c in report.changes} == {
        "0": "normlab.nn.FrozenBatchNorm2d",
        "1": "normlab.nn.LayerNorm2d",
        "2": "normlab.nn.EvoNormB0",
        "5": "normlab.nn.LayerNorm",
    }
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == {"3"}
    assert "FrozenBatchNormAct2d" in skipped["3"]
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours[0](x), model[0](x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), model[:6](x), rtol=1e-5, atol=1e-5)
    _, report = surgery.from_torch(model[6:])
    assert "GELU has no fused normlab form" in report.skipped[0].reason


def test_convnext_takes_normlab_layernorm2d_directly():
    # with a norm_layer given, timm's ConvNeXt needs conv_mlp=True: every norm is channels-first
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "conv_mlp": True, "norm_eps": 1e-6}
    model = timm.create_model("convnext_atto", norm_layer=nl.nn.LayerNorm2d, **kwargs)
    counts = _norm_counts(model)
    assert set(counts) == {"normlab.LayerNorm2d"} and counts["normlab.LayerNorm2d"] > 10
    reference = timm.create_model("convnext_atto", norm_layer=timm.layers.LayerNorm2d, **kwargs)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
        _compare(model, reference, x, 1e-4)
    _backward(model, x)


def test_from_torch_converts_convnext_layernorm2d():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):  # γ, β away from 1, 0
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    timm_2d = [p for p, m in model.named_modules() if type(m).__name__ == "LayerNorm2d"]
    assert timm_2d
    ours, report = surgery.from_torch(model)
    changed = {c.path: c.after for c in report.changes}
    assert all(changed[p] == "normlab.nn.LayerNorm2d" for p in timm_2d) and not report.skipped
    assert "timm" not in " ".join(_norm_counts(ours))
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-4, atol=1e-4)


def test_freeze_norms_freezes_timm_batchnormact_and_unfreeze_gives_it_back():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=10)
    with torch.no_grad():
        model.train()
        model(torch.randn(4, 3, 32, 32))
    timm_layers = [p for p, m in model.named_modules() if type(m).__name__ == "BatchNormAct2d"]
    frozen, report = surgery.freeze_norms(model)
    assert sorted(c.path for c in report.changes) == sorted(timm_layers) and not report.skipped
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()  # the call that undoes the usual bn.eval() recipe
    with torch.no_grad():
        frozen(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())
    norm_params = [p for path in timm_layers for p in frozen.get_submodule(path).parameters(recurse=False)]
    assert norm_params and not any(p.requires_grad for p in norm_params)
    thawed, report = surgery.unfreeze_norms(frozen)
    assert len(report.changes) == len(timm_layers)
    assert [type(m) for m in thawed.modules()] == [type(m) for m in model.modules()]
    assert all(p.requires_grad for p in thawed.parameters())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    thawed.eval()
    with torch.no_grad():
        assert torch.equal(thawed(x), model(x))


def test_a_norm_free_network_is_not_a_skipped_norm_layer():
    model = timm.create_model("nf_resnet26", num_classes=10)
    _, report = surgery.from_torch(model)
    assert not report.skipped, report.skipped[:3]


@pytest.mark.parametrize("to", ["group", "instance", "batch_renorm"])
def test_convert_norms_keeps_timm_batchnormact_s_activation(to):
    layer = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU).eval()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.bias.normal_()
    converted, report = surgery.convert_norms(nn.Sequential(layer), to, example_input=torch.randn(2, 4, 3, 3))
    assert report.changes[0].detail["activation"].startswith(("relu", "ReLU")), report
    x = torch.randn(2, 4, 3, 3)
    assert (converted.eval()(x) >= 0).all()  # the ReLU is still applied
