"""The edges of one routed-block call, grouped for its backward pass.

Every slot of a routed node's row is an edge from a source row (a module's output) with a routing weight and, with
ResRouting, a mask. The backward pass (:mod:`~d2r_sb3.d2r.routed_block`) sends each node's gradient back along
them. On a CPU each module *pulls* the gradients of the nodes that read it when its turn comes (:class:`PullGraph`:
the edges sorted by source row once per backward, each module's gradients one bag sum, no zero-filled buffers, no
scatter); elsewhere each node *pushes* its gradient into its sources' accumulators as soon as it is known
(:class:`PushGraph`: no host sync). :class:`EdgeGraph` is what the backward loop asks of either.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch as th

from d2r_sb3.common.host_loops import serial_as_none
from d2r_sb3.d2r import compiled
from d2r_sb3.d2r.row_layout import BlockPlan, RowLayout, from_host, host_array

__all__ = ["BAG_SUM", "EdgeGraph", "PullGraph", "PushGraph", "bag", "routed_rows"]

BAG_SUM = 0  # embedding_bag mode "sum"


def bag(table: th.Tensor, index: th.Tensor, offsets: th.Tensor, weights: th.Tensor) -> th.Tensor:
    """``out[g] = sum_{m in bag g} weights[m] * table[index[m]]``: one fused gather and weighted sum."""
    return th.embedding_bag(table, index, offsets, False, BAG_SUM, False, weights, False, None)[0]


def routed_rows(
    layout: RowLayout, plan: BlockPlan, device: th.device
) -> tuple[slice | th.Tensor, np.ndarray]:
    """The rows of every routed node (the rows that read other modules), in row order: as a slice when they are
    one range (D2R's module-level graph: every node but module 1), else as an index tensor; and always as a numpy
    index (for the host-side bookkeeping)."""
    ranges: list[list[int]] = []
    for node in plan.routed_nodes:
        lo, hi = layout.starts[node], layout.starts[node + 1]
        if ranges and ranges[-1][1] == lo:
            ranges[-1][1] = hi  # adjacent blocks: one range
        else:
            ranges.append([lo, hi])
    index = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
    return (slice(*ranges[0]) if len(ranges) == 1 else th.from_numpy(index).to(device)), index


class EdgeGraph:
    """What the backward loop asks of one call's edge bookkeeping (:class:`PullGraph` on a CPU, :class:`PushGraph`
    elsewhere): each module's gradients from the nodes that read it (:meth:`pull`, :meth:`pull_hidden`), and
    :meth:`push` once a node's table rows are complete."""

    def pull(self, table: th.Tensor, module: int) -> tuple[th.Tensor, th.Tensor | None]:
        """``(gF_j, gT_j)`` of ``module``'s rows, each ``[rows, D]`` (``gT_j`` is ``None`` without ResRouting)."""
        raise NotImplementedError

    def push(self, table: th.Tensor, rows: slice) -> None:
        """Send the gradient of a node's rows (its table rows, complete now) to their sources."""
        raise NotImplementedError

    def takes_routing_dots(self) -> bool:
        """Whether the pulls can also take the routing weights' gradient (:meth:`start_routing_dots`)."""
        return False

    def start_routing_dots(self, grid_rows: int, like: th.Tensor) -> None:
        """Have the following pulls also write the routing weights' gradient of the edges leaving each module
        (:meth:`routing_dots`); only where :meth:`takes_routing_dots`."""
        raise NotImplementedError

    def routing_dots(self) -> th.Tensor:
        """The routing weights' gradient ``[grid_rows, C]`` the pulls wrote since :meth:`start_routing_dots`."""
        raise NotImplementedError

    def pull_input(self, table: th.Tensor, module: int, output: th.Tensor) -> th.Tensor:
        """An input module's gradient from the nodes that read it, through its relu: ``gF`` where its output
        ``o = relu(.)`` is positive, else 0 (``[rows, D]``; an input module has no shortcut, so no ``gT``)."""
        grad_full, _ = self.pull(table, module)
        return th.ops.aten.threshold_backward(grad_full, output, 0)

    def pull_hidden(
        self,
        table: th.Tensor,
        module: int,
        hidden: th.Tensor,
        shortcut_out: th.Tensor | None,
        node_out: th.Tensor,
        output: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor]:
        """A hidden module's gradients from the nodes that read it, through its relu: ``(grad_pre, gT)``, each
        ``[rows, D]``: ``gF`` where the saved relu output ``hidden`` is positive (else 0), and the shortcut's
        gradient ``gT`` (``gF`` without ResRouting), also written to ``shortcut_out`` (its table rows ``gS``, with
        the "full" shortcut and ResRouting) when given. ``node_out``, the module's table rows (written afterwards
        by the backward loop), may hold ``gT`` on return; if it does, it is the ``gT`` returned.
        ``output``: the module's output rows ``o`` (for :meth:`start_routing_dots`)."""
        grad_full, grad_total = self.pull(table, module)
        grad_pre = th.ops.aten.threshold_backward(grad_full, hidden, 0)
        if grad_total is None:  # no ResRouting: the shortcut gets gF
            return grad_pre, grad_full
        if shortcut_out is not None:
            shortcut_out.copy_(grad_total)  # gS
        return grad_pre, grad_total


