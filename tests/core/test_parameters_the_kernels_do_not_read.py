"""A plain float32 input takes the kernels' one C++ crossing, which reads plain float32
parameters only; torch.nn's layers take any γ, β or running estimate torch's ops take. A lazily
negated view (``z.conj().imag``) or a ``__torch_dispatch__`` wrapper parameter passes the
arguments' checks, so the call must run (on torch's ops), not fail as the kernels' refusal."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map

import normlab as nl


class _Wrapper(torch.Tensor):
    """The smallest wrapper subclass: every op runs on the wrapped tensor."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _Wrapper:
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        def unwrap(a: object) -> object:
            return a.inner if isinstance(a, _Wrapper) else a

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


def _negated_view(values: torch.Tensor) -> torch.Tensor:
    view = torch.complex(torch.zeros_like(values), -values).conj().imag  # = values, a lazy negation
    assert view.is_neg()
    return view


KINDS = {"negated view": _negated_view, "wrapper subclass": _Wrapper}
MASKS = {"unmasked": None, "masked": torch.arange(5) < torch.tensor([5, 2, 0, 3])[:, None]}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", MASKS)
def test_batch_norm_with_a_parameter_the_kernels_do_not_read(kind, masked):
    torch.manual_seed(0)
    x, mask = torch.randn(4, 3, 5), MASKS[masked]
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    plain_rm, plain_rv = torch.zeros(3), torch.ones(3)
    expected = nl.functional.batch_norm(x, plain_rm, plain_rv, weight, bias, training=True, mask=mask)
    make = KINDS[kind]
    got = nl.functional.batch_norm(x, torch.zeros(3), torch.ones(3), make(weight), make(bias), training=True, mask=mask)
    torch.testing.assert_close(got, expected)
    # the running estimates of that kind are read and merged as plain ones are
    rm, rv = _negated_view(torch.zeros(3)), _negated_view(torch.ones(3))
    got = nl.functional.batch_norm(x, rm, rv, weight, bias, training=True, mask=mask)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(rm.resolve_neg(), plain_rm)
    torch.testing.assert_close(rv.resolve_neg(), plain_rv)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm", "add_layer_norm"])
def test_row_norms_with_a_parameter_the_kernels_do_not_read(kind, fn):
    torch.manual_seed(0)
    x, residual, weight = torch.randn(4, 8), torch.randn(4, 8), torch.rand(8) + 0.5
    call = getattr(nl.functional, fn)
    args = (x, residual, (8,)) if fn.startswith("add") else (x, (8,))
    torch.testing.assert_close(call(*args, KINDS[kind](weight)), call(*args, weight))
