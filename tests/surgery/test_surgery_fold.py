"""fold_batchnorm: every producer kind, torch.nn and normlab norms, traced and untraceable
models, and the pairs that must not be folded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl
from normlab.experiments.models import ResNet18
from normlab.surgery import fold_batchnorm


def _trained(model: nn.Module, example: torch.Tensor, steps: int = 3) -> nn.Module:
    """Give BatchNorms real statistics and non-trivial affine, then switch to eval."""
    with torch.no_grad():
        for m in model.modules():
            if (
                hasattr(m, "weight")
                and isinstance(getattr(m, "weight", None), torch.Tensor)
                and "Norm" in type(m).__name__
                and m.weight is not None
            ):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(example * 2 + 1)
    return model.eval()


def _no_bn_left(model):
    return not any(
        type(m).__name__.startswith(("BatchNorm", "FrozenBatchNorm", "BatchRenorm")) for m in model.modules()
    )


PRODUCERS = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3), lambda: nl.nn.BatchNorm1d(6), (5, 4, 9)),
    ("conv2d-nobias", lambda: nn.Conv2d(4, 6, 3, bias=False), lambda: nn.BatchNorm2d(6), (5, 4, 7, 7)),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: nl.nn.BatchNorm2d(6), (5, 4, 7, 7)),
    ("conv2d-depthwise", lambda: nn.Conv2d(6, 6, 3, groups=6, bias=False), lambda: nn.BatchNorm2d(6), (5, 6, 7, 7)),
    ("conv3d", lambda: nn.Conv3d(4, 6, 3), lambda: nl.nn.BatchNorm3d(6), (3, 4, 5, 5, 5)),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3), lambda: nn.BatchNorm1d(6), (5, 4, 9)),
    (
        "convT2d-grouped",
        lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False),
        lambda: nl.nn.BatchNorm2d(6),
        (5, 4, 6, 6),
    ),
    ("convT3d", lambda: nn.ConvTranspose3d(4, 6, 2, stride=2), lambda: nn.BatchNorm3d(6), (2, 4, 3, 3, 3)),
    ("linear", lambda: nn.Linear(4, 6), lambda: nl.nn.BatchNorm1d(6), (7, 4)),
    ("linear-nobias", lambda: nn.Linear(4, 6, bias=False), lambda: nn.BatchNorm1d(6, affine=False), (7, 4)),
    ("frozen", lambda: nn.Conv2d(4, 6, 3), lambda: nl.nn.FrozenBatchNorm2d(6), (5, 4, 7, 7)),
    ("renorm", lambda: nn.Conv2d(4, 6, 3), lambda: nl.nn.BatchRenorm2d(6), (5, 4, 7, 7)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,producer,norm,shape", PRODUCERS, ids=[p[0] for p in PRODUCERS])
def test_fold_every_producer_kind(name, producer, norm, shape, dtype):
    example = torch.randn(shape, dtype=dtype)
    model = _trained(nn.Sequential(producer(), norm(), nn.ReLU()).to(dtype), example)
    if name == "frozen":
        with torch.no_grad():
            model[1].running_mean.uniform_(-1, 1)
            model[1].running_var.uniform_(0.5, 2)
    folded, report = fold_batchnorm(model, example)
    assert [c.path for c in report.changes] == ["1"] and not report.skipped
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=tol, atol=tol)
    assert report.max_abs_diff is not None and report.max_abs_diff < tol


def test_input_model_is_not_modified():
    example = torch.randn(4, 3, 8, 8)
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), example).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, _ = fold_batchnorm(model, example)
    assert model.training and not folded.training
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class ResidualBlock(nn.Module):
    """A ResNet-style block: main path and a projection shortcut, joined by an add."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nl.nn.BatchNorm2d(c_out)
        self.proj, self.bn_proj = nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.bn_proj(self.proj(x)))


