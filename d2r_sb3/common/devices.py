"""Whether torch can use the device a user asked for.

SB3 falls back to the CPU when ``device="cuda"`` is asked for and torch sees no GPU, without a word; a multi-day
run that silently trains on the CPU is worth a warning (the API) or an error (the zoo's ``--device``).
"""

from __future__ import annotations

import torch as th

__all__ = ["device_unavailable_reason"]


def device_unavailable_reason(device: th.device | str) -> str | None:
    """Why torch cannot use ``device`` on this machine, or ``None`` when it can (``"auto"`` always can).

    :raises RuntimeError: For a string that names no torch device (torch's own message).
    """
    if isinstance(device, str) and device == "auto":
        return None
    device = th.device(device)
    if device.type == "cuda":
        if not th.cuda.is_available():
            build = "a CPU-only build" if th.version.cuda is None else f"built for CUDA {th.version.cuda}"
            return f"torch sees no CUDA device (torch {th.__version__}, {build})"
        count = th.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    if device.type == "mps" and not th.backends.mps.is_available():
        return "torch sees no MPS device"
    return None