class PullGraph(EdgeGraph):
    """The edges of one call's routes, grouped by source row for the pulling backward pass.

    Built once per backward. Every slot of a routed node's row is an edge from its source row; the edges become
    entries of the source row's bag(s), and each entry indexes a row of the per-node gradient table
    ``[halves, rows, D]``: half 0 is ``A_i = gU_i + gS_i`` (just ``gU_i`` without the "full" shortcut), half 1
    (only with ResRouting and the "full" shortcut) is ``gS_i``. Each source row has up to two bags:

    * ``gF_j`` (gradient on ``o_j``): ``sum p * (keep ? A_i : gS_i)`` ("full"), ``sum p * keep * gU_i`` ("masked"),
      ``sum p * gU_i`` (no ResRouting);
    * ``gT_j = gF_j + grad on rsg(o_j)`` (gradient on the shortcut): ``sum p * A_i``. Without ResRouting it
      equals ``gF_j`` and is not computed.

    With both, the two bags of a row are adjacent in one ``embedding_bag`` call: they read (mostly) the same table
    rows, so the second read comes from cache.

    ``threads``: the threads of the compiled pull (:func:`~d2r_sb3.d2r.routed_block.compiled_pass_threads`,
    decided once per backward pass); 0: torch's kernels.
    """

    def __init__(self, layout: RowLayout, plan: BlockPlan, reader: np.ndarray, threads: int = 0):
        self.threads = threads
        n = len(plan.is_input)
        n_sources = layout.starts[n]  # rows of modules (the output node is never a source)
        keep = layout.entry_keep
        self.two_sided = keep is not None and not plan.masked_shortcut
        self.pairs = 1 if keep is None else 2  # bags per row
        # Index work on a few thousand edges: one compiled pass on the host (the routing weights travel as their
        # bits, bfloat16 too). A row's edges keep their reader order: deterministic sums.
        rows, entry_weights, starts, grid_slots = compiled.edge_bags(
            host_array(layout.entry_rows),
            host_array(layout.entry_weights),
            host_array(keep) if keep is not None else np.zeros((0, 0), dtype=np.bool_),
            reader,
            n_sources,
            layout.n_rows,
            compiled.bag_mode(keep is not None, plan.masked_shortcut),
            host_array(layout.grid_of_row),
        )
        # The edges as host arrays (what the compiled pulls read); torch's pulls (embedding_bag) make per-module
        # tensors of them when they first ask.
        self.edge_rows, self.edge_weights = rows, entry_weights
        self.bag_starts, self.edge_grid_slots = starts, grid_slots
        self.segment = np.append(starts[:, 0], len(rows))[layout.starts[: n + 1]]  # each module's first entry
        self.slots = layout.entry_rows.shape[-1]
        self.dots: np.ndarray | None = None  # the routing weights' gradient, flat, while the pulls write it
        self._layout = layout
        self._row_counts = layout.block_sizes()[:n]

    @cached_property
    def rows(self) -> tuple[th.Tensor, ...]:
        """Every module's entries' table rows."""
        device = self._layout.entry_rows.device
        return th.from_numpy(self.edge_rows).to(device).split(np.diff(self.segment).tolist())

    @cached_property
    def weights(self) -> tuple[th.Tensor, ...]:
        """Every module's entries' weights."""
        return from_host(self.edge_weights, self._layout.entry_weights).split(np.diff(self.segment).tolist())

    @cached_property
    def offsets(self) -> tuple[th.Tensor, ...]:
        """Every module's bag offsets, relative to its first entry (all computed at once)."""
        offsets = self.bag_starts - np.repeat(self.segment[:-1], self._row_counts)[:, None]
        device = self._layout.entry_rows.device
        return th.from_numpy(offsets.reshape(-1)).to(device).split([c * self.pairs for c in self._row_counts])

    def push(self, table: th.Tensor, rows: slice) -> None:
        """Nothing to do: sources pull their gradient when their turn comes."""

    def takes_routing_dots(self) -> bool:
        """:meth:`EdgeGraph.takes_routing_dots`: on the compiled path, whose pulls load every reader's row anyway
        (the dots of :func:`~d2r_sb3.d2r.block_operators.routing_weight_gradient` without a second gather of those
        rows)."""
        return self.threads > 0

    def start_routing_dots(self, grid_rows: int, like: th.Tensor) -> None:
        # (the last row takes the padding rows, as in routing_weight_gradient)
        self.dots = np.zeros((grid_rows + 1) * self.slots, dtype=host_array(like[:0]).dtype)

    def routing_dots(self) -> th.Tensor:
        assert self.dots is not None
        return th.from_numpy(self.dots).view(-1, self.slots)[:-1]

    def _compiled_pull(
        self,
        table: th.Tensor,
        module: int,
        mask: th.Tensor,
        grad_pre: th.Tensor,
        total: th.Tensor,
        also: th.Tensor,
        output: th.Tensor | None,
    ) -> None:
        """:func:`~d2r_sb3.d2r.compiled.pull_through_relu` for ``module``'s rows (the routing dots too, once
        started and given the module's ``output``)."""
        table_np = table.numpy()
        if self.dots is not None and output is not None:
            outputs, dots = output.numpy(), self.dots
        else:  # (no rows, no entries: nothing taken)
            outputs, dots = mask[:0].numpy(), np.zeros(0, dtype=table_np.dtype)
        # The module's bags start at absolute entries; the arrays end at its last entry (as the compiled backward
        # reads them), so its last bag ends there.
        end = self.segment[module + 1]
        lo, hi = self._layout.starts[module], self._layout.starts[module + 1]
        compiled.pull_through_relu(
            table_np,
            self.edge_rows[:end],
            self.bag_starts.reshape(-1)[lo * self.pairs : hi * self.pairs],
            self.edge_weights[:end],
            mask.numpy(),
            grad_pre.numpy(),
            total.numpy(),
            also.numpy(),
            outputs,
            self.edge_grid_slots[:end],
            dots,
            serial_as_none(self.threads),
        )

    def pull_hidden(
        self,
        table: th.Tensor,
        module: int,
        hidden: th.Tensor,
        shortcut_out: th.Tensor | None,
        node_out: th.Tensor,
        output: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor]:
        """:meth:`EdgeGraph.pull_hidden` (same values) as one compiled pass on torch's threads
        (:func:`~d2r_sb3.d2r.compiled.pull_through_relu`, :func:`~d2r_sb3.d2r.routed_block.compiled_pass_threads`):
        the bags, the relu mask and the shortcut's copy in one go beat ``embedding_bag``, ``threshold_backward`` and
        ``copy_`` (96 against 134 us for a 640-row module on one thread; 8.4 against 10.6 ms a step at batch 1280 on
        two).
        ``gT`` is written straight into the module's table rows ``node_out`` (and returned as them), where the
        product then adds ``gU`` in place instead of first copying ``gT`` there."""
        if not self.threads:
            return super().pull_hidden(table, module, hidden, shortcut_out, node_out)
        grad_pre = th.empty_like(hidden)
        also = shortcut_out if shortcut_out is not None else node_out[:0]
        self._compiled_pull(table, module, hidden, grad_pre, node_out, also, output)
        return grad_pre, node_out

    def pull_input(self, table: th.Tensor, module: int, output: th.Tensor) -> th.Tensor:
        """:meth:`EdgeGraph.pull_input` as one compiled pass (the first bag only: no shortcut gradient)."""
        if not self.threads:
            return super().pull_input(table, module, output)
        grad_pre = th.empty_like(output)
        self._compiled_pull(table, module, output, grad_pre, output[:0], output[:0], output)
        return grad_pre

    def pull(self, table: th.Tensor, module: int) -> tuple[th.Tensor, th.Tensor | None]:
        """``(gF_j, gT_j)`` of ``module``'s rows, each ``[rows, D]`` (``gT_j`` is ``None`` without ResRouting)."""
        out = bag(table, self.rows[module], self.offsets[module], self.weights[module])
        if self.pairs == 1:
            return out, None
        full, total = out.view(-1, 2, out.shape[-1]).unbind(1)
        return full, total


