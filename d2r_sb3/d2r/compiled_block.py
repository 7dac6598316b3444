"""The routed block's forward and backward passes on a CPU, each one compiled call (numba, with torch's BLAS).

Node after node, the forward pass mixes a module's input from the outputs of its sources, multiplies it by the
module's weights (member by member), adds the bias, applies the relu and adds the residual shortcut; the backward
pass, nodes in reverse, pulls each module's gradient from its readers, multiplies it back through the weights and
takes the weight and bias gradients. As torch operators that is half a dozen calls and a few dozen small views a
node, about 16 nodes a call and six calls (four forward, two backward) a gradient step: at batch 320 on one thread,
Python and torch's dispatch cost about as much as the memory passes themselves. Here each loop over the nodes runs
compiled. The products are torch's own BLAS routine (:mod:`~d2r_sb3.common.host_blas`), the mixing is
:func:`~d2r_sb3.d2r.compiled.weighted_rows`, the pulls :func:`~d2r_sb3.d2r.compiled.pull_through_relu`, and the
bias, relu and shortcut one pass over each slab right after its product, while it is in cache. Passes over many rows
are split among torch's threads, as the other compiled loops are (:func:`~d2r_sb3.d2r.compiled.loop_threads`).
Measured on a 2-core Intel Xeon VM (AVX-512), each against the operator loop in the same process: the forward
0.94x the gradient step's time, then the backward 0.90x (batch 320, one thread); 0.95x and 0.94x at batch 1280 on
two threads.

Values: the forward's products and sums are those of the torch operators (the same BLAS routine, the bias added to
the finished product as ``baddbmm`` adds it), so float32 results agree with them bit for bit in the tests on one
thread; on two, MKL's AVX2 kernels sum a few rows of a product in another order depending on how it is called (1-4
units in the last place apart), its AVX-512 kernels agree. A NaN stays a NaN through the relu. The backward's
gradients equal the operator loop's to rounding (its bias gradients are sums in row order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numba
import numpy as np
import torch as th

from d2r_sb3.common.host_blas import gemm_address, gemm_scratch, matmul
from d2r_sb3.common.host_loops import PARALLEL_FROM, cached_on_disk, jit, part, serial_as_none
from d2r_sb3.d2r.compiled import pull_through_relu, weighted_rows

if TYPE_CHECKING:
    from d2r_sb3.d2r.row_layout import RowLayout

__all__ = ["block_backward", "block_forward", "gemm_for", "is_cached"]


def gemm_for(x0: th.Tensor) -> int:
    """The BLAS product :func:`block_forward` uses for tensors like ``x0``: its address, or 0 where the compiled
    forward does not apply (off the CPU, a dtype other than float32 / float64, a torch without exported BLAS)."""
    if x0.device.type != "cpu" or x0.dtype not in (th.float32, th.float64):
        return 0
    return gemm_address(x0.dtype)


def is_cached() -> tuple[bool, str] | None:
    """Whether the compiled forward pass is in numba's disk cache for this machine (it is compiled together with
    most of D2R's compiled loops, in the first gradient steps of a process that finds none), and the cache's folder;
    ``None``: cannot be told (:func:`~d2r_sb3.common.host_loops.cached_on_disk`)."""
    return cached_on_disk(_forward)


def block_forward(
    gemm: int,
    x0: th.Tensor,
    w_in: th.Tensor,
    b_in: th.Tensor,
    w_hid: th.Tensor,
    b_hid: th.Tensor,
    layout: RowLayout,
    is_input: tuple[bool, ...],
    param_index: tuple[int, ...],
    save: bool,
    threads: int,
) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, th.Tensor | None]:
    """The routed block's forward pass (the arguments are those of
    :func:`~d2r_sb3.d2r.routed_block.run_nodes`; ``is_input`` and ``param_index``: its plan's; ``gemm``:
    :func:`gemm_for`): ``(y [E * B, D], outputs [module rows, D], hidden, inputs)``, where ``hidden`` and
    ``inputs`` (when ``save``) hold every hidden module's relu output ``h`` and input ``u`` in that module's rows
    (the rows of input modules are left unwritten).
    """
    dim = w_in.shape[2]
    n = len(is_input)
    module_rows = layout.starts[n]
    outputs = x0.new_empty(module_rows, dim)
    y = x0.new_empty(layout.n_rows - module_rows, dim)
    hidden = x0.new_empty(module_rows if save else 0, dim)
    inputs = x0.new_empty(module_rows if save else 0, dim)
    ints, reals = gemm_scratch(outputs.numpy().dtype)
    _forward(
        gemm,
        ints,
        reals,
        x0.detach().reshape(-1, x0.shape[-1]).contiguous().numpy(),
        w_in.detach().contiguous().numpy(),  # (the products read each matrix's rows as contiguous)
        b_in.detach().numpy(),
        w_hid.detach().contiguous().numpy(),
        b_hid.detach().numpy(),
        np.array(is_input, dtype=np.bool_),
        np.array(param_index, dtype=np.int64),
        np.array(layout.starts, dtype=np.int64),
        np.array(layout.member_sizes, dtype=np.int64),
        np.array(layout.complete, dtype=np.bool_),
        layout.sample_of_row.numpy(),
        layout.entry_rows.numpy(),
        layout.entry_weights.detach().numpy(),
        outputs.numpy(),
        hidden.numpy(),
        inputs.numpy(),
        y.numpy(),
        serial_as_none(threads),
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
            # every sample in order: member e's slab is x0's rows of member e; else its samples' rows
            x = x0 if complete[node] else _sample_rows(x0, sample_of_row[lo:hi])
            first = 0
            for e in range(member_sizes.shape[1]):
                end = first + member_sizes[node, e]
                slab = outputs[lo + first : lo + end]
                matmul(gemm, ints, reals, x[first:end], False, w_in[e, k], True, slab, 0.0)
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
            matmul(gemm, ints, reals, u[first:end], False, w_hid[e, k], True, h[first:end], 0.0)
            _finish(h[first:end], b_hid[e, k], outputs[lo + first : lo + end], u[first:end], threads)
            first = end
    lo = starts[n]
    weighted_rows(outputs, entry_rows[lo:], entry_weights[lo:], y, threads)


@jit
def _finish(h, bias, out, shortcut, threads):  # pragma: no cover - compiled
    """After a slab's product ``h``: ``h = relu(h + bias)``, then ``out = h + shortcut`` (skipped when
    ``shortcut`` has no rows: an input module, whose ``out`` is ``h`` itself), on ``threads`` threads for large
    slabs."""
    if threads is None:  # (one thread: see host_loops.serial_as_none)
        _finish_rows(h, bias, out, shortcut, 0, h.shape[0])
    elif threads > 1 and h.size >= PARALLEL_FROM:
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


class PulledEdges(Protocol):
    """The edges of one backward pass as :func:`block_backward` reads them
    (:class:`~d2r_sb3.d2r.block_edges.PullGraph`): host arrays from :func:`~d2r_sb3.d2r.compiled.edge_bags`, the
    module ranges of its entries, and the flat grid the pulls write the routing weights' gradient into (``None``:
    not taken)."""

    edge_rows: np.ndarray
    edge_weights: np.ndarray
    bag_starts: np.ndarray
    edge_grid_slots: np.ndarray
    segment: np.ndarray
    pairs: int
    two_sided: bool
    threads: int
    dots: np.ndarray | None


def block_backward(
    gemm: int,
    graph: PulledEdges,
    table: th.Tensor,
    x0: th.Tensor,
    w_in: th.Tensor,
    w_hid: th.Tensor,
    outputs: th.Tensor,
    hidden: th.Tensor,
    inputs: th.Tensor,
    layout: RowLayout,
    is_input: tuple[bool, ...],
    param_index: tuple[int, ...],
    weight_grads: tuple[th.Tensor | None, th.Tensor | None, th.Tensor | None, th.Tensor | None],
    need_x0: bool,
) -> th.Tensor | None:
    """The routed block's backward loop over the nodes (the pulling strategy, compiled pulls) in one compiled call.

    :param graph: the call's edges (:class:`~d2r_sb3.d2r.block_edges.PullGraph`); its routing-weight gradient
        grid, when started, is written by the pulls.
    :param is_input: for every module, whether it reads ``x0``; ``param_index``: its weight slot.
    :param table: the per-node gradient table ``[halves, rows, D]``, the output node's rows filled.
    :param hidden: :func:`block_forward`'s relu outputs, ``inputs`` its module inputs (``[module rows, D]``).
    :param weight_grads: ``(grad_w_in, grad_b_in, grad_w_hid, grad_b_hid)`` in the weights' layouts, written
        where given (the input modules' ones zero-filled beforehand: no sample may reach one).
    :return: ``dL/dx0 [E, B, Din]`` when ``need_x0``, else ``None``.
    """
    grad_x0 = th.empty_like(x0) if need_x0 else None
    grad_x0_rows = grad_x0.view(-1, x0.shape[-1]) if grad_x0 is not None else x0.new_empty(0, x0.shape[-1])
    no_weights, no_biases = x0.new_empty(0, 0, 0, 0).numpy(), x0.new_empty(0, 0, 0).numpy()
    grad_w_in, grad_b_in, grad_w_hid, grad_b_hid = (
        grad.numpy() if grad is not None else empty
        for grad, empty in zip(weight_grads, (no_weights, no_biases, no_weights, no_biases), strict=True)
    )
    trained = layout.trained_sizes if layout.trained_sizes is not None else layout.member_sizes
    dots = graph.dots if graph.dots is not None else np.zeros(0, dtype=graph.edge_weights.dtype)
    ints, reals = gemm_scratch(outputs.numpy().dtype)
    written = _backward(
        gemm,
        ints,
        reals,
        table.view(-1, table.shape[-1]).numpy(),
        table.shape[1] if graph.two_sided else 0,
        np.array(is_input, dtype=np.bool_),
        np.array(param_index, dtype=np.int64),
        np.array(layout.starts, dtype=np.int64),
        np.array(layout.member_sizes, dtype=np.int64),
        np.array(trained, dtype=np.int64),
        np.array(layout.complete, dtype=np.bool_),
        layout.sample_of_row.numpy(),
        graph.edge_rows,
        graph.edge_weights,
        graph.bag_starts.reshape(-1),
        graph.segment,
        graph.pairs,
        graph.edge_grid_slots,
        dots,
        x0.detach().reshape(-1, x0.shape[-1]).contiguous().numpy(),
        w_in.detach().contiguous().numpy(),
        w_hid.detach().contiguous().numpy(),
        outputs.numpy(),
        hidden.numpy(),
        inputs.numpy(),
        grad_x0_rows.numpy(),
        grad_w_in,
        grad_b_in,
        grad_w_hid,
        grad_b_hid,
        serial_as_none(graph.threads),
    )
    if grad_x0 is None:
        return None
    if not written:  # (no input module reached: not possible with a route, but exact)
        grad_x0.zero_()
    return grad_x0


@jit
def _backward(
    gemm,
    ints,
    reals,
    table,
    shortcut_rows,
    is_input,
    param_index,
    starts,
    member_sizes,
    trained,
    complete,
    sample_of_row,
    edge_rows,
    edge_weights,
    bag_starts,
    segment,
    pairs,
    grid_slots,
    dots,
    x0,
    w_in,
    w_hid,
    outputs,
    hidden,
    inputs,
    grad_x0,
    grad_w_in,
    grad_b_in,
    grad_w_hid,
    grad_b_hid,
    threads,
):  # pragma: no cover - compiled
    """:func:`block_backward` (see there), nodes in reverse order; returns whether ``grad_x0`` was written.

    ``table`` is the flat gradient table, its second half (``gS``) from row ``shortcut_rows`` (0: no second half).
    A module's edges are the entries ``segment[j] ... segment[j + 1] - 1`` of ``edge_rows`` / ``edge_weights`` /
    ``grid_slots``, its rows' bags start at the (absolute) entries ``bag_starts[rows * pairs]``; the pull reads
    the arrays cut at the module's last entry, so its last bag ends there."""
    n = is_input.shape[0]
    members = member_sizes.shape[1]
    most = 0
    for node in range(n):
        most = max(most, starts[node + 1] - starts[node])
    grad_pre_rows = np.empty((most, outputs.shape[1]), dtype=outputs.dtype)
    no_rows = outputs[:0]
    x0_written = False
    for node in range(n - 1, -1, -1):
        lo, hi = starts[node], starts[node + 1]
        k = param_index[node]
        if lo == hi:  # no sample reaches this module: its gradients are 0
            if not is_input[node]:
                _fill_zero(grad_w_hid, k)
                _fill_zero(grad_b_hid, k)
            continue
        end = segment[node + 1]
        offsets = bag_starts[lo * pairs : hi * pairs]
        grad_pre = grad_pre_rows[: hi - lo]
        if is_input[node]:  # gF through the relu of o = relu(M(x0)); rsg(o) = sg(o): no shortcut gradient
            mask, total, also = outputs[lo:hi], no_rows, no_rows
        else:  # the module's table rows take gT first, then gU is added (A = gU + gS)
            mask, total = hidden[lo:hi], table[lo:hi]
            also = table[shortcut_rows + lo : shortcut_rows + hi] if shortcut_rows > 0 else no_rows
        pull_through_relu(
            table,
            edge_rows[:end],
            offsets,
            edge_weights[:end],
            mask,
            grad_pre,
            total,
            also,
            outputs[lo:hi],
            grid_slots[:end],
            dots,
            threads,
        )
        if is_input[node]:
            x0_written = _input_module_gradients(
                gemm,
                ints,
                reals,
                grad_pre,
                x0,
                w_in,
                k,
                member_sizes[node],
                trained[node],
                complete[node],
                sample_of_row[lo:hi],
                grad_x0,
                grad_w_in,
                grad_b_in,
                x0_written,
            )
            continue
        first = 0
        for e in range(members):
            rows = member_sizes[node, e]
            used = trained[node, e]
            slab = grad_pre[first : first + rows]
            matmul(gemm, ints, reals, slab, False, w_hid[e, k], False, total[first : first + rows], 1.0)
            u = inputs[lo + first : lo + first + used]
            _weight_gradients(gemm, ints, reals, slab[:used], u, grad_w_hid, grad_b_hid, e, k)
            first += rows
    return x0_written


@jit
def _input_module_gradients(
    gemm,
    ints,
    reals,
    grad_pre,
    x0,
    w_in,
    k,
    sizes,
    trained,
    complete,
    samples,
    grad_x0,
    grad_w_in,
    grad_b_in,
    x0_written,
):  # pragma: no cover - compiled
    """An input module's weight and bias gradients and its share of ``dL/dx0`` (where those arrays have values)
    from its gradient before the relu; returns whether ``grad_x0`` is written now. ``sizes``, ``trained``: the
    rows of each member's slab and those that train the weights; ``complete``: whether every sample reaches the
    module; ``samples``: the sample of each of its rows."""
    x = x0 if complete else _sample_rows(x0, samples)  # member e's slab: its samples' rows
    wants_x0 = grad_x0.size > 0
    # complete: the shares go straight to x0's rows; else to rows of their own, then added to their samples' rows
    shares = (
        grad_x0 if complete or not wants_x0 else np.empty((samples.shape[0], x0.shape[1]), dtype=x0.dtype)
    )
    beta = 1.0 if x0_written and complete else 0.0
    first = 0
    for e in range(sizes.shape[0]):
        rows, used = sizes[e], trained[e]
        slab = grad_pre[first : first + rows]
        _weight_gradients(gemm, ints, reals, slab[:used], x[first : first + used], grad_w_in, grad_b_in, e, k)
        if wants_x0:
            matmul(gemm, ints, reals, slab, False, w_in[e, k], False, shares[first : first + rows], beta)
        first += rows
    if wants_x0 and not complete:
        _add_to_samples(shares, samples, grad_x0, x0_written)
    return x0_written or wants_x0


@jit
def _weight_gradients(gemm, ints, reals, grad_pre, x, grad_w, grad_b, e, k):  # pragma: no cover - compiled
    """``grad_w[e, k] = grad_pre^T x`` and ``grad_b[e, k]`` the column sums of ``grad_pre`` (each only where that
    array has values): one member's weight and bias gradients of the module in weight slot ``k``."""
    if grad_w.size > 0:
        matmul(gemm, ints, reals, grad_pre, True, x, False, grad_w[e, k], 0.0)
    if grad_b.size > 0:
        _column_sums(grad_pre, grad_b[e, k])


@jit
def _sample_rows(x0, samples):  # pragma: no cover - compiled
    """``x0[samples]``: the rows of the given samples."""
    x = np.empty((samples.shape[0], x0.shape[1]), dtype=x0.dtype)
    for r in range(samples.shape[0]):
        x[r] = x0[samples[r]]
    return x


@jit
def _add_to_samples(shares, samples, grad_x0, written):  # pragma: no cover - compiled
    """``grad_x0[samples[r]] += shares[r]`` for every row in order (``grad_x0`` zeroed first unless ``written``;
    padding rows add their 0 to sample 0)."""
    if not written:
        grad_x0[:] = 0.0
    for r in range(samples.shape[0]):
        target, add = grad_x0[samples[r]], shares[r]
        for c in range(target.shape[0]):
            target[c] += add[c]


@jit
def _column_sums(values, out):  # pragma: no cover - compiled
    """``out = values.sum(0)`` (row by row, in order)."""
    for c in range(out.shape[0]):
        out[c] = 0.0
    for r in range(values.shape[0]):
        row = values[r]
        for c in range(out.shape[0]):
            out[c] += row[c]


@jit
def _fill_zero(grads, k):  # pragma: no cover - compiled
    """Zero weight slot ``k`` of every member of ``grads`` (``[E, slots, ...]``; nothing if it has no values)."""
    if grads.size == 0:
        return
    for e in range(grads.shape[0]):
        grads[e, k][:] = 0.0
