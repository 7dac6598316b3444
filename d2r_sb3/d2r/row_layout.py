"""Which (module, sample) pairs one call of the routed block computes, and where their rows live.

A route reaches only some modules: those the output node reads, the modules those read, and so on back to the
input module (5 to 7 of 16 for a trained MT10 network). A module that a sample's route does not reach cannot change
that sample's output or gradients, so the block can leave it out. With skipping, module ``j`` is computed for the
samples that reach it only; without, for every sample (the dense layout, which needs no host sync: what GPUs want).

Every computed pair is one **row** of a ``[rows, D]`` buffer. Node ``i``'s rows form one block of ``E * m_i``
rows, member by member (``m_i`` rows each: the largest number of samples of one ensemble member that reach node
``i``), so a module's matmul is one batched product over ``[E, m_i, D]``. A member with fewer samples fills its
block with *padding rows*: they read module 0 with weight 0, nothing reads them, and their gradient is 0. The
output node ``n`` is reached by every sample and comes last. The dense layout is the special case ``m_i = B``,
where the row of ``(node i, sample g = e * B + b)`` is ``i * E * B + g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch as th

__all__ = ["RowLayout", "build_row_layout"]


@dataclass
class RowLayout:
    """The rows of one routed-block call (see the module docstring).

    The routes come in the **grid** layout ``[E, B, n + 1, C]``: grid row ``q = g * (n + 1) + i`` holds node
    ``i``'s slots for sample ``g = e * B + b``. Every layout row knows its grid row, so anything given per
    (sample, node) is read with one gather and per-row results go back with one scatter.

    :param ens: ensemble size ``E``; ``batch``: samples per member ``B``.
    :param sizes: ``m_i`` for every node ``0 .. n`` (rows per member; ``B`` for the output node).
    :param complete: for every node, whether every sample reaches it (its rows are the samples in order).
    :param starts: first row of every node's block, and the total number of rows at the end (``n + 2`` ints).
    :param entry_rows: ``[rows, C]`` rows of each row's sources (its bag); zeros on padding rows, any valid row
        on input-node rows (they read ``x0``, not their bag).
    :param entry_weights: ``[rows, C]`` routing weights of those sources (0 on unused slots and padding rows).
    :param entry_keep: ``[rows, C]`` ResRouting masks, or ``None`` without ResRouting.
    :param grid_of_row: ``[rows]`` grid row of every row; ``E * B * (n + 1)`` (one past the grid) on padding rows.
    :param sample_of_row: ``[rows]`` sample ``g`` of every row (0 on padding rows).
    :param dense: every module is computed for every sample (row ``i * E * B + g`` is node ``i``, sample ``g``).
    """

    ens: int
    batch: int
    sizes: list[int]
    complete: list[bool]
    starts: list[int]
    entry_rows: th.Tensor
    entry_weights: th.Tensor
    entry_keep: th.Tensor | None
    grid_of_row: th.Tensor
    sample_of_row: th.Tensor
    dense: bool

    @property
    def n_rows(self) -> int:
        """Rows of every node, the output node included."""
        return self.starts[-1]

    def node_rows(self, node: int) -> slice:
        """The rows of ``node``'s block."""
        return slice(self.starts[node], self.starts[node + 1])


