"""convert_norms on layers that see one position per channel — a BatchNorm1d on a Linear's
(N, C) output, a BatchNorm2d after global pooling: with example_input it must not build an
instance norm, or a group norm with one value per group, that refuses the model's input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import surgery


def _head_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.BatchNorm2d(8),  # (N, 8, 1, 1)
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),  # (N, 6)
    )


def _runs(model: nn.Module, x: torch.Tensor) -> None:
    for training in (True, False):
        model.train(training)(x).sum().backward()


def test_group_and_instance_targets_skip_or_widen_groups_where_a_channel_has_one_position():
    torch.manual_seed(0)
    model, x = _head_model(), torch.randn(4, 3, 5, 5)

    auto, report = surgery.convert_norms(model, "group", example_input=x)
    _runs(auto, x)  # it raised "each of the 8 groups holds a single value"
    assert [(c.path, c.detail["groups"]) for c in report.changes] == [("1", 8), ("4", 4), ("7", 3)]

    explicit, report = surgery.convert_norms(model, "group", groups=8, example_input=x)
    _runs(explicit, x)
    assert [c.path for c in report.changes] == ["1"]
    assert {s.path: "one position per channel" in s.reason for s in report.skipped} == {"4": True, "7": False}
    assert isinstance(explicit[4], nn.BatchNorm2d)

    instance, report = surgery.convert_norms(model, "instance", example_input=x)
    _runs(instance, x)  # it raised "Expected more than 1 spatial element when training"
    assert [c.path for c in report.changes] == ["1"] and isinstance(instance[1], nl.nn.InstanceNorm2d)
    assert [s.path for s in report.skipped] == ["4", "7"]
    assert all("one position per channel" in s.reason for s in report.skipped)


def test_layers_with_more_than_one_value_per_group_are_converted_as_before():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    x = torch.randn(5, 4)
    converted, report = surgery.convert_norms(model, "group", groups=2, example_input=x)
    assert converted[1].num_groups == 2 and not report.skipped
    layer, report = surgery.convert_norms(model, "layer", example_input=x)
    assert layer[1].num_groups == 1 and not report.skipped
    _runs(converted, x)
    _runs(layer, x)


def test_without_example_input_a_1d_layer_is_not_given_one_value_per_group_or_instance():
    """A BatchNorm1d may take (N, C) or (N, C, L): without example_input, "group" widens its
    groups to two channels (right on both), "instance" and one-channel groups are skipped with
    the reason — before, both were built and refused the (N, C) input at run time."""
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16))
    x = torch.randn(5, 4)
    grouped, report = surgery.convert_norms(model, "group")
    assert [(c.path, c.detail["groups"]) for c in report.changes] == [("1", 8)]
    assert any("two channels at least" in note for note in report.notes)
    _runs(grouped, x)
    grouped[1](torch.randn(5, 16, 3)).sum().backward()  # and (N, C, L)
    explicit, report = surgery.convert_norms(model, "group", groups=16)
    assert not report.changes and "may take (N, C)" in report.skipped[0].reason
    _runs(explicit, x)
    instance, report = surgery.convert_norms(model, "instance")
    assert not report.changes and "(N, C) as well as (N, C, L)" in report.skipped[0].reason
    _runs(instance, x)
    # an (N, C, L) model converts as before once example_input shows it
    seq = nn.Sequential(nn.Conv1d(4, 16, 3), nn.BatchNorm1d(16))
    converted, report = surgery.convert_norms(seq, "instance", example_input=torch.randn(5, 4, 7))
    assert isinstance(converted[1], nl.nn.InstanceNorm1d) and not report.skipped


@pytest.mark.parametrize("to", ["batch", "frozen", "batch_renorm", "layer"])
def test_a_group_norm_on_an_n_c_input_converts_to_a_1d_layer(to):
    """A GroupNorm after a Linear sees (N, C), 0 spatial dims: the 1d layers take that input
    (and GroupNorm(1, C) any rank); before, each was skipped as "0 spatial dims"."""
    model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8))
    x = torch.randn(5, 4)
    converted, report = surgery.convert_norms(model, to, example_input=x)
    assert [c.path for c in report.changes] == ["1"] and not report.skipped
    expected = {"batch": nl.nn.BatchNorm1d, "frozen": nl.nn.FrozenBatchNorm1d, "batch_renorm": nl.nn.BatchRenorm1d}
    assert isinstance(converted[1], expected.get(to, nl.nn.GroupNorm))
    _runs(converted, x)
    instance, report = surgery.convert_norms(model, "instance", example_input=x)
    assert not report.changes and "one position per channel" in report.skipped[0].reason
