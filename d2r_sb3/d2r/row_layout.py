"""Which (module, sample) pairs one call of the routed block computes, and where their rows live.

A route reaches only some modules: those the output node reads, the modules those read, and so on back to the
input module (5 to 7 of 16 for a trained MT10 network). A module that a sample's route does not reach cannot change
that sample's output or gradients, so the block can leave it out. With skipping, module ``j`` is computed for the
samples that reach it only; without, for every sample (the dense layout, which needs no host sync: what GPUs want).

Every computed pair is one **row** of a ``[rows, D]`` buffer. Node ``i``'s rows form one block, member by member
(a *slab* of ``m_ei`` rows for ensemble member ``e``), so the product of a member's rows with that member's weights
reads and writes one contiguous slab. The twin critics route independently, so their members reach a node with
different numbers of samples. Where the numbers are close, every slab of the node is padded to the largest (one
batched product over ``[E, m, D]``, the cheapest way to run nearly equal products); where they are far apart (a
greedy route often leaves a module to one critic only), each slab holds exactly its member's samples and the
members' products run one by one. Padding every node computed about a fifth more critic rows than the routes
reach. *Padding rows* read module 0 with weight 0, nothing reads them, and their gradient is 0. The output node
``n`` is reached by every sample and comes last. The dense layout is the special case ``m_ei = B``, where the
row of ``(node i, sample g = e * B + b)`` is ``i * E * B + g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch as th

from d2r_sb3.d2r import compiled

__all__ = ["BlockPlan", "RowLayout", "build_row_layout"]

_PADDED_SHARE = {th.bfloat16: 0.125, th.float16: 0.125}
_PADDED_SHARE_OTHERWISE = 0.02


def padded_share(dtype: th.dtype) -> float:
    """A node's slabs are padded to equal sizes when that adds at most this share of padding rows to the node.

    Measured first with 400-wide products on one core: in float32 one batched product and one product per member
    cost the same when the sizes are within about 2 %, and padding loses beyond (by a third where one member has
    twice the rows of the other); in bfloat16, whose products are cheap next to a call's fixed cost, the batched
    product is 10-20 % faster for nearly equal sizes and still breaks even at about a tenth of padding. D2R's
    module products are 128 wide, where float32 breaks even later (timed on one core: about 20-40 padding rows,
    from slabs of 80 to 600 rows), so 2 % is on the safe side there; a threshold in rows would pad a few more
    nodes, worth an estimated 0.1-0.2 ms per gradient step at batch 320.
    """
    return _PADDED_SHARE.get(dtype, _PADDED_SHARE_OTHERWISE)


@dataclass(frozen=True)
class BlockPlan:
    """Static per-network description: for node ``i < n``, whether it is an input node and its weight slot."""

    is_input: tuple[bool, ...]
    param_index: tuple[int, ...]
    masked_shortcut: bool

    @property
    def routed_nodes(self) -> tuple[int, ...]:
        """Nodes that read other modules: every non-input module, then the output node ``n``."""
        return (*(i for i, inp in enumerate(self.is_input) if not inp), len(self.is_input))


@dataclass
class RowLayout:
    """The rows of one routed-block call (see the module docstring).

    The routes come in the **grid** layout ``[E, B, n + 1, C]``: grid row ``q = g * (n + 1) + i`` holds node
    ``i``'s slots for sample ``g = e * B + b``. Every layout row knows its grid row, so anything given per
    (sample, node) is read with one gather and per-row results go back with one scatter.

    :param ens: ensemble size ``E``; ``batch``: samples per member ``B``.
    :param member_sizes: ``m_ei`` for every node ``0 .. n``: the rows of each member's slab, in member order (all
        equal where the node is padded; ``B`` each for the output node).
    :param complete: for every node, whether every sample reaches it (its rows are the samples in order).
    :param starts: first row of every node's block, and the total number of rows at the end (``n + 2`` ints).
    :param entry_rows: ``[rows, C]`` rows of each row's sources (its bag); zeros on padding rows, any valid row
        on input-node rows (they read ``x0``, not their bag).
    :param entry_weights: ``[rows, C]`` routing weights of those sources (0 on unused slots and padding rows).
    :param entry_keep: ``[rows, C]`` ResRouting masks, or ``None`` without ResRouting.
    :param grid_of_row: ``[rows]`` grid row of every row; ``E * B * (n + 1)`` (one past the grid) on padding rows.
    :param sample_of_row: ``[rows]`` sample ``g`` of every row (0 on padding rows).
    :param dense: every module is computed for every sample (row ``i * E * B + g`` is node ``i``, sample ``g``).
    :param trained_sizes: for every node, the first rows of each member's slab that train the module's weights
        (the rows of samples ``b < trained_rows``, which come first in a slab), or ``None`` when every row does.
    """

    ens: int
    batch: int
    member_sizes: list[list[int]]
    complete: list[bool]
    starts: list[int]
    entry_rows: th.Tensor
    entry_weights: th.Tensor
    entry_keep: th.Tensor | None
    grid_of_row: th.Tensor
    sample_of_row: th.Tensor
    dense: bool
    trained_sizes: list[list[int]] | None = None

    @property
    def n_rows(self) -> int:
        """Rows of every node, the output node included."""
        return self.starts[-1]

    def node_rows(self, node: int) -> slice:
        """The rows of ``node``'s block."""
        return slice(self.starts[node], self.starts[node + 1])

    def trained(self, node: int) -> list[int] | None:
        """The rows of each member's slab of ``node`` that train its weights (:attr:`trained_sizes`); ``None``:
        the whole slabs."""
        return self.trained_sizes[node] if self.trained_sizes is not None else None

    def block_sizes(self) -> list[int]:
        """Rows of every node's block (all members), ``n + 1`` ints."""
        return [hi - lo for lo, hi in zip(self.starts[:-1], self.starts[1:], strict=True)]


