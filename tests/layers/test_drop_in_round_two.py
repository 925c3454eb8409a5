"""Drop-in cases where torch.nn worked and normlab did not (or gave another answer): each
test failed before its fix. Activation checkpointing is in test_checkpointing.py, DTensor
on 2 ranks in tests/distributed/test_tensor_parallel.py, ONNX in tests/toolchain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlab as nl


def test_instance_norm_weight_changed_in_place_between_forward_and_backward():
    """The GAN pattern: another loss's optimizer step changes γ before this backward. torch.nn
    keeps a copy of γ for backward (weight.repeat(N)); so does normlab, with the same grads."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    results = []
    for layer in (nl.nn.InstanceNorm2d(3, affine=True), nn.InstanceNorm2d(3, affine=True)):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        leaf = x.clone().requires_grad_()
        y = layer(leaf)
        with torch.no_grad():
            layer.weight.mul_(3.0)  # opt.step() of another loss
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), leaf.grad, layer.weight.grad, layer.bias.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    y = nl.functional.instance_norm(x, weight=torch.ones(3, requires_grad=True))
    assert y.shape == x.shape


def test_rms_norm_takes_a_tensor_made_under_inference_mode(backend):
    with torch.inference_mode():
        x = torch.randn(4, 8)
    grads = []
    for layer in (nl.nn.RMSNorm(8), nn.RMSNorm(8)):
        y = layer(x)
        y.pow(2).sum().backward()
        grads.append((y.detach(), layer.weight.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("transform", ["grad", "jvp"])
def test_instance_norm_with_running_stats_under_torch_func(transform):
    """torch.nn's InstanceNorm updates its estimates under grad/jvp; normlab's did not run."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    layers = [nl.nn.InstanceNorm2d(3, track_running_stats=True), nn.InstanceNorm2d(3, track_running_stats=True)]
    outs = []
    for layer in layers:

        def f(v, layer=layer):
            return (layer(v) * torch.linspace(-1, 1, v.numel()).view_as(v)).sum()

        if transform == "grad":
            outs.append(torch.func.grad(f)(x))
        else:
            outs.append(torch.func.jvp(f, (x,), (torch.ones_like(x),))[1])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers[0].running_mean, layers[1].running_mean)
    torch.testing.assert_close(layers[0].running_var, layers[1].running_var)
    assert not layers[0].running_mean.requires_grad and int(layers[0].num_batches_tracked) == 1


def test_batch_norm_running_stats_under_torch_func_grad():
    """normlab updates a BatchNorm's estimates under grad as it does eagerly (torch.nn raises)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5)
    layer, eager = nl.nn.BatchNorm1d(3), nl.nn.BatchNorm1d(3)
    torch.func.grad(lambda v: layer(v).pow(3).sum())(x)
    eager(x)
    torch.testing.assert_close(layer.running_mean, eager.running_mean)
    torch.testing.assert_close(layer.running_var, eager.running_var)


def test_vmap_over_a_tracking_batch_norm_names_the_fix():
    layer = nl.nn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        torch.func.vmap(layer)(torch.randn(4, 2, 3, 5, 5))
    torch.func.replace_all_batch_norm_modules_(layer)
    ours = torch.func.vmap(layer)(x := torch.randn(4, 2, 3, 5, 5))
    theirs = torch.func.vmap(torch.func.replace_all_batch_norm_modules_(nn.BatchNorm2d(3)))(x)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nl.nn.LayerNorm(8),
        lambda: nl.nn.RMSNorm(8),
        lambda: nl.nn.BatchNorm1d(8),
        lambda: nl.nn.GroupNormAct(2, 8),
        lambda: nl.nn.AddRMSNorm(8),
    ],
    ids=["LayerNorm", "RMSNorm", "BatchNorm1d", "GroupNormAct", "AddRMSNorm"],
)
def test_symbolic_trace_with_a_normlab_layer_as_the_root(make):
    layer = make()
    graph = torch.fx.symbolic_trace(layer)
    x = torch.randn(4, 8, 3) if isinstance(layer, nl.nn.GroupNormAct) else torch.randn(4, 8)
    args = (x, x.flip(0)) if isinstance(layer, nl.nn.AddRMSNorm) else (x,)
    expected = layer(*args)
    for got, want in zip(*(t if isinstance(t, tuple) else (t,) for t in (graph(*args), expected))):
        torch.testing.assert_close(got, want)
    graph.eval()  # the mode follows the layer (torch.nn's trace fixes the training mode)
    assert not layer.training
    assert set(graph.state_dict()) == {"layer." + k for k in layer.state_dict()}


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_batch_renorm_on_an_empty_batch_is_batch_norm_s_answer(shape):
    x = torch.randn(*shape, requires_grad=True)
    ours, bn = nl.nn.BatchRenorm2d(3), nl.nn.BatchNorm2d(3)
    y = ours(x)
    y.sum().backward()
    assert y.shape == bn(x).shape == shape
    assert int(ours.num_batches_tracked) == 0 and torch.equal(ours.running_var, torch.ones(3))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "make", [lambda: nl.nn.BatchNorm2d(3), lambda: nl.nn.GroupNorm(1, 3), lambda: nl.nn.BatchNormAct2d(3)]
)
def test_masked_norms_keep_the_input_s_layout_whatever_the_mask_s_strides(make, layout):
    x = torch.randn(2, 3, 4, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    permuted = torch.rand(2, 5, 4) > 0.2
    permuted[:, :2] = True
    layer = make()
    for mode in (True, False):
        layer.train(mode)
        y = layer(x, mask=permuted.transpose(1, 2))
        assert y.stride() == layer(x).stride() == x.stride()
        torch.testing.assert_close(y, layer(x, mask=permuted.transpose(1, 2).contiguous()))


@pytest.mark.parametrize("fn", [nl.functional.add_layer_norm, nl.functional.add_rms_norm])
def test_add_norms_follow_one_dtype_rule(fn):
    """x + residual (torch's promotion) is the input the norm checks: float32 parameters refuse
    a float64 sum with normlab's TypeError in both; without parameters both compute in float64."""
    x, residual = torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"residual \(torch.float64\) is torch.float64"):
        fn(x, residual, (8,), torch.ones(8))
    y, summed = fn(x, residual, (8,))
    assert y.dtype == summed.dtype == torch.float64
    torch.testing.assert_close(summed, x + residual)


