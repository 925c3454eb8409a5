"""Surgery on the kinds of model users bring besides plain module trees: hooks on the layers,
parametrized weights, modules that keep state across forwards (quantization observers),
meta-device models and module names no report should print raw."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import normlab as nl
from normlab import surgery

X = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(0))


def _cnn(lib=nn) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), lib.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _eval(model: nn.Module, x=X) -> torch.Tensor:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return model(x)


# --- hooks -----------------------------------------------------------------------------------

SWAPS = {
    "from_torch": (nn, lambda m: surgery.from_torch(m)),
    "to_torch": (nl.nn, lambda m: surgery.to_torch(m)),
    "freeze_norms": (nn, lambda m: surgery.freeze_norms(m)),
    "unfreeze_norms": (nn, lambda m: surgery.unfreeze_norms(surgery.freeze_norms(m).model)),
    "convert_sync_batchnorm": (nn, lambda m: surgery.convert_sync_batchnorm(m)),
    "revert_sync_batchnorm": (nn, lambda m: surgery.revert_sync_batchnorm(surgery.convert_sync_batchnorm(m).model)),
    "convert_norms(batch_renorm)": (nn, lambda m: surgery.convert_norms(m, "batch_renorm")),
}


@pytest.mark.parametrize("transform", SWAPS.values(), ids=SWAPS.keys())
def test_a_replaced_layer_keeps_its_hooks(transform):
    """A hook registered on a norm layer (a user's probe, or one that rescales the output) runs
    on the layer that replaces it: a swap that dropped it would change the model's output."""
    lib, fn = transform
    model = _cnn(lib)
    seen = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    model[1].register_forward_hook(lambda module, args, out: out * 2)
    expected = _eval(model)
    new, report = fn(model)
    assert [c.path for c in report.changes] == ["1"]
    seen.clear()
    torch.testing.assert_close(_eval(new), expected)
    assert seen == ["pre"]


def test_fold_skips_a_pair_with_hooks():
    """A BatchNorm with hooks disappears in a fold, and a forward hook on the producer would see
    the folded output: both pairs are skipped with the reason, and the output stays."""
    for where in ("bn", "conv"):
        model = _cnn()
        target = model[1] if where == "bn" else model[0]
        target.register_forward_hook(lambda module, args, out: out + 1)
        new, report = surgery.fold_batchnorm(model, example_input=X)
        assert not report.changes, report
        assert [s.path for s in report.skipped] == ["1"] and "hook" in report.skipped[0].reason, report
        torch.testing.assert_close(_eval(new), _eval(model))


# --- parametrized weights --------------------------------------------------------------------


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize(
    "parametrized",
    [
        lambda conv: parametrize.register_parametrization(conv, "weight", _Double()),
        lambda conv: parametrizations.weight_norm(conv),
        lambda conv: parametrize.register_parametrization(conv, "bias", _Double()),
    ],
    ids=["custom", "weight_norm", "bias"],
)
def test_fold_skips_a_producer_whose_weight_is_computed(parametrized):
    """A parametrized conv's weight is recomputed from its originals on every access: scaling
    the computed tensor changes nothing, so folding the BatchNorm away would be wrong (it was
    folded, off by up to 1.1, without a word unless example_input was given)."""
    model = _cnn()
    parametrized(model[0])
    for example in (None, X):
        new, report = surgery.fold_batchnorm(model, example_input=example)
        assert not report.changes, report
        assert [s.path for s in report.skipped] == ["1"] and "parametriz" in report.skipped[0].reason, report
        torch.testing.assert_close(_eval(new), _eval(model))


# --- modules that keep state across forwards -------------------------------------------------


class CallCounter(nn.Module):
    """Counts its forwards in a buffer, as a quantization observer keeps running min/max."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so surgery runs it on example_input."""

    def __init__(self, lib=nl.nn):
        super().__init__()
        self.counter = CallCounter()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = lib.BatchNorm2d(4)

    def forward(self, x):
        x = self.counter(x)
        if x.sum() > -1e9:
            x = self.bn(self.conv(x))
        return x


STATEFUL = {
    "fold_batchnorm": lambda m: surgery.fold_batchnorm(m, example_input=X),
    "convert_norms(group)": lambda m: surgery.convert_norms(m, "group", example_input=X),
    "convert_norms(batch)": lambda m: surgery.convert_norms(m, "frozen", example_input=X),
    "convert_norms(evonorm_s0)": lambda m: surgery.convert_norms(m, "evonorm_s0", example_input=X),
    "to_torch": lambda m: surgery.to_torch(m, example_input=X),
    "fold_weight_standardization": lambda m: surgery.fold_weight_standardization(m, example_input=X),
    "precise_bn": lambda m: surgery.precise_bn(m, [X, X + 1], num_batches=2),
}


@pytest.mark.parametrize("transform", STATEFUL.values(), ids=STATEFUL.keys())
def test_forwards_run_to_inspect_the_model_change_no_state(transform):
    """The forwards a transform runs to look at the model (example_input, precise_bn's data)
    leave the input model and every module of the new one that the report does not list as it
    was: an observer's statistics or a call counter are not the transform's to change (the
    fold's comparison ran the input model itself, whose observers then moved)."""
    model = Untraceable()
    new, report = transform(model)
    assert int(model.counter.calls) == 0
    assert "counter" not in {c.path for c in report.changes}
    assert int(new.counter.calls) == 0, report


def test_quantization_observers_are_left_alone():
    """A model prepared for quantization-aware training: its fake-quantize observers update on
    every forward, eval included."""
    model = nn.Sequential(torch.ao.quantization.QuantStub(), *_cnn(), torch.ao.quantization.DeQuantStub()).train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    model = torch.ao.quantization.prepare_qat(model).eval()
    observers = {k: v.clone() for k, v in model.state_dict().items() if "activation_post_process" in k}
    for transform in (
        lambda m: surgery.fold_batchnorm(m, example_input=X),
        lambda m: surgery.precise_bn(m, [X], num_batches=1),
        lambda m: surgery.convert_norms(m, "group", example_input=X),
    ):
        new, _ = transform(model)
        for source in (model, new):
            state = source.state_dict()
            for key, value in observers.items():
                assert torch.equal(state[key], value), key


# --- the meta device -------------------------------------------------------------------------


def test_meta_models_are_transformed_and_not_compared():
    """A model on the meta device (built before its weights are loaded) holds no values: the
    fold, the weight-standardization fold and convert_norms still transform it, and say the
    outputs were not compared instead of raising on the comparison."""
    with torch.device("meta"):
        model = _cnn()
        model.add_module("ws", nl.nn.StdConv2d(4, 4, 1))
        x = torch.randn(2, 3, 5, 5)
    for fn in (surgery.fold_batchnorm, surgery.fold_weight_standardization):
        new, report = fn(model, example_input=x)
        assert report.changes and report.max_abs_diff is None
        assert "meta" in report.check, report
    new, report = surgery.convert_norms(model, "frozen", example_input=x)
    assert report.changes and report.max_abs_diff is None and "meta" in report.check, report


def test_precise_bn_refuses_a_meta_model():
    with torch.device("meta"):
        model = _cnn()
        x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="meta"):
        surgery.precise_bn(model, [x], num_batches=1)


