"""normlab under torch's parallel engines on 2 gloo ranks, against torch.nn in the same run:
FSDP2 (``fully_shard``) training a CNN with BatchNorm and a transformer block with
LayerNorm / RMSNorm / AddRMSNorm; DTensor sequence parallelism (``SequenceParallel``) on
LayerNorm and RMSNorm, and AddRMSNorm on sequence-sharded DTensors — same outputs, same weight
gradients, the same collectives counted by ``CommDebugMode``. (DDP + SyncBatchNorm:
test_distributed_training.py and test_sync_batchnorm.py.)

One pair of processes runs every scenario (starting processes is the cost); each test
checks one scenario's record."""

from __future__ import annotations

import copy
import datetime
import json
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.timeout(300)

WORLD = 2
STEPS = 3


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over the largest entry (0 for equal tensors)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() if b.numel() else 0.0


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _Block(nn.Module):
    """A pre-norm transformer MLP block; ``fused``: the norm is an Add*Norm taking (h, x)."""

    def __init__(self, norm: nn.Module, fused: bool, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.norm = norm
        self.fused = fused
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.fused:
            y, s = self.norm(h, x)
        else:
            s = h + x
            y = self.norm(s)
        return s + self.mlp(y)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _train_fsdp(model: nn.Module, batches, mesh) -> dict:
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    state = {k: _full(v).detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "losses": torch.stack(losses)}


def _fsdp_scenarios(rank: int, mesh) -> dict:
    import normlab as nl

    records = {}
    torch.manual_seed(0)
    images = [(torch.randn(4 * WORLD, 3, 6, 6), torch.randn(4 * WORLD, 4)) for _ in range(STEPS)]
    local = [(x.chunk(WORLD)[rank], t.chunk(WORLD)[rank]) for x, t in images]
    torch.manual_seed(1)
    theirs = _cnn()
    ours = nl.surgery.from_torch(copy.deepcopy(theirs))
    ours = ours[0] if isinstance(ours, tuple) else ours
    assert sum(isinstance(m, nl.nn.BatchNorm2d) for m in ours.modules()) == 2
    records["fsdp_cnn_batchnorm"] = (_train_fsdp(ours, local, mesh), _train_fsdp(theirs, local, mesh))

    torch.manual_seed(2)
    tokens = [(torch.randn(2 * WORLD, 5, 16), torch.randn(2 * WORLD, 5, 16)) for _ in range(STEPS)]
    local = [(x.chunk(WORLD)[rank], t.chunk(WORLD)[rank]) for x, t in tokens]
    pairs = {
        "layernorm": (lambda: nl.nn.LayerNorm(16), lambda: nn.LayerNorm(16), False),
        "rmsnorm": (lambda: nl.nn.RMSNorm(16), lambda: nn.RMSNorm(16), False),
        "addrmsnorm": (lambda: nl.nn.AddRMSNorm(16), lambda: nn.RMSNorm(16), True),
    }
    for name, (make_ours, make_theirs, fused) in pairs.items():
        torch.manual_seed(3)
        theirs = _Block(make_theirs(), fused=False)
        with torch.no_grad():
            theirs.norm.weight.uniform_(0.5, 1.5)
        ours = _Block(make_ours(), fused=fused)
        ours.load_state_dict(theirs.state_dict())
        records[f"fsdp_transformer_{name}"] = (_train_fsdp(ours, local, mesh), _train_fsdp(theirs, local, mesh))
    return records


def _sequence_parallel_scenarios(rank: int, mesh) -> dict:
    from torch.distributed.tensor import DTensor, Shard, distribute_module
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    import normlab as nl

    torch.manual_seed(4)
    x_full = torch.randn(3, 4 * WORLD, 16)
    r_full = torch.randn(3, 4 * WORLD, 16)
    probe_full = torch.randn(3, 4 * WORLD, 16)
    x_local, r_local, probe = (t.chunk(WORLD, dim=1)[rank] for t in (x_full, r_full, probe_full))

    def run(layer, *inputs):
        # counted: forward, backward, and what a user then gathers (the output, the gradients)
        with CommDebugMode() as comm:
            out = layer(*inputs)
            y = out[0] if isinstance(out, tuple) else out
            local = y.to_local() if isinstance(y, DTensor) else y
            (local * probe).sum().backward()
            placements = {name: str(p.grad.placements) for name, p in layer.named_parameters()}
            grads = {name: _full(p.grad) for name, p in layer.named_parameters()}
            full = _full(y)
        counts = {str(op): n for op, n in comm.get_comm_counts().items()}
        return {"out": full, "grads": grads, "comms": counts, "placements": placements}

    records = {}
    for name, make_ours, make_theirs in (
        ("layernorm", lambda: nl.nn.LayerNorm(16), lambda: nn.LayerNorm(16)),
        ("rmsnorm", lambda: nl.nn.RMSNorm(16), lambda: nn.RMSNorm(16)),
    ):
        results = []
        for make in (make_ours, make_theirs):
            torch.manual_seed(5)
            layer = make()
            with torch.no_grad():
                for p in layer.parameters():
                    p.uniform_(0.5, 1.5)
            parallelize_module(layer, mesh, SequenceParallel())
            results.append(run(layer, x_local.clone().requires_grad_()))
        records[f"sequence_parallel_{name}"] = tuple(results)

    # SequenceParallel prepares a module's first input only, so a two-input norm takes
    # sequence-sharded DTensors directly (parameters replicated, as SequenceParallel does);
    # torch.nn's twin is RMSNorm under SequenceParallel on the sum
    torch.manual_seed(5)
    ours, theirs = nl.nn.AddRMSNorm(16), nn.RMSNorm(16)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(theirs.weight)
    distribute_module(ours, mesh)
    parallelize_module(theirs, mesh, SequenceParallel())
    x = DTensor.from_local(x_local.clone(), mesh, [Shard(1)], run_check=False)
    r = DTensor.from_local(r_local.clone(), mesh, [Shard(1)], run_check=False)
    records["sequence_parallel_addrmsnorm"] = (run(ours, x, r), run(theirs, x + r))
    return records


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        records = {**_fsdp_scenarios(rank, mesh), **_sequence_parallel_scenarios(rank, mesh)}
        torch.save(records, f"{out_dir}/rank{rank}.pt")
    except BaseException as error:  # reported by the test, not lost in a child's stderr
        with open(f"{out_dir}/rank{rank}.error", "w") as f:
            json.dump(f"{error!r}\n{traceback.format_exc()}", f)
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from normlab.experiments.distributed import _free_port

    out = tmp_path_factory.mktemp("engines")
    try:
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    except Exception as error:
        errors = [p.read_text() for p in out.glob("*.error")]
        pytest.fail(f"a rank failed: {errors or error}")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


FSDP = ["fsdp_cnn_batchnorm", "fsdp_transformer_layernorm", "fsdp_transformer_rmsnorm", "fsdp_transformer_addrmsnorm"]


@pytest.mark.parametrize("scenario", FSDP)
def test_fully_shard_trains_as_torch_nn(records, scenario):
    for rank, per_rank in enumerate(records):
        ours, theirs = per_rank[scenario]
        assert _close(ours["losses"], theirs["losses"]) < 1e-5, (rank, ours["losses"], theirs["losses"])
        assert ours["state"].keys() == theirs["state"].keys()
        for key, value in theirs["state"].items():
            if key.endswith("num_batches_tracked"):
                assert int(ours["state"][key]) == int(value) == STEPS
            else:  # parameters gathered from their shards, running estimates per rank
                assert _close(ours["state"][key], value) < 1e-5, (rank, key)
    # the ranks saw different data: their BatchNorm estimates differ, their parameters agree
    if scenario == "fsdp_cnn_batchnorm":
        a, b = (r[scenario][0]["state"] for r in records)
        assert _close(a["1.running_mean"], b["1.running_mean"]) > 1e-3
        assert _close(a["0.weight"], b["0.weight"]) == 0.0


SEQUENCE = ["sequence_parallel_layernorm", "sequence_parallel_rmsnorm", "sequence_parallel_addrmsnorm"]


@pytest.mark.parametrize("scenario", SEQUENCE)
def test_sequence_parallel_equals_torch_nn_with_the_same_collectives(records, scenario):
    for rank, per_rank in enumerate(records):
        ours, theirs = per_rank[scenario]
        assert _close(ours["out"], theirs["out"]) < 1e-5, rank
        assert ours["grads"].keys() == theirs["grads"].keys() and ours["grads"]
        for name, grad in theirs["grads"].items():
            assert _close(ours["grads"][name], grad) < 1e-5, (rank, name)
        assert ours["placements"] == theirs["placements"], (ours["placements"], theirs["placements"])
        assert ours["comms"] == theirs["comms"], (ours["comms"], theirs["comms"])
        assert sum(theirs["comms"].values()) >= 2  # the output gathered, the weight gradient reduced
    # the output is the whole sequence gathered from both ranks: the same on each
    assert _close(records[0][scenario][0]["out"], records[1][scenario][0]["out"]) == 0.0
