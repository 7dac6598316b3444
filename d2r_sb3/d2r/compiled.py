"""D2R's host-side work on a CPU as compiled loops (numba): the route choice of every network call, and the row
layout and backward edge lists of every routed-block call.

* **Route choice** (:func:`top_routes`, :func:`chosen_softmax`): every network call picks the top ``k`` sources of
  each node from the gate logits, decides their ResRouting masks and weighs them (MaskSoftmax). As tensor
  operations on the padded ``[B, n + 1, n]`` logits that was about 15 small operators a call (8 % of a gradient
  step at batch 320 on one thread); here it is one pass over the flat logits, the samples of a chunk side by
  side so the loops vectorise, and one pass back for MaskSoftmax's gradient.
* **Routed-block bookkeeping** (:func:`skipping_layout`, :func:`edge_bags`): every call of the routed block first
  decides on the host which (module, sample) pairs it computes and where their rows live (:mod:`.row_layout`),
  and every backward pass groups the routing edges by source row
  (:class:`~d2r_sb3.d2r.block_edges.PullGraph`). As numpy array operations it took two to three dozen passes
  over memory and as many calls a routed-block call, about 5 % of a gradient step at batch 320 and 8 % at batch
  1280 on two threads (where it runs on one thread while the other waits); as loops it is one or two passes.
* **Memory-bound passes** (:func:`gate_inputs`, :func:`pull_through_relu`): the modules' and the gate's inputs
  ``relu(f_pre)`` and ``H(task) * f_pre`` are one pass each way, and a module's pulled gradients, relu mask and
  shortcut copy are one pass, which also takes the routing weights' gradient of the edges it loads (one dot
  product per edge, straight into its grid).
* **Threads** (:func:`loop_threads`): with torch on more than one thread, the route choice, MaskSoftmax, the gate
  inputs and the gradient pull split their rows among numba's OpenMP thread pool (``parallel=True``: a serial
  kernel over a range of rows, and a driver that runs one range per thread). Where the pool is not OpenMP, the
  loops stay serial and torch's kernels do the memory-bound passes instead. Measured at batch 1280 on two threads
  (2-core Intel Xeon VM): the route choice 5.1 -> 2.8 ms a step, the pull 10.6 (torch's kernels) -> 8.4 ms.

The functions compile on first use for the dtypes they get (several seconds in all, once) and are cached on disk
(numba's ``cache=True``: in ``__pycache__`` next to this file, under ``NUMBA_CACHE_DIR`` or in the user's cache
folder), so a later process loads them in milliseconds (the parallel ones with their thread pool in about half a
second). They release the GIL. The bookkeeping gives exactly the arrays of the array versions it replaced, and
the route choice exactly the routes of the tensor operations that still run off the CPU (the tests keep both as
their reference); MaskSoftmax's weights agree to rounding (they are computed in float64). Float routing weights are
only moved by the bookkeeping, never computed with: 16-bit floats come as their bits (``int16``).
"""

from __future__ import annotations

import numba
import numpy as np

from d2r_sb3.common.host_loops import PARALLEL_FROM, loop_threads
from d2r_sb3.common.host_loops import jit as _jit
from d2r_sb3.common.host_loops import part as _part

__all__ = [
    "bag_mode",
    "chosen_softmax",
    "chosen_softmax_backward",
    "edge_bags",
    "gate_inputs",
    "gate_inputs_backward",
    "loop_threads",
    "pull_through_relu",
    "skipping_layout",
    "top_routes",
    "weighted_rows",
]


# How edge_bags fills a source row's bags (see there).
ONE_BAG, FULL_SHORTCUT, MASKED_SHORTCUT = 0, 1, 2


def bag_mode(resrouting: bool, masked_shortcut: bool) -> int:
    """The ``mode`` of :func:`edge_bags` for a block with or without ResRouting masks and with the "masked" or the
    "full" shortcut."""
    if not resrouting:
        return ONE_BAG
    return MASKED_SHORTCUT if masked_shortcut else FULL_SHORTCUT


@_jit
def skipping_layout(
    sources, weights, keep, is_input, share, ens, trained_rows
):  # pragma: no cover - compiled
    """The skipping layout's arrays for routes ``sources [E * B, n + 1, C]`` (module indices), their ``weights``
    and ResRouting masks ``keep`` (same shape; ``[0, 0, 0]`` without ResRouting).

    :param is_input: ``[n + 1]`` booleans (the output node's is ``False``).
    :param share: pad a node's member slabs to equal sizes where that adds at most this share of padding rows.
    :param trained_rows: count, per node and member, the reached samples ``b < trained_rows`` (``-1``: none).
    :return: ``(slabs [n + 1, E], complete [n + 1], starts [n + 2], entry_rows, entry_weights, entry_keep,
        grid_of_row, sample_of_row, trained [n + 1, E])``: the rows of every member's slab, whether every sample
        reaches a node, the first row of every node's block, then the per-row arrays of
        :class:`~d2r_sb3.d2r.row_layout.RowLayout`, and the trained counts.
    """
    reached = _reached(sources, is_input)
    slabs, complete, starts, trained = _slabs(reached, ens, share, trained_rows)
    entry_rows, entry_weights, entry_keep, grid_of_row, sample_of_row = _rows(
        sources, weights, keep, reached, ens, starts, slabs
    )
    return slabs, complete, starts, entry_rows, entry_weights, entry_keep, grid_of_row, sample_of_row, trained


