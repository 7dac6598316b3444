"""The routed block's forward pass on a CPU as one compiled call (numba, with torch's BLAS for the products).

Node after node, the forward pass mixes a module's input from the outputs of its sources, multiplies it by the
module's weights (member by member), adds the bias, applies the relu and adds the residual shortcut. As torch
operators that is half a dozen calls a node and a few dozen small views, about 16 nodes a call and four calls a
gradient step: at batch 320 on one thread, Python and torch's dispatch cost about as much as the mixing itself.
Here the loop over nodes runs compiled; the products are torch's own BLAS routine
(:mod:`~d2r_sb3.common.host_blas`), the mixing is :func:`~d2r_sb3.d2r.compiled.weighted_rows`, and the bias,
relu and shortcut are one pass over each slab right after its product, while it is in cache. Passes over many
rows are split among torch's threads, as the other compiled loops are (:func:`~d2r_sb3.d2r.compiled.loop_threads`).

Values: the products and sums are those of the torch operators (the same BLAS routine, the bias added to the
finished product as ``baddbmm`` adds it), so float32 results agree with them bit for bit in the tests; a NaN stays
a NaN through the relu.
"""

from __future__ import annotations

import numba
import numpy as np
import torch as th

from d2r_sb3.common.host_blas import gemm_address, gemm_scratch, matmul_nt
from d2r_sb3.common.host_loops import PARALLEL_FROM, jit, part
from d2r_sb3.d2r.compiled import weighted_rows

__all__ = ["block_forward", "gemm_for"]


def gemm_for(x0: th.Tensor) -> int:
    """The BLAS product :func:`block_forward` uses for tensors like ``x0``: its address, or 0 where the compiled
    forward does not apply (off the CPU, a dtype other than float32 / float64, a torch without exported BLAS)."""
    if x0.device.type != "cpu" or x0.dtype not in (th.float32, th.float64):
        return 0
    return gemm_address(x0.dtype)


def block_forward(
    gemm: int,
    x0: th.Tensor,
    w_in: th.Tensor,
    b_in: th.Tensor,
    w_hid: th.Tensor,
    b_hid: th.Tensor,
    is_input: tuple[bool, ...],
    param_index: tuple[int, ...],
    starts: list[int],
    member_sizes: list[list[int]],
    complete: list[bool],
    sample_of_row: th.Tensor,
    entry_rows: th.Tensor,
    entry_weights: th.Tensor,
    save: bool,
    threads: int,
) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, th.Tensor | None]:
    """The routed block's forward pass (the arguments are those of
    :func:`~d2r_sb3.d2r.routed_block.run_nodes` and its :class:`~d2r_sb3.d2r.row_layout.RowLayout`; ``gemm``:
    :func:`gemm_for`): ``(y [E * B, D], outputs [module rows, D], hidden, inputs)``, where ``hidden`` and
    ``inputs`` (when ``save``) hold every hidden module's relu output ``h`` and input ``u`` in that module's rows
    (the rows of input modules are left unwritten).
    """
    dim = w_in.shape[2]
    n = len(is_input)
    module_rows = starts[n]
    outputs = x0.new_empty(module_rows, dim)
    y = x0.new_empty(starts[n + 1] - module_rows, dim)
    hidden = x0.new_empty(module_rows if save else 0, dim)
    inputs = x0.new_empty(module_rows if save else 0, dim)
    ints, reals = gemm_scratch(outputs.numpy().dtype)
    _forward(
        gemm,
        ints,
        reals,
        x0.detach().reshape(-1, x0.shape[-1]).contiguous().numpy(),
        w_in.detach().numpy(),
        b_in.detach().numpy(),
        w_hid.detach().numpy(),
        b_hid.detach().numpy(),
        np.array(is_input, dtype=np.bool_),
        np.array(param_index, dtype=np.int64),
        np.array(starts, dtype=np.int64),
        np.array(member_sizes, dtype=np.int64),
        np.array(complete, dtype=np.bool_),
        sample_of_row.numpy(),
        entry_rows.numpy(),
        entry_weights.detach().numpy(),
        outputs.numpy(),
        hidden.numpy(),
        inputs.numpy(),
        y.numpy(),
        threads,
    )
    return y, outputs, (hidden if save else None), (inputs if save else None)


