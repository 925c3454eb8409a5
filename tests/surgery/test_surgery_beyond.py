"""Surgery for the norms beyond the classic five: timm's BiT, RegNetZ-evos, PoolFormer and
MobileViTv2 through from_torch (nothing skipped, float32 error against float64 no larger than
timm's own) and back with to_torch(timm=True); convert_norms to dyt, derf, frn, evonorm_b0,
evonorm_s0 and group_ws; folding standardized weights."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as TF
from helpers import import_timm
from torch import nn

import normlab as nl
from normlab import surgery

# --- convert_norms ---------------------------------------------------------------------------------


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nl.nn.BatchNormAct2d(8, activation="relu"),
        nn.Conv2d(8, 8, 3, padding=1),
        nl.nn.BatchNormAct2d(8, activation="silu"),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.Flatten(1),
        nn.BatchNorm1d(8 * 36),
        nn.Linear(8 * 36, 4),
    )


def _warm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        model(torch.randn(4, 3, 6, 6) + 1)
    return model


@pytest.mark.parametrize(
    "to, cls",
    [("frn", nl.nn.FilterResponseNormTlu2d), ("evonorm_b0", nl.nn.EvoNormB0), ("evonorm_s0", nl.nn.EvoNormS0)],
)
def test_convert_channel_norms_to_frn_and_evonorm(to, cls):
    model = _warm(_cnn())
    x = torch.randn(2, 3, 6, 6)
    new, report = surgery.convert_norms(model, to, example_input=x)
    changed = {c.path: c for c in report.changes}
    assert set(changed) == {"1", "4", "6", "8"}
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == {"10"} and "1 spatial dims" in skipped["10"]
    for path in ("1", "4", "8"):
        assert type(new.get_submodule(path)) is cls, path
        torch.testing.assert_close(new.get_submodule(path).weight, model.get_submodule(path).weight)
        torch.testing.assert_close(new.get_submodule(path).bias, model.get_submodule(path).bias)
    if to == "frn":
        assert changed["4"].detail["activation"] == "relu replaced by TLU"
        assert isinstance(new[6], nl.nn.FilterResponseNormAct2d) and isinstance(new[6].act, nn.SiLU)
    else:
        assert "EvoNorm's own nonlinearity" in changed["6"].detail["activation"]
    if to == "evonorm_b0":
        torch.testing.assert_close(new[1].running_var, model[1].running_var)
        assert changed["8"].detail["statistics"] == "fresh"
    assert isinstance(new[2], nn.ReLU)  # a separate activation stays
    y = new(x)
    assert y.shape == (2, 4) and torch.isfinite(y).all()
    y.sum().backward()
    for p in model.parameters():  # the input model is untouched
        assert p.grad is None


def test_convert_norms_to_group_ws_standardizes_every_conv2d():
    model = _warm(_cnn())
    x = torch.randn(2, 3, 6, 6)
    new, report = surgery.convert_norms(model, "group_ws", example_input=x)
    convs = [p for p, m in model.named_modules() if type(m) is nn.Conv2d]
    kinds = {c.path: c.after for c in report.changes}
    assert all(kinds[p] == "normlab.nn.StdConv2d" for p in convs)
    assert kinds["1"] == "normlab.nn.GroupNorm" and kinds["4"] == "normlab.nn.GroupNormAct"
    for p in convs:
        conv, old = new.get_submodule(p), model.get_submodule(p)
        assert torch.equal(conv.weight, old.weight) and conv.groups == old.groups and conv.padding == old.padding
        z = torch.randn(2, old.in_channels, 6, 6)
        expected = TF.conv2d(
            z, nl.functional.weight_standardization(old.weight, conv.eps), old.bias, 1, 1, 1, old.groups
        )
        torch.testing.assert_close(conv(z), expected, rtol=1e-5, atol=1e-5)
    assert new(x).shape == (2, 4)


@pytest.mark.parametrize("to, cls", [("dyt", nl.nn.DyT), ("derf", nl.nn.Derf)])
def test_convert_layer_and_rms_norms_to_dyt_and_derf(to, cls):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.LayerNorm(6),
        nl.nn.RMSNorm(6),
        nn.Unflatten(1, (6, 1, 1)),
        nl.nn.LayerNorm2d(6),
        nn.BatchNorm2d(6),
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[4].bias.uniform_(-1, 1)
    new, report = surgery.convert_norms(model, to, alpha_init_value=0.8)
    assert {c.path for c in report.changes} == {"1", "2", "4"}
    assert [s.path for s in report.skipped] == ["5"]
    assert all(isinstance(new[i], cls) and new[i].alpha.item() == pytest.approx(0.8) for i in (1, 2, 4))
    assert new[1].channels_last and not new[4].channels_last
    assert torch.equal(new[1].weight, model[1].weight) and torch.equal(new[4].bias, model[4].bias)
    assert torch.equal(new[2].bias, torch.zeros(6))  # RMSNorm has no β: DyT's starts at 0
    new.eval()
    assert new(torch.randn(3, 4)).shape == (3, 6, 1, 1)


def test_convert_norms_refuses_unknown_targets_and_lists_all():
    with pytest.raises(ValueError, match="group_ws"):
        surgery.convert_norms(nn.Sequential(nn.BatchNorm2d(3)), "dynamic_tanh")
    assert set(surgery.TARGETS) >= {"dyt", "derf", "frn", "evonorm_b0", "evonorm_s0", "group_ws"}


# --- folding standardized weights ----------------------------------------------------------------------


def test_fold_weight_standardization_gives_plain_convs_and_then_batchnorm_folds():
    torch.manual_seed(0)
    model = nn.Sequential(
        nl.nn.StdConv2d(3, 8, 3, bias=True),
        nn.BatchNorm2d(8),
        nl.nn.ScaledStdConv2d(8, 8, 3, gamma=1.7),
        nl.nn.StdConv2d(8, 4, 3, stride=2, padding="same"),
    )
    _warm(model)
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    bn_first, report = surgery.fold_batchnorm(model, example_input=x)
    assert not report.changes and "not a foldable conv" in report.skipped[0].reason  # never into a StdConv
    folded, report = surgery.fold_weight_standardization(model, example_input=x)
    assert [c.path for c in report.changes] == ["0", "2"]
    assert [s.path for s in report.skipped] == ["3"] and "SAME" in report.skipped[0].reason
    assert type(folded[0]) is nn.Conv2d and type(folded[2]) is nn.Conv2d
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert report.max_abs_diff < 1e-6 * scale  # float32 rounding of outputs of that size
    both, report = surgery.fold_batchnorm(folded, example_input=x)
    assert [c.path for c in report.changes] == ["1"] and report.max_abs_diff < 1e-6 * scale
    with torch.no_grad():
        torch.testing.assert_close(both(x), model(x), rtol=1e-5, atol=1e-6 * scale)


# --- timm's models through from_torch and back ------------------------------------------------------------

_MODELS = {
    # the layers the issue found left unconverted: name -> {timm class: count}
    "resnetv2_50x1_bit": {"GroupNormAct": 49, "StdConv2d": 53},
    "regnetz_b16_evos": {"EvoNorm2dS0a": 68},
    "poolformer_s12": {"GroupNorm1": 24},
    "mobilevitv2_050": {"GroupNorm1": 21},
}


def _timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    return import_timm()


def _max_error(a, b):
    return max(
        (x.double() - y.double()).abs().max().item() / max(1.0, y.double().abs().max().item()) for x, y in zip(a, b)
    )


def _step(model, x, target):
    """Output and every parameter gradient of one training step, and the buffers after it."""
    model.train()
    model.zero_grad()
    out = model(x)
    TF.cross_entropy(out.to(torch.float64), target).backward()
    return [out.detach()] + [p.grad for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_MODELS))
def test_timm_family_converts_fully_and_is_as_accurate_as_timm(name):
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    counts = {}
    for m in model.modules():
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    assert {k: counts.get(k, 0) for k in _MODELS[name]} == _MODELS[name]
    with torch.no_grad():  # parameters off their initial values, so every γ, β, v, gain matters
        for pname, p in model.named_parameters():
            if "norm" in pname or p.dim() == 1 or "gain" in pname:
                p.add_(0.1 * torch.randn_like(p))
    ours, report = surgery.from_torch(model)
    assert not report.skipped, report.skipped
    converted = len(report.changes)
    assert converted >= sum(_MODELS[name].values())
    timm_left = [
        type(m).__name__
        for m in ours.modules()
        if type(m).__name__ in _MODELS[name] and type(m).__module__.startswith("timm")
    ]
    assert not timm_left
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    exact = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 7])
    model.eval(), ours.eval(), exact.eval()
    with torch.no_grad():
        reference = exact(x.double())
        errors = {"timm": _max_error([model(x)], [reference]), "ours": _max_error([ours(x)], [reference])}
    assert errors["ours"] <= 2 * errors["timm"] + 1e-6, errors
    back, report = surgery.to_torch(ours, timm=True)
    assert not report.skipped and len(report.changes) == converted
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    trained = {
        "timm": _step(model, x, target),
        "ours": _step(ours, x, target),
        "exact": _step(exact, x.double(), target),
    }
    step_errors = {k: _max_error(trained[k], trained["exact"]) for k in ("timm", "ours")}
    assert step_errors["ours"] <= 2 * step_errors["timm"] + 1e-6, step_errors


def test_from_torch_and_back_on_each_timm_layer():
    timm = _timm()
    L = timm.layers
    torch.manual_seed(0)
    model = nn.Sequential(
        L.StdConv2d(3, 8, 3, eps=1e-8),
        L.GroupNormAct(8, num_groups=4),
        L.StdConv2dSame(8, 8, 3, stride=2),
        L.EvoNorm2dB0(8),
        L.ScaledStdConv2d(8, 8, 3),
        L.EvoNorm2dS0a(8, group_size=4),
        L.ScaledStdConv2dSame(8, 8, 2),
        L.FilterResponseNormTlu2d(8),
        L.FilterResponseNormAct2d(8, act_layer=nn.SiLU),
        L.GroupNorm1(8),
        L.EvoNorm2dS1(8, groups=2),
        L.EvoNorm2dB2(8),
        L.GroupNorm1Act(8, act_layer=nn.GELU),
    )
    x = torch.randn(2, 3, 9, 9)
    model.train()
    ours, report = surgery.from_torch(model)
    assert {s.path for s in report.skipped} == {"12"} and "GELU" in report.skipped[0].reason
    assert len(report.changes) == 12
    for i, m in enumerate(ours[:12]):
        assert type(m).__module__.startswith("normlab"), (i, type(m))
    reference = copy.deepcopy(model)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)  # training: B0 updates
    for a, b in zip(ours.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b)
    back, report = surgery.to_torch(ours, timm=True)
    assert len(report.changes) == 12 and not report.skipped
    for i in range(13):  # GroupNorm1 back to GroupNorm1, not torch.nn.GroupNorm
        assert type(back[i]) is type(model[i]), i
    torch.testing.assert_close(back(x), reference(x), rtol=1e-5, atol=1e-5)


def test_to_torch_without_timm_lists_the_new_layers_with_the_way_back():
    model = nn.Sequential(nl.nn.EvoNormS0(8, groups=2), nl.nn.DyT(8, channels_last=False))
    _, report = surgery.to_torch(model)
    assert not report.changes
    reasons = {s.path: s.reason for s in report.skipped}
    assert "to_torch(model, timm=True)" in reasons["0"]
    assert reasons["1"].endswith("torch.nn has no such layer")  # nor has timm


def test_fold_batchnorm_never_folds_into_timm_std_conv():
    """Folding scales the weight, which the standardization undoes: 18.5 off on this model before."""
    timm = _timm()
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.StdConv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].running_mean.uniform_(-1, 1)
        model[1].weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    folded, report = surgery.fold_batchnorm(model, example_input=x)
    assert not report.changes and report.max_abs_diff == 0
    plain, _ = surgery.fold_weight_standardization(model)
    folded, report = surgery.fold_batchnorm(plain, example_input=x)
    assert len(report.changes) == 1 and report.max_abs_diff < 1e-5


def test_freeze_norms_freezes_the_new_layers():
    model = nn.Sequential(nl.nn.EvoNormB0(4), nl.nn.SwitchableNorm2d(4), nl.nn.DyT(4, channels_last=False))
    frozen, report = surgery.freeze_norms(model)
    assert {c.path for c in report.changes} == {"0", "1", "2"}
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    state = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen(torch.randn(3, 4, 5, 5) * 3 + 1)
    for k, v in frozen.state_dict().items():  # model.train() does not undo it
        assert torch.equal(v, state[k]), k
    back, _ = surgery.unfreeze_norms(frozen)
    assert all(p.requires_grad for p in back.parameters())
