"""The statistics-tracking layers' constructors: torch.nn's arguments, defaults and order, then
normlab's keyword-only extras — whether a layer inherits the constructor written once in
``normlab.nn.base._NormBase`` or writes its own signature (other defaults or arguments)."""

import inspect
import typing

import pytest
import torch

import normlab as nl
from normlab.nn.base import NormOptions, _NormBase

EXTRAS = {"bias": True, "unbiased_running_var": True, "on_nonfinite": "skip"}

TWINS = [
    (nl.nn.BatchNorm1d, torch.nn.BatchNorm1d),
    (nl.nn.BatchNorm2d, torch.nn.BatchNorm2d),
    (nl.nn.BatchNorm3d, torch.nn.BatchNorm3d),
    (nl.nn.InstanceNorm1d, torch.nn.InstanceNorm1d),
    (nl.nn.InstanceNorm2d, torch.nn.InstanceNorm2d),
    (nl.nn.InstanceNorm3d, torch.nn.InstanceNorm3d),
    (nl.nn.SyncBatchNorm, torch.nn.SyncBatchNorm),
]


def _split(cls: type) -> tuple[list[tuple[str, object]], dict[str, object]]:
    """(positional-or-keyword (name, default) in order, keyword-only {name: default})."""
    params = list(inspect.signature(cls).parameters.values())
    positional = [(p.name, p.default) for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    keyword = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    return positional, keyword


@pytest.mark.parametrize(("ours", "theirs"), TWINS, ids=lambda c: c.__name__)
def test_torch_arguments_then_normlab_extras(ours, theirs):
    positional, keyword = _split(ours)
    assert positional == _split(theirs)[0]
    assert keyword == EXTRAS


def test_inherited_where_the_arguments_are_batchnorms():
    # one written constructor: BatchNorm and BatchNormAct's norm part take it as it is
    for cls in (nl.nn.BatchNorm1d, nl.nn.BatchNorm2d, nl.nn.BatchNorm3d):
        assert cls.__init__ is _NormBase.__init__
    assert nl.nn.InstanceNorm2d.__init__ is not _NormBase.__init__  # affine=False, track_running_stats=False


def test_options_carry_exactly_the_keyword_extras():
    # NormOptions is what a layer with its own signature passes on: the same names as the
    # written constructor's keyword-only arguments, so neither can change alone
    assert typing.get_type_hints(NormOptions).keys() == EXTRAS.keys()
    assert _split(_NormBase)[1] == EXTRAS


def test_act_and_renorm_layers_keep_their_own_arguments():
    positional, keyword = _split(nl.nn.BatchNormAct2d)
    assert positional == _split(torch.nn.BatchNorm2d)[0]
    assert keyword == {"activation": "relu", "activation_param": None, "inplace": False}  # and **kwargs
    positional, keyword = _split(nl.nn.BatchRenorm2d)
    assert [name for name, _ in positional] == ["num_features", "eps", "momentum", "affine", "device", "dtype"]
    assert keyword.keys() == {"schedule", *EXTRAS}
    layer = nl.nn.BatchRenorm2d(3, affine=True, bias=False, unbiased_running_var=False, on_nonfinite="raise")
    assert (layer.bias, layer.unbiased_running_var, layer.on_nonfinite, layer.track_running_stats) == (
        None,
        False,
        "raise",
        True,
    )
