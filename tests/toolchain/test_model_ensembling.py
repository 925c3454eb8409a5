"""torch's "Model ensembling" recipe: the models' states stacked with
``torch.func.stack_module_state`` and one ``functional_call`` vmapped over them, every model
fed the same minibatch (``in_dims=None`` for the input) or its own. torch.nn's BatchNorm runs
it in training too, updating each model's slice of the stacked running estimates; normlab's
layers do the same (before, a training BatchNorm with a shared minibatch failed on a
data-dependent branch in the running update, and BatchRenorm on an in-place division).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state

import normlab as nl

MODELS = 3
LAYERS = {
    "torch.nn.BatchNorm2d": lambda: nn.BatchNorm2d(4),
    "BatchNorm2d": lambda: nl.nn.BatchNorm2d(4),
    "BatchNorm2d-cumulative": lambda: nl.nn.BatchNorm2d(4, momentum=None),
    "BatchRenorm2d": lambda: nl.nn.BatchRenorm2d(4),
    "BatchNormAct2d": lambda: nl.nn.BatchNormAct2d(4, activation="leaky_relu"),
    "InstanceNorm2d-tracking": lambda: nl.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "SwitchableNorm2d": lambda: nl.nn.SwitchableNorm2d(4),
    "SyncBatchNorm": lambda: nl.nn.SyncBatchNorm(4),
    "EvoNormB0": lambda: nl.nn.EvoNormB0(4),
    "GroupNormAct": lambda: nl.nn.GroupNormAct(2, 4),
    "FilterResponseNorm2d": lambda: nl.nn.FilterResponseNorm2d(4),
    "BatchRenorm2d-scheduled": lambda: nl.nn.BatchRenorm2d(
        4, schedule=nl.nn.batchrenorm.RenormSchedule(warmup_steps=1, ramp_steps=3)
    ),
}


@pytest.mark.parametrize("shared", [True, False], ids=["one-minibatch", "a-minibatch-each"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_vmapped_ensemble_equals_the_models_one_by_one(name, training, shared):
    torch.manual_seed(0)
    models = [LAYERS[name]().train(training) for _ in range(MODELS)]
    with torch.no_grad():  # the models differ: their parameters and estimates
        for i, model in enumerate(models):
            for tensor in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
                tensor.add_(0.1 * (i + 1))
    one_by_one = copy.deepcopy(models)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(6, 4, 3, 3) if shared else torch.randn(MODELS, 6, 4, 3, 3)
    ensemble = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None if shared else 0))
    for _ in range(2):  # the second step reads the estimates the first one updated
        out = ensemble(params, buffers, x)
        expected = torch.stack([model(x if shared else x[i]) for i, model in enumerate(one_by_one)])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for key, stacked in buffers.items():
        torch.testing.assert_close(stacked, torch.stack([m.get_buffer(key) for m in one_by_one]), msg=key)
    if training and "num_batches_tracked" in buffers:
        assert buffers["num_batches_tracked"].tolist() == [2] * MODELS


@pytest.mark.parametrize("shared", [True, False], ids=["one-minibatch", "a-minibatch-each"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_vmapped_ensemble_has_a_batching_rule_for_every_op(name, training, shared):
    """vmap warns of "a performance drop" where an op has no batching rule and it loops over
    the models (clamp_ in the moments EvoNorm and BatchRenorm compute, and in BatchRenorm's
    schedule): none of normlab's ops may take that fallback."""
    models = [LAYERS[name]().train(training) for _ in range(MODELS)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(6, 4, 3, 3) if shared else torch.randn(MODELS, 6, 4, 3, 3)
    ensemble = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None if shared else 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the second step: past BatchRenorm's warm-up
            ensemble(params, buffers, x)
    assert [str(w.message) for w in caught if "batching rule" in str(w.message)] == []
