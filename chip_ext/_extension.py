"""Loads the compiled operator library `chip_ext._C` and checks it matches the running torch."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

REBUILD_HINT = (
    "Rebuild chip_ext against the installed torch: `pip install --no-build-isolation --no-deps "
    "--force-reinstall .` from the chip_ext source folder (or `make build`)."
)


def _read_build_info() -> dict[str, Any] | None:
    try:
        from ._build_info import BUILD_INFO  # written by setup.py next to the extension
    except ImportError:
        return None
    return dict(BUILD_INFO)


def check_torch_version(built: str, running: str) -> None:
    """Raises ImportError when the extension was built against another torch than `running`.

    A C++ extension is bound to the exact torch it was compiled with (ABI, operator schemas), so
    even a patch-level or CUDA-suffix difference ("2.14.1+cu130" vs "2.14.1+cpu") is refused.
    """
    if built != running:
        raise ImportError(
            f"chip_ext._C was built against torch {built}, but torch {running} is running. "
            + REBUILD_HINT
        )


def load() -> ModuleType:
    """Imports chip_ext._C (which registers torch.ops.chip_ext.*) after checking the torch version."""
    info = _read_build_info()
    if info is not None:
        check_torch_version(info["torch_version"], torch.__version__)
    try:
        module = importlib.import_module("chip_ext._C")
    except ImportError as err:
        built = info["torch_version"] if info else "an unknown torch"
        raise ImportError(
            f"chip_ext's compiled kernels (chip_ext._C) could not be loaded: {err}. They were built "
            f"against {built}; torch {torch.__version__} is running. " + REBUILD_HINT
        ) from err
    check_torch_version(module.build_info["torch_version"], torch.__version__)
    return module


_C = load()


def build_info() -> dict[str, Any]:
    """What the loaded extension was built with, and what this process can see.

    Returns a dict with keys: torch_version (built against), with_cuda, cuda_version, cuda_archs,
    running_torch, gpu_visible, gpu_name.
    """
    info = dict(_C.build_info)
    info["running_torch"] = torch.__version__
    info["gpu_visible"] = torch.cuda.is_available()
    info["gpu_name"] = torch.cuda.get_device_name(0) if info["gpu_visible"] else None
    return info
