"""Whether bfloat16 arithmetic is native (fast) on a device, and the precision a gradient step actually uses.

On x86 CPUs torch computes bfloat16 matrix products with oneDNN. With the ``avx512_bf16`` or ``amx_bf16``
instructions they are several times faster than float32; without them (AVX2-only CPUs, and AVX-512 CPUs
without bf16) oneDNN emulates them: no faster than float32 on AVX-512, about 20-30x slower on AVX2. So
``train_precision="bfloat16"`` only pays where :func:`bfloat16_is_native` is true; elsewhere the policy trains
in float32 and says so (see :class:`~d2r_sb3.d2r.policies.D2RPolicy`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch as th

__all__ = [
    "CPU_FLAGS_OF_INTEREST",
    "bfloat16_is_native",
    "bfloat16_not_native_reason",
    "cpu_flags",
    "cpuinfo_field",
]

CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile")
"""The CPU flags that decide the speed of the float32 and bfloat16 kernels (named with every timing)."""

# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) that still allow native bfloat16 instructions.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10")


@functools.cache
def cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name : value`` line of ``/proc/cpuinfo`` (``"vendor_id"``, ``"model name"``,
    ``"flags"``, ...), or ``None`` where there is no such line or the file is unreadable (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The CPU's flags among :data:`CPU_FLAGS_OF_INTEREST` (from ``/proc/cpuinfo``; empty where unreadable)."""
    present = set((cpuinfo_field("flags") or "").split())
    return tuple(flag for flag in CPU_FLAGS_OF_INTEREST if flag in present)


def _onednn_limit_below_bf16() -> str | None:
    """The ``NAME=VALUE`` of a oneDNN ISA limit that keeps it below the bfloat16 instructions, or ``None``."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        limit = os.environ.get(name, "").strip().upper()
        if limit and limit not in ("ALL", "DEFAULT") and not limit.startswith(_BF16_ISAS):
            return f"{name}={os.environ[name]}"
    return None


def bfloat16_is_native(device: th.device | str = "cpu") -> bool:
    """True where bfloat16 matrix products run in hardware: a CUDA GPU that supports them, or a CPU with
    ``avx512_bf16`` / ``amx_bf16`` that torch's oneDNN is allowed to use."""
    return bfloat16_not_native_reason(device) is None


def bfloat16_not_native_reason(device: th.device | str = "cpu") -> str | None:
    """Why bfloat16 matrix products are not native on ``device`` (one sentence for a message), or ``None`` where
    they are (:func:`bfloat16_is_native`)."""
    device = th.device(device)
    if device.type == "cuda":
        if th.cuda.is_available() and th.cuda.is_bf16_supported():
            return None
        return "this CUDA device has no bfloat16 support"
    if device.type != "cpu":
        return f"bfloat16 is treated as native on CPUs and CUDA GPUs only, not on {device.type!r}"
    flags = cpu_flags()
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        shown = ", ".join(flags) or "unknown"
        return f"the CPU has neither avx512_bf16 nor amx_bf16 (its flags: {shown})"
    limit = _onednn_limit_below_bf16()
    if limit is not None:
        return f"the CPU has the bfloat16 instructions, but {limit} keeps oneDNN below them"
    if not th.ops.mkldnn._is_mkldnn_bf16_supported():
        return "the CPU has the bfloat16 instructions, but this torch's oneDNN does not use them"
    return None
