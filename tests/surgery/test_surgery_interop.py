"""from_torch / to_torch now that normlab's layers are torch.nn subclasses, and the
timm-style norm+act adapter (no timm needed here; tests/toolchain/test_timm.py builds timm models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import surgery


def _normlab_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nl.nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nl.nn.BatchNormAct2d(8, activation="silu"),
        nl.nn.GroupNorm(4, 8),
        nl.nn.GroupNormAct(2, 8),
        nl.nn.InstanceNorm2d(8, affine=True),
        nl.nn.BatchRenorm2d(8),
        nl.nn.FrozenBatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nl.nn.LayerNorm(6),
        nl.nn.RMSNorm(6),
    )


def _warm(model):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 6, 6) * 2 + 1)
    return model


def test_from_torch_leaves_a_normlab_model_unchanged():
    model = _warm(_normlab_net())
    assert isinstance(model[1], nn.BatchNorm2d)  # the case that must not be taken for torch.nn's
    new, report = surgery.from_torch(model)
    assert not report.changes and not report.skipped
    assert [type(m) for m in new.modules()] == [type(m) for m in model.modules()]
    for k, v in model.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k


def test_to_torch_gives_torch_classes_and_lists_the_rest():
    model = _warm(_normlab_net())
    back, report = surgery.to_torch(model)
    changed = {c.path for c in report.changes}
    assert changed == {"1", "5", "7", "12", "13"}
    for path in changed:
        assert type(back.get_submodule(path)).__module__.startswith("torch.nn."), path
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == {"4", "6", "8", "9"}
    assert "fused norm+activation" in skipped["4"] and "fused norm+activation" in skipped["6"]
    assert "BatchRenorm2d" in skipped["8"] and "FrozenBatchNorm2d" in skipped["9"]
    assert not any(type(m).__module__.startswith("normlab.") for p, m in back.named_modules() if p not in skipped)


def test_from_torch_lists_what_it_skips():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class EvoNormish(nn.Module):  # a norm by name only: normlab cannot tell what it computes
        def forward(self, x):
            return x / x.std()

    class ConvNormAct(nn.Module):  # a container of a conv and a norm is not itself a norm
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    model = nn.Sequential(MyBN(3), EvoNormish(), ConvNormAct(), nn.LocalResponseNorm(2))
    new, report = surgery.from_torch(model)
    assert [c.path for c in report.changes] == ["2.bn"]
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == {"0", "3"}
    assert "subclasses torch.nn.BatchNorm2d" in skipped["0"] and "LocalResponseNorm" in skipped["3"]
    assert any("EvoNormish" in note for note in report.notes)  # named like a norm: a hint, not a skip
    assert type(new[0]) is MyBN and isinstance(new[2].bn, nl.nn.BatchNorm2d)


# --- the timm-style adapter -------------------------------------------------------------


def test_activation_spec():
    spec = nl.nn.activation_spec
    assert spec(nn.ReLU(inplace=True)) == ("relu", None)
    assert spec(nn.LeakyReLU(0.2)) == ("leaky_relu", 0.2)
    assert spec(nn.ELU, {"alpha": 0.5}) == ("elu", 0.5)
    assert spec("swish") == ("silu", None)
    assert spec(None) == ("identity", None)
    with pytest.raises(ValueError, match="GELU has no fused normlab form"):
        spec(nn.GELU())
    with pytest.raises(ValueError, match="'hard_swish' has no fused"):
        spec("hard_swish")


def test_timm_norm_act_builds_batchnormact2d_from_timm_keywords():
    make = nl.nn.timm_norm_act("silu")
    layer = make(8, inplace=True)  # timm's inplace: the activation's, not In-Place ABN
    assert type(layer) is nl.nn.BatchNormAct2d and layer.activation == "silu" and not layer.inplace
    assert make(8, apply_act=False).activation == "identity"
    leaky = make(8, eps=1e-3, momentum=0.01, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2})
    assert (leaky.activation, leaky.activation_param, leaky.eps, leaky.momentum) == ("leaky_relu", 0.2, 1e-3, 0.01)
    x = torch.randn(4, 8, 5, 5)
    reference = nn.Sequential(nn.BatchNorm2d(8), nn.SiLU())
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="drop_layer"):
        make(8, drop_layer=nn.Dropout)
    with pytest.raises(ValueError, match="GELU"):
        make(8, act_layer=nn.GELU)


def test_timm_norm_act_keywords_are_defaults_that_timms_call_overrides():
    # eps, momentum, affine, track_running_stats given to timm_norm_act reached the layer a
    # second time beside the positional ones: TypeError "multiple values for argument 'eps'"
    make = nl.nn.timm_norm_act("relu", eps=1e-3, momentum=0.01, affine=False, track_running_stats=False)
    layer = make(8)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, 0.01, False, False)
    assert make(8, eps=1e-4, momentum=0.2).eps == 1e-4  # the model's own values win, as its act_layer does
    assert make(8, eps=1e-4, momentum=0.2).momentum == 0.2
    grouped = nl.nn.timm_norm_act("relu", num_groups=4, eps=1e-3, affine=False)(8)
    assert type(grouped) is nl.nn.GroupNormAct and (grouped.eps, grouped.affine) == (1e-3, False)
    with pytest.raises(TypeError, match="momentum"):  # GroupNorm has no running estimates
        nl.nn.timm_norm_act("relu", num_groups=4, momentum=0.1)(8)


def test_containers_named_like_norms_are_not_skipped_norm_layers():
    class Normalizer(nn.Module):  # a user's container: a linear and a norm, one level down
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))

        def forward(self, x):
            return self.body(x)

    class NormFreeNet(nn.Module):  # a normalization-free network (as timm's): no norm at all
        def __init__(self):
            super().__init__()
            self.stages, self.gain = nn.Sequential(nn.Conv2d(4, 4, 1)), nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.stages(x) * self.gain

    model = nn.Sequential(Normalizer(), NormFreeNet())
    new, report = surgery.from_torch(model)
    assert [c.path for c in report.changes] == ["0.body.1"] and not report.skipped, report
    assert not any("Normalizer" in n or "NormFreeNet" in n for n in report.notes)
    assert isinstance(new[0].body[1], nl.nn.LayerNorm)


def test_from_torch_converts_torch_syncbatchnorm_and_to_torch_brings_it_back():
    model = nn.Sequential(nn.SyncBatchNorm(3, momentum=None))
    ours, report = surgery.from_torch(model)
    assert type(ours[0]) is nl.nn.SyncBatchNorm and ours[0].momentum is None, report
    back, report = surgery.to_torch(ours)
    assert type(back[0]) is nn.SyncBatchNorm and back[0].momentum is None, report