# Branch-free where a branch would depend on whether a pair is reached: a coin flip to the branch predictor. Every
# loop goes sample by sample (the routes' own order: each sample's arrays are contiguous) and node by node inside.


@_jit
def _reached(sources, is_input):  # pragma: no cover - compiled
    """``[E * B, n + 1]``: whether each node is reached backward from the output node along the chosen edges.
    Every reader of node ``j`` comes after ``j``, so whether ``j`` is reached is settled when its turn comes."""
    n_samples, nodes, slots = sources.shape
    by_sample = np.zeros((n_samples, nodes), dtype=np.uint8)
    for g in range(n_samples):
        by_sample[g, nodes - 1] = 1
        for node in range(nodes - 1, -1, -1):
            if node == nodes - 1 or not is_input[node]:
                here = by_sample[g, node]
                for c in range(slots):
                    by_sample[g, sources[g, node, c]] |= here
    return by_sample


@_jit
def _slabs(reached, ens, share, trained_rows):  # pragma: no cover - compiled
    """``(slabs [n + 1, E], complete [n + 1], starts [n + 2], trained [n + 1, E])`` of a layout (see
    :func:`skipping_layout`)."""
    n_samples, nodes = reached.shape
    batch = n_samples // ens
    counts = np.zeros((ens, nodes), dtype=np.int64)
    trained = np.zeros((nodes, ens), dtype=np.int64)
    trained_samples = min(batch, max(trained_rows, 0))
    for e in range(ens):
        for b in range(batch):
            for node in range(nodes):
                counts[e, node] += reached[e * batch + b, node]
            if b + 1 == trained_samples:
                trained[:, e] = counts[e]
    slabs = np.empty((nodes, ens), dtype=np.int64)
    complete = np.empty(nodes, dtype=np.bool_)
    starts = np.zeros(nodes + 1, dtype=np.int64)
    for node in range(nodes):
        largest, smallest, total = counts[:, node].max(), counts[:, node].min(), counts[:, node].sum()
        complete[node] = smallest == batch
        padded = ens * largest - total <= share * ens * largest
        for e in range(ens):
            slabs[node, e] = largest if padded else counts[e, node]
        starts[node + 1] = starts[node] + slabs[node].sum()
    return slabs, complete, starts, trained


@_jit
def _rows(sources, weights, keep, reached, ens, starts, slabs):  # pragma: no cover - compiled
    """``(entry_rows, entry_weights, entry_keep, grid_of_row, sample_of_row)`` of a layout (see
    :func:`skipping_layout`).

    A sample's row in a node's block comes after the rows of its member's reached samples before it (an unreached
    sample has the row before the next reached one's: never read). Going sample by sample, ``at[node]`` is the
    current sample's row in every node; its sources are earlier nodes, whose rows for it are known by then. An
    unreached pair writes its values to a spare last row, dropped at the end. Padding rows: one past the grid,
    sample 0, source row 0, weight 0, not kept.
    """
    n_samples, nodes, slots = sources.shape
    batch = n_samples // ens
    n_rows = starts[nodes]
    has_keep = keep.shape[0] > 0
    grid_of_row = np.full(n_rows + 1, n_samples * nodes, dtype=np.int64)
    sample_of_row = np.zeros(n_rows + 1, dtype=np.int64)
    entry_rows = np.zeros((n_rows + 1, slots), dtype=np.int64)
    entry_weights = np.zeros((n_rows + 1, slots), dtype=weights.dtype)
    entry_keep = np.zeros((n_rows + 1 if has_keep else 0, slots), dtype=np.bool_)
    slab_start = starts[:nodes].copy()  # every node's slab of the current member
    for e in range(ens):
        at = slab_start - 1
        slab_start += slabs[:, e]
        for b in range(batch):
            g = e * batch + b
            for node in range(nodes):
                here = reached[g, node]
                at[node] += here
                target = at[node] if here else n_rows
                grid_of_row[target], sample_of_row[target] = g * nodes + node, g
                for c in range(slots):
                    entry_rows[target, c] = at[sources[g, node, c]]
                    entry_weights[target, c] = weights[g, node, c]
                    if has_keep:
                        entry_keep[target, c] = keep[g, node, c]
    return (
        entry_rows[:n_rows],
        entry_weights[:n_rows],
        entry_keep[:n_rows] if has_keep else entry_keep,
        grid_of_row[:n_rows],
        sample_of_row[:n_rows],
    )


