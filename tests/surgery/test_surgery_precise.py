"""precise_bn against statistics computed independently, in float64, over all samples."""

from __future__ import annotations

import copy
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab as nl
from normlab import surgery


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nl.nn.BatchNorm2d(3),
        nn.Conv2d(3, 6, 3),
        nn.Dropout(0.5),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3),
        nl.nn.BatchNorm2d(4),
    ).to(dtype)


def _batches(sizes, dtype=torch.float64, mean=0.0, std=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 8, 8, generator=g, dtype=dtype) * std + mean, torch.zeros(n)) for n in sizes]


def _independent_statistics(model, batches):
    """Every BN input over all batches, concatenated, with BN layers normalizing by their
    batch (train mode) and everything else in eval — computed without precise_bn."""
    reference = copy.deepcopy(model)
    reference.eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in reference.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nl.nn.BatchNorm2d)):
            m.train()
            hooks.append(
                m.register_forward_pre_hook(
                    lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0].detach().double())
                )
            )
    with torch.no_grad():
        for x, _ in batches:
            reference(x)
    for h in hooks:
        h.remove()
    stats = {}
    for name, xs in inputs.items():
        all_x = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)  # (C, every element)
        stats[name] = (all_x.mean(1), all_x.var(1, correction=1))
    return stats


def test_matches_exact_statistics_with_uneven_batches():
    model = _model()
    batches = _batches([5, 2, 9, 3])  # uneven: a per-batch average would be wrong
    result, report = surgery.precise_bn(model, batches)
    exact = _independent_statistics(model, batches)
    assert {c.path for c in report.changes} == set(exact)
    for name, (mean, var) in exact.items():
        layer = result.get_submodule(name)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)
    # And that differs from averaging the per-batch variances: the test can fail.
    x = torch.cat([b[0] for b in batches])
    per_batch = torch.stack([b[0].var((0, 2, 3)) for b in batches]).mean(0)
    assert not torch.allclose(per_batch, x.var((0, 2, 3)), rtol=1e-3)


def test_float32_data_with_large_mean_small_spread():
    model = nn.Sequential(nl.nn.BatchNorm2d(3))
    batches = _batches([16] * 8, dtype=torch.float32, mean=1e3, std=0.1)
    result, _ = surgery.precise_bn(model, batches)
    x = torch.cat([b[0] for b in batches]).double()  # the same float32 values, in float64
    exact_var = x.var((0, 2, 3))
    rel = ((result[0].running_var.double() - exact_var).abs() / exact_var).max().item()
    assert rel < 1e-5, rel
    torch.testing.assert_close(result[0].running_mean.double(), x.mean((0, 2, 3)), rtol=1e-7, atol=1e-7)


def test_dropout_stays_in_eval_and_the_input_model_is_untouched():
    model = _model()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches([4, 4])
    first, _ = surgery.precise_bn(model, batches)
    second, _ = surgery.precise_bn(model, batches)
    for k in first.state_dict():
        assert torch.equal(first.state_dict()[k], second.state_dict()[k])  # no dropout noise
    assert first.training and all(m.training for m in first.modules())  # flags restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert torch.equal(first[0].num_batches_tracked, state["0.num_batches_tracked"])


def test_num_batches_short_loader_and_forward_fn():
    model = _model()
    batches = _batches([4] * 5)
    _, report = surgery.precise_bn(model, batches, num_batches=3)
    assert report.changes[0].detail["batches"] == 3
    _, report = surgery.precise_bn(model, batches, num_batches=50)
    assert "ran out after 5 of 50" in report.notes[0]
    dict_batches = [{"image": x} for x, _ in batches]
    result, _ = surgery.precise_bn(model, dict_batches, forward_fn=lambda m, b: m(b["image"]))
    expected, _ = surgery.precise_bn(model, batches)
    torch.testing.assert_close(result[3].running_var, expected[3].running_var)
    with pytest.raises(TypeError, match="pass forward_fn"):
        surgery.precise_bn(model, dict_batches)
    with pytest.raises(ValueError, match="no batches"):
        surgery.precise_bn(model, [])
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        surgery.precise_bn(model, batches, num_batches=0)


def test_reports_how_far_the_old_statistics_were():
    model = _model()
    _, report = surgery.precise_bn(model, _batches([8, 8], mean=5.0))
    first = next(c for c in report.changes if c.path == "0")
    assert first.detail["max_abs_mean_change"] == pytest.approx(5.0, abs=0.3)  # was 0, now ≈ 5


