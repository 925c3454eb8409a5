"""SyncBatchNorm in real processes on localhost (gloo): equal to single-process BatchNorm on
the whole batch — outputs, input gradients, summed weight/bias gradients, running
statistics — with uneven and empty shards; world size 1; no process group; a subset
group; non-finite batches; and a peer that stops answering."""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normlab as nl
from normlab import surgery

pytestmark = pytest.mark.timeout(180)

C = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port, seconds=60):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=seconds),
    )


def _data(sizes, dtype, seed=0):
    """Batches for two steps, plus the upstream gradient, split into per-rank shards."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    steps = []
    for _ in range(2):
        x = torch.randn(n, C, 4, 3, generator=g, dtype=torch.float64).to(dtype) * 2 + 1
        dy = torch.randn(n, C, 4, 3, generator=g, dtype=torch.float64).to(dtype)
        steps.append((x, dy))
    return steps


def _split(t, sizes):
    return list(torch.split(t, sizes))


def _layer(dtype, momentum=0.1):
    torch.manual_seed(1)
    layer = nl.nn.SyncBatchNorm(C, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def _run_steps(layer, steps, rank=None, sizes=None):
    """Train steps; returns per step (output, input grad, weight grad, bias grad) and the
    final running statistics. With ``rank``, only that rank's shard is used."""
    out = []
    for x, dy in steps:
        if rank is not None:
            x, dy = _split(x, sizes)[rank], _split(dy, sizes)[rank]
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        out.append((y.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    return out, {k: v.clone() for k, v in layer.state_dict().items()}


def _scenarios(rank, world, sizes):
    results = {}
    for name, dtype, momentum in [
        ("f64", torch.float64, 0.1),
        ("f32", torch.float32, 0.1),
        ("cumulative", torch.float64, None),
    ]:
        results[name] = _run_steps(_layer(dtype, momentum), _data(sizes, dtype), rank, sizes)
    # A non-finite batch on one rank: every rank skips the update together.
    layer = _layer(torch.float64)
    layer(_split(_data(sizes, torch.float64)[0][0], sizes)[rank])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = _split(_data(sizes, torch.float64, seed=5)[0][0].clone(), sizes)[rank]
    if rank == world - 1:  # the last rank always holds data here
        bad[0, 0, 0, 0] = float("nan")
    import warnings

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        layer(bad)
    results["nonfinite_unchanged"] = all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    return results


def _worker(rank, world, port, sizes, out_dir):
    _init(rank, world, port)
    try:
        results = _scenarios(rank, world, sizes)
        if world == 3:
            # A subset group: ranks 0 and 2 synchronize, rank 1 stays out.
            group = dist.new_group([0, 2])
            if rank != 1:
                sub_sizes = [sizes[0], sizes[2]]
                layer = _layer(torch.float64)
                layer.process_group = group
                results["subset"] = _run_steps(
                    layer, _data(sub_sizes, torch.float64, seed=3), [0, None, 1][rank], sub_sizes
                )
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(steps, dtype, momentum=0.1):
    layer = nl.nn.BatchNorm2d(C, momentum=momentum, dtype=dtype)
    layer.load_state_dict(_layer(dtype, momentum).state_dict())
    return _run_steps(layer, steps)


def _check(results, sizes, tol, name, dtype, momentum=0.1, seed=0, ranks=None):
    ranks = ranks if ranks is not None else list(range(len(sizes)))
    expected, expected_state = _single_process(_data(sizes, dtype, seed), dtype, momentum)
    for step, (y, gx, gw, gb) in enumerate(expected):
        per_rank = [results[r][name][0][step] for r in ranks]
        torch.testing.assert_close(torch.cat([p[0] for p in per_rank]), y, rtol=tol, atol=tol)
        torch.testing.assert_close(torch.cat([p[1] for p in per_rank]), gx, rtol=tol, atol=tol)
        # Each rank holds its contribution; DDP would sum (or average) them.
        torch.testing.assert_close(sum(p[2] for p in per_rank), gw, rtol=tol, atol=tol)
        torch.testing.assert_close(sum(p[3] for p in per_rank), gb, rtol=tol, atol=tol)
    for r in ranks:
        state = results[r][name][1]
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(state[key], expected_state[key], rtol=tol, atol=tol)


@pytest.mark.parametrize("sizes", [[5, 2], [4, 0, 3]], ids=["2-ranks-uneven", "3-ranks-one-empty"])
def test_equals_single_process_batchnorm_on_the_whole_batch(tmp_path, sizes):
    mp.spawn(_worker, args=(len(sizes), _free_port(), sizes, str(tmp_path)), nprocs=len(sizes), join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(len(sizes))]
    _check(results, sizes, 1e-10, "f64", torch.float64)
    _check(results, sizes, 1e-5, "f32", torch.float32)
    _check(results, sizes, 1e-10, "cumulative", torch.float64, momentum=None)
    assert all(r["nonfinite_unchanged"] for r in results)
    if len(sizes) == 3:
        sub_sizes = [sizes[0], sizes[2]]
        sub_results = {0: results[0], 1: results[2]}
        _check(sub_results, sub_sizes, 1e-10, "subset", torch.float64, seed=3, ranks=[0, 1])
        assert "subset" not in results[1]


def _world_one(rank, port, out_dir):
    _init(rank, 1, port)
    try:
        results = _scenarios(0, 1, [6])
        try:  # the known problem: torch.nn's refuses CPU tensors once a group exists
            torch.nn.SyncBatchNorm(C)(torch.randn(4, C, 2, 2))
            results["torch_refuses_cpu"] = ""
        except ValueError as err:
            results["torch_refuses_cpu"] = str(err)
        torch.save(results, f"{out_dir}/rank0.pt")
    finally:
        dist.destroy_process_group()


def test_world_size_one_and_no_process_group_are_plain_batchnorm(tmp_path):
    mp.spawn(_world_one, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    results = [torch.load(tmp_path / "rank0.pt", weights_only=False)]
    _check(results, [6], 1e-12, "f64", torch.float64)
    # And in this process, where torch.distributed is not initialized at all:
    assert not dist.is_initialized()
    local = {"f64": _run_steps(_layer(torch.float64), _data([6], torch.float64))}
    _check([local], [6], 1e-12, "f64", torch.float64)
    assert "expected input tensor to be on GPU" in results[0]["torch_refuses_cpu"]


def _failing_peer(rank, port, out_dir, timeout, how):
    _init(rank, 2, port, seconds=timeout)
    if rank == 1:
        if how == "hangs":
            time.sleep(timeout + 6)  # stops answering, then goes away without a word
        os._exit(0)  # "dies": exits right away, mid-training
    layer = nl.nn.SyncBatchNorm(C)
    start = time.monotonic()
    try:
        layer(torch.randn(4, C, 2, 2))
        message = "no error"
    except RuntimeError as err:
        message = str(err)
    with open(f"{out_dir}/result.txt", "w") as f:
        f.write(f"{time.monotonic() - start}\n{message}")
    os._exit(0)


@pytest.mark.parametrize("how", ["hangs", "dies"])
def test_a_peer_that_dies_or_stops_answering_fails_within_the_timeout(tmp_path, how):
    timeout = 3
    mp.spawn(_failing_peer, args=(_free_port(), str(tmp_path), timeout, how), nprocs=2, join=True)
    elapsed, message = (tmp_path / "result.txt").read_text().split("\n", 1)
    # the first collective of a layer's first call is the shape check
    assert "SyncBatchNorm: the all_gather of input shapes across 2 processes failed" in message
    assert "timeout" in message
    assert float(elapsed) < timeout + 10


def _mismatched_peer(rank, port, out_dir, what):
    _init(rank, 2, port, seconds=30)
    channels = C + rank if what == "channels" else C
    dtype = (torch.float32, torch.float64)[rank] if what == "dtype" else torch.float32
    layer = nl.nn.SyncBatchNorm(channels, dtype=dtype)
    before = layer.running_mean.clone()
    try:
        layer(torch.randn(4, channels, 2, 2, dtype=dtype))
        message = "no error"
    except RuntimeError as err:  # InputError is a RuntimeError too, as torch's errors are
        message = f"{type(err).__name__}: {err}"
    unchanged = torch.equal(layer.running_mean, before) and int(layer.num_batches_tracked) == 0
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(f"{unchanged}\n{message}")
    dist.destroy_process_group()


@pytest.mark.parametrize("what", ["channels", "dtype"])
def test_ranks_that_disagree_about_the_input_all_raise_the_same_clear_error(tmp_path, what):
    """gloo used to abort one rank (SIGABRT) while another updated its statistics."""
    mp.spawn(_mismatched_peer, args=(_free_port(), str(tmp_path), what), nprocs=2, join=True)
    results = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in range(2)]
    assert results[0][1] == results[1][1]
    assert results[0][1].startswith("InputError: SyncBatchNorm: the processes disagree about the input")
    assert "rank 0: C=3" in results[0][1]
    assert all(unchanged == "True" for unchanged, _ in results)


def test_convert_sync_batchnorm_and_back():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Identity(),
        nl.nn.BatchNorm2d(4, momentum=None),
    )
    model.train()
    for _ in range(2):
        model(torch.randn(5, 3, 6, 6))
    model.eval()
    synced, report = surgery.convert_sync_batchnorm(model)
    assert [c.path for c in report.changes] == ["1", "4"]
    assert isinstance(synced[1], nl.nn.SyncBatchNorm) and synced[4].momentum is None
    assert not synced.training
    for k, v in model.state_dict().items():
        assert torch.equal(synced.state_dict()[k], v)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(synced(x), model(x), rtol=1e-5, atol=1e-5)
    back, report = surgery.revert_sync_batchnorm(synced)
    assert type(back[1]) is torch.nn.BatchNorm2d and type(back[4]) is nl.nn.BatchNorm2d
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    group_report = surgery.convert_sync_batchnorm(model, process_group="sentinel").model
    assert group_report[1].process_group == "sentinel"


# --- SyncBatchNormAct: SyncBatchNorm followed by the activation ----------------------------

ACT_CASES = (("leaky_relu", 0.2), ("prelu", None), ("silu", None))


def _act_pair(activation, param):
    """A SyncBatchNormAct and the same state as SyncBatchNorm → the activation module."""
    torch.manual_seed(2)
    fused = nl.nn.SyncBatchNormAct(C, activation=activation, activation_param=param)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-0.5, 0.5)
        if activation == "prelu":
            fused.act.weight.uniform_(0.05, 0.3)
    norm = nl.nn.SyncBatchNorm(C)
    norm.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("act.")})
    act = copy.deepcopy(fused.act)
    return fused, torch.nn.Sequential(norm, act)


