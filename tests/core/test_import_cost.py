"""``import normlab`` stays light: torch._dynamo (about 1 s on top of torch's 2 s) and triton
are imported only by a program that compiles or reaches the GPU kernels, and the path
rule's constants still reach torch.compile as constants."""

from __future__ import annotations

import subprocess
import sys

import torch

from normlab.core import paths


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_normlab_imports_neither_dynamo_nor_triton():
    out = _run(
        "import sys, torch, normlab, normlab.nn, normlab.functional, normlab.surgery\n"
        "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))\n"
        # nor does a first residual norm, whose check of the residual's shape once imported
        # torch's symbolic shapes through torch.broadcast_shapes (seconds)
        "normlab.functional.add_layer_norm(torch.randn(3, 5), torch.randn(5), (5,))\n"
        "print('torch.fx.experimental.symbolic_shapes' in sys.modules)"
    )
    assert out.split() == ["[]", "False"], out


def test_the_constant_mark_is_what_torchs_decorator_sets(monkeypatch):
    def marked_by_torch() -> bool:
        return True

    def marked_by_normlab() -> bool:
        return True

    torch.compiler.assume_constant_result(marked_by_torch)
    # the branch a program takes when torch._dynamo is not imported yet
    monkeypatch.delitem(sys.modules, "torch._dynamo")
    assert paths._constant_to_compile(marked_by_normlab) is marked_by_normlab
    assert vars(marked_by_normlab) == vars(marked_by_torch) != {}


def test_a_compile_after_a_light_import_takes_the_constants_without_a_break():
    out = _run(
        "import sys, torch, normlab as nl\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "m = nl.nn.BatchNorm2d(3)\n"
        "explain = torch._dynamo.explain(m)(torch.randn(2, 3, 4, 4))\n"
        "print(explain.graph_count, explain.graph_break_count)\n"
        "compiled = torch.compile(m, backend='eager', fullgraph=True)\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "torch.testing.assert_close(compiled(x), m(x))\n"
    )
    assert out.split() == ["1", "0"], out
