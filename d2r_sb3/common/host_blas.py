"""Matrix products inside compiled host loops: torch's own BLAS, called from numba.

A compiled loop that runs a whole sequence of small products (the routed block's modules, node after node) would
otherwise go back to Python and torch for each one. torch's CPU library exports the Fortran BLAS entry points
``sgemm_`` and ``dgemm_`` (MKL in the x86-64 wheels, the same code ``torch.mm`` runs there, on torch's threads);
:func:`gemm_address` finds them and :func:`matmul` calls one from compiled code. Where the library exports
none (another build of torch), :func:`gemm_address` answers 0 and callers keep torch's products.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import torch as th
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from d2r_sb3.common.host_loops import jit

__all__ = ["gemm_address", "gemm_scratch", "matmul"]

_ENTRY_POINTS = {th.float32: "sgemm_", th.float64: "dgemm_"}
_addresses: dict[th.dtype, int] = {}


def gemm_address(dtype: th.dtype) -> int:
    """The address of torch's BLAS product for ``dtype`` (float32 or float64), checked once on a small product
    against numpy; 0 where there is none (other dtypes, a torch without exported BLAS symbols)."""
    if dtype not in _addresses:
        _addresses[dtype] = _checked(_find(_ENTRY_POINTS[dtype]), dtype) if dtype in _ENTRY_POINTS else 0
    return _addresses[dtype]


def gemm_scratch(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The argument memory :func:`matmul` passes BLAS by address (Fortran passes every argument by reference):
    eight integers and two floats of ``dtype``, owned by the caller for the duration of its compiled call."""
    return np.zeros(8, dtype=np.int64), np.zeros(2, dtype=dtype)


def _find(name: str) -> int:
    """The address of ``name`` in torch's CPU library (loaded already), or 0."""
    folder = os.path.join(os.path.dirname(th.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(folder, "*torch_cpu.*"))):
        try:
            function = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        return ctypes.cast(function, ctypes.c_void_p).value or 0
    return 0


def _checked(address: int, dtype: th.dtype) -> int:
    """``address`` if a product through it equals numpy's (to rounding), else 0."""
    if not address:
        return 0
    values = (
        np.random.default_rng(0).standard_normal((3, 7, 5)).astype(th.empty(0, dtype=dtype).numpy().dtype)
    )
    x, w, out = values[0, :, :5].copy(), values[1, :4, :5].copy(), np.zeros((7, 4), dtype=values.dtype)
    ints, reals = gemm_scratch(values.dtype)
    matmul(address, ints, reals, x, False, w, True, out, 0.0)
    return address if np.allclose(out, x @ w.T, rtol=1e-5, atol=1e-5) else 0


@intrinsic
def _call_gemm(typingctx, address, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call the Fortran ``?gemm_`` at ``address`` with 13 pointer arguments (each given as an integer)."""
    pointer_args = (transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    signature = types.void(address, *pointer_args)

    def codegen(context, builder, sig, args):
        byte_pointer = ir.IntType(8).as_pointer()
        function_type = ir.FunctionType(ir.VoidType(), [byte_pointer] * len(pointer_args))
        function = builder.inttoptr(args[0], function_type.as_pointer())
        builder.call(function, [builder.inttoptr(value, byte_pointer) for value in args[1:]])
        return context.get_dummy_value()

    return signature, codegen


@jit
def matmul(address, ints, reals, a, a_transposed, b, b_transposed, out, beta):  # pragma: no cover - compiled
    """``out = beta * out + op(a) @ op(b)`` through the BLAS product at ``address`` (:func:`gemm_address` of the
    dtype), ``op(a)`` being ``a.T`` where ``a_transposed``, else ``a`` (the same for ``b``). Every matrix has
    contiguous rows (its row stride may be larger); ``ints``, ``reals``: :func:`gemm_scratch`. Nothing happens
    for an empty ``out``; with an inner dimension of 0, ``out`` becomes ``beta * out``.

    Row-major ``out = op(a) op(b)`` is column-major ``out^T = op(b)^T op(a)^T``, and a row-major matrix read
    column-major is its transpose: BLAS gets ``b`` first, transposed where ``op(b)`` is not.
    """
    m = a.shape[1] if a_transposed else a.shape[0]
    k = a.shape[0] if a_transposed else a.shape[1]
    n = b.shape[0] if b_transposed else b.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        for i in range(m):
            for j in range(n):
                out[i, j] = beta * out[i, j] if beta != 0 else 0.0
        return
    size = a.itemsize
    ints[0] = 84 if b_transposed else 78  # 'T' / 'N'
    ints[1] = 84 if a_transposed else 78
    ints[2], ints[3], ints[4] = n, m, k
    ints[5], ints[6], ints[7] = b.strides[0] // size, a.strides[0] // size, out.strides[0] // size
    reals[0], reals[1] = 1.0, beta
    base, step = ints.ctypes.data, ints.itemsize
    _call_gemm(
        address,
        base,
        base + step,
        base + 2 * step,
        base + 3 * step,
        base + 4 * step,
        reals.ctypes.data,
        b.ctypes.data,
        base + 5 * step,
        a.ctypes.data,
        base + 6 * step,
        reals.ctypes.data + reals.itemsize,
        out.ctypes.data,
        base + 7 * step,
    )
