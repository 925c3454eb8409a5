"""normlab's compiled kernels, one subpackage per backend.

* :mod:`normlab.core.kernels.cpu` — float32 CPU kernels in C++ (built on first use), their
  eager entries and their ``torch.ops.normlab.*`` operators.
* ``normlab.core.kernels.triton`` — the Triton kernels (CUDA; on CPU tensors under Triton's
  interpreter, ``TRITON_INTERPRET=1``), imported on demand.

Each backend offers one entry per norm family and a function saying whether it can take a
given call; the path rule (:func:`normlab.core.paths.choose_path`) decides which runs —
nothing else chooses. How a backend plugs in (see ``docs/architecture.md``):

1. An object with one entry per family, called by the families' entries after their checks:
   ``channel_norm(call)``, ``call`` a :class:`normlab.core.calls.ChannelCall` (its
   ``running`` a :class:`normlab.core.RunningStats` to use — ``batch_stats`` False — or to
   update, exactly once, ``act`` the activation's ``(name, param, prelu_weight)``), and
   ``row_norm(call)``, ``call`` a :class:`normlab.core.calls.RowCall` (returning
   ``(y, x + residual)`` with a residual); ``takes(x, family, call, given=, mask=, inplace=,
   centered=)`` → ``(True, "")`` or ``(False, why)``, whether it runs a call (``call``: the
   rest of the call, as :func:`normlab.core.paths.choose_path` documents it); and
   ``unavailable(x)``, why it cannot run on x's device in this process ("" where it can).
2. Its operators registered with ``torch.library`` (fake kernels included) so that traced
   code sees them, as :mod:`normlab.core.kernels.cpu.operators` does.
3. A row of the path rule that asks ``takes``: the GPU kernels' row loads
   :mod:`normlab.core.kernels.triton.backend` the first time the rule is asked about a CUDA
   tensor or a forced "triton" (:func:`normlab.core.paths.register_gpu_kernels` plugs in
   another object) — the rule stays the only place that decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from . import cpu

if TYPE_CHECKING:
    import torch

    from ..calls import ChannelCall, RowCall

__all__ = ["cpu"]


class KernelBackend(Protocol):
    """Point 1 above, as a type: what the path rule asks a GPU backend and the families'
    entries call on it (:class:`normlab.core.kernels.triton.backend.TritonBackend`, or a
    stand-in a test registers)."""

    def unavailable(self, x: torch.Tensor) -> str: ...

    def takes(
        self,
        x: torch.Tensor,
        family: str,
        call: tuple[Any, ...] | None,  # the family's arguments as the caller gave them: unchecked
        *,
        given: bool = False,
        mask: torch.Tensor | None = None,
        inplace: bool = False,
        centered: bool = True,
    ) -> tuple[bool, str]: ...

    def channel_norm(self, call: ChannelCall) -> torch.Tensor: ...

    def row_norm(self, call: RowCall) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