@pytest.mark.parametrize("cls", [nl.nn.LayerNorm, nl.nn.RMSNorm])
def test_a_replaced_weight_of_the_wrong_shape_is_refused_as_torch_refuses_it(cls):
    layer, theirs = cls((2, 3)), getattr(nn, cls.__name__)((2, 3))
    for module in (layer, theirs):
        module.weight = nn.Parameter(torch.ones(6))
    x = torch.randn(4, 2, 3)
    with pytest.raises(RuntimeError):
        theirs(x)
    with pytest.raises(RuntimeError, match=r"weight has shape \(6,\)"):
        layer(x)


def test_batch_norm1d_on_a_dtensor_with_the_composed_backend():
    """The composed ops write in place, which a sharded DTensor refuses: DTensors take torch's
    ops on every backend (one process here; two ranks in tests/distributed)."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        x = torch.randn(6, 16)
        reference = nn.BatchNorm1d(16)
        with nl.core.use_backend("composed"):
            layer = distribute_module(nl.nn.BatchNorm1d(16), mesh)
            y = layer(distribute_tensor(x, mesh, [Shard(0)]))
        torch.testing.assert_close(y.full_tensor(), reference(x))
        torch.testing.assert_close(layer.running_var.full_tensor(), reference.running_var)
    finally:
        dist.destroy_process_group()


def test_layer_norm_dtype_rule_matches_torch_where_torch_has_one():
    """The single-input functionals keep their rule (for reference in the add_ test above)."""
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(TypeError):
        nl.functional.layer_norm(x, (8,), torch.ones(8))
    with pytest.raises(RuntimeError):
        TF.layer_norm(x, (8,), torch.ones(8))