def build_row_layout(
    sources: th.Tensor,
    weights: th.Tensor,
    keep: th.Tensor | None,
    is_input: tuple[bool, ...],
    skip: bool,
    compute_dtype: th.dtype = th.float32,
    trained_rows: int | None = None,
) -> RowLayout:
    """The rows of a call with these routes.

    :param sources: ``[E, B, n + 1, C]`` module indices of the chosen sources (unused slots: module 0).
    :param weights: ``[E, B, n + 1, C]`` their routing weights (read as plain values: no autograd here).
    :param keep: ``[E, B, n + 1, C]`` ResRouting masks, or ``None``.
    :param is_input: for every module, whether it reads the state encoding instead of other modules.
    :param skip: compute each module only for the samples that reach it (else: the dense layout).
    :param compute_dtype: the dtype of the module products (it decides which nodes are padded,
        :func:`padded_share`).
    :param trained_rows: only samples ``b < trained_rows`` of every member train the modules' weights (see
        :attr:`RowLayout.trained_sizes`); ``None``: all of them.
    """
    ens, batch, nodes, slots = sources.shape
    grid_size = ens * batch * nodes
    if skip:
        return _skipping_layout(sources, weights, keep, is_input, padded_share(compute_dtype), trained_rows)
    member_sizes, complete = [[batch] * ens for _ in range(nodes)], [True] * nodes
    starts = [ens * batch * node for node in range(nodes + 1)]
    # Node-major: row r is (node r // EB, sample r % EB); grid row q = g * (n + 1) + i.
    row = th.arange(grid_size, device=sources.device)
    grid_of_row = row % (ens * batch) * nodes + row // (ens * batch)
    sample = th.arange(ens * batch, device=sources.device).view(ens * batch, 1, 1)
    source_rows = sources.reshape(ens * batch, nodes, slots) * (ens * batch) + sample

    def per_row(values: th.Tensor) -> th.Tensor:
        """Grid values ``[E, B, n + 1, C]`` -> ``[rows, C]``."""
        return values.reshape(grid_size, slots).index_select(0, grid_of_row)

    return RowLayout(
        ens,
        batch,
        member_sizes,
        complete,
        starts,
        per_row(source_rows),
        per_row(weights.detach()),
        per_row(keep) if keep is not None else None,
        grid_of_row,
        grid_of_row // nodes % (ens * batch),
        dense=True,
        trained_sizes=None if trained_rows is None else [[trained_rows] * ens for _ in range(nodes)],
    )


# Dtypes the compiled loops lack (numpy lacks bfloat16; numba, float16), and the integers of their width.
_BITS_AS = {th.bfloat16: th.int16, th.float16: th.int16}


def host_array(values: th.Tensor) -> np.ndarray:
    """``values`` as a numpy array on the host, sharing memory on a CPU; dtypes numpy lacks (bfloat16) come as
    integers of the same width, whose bits the array moves unchanged (index and select only, no arithmetic)."""
    values = values.detach().cpu()
    if values.dtype in _BITS_AS:
        values = values.view(_BITS_AS[values.dtype])
    return values.numpy()


def from_host(array: np.ndarray, like: th.Tensor) -> th.Tensor:
    """The tensor of a :func:`host_array` result (or of a selection from one), in ``like``'s dtype and device."""
    tensor = th.from_numpy(array)
    if like.dtype in _BITS_AS:
        tensor = tensor.view(like.dtype)
    return tensor.to(like.device)


def _skipping_layout(
    sources: th.Tensor,
    weights: th.Tensor,
    keep: th.Tensor | None,
    is_input: tuple[bool, ...],
    share: float,
    trained_rows: int | None,
) -> RowLayout:
    """The skipping layout. The sizes of the blocks are needed on the host anyway, so the whole index bookkeeping
    runs there, in one compiled pass (:func:`~d2r_sb3.d2r.compiled.skipping_layout`): the rows, and every per-row
    gather of the routes, weights and masks."""
    ens, batch, nodes, slots = sources.shape
    grid = (ens * batch, nodes, slots)
    slabs, complete, starts, entry_rows, entry_weights, entry_keep, grid_of_row, sample_of_row, trained = (
        compiled.skipping_layout(
            host_array(sources).reshape(grid),
            host_array(weights).reshape(grid),
            host_array(keep).reshape(grid) if keep is not None else np.zeros((0, 0, 0), dtype=np.bool_),
            np.array([*is_input, False]),
            share,
            ens,
            -1 if trained_rows is None else trained_rows,
        )
    )
    return RowLayout(
        ens,
        batch,
        slabs.tolist(),
        complete.tolist(),
        starts.tolist(),
        from_host(entry_rows, sources),
        from_host(entry_weights, weights),
        from_host(entry_keep, keep) if keep is not None else None,
        from_host(grid_of_row, sources),
        from_host(sample_of_row, sources),
        dense=False,
        trained_sizes=None if trained_rows is None else trained.tolist(),
    )
