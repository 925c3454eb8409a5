"""from_torch(model, fuse_activations=True): norm → activation pairs become normlab's fused layer
where that is provably the same function, and to_torch splits them again."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import surgery
from normlab.surgery.fuse_act import FusedActivation


def _sequential_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 1),
        nn.GroupNorm(4, 8),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nn.BatchNorm1d(6),
        nn.ELU(alpha=0.5),
    )


class _Branches(nn.Module):
    """Forward code that is no Sequential: bn → act is provable from the data flow, gn's output
    also feeds the sum, and bn3 is followed by an activation the fused layers lack."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn, self.act = nn.BatchNorm2d(8), nn.SiLU()
        self.gn, self.act2 = nn.GroupNorm(2, 8), nn.ReLU()
        self.bn3, self.act3 = nn.BatchNorm2d(8), nn.GELU()

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        z = self.gn(y)
        return self.act2(z) + z + self.act3(self.bn3(y))


def _fused_paths(report) -> set[str]:
    return {c.path for c in report.changes if c.action == "fused"}


def _trained_like(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _compare(reference, fused, x, mode):
    """Outputs, input and parameter gradients, and the running statistics after one call."""
    reference.train(mode == "train")
    fused.train(mode == "train")
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = reference(xr), fused(xf)
    torch.testing.assert_close(yf, yr, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    params_r, params_f = dict(reference.named_parameters()), dict(fused.named_parameters())
    assert set(params_r) == set(params_f)
    for name, p in params_r.items():
        # a conv bias before a training BatchNorm has a gradient of 0 up to float32 rounding of
        # sums as large as the other gradients: the tolerance scales with them
        atol = 1e-5 * max(1.0, float(p.grad.abs().max()), float(xr.grad.abs().max()))
        torch.testing.assert_close(
            params_f[name].grad, p.grad, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )
    buffers_f = dict(fused.named_buffers())
    for name, b in reference.named_buffers():
        torch.testing.assert_close(buffers_f[name], b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sequential_pairs_fuse_into_the_same_function(mode):
    torch.manual_seed(0)
    model = _trained_like(_sequential_net())
    result = surgery.from_torch(model, fuse_activations=True)
    assert _fused_paths(result.report) == {"1", "4", "7", "11"}
    fused = result.model
    assert [type(fused[i]) for i in (1, 4, 7, 11)] == [
        nl.nn.BatchNormAct2d,
        nl.nn.GroupNormAct,
        nl.nn.BatchNormAct2d,
        nl.nn.BatchNormAct1d,
    ]
    assert [fused[i].activation for i in (1, 4, 7, 11)] == ["relu", "leaky_relu", "silu", "elu"]
    assert fused[4].activation_param == 0.2 and fused[11].activation_param == 0.5
    assert all(isinstance(fused[i], FusedActivation) for i in (2, 5, 8, 12))
    # the state dict is the model's: same keys, same tensors
    before, after = model.state_dict(), fused.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    reference = _trained_like(_sequential_net())
    reference.load_state_dict(before)
    _compare(reference, fused, torch.randn(4, 3, 6, 6), mode)


def test_without_the_flag_nothing_is_fused():
    result = surgery.from_torch(_sequential_net())
    assert not _fused_paths(result.report)
    assert not any(isinstance(m, (FusedActivation, nl.nn.BatchNormAct2d)) for m in result.model.modules())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_code_pairs_fuse_only_where_the_data_flow_proves_it(mode):
    torch.manual_seed(1)
    model = _trained_like(_Branches())
    result = surgery.from_torch(model, fuse_activations=True)
    assert _fused_paths(result.report) == {"bn"}
    skipped = {s.path: s.reason for s in result.report.skipped}
    assert "also feeds" in skipped["act2"]  # gn's output is summed too
    assert "GELU" in skipped["bn3"]  # no fused form
    assert type(result.model.gn) is nl.nn.GroupNorm and type(result.model.act2) is nn.ReLU
    reference = _trained_like(_Branches())
    reference.load_state_dict(model.state_dict())
    _compare(reference, result.model, torch.randn(2, 3, 9, 9), mode)


def test_pairs_that_would_change_the_function_or_the_state_are_refused():
    shared = nn.ReLU()
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda m, i, o: None)
    model = nn.Sequential(
        nn.Sequential(nn.BatchNorm2d(4), nn.PReLU(4)),  # slopes: state under the activation's key
        nn.Sequential(nn.BatchNorm2d(4), shared),
        nn.Sequential(nn.BatchNorm2d(4), shared),  # one activation registered twice
        nn.Sequential(hooked, nn.ReLU()),  # the hook would see the activated output
        nn.Sequential(nn.InstanceNorm2d(4), nn.ReLU()),  # no fused InstanceNorm layer
        nn.Sequential(nn.BatchNorm2d(4), nn.Hardswish()),
    )
    result = surgery.from_torch(model, fuse_activations=True)
    assert not _fused_paths(result.report)
    skipped = {s.path: s.reason for s in result.report.skipped}
    assert "state" in skipped["0.0"]
    assert "called 2 times" in skipped["1.0"] or "more than once" in skipped["1.0"]
    assert "hooks" in skipped["3.0"]
    assert "no fused norm + activation form" in skipped["4.0"]
    assert "Hardswish" in skipped["5.0"]
    assert set(result.model.state_dict()) == set(model.state_dict())


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so nothing proves even the Sequential's
    pair (the forward around it could call its children on their own)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.bn, self.act = nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        return self.act(self.bn(y))


def test_an_untraceable_forward_fuses_nothing_and_says_why():
    torch.manual_seed(2)
    model = _Untraceable()
    result = surgery.from_torch(model, fuse_activations=True)
    assert not _fused_paths(result.report)
    assert "torch.fx cannot trace" in {s.path: s.reason for s in result.report.skipped}["block.1"]
    assert any("torch.fx cannot trace" in n for n in result.report.notes)
    x = torch.randn(2, 3, 5, 5)
    model.eval()
    result.model.eval()
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_to_torch_splits_the_pairs_again():
    torch.manual_seed(3)
    model = _trained_like(_sequential_net()).eval()
    fused = surgery.from_torch(model, fuse_activations=True).model
    back = surgery.to_torch(fused)
    assert [type(m) for m in back.model] == [type(m) for m in model]
    assert back.model[2].inplace is True and back.model[5].negative_slope == 0.2
    assert {c.path for c in back.report.changes if c.action == "unfused"} == {"1", "4", "7", "11"}
    assert not back.report.skipped
    after = back.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(back.model.eval()(x), model(x), rtol=1e-5, atol=1e-6)
    # the fused model itself is left as it was
    assert isinstance(fused[2], FusedActivation) and type(fused[1]) is nl.nn.BatchNormAct2d


class _SlicedSequential(nn.Module):
    """A Sequential whose forward is never run whole: its ReLU is never applied."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.seq[:2](x)


class _ChildCalledAlone(nn.Module):
    """The Sequential's norm is also called on its own, behind control flow fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        if x.sum() > -1e9:
            return self.seq(x) + self.seq[0](x)
        return x


@pytest.mark.parametrize("make", [_SlicedSequential, _ChildCalledAlone])
def test_a_sequential_pair_is_fused_only_where_the_traced_forward_proves_it(make):
    """Adjacency in a Sequential is not a proof: the forward around it decides (both models
    came out changed — a ReLU applied that never ran, a norm's output activated where it was
    also read plain — with no skip reported)."""
    torch.manual_seed(4)
    model = make().eval()
    result = surgery.from_torch(model, fuse_activations=True)
    assert not _fused_paths(result.report)
    assert {s.path for s in result.report.skipped} == {"seq.1" if make is _SlicedSequential else "seq.0"}
    x = torch.randn(2, 3, 5, 5)
    result.model.eval()
    torch.testing.assert_close(result.model(x), model(x))


def test_a_global_module_hook_stops_every_fusion():
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(o))
    try:
        result = surgery.from_torch(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), fuse_activations=True)
    finally:
        handle.remove()
    assert not _fused_paths(result.report)
    assert "global module hook" in result.report.skipped[0].reason
