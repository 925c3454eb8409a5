"""DDP + SyncBatchNorm on MNIST-1D: 2 processes x batch 2 train exactly like 1 process at
batch 4; the torchrun entry point runs."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normlab.experiments import ConvNet1d, load_mnist1d
from normlab.experiments.distributed import DistributedConfig, _free_port, train_distributed

pytestmark = pytest.mark.timeout(300)

STEPS = 25


def _worker(rank, port, norm, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        _, model = train_distributed(
            DistributedConfig(norm=norm, batch_size=2, epochs=1, max_steps=STEPS), return_model=True
        )
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_ddp_equals_single_process_at_the_global_batch(tmp_path):
    out = tmp_path / "sync.pt"
    mp.spawn(_worker, args=(_free_port(), "sync", str(out)), nprocs=2, join=True)
    synced = torch.load(out, weights_only=True)
    out_local = tmp_path / "local.pt"
    mp.spawn(_worker, args=(_free_port(), "local", str(out_local)), nprocs=2, join=True)
    local = torch.load(out_local, weights_only=True)
    single = _single_process_run(batch=4)
    for key, value in single.items():
        if key.endswith("num_batches_tracked"):
            assert int(synced[key]) == int(value) == STEPS
            continue
        torch.testing.assert_close(synced[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Per-process BatchNorm at batch 2 is a different computation: it must not match.
    assert max((local[k] - single[k]).abs().max().item() for k in single if "running" in k) > 1e-3


def _single_process_run(batch):
    """One process, batch 4, the distributed run's data order, lr and schedule."""
    import math

    torch.manual_seed(0)
    model = ConvNet1d("batch")
    data = load_mnist1d()
    global_batch = batch
    lr = 0.1 * global_batch / 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(data.y_train) // global_batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps_per_epoch)))
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for i in range(STEPS):
        idx = order[i * global_batch : (i + 1) * global_batch]
        opt.zero_grad()
        loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
        sched.step()
    return model.state_dict()


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_entry_point(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node=2",
            "--master_port",
            str(_free_port()),
            "-m",
            "normlab.experiments.distributed",
            "--norm",
            "sync",
            "--batch-size",
            "2",
            "--max-steps",
            "20",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["global_batch"] == 4 and result["steps"] == 20
    assert "test accuracy" in proc.stdout