def test_frozen_and_untracked_layers_are_skipped():
    model = nn.Sequential(
        nl.nn.BatchNorm2d(3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nl.nn.InstanceNorm2d(3, track_running_stats=True),
    )
    model[0].freeze()
    _, report = surgery.precise_bn(model, _batches([4], dtype=torch.float32))
    reasons = {s.path: s.reason for s in report.skipped}
    assert "frozen" in reasons["0"] and "track_running_stats=False" in reasons["1"]
    assert "BatchNorm statistics only" in reasons["2"]
    assert "nothing to do" in report.notes[0]


# --- across processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, shards, out):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result, _ = surgery.precise_bn(_model(), shards[rank])
        torch.save({k: v for k, v in result.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_statistics_are_merged_across_processes(tmp_path):
    batches = _batches([5, 3, 6, 2, 7])
    shards = [batches[:2], batches[2:]]  # uneven shards
    mp.spawn(_worker, args=(2, _free_port(), shards, str(tmp_path)), nprocs=2, join=True)
    single, _ = surgery.precise_bn(_model(), batches)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in ("0", "3", "6"):
            torch.testing.assert_close(
                state[f"{name}.running_mean"], single.get_submodule(name).running_mean, rtol=1e-12, atol=1e-12
            )
            torch.testing.assert_close(
                state[f"{name}.running_var"], single.get_submodule(name).running_var, rtol=1e-12, atol=1e-12
            )


# --- issue 26: masks, keyword inputs, the variance convention, the batch count ------------------


class _Masked(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.bn = layer

    def forward(self, x, mask):
        return self.bn(x, mask=mask)


def _padded(pad_value=100.0):
    """(N, C, L) sequences of different lengths, the padding filled with ``pad_value``."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 10, generator=g, dtype=torch.float64)
    lengths = torch.tensor([10, 6, 3, 1])
    mask = torch.arange(10)[None, :] < lengths[:, None]  # (N, L): True where valid
    x = torch.where(mask[:, None, :], x, torch.full_like(x, pad_value))
    return x, mask


@pytest.mark.parametrize("layer", ["BatchNorm1d", "SyncBatchNorm", "BatchNormAct1d"])
def test_masked_layers_count_valid_positions_only(layer):
    model = _Masked(getattr(nl.nn, layer)(2, dtype=torch.float64))
    batches = [_padded(), _padded(-50.0)]
    result, report = surgery.precise_bn(model, batches, forward_fn=lambda m, b: m(*b))
    valid = torch.cat([x.permute(1, 0, 2)[:, mask] for x, mask in batches], dim=1)  # (C, valid values)
    torch.testing.assert_close(result.bn.running_mean, valid.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.bn.running_var, valid.var(1, correction=1), rtol=1e-12, atol=1e-12)
    assert report.changes[0].detail["elements_per_channel"] == valid.shape[1] == 40


def test_keyword_input_is_seen():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(2, dtype=torch.float64)

        def forward(self, x):
            return self.bn(input=x)

    x = torch.randn(8, 2, dtype=torch.float64) * 3 + 1
    result, _ = surgery.precise_bn(Keyword(), [x])
    torch.testing.assert_close(result.bn.running_mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.bn.running_var, x.var(0), rtol=1e-12, atol=1e-12)


def test_biased_running_variance_convention_is_kept():
    layer = nl.nn.BatchNorm1d(1, unbiased_running_var=False, dtype=torch.float64)
    result, _ = surgery.precise_bn(nn.Sequential(layer), [torch.tensor([[0.0], [2.0]], dtype=torch.float64)])
    assert result[0].running_var.item() == 1.0  # the biased variance of {0, 2}; unbiased is 2


def test_a_generator_is_drawn_num_batches_times():
    drawn = []

    def loader():
        for i in range(10):
            drawn.append(i)
            yield torch.randn(4, 1)

    surgery.precise_bn(nn.Sequential(nl.nn.BatchNorm1d(1)), loader(), num_batches=3)
    assert len(drawn) == 3


def test_a_layer_that_never_runs_is_skipped_and_keeps_its_statistics():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nl.nn.BatchNorm1d(2), nl.nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    model = Branchy()
    with torch.no_grad():
        model.unused.running_mean.fill_(3.0)
    result, report = surgery.precise_bn(model, [torch.randn(4, 2)])
    assert [c.path for c in report.changes] == ["used"]
    assert [s.path for s in report.skipped] == ["unused"] and "never ran" in report.skipped[0].reason
    assert torch.equal(result.unused.running_mean, model.unused.running_mean)
    with pytest.raises(ValueError, match="does forward_fn call the model"):
        surgery.precise_bn(model, [torch.randn(4, 2)], forward_fn=lambda m, b: None)