@_jit
def edge_bags(
    entry_rows, entry_weights, entry_keep, readers, n_sources, n_rows, mode, grid_of_row
):  # pragma: no cover
    """The edges of the routed rows ``readers`` grouped into bags by source row, for the pulling backward pass.

    Each edge ``(reader row r, slot c)`` goes from row ``entry_rows[r, c]`` to ``r`` with weight
    ``entry_weights[r, c]``; a source row's edges keep their reader order inside its bag (deterministic sums).

    :param entry_keep: the ResRouting masks ``[rows, C]`` (not read with ``ONE_BAG``).
    :param n_rows: rows of the gradient table's first half (its second half, ``gS``, starts there).
    :param mode: ``ONE_BAG``: one bag per source row (no ResRouting); ``FULL_SHORTCUT``: two bags, ``F`` then
        ``T``, where ``F`` reads the reader's row if kept, else its ``gS`` row; ``MASKED_SHORTCUT``: two bags, ``F``
        with weight 0 where not kept. ``T`` reads the reader's row with the edge's weight.
    :param grid_of_row: each row's position in the routing weights' grid (:class:`~.row_layout.RowLayout`).
    :return: ``(rows, weights, bag_starts [n_sources, bags per row], grid_slots)``: each entry's table row and
        weight, the first entry of every bag, and for the entries of a row's last bag (which reads the reader's
        row) the edge's position ``grid_of_row[r] * C + c`` in the flat grid of routing weights (-1 elsewhere).
    """
    slots = entry_rows.shape[1]
    pairs = 1 if mode == ONE_BAG else 2
    counts = np.zeros(n_sources, dtype=np.int64)
    for r in readers:
        for c in range(slots):
            counts[entry_rows[r, c]] += 1
    bag_starts = np.empty((n_sources, pairs), dtype=np.int64)
    at = np.empty(n_sources, dtype=np.int64)
    first = 0
    for s in range(n_sources):
        at[s] = pairs * first  # the next free entry of the row's (first) bag
        for half in range(pairs):
            bag_starts[s, half] = pairs * first + half * counts[s]
        first += counts[s]
    rows = np.empty(pairs * first, dtype=np.int64)
    weights = np.empty(pairs * first, dtype=entry_weights.dtype)
    grid_slots = np.full(pairs * first, -1, dtype=np.int64)
    for r in readers:
        for c in range(slots):
            s = entry_rows[r, c]
            p = entry_weights[r, c]
            k = at[s]
            at[s] = k + 1
            if mode == ONE_BAG:
                rows[k], weights[k], grid_slots[k] = r, p, grid_of_row[r] * slots + c
                continue
            kept = entry_keep[r, c]
            if mode == FULL_SHORTCUT:
                rows[k], weights[k] = (r if kept else r + n_rows), p
            else:
                rows[k], weights[k] = r, (p if kept else 0)
            t = k + counts[s]
            rows[t], weights[t], grid_slots[t] = r, p, grid_of_row[r] * slots + c
    return rows, weights, bag_starts, grid_slots