def _act_steps(module, norm, steps, rank, sizes):
    """Two training steps and one in eval mode: outputs, input and parameter gradients; and
    the running statistics."""
    out = []
    for training, (x, dy) in zip((True, True, False), steps + steps[:1]):
        if rank is not None:
            x, dy = _split(x, sizes)[rank], _split(dy, sizes)[rank]
        module.train(training)
        xi = x.clone().requires_grad_()
        y = module(xi)
        out.append((y.detach(), *torch.autograd.grad(y, [xi, *module.parameters()], dy)))
    return out, [norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()]


def _fused_equals_norm_then_act(rank, sizes):
    steps = _data(sizes, torch.float32)
    for activation, param in ACT_CASES:
        fused, reference = _act_pair(activation, param)
        ours = _act_steps(fused, fused, steps, rank, sizes)
        theirs = _act_steps(reference, reference[0], steps, rank, sizes)
        for a, b in zip([*ours[0], ours[1]], [*theirs[0], theirs[1]]):
            assert len(a) == len(b)
            for t, u in zip(a, b):
                torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-6, msg=lambda m, name=activation: f"{name}: {m}")


def _act_worker(rank, world, port, sizes):
    _init(rank, world, port)
    try:
        _fused_equals_norm_then_act(rank, sizes)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[5, 2], [6]], ids=["2-ranks", "1-rank"])
