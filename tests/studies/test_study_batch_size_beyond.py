"""batch-size's rows for the norms beyond the classic five: which batch sizes they run at,
and each verdict computed from constructed test errors."""

from __future__ import annotations

import math

import pytest

from normlab.experiments.models import COLUMN_NORM_KINDS
from normlab.experiments.studies import batch_size
from normlab.experiments.study import StudyResult


def test_beyond_batch_sizes_are_among_the_batch_sizes():
    config = batch_size.Config(batch_sizes=(32, 8, 2), beyond_batch_sizes=(32, 8))
    assert config.sizes_for("frn") == (32, 8) and config.sizes_for("batch") == (32, 8, 2)
    assert batch_size.Config(batch_sizes=(32, 2)).sizes_for("switchable") == (32, 2)
    with pytest.raises(ValueError, match="beyond_batch_sizes must be among batch_sizes"):
        batch_size.Config(batch_sizes=(32, 8), beyond_batch_sizes=(32, 4))


def test_renorm_batch_sizes_keep_the_smallest_batch(monkeypatch):
    """BatchRenorm may skip the batch sizes its comparison does not read, never the smallest."""
    config = batch_size.Config(batch_sizes=(32, 16, 2), renorm_batch_sizes=(2,))
    assert config.sizes_for("batch_renorm") == (2,)
    assert config.sizes_for("batch") == (32, 16, 2)
    captured: list[dict] = []
    monkeypatch.setattr(batch_size, "parallel_map", lambda fn, tasks, desc="": captured.extend(tasks) or [])
    batch_size.measure(config, None)
    tasks = [t for t in captured if t["norm"] == "batch_renorm"]
    assert {t["batch_size"] for t in tasks} == {2}
    with pytest.raises(ValueError, match="renorm_batch_sizes must be among batch_sizes"):
        batch_size.Config(batch_sizes=(32, 2), renorm_batch_sizes=(4, 2))
    with pytest.raises(ValueError, match="must include the smallest batch 2"):
        batch_size.Config(batch_sizes=(32, 2), renorm_batch_sizes=(32,))


def _verdicts(errors: dict[str, tuple[float, float]], beyond_batch_sizes=None) -> dict[str, str]:
    """``errors``: norm → (test error % at batch 32, at batch 2), one seed, sd 0."""
    config = batch_size.Config(
        norms=("batch", "group", *COLUMN_NORM_KINDS), batch_sizes=(32, 2), beyond_batch_sizes=beyond_batch_sizes
    )
    series = {k: [(big, 0.0), (small, 0.0)] for k, (big, small) in errors.items()}
    result = StudyResult("batch-size", "t", "q", "smoke", {})
    batch_size._beyond_findings(config, series, result)
    return {c["what"].split(" (")[0]: c["agrees"] for c in result.comparison}


PUBLISHED_SHAPE = {  # every claim holds
    "batch": (5.0, 12.0),
    "group": (6.0, 6.0),
    "switchable": (5.2, 6.5),
    "evonorm_s0": (5.5, 6.0),
    "evonorm_b0": (5.0, 11.0),
    "frn": (4.0, 5.0),
    "group_ws": (4.8, 5.3),
}


def test_every_verdict_yes_when_the_numbers_have_the_papers_shape():
    verdicts = _verdicts(PUBLISHED_SHAPE)
    assert len(verdicts) == 6 and set(verdicts.values()) == {"yes"}


def test_verdicts_partly_and_no_follow_the_margins():
    errors = dict(PUBLISHED_SHAPE)
    errors["switchable"] = (8.0, 6.5)  # far behind BN at 32, clearly ahead at 2: partly
    errors["evonorm_s0"] = (5.5, 11.8)  # ahead of BN at 2 by 0.2 < the 0.5 tie: partly
    errors["evonorm_b0"] = (6.0, 11.0)  # behind BN at 32 by 1.0, within twice the tie: partly
    errors["frn"] = (5.3, 7.0)  # level with BN at 32 (partly), behind GN at 2 by 1.0 (no)
    errors["group_ws"] = (5.8, 5.9)  # behind BN at 32 by 0.9, but better than GN alone: partly
    verdicts = _verdicts(errors)
    assert verdicts["Switchable Norm: as good as BN at large batch, far better at small"] == "partly"
    assert verdicts["EvoNorm-S0 beats BN + ReLU at small batch"] == "partly"
    assert verdicts["EvoNorm-B0 matches or beats BN + ReLU at large batch"] == "partly"
    assert verdicts["FRN + TLU is ahead of BN at large batch"] == "partly"
    assert verdicts["FRN + TLU is ahead of GN at small batch"] == "no"
    assert verdicts["GN + WS at small batch"] == "partly"
    errors.update(evonorm_s0=(5.5, 13.0), evonorm_b0=(7.5, 11.0), group_ws=(7.0, 7.0), switchable=(8.0, 12.0))
    verdicts = _verdicts(errors)
    assert verdicts["EvoNorm-S0 beats BN + ReLU at small batch"] == "no"
    assert verdicts["EvoNorm-B0 matches or beats BN + ReLU at large batch"] == "no"
    assert verdicts["GN + WS at small batch"] == "no"
    assert verdicts["Switchable Norm: as good as BN at large batch, far better at small"] == "no"


def test_verdicts_read_the_beyond_batch_sizes():
    # Run at batch 32 only for the new norms: "small" is 32 too, so the small-batch claims
    # compare at 32, and the missing batch-2 cells never enter a verdict.
    errors = {k: (v[0], math.nan if k in COLUMN_NORM_KINDS else v[1]) for k, v in PUBLISHED_SHAPE.items()}
    config = batch_size.Config(
        norms=("batch", "group", *COLUMN_NORM_KINDS), batch_sizes=(32, 2), beyond_batch_sizes=(32,)
    )
    series = {k: [(big, 0.0), (small, 0.0)] for k, (big, small) in errors.items()}
    result = StudyResult("batch-size", "t", "q", "smoke", {})
    batch_size._beyond_findings(config, series, result)
    assert all("batch 32" in c["ours"] and "batch 2 " not in c["ours"] for c in result.comparison)