def top_routes(
    logits, scores, given, first, count, module_of, position_of, threshold, slots, with_keep, threads=1
):
    """TopK route choice from flat gate logits: the chosen sources of every node, their logits' positions and
    their ResRouting masks (what the padded-logits versions in :mod:`.routing` compute, in one pass), the
    chunks of samples split among ``threads`` threads.

    :param logits: ``[E, B, L]`` flat gate logits; node ``i``'s candidates are the run ``first[i]`` to
        ``first[i] + count[i] - 1``, in module order (``module_of`` gives each position's module).
    :param scores: ``[E, B, L]``, what the top ``slots`` are taken of (SampleK's perturbed logits); ``[0, 0, 0]``:
        the logits.
    :param given: ``[E or 1, B, n + 1, slots]`` sources to use instead of choosing (stored routes);
        ``[0, 0, 0, 0]``: choose.
    :param position_of: ``[n + 1, n]`` flat position of edge (node, module), ``-1`` off the candidates.
    :param threshold: ``[n + 1]`` ResRouting thresholds: a source is kept when its softmax share over all the
        node's candidates exceeds its node's (computed in float64; an input node's share is ``1 / n``, the
        softmax of its all-zero padded row).
    :return: ``(sources, positions, keep)``, each ``[E, B, n + 1, slots]``: module indices (0 in unused slots),
        the flat position of each source's logit (0 where it is not a candidate), and the masks (``[0, 0, 0, 0]``
        without ``with_keep``). Ties go to the lower module index and a NaN beats any number, as with
        ``torch.max``.
    """
    ens, batch, _ = logits.shape
    nodes = position_of.shape[0]
    out_sources = np.empty((ens, batch, nodes, slots), dtype=np.int64)
    positions = np.empty((ens, batch, nodes, slots), dtype=np.int64)
    out_keep = np.empty((ens if with_keep else 0, batch, nodes, slots), dtype=np.bool_)
    tables = (first, count, module_of, position_of, threshold)
    outs = (out_sources, positions, out_keep)
    jobs = ens * -(-batch // _CHUNK)
    if threads > 1:
        _routes_in_parts(threads, jobs, logits, scores, given, tables, with_keep, outs)
    else:
        _route_chunks(logits, scores, given, tables, with_keep, outs, 0, jobs)
    return outs


# Samples per chunk of the route choice: every loop runs over a chunk's samples, contiguous (float64,
# sample-minor), and vectorises; a chunk's logits stay in cache from node to node.
_CHUNK = 256


@_jit(parallel=True)
def _routes_in_parts(threads, jobs, logits, scores, given, tables, with_keep, outs):  # pragma: no cover
    for part in numba.prange(threads):
        lo, hi = _part(part, threads, jobs), _part(part + 1, threads, jobs)
        _route_chunks(logits, scores, given, tables, with_keep, outs, lo, hi)


@_jit
def _route_chunks(logits, scores, given, tables, with_keep, outs, first_job, end_job):  # pragma: no cover
    """:func:`top_routes` for the chunks ``first_job ... end_job - 1`` (member-major: job ``j`` is chunk
    ``j % chunks`` of member ``j // chunks``)."""
    first, count, module_of, position_of, threshold = tables
    out_sources, positions, out_keep = outs
    batch = logits.shape[1]
    nodes, n = position_of.shape
    slots = out_sources.shape[3]
    chunks = -(-batch // _CHUNK)
    for job in range(first_job, end_job):
        e, start = job // chunks, (job % chunks) * _CHUNK
        size = min(_CHUNK, batch - start)
        z = _sample_minor(logits, e, start, size)
        score = _sample_minor(scores, e, start, size) if scores.shape[0] > 0 else z
        sources = np.zeros((nodes, slots, size), dtype=np.int64)
        keep = np.zeros((nodes, slots, size), dtype=np.bool_)
        for node in range(nodes):
            lo, c = first[node], count[node]
            if given.shape[0] > 0:
                _given_sources(given, e, start, node, sources[node])
            elif c > 0 and slots <= 2:
                _top_two(score, module_of, lo, c, slots, sources[node])
            elif c > 0:
                _top_many(score, module_of, lo, c, min(c, slots), sources[node])
            if with_keep and c == 0:  # input node: the softmax of its all-zero padded row
                keep[node] = 1.0 / n > threshold[node]
            elif with_keep:
                _keep(z, lo, c, position_of[node], sources[node], threshold[node], keep[node])
        _write_chunk(sources, keep, position_of, e, start, out_sources, positions, out_keep)


@_jit
def _sample_minor(x, e, start, size):  # pragma: no cover - compiled
    """Samples ``start ... start + size - 1`` of member ``e`` of ``x [E, B, L]`` as float64 ``[L, size]``."""
    out = np.empty((x.shape[2], size), dtype=np.float64)
    for at in range(
        x.shape[2]
    ):  # (written in order; the strided reads stay in cache from one column to the next)
        for r in range(size):
            out[at, r] = x[e, start + r, at]
    return out


@_jit
def _write_chunk(sources, keep, position_of, e, start, out_sources, positions, out_keep):  # pragma: no cover
    """A chunk's node-major ``sources`` and ``keep`` ``[n + 1, slots, size]`` into the sample-major outputs of
    :func:`top_routes` (``out_keep``: not written when it has no rows), with each source's logit position."""
    nodes, slots, size = sources.shape
    for r in range(size):
        for node in range(nodes):
            for s in range(slots):
                src = sources[node, s, r]
                out_sources[e, start + r, node, s] = src
                positions[e, start + r, node, s] = max(position_of[node, src], 0)
                if out_keep.shape[0] > 0:
                    out_keep[e, start + r, node, s] = keep[node, s, r]


@_jit
def _given_sources(given, e, start, node, out):  # pragma: no cover - compiled
    """``out [slots, size]``: node ``node``'s given sources of samples ``start ...`` of member ``e`` (``given [E or
    1, B, n + 1, slots]``)."""
    member = e if given.shape[0] > 1 else 0
    for s in range(out.shape[0]):
        for r in range(out.shape[1]):
            out[s, r] = given[member, start + r, node, s]


@_jit
def _top_two(score, module_of, lo, c, slots, out):  # pragma: no cover - compiled
    """The modules of the best (``out[0]``) and, with two slots and candidates, second-best (``out[1]``) score
    of the candidates ``lo ... lo + c - 1`` for every sample (``score [L, rows]``); branch-free so it
    vectorises. A candidate displaces a held one when it is strictly greater (ties: the earlier module stays
    ahead), or a NaN where a number is held, or when the slot is still empty."""
    rows = score.shape[1]
    best = np.full(rows, -np.inf)
    second = np.full(rows, -np.inf)
    best_module = np.full(rows, -1, dtype=np.int64)
    second_module = np.full(rows, -1, dtype=np.int64)
    for at in range(lo, lo + c):
        module = module_of[at]
        for r in range(rows):
            v = score[at, r]
            nan = np.isnan(v)
            over_best = (v > best[r]) | (best_module[r] < 0) | (nan & ~np.isnan(best[r]))
            over_second = (v > second[r]) | (second_module[r] < 0) | (nan & ~np.isnan(second[r]))
            new_second = best[r] if over_best else (v if over_second else second[r])
            new_second_module = best_module[r] if over_best else (module if over_second else second_module[r])
            best[r] = v if over_best else best[r]
            best_module[r] = module if over_best else best_module[r]
            second[r] = new_second
            second_module[r] = new_second_module
    out[0] = best_module
    if slots == 2 and c > 1:
        out[1] = second_module


@_jit
def _top_many(score, module_of, lo, c, used, out):  # pragma: no cover - compiled
    """:func:`_top_two` for ``used`` slots (any number): each candidate is inserted into the sorted list."""
    rows = score.shape[1]
    value = np.empty(used, dtype=np.float64)
    held = np.empty(used, dtype=np.int64)
    for r in range(rows):
        held[:] = -1
        for at in range(lo, lo + c):
            v, module = score[at, r], module_of[at]
            for s in range(used):
                here, mine = value[s], held[s]
                if mine < 0 or v > here or (np.isnan(v) and not np.isnan(here)):
                    value[s], held[s] = v, module
                    v, module = here, mine
                    if mine < 0:
                        break
        out[:used, r] = held


@_jit(fastmath={"contract"})
def _keep(z, lo, c, position_of, sources, threshold, out):  # pragma: no cover - compiled
    """ResRouting masks of one node: ``out[s, r]`` whether source ``sources[s, r]``'s softmax share over the
    candidates ``lo ... lo + c - 1`` (logits ``z [L, rows]``) exceeds ``threshold``."""
    rows = z.shape[1]
    top = z[lo].copy()
    for at in range(lo + 1, lo + c):
        for r in range(rows):
            v = z[at, r]
            top[r] = v if v > top[r] else top[r]
    total = np.zeros(rows)
    for at in range(lo, lo + c):
        for r in range(rows):
            total[r] += _exp_nonpositive(z[at, r] - top[r])
    for s in range(sources.shape[0]):
        for r in range(rows):
            at = position_of[sources[s, r]]
            share = _exp_nonpositive(z[max(at, 0), r] - top[r])  # (times total: no division)
            out[s, r] = (at >= 0) & (share > threshold * total[r])


@_jit(fastmath={"contract"})
def _exp_nonpositive(x):  # pragma: no cover - compiled
    """``exp(x)`` for ``x <= 0`` to about 1e-13 relative error, as ``exp(x / 64) ** 64`` with a degree-14 Taylor
    polynomial (Estrin's scheme), branch-free so that loops of it vectorise (numba's ``np.exp`` is a call per
    value). Below -40 it returns ``exp(-40)``: next to the largest logit's term 1 such terms vanish in float64."""
    y = max(x, -40.0) * 0.015625
    y2 = y * y
    y4 = y2 * y2
    low = (1.0 + y + y2 * (1 / 2 + y * (1 / 6))) + y4 * (
        1 / 24 + y * (1 / 120) + y2 * (1 / 720 + y * (1 / 5040))
    )
    high = (1 / 40320 + y * (1 / 362880) + y2 * (1 / 3628800 + y * (1 / 39916800))) + y4 * (
        1 / 479001600 + y * (1 / 6227020800) + y2 * (1 / 87178291200)
    )
    p = low + y4 * y4 * high
    for _ in range(6):
        p = p * p
    return p


def chosen_softmax(logits, positions, used, threads=1):
    """MaskSoftmax's weights: per node, the softmax of the chosen sources' logits (computed in float64), the
    samples split among ``threads`` threads.

    :param logits: ``[E, B, L]`` flat gate logits.
    :param positions: ``[E, B, n + 1, slots]`` flat positions of the chosen logits (:func:`top_routes`).
    :param used: ``[n + 1]`` slots used per node (the first ones); the others get weight 0.
    :return: ``[E, B, n + 1, slots]`` weights in the logits' dtype.
    """
    weights = np.zeros(positions.shape, dtype=logits.dtype)
    rows = positions.shape[0] * positions.shape[1]
    if threads > 1:
        _softmax_in_parts(threads, logits, positions, used, weights)
    else:
        _softmax_rows(logits, positions, used, weights, 0, rows)
    return weights


def chosen_softmax_backward(grad, weights, positions, used, n_logits, threads=1):
    """The gradient of :func:`chosen_softmax` on the logits, ``[E, B, L]``: ``w_s (g_s - sum_t w_t g_t)`` at each
    chosen position (``grad`` and ``weights`` ``[E, B, n + 1, slots]``), 0 elsewhere; the samples split among
    ``threads`` threads."""
    out = np.zeros((positions.shape[0], positions.shape[1], n_logits), dtype=grad.dtype)
    rows = positions.shape[0] * positions.shape[1]
    if threads > 1:
        _softmax_grad_in_parts(threads, grad, weights, positions, used, out)
    else:
        _softmax_grad_rows(grad, weights, positions, used, out, 0, rows)
    return out


@_jit(parallel=True)
def _softmax_in_parts(threads, logits, positions, used, weights):  # pragma: no cover - compiled
    n = positions.shape[0] * positions.shape[1]
    for part in numba.prange(threads):
        _softmax_rows(logits, positions, used, weights, _part(part, threads, n), _part(part + 1, threads, n))


@_jit
def _softmax_rows(logits, positions, used, weights, first, end):  # pragma: no cover - compiled
    """:func:`chosen_softmax` for the samples ``first ... end - 1`` of ``[E * B]`` (member-major)."""
    batch, nodes, slots = positions.shape[1], positions.shape[2], positions.shape[3]
    shifted = np.empty(slots, dtype=np.float64)
    for at in range(first, end):
        e, b = at // batch, at % batch
        for node in range(nodes):
            k = used[node]
            if k == 0:
                continue
            if k == 2:  # (one exp instead of two: the softmax of two is a sigmoid of their difference)
                diff = (
                    np.float64(logits[e, b, positions[e, b, node, 1]])
                    - logits[e, b, positions[e, b, node, 0]]
                )
                t = np.exp(-abs(diff))
                high, low = 1.0 / (1.0 + t), t / (1.0 + t)
                weights[e, b, node, 0] = low if diff > 0 else high
                weights[e, b, node, 1] = high if diff > 0 else low
                continue
            top = -np.inf
            for s in range(k):
                shifted[s] = logits[e, b, positions[e, b, node, s]]
                top = max(top, shifted[s])
            total = 0.0
            for s in range(k):
                shifted[s] = np.exp(shifted[s] - top)
                total += shifted[s]
            for s in range(k):
                weights[e, b, node, s] = shifted[s] / total


@_jit(parallel=True)
def _softmax_grad_in_parts(threads, grad, weights, positions, used, out):  # pragma: no cover - compiled
    n = positions.shape[0] * positions.shape[1]
    for part in numba.prange(threads):
        lo, hi = _part(part, threads, n), _part(part + 1, threads, n)
        _softmax_grad_rows(grad, weights, positions, used, out, lo, hi)


@_jit
def _softmax_grad_rows(grad, weights, positions, used, out, first, end):  # pragma: no cover - compiled
    """:func:`chosen_softmax_backward` for the samples ``first ... end - 1`` of ``[E * B]`` (member-major)."""
    batch, nodes = positions.shape[1], positions.shape[2]
    for at in range(first, end):
        e, b = at // batch, at % batch
        for node in range(nodes):
            k = used[node]
            mean = 0.0
            for s in range(k):
                mean += np.float64(weights[e, b, node, s]) * grad[e, b, node, s]
            for s in range(k):
                w = np.float64(weights[e, b, node, s])
                out[e, b, positions[e, b, node, s]] += w * (grad[e, b, node, s] - mean)


@_jit
def pull_through_relu(
    table, rows, offsets, weights, hidden, grad_pre, total, also, outputs, grid_slots, grid, threads=None
):  # pragma: no cover - compiled
    """A module's pulled gradients and its relu backward in one pass (see
    :class:`~d2r_sb3.d2r.block_edges.PullGraph`), its rows split among ``threads`` threads (:func:`loop_threads`);
    with a ``grid``, also the routing weights' gradient of every edge that leaves the module.

    Row ``g`` of the module has ``bags = len(offsets) // len(hidden)`` bags of table rows (``rows[k]`` weighted
    by ``weights[k]``, bag ``j`` from ``offsets[j]`` to the next bag's start): the first sums to ``gF_g``, the
    second (with ResRouting) to ``gT_g``. Writes ``grad_pre[g] = gF_g`` where ``hidden[g] > 0``, else 0, and
    ``total[g] = gT_g`` (``gF_g`` with one bag), also to ``also[g]`` unless ``also`` has no rows. With ``total``
    of no rows (an input module, which has no shortcut), ``gT`` is not written.

    The last bag of row ``g`` reads, for every edge from ``g`` to a reader row, that reader's gradient ``A``; the
    routing weight's gradient of the edge is ``<o_g, A>`` (``o = outputs[g]``, the module's output). Unless
    ``grid`` (flat, float) has no entries, each is written to ``grid[grid_slots[k]]``, taken while the rows are
    loaded for the bag.
    """
    if threads is None or threads == 1:  # (None: one thread, see host_loops.serial_as_none)
        _pull_rows(
            table,
            rows,
            offsets,
            weights,
            hidden,
            grad_pre,
            total,
            also,
            outputs,
            grid_slots,
            grid,
            0,
            len(hidden),
        )
    else:
        _pull_in_parts(
            threads, table, rows, offsets, weights, hidden, grad_pre, total, also, outputs, grid_slots, grid
        )


@_jit(parallel=True)
def _pull_in_parts(
    threads, table, rows, offsets, weights, hidden, grad_pre, total, also, outputs, grid_slots, grid
):  # pragma: no cover
    n = hidden.shape[0]
    for part in numba.prange(threads):
        lo, hi = _part(part, threads, n), _part(part + 1, threads, n)
        _pull_rows(
            table, rows, offsets, weights, hidden, grad_pre, total, also, outputs, grid_slots, grid, lo, hi
        )


@_jit(fastmath={"contract"})
def _pull_rows(
    table, rows, offsets, weights, hidden, grad_pre, total, also, outputs, grid_slots, grid, first, end
):  # pragma: no cover
    """:func:`pull_through_relu` for the module's rows ``first ... end - 1`` (every write an explicit loop over
    one row of one array: 10 % faster than slice assignments here)."""
    n, dim = hidden.shape
    bags = offsets.shape[0] // n
    acc = np.empty(dim, dtype=table.dtype)
    has_total, has_also, dots = total.shape[0] > 0, also.shape[0] > 0, grid.shape[0] > 0
    last = bags - 1 if has_total or dots else 0  # (the last bag is needed for gT or for the dots)
    for g in range(first, end):
        for half in range(last + 1):
            bag = g * bags + half
            hi = offsets[bag + 1] if bag + 1 < offsets.shape[0] else rows.shape[0]
            for d in range(dim):
                acc[d] = 0
            for k in range(offsets[bag], hi):
                w, src = weights[k], table[rows[k]]
                for d in range(dim):
                    acc[d] += w * src[d]
                if dots and half == bags - 1:
                    grid[grid_slots[k]] = _dot(outputs[g], src)
            if half == 0:
                out, mask = grad_pre[g], hidden[g]
                for d in range(dim):
                    out[d] = acc[d] if mask[d] > 0 else 0
            if half == bags - 1 and has_total:
                _copy_row(total[g], acc)
                if has_also:
                    _copy_row(also[g], acc)


@_jit
def _copy_row(out, values):  # pragma: no cover - compiled
    for d in range(values.shape[0]):
        out[d] = values[d]


@_jit(fastmath={"reassoc", "contract"})
def _dot(a, b):  # pragma: no cover - compiled
    """``<a, b>`` of two rows, the sum reassociated so that it vectorises."""
    total = a[0] * 0
    for d in range(a.shape[0]):
        total += a[d] * b[d]
    return total


@_jit
def weighted_rows(table, rows, weights, out, threads=None):  # pragma: no cover - compiled
    """``out[g] = sum_c weights[g, c] * table[rows[g, c]]`` for every row ``g`` (``rows`` and ``weights``
    ``[R, C]``, ``out [R, D]``), the rows split among ``threads`` threads: the forward pass's mix of each module
    input from its sources. The sums of torch's ``embedding_bag`` with per-sample weights (mode "sum"), in the same
    order (bit for bit in float32; torch's float64 kernel does not fuse the multiply-adds), without its bookkeeping
    outputs: 1.6-2x faster for a routed-block call's bags on one thread. A weight of 0 still multiplies its row (a
    NaN there stays NaN in the sum)."""
    if threads is None:  # (one thread: see host_loops.serial_as_none)
        _weighted_rows(table, rows, weights, out, 0, out.shape[0])
    elif threads > 1 and out.size >= PARALLEL_FROM:
        _weighted_in_parts(threads, table, rows, weights, out)
    else:
        _weighted_rows(table, rows, weights, out, 0, out.shape[0])


@_jit(parallel=True)
def _weighted_in_parts(threads, table, rows, weights, out):  # pragma: no cover - compiled
    n = out.shape[0]
    for part in numba.prange(threads):
        _weighted_rows(table, rows, weights, out, _part(part, threads, n), _part(part + 1, threads, n))


@_jit(fastmath={"contract"})
def _weighted_rows(table, rows, weights, out, first, end):  # pragma: no cover - compiled
    """:func:`weighted_rows` for rows ``first ... end - 1``."""
    slots, dim = rows.shape[1], out.shape[1]
    for g in range(first, end):
        row, w = out[g], weights[g, 0]
        src = table[rows[g, 0]]
        for d in range(dim):
            row[d] = w * src[d]
        for c in range(1, slots):
            w, src = weights[g, c], table[rows[g, c]]
            for d in range(dim):
                row[d] += w * src[d]


def gate_inputs(f_pre, index, weight, bias, threads=1):
    """D2R's two inputs from the state encoding ``f_pre [E, B, D]`` in one pass: the modules' ``relu(f_pre)`` and
    the gate's ``H(task) * f_pre``, with ``H(task) = weight[:, :, task] + bias`` (``weight [E, D, T]``, the task
    encoder's one-hot layer) for the task ``index [B]`` of each sample; the rows split among ``threads``
    threads. The same values as the tensor operations, bit for bit (a NaN stays a NaN through the relu, as with
    ``torch.relu``)."""
    x0, gated = np.empty_like(f_pre), np.empty_like(f_pre)
    tables = _task_tables(weight, bias)
    if threads > 1:
        _gate_in_parts(threads, f_pre, index, tables, x0, gated)
    else:
        _gate_rows(f_pre, index, tables, x0, gated, 0, f_pre.shape[0] * f_pre.shape[1])
    return x0, gated


def gate_inputs_backward(grad_x0, grad_gated, f_pre, index, weight, bias, trained_rows, threads=1):
    """The gradients of :func:`gate_inputs` from those of its outputs: ``(grad_f_pre [E, B, D], grad_weight
    [E, D, T], grad_bias [E, D])``; only the first ``trained_rows`` samples of every member train the weight and
    bias (their sums in float64, per thread, then added in thread order)."""
    grad_f = np.empty_like(f_pre)
    tables = _task_tables(weight, bias)
    ens, batch, dim = f_pre.shape
    sums = np.zeros((max(threads, 1), ens, tables.shape[1], dim))
    if threads > 1:
        _gate_grad_in_parts(threads, grad_x0, grad_gated, f_pre, index, tables, trained_rows, grad_f, sums)
    else:
        _gate_grad_rows(
            grad_x0, grad_gated, f_pre, index, tables, trained_rows, grad_f, sums[0], 0, ens * batch
        )
    grad_weight, grad_bias = _task_gradients(sums, weight)
    return grad_f, grad_weight, grad_bias


@_jit
def _task_tables(weight, bias):  # pragma: no cover - compiled
    """Every member's task encodings ``weight[e, :, t] + bias[e]`` for every task ``t``, as ``[E, T, D]``."""
    ens, dim, tasks = weight.shape
    tables = np.empty((ens, tasks, dim), dtype=weight.dtype)
    for e in range(ens):
        for t in range(tasks):
            for d in range(dim):
                tables[e, t, d] = weight[e, d, t] + bias[e, d]
    return tables


@_jit(parallel=True)
def _gate_in_parts(threads, f_pre, index, tables, x0, gated):  # pragma: no cover - compiled
    n = f_pre.shape[0] * f_pre.shape[1]
    for part in numba.prange(threads):
        _gate_rows(f_pre, index, tables, x0, gated, _part(part, threads, n), _part(part + 1, threads, n))


@_jit
def _gate_rows(f_pre, index, tables, x0, gated, first, end):  # pragma: no cover - compiled
    """:func:`gate_inputs` for the rows ``first ... end - 1`` of ``f_pre`` seen as ``[E * B, D]``."""
    batch, dim = f_pre.shape[1], f_pre.shape[2]
    for at in range(first, end):
        e, b = at // batch, at % batch
        row = tables[e, index[b]]
        for d in range(dim):
            v = f_pre[e, b, d]
            x0[e, b, d] = 0 if v <= 0 else v
            gated[e, b, d] = row[d] * v


@_jit(parallel=True)
def _gate_grad_in_parts(
    threads, grad_x0, grad_gated, f_pre, index, tables, trained_rows, grad_f, sums
):  # pragma: no cover - compiled
    n = f_pre.shape[0] * f_pre.shape[1]
    for part in numba.prange(threads):
        lo, hi = _part(part, threads, n), _part(part + 1, threads, n)
        _gate_grad_rows(grad_x0, grad_gated, f_pre, index, tables, trained_rows, grad_f, sums[part], lo, hi)


@_jit
def _gate_grad_rows(
    grad_x0, grad_gated, f_pre, index, tables, trained_rows, grad_f, sums, first, end
):  # pragma: no cover - compiled
    """:func:`gate_inputs_backward` for the rows ``first ... end - 1`` (of ``[E * B, D]``): ``grad_f`` there, and
    the trained rows' products ``grad_gated * f_pre`` added to ``sums [E, T, D]`` (float64) by member and task."""
    batch, dim = f_pre.shape[1], f_pre.shape[2]
    for at in range(first, end):
        e, b = at // batch, at % batch
        t = index[b]
        row = tables[e, t]
        for d in range(dim):
            v = f_pre[e, b, d]
            grad_f[e, b, d] = (grad_x0[e, b, d] if v > 0 else 0) + grad_gated[e, b, d] * row[d]
        if b < trained_rows:
            for d in range(dim):
                sums[e, t, d] += (
                    grad_gated[e, b, d] * f_pre[e, b, d]
                )  # (a product in float32, summed in float64)


@_jit
def _task_gradients(sums, weight):  # pragma: no cover - compiled
    """The task encoder's ``(grad_weight [E, D, T], grad_bias [E, D])`` in ``weight``'s dtype from the threads'
    float64 ``sums [threads, E, T, D]`` (added in thread order)."""
    parts, ens, tasks, dim = sums.shape
    grad_weight = np.empty((ens, dim, tasks), dtype=weight.dtype)
    grad_bias = np.empty((ens, dim), dtype=weight.dtype)
    for e in range(ens):
        for d in range(dim):
            total = 0.0
            for t in range(tasks):
                value = sums[0, e, t, d]
                for part in range(1, parts):
                    value += sums[part, e, t, d]
                grad_weight[e, d, t] = value
                total += value
            grad_bias[e, d] = total
    return grad_weight, grad_bias
