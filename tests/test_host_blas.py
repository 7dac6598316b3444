"""torch's BLAS products called from compiled loops (:mod:`d2r_sb3.common.host_blas`)."""

from __future__ import annotations

import platform
import sys

import pytest
import torch as th

from d2r_sb3.common import host_blas


def test_torchs_cpu_wheel_exports_its_float_products():
    """The x86-64 Linux wheels of torch (MKL inside) export ``sgemm_`` and ``dgemm_``; other dtypes have none."""
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("checked on x86-64 Linux, where torch's wheels carry MKL")
    assert host_blas.gemm_address(th.float32) != 0
    assert host_blas.gemm_address(th.float64) != 0
    assert host_blas.gemm_address(th.bfloat16) == 0
    assert host_blas._find("no_such_symbol_") == 0


@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_a_product_from_compiled_code_is_torchs_bit_for_bit(dtype):
    """``out = beta * out + x w^T`` on slabs of larger buffers (row strides above the row length), as
    ``torch.addmm`` computes it; no rows: nothing written."""
    address = host_blas.gemm_address(dtype)
    if not address:
        pytest.skip("this torch exports no BLAS product")
    gen = th.Generator().manual_seed(0)
    big_x = th.randn(90, 150, generator=gen, dtype=dtype)
    big_w = th.randn(70, 150, generator=gen, dtype=dtype)
    x, w = big_x[10:73, :131], big_w[3:64, :131]  # [63, 131] and [61, 131], rows 150 apart
    base = th.randn(80, 61, generator=gen, dtype=dtype)
    ints, reals = host_blas.gemm_scratch(base.numpy().dtype)
    for beta in (0.0, 1.0):
        out = base.clone()
        host_blas.matmul_nt(address, ints, reals, x.numpy(), w.numpy(), out[5:68].numpy(), beta)
        want = th.addmm(base[5:68], x, w.t(), beta=beta)
        assert th.equal(out[5:68], want), f"beta={beta}"
        assert th.equal(out[:5], base[:5]) and th.equal(out[68:], base[68:]), "rows outside the slab"
    out = base.clone()
    host_blas.matmul_nt(address, ints, reals, x[:0].numpy(), w.numpy(), out[:0].numpy(), 0.0)
    assert th.equal(out, base)