def test_sync_batchnorm_act_is_sync_batchnorm_then_the_activation(sizes):
    # an assertion failing in a rank fails the spawn, with that rank's traceback
    mp.spawn(_act_worker, args=(len(sizes), _free_port(), sizes), nprocs=len(sizes), join=True)


def test_sync_batchnorm_act_without_a_process_group_is_the_fused_pass():
    assert not dist.is_initialized()
    _fused_equals_norm_then_act(None, [6])
    layer = nl.nn.SyncBatchNormAct(C, activation="leaky_relu", activation_param=0.2)
    x = torch.randn(6, C, 4, 3)
    for training in (True, False):
        layer.train(training)
        with nl.core.record_dispatch() as log:
            layer(x)
        assert [op for op, _, _ in log] == ["batch_norm_act"]  # one op: norm and activation fused
    assert "activation='leaky_relu', activation_param=0.2" in repr(layer)


@pytest.mark.parametrize("make", [nl.nn.SyncBatchNormAct, nl.nn.BatchNormAct2d], ids=lambda cls: cls.__name__)
def test_a_norm_act_constructors_errors_name_the_class_called(make):
    """SyncBatchNormAct's inplace=True and an unknown keyword (before: TypeError naming
    SyncBatchNorm.__init__, or normlab's private _BatchNorm.__init__ for BatchNormAct2d)."""
    if make is nl.nn.SyncBatchNormAct:
        with pytest.raises(ValueError, match=r"^SyncBatchNormAct has no in-place mode .*inplace=False"):
            make(4, activation="leaky_relu", inplace=True)
        assert make(4, inplace=False).inplace is False
    with pytest.raises(TypeError, match=rf"^{make.__name__}\.__init__\(\) got an unexpected keyword argument 'inplce'"):
        make(4, inplce=True)
    assert make(4, bias=False, on_nonfinite="raise").bias is None  # the plain norm's keywords pass through


