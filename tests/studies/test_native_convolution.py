"""The studies' choice of convolution backend: torch's native kernels for training steps at
small batches, oneDNN's otherwise, set only for the step that asked for it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from normlab.experiments import ConvNet1d, Dataset
from normlab.experiments.flat_sgd import FlatSGD
from normlab.experiments.training import StepConfig, TrainConfig, minibatch_losses, native_convolution


def test_native_convolution_sets_and_restores_the_backend():
    before = torch.backends.mkldnn.enabled
    with native_convolution():
        assert torch.backends.mkldnn.enabled is False
    assert torch.backends.mkldnn.enabled == before
    with native_convolution(False):
        assert torch.backends.mkldnn.enabled == before
    with pytest.raises(RuntimeError, match="inside"), native_convolution():
        raise RuntimeError("inside")
    assert torch.backends.mkldnn.enabled == before  # restored when the block fails too


def test_native_convolution_restores_a_backend_the_caller_turned_off():
    with torch.backends.mkldnn.flags(enabled=False):  # torch's own way: works with its flags frozen
        with native_convolution():
            pass
        assert torch.backends.mkldnn.enabled is False


def test_native_convolution_works_after_torch_froze_its_flags():
    """torch's test utilities call torch.backends.disable_global_flags() on import, after which
    assigning torch.backends.mkldnn.enabled raises (the whole suite met it); a fresh process, as
    freezing cannot be undone."""
    script = (
        "import torch\n"
        "from normlab.experiments.training import native_convolution\n"
        "torch.backends.disable_global_flags()\n"
        "with native_convolution():\n"
        "    assert torch.backends.mkldnn.enabled is False\n"
        "assert torch.backends.mkldnn.enabled is True\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


@pytest.mark.parametrize(("batch_size", "native"), [(2, True), (16, True), (32, False)])
def test_the_choice_is_by_batch_size(batch_size, native):
    assert TrainConfig(batch_size=batch_size, native_conv_max_batch=16).native_conv is native
    assert StepConfig(batch_size=batch_size, native_conv_max_batch=16).native_conv is native
    assert TrainConfig(batch_size=batch_size).native_conv is False  # default: oneDNN's, torch's default


def test_each_step_runs_native_and_the_caller_between_steps_does_not():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 40, generator=g), torch.randint(0, 10, (64,), generator=g)
    data = Dataset("noise", x, y, x[:8], y[:8])
    seen: list[bool] = []
    runs = {}
    for native in (False, True):
        torch.manual_seed(0)
        model = ConvNet1d("batch")
        conv = model[0]
        handle = conv.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
        seen.clear()
        optimizer = FlatSGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for loss in minibatch_losses(model, data, optimizer, steps=6, batch_size=4, seed=1, native_conv=native):
            assert torch.backends.mkldnn.enabled is True  # the caller's code between steps: torch's default
            losses.append(loss)
        handle.remove()
        assert seen == [not native] * 6
        runs[native] = (losses, [p.detach().clone() for p in model.parameters()])
    # the two backends agree to float rounding, not bit for bit
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
