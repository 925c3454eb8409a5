"""precise_bn and non-finite data: a batch with NaN or inf in a layer's input is left out of
that layer's statistics (with a warning and a count in the report) instead of making them NaN
for good; NaN at the masked positions of a masked call is not counted at all, as the layer
itself does not count it; statistics that overflow the buffers' dtype are not written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import surgery


def _population(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([b.double().transpose(0, 1).reshape(b.shape[1], -1) for b in batches], dim=1)
    return values.mean(1), values.var(1)  # unbiased, as the layer keeps it


def test_a_batch_with_nan_or_inf_is_left_out_of_the_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4))
    good = [torch.randn(4, 4, 3, 3) * 2 + 1 for _ in range(2)]
    bad = torch.randn(4, 4, 3, 3)
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 2, 1, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="1 of the 3 batches"):
        new, report = surgery.precise_bn(model, [good[0], bad, good[1]])
    mean, var = _population(good)
    torch.testing.assert_close(new[0].running_mean, mean.float())
    torch.testing.assert_close(new[0].running_var, var.float())
    assert report.changes[0].detail["nonfinite_batches_left_out"] == 1


def test_a_layer_that_saw_only_non_finite_batches_keeps_its_statistics_and_says_why():
    model = nn.Sequential(nn.BatchNorm2d(4))
    with pytest.warns(RuntimeWarning):
        new, report = surgery.precise_bn(model, [torch.full((2, 4, 2, 2), float("inf"))])
    assert torch.equal(new[0].running_mean, torch.zeros(4)) and torch.equal(new[0].running_var, torch.ones(4))
    assert not report.changes and "NaN or inf" in report.skipped[0].reason


def test_nan_at_masked_positions_is_not_counted():
    torch.manual_seed(0)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nl.nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            return self.bn(x, mask=valid)

    x = torch.randn(4, 3, 6)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[:, 4:] = False
    x[:, :, 4:] = float("nan")  # padding
    new, report = surgery.precise_bn(Masked(), [(x, valid)], forward_fn=lambda m, b: m(*b))
    mean, var = _population([x[:, :, :4]])
    torch.testing.assert_close(new.bn.running_mean, mean.float())
    torch.testing.assert_close(new.bn.running_var, var.float())
    assert "nonfinite_batches_left_out" not in report.changes[0].detail


def test_statistics_that_overflow_a_half_precision_buffer_are_not_written():
    model = nn.Sequential(nn.BatchNorm2d(2)).half()
    x = (torch.randn(8, 2, 4, 4) * 1000).half()  # variance about 1e6 > 65504
    new, report = surgery.precise_bn(model, [x])
    assert torch.equal(new[0].running_var, torch.ones(2, dtype=torch.float16))
    assert "overflow" in report.skipped[0].reason