def test_convert_sync_batchnorm_keeps_the_freeze_and_the_activation():
    model = torch.nn.Sequential(
        nl.nn.BatchNormAct2d(4, activation="leaky_relu", activation_param=0.2).freeze(affine=False),
        nl.nn.BatchNorm2d(4).freeze(),
        torch.nn.BatchNorm2d(4),
    )
    synced = surgery.convert_sync_batchnorm(model).model
    assert type(synced[0]) is nl.nn.SyncBatchNormAct and synced[0].activation_param == 0.2
    assert [(m.frozen, m.frozen_affine) for m in synced] == [(True, False), (True, True), (False, False)]
    assert synced[0].weight.requires_grad and not synced[1].weight.requires_grad
    back = surgery.revert_sync_batchnorm(synced).model
    assert type(back[0]) is nl.nn.BatchNormAct2d and type(back[2]) is torch.nn.BatchNorm2d
    assert [(back[0].frozen, back[0].frozen_affine), (back[1].frozen, back[1].frozen_affine)] == [
        (True, False),
        (True, True),
    ]
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(back(x), model(x))


# --- every rank's batch empty: as BatchNorm2d on N = 0 ---------------------------------------------


def _all_empty_worker(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        layer = _layer(torch.float64)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        x = torch.randn(0, C, 4, 3, dtype=torch.float64, requires_grad=True)
        try:
            y = layer(x)
            y.sum().backward()
            outcome = (tuple(y.shape), tuple(x.grad.shape), layer.weight.grad.abs().sum().item())
        except Exception as err:  # recorded, so the test shows the message
            outcome = f"{type(err).__name__}: {err}"
        untouched = all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
        # and the ranks are still in step: the next, non-empty call synchronizes as usual
        after = layer(torch.randn(2 + rank, C, 4, 3, dtype=torch.float64)).shape[0]
        torch.save({"outcome": outcome, "untouched": untouched, "after": after}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_empty_is_an_empty_output_and_no_update(tmp_path):
    mp.spawn(_all_empty_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = nl.nn.BatchNorm2d(C, dtype=torch.float64)
    before = {k: v.clone() for k, v in single.state_dict().items()}
    assert single(torch.randn(0, C, 4, 3, dtype=torch.float64)).shape == (0, C, 4, 3)  # the reference
    assert all(torch.equal(v, before[k]) for k, v in single.state_dict().items())
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["outcome"] == ((0, C, 4, 3), (0, C, 4, 3), 0.0), result["outcome"]
        assert result["untouched"] and result["after"] == 2 + rank
