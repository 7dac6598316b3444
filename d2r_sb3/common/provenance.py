"""Where a result came from: package versions and hardware, stored with every results file and checkpoint."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch as th

from d2r_sb3.common.precision import cpu_flags, cpuinfo_field

# Key in the report -> distribution name on PyPI.
_PACKAGES = {
    "d2r_sb3": "d2r_sb3",
    "stable_baselines3": "stable-baselines3",
    "torch": "torch",
    "gymnasium": "gymnasium",
    "metaworld": "metaworld",
    "mujoco": "mujoco",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface-hub",
}


def versions() -> dict[str, str]:
    """Python and the versions of the packages a result depends on ("not installed" when absent)."""
    found = {"python": platform.python_version()}
    for key, dist in _PACKAGES.items():
        try:
            found[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[key] = "not installed"
    return found


def hardware() -> dict[str, Any]:
    """CPU model, core count, the CPU flags that set kernel speed, torch threads, GPU name (``None`` without CUDA)
    and platform."""
    return {
        "cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": list(cpu_flags()),  # the ones that decide float32 / bfloat16 speed
        "torch_threads": th.get_num_threads(),
        "gpu": th.cuda.get_device_name(0) if th.cuda.is_available() else None,
        "platform": platform.platform(),
    }
