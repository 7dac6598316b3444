"""Which library computes the float32 matrix products of the ensemble layers on a CPU: torch's default or oneDNN.

torch multiplies float32 matrices on a CPU with MKL's ``sgemm``. On AMD CPUs that kernel reaches about half of what
the core can do: on a 2-core AMD EPYC VM (AVX-512) a ``[640, 400] x [400, 400]`` product took 2.39 ms with MKL and
1.06 ms with oneDNN (``torch.ops.mkldnn._linear_pointwise``, part of the same torch wheel), with float32 results
either way. oneDNN builds a kernel per shape (about 0.4 ms for a new one, cached after), so it only pays for
products whose shapes repeat from step to step: the ensemble layers (encoders, gates, heads: ``B`` or ``2B`` rows),
not the routed block's modules (their row counts follow the routes). Its fixed cost per call is also higher, so
small products keep torch's (:data:`MIN_MULTIPLY_ADDS`).

The choice (:func:`set_cpu_products`, or the environment variable ``D2R_SB3_CPU_PRODUCTS``):

* ``"auto"`` (default): oneDNN on AMD CPUs where torch has it, torch's default elsewhere (MKL is fast on Intel
  CPUs). A fixed rule, not a timing race, so that a run's numbers do not depend on a noisy first measurement.
* ``"onednn"``: oneDNN wherever torch has it.
* ``"default"``: torch's own products everywhere (what an ``nn.Linear`` uses).

Only float32 tensors on a CPU are affected; float64 (the reference tests), bfloat16 (torch already uses oneDNN there)
and GPUs keep torch's products. The two libraries sum in different orders, so results agree to float32 rounding,
not bit for bit.
"""

from __future__ import annotations

import os

import torch as th

from d2r_sb3.common.precision import cpuinfo_field

__all__ = ["CPU_PRODUCTS", "MIN_MULTIPLY_ADDS", "cpu_products", "set_cpu_products", "uses_onednn"]

CPU_PRODUCTS: tuple[str, ...] = ("auto", "onednn", "default")
_ENV = "D2R_SB3_CPU_PRODUCTS"

_choice: str | None = None  # set_cpu_products' argument, else the environment's, else "auto"
_resolved: bool | None = None  # whether oneDNN computes the float32 CPU products (decided on first use)


def set_cpu_products(choice: str) -> None:
    """Choose the library of the ensemble layers' float32 CPU products (module docstring): ``"auto"``,
    ``"onednn"`` or ``"default"``. Takes effect for the following products of this process."""
    global _choice, _resolved
    _choice, _resolved = _checked(choice, "set_cpu_products"), None


def cpu_products() -> str:
    """The current choice (``"auto"``, ``"onednn"`` or ``"default"``)."""
    if _choice is not None:
        return _choice
    return _checked(os.environ.get(_ENV, "auto"), f"the environment variable {_ENV}")


def _checked(choice: str, where: str) -> str:
    if choice not in CPU_PRODUCTS:
        raise ValueError(f"{where}: unknown CPU products {choice!r}; choose one of {CPU_PRODUCTS}.")
    return choice


def _onednn_available() -> bool:
    return th.backends.mkldnn.is_available() and hasattr(th.ops.mkldnn, "_linear_pointwise")


def _amd_cpu() -> bool:
    return cpuinfo_field("vendor_id") == "AuthenticAMD"


MIN_MULTIPLY_ADDS = 2_000_000
"""Products of fewer multiply-adds than this (``rows x inputs x outputs`` per member) keep torch's: oneDNN's fixed
cost per call is higher (1 to 25 us more, measured on the VM above with one thread). Forward products with a ReLU,
torch against oneDNN: ``[1, 400] x [400, 400]`` (acting) 21 against 54 us, 10 rows 66 against 78, 32 rows (5M
multiply-adds) 152 against 108; a 64-unit layer of the tests' small networks, 128 rows (0.5M) 18 against 27;
``[640, 400] x [400, 1]`` (a critic's head) 19 against 42; ``[320, 400] x [400, 8]`` (1M) 53 against 40;
``[512, 64] x [64, 64]`` (2.1M) 60 against 50, its weight gradient 57 against 87; ``[256, 128] x [128, 128]`` (4.2M)
92 against 53, weight gradient 88 against 69."""


def uses_onednn(tensor: th.Tensor, multiply_adds: int = MIN_MULTIPLY_ADDS) -> bool:
    """Whether the ensemble layers compute a product of ``multiply_adds`` (per member) of tensors like ``tensor``
    with oneDNN."""
    global _resolved
    if tensor.device.type != "cpu" or tensor.dtype != th.float32 or multiply_adds < MIN_MULTIPLY_ADDS:
        return False
    if _resolved is None:
        choice = cpu_products()
        _resolved = _onednn_available() and (choice == "onednn" or (choice == "auto" and _amd_cpu()))
    return _resolved


def linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None, relu: bool = False) -> th.Tensor:
    """``relu?(x weight^T + bias)`` with oneDNN (``x [B, in]``, ``weight [out, in]``, any strides)."""
    return th.ops.mkldnn._linear_pointwise(
        _plain(x), _plain(weight), bias, "relu" if relu else "none", [], ""
    )


def _plain(matrix: th.Tensor) -> th.Tensor:
    """``matrix``, copied to contiguous memory unless it is a contiguous matrix or the transpose of one: oneDNN
    falls back to a slow reference kernel for other strides (a ``[320, 39]`` view with rows 49 apart, the state
    part of a batch of observations, took 126 ms where its copy takes microseconds)."""
    if matrix.is_contiguous() or matrix.t().is_contiguous():
        return matrix
    return matrix.contiguous()
