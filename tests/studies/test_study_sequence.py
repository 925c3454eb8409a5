"""The sequence study: its model honours the mask, and at the smoke setting it writes what
it promises and finds the robust direction — BatchNorm that counts the padding gets its
statistics wrong by more as the padding share grows; with the mask, it does not."""

from __future__ import annotations

import json

import pytest
import torch

from normlab.experiments import get_study, run_study
from normlab.experiments.studies.sequence import NORMS, LSTMClassifier, pad, statistics_error


@pytest.mark.parametrize("norm", ["none", "bn-masked", "ln", "bn-time"])
def test_padding_value_never_reaches_the_output(norm):
    """The state is held through padded steps and every statistic that sees the padding is
    masked, so what the padding holds changes nothing (train mode: batch statistics)."""
    torch.manual_seed(0)
    model = LSTMClassifier(norm, features=4, steps=10, hidden=8)
    x = torch.randn(6, 10, 4)
    lengths = torch.tensor([10, 3, 7, 5, 10, 8])
    a, mask = pad(x, lengths, 0.0)
    b, _ = pad(x, lengths, 1e3)
    torch.testing.assert_close(model(a, mask), model(b, mask), rtol=1e-5, atol=1e-5)


def test_naive_batchnorm_output_depends_on_the_padding():
    torch.manual_seed(0)
    model = LSTMClassifier("bn-naive", features=4, steps=10, hidden=8)
    x = torch.randn(6, 10, 4)
    lengths = torch.tensor([10, 3, 7, 5, 10, 8])
    a, mask = pad(x, lengths, 0.0)
    b, _ = pad(x, lengths, 3.0)
    assert (model(a, mask) - model(b, mask)).abs().max() > 1e-2


def test_statistics_error_grows_with_padding_and_the_mask_removes_it():
    rows = statistics_error((0.0, 0.2, 0.4, 0.6, 0.8), pad_value=3.0, patch=4)
    assert [r["pad_share"] for r in rows] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    naive = [r["naive_mean_error"] for r in rows]
    assert naive[0] < 1e-5  # no padding: both are the plain batch statistics
    assert all(b > a for a, b in zip(naive, naive[1:]))
    assert naive[-1] > 0.5  # half a standard deviation or more at 80% padding
    assert max(r["naive_var_error"] for r in rows[1:]) > 0.2
    for r in rows:
        assert r["masked_mean_error"] < 1e-5 and r["masked_var_error"] < 1e-5


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        LSTMClassifier("batch", features=4, steps=10)


@pytest.mark.slow
def test_smoke_run_writes_json_figure_and_finds_the_statistics_error(tmp_path):
    assert set(get_study("sequence").settings) == {"smoke", "quick", "full"}
    result = run_study("sequence", "smoke", tmp_path)
    on_disk = json.loads((tmp_path / "result.json").read_text())  # strict JSON
    assert on_disk["study"] == "sequence" and on_disk["setting"] == "smoke"
    for fig in result["figures"]:
        assert (tmp_path / fig["file"]).stat().st_size > 1000
    for table in result["tables"]:
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    assert {r["norm"] for r in result["data"]["runs"]} == set(NORMS)
    for row in result["data"]["runs"]:
        assert not row["diverged"] and 0.0 <= row["eval_mode"] <= 1.0 and 0.0 <= row["train_mode"] <= 1.0
    assert result["comparison"][0]["agrees"] == "yes"  # the statistics row: deterministic
    assert all(c["agrees"] in ("yes", "partly", "no") for c in result["comparison"])
