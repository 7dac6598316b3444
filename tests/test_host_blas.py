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


@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_a_product_from_compiled_code_is_torchs_bit_for_bit(dtype, a_transposed, b_transposed):
    """``out = beta * out + op(a) op(b)`` on slabs of larger buffers (row strides above the row length), as
    ``torch.addmm`` computes it; no rows: nothing written; an inner dimension of 0: ``beta * out``."""
    address = host_blas.gemm_address(dtype)
    if not address:
        pytest.skip("this torch exports no BLAS product")
    gen = th.Generator().manual_seed(0)
    big_a = th.randn(150, 150, generator=gen, dtype=dtype)
    big_b = th.randn(150, 150, generator=gen, dtype=dtype)
    a = big_a[10:141, :63] if a_transposed else big_a[10:73, :131]  # op(a): [63, 131], rows 150 apart
    b = big_b[3:64, :131] if b_transposed else big_b[3:134, :61]  # op(b): [131, 61]
    op_a, op_b = (a.t() if a_transposed else a), (b.t() if b_transposed else b)
    base = th.randn(80, 61, generator=gen, dtype=dtype)
    ints, reals = host_blas.gemm_scratch(base.numpy().dtype)

    def product(a: th.Tensor, b: th.Tensor, out: th.Tensor, beta: float) -> None:
        host_blas.matmul(
            address, ints, reals, a.numpy(), a_transposed, b.numpy(), b_transposed, out.numpy(), beta
        )

    for beta in (0.0, 1.0):
        out = base.clone()
        product(a, b, out[5:68], beta)
        assert th.equal(out[5:68], th.addmm(base[5:68], op_a, op_b, beta=beta)), f"beta={beta}"
        assert th.equal(out[:5], base[:5]) and th.equal(out[68:], base[68:]), "rows outside the slab"
    out = base.clone()
    empty_a = a[:, :0] if a_transposed else a[:0]
    product(empty_a, b, out[:0], 0.0)
    assert th.equal(out, base)
    inner_a = a[:0] if a_transposed else a[:, :0]  # op(a): [63, 0]
    inner_b = b[:, :0] if b_transposed else b[:0]
    for beta, want in ((0.0, th.zeros(63, 61, dtype=dtype)), (1.0, base[5:68])):
        out = base.clone()
        product(inner_a, inner_b, out[5:68], beta)
        assert th.equal(out[5:68], want)
