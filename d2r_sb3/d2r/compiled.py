"""The routed block's host-side bookkeeping as compiled loops (numba): the row layout of a call and the edge lists
of its pulling backward pass.

On a CPU, every call of the routed block first decides on the host which (module, sample) pairs it computes and
where their rows live (:mod:`.row_layout`), and every backward pass groups the routing edges by source row
(:class:`~d2r_sb3.d2r.routed_block._PullGraph`). Both are index work on tens of thousands of (sample, node, slot)
entries. As numpy array operations it took two to three dozen passes over memory and as many calls a routed-block
call, about 5 % of a gradient step at batch 320 and 8 % at batch 1280 on two threads (where it runs on one
thread while the other waits); as loops it is one or two passes.

The functions compile on first use for the dtypes they get (a few seconds in all) and are cached on disk (numba's
``cache=True``: in ``__pycache__`` next to this file, under ``NUMBA_CACHE_DIR`` or in the user's cache folder), so
a later process loads them in milliseconds. They release the GIL and give exactly the arrays of the array versions
they replaced (the tests keep those as their reference). Float weights are only moved, never computed with: 16-bit
floats come as their bits (``int16``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numba
import numpy as np

__all__ = ["bag_mode", "edge_bags", "skipping_layout"]


def _jit(function: Callable) -> Callable:
    """``function`` compiled on first use, cached on disk where numba finds a writable place (the package's
    ``__pycache__``, ``NUMBA_CACHE_DIR`` or the user's cache folder); where it finds none (a read-only install and
    no writable home), compiled anew in every process, with a warning, instead of failing the import."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator available"
        warnings.warn(
            f"d2r_sb3 compiles {function.__name__} in every process: numba cannot cache it ({error}). "
            "Set NUMBA_CACHE_DIR to a writable folder to keep the compiled code between processes.",
            RuntimeWarning,
            stacklevel=2,
        )
        return numba.njit(nogil=True)(function)


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


# Branch-free where a branch would depend on whether a pair is reached: a coin flip to the branch predictor.


@_jit
def _reached(sources, is_input):  # pragma: no cover - compiled
    """``[n + 1, E * B]``: whether each node is reached backward from the output node along the chosen edges.
    Every reader of node ``j`` comes after ``j``, so whether ``j`` is reached is settled when its turn comes."""
    n_samples, nodes, slots = sources.shape
    by_sample = np.zeros((n_samples, nodes), dtype=np.uint8)  # (sample-major, as the routes)
    for g in range(n_samples):
        by_sample[g, nodes - 1] = 1
        for node in range(nodes - 1, -1, -1):
            if node == nodes - 1 or not is_input[node]:
                here = by_sample[g, node]
                for c in range(slots):
                    by_sample[g, sources[g, node, c]] |= here
    return by_sample.T.copy()  # node-major from here on: the samples of a node are contiguous


@_jit
def _slabs(reached, ens, share, trained_rows):  # pragma: no cover - compiled
    """``(slabs [n + 1, E], complete [n + 1], starts [n + 2], trained [n + 1, E])`` of a layout (see
    :func:`skipping_layout`)."""
    nodes, n_samples = reached.shape
    batch = n_samples // ens
    counts = np.zeros((nodes, ens), dtype=np.int64)
    trained = np.zeros((nodes, ens), dtype=np.int64)
    for node in range(nodes):
        for e in range(ens):
            for b in range(batch):
                counts[node, e] += reached[node, e * batch + b]
            for b in range(min(batch, max(trained_rows, 0))):
                trained[node, e] += reached[node, e * batch + b]
    slabs = np.empty((nodes, ens), dtype=np.int64)
    complete = np.empty(nodes, dtype=np.bool_)
    starts = np.zeros(nodes + 1, dtype=np.int64)
    for node in range(nodes):
        largest, smallest, total = counts[node].max(), counts[node].min(), counts[node].sum()
        complete[node] = smallest == batch
        padded = ens * largest - total <= share * ens * largest
        for e in range(ens):
            slabs[node, e] = largest if padded else counts[node, e]
        starts[node + 1] = starts[node] + slabs[node].sum()
    return slabs, complete, starts, trained