class PushGraph(EdgeGraph):
    """The sync-free counterpart of :class:`PullGraph`, used off the CPU (GPUs).

    Pulling slices the edge list by module, which needs the segment bounds on the host (a device sync per
    backward). Here every routed node instead adds its edges' contributions into per-row accumulators with
    ``index_add_`` (atomic adds on a GPU) as soon as its gradient is known: no host sync and, with the dense layout,
    static shapes (what capturing a training step in a CUDA graph needs). Same values as pulling, up to the order
    of the sums.
    """

    def __init__(self, layout: RowLayout, plan: BlockPlan, like: th.Tensor):
        n = len(plan.is_input)
        self.layout = layout
        self.two_sided = layout.entry_keep is not None and not plan.masked_shortcut
        n_sources, dim = layout.starts[n], like.shape[-1]
        self.grad_full = like.new_zeros(n_sources, dim)
        self.grad_total = like.new_zeros(n_sources, dim) if layout.entry_keep is not None else None

    def pull(self, table: th.Tensor, module: int) -> tuple[th.Tensor, th.Tensor | None]:
        rows = self.layout.node_rows(module)
        return self.grad_full[rows], (self.grad_total[rows] if self.grad_total is not None else None)

    def push(self, table: th.Tensor, rows: slice) -> None:
        """Send the gradient of a node's rows (its table rows, complete now) to their sources."""
        layout = self.layout
        main = table[0, rows].unsqueeze(1)  # [E * m, 1, D]
        p = layout.entry_weights[rows].unsqueeze(-1)  # [E * m, C, 1]
        sources = layout.entry_rows[rows].reshape(-1)
        dim = main.shape[-1]
        if layout.entry_keep is None:
            self.grad_full.index_add_(0, sources, (p * main).view(-1, dim))
            return
        kept = layout.entry_keep[rows].unsqueeze(-1)
        if self.two_sided:
            full = p * th.where(kept, main, table[1, rows].unsqueeze(1))
        else:
            full = (p * kept) * main
        assert self.grad_total is not None  # (allocated whenever keep is given)
        self.grad_full.index_add_(0, sources, full.view(-1, dim))
        self.grad_total.index_add_(0, sources, (p * main).view(-1, dim))
