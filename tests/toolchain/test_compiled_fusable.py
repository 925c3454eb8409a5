"""Compiled float32 CPU norms as ops inductor fuses (the path rule's rows 15-17): training
BatchNorm (with a fused activation too) and, without a gradient, GroupNorm, InstanceNorm,
LayerNorm and RMSNorm run as plain ops on shifted moments ("decomposed"); GroupNorm and
LayerNorm training keep the kernels' operator. Checked inside real compiles: the path each
call took, one graph, normlab's accuracy on 1e4 ± 0.01 data against float64, every gradient,
and the running estimates after several compiled steps against the eager kernels'.

Two small models are compiled once for the module (compiles are the cost here), each
applying several norms to the same inputs side by side.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import normlab as nl

pytestmark = pytest.mark.slow

KERNELS = nl.core.kernels_available() and nl.core.backend() == "auto"
DECOMPOSED = ("composed", "compiling: shifted moments in ops the compiler fuses")
OPERATOR = ("kernels", "torch.compile: the registered operator")
STEPS = 3


class SideBySide(nn.Module):
    """Each norm applied to its own input: (4-D input, 2-D input) → a tuple of outputs."""

    def __init__(self, on_images: list[nn.Module], on_rows: list[nn.Module]) -> None:
        super().__init__()
        self.on_images = nn.ModuleList(on_images)
        self.on_rows = nn.ModuleList(on_rows)

    def forward(self, images: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(images) for m in self.on_images) + tuple(m(rows) for m in self.on_rows)


def _training_model() -> SideBySide:
    torch.manual_seed(0)
    model = SideBySide(
        [
            nn.Sequential(nl.nn.BatchNorm2d(4), nn.ReLU()),
            nl.nn.BatchNormAct2d(4, activation="leaky_relu", momentum=None),
            nl.nn.GroupNorm(2, 4),  # the operator: faster in training
        ],
        [nl.nn.BatchNorm1d(8), nl.nn.LayerNorm(8)],
    )
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 2.0)
    return model.train()


def _eval_model() -> SideBySide:
    torch.manual_seed(1)
    model = SideBySide(
        [nl.nn.GroupNorm(2, 4), nl.nn.InstanceNorm2d(4, affine=True)],
        [nl.nn.LayerNorm(8), nl.nn.RMSNorm(8)],
    )
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 2.0)
    return model.eval()


def _large_mean(*shape: int) -> torch.Tensor:
    return 1e4 + 0.01 * torch.randn(*shape)


def _inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(100 + step)
    return _large_mean(6, 4, 5, 5), _large_mean(16, 8)


def _train_step(model: nn.Module, fn, images: torch.Tensor, rows: torch.Tensor, weights) -> list[torch.Tensor]:
    """One forward and backward of Σ w·y; the outputs and every gradient (inputs first)."""
    images, rows = images.clone().requires_grad_(), rows.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    outputs = fn(images, rows)
    sum(((y * w).sum() for y, w in zip(outputs, weights)), torch.zeros((), dtype=outputs[0].dtype)).backward()
    return [y.detach() for y in outputs] + [images.grad, rows.grad] + [p.grad for p in model.parameters()]


@pytest.fixture(scope="module")
def runs():
    """The two models compiled (fullgraph) and eager, and their float64 twins, over STEPS
    batches of large-mean data; what the compiles recorded and explained."""
    if not KERNELS:
        pytest.skip("the compiled float32 CPU rows need the kernels and the default backend")
    torch._dynamo.reset()
    compiled, eager = _training_model(), _training_model()
    exact = copy.deepcopy(compiled).double()
    fn = torch.compile(compiled, fullgraph=True)
    weights = [torch.randn(y.shape) for y in compiled(*_inputs(0))]
    compiled.load_state_dict(eager.state_dict())  # undo that call's running update
    steps = []
    with nl.core.record_dispatch() as train_log:
        for step in range(STEPS):
            images, rows = _inputs(step)
            steps.append(
                {
                    "compiled": _train_step(compiled, fn, images, rows, weights),
                    "eager": _train_step(eager, eager, images, rows, weights),
                    "exact": _train_step(exact, exact, images.double(), rows.double(), [w.double() for w in weights]),
                }
            )
    buffers = {
        side: {name: b.clone() for name, b in model.named_buffers()}
        for side, model in (("compiled", compiled), ("eager", eager), ("exact", exact))
    }
    # a batch that is not finite, through the graph compiled above
    images, rows = _inputs(0)
    images[0, :, 0, 0] = float("nan")  # every channel's first value: also the shift sampled
    rows[3, 2] = float("inf")
    nonfinite = [y.detach() for y in fn(images.requires_grad_(), rows.requires_grad_())]
    after_nonfinite = {name: b.clone() for name, b in compiled.named_buffers()}
    explained = torch._dynamo.explain(compiled)(*_inputs(0))  # runs a training forward: after the copies
    train = SimpleNamespace(
        model=compiled,
        steps=steps,
        buffers=buffers,
        nonfinite=nonfinite,
        after_nonfinite=after_nonfinite,
        log=train_log,
        explain=explained,
    )

    evaluated = _eval_model()
    exact_eval = copy.deepcopy(evaluated).double()
    images, rows = _inputs(STEPS)
    with torch.no_grad():
        with nl.core.record_dispatch() as eval_log:
            y = torch.compile(evaluated, fullgraph=True)(images, rows)
        reference = exact_eval(images.double(), rows.double())
        y_eager = evaluated(images, rows)
        explained = torch._dynamo.explain(evaluated)(images, rows)
    evaluation = SimpleNamespace(outputs=y, eager=y_eager, exact=reference, log=eval_log, explain=explained)
    yield SimpleNamespace(train=train, eval=evaluation)
    torch._dynamo.reset()


def test_the_path_each_compiled_call_takes(runs):
    # recorded while the compiles traced (the eager and float64 twins' calls say kernels/native)
    traced = [(op, path, reason) for op, path, reason in runs.train.log if "compil" in reason]
    assert traced == [
        ("batch_norm", *DECOMPOSED),
        ("batch_norm_act", *DECOMPOSED),
        ("group_norm", *OPERATOR),
        ("batch_norm", *DECOMPOSED),
        ("layer_norm", *OPERATOR),
    ]
    assert runs.eval.log == [
        ("group_norm", *DECOMPOSED),
        ("instance_norm", *DECOMPOSED),
        ("layer_norm", *DECOMPOSED),
        ("rms_norm", *DECOMPOSED),
    ]


def test_one_graph_without_breaks_and_no_opaque_operator_in_eval(runs):
    for explained in (runs.train.explain, runs.eval.explain):
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    targets = {str(n.target) for g in runs.eval.explain.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets), targets


def _worst(outputs, exact) -> float:
    return max((y.double() - e).abs().max().item() for y, e in zip(outputs, exact))


def test_compiled_outputs_keep_normlab_accuracy_on_large_mean_data(runs):
    # the outputs are O(1): the kernels' float32 error here is ~5e-7, the textbook
    # x·s + (β − μ·s) form (torch's eval kernel) 7.7e-3, subtracting a float32-rounded mean 5e-2
    for step in runs.train.steps:
        assert _worst(step["compiled"][:5], step["exact"][:5]) < 2e-6
    assert _worst(runs.eval.outputs, runs.eval.exact) < 2e-6
    torch.testing.assert_close(list(runs.eval.outputs), list(runs.eval.eager), rtol=1e-5, atol=1e-5)


def test_compiled_gradients_match_float64_and_the_eager_kernels(runs):
    for step in runs.train.steps:
        grads, eager, exact = step["compiled"][5:], step["eager"][5:], step["exact"][5:]
        assert len(grads) == 2 + len(list(runs.train.model.parameters())) and all(g is not None for g in grads)
        for g, e, x in zip(grads, eager, exact):
            scale = x.abs().max().item()  # dx is O(1/σ) = O(100) on this data
            assert (g.double() - x).abs().max().item() <= 2e-5 * scale
            torch.testing.assert_close(g, e, rtol=0, atol=4e-5 * scale)


def test_running_estimates_after_compiled_steps_match_eager(runs):
    compiled, exact = runs.train.buffers["compiled"], runs.train.buffers["exact"]
    assert len(compiled) == 9  # 3 BatchNorms × (mean, var, counter)
    for name, eager in runs.train.buffers["eager"].items():
        if name.endswith("num_batches_tracked"):
            assert compiled[name].item() == eager.item() == STEPS, name
        else:  # momentum 0.1 and the cumulative average (momentum=None); unbiased variance
            torch.testing.assert_close(compiled[name], eager, rtol=2e-6, atol=0, msg=name)
            assert (compiled[name].double() - exact[name]).abs().max().item() <= 2e-6 * exact[name].abs().max().item()


def test_a_batch_that_is_not_finite_leaves_the_running_estimates_alone(runs):
    outputs = runs.train.nonfinite
    assert outputs[0].isnan().all() and outputs[3][:, 2].isnan().all() and not outputs[3][:, 1].isnan().any()
    for name, b in runs.train.after_nonfinite.items():
        assert torch.equal(b, runs.train.buffers["compiled"][name]), name
