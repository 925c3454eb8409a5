"""The public names the reference documents: every name in the ``__all__`` of these modules.

One list, read by the reference pages, the build's docstring check and the tests, so a name
added to an ``__all__`` is documented (or fails the build) without touching the site.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any

#: module → the page's title and one line on what is in it, in the order the reference lists them.
PUBLIC_MODULES: dict[str, tuple[str, str]] = {
    "normlab.nn": (
        "normlab.nn",
        "Modules: drop-in replacements for torch.nn's norm layers, and the norms beyond them.",
    ),
    "normlab.functional": ("normlab.functional", "The functional API, argument-compatible with torch.nn.functional."),
    "normlab.surgery": ("normlab.surgery", "Whole-model transforms: fold, freeze, convert, precise BN, interop."),
    "normlab.init": ("normlab.init", "Initializers with documented gains, and LSUV."),
    "normlab.diagnostics": ("normlab.diagnostics", "The Probe: per-layer statistics while training, findings, report."),
    "normlab.core": ("normlab.core", "The math and the operators under the layers (its public part)."),
}


@dataclass(frozen=True)
class PublicName:
    module: str
    name: str
    obj: Any

    @property
    def path(self) -> str:
        """The dotted path users write, which is also the anchor the reference gives it."""
        return f"{self.module}.{self.name}"

    @property
    def kind(self) -> str:
        if inspect.isclass(self.obj):
            return "class"
        if inspect.ismodule(self.obj):
            return "module"
        if callable(self.obj):
            return "function"
        return "attribute"


def module(name: str) -> ModuleType:
    return importlib.import_module(name)


def public_names(module_name: str) -> list[PublicName]:
    """The names of ``module_name.__all__``, in that order."""
    mod = module(module_name)
    exported = getattr(mod, "__all__", None)
    if exported is None:
        raise ValueError(f"{module_name} has no __all__: its public names cannot be listed")
    return [PublicName(module_name, name, getattr(mod, name)) for name in exported]


def all_public_names() -> list[PublicName]:
    return [entry for module_name in PUBLIC_MODULES for entry in public_names(module_name)]
