"""The fused activations' exponential runs vectorized in the compiled kernels.

A scalar loop computes the same values, so no test of values can tell; for months every
loop calling fast_exp (ELU, SiLU) ran one value at a time, 2-3x torch.nn's time, because
GCC turned the exponential's clamp into a branch per value. The machine code says it
directly: fast_exp converts n to an integer, and a vectorized loop does that with the
packed conversion (cvttps2dq), a scalar one with cvttss2si only. x86-64 with objdump only.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from normlab.core.kernels.cpu import build

# Kernels whose loops call fast_exp: the fused per-group route (forward; backward from the
# input), the two-pass route's apply passes and channels_last GroupNorm's fused per-sample
# route, each for SiLU (4) and ELU (3).
LOOPS = {
    "fused per-group forward, SiLU": ("fused_plane_forward<4>",),
    "fused per-group forward, ELU": ("fused_plane_forward<3>",),
    "fused per-group backward, SiLU": ("fused_plane_backward<4, false>",),
    "planes apply, SiLU": ("plane_apply", "integral_constant<int, 4>"),
    "columns apply, SiLU": ("column_apply", "integral_constant<int, 4>"),
    "columns backward, SiLU": ("column_backward_apply", "integral_constant<int, 4>"),
    "fused per-sample columns forward, SiLU": ("fused_column_forward", "integral_constant<int, 4>"),
    "fused per-sample columns backward, SiLU": ("fused_column_backward", "integral_constant<int, 4>"),
}


def _instructions_by_function(library: str) -> dict[str, set[str]]:
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True, check=True
    ).stdout
    functions: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = functions.setdefault(header.group(1), set()) if "normlab" in header.group(1) else None
        elif current is not None and "\t" in line:
            current.add(line.rsplit("\t", 1)[-1].split(" ", 1)[0])
    return functions


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86-64 machine code")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_every_loop_calling_the_exponential_is_vectorized():
    module = build.load()
    if module is None:
        pytest.skip(build.status())
    library = Path(module.__file__)
    if not library.exists():  # built by this process: loaded from its build folder, since moved into the cache
        library = build.build_root() / module.__name__ / library.name
    functions = _instructions_by_function(str(library))
    for loop, parts in LOOPS.items():
        found = [ops for name, ops in functions.items() if all(part in name for part in parts)]
        assert found, f"{loop}: no compiled function named with {parts}"
        assert any("vcvttps2dq" in ops or "cvttps2dq" in ops for ops in found), (
            f"{loop}: only scalar float-to-int conversions, so fast_exp runs one value at a time"
        )