@jit
def _forward(
    gemm,
    ints,
    reals,
    x0,
    w_in,
    b_in,
    w_hid,
    b_hid,
    is_input,
    param_index,
    starts,
    member_sizes,
    complete,
    sample_of_row,
    entry_rows,
    entry_weights,
    outputs,
    hidden,
    inputs,
    y,
    threads,
):  # pragma: no cover - compiled
    """:func:`block_forward` (see there) in one compiled loop over the nodes."""
    n = is_input.shape[0]
    save = hidden.shape[0] > 0
    for node in range(n):
        lo, hi = starts[node], starts[node + 1]
        if lo == hi:
            continue
        k = param_index[node]
        if is_input[node]:
            if complete[node]:  # every sample in order: member e's slab is x0's rows of member e
                x = x0
            else:
                x = np.empty((hi - lo, x0.shape[1]), dtype=x0.dtype)
                for r in range(hi - lo):
                    x[r] = x0[sample_of_row[lo + r]]
            first = 0
            for e in range(member_sizes.shape[1]):
                end = first + member_sizes[node, e]
                slab = outputs[lo + first : lo + end]
                matmul_nt(gemm, ints, reals, x[first:end], w_in[e, k], slab, 0.0)
                _finish(slab, b_in[e, k], slab, slab[:0], threads)
                first = end
            continue
        if save:
            u, h = inputs[lo:hi], hidden[lo:hi]
        else:  # h is computed in place in the output rows
            u, h = np.empty((hi - lo, outputs.shape[1]), dtype=outputs.dtype), outputs[lo:hi]
        weighted_rows(outputs, entry_rows[lo:hi], entry_weights[lo:hi], u, threads)
        first = 0
        for e in range(member_sizes.shape[1]):
            end = first + member_sizes[node, e]
            matmul_nt(gemm, ints, reals, u[first:end], w_hid[e, k], h[first:end], 0.0)
            _finish(h[first:end], b_hid[e, k], outputs[lo + first : lo + end], u[first:end], threads)
            first = end
    lo = starts[n]
    weighted_rows(outputs, entry_rows[lo:], entry_weights[lo:], y, threads)


@jit
def _finish(h, bias, out, shortcut, threads):  # pragma: no cover - compiled
    """After a slab's product ``h``: ``h = relu(h + bias)``, then ``out = h + shortcut`` (skipped when
    ``shortcut`` has no rows: an input module, whose ``out`` is ``h`` itself), on ``threads`` threads for large
    slabs."""
    if threads > 1 and h.size >= PARALLEL_FROM:
        _finish_in_parts(h, bias, out, shortcut, threads)
    else:
        _finish_rows(h, bias, out, shortcut, 0, h.shape[0])


@jit(parallel=True)
def _finish_in_parts(h, bias, out, shortcut, threads):  # pragma: no cover - compiled
    n = h.shape[0]
    for index in numba.prange(threads):
        _finish_rows(h, bias, out, shortcut, part(index, threads, n), part(index + 1, threads, n))


@jit(error_model="numpy")
def _finish_rows(h, bias, out, shortcut, first, end):  # pragma: no cover - compiled
    """:func:`_finish` for rows ``first ... end - 1``."""
    width = h.shape[1]
    residual = shortcut.shape[0] > 0
    for g in range(first, end):
        row = h[g]
        for c in range(width):
            v = row[c] + bias[c]
            row[c] = 0.0 if v < 0 else v  # (not max(v, 0): a NaN must stay NaN)
        if residual:
            target, add = out[g], shortcut[g]
            for c in range(width):
                target[c] = row[c] + add[c]
