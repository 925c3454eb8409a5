"""Jobs shared between studies: a task mapped with ``share=True`` whose function and
arguments equal an earlier one's in the same worker pool is run once (the norm-free and
qk-norm studies train the same LayerNorm language models)."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from normlab.experiments.char_lm import SMOKE_RECIPE, lm_job
from normlab.experiments.runner import _job_key, call, job_clock, parallel_map, worker_pool
from normlab.experiments.studies import norm_free, qk_norm

CALLS: list[dict] = []


def _counted(**task) -> dict:
    CALLS.append(task)
    return dict(task)


def _token(**task) -> dict:
    return {**task, "token": uuid.uuid4().hex, "pid": os.getpid()}


def test_a_shared_job_runs_once_in_this_process():
    CALLS.clear()
    tasks = [{"i": 0, "x": (1.0, None)}, {"i": 1, "x": (1.0, None)}]
    with worker_pool(1):
        with job_clock() as first:
            assert parallel_map(_counted, tasks, share=True) == tasks
        with job_clock() as second:
            assert parallel_map(call, [{"fn": _counted, **t} for t in tasks], share=True) == tasks
        assert parallel_map(_counted, tasks) == tasks  # not shared: run again
    assert len(CALLS) == 4
    assert (first.jobs, second.jobs) == (2, 0)  # a reused result costs its study nothing
    assert parallel_map(_counted, tasks, share=True) == tasks  # outside a pool block: nothing kept
    assert len(CALLS) == 6


def test_a_shared_job_runs_once_in_the_worker_pool_across_threads():
    tasks = [{"i": i} for i in range(4)]
    got: dict[str, list[dict]] = {}
    with worker_pool(2):
        threads = [
            threading.Thread(target=lambda n=n: got.__setitem__(n, parallel_map(_token, tasks, share=True)))
            for n in ("a", "b")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        unshared = parallel_map(_token, tasks)
    assert [r["token"] for r in got["a"]] == [r["token"] for r in got["b"]]
    assert not {r["token"] for r in unshared} & {r["token"] for r in got["a"]}


def test_job_keys_compare_every_argument_by_value():
    assert _job_key(_counted, {"a": 1, "b": 2.0}) == _job_key(call, {"b": 2.0, "fn": _counted, "a": 1})
    assert _job_key(_counted, {"a": 1}) != _job_key(_counted, {"a": 1.0})  # int and float differ
    assert _job_key(_counted, {"a": 1}) != _job_key(_token, {"a": 1})
    assert _job_key(_counted, {"c": norm_free.Config()}) != _job_key(_counted, {"c": norm_free.Config(steps=1)})
    with pytest.raises(TypeError, match="plain data"):
        _job_key(_counted, {"a": object()})


def test_norm_free_and_qk_norm_share_their_layernorm_runs():
    """At the quick setting qk-norm's runs without QK-norm at lr 3e-3 and 3e-2 are norm-free's
    LayerNorm runs, and the suite trains them once."""
    nf = norm_free.STUDY.settings["quick"]
    qk = qk_norm.STUDY.settings["quick"]
    nf_keys = {_job_key(call, norm_free.lm_run(nf, n, lr, 0.5, 0)): (n, lr) for n in nf.norms for lr in nf.lrs}
    qk_keys = {_job_key(lm_job, qk_norm.one_run(qk, a, lr, 0)): (a, lr) for a in qk.arms for lr in qk.lrs}
    assert sorted(nf_keys[k] for k in nf_keys.keys() & qk_keys.keys()) == [("layer", 3e-3), ("layer", 3e-2)]


def test_a_shared_language_model_run_gives_each_study_its_own_numbers(tmp_path):
    nf = norm_free.Config(
        norms=("layer",), lrs=(3e-3,), alphas=(0.5,), classifier_steps=0, **{**SMOKE_RECIPE, "steps": 10}
    )
    qk = qk_norm.Config(lrs=(3e-3,), **{**SMOKE_RECIPE, "steps": 10})
    alone = qk_norm.measure(qk, tmp_path)["runs"]
    with worker_pool(1):
        nf_runs = norm_free.measure(nf, tmp_path)["runs"]
        with job_clock() as clock:
            qk_runs = qk_norm.measure(qk, tmp_path)["runs"]
    assert clock.jobs == 1  # the QK-layernorm run; the one without is norm-free's

    def numbers(runs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]

    assert numbers(qk_runs) == numbers(alone)  # the same numbers whether the run was shared or not
    none, layer = qk_runs[0], nf_runs[0]
    assert none["arm"] == "none" and layer["norm"] == "layer"
    assert none["final_valid_loss"] == layer["final_valid_loss"]
    assert none["max_attention_logit"] == layer["max_attention_logit"]
    assert set(none["curve"][0]) == {"step", "valid_loss", "max_attention_logit"}
    assert set(layer["curve"][0]) == {"step", "valid_loss"}  # each study keeps the curve keys it reads
    assert none["curve"] is not layer["curve"]


def _closure(v):
    def job(**task) -> dict:
        return {"v": v}

    return job


class _Holder:
    def __init__(self, v):
        self.v = v

    def job(self, **task) -> dict:
        return {"v": self.v}


def test_job_keys_tell_apart_arguments_equal_under_python_equality_only():
    assert _job_key(_counted, {"a": -0.0}) != _job_key(_counted, {"a": 0.0})  # 1/a, copysign differ
    assert _job_key(_counted, {"a": {1: "x"}}) != _job_key(_counted, {"a": {"1": "x"}})
    assert _job_key(_counted, {"a": (-0.0,)}) != _job_key(_counted, {"a": (0.0,)})


def test_functions_their_name_does_not_identify_are_not_shared():
    with pytest.raises(TypeError, match="module-level"):
        _job_key(_closure(1), {})
    with pytest.raises(TypeError, match="module-level"):
        _job_key(_Holder(1).job, {})
    with pytest.raises(TypeError, match="module-level"):
        _job_key(call, {"fn": lambda **t: t})


def test_a_zero_of_the_other_sign_is_run_again():
    with worker_pool(1):
        a = parallel_map(_token, [{"a": 0.0}], share=True)
        b = parallel_map(_token, [{"a": -0.0}], share=True)
    assert a[0]["token"] != b[0]["token"] and str(b[0]["a"]) == "-0.0"