def build_row_layout(
    sources: th.Tensor, weights: th.Tensor, keep: th.Tensor | None, is_input: tuple[bool, ...], skip: bool
) -> RowLayout:
    """The rows of a call with these routes.

    :param sources: ``[E, B, n + 1, C]`` module indices of the chosen sources (unused slots: module 0).
    :param weights: ``[E, B, n + 1, C]`` their routing weights (read as plain values: no autograd here).
    :param keep: ``[E, B, n + 1, C]`` ResRouting masks, or ``None``.
    :param is_input: for every module, whether it reads the state encoding instead of other modules.
    :param skip: compute each module only for the samples that reach it (else: the dense layout).
    """
    ens, batch, nodes, slots = sources.shape
    n_samples = ens * batch
    grid_size = n_samples * nodes
    device = sources.device
    weights = weights.detach()
    # Node-major position (i * E * B + g) of every chosen source, in the grid layout [E * B, n + 1, C].
    sample = th.arange(n_samples, device=device).view(n_samples, 1, 1)
    source_position = sources.reshape(n_samples, nodes, slots) * n_samples + sample
    if skip:
        reached = _reached(source_position, is_input, nodes, n_samples, slots)  # node-major [n + 1, E * B]
        counts = reached.view(nodes, ens, batch).sum(-1).tolist()  # the one host sync of a call
        sizes = [max(member_counts) for member_counts in counts]  # rows per member of every node
        complete = [min(member_counts) == batch for member_counts in counts]
    else:
        reached = None
        sizes, complete = [batch] * nodes, [True] * nodes
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + ens * size)
    n_rows = starts[-1]
    if reached is None:
        position = th.arange(grid_size, device=device)  # node-major: row r is (node r // EB, sample r % EB)
        row_of = position
        rows = None
    else:
        start_t = th.tensor(starts[:-1], device=device).view(nodes, 1, 1)
        member = th.arange(ens, device=device).view(1, ens, 1) * th.tensor(sizes, device=device).view(
            nodes, 1, 1
        )
        rank = reached.view(nodes, ens, batch).cumsum(-1) - 1  # place among the member's reached samples
        row_of = (start_t + member + rank).view(-1)  # node-major; meaningful where reached
        position = reached.view(-1).nonzero().squeeze(1)  # reached (node, sample) pairs, node-major
        rows = row_of[position]
    node_of, sample_of = position // n_samples, position % n_samples
    grid = sample_of * nodes + node_of
    if rows is None:
        grid_of_row = grid
    else:  # padding rows point one past the grid, where every per-row value reads its fill
        grid_of_row = th.full((n_rows,), grid_size, dtype=th.long, device=device).index_copy_(0, rows, grid)

    def per_row(values: th.Tensor, fill: float | int | bool) -> th.Tensor:
        """Grid values ``[E * B * (n + 1), C]`` -> ``[rows, C]`` (padding rows: ``fill``)."""
        if rows is None:
            return values.index_select(0, grid_of_row)
        padded = th.cat([values, values.new_full((1, slots), fill)])
        return padded.index_select(0, grid_of_row)

    keep_grid = keep.reshape(grid_size, slots) if keep is not None else None
    return RowLayout(
        ens,
        batch,
        sizes,
        complete,
        starts,
        per_row(row_of[source_position.view(grid_size, slots)], 0),
        per_row(weights.reshape(grid_size, slots), 0.0),
        per_row(keep_grid, False) if keep_grid is not None else None,
        grid_of_row,
        grid_of_row // nodes % n_samples,
        dense=rows is None,
    )


def _reached(
    source_position: th.Tensor, is_input: tuple[bool, ...], nodes: int, n_samples: int, slots: int
) -> th.Tensor:
    """Node-major ``[n + 1, E * B]``: whether each node is reached backward from the output node along the chosen
    edges (``source_position``: the grid ``[E * B, n + 1, C]`` of node-major source positions).

    Nodes are visited from the output down: every reader of node ``j`` comes after ``j``, so ``j``'s count is
    final when its turn comes. The counts are numbers of paths (at most ``2 ** n`` with two sources per node;
    exact in float32 for the network sizes in use); only ``> 0`` matters.
    """
    paths = th.zeros(nodes, n_samples, device=source_position.device)
    paths[-1] = 1.0
    flat = paths.view(-1)
    for node in range(nodes - 1, -1, -1):
        if node < nodes - 1 and is_input[node]:
            continue
        flat.index_add_(0, source_position[:, node].reshape(-1), paths[node].repeat_interleave(slots))
    return paths > 0