@_jit
def _rows(sources, weights, keep, reached, ens, starts, slabs):  # pragma: no cover - compiled
    """``(entry_rows, entry_weights, entry_keep, grid_of_row, sample_of_row)`` of a layout (see
    :func:`skipping_layout`).

    Node by node: a sample's row comes after its member's reached samples before it (an unreached sample gets the
    row before the next reached one's: never read). A row's sources are earlier nodes, whose rows are known by
    then. An unreached pair writes its values to a spare last row, dropped at the end. Padding rows: one past the
    grid, sample 0, source row 0, weight 0, not kept.
    """
    n_samples, nodes, slots = sources.shape
    batch = n_samples // ens
    n_rows = starts[nodes]
    has_keep = keep.shape[0] > 0
    row_of = np.empty((nodes, n_samples), dtype=np.int64)
    grid_of_row = np.full(n_rows + 1, n_samples * nodes, dtype=np.int64)
    sample_of_row = np.zeros(n_rows + 1, dtype=np.int64)
    entry_rows = np.zeros((n_rows + 1, slots), dtype=np.int64)
    entry_weights = np.zeros((n_rows + 1, slots), dtype=weights.dtype)
    entry_keep = np.zeros((n_rows + 1 if has_keep else 0, slots), dtype=np.bool_)
    for node in range(nodes):
        row = starts[node]
        for e in range(ens):
            at = row - 1
            for b in range(batch):
                g = e * batch + b
                here = reached[node, g]
                at += here
                row_of[node, g] = at
                target = at if here else n_rows
                grid_of_row[target], sample_of_row[target] = g * nodes + node, g
                for c in range(slots):
                    entry_rows[target, c] = row_of[sources[g, node, c], g]
                    entry_weights[target, c] = weights[g, node, c]
                    if has_keep:
                        entry_keep[target, c] = keep[g, node, c]
            row += slabs[node, e]
    return (
        entry_rows[:n_rows],
        entry_weights[:n_rows],
        entry_keep[:n_rows] if has_keep else entry_keep,
        grid_of_row[:n_rows],
        sample_of_row[:n_rows],
    )


@_jit
def edge_bags(entry_rows, entry_weights, entry_keep, readers, n_sources, n_rows, mode):  # pragma: no cover
    """The edges of the routed rows ``readers`` grouped into bags by source row, for the pulling backward pass.

    Each edge ``(reader row r, slot c)`` goes from row ``entry_rows[r, c]`` to ``r`` with weight
    ``entry_weights[r, c]``; a source row's edges keep their reader order inside its bag (deterministic sums).

    :param entry_keep: the ResRouting masks ``[rows, C]`` (not read with ``ONE_BAG``).
    :param n_rows: rows of the gradient table's first half (its second half, ``gS``, starts there).
    :param mode: ``ONE_BAG``: one bag per source row (no ResRouting); ``FULL_SHORTCUT``: two bags, ``F`` then
        ``T``, where ``F`` reads the reader's row if kept, else its ``gS`` row; ``MASKED_SHORTCUT``: two bags, ``F``
        with weight 0 where not kept. ``T`` reads the reader's row with the edge's weight.
    :return: ``(rows, weights, bag_starts [n_sources, bags per row])``: each entry's table row and weight, and the
        first entry of every bag.
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
    for r in readers:
        for c in range(slots):
            s = entry_rows[r, c]
            p = entry_weights[r, c]
            k = at[s]
            at[s] = k + 1
            if mode == ONE_BAG:
                rows[k], weights[k] = r, p
                continue
            kept = entry_keep[r, c]
            if mode == FULL_SHORTCUT:
                rows[k], weights[k] = (r if kept else r + n_rows), p
            else:
                rows[k], weights[k] = r, (p if kept else 0)
            rows[k + counts[s]], weights[k + counts[s]] = r, p
    return rows, weights, bag_starts
