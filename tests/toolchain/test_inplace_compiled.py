"""The in-place norm + activation layers under torch.compile(fullgraph=True): one graph, the
out-of-place route (the memory saving is eager's, docs/conventions.md), and the values,
gradients and running estimates of the out-of-place layer. Before, the in-place call asked
``Tensor._is_view`` (a graph break Dynamo refuses under ``fullgraph=True``)."""

from __future__ import annotations

import pytest
import torch

import normlab as nl

LAYERS = {
    "BatchNormAct2d": lambda **kw: nl.nn.BatchNormAct2d(4, activation="leaky_relu", **kw),
    "GroupNormAct": lambda **kw: nl.nn.GroupNormAct(2, 4, activation="elu", **kw),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_fullgraph_in_place_layer_equals_the_out_of_place_one(name):
    torch.manual_seed(0)
    out_of_place = LAYERS[name]()
    in_place = LAYERS[name](inplace=True)
    in_place.load_state_dict(out_of_place.state_dict())
    compiled = torch.compile(in_place, fullgraph=True, backend="eager")  # the one graph, without codegen
    # training, where eager runs in place (in eval the layer computes out of place anyway)
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    x_compiled = x.detach().clone().requires_grad_()
    expected, y = out_of_place(x * 1.5), compiled(x_compiled * 1.5)
    grad = torch.randn_like(y)
    expected.backward(grad)
    y.backward(grad)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x_compiled.grad, x.grad)
    torch.testing.assert_close(in_place.weight.grad, out_of_place.weight.grad)
    for key, value in out_of_place.state_dict().items():
        torch.testing.assert_close(in_place.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("name", list(LAYERS))
def test_an_in_place_layer_in_a_model_is_one_graph_and_exports(name):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), LAYERS[name](inplace=True), torch.nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 5, 5)
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    expected = model(x)  # eager, in place (a training step: the estimates move)
    program = torch.export.export(model.eval(), (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    assert expected.shape == (2, 2, 5, 5)
