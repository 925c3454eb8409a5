"""normlab — normalization layers for PyTorch, the surgery around them, and the
experiments that explain why they work.

Layers, from the bottom up (imports only go down this list)::

    normlab.core        grouped moments, normalize + closed-form backward, running stats
    normlab.functional  batch_norm, layer_norm, group_norm, instance_norm, rms_norm
    normlab.nn          drop-in modules for torch.nn's norm layers
    normlab.surgery     fold, freeze, convert, precise BN, torch.nn interop
    normlab.init        initializers with documented gains, LSUV
    normlab.diagnostics Probe: per-layer statistics while training, findings, report
"""

from . import core, diagnostics, functional, init, nn, surgery

__version__ = "0.1.0"

__all__ = ["__version__", "core", "diagnostics", "functional", "init", "nn", "surgery"]
