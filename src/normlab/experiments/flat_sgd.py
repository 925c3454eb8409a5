"""SGD with momentum on one flat buffer: torch.optim.SGD's arithmetic, bit for bit, in a few ops.

The studies train small models for thousands of steps, where ``torch.optim.SGD.step`` costs
more than the model's forward pass: on CPU its foreach path runs one kernel per parameter
for each of its four updates, under the optimizer's hooks and profiling wrappers. Here the
parameters become views into one flat buffer, so that each update is a single kernel over
every parameter at once. The arithmetic is torch's, element for element (``g + wd·p``;
the momentum buffer ``b·m + g``, the first one a copy of ``g``; ``p − lr·b``), and so are the
results, bit for bit: torch's CPU kernels give an element the same result whether it is
computed in a vector lane or the scalar tail (tests/studies/test_flat_sgd.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["FlatSGD"]

#: Each parameter starts on a multiple of this many elements (64 bytes in float32), so that a
#: kernel sees its data as aligned as a parameter of its own would be.
_ALIGN = 16


class FlatSGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay=..., foreach=True)`` stepped by
    ``lr_factor``: step ``k`` (from 0) uses ``lr · lr_factor(k)``, as a ``LambdaLR`` stepped
    after every optimizer step gives (constant without one).

    The parameters (all floating point, of one dtype and device, requiring grad) are moved
    into one flat buffer and stay views of it: their values do not change, and a module
    sees the same Parameter objects. A step in which some parameter has no gradient is
    taken one parameter at a time, skipping it as torch does.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_factor: Callable[[int], float] | None = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("FlatSGD got no parameters that require grad")
        first = self.params[0]
        if not first.is_floating_point() or any(
            p.dtype != first.dtype or p.device != first.device for p in self.params
        ):
            raise ValueError("FlatSGD needs floating-point parameters of one dtype and device")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("FlatSGD got a parameter twice")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        if not (self.lr >= 0 and self.momentum >= 0 and self.weight_decay >= 0):  # NaN included
            raise ValueError(
                f"FlatSGD needs lr, momentum and weight_decay >= 0 (as torch.optim.SGD), got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        self.lr_factor = lr_factor
        self.steps = 0
        starts, total = [], 0
        for p in self.params:
            starts.append(total)
            total += -(-p.numel() // _ALIGN) * _ALIGN
        # Zero padding between parameters: a gradient of 0 keeps it 0 through every update.
        self.flat = torch.zeros(total, dtype=first.dtype, device=first.device)
        self._grad = torch.zeros_like(self.flat)
        self._slots = [(start, p.numel()) for start, p in zip(starts, self.params)]
        with torch.no_grad():
            for p, (start, n) in zip(self.params, self._slots):
                view = self.flat[start : start + n].view_as(p)
                view.copy_(p)
                p.data = view
        self._grads = [self._grad[start : start + n].view_as(p) for p, (start, n) in zip(self.params, self._slots)]
        # Where each parameter's data must stay: a model moved or recast after this (.to(),
        # .double()) gets new tensors, which the flat updates would silently never reach.
        self._addresses = [p.data_ptr() for p in self.params]
        self._buffer: torch.Tensor | None = None  # the momentum buffer, flat; None before the first step
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)  # per parameter, after a partial step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients to None (as ``torch.optim.Optimizer.zero_grad``; ``set_to_none=False``
        is not needed by the studies and zeroes them in place)."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        if [p.data_ptr() for p in self.params] != self._addresses:
            raise RuntimeError(
                "FlatSGD: a parameter no longer lives in the optimizer's flat buffer (the model was "
                "moved or recast after the optimizer was built); build the optimizer after .to()"
            )
        lr = self.lr if self.lr_factor is None else self.lr * self.lr_factor(self.steps)
        grads = [p.grad for p in self.params]
        if any(g is not None and g.layout != torch.strided for g in grads):
            raise ValueError("FlatSGD takes dense gradients only")
        if any(g is None for g in grads) or any(b is not None for b in self._buffers):
            self._step_each(lr)
        else:
            self._step_flat(lr, grads)  # type: ignore[arg-type]
        self.steps += 1

    def _step_flat(self, lr: float, grads: list[torch.Tensor]) -> None:
        for slot, g in zip(self._grads, grads):
            slot.copy_(g)
        g = self._grad
        if self.weight_decay != 0:
            g = torch.add(g, self.flat, alpha=self.weight_decay)
        if self.momentum != 0:
            if self._buffer is None:
                self._buffer = g.clone()
            else:
                self._buffer.mul_(self.momentum)
                self._buffer.add_(g, alpha=1)
            g = self._buffer
        self.flat.add_(g, alpha=-lr)

    def _step_each(self, lr: float) -> None:
        """torch's step, one parameter at a time: those without a gradient are skipped (no
        decay, no momentum), which the flat buffer cannot express; the momentum is kept per
        parameter from then on."""
        if self._buffer is not None:  # split the flat momentum buffer into views
            self._buffers = [
                self._buffer[start : start + n].view_as(p) for p, (start, n) in zip(self.params, self._slots)
            ]
            self._buffer = None
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if self.weight_decay != 0:
                g = torch.add(g, p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self._buffers[i]
                if buf is None:
                    buf = self._buffers[i] = g.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(g, alpha=1)
                g = buf
            p.add_(g, alpha=-lr)