class SharedProducer(nn.Module):
    """conv's output feeds the BatchNorm *and* a second branch: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.other = nn.Conv2d(3, 4, 1)
        self.after, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + torch.sigmoid(y)  # the second use of y
        return self.bn2(self.after(z)) + self.other(x)


class DataDependent(SharedProducer):
    """Same structure, plus control flow on a tensor value: torch.fx cannot trace it."""

    def forward(self, x):
        if x.mean() > 100:  # never true; enough to defeat symbolic tracing
            x = x * 2
        return super().forward(x)


def test_residual_block_folds_main_path_and_shortcut():
    example = torch.randn(4, 3, 8, 8)
    model = _trained(ResidualBlock(3, 6), example)
    folded, report = fold_batchnorm(model, example)
    assert sorted(c.path for c in report.changes) == ["bn1", "bn2", "bn_proj"]
    assert _no_bn_left(folded) and report.max_abs_diff < 1e-5
    assert report.check.startswith("pairs found by torch.fx")


@pytest.mark.parametrize("cls", [SharedProducer, DataDependent])
def test_producer_feeding_a_second_branch_is_skipped(cls):
    example = torch.randn(4, 3, 8, 8)
    model = _trained(cls(), example)
    folded, report = fold_batchnorm(model, example)
    assert [c.path for c in report.changes] == ["bn2"]
    skipped = {s.path: s.reason for s in report.skipped}
    assert "bn" in skipped and "conv" in skipped["bn"] and "also" in skipped["bn"]
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert report.max_abs_diff < 1e-5
    if cls is DataDependent:
        assert report.check.startswith("pairs found by hooks")


def test_untraceable_model_needs_an_example_input():
    with pytest.raises(ValueError, match="cannot trace DataDependent.*pass example_input"):
        fold_batchnorm(DataDependent())


def test_module_called_twice_is_skipped():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(self.bn(self.conv(x))))

    _, report = fold_batchnorm(Twice().eval(), torch.randn(2, 3, 5, 5))
    assert not report.changes and "called 2 times" in report.skipped[0].reason


def test_batchnorm_without_running_stats_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    folded, report = fold_batchnorm(model, torch.randn(2, 3, 6, 6))
    assert not report.changes
    assert "track_running_stats=False" in report.skipped[0].reason
    assert report.max_abs_diff == 0.0


def test_bn_after_a_non_producer_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    _, report = fold_batchnorm(model)
    assert "input comes from module '1'" in report.skipped[0].reason


def test_linear_on_3d_activations_is_not_folded():
    # Linear(4 -> 6) on (N, 6, 4) gives (N, 6, 6); BatchNorm1d(6) then normalizes dim 1,
    # which is the sequence dim, not the Linear's features: the shapes fit, the fold is wrong.
    model = _trained(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), torch.randn(5, 6, 4))
    _, report = fold_batchnorm(model, torch.randn(5, 6, 4))
    assert not report.changes and "3D tensor" in report.skipped[0].reason
    _, unchecked = fold_batchnorm(model)
    assert any("pass example_input to verify" in n for n in unchecked.notes)


def test_resnet18_style_folds_every_batchnorm():
    example = torch.randn(2, 3, 16, 16)
    model = _trained(ResNet18(width=8), example, steps=2)
    folded, report = fold_batchnorm(model, example)
    assert len(report.changes) == 20 and not report.skipped
    assert _no_bn_left(folded)
    assert report.max_abs_diff <= 1e-4


# --- issue 26: shared weights, masks, one entry per layer --------------------------------


class SharedWeight(nn.Module):
    """c2 uses c1's weight (or bias): scaling it for bn would change c2's output too."""

    def __init__(self, shared: str):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        setattr(self.c2, shared, getattr(self.c1, shared))

    def forward(self, x):
        return self.bn(self.c1(x)) + self.c2(x)


@pytest.mark.parametrize("shared", ["weight", "bias"])
def test_producer_with_a_shared_parameter_is_not_folded(shared):
    example = torch.randn(4, 3, 8, 8)
    model = _trained(SharedWeight(shared), example)
    with torch.no_grad():
        model.bn.running_var.fill_(4.0)  # a = 1/2: any fold into c1 shows in c2's output
    folded, report = fold_batchnorm(model, example)
    assert not report.changes, report
    assert [s.path for s in report.skipped] == ["bn"]
    assert f"{shared} of c1 is shared with c2" in report.skipped[0].reason
    assert report.max_abs_diff == 0.0
    assert folded.c2.weight is folded.c1.weight or folded.c2.bias is folded.c1.bias  # still tied


class MaskedConvBN(nn.Module):
    def __init__(self, data_dependent: bool = False):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(2, 3, 1), nl.nn.BatchNorm1d(3)
        self.data_dependent = data_dependent

    def forward(self, x, mask):
        if self.data_dependent and x.mean() > 100:  # defeats torch.fx
            x = x * 2
        return self.bn(self.conv(x), mask=mask)


@pytest.mark.parametrize("data_dependent", [False, True], ids=["fx", "hooks"])
def test_masked_batchnorm_is_not_folded(data_dependent):
    model = MaskedConvBN(data_dependent)
    x, mask = torch.randn(4, 2, 6), torch.rand(4, 6) > 0.3
    model.train()
    model(x, mask)
    model.eval()
    folded, report = fold_batchnorm(model, example_input=(x, mask))
    assert not report.changes and [s.path for s in report.skipped] == ["bn"]
    assert "mask" in report.skipped[0].reason
    with torch.no_grad():
        torch.testing.assert_close(folded(x, mask), model(x, mask))  # still takes its mask


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.bn(self.conv(x)))


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "hooks"])
def test_a_batchnorm_called_twice_is_listed_once(traced, monkeypatch):
    if not traced:
        monkeypatch.setattr(
            CalledTwice, "forward", lambda self, x: self.bn(self.bn(self.conv(x))) if x.sum() < 1e9 else x
        )
    _, report = fold_batchnorm(CalledTwice(), example_input=torch.randn(2, 3, 4, 4))
    assert [s.path for s in report.skipped] == ["bn"], report
    assert "called 2 times" in report.skipped[0].reason or "more than once" in report.skipped[0].reason


def test_a_mask_passed_by_position_is_a_mask():
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(2, 3, 1), nl.nn.BatchNorm1d(3)

        def forward(self, x, mask):
            return self.bn(self.conv(x), mask)

    x, mask = torch.randn(4, 2, 6), torch.rand(4, 6) > 0.3
    _, report = fold_batchnorm(Positional().eval(), example_input=(x, mask))
    assert not report.changes and "called with mask=" in report.skipped[0].reason


def test_bn_affine_names_a_layer_it_cannot_read():
    with pytest.raises(TypeError, match="BatchNorm-like layer, got torch.nn.Linear"):
        nl.surgery.bn_affine(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="keeps none"):
        nl.surgery.bn_affine(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="keeps none"):
        nl.surgery.bn_affine(nn.GroupNorm(1, 3))
