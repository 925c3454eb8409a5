"""The benchmarks measure what they say: tiny configurations, no timing asserted.

What is asserted is what does not depend on the machine: both sides of a row compute the
same thing, the byte counts order the way the design says, every BatchNorm gets folded.
"""

import dataclasses
import math

import pytest
from torch import nn

from normlab import nn as nln
from normlab.bench.fold import FoldBenchConfig, run_fold_benchmark
from normlab.bench.layers import LayerCase, cases, format_layer_table, run_case, summary
from normlab.bench.memory import MemoryBenchConfig, format_memory_table, run_memory_benchmark
from normlab.bench.probe import ProbeBenchConfig, format_probe_table, run_probe_benchmark
from normlab.bench.timing import interleaved_medians


def _small(case: LayerCase) -> LayerCase:
    shape = (8, 64, 8, 8) if len(case.shape) == 4 else (512, 64) if "Norm1d" in case.layer else (512, 48)
    return dataclasses.replace(case, shape=shape)


@pytest.mark.parametrize("case", [_small(c) for c in cases(quick=True)], ids=lambda c: f"{c.layer}-{c.layout}")
def test_layer_rows_compare_the_same_computation(case):
    row = run_case(case, threads=1, repeats=1)
    assert row["max_rel_diff"] <= 1e-5, row
    assert row["err_ours"] <= 1e-5 and row["err_torch"] <= 1e-5, row
    for key in ("fwd_ours_copy", "fwd_torch_copy", "fwd_ratio"):
        assert math.isfinite(row[key]) and row[key] > 0
    if case.train:
        assert row["saved_mb_ours"] > 0 and row["saved_mb_torch"] > 0
        if case.layer.startswith(("BatchNormAct2d", "add_")):  # the fused layer keeps at most what torch keeps
            assert row["saved_mb_ours"] <= row["saved_mb_torch"]
    assert row["kink_excluded"] <= 1e-3 * math.prod(case.shape)  # only entries at the ReLU kink
    text = format_layer_table([row])
    assert case.layer in text
    assert summary([row])["rows"] == 1


def test_layer_benchmark_would_catch_a_wrong_layer():
    wrong = LayerCase("LayerNorm with a wrong eps", (24, 48), "rows", lambda c: nln.LayerNorm(c, eps=1.0), nn.LayerNorm)
    assert run_case(wrong, threads=1, repeats=1)["max_rel_diff"] > 1e-3


def test_memory_benchmark_orders_the_saved_bytes():
    rows = run_memory_benchmark(MemoryBenchConfig(batch=8, image=32, width=8, blocks=2, threads=1))
    torch_row, fused, inplace = rows
    # Same model, same data, same seed: the three variants train identically...
    assert fused["loss"] == pytest.approx(torch_row["loss"], rel=1e-4)
    assert inplace["loss"] == pytest.approx(torch_row["loss"], rel=1e-4)
    # ...keeping less for backward: the fused layer one tensor per pair, in-place only outputs.
    assert inplace["saved_for_backward_mb"] < fused["saved_for_backward_mb"] < torch_row["saved_for_backward_mb"]
    assert "inplace=True" in format_memory_table(rows)


def test_fold_benchmark_folds_every_batchnorm_exactly():
    rows = run_fold_benchmark(FoldBenchConfig(batch_sizes=(1,), widths=(8,), image_size=16, repeats=1, threads=1))
    (row,) = rows
    assert row["folded_pairs"] == 20 and row["skipped"] == 0
    assert row["max_abs_diff"] < 1e-4


def test_interleaved_medians_shuffle_varies_the_neighbours():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    interleaved_medians(fns, repeats=30, warmup=0)
    assert calls == list("abc") * 30  # the default: one fixed order
    calls.clear()
    interleaved_medians(fns, repeats=30, warmup=0, shuffle=True)
    assert sorted(calls) == sorted(list("abc") * 30)
    rounds = {tuple(calls[i : i + 3]) for i in range(0, 90, 3)}
    # every function sometimes runs first and sometimes right after each of the others
    assert {r[0] for r in rounds} == set("abc")
    followers = {(calls[i - 1], calls[i]) for i in range(1, 90)}
    assert all((p, f) in followers for p in "abc" for f in "abc" if p != f)


def test_probe_benchmark_times_probes_that_record():
    config = ProbeBenchConfig(steps_per_sample=2, repeats=1, intervals=(1, 10))
    rows = {r["setting"]: r for r in run_probe_benchmark(config)}
    assert list(rows) == ["no probe", "every 1", "every 10"]
    steps = (2 + 1) * config.steps_per_sample  # two warm-up rounds, one timed
    # 10 watched layers (3 conv, 3 BatchNorm, 3 ReLU, the Linear): every step, or only the first
    assert rows["every 1"]["records"] == 10 * steps and rows["every 10"]["records"] == 10
    assert "records" not in rows["no probe"] and rows["no probe"]["slowdown"] == 0.0
    assert all(math.isfinite(r["ms_per_step"]) for r in rows.values())
    assert "read ms/record" in format_probe_table(list(rows.values()))
