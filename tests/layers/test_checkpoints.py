"""Checkpoints move between torch.nn and normlab both ways, bit for bit."""

from __future__ import annotations

import io
from collections import OrderedDict

import pytest
import torch
from helpers import randomize_affine
from torch import nn

import normlab as nl

CONSTRUCTORS = [
    ("BatchNorm1d", (6,), {}),
    ("BatchNorm2d", (6,), {"affine": False}),
    ("BatchNorm2d", (6,), {"bias": False}),
    ("BatchNorm3d", (6,), {"track_running_stats": False}),
    ("InstanceNorm1d", (6,), {}),
    ("InstanceNorm2d", (6,), {"affine": True, "track_running_stats": True}),
    ("InstanceNorm3d", (6,), {"affine": True}),
    ("GroupNorm", (3, 6), {}),
    ("GroupNorm", (2, 6), {"affine": False}),
    ("LayerNorm", ((4, 5),), {}),
    ("LayerNorm", (5,), {"bias": False}),
    ("RMSNorm", (5,), {}),
    ("RMSNorm", ((2, 5),), {"elementwise_affine": False}),
]
IDS = [f"{n}{a}{k}" for n, a, k in CONSTRUCTORS]


def _trained_torch_layer(name, args, kwargs):
    layer = randomize_affine(getattr(nn, name)(*args, **kwargs))
    with torch.no_grad():
        for buf_name, buf in layer.named_buffers():
            if buf_name == "num_batches_tracked":
                buf.fill_(37)
            else:
                buf.copy_(torch.rand_like(buf) + 0.1)
    return layer


def _bitwise_equal(a: dict, b: dict) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name,args,kwargs", CONSTRUCTORS, ids=IDS)
def test_state_dict_keys_shapes_and_metadata_match_torch(name, args, kwargs):
    ours = getattr(nl.nn, name)(*args, **kwargs)
    theirs = getattr(nn, name)(*args, **kwargs)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours.keys()) == list(sd_theirs.keys())
    for key in sd_theirs:
        assert sd_ours[key].shape == sd_theirs[key].shape
        assert sd_ours[key].dtype == sd_theirs[key].dtype
        # Same initial values too: γ = 1, β = 0, mean 0, var 1, no batches.
        assert torch.equal(sd_ours[key], sd_theirs[key]), key
    assert sd_ours._metadata[""].get("version") == sd_theirs._metadata[""].get("version")


@pytest.mark.parametrize("name,args,kwargs", CONSTRUCTORS, ids=IDS)
def test_torch_checkpoint_round_trips_through_normlab_bit_for_bit(name, args, kwargs):
    theirs = _trained_torch_layer(name, args, kwargs)
    original = {k: v.clone() for k, v in theirs.state_dict().items()}

    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = getattr(nl.nn, name)(*args, **kwargs)
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    _bitwise_equal(ours.state_dict(), original)

    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    back = getattr(nn, name)(*args, **kwargs)
    back.load_state_dict(torch.load(buffer, weights_only=True))
    _bitwise_equal(back.state_dict(), original)


@pytest.mark.parametrize("name,args,kwargs", CONSTRUCTORS, ids=IDS)
def test_loaded_layers_compute_what_torch_computes(name, args, kwargs):
    theirs = _trained_torch_layer(name, args, kwargs).eval()
    ours = getattr(nl.nn, name)(*args, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    shape = {"1d": (3, 6, 5), "2d": (3, 6, 4, 5), "3d": (2, 6, 3, 4, 5)}.get(name[-2:], (3, 6, 4, 5))
    if name in ("LayerNorm", "RMSNorm"):
        normalized = (args[0],) if isinstance(args[0], int) else args[0]
        shape = (3, *normalized)
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_whole_model_checkpoint_moves_both_ways():
    def build(lib):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3),
            lib.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3),
            lib.GroupNorm(4, 8),
            nn.ReLU(),
            nn.Flatten(),
            lib.LayerNorm(8 * 2 * 2),
        )

    theirs = build(nn)
    theirs.train()
    for _ in range(3):
        theirs(torch.randn(4, 3, 6, 6))
    ours = build(nl.nn)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    back = build(nn)
    back.load_state_dict(ours.state_dict())
    _bitwise_equal(back.state_dict(), theirs.state_dict())


def test_version_1_checkpoint_without_num_batches_tracked_loads():
    layer = nl.nn.BatchNorm2d(4)
    old = OrderedDict((k, v) for k, v in nn.BatchNorm2d(4).state_dict().items() if k != "num_batches_tracked")
    old._metadata = OrderedDict({"": {"version": 1}})
    layer.load_state_dict(old)
    assert layer.num_batches_tracked.item() == 0


def test_mismatched_checkpoint_is_refused_with_a_clear_error_and_state_kept():
    layer = nl.nn.BatchNorm2d(4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(nn.BatchNorm2d(5).state_dict())
    _bitwise_equal(layer.state_dict(), before)
    with pytest.raises(RuntimeError, match="Missing key"):
        nl.nn.BatchNorm2d(4).load_state_dict(nn.BatchNorm2d(4, track_running_stats=False).state_dict())


def test_extra_options_do_not_add_state_dict_keys():
    ours = nl.nn.BatchNorm2d(4, unbiased_running_var=False, on_nonfinite="raise")
    assert list(ours.state_dict().keys()) == list(nn.BatchNorm2d(4).state_dict().keys())