# --- what a report prints --------------------------------------------------------------------


def test_hostile_module_names_are_printed_escaped():
    """Module names may hold newlines and terminal escapes: printed raw they forge report lines
    or recolour a terminal (the CLI prints the report)."""
    model = _cnn()
    hostile = nn.Sequential()
    hostile.add_module("a\nskipped    fake: all is well", model[0])
    hostile.add_module("\x1b[2J\x1b[31mred", model[1])
    hostile.add_module("relu", model[2])
    new, report = surgery.fold_batchnorm(hostile)
    text = str(report)
    assert all(c.isprintable() for line in text.splitlines() for c in line), text
    assert len(text.splitlines()) == 1 + len(report.changes) + len(report.skipped) + 1 + len(report.notes)
    assert report.changes[0].path == "\x1b[2J\x1b[31mred"  # the data itself is not altered


# --- layers of the norms beyond the classic five ---------------------------------------------

EVERY_TRANSFORM = {
    "fold_batchnorm": lambda m: surgery.fold_batchnorm(m),
    "freeze_norms": lambda m: surgery.freeze_norms(m),
    "unfreeze_norms": lambda m: surgery.unfreeze_norms(surgery.freeze_norms(m).model),
    "from_torch": lambda m: surgery.from_torch(m),
    "to_torch": lambda m: surgery.to_torch(m),
    "convert_sync_batchnorm": lambda m: surgery.convert_sync_batchnorm(m),
    "precise_bn": lambda m: surgery.precise_bn(m, [torch.randn(4, 8)], num_batches=1),
    "convert_norms(batch)": lambda m: surgery.convert_norms(m, "batch"),
    "convert_norms(dyt)": lambda m: surgery.convert_norms(m, "dyt"),
}


