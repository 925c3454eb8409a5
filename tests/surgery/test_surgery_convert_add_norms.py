"""convert_norms(to="dyt"/"derf") and the add + norm layers: AddLayerNorm/AddRMSNorm take
(x, residual) and return (normalized, sum), which DyT and Derf cannot stand in for. They are
skipped by class — also where fx cannot trace the model and no example_input shows the call
(they were replaced, and the model raised a TypeError on its next forward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import surgery


class _Untraceable(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.lin = norm, nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e30:  # data-dependent control flow: torch.fx cannot trace it
            residual = torch.zeros_like(x)
        y, residual = self.norm(x, residual)
        return self.lin(y) + residual


@pytest.mark.parametrize("to", ["dyt", "derf"])
@pytest.mark.parametrize("norm", [nl.nn.AddRMSNorm, nl.nn.AddLayerNorm])
def test_add_norms_are_never_made_dyt_or_derf(norm, to):
    model = _Untraceable(norm(5))
    x = torch.randn(2, 3, 5)
    converted, report = surgery.convert_norms(model, to)
    assert type(converted.norm) is norm and not report.changes
    assert "residual" in report.skipped[0].reason
    torch.testing.assert_close(converted(x), model(x))
