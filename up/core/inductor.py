"""What torch.compile needs before a stage relies on it.

On the CPU, inductor writes C++ kernels and builds them with the machine's C++
compiler at the first call, minutes into a stage. Checking for the compiler when the
stage starts turns a traceback from deep inside inductor into one line naming the
param that asked for compilation.
"""

from __future__ import annotations

import torch

from up.core.errors import StageError


def require_compiler(device: torch.device, key: str) -> None:
    """Raise StageError naming ``key`` (e.g. ``train.compile``) when compilation on
    ``device`` cannot work here: on the CPU, when inductor finds no C++ compiler."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler  # inductor's own search

    try:
        get_cpp_compiler()
    except RuntimeError as error:  # inductor's InvalidCxxCompiler
        raise StageError(f"{key}: true compiles C++ kernels on the CPU, and no C++ compiler was "
                         f"found ({error}); install g++ (or set CXX) or set {key} false") from None