@pytest.mark.parametrize("transform", EVERY_TRANSFORM.values(), ids=EVERY_TRANSFORM.keys())
def test_rms_norm_with_the_default_eps(transform):
    """RMSNorm's default eps is None (the dtype's epsilon, as torch.nn's): every transform raised
    a TypeError from float(None) on a model holding one, a Llama-style block included."""
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nl.nn.RMSNorm(8), nn.BatchNorm1d(8)).eval()
    new, report = transform(model)
    assert report.changes or report.skipped, report
    assert _eval(new, torch.randn(4, 8)).shape == (4, 8)


def test_freezing_statistics_alone_covers_a_running_variance_without_a_mean():
    """EvoNorm-B0 keeps a running variance and no running mean: freeze_norms(affine=False)
    skipped it as having "no running statistics to freeze", and its variance kept moving in
    training."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nl.nn.EvoNormB0(4))
    new, report = surgery.freeze_norms(model, affine=False)
    assert [c.path for c in report.changes] == ["1"] and not report.skipped, report
    before = new[1].running_var.clone()
    new.train()(X)
    torch.testing.assert_close(new[1].running_var, before, rtol=0, atol=0)


def test_a_model_that_cannot_be_copied_is_refused_with_the_reason():
    """The deprecated torch.nn.utils.weight_norm leaves a non-leaf tensor as an attribute, which
    deepcopy refuses; surgery copies every model it is given, so it says why and what to use."""
    model = _cnn()
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model[0])
    with pytest.raises(ValueError, match="parametrizations.weight_norm"):
        surgery.freeze_norms(model)


def test_folding_weight_standardization_keeps_hooks_and_both_names():
    """fold_weight_standardization built a fresh nn.Conv2d at one path: a hook on the
    standardized convolution was dropped (the output changed) and a layer registered under two
    names was replaced under one."""
    torch.manual_seed(0)
    conv = nl.nn.StdConv2d(3, 4, 3, padding=1)
    conv.register_forward_hook(lambda module, args, out: out * 3)
    model = nn.Sequential(conv, nn.ReLU(), conv.__class__(4, 4, 1))
    new, report = surgery.fold_weight_standardization(model, example_input=X)
    scale = _eval(model).abs().max().item()  # float32 outputs of order 10 (the hook triples them)
    assert report.max_abs_diff < 1e-6 * scale, report
    torch.testing.assert_close(_eval(new), _eval(model), rtol=1e-5, atol=1e-6 * scale)
    twice = nn.ModuleDict({"a": conv, "b": conv})
    new, report = surgery.fold_weight_standardization(twice)
    assert new["a"] is new["b"] and type(new["a"]) is nn.Conv2d, report
