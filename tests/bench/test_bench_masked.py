"""normlab bench masked: each row runs, routes as the path rule says, and reports errors
against float64 that are small (tiny shapes, one repetition: no timing is checked)."""

from __future__ import annotations

import argparse
import json

import normlab as nl
import normlab.bench.layers
import normlab.bench.masked
import normlab.cli.bench
from normlab.bench.masked import MaskedCase, format_masked_table, padded_mask, run_masked_case


def test_a_masked_row_reports_ratios_its_path_and_small_errors():
    kernels = nl.core.kernels_available() and nl.core.backend() in ("auto", "kernels")
    rows = [
        run_masked_case(MaskedCase("BatchNorm1d", (4, 8, 16), "NCL", nl.nn.BatchNorm1d), threads=1, repeats=1),
        run_masked_case(
            MaskedCase("GroupNorm(2)", (2, 4, 3, 5), "channels_last", lambda c: nl.nn.GroupNorm(2, c)),
            threads=1,
            repeats=1,
        ),
    ]
    for row in rows:
        assert row["path"] == ("kernels" if kernels else "composed")
        assert row["err_masked"] < 1e-5 and row["err_composed"] < 1e-5
        assert all(row[k] > 0 for k in ("fwd_masked_plain", "fb_masked_plain", "fwd_composed_plain"))
    table = format_masked_table(rows)
    assert "BatchNorm1d" in table and "channels_last" in table


def test_the_padded_mask_keeps_a_prefix_of_every_sample():
    mask = padded_mask((4, 3, 10))
    assert mask.shape == (4, 10) and mask.sum(1).tolist() == [5, 7, 8, 10]
    assert all(bool(row[: int(row.sum())].all()) for row in mask)


def test_out_writes_the_benchmark_the_machine_the_backend_and_the_rows(tmp_path, monkeypatch, capsys):
    rows = [
        {
            "layer": "BatchNorm1d",
            "fwd_masked_plain": 1.2,
            "fb_masked_plain": 1.7,
            "err_masked": 1e-7,
            "err_composed": 2e-7,
        }
    ]
    # no timing and no table: what --out writes is under test
    monkeypatch.setattr(normlab.bench.masked, "run_masked_benchmark", lambda **_: rows)
    monkeypatch.setattr(normlab.bench.masked, "format_masked_table", lambda _: "")
    monkeypatch.setattr(normlab.bench.layers, "tune_malloc", lambda: False)
    monkeypatch.setattr(normlab.cli.bench, "machine_info", lambda: {"cpu": "stub"})
    out = tmp_path / "masked.json"
    args = argparse.Namespace(quick=True, threads=[1], repeats=1, out=str(out))
    assert normlab.cli.bench.run_masked(args) == 0
    written = json.loads(out.read_text())
    assert list(written) == ["benchmark", "machine", "backend", "rows"]
    assert written["benchmark"] == "masked" and written["backend"] == nl.core.paths.status()
    assert written["rows"] == rows and written["machine"] == {"cpu": "stub"}
    printed = capsys.readouterr().out
    assert "masked <= 1.5x unmasked (fwd and f+b): 0/1 rows" in printed and f"wrote {out}" in printed
