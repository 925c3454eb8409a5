"""How a user's type checker sees normlab.diagnostics: checked by mypy (this file is in
pyproject.toml's ``[tool.mypy] files``, so tests/test_types.py covers it), never run.

Each ``assert_type`` fails the check if the public annotation drifts; each
``type: ignore[code]`` marks a call that must stay a type error (under strict,
``warn_unused_ignores`` fails the check the day it stops being one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import assert_type

import normlab.diagnostics as nd


def documented_uses(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    # layers: a class, classes, a name, names/patterns, a predicate (select_layers' docstring)
    nd.Probe(model, layers=nn.ReLU)
    nd.Probe(model, layers=(nn.ReLU, nn.Linear))
    nd.Probe(model, layers="layers.*.conv1")
    nd.Probe(model, layers=["0", "2"])
    nd.Probe(model, layers=lambda name, module: name.startswith("0"))
    with nd.Probe(model, optimizer=optimizer, unit_dim={"0": 1}) as probe:
        assert_type(probe, nd.Probe)
        model(x).sum().backward()
    assert_type(probe.attach(), nd.Probe)
    assert_type(probe.findings(dead_threshold=0.3, window=3), list[nd.Finding])
    thresholds: nd.Thresholds = {"dead_threshold": 0.3, "window": 3}
    assert_type(probe.findings(**thresholds), list[nd.Finding])
    assert_type(probe.findings()[0].numbers, dict[str, float | dict[str, float]])
    assert_type(probe.report("r.html", "title", vanishing_ratio=1e4), Path | None)
    assert_type(probe.to_dict(), dict[str, Any])
    assert_type(probe.to_json("p.json"), Path | None)
    assert_type(probe.latest("std", 5), dict[str, float])
    assert_type(probe.series("0", "std"), tuple[list[int], list[float]])
    assert_type(probe.histogram("0"), tuple[list[float], list[float]])
    assert_type(nd.diagnose(probe, window=2), list[nd.Finding])
    assert_type(nd.select_layers(model, nn.Linear), dict[str, nn.Module])
    assert_type(nd.batch_vs_running(x, x, x, 1e-5), dict[str, float])
    assert_type(nd.activation_summary(x, module=nn.ReLU()), dict[str, Any])


def rejected_uses(probe: nd.Probe) -> None:
    probe.findings(dead_treshold=0.3)  # type: ignore[call-arg]  # a misspelt threshold
    probe.findings(window=2.5)  # type: ignore[arg-type]  # a window is a count of records
    probe.report("r.html", bins=3)  # type: ignore[call-arg]  # not a threshold
    probe.findings(**nd.Thresholds(window=2.5))  # type: ignore[typeddict-item]  # a count, as above
    probe.to_tensorboard(writer=object())  # type: ignore[arg-type]  # no add_scalar/add_histogram_raw
