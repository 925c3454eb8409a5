"""Shared test utilities: layouts, module pairs (torch.nn ↔ normlab), comparisons."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

import normlab as nl

#: The memory layouts inputs are tested in (``in_layout`` makes them).
LAYOUTS = ("contiguous", "channels_last", "noncontiguous")
#: Those that a ``torch.memory_format`` names (what a convolution returns).
DENSE_LAYOUTS = ("contiguous", "channels_last")


def memory_format(layout: str, dim: int = 4) -> torch.memory_format:
    """The ``torch.memory_format`` of a dense layout for a ``dim``-D tensor."""
    if layout == "contiguous":
        return torch.contiguous_format
    if layout == "channels_last":
        return {4: torch.channels_last, 5: torch.channels_last_3d}[dim]
    raise ValueError(f"layout must be one of {DENSE_LAYOUTS}, got {layout!r}")


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        # No named format below 4D: put channels innermost by hand.
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "noncontiguous":
        # Every other element of a twice-as-long last dim: strided, not a permutation.
        wide = torch.repeat_interleave(x, 2, dim=-1)
        view = wide[..., ::2]
        assert not view.is_contiguous() or x.shape[-1] == 1
        return view
    raise ValueError(layout)


_TORCHVISION_SCHEMAS = None  # kept alive: dropping the Library would unregister them


def import_timm():
    """timm, imported (None where it is not installed). timm imports torchvision, whose wheel
    from PyPI is built against the CUDA torch; beside the CPU torch its C ops do not load, and
    its import then fails on registering fake kernels for two of them. Declaring those two
    schemas lets the pure-Python model code import; calling a torchvision op still raises."""
    global _TORCHVISION_SCHEMAS
    if importlib.util.find_spec("timm") is None:
        return None
    try:
        import timm
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import timm
    return timm


def copy_into(dst: nn.Module, src: nn.Module) -> nn.Module:
    dst.load_state_dict(src.state_dict())
    return dst


def randomize_affine(module: nn.Module) -> nn.Module:
    """Non-trivial γ/β so that gradient and output checks exercise them."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" else 0.0))
    return module


def pair(torch_cls_name: str, *args, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A torch.nn layer and its normlab twin holding identical state."""
    reference = randomize_affine(getattr(nn, torch_cls_name)(*args, **kwargs))
    ours = getattr(nl.nn, torch_cls_name)(*args, **kwargs)
    copy_into(ours, reference)
    return reference, ours


def run_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Forward + backward; returns (output, input grad, {param name: grad})."""
    for p in module.parameters():
        p.grad = None
    xi = x.detach().clone().requires_grad_(True) if x.is_contiguous() else _same_strides(x)
    y = module(xi)
    y.backward(grad)
    params = {n: p.grad.clone() for n, p in module.named_parameters()}
    return y.detach(), xi.grad, params


def _same_strides(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out.requires_grad_(True)


def assert_close_scaled(actual, expected, *, rtol: float, atol: float | None = None, what: str = "") -> None:
    """``actual`` ≈ ``expected``, the absolute tolerance scaled by ``expected``'s largest
    magnitude (at least 1). A float32 weight gradient is a sum over thousands of terms: its
    rounding error is relative to the sum's magnitude, not to each (possibly tiny) entry."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    atol = rtol if atol is None else atol
    msg = (lambda m: f"{what}: {m}") if what else None
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=msg)
