"""normlab's compiled kernels, one subpackage per backend.

* :mod:`normlab.core.kernels.cpu` — float32 CPU kernels in C++ (built on first use), their
  eager entries and their ``torch.ops.normlab.*`` operators.
* ``normlab.core.kernels.triton`` — the Triton kernels (CUDA; on CPU tensors under Triton's
  interpreter, ``TRITON_INTERPRET=1``), imported on demand.

Each backend offers one entry per norm family and a function saying whether it can take a
given call; the path rule (:func:`normlab.core.paths.choose_path`) decides which runs —
nothing else chooses. How a backend plugs in (see ``docs/architecture.md``):

1. An object with one entry per family, called by the families' entries after their checks:
   ``channel_norm(x, weight, bias, groups, eps, batch_stats, running, act, inplace, mask)``
   (``running`` a :class:`normlab.core.RunningStats` to use — ``batch_stats`` False — or to
   update, ``act`` the activation's ``(name, param, prelu_weight)``) and
   ``row_norm(x, normalized_shape, weight, bias, eps, centered=, residual=)`` (returning
   ``(y, x + residual)`` with a residual); and ``takes(x, family, given=, mask=, inplace=,
   centered=)``, whether it runs a call.
2. Its operators registered with ``torch.library`` (fake kernels included) so that traced
   code sees them, as :mod:`normlab.core.kernels.cpu.operators` does.
3. :func:`normlab.core.paths.register_gpu_kernels` with that object: the path rule's row for
   GPU kernels then asks ``takes`` — the rule stays the only place that decides.

The Triton package's entries (``takes_channel``/``takes_row``, ``channel_norm``/``row_norm``
with keyword arguments and the running buffers as tensors) are not registered yet: an adapter
to the interface above, registered on import, is what wires them in.
"""

from . import cpu

__all__ = ["cpu"]
