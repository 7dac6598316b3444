"""The routed block of D2R as one autograd function with a hand-written backward pass.

Forward (paper Eqs. 3 and 9-12 with the authors' residual shortcut; ``v_j`` is the *masked view* of module ``j``'s
output)::

    o_j = relu(M_j(x0))                           for input nodes (module 1)
    v_j = o_j if keep_ij else rsg(o_j)            rsg(o_j) = sg(h_j) + s_j   (Eq. 12)
    u_i = sum_j p_ij * v_j                        module input (Eq. 10, ResRouting)
    s_i = sum_j p_ij * o_j    ("full", authors' code)   or   u_i   ("masked", paper Eq. 11)
    h_i = relu(M_i(u_i)),     o_i = h_i + s_i     residual shortcut
    y   = sum_j p_out,j * v_j                     routed output node: no module, no shortcut

``v_j``, ``o_j`` and ``rsg(o_j)`` are equal in value, so the forward pass is a plain gather-and-matmul chain; the
masks only decide where gradients go. See :mod:`d2r_sb3.d2r.reference` for the plain statement (one module at a
time, ordinary autograd), against which the tests check this block's values and gradients.

How it is made fast (on a CPU the block is memory-bound: a module's matmul costs about as much as a few passes
over its ``[B, D]`` activations, so the passes over memory and the number of kernel launches are what count):

* **Only reached modules are computed** (on a CPU, by default): a module that no chosen path reaches backward
  from a sample's output node cannot change that sample's output or gradients, so each module runs on the samples
  that reach it only (5 to 7 of 16 modules for a trained MT10 network). Module outputs live in one ``[rows, D]``
  buffer, one contiguous block per module (:mod:`.row_layout`), so every matmul reads and writes a contiguous slab.
* Forward: on a CPU the whole loop over the nodes is one compiled call (:mod:`.compiled_block`: torch's BLAS for
  the products, one pass for the bias, relu and shortcut of each slab); elsewhere ``u_i`` is one ``embedding_bag``
  (gather and weighted sum fused, no ``[B, k, D]`` intermediate). The backward pass keeps each module's ``relu``
  output (its mask) and input (its weight gradient).
* Backward on a CPU **pulls** instead of scattering. Module ``j``'s gradient is the weighted sum of the gradients
  of the nodes that read it; every such edge goes from ``j`` to a later node, so when the backward loop reaches
  ``j`` (nodes in reverse order) all of them are known. The edges are sorted by source row once per backward,
  and each module's two gradients (see below) are one ``embedding_bag`` over a table of per-node gradients: no
  zero-filled gradient buffers, no scatter, and the ResRouting masks become per-edge weights.
  On a CPU the loop is one compiled call (:func:`~d2r_sb3.d2r.compiled_block.block_backward`), where the pulls
  are compiled passes. Off the CPU, nodes **push** with ``index_add_`` instead (:class:`_PushGraph`), which needs
  no host sync.
* Each module's weight gradient is taken right after its relu backward, while that gradient is in cache; the
  routing-weight gradients are taken by the compiled pulls while they load each edge's rows (off that path, one
  fused gather-and-dot after the loop).

Gradient bookkeeping. For a routed node ``i``: ``gU_i`` is the gradient on its mixed input ``u_i`` (the masked
views), ``gS_i`` the gradient on its shortcut ``s_i`` when that shortcut mixes the *full* outputs (authors'
code with ResRouting), and the output node has ``gU = dL/dy``. An edge ``j -> i`` with weight ``p`` and mask
``keep`` sends ``p * keep * gU_i + p * gS_i`` to ``o_j`` ("full" gradient ``gF_j``) and ``p * (1 - keep) * gU_i``
to ``rsg(o_j)``, which reaches ``j``'s shortcut but not its own weights. So with ``gT_j = gF_j + grsg_j``:
``grad_pre_j = gF_j * relu'(h_j)``, ``gU_j = grad_pre_j W_j`` and ``gS_j = gT_j`` ("full"), or
``gU_j = grad_pre_j W_j + gT_j`` ("masked", and without ResRouting, where ``s_j = u_j``). Input nodes keep only
``gF_j``: ``rsg(o_1) = sg(o_1)``.

Every tensor carries a leading ensemble dimension ``E`` (1 for the actor, 2 for the twin critics, which are
evaluated together in one batched call). What a network's block keeps between calls (backward strategy, whether
to skip unreached modules, scratch memory) lives in that network's :class:`BlockWorkspace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate

import numpy as np
import torch as th
from torch.autograd.function import once_differentiable

from d2r_sb3.common.host_loops import serial_as_none
from d2r_sb3.d2r import compiled
from d2r_sb3.d2r.compiled_block import block_backward, block_forward, gemm_for
from d2r_sb3.d2r.row_layout import RowLayout, build_row_layout, from_host, host_array

_SUM = 0  # embedding_bag mode "sum"
# Device types whose per-sample-weights gradient of embedding_bag has no kernel for these dtypes (CUDA has none
# for bfloat16 in torch 2.11): the routing weights' gradient takes float32 copies of its operands there.
_NO_PER_SAMPLE_DOTS: dict[str, tuple[th.dtype, ...]] = {"cuda": (th.bfloat16,)}


def compiled_pass_threads(like: th.Tensor) -> int:
    """On how many threads the compiled passes that stand in for torch's kernels (:mod:`~d2r_sb3.d2r.compiled`:
    the gradient pull, the gate inputs) run for tensors like ``like``: torch's thread count, where they can use
    all of its threads (a CPU, float32 or float64, :func:`~d2r_sb3.d2r.compiled.loop_threads`); else 0, and
    torch's kernels run (elsewhere the tensors are not on the host; on fewer threads torch's are faster)."""
    if like.device.type != "cpu" or like.dtype not in (th.float32, th.float64):
        return 0
    threads = th.get_num_threads()
    return threads if compiled.loop_threads(threads) == threads else 0


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


def _bag(table: th.Tensor, index: th.Tensor, offsets: th.Tensor, weights: th.Tensor) -> th.Tensor:
    """``out[g] = sum_{m in bag g} weights[m] * table[index[m]]``: one fused gather and weighted sum."""
    return th.embedding_bag(table, index, offsets, False, _SUM, False, weights, False, None)[0]


def _member_slabs(sizes: list[int]) -> list[slice]:
    """The rows of every member's slab, for slabs of ``sizes`` rows laid out member by member."""
    return [slice(end - size, end) for size, end in zip(sizes, accumulate(sizes), strict=True)]


def _member_products(
    x: th.Tensor,
    weight: th.Tensor,
    sizes: list[int],
    *,
    bias: th.Tensor | None = None,
    add: th.Tensor | None = None,
    out: th.Tensor | None = None,
) -> th.Tensor:
    """Each member's rows times that member's weights: ``out[rows of e] = base + x[rows of e] @ weight[e]``.

    :param x: ``[rows, K]``, the slab of member 0, then member 1, ... (``sizes[e]`` rows each).
    :param weight: ``[E, K, N]`` (a transposed view is fine).
    :param bias: ``[E, N]`` added to every row of its member; or ``add``: ``[rows, N]`` added row by row (``out``
        itself: the product is added to what ``out`` holds, with no copy).
    :param out: ``[rows, N]`` to write into (contiguous rows); a new tensor when ``None``.

    Slabs of equal size (one member, the dense layout, padded nodes) make one batched product; otherwise there is
    one product per member.
    """
    if out is None:
        out = x.new_empty(x.shape[0], weight.shape[-1])
    ens = len(sizes)
    if sizes.count(sizes[0]) == ens:  # all members equal: one batched product
        out3, x3 = out.view(ens, sizes[0], -1), x.view(ens, sizes[0], -1)
        if add is not None and add is out:  # (the additive term is already in place)
            out3.baddbmm_(x3, weight)
        elif add is not None:
            th.baddbmm(add.view(out3.shape), x3, weight, out=out3)
        elif bias is not None:
            th.baddbmm(bias.unsqueeze(1), x3, weight, out=out3)
        else:
            th.bmm(x3, weight, out=out3)
        return out
    for member, rows in enumerate(_member_slabs(sizes)):
        if rows.start == rows.stop:
            continue
        base = add[rows] if add is not None else (bias[member] if bias is not None else None)
        if base is None:
            th.mm(x[rows], weight[member], out=out[rows])
        elif add is out:
            out[rows].addmm_(x[rows], weight[member])
        else:
            th.addmm(base, x[rows], weight[member], out=out[rows])
    return out


def _member_weight_gradients(
    grad_pre: th.Tensor,
    x: th.Tensor,
    sizes: list[int],
    grad_weight: th.Tensor | None,
    grad_bias: th.Tensor | None,
    trained: list[int] | None = None,
) -> None:
    """Per member ``e``: ``grad_weight[e] = grad_pre[rows of e]^T @ x[rows of e]`` and ``grad_bias[e]`` the sum of
    ``grad_pre`` over those rows (``grad_pre [rows, N]``, ``x [rows, K]``, outputs ``[E, N, K]`` and ``[E, N]``).

    :param trained: the first rows of each member's slab that count (the rows that train the weights); ``None``:
        the whole slab.
    """
    ens = len(sizes)
    if trained is None:
        trained = sizes
    if sizes.count(sizes[0]) == ens and trained.count(trained[0]) == ens:  # one batched product
        grad3 = grad_pre.view(ens, sizes[0], -1)[:, : trained[0]]
        if grad_weight is not None:
            th.bmm(grad3.transpose(1, 2), x.view(ens, sizes[0], -1)[:, : trained[0]], out=grad_weight)
        if grad_bias is not None:
            th.sum(grad3, 1, out=grad_bias)
        return
    for member, (rows, used) in enumerate(zip(_member_slabs(sizes), trained, strict=True)):
        rows = slice(rows.start, rows.start + used)
        if grad_weight is not None:
            th.mm(grad_pre[rows].t(), x[rows], out=grad_weight[member])  # (no rows: 0)
        if grad_bias is not None:
            th.sum(grad_pre[rows], 0, out=grad_bias[member])


def _routed_rows(
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


def _input_rows(x0: th.Tensor, layout: RowLayout, node: int) -> th.Tensor:
    """``x0`` of the samples of input ``node``'s rows, ``[rows, Din]``."""
    flat = x0.reshape(-1, x0.shape[-1])
    if layout.complete[node]:
        return flat
    return flat.index_select(0, layout.sample_of_row[layout.node_rows(node)])


@dataclass
class SavedActivations:
    """What a forward pass keeps for its backward pass: each hidden module's relu output ``h`` and input ``u``. The
    operator loop gives them by weight slot (``[rows, D]`` each, in the lists); the compiled forward writes them
    into two ``[module rows, D]`` buffers, ``rows = (h, u)``, in the modules' own rows (what the compiled backward
    reads; :func:`_slot_views` gives the per-slot views of them), and leaves the lists empty."""

    hidden: list[th.Tensor] = field(default_factory=list)
    inputs: list[th.Tensor] = field(default_factory=list)
    rows: tuple[th.Tensor, th.Tensor] | None = None


def _slot_views(
    hidden: th.Tensor, inputs: th.Tensor, layout: RowLayout, plan: BlockPlan
) -> tuple[list[th.Tensor], list[th.Tensor]]:
    """Each hidden module's rows of the ``[module rows, D]`` buffers ``hidden`` and ``inputs``, by weight slot."""
    sizes = layout.block_sizes()[: len(plan.is_input)]
    node_hidden, node_inputs = hidden.split(sizes), inputs.split(sizes)
    hidden_nodes = plan.routed_nodes[:-1]  # in order: their weight slots
    return [node_hidden[node] for node in hidden_nodes], [node_inputs[node] for node in hidden_nodes]


def run_nodes(
    x0: th.Tensor,
    w_in: th.Tensor,
    b_in: th.Tensor,
    w_hid: th.Tensor,
    b_hid: th.Tensor,
    layout: RowLayout,
    plan: BlockPlan,
    saved: SavedActivations | None = None,
) -> tuple[th.Tensor, th.Tensor]:
    """Forward pass of the routed block (no autograd): ``(y [E, B, D], outputs [module rows, D])``.

    :param layout: the rows to compute (:func:`~d2r_sb3.d2r.row_layout.build_row_layout`).
    :param saved: receives each hidden module's ``relu`` output ``h_i`` (its mask for the backward pass) and
        input ``u_i`` (for the weight gradients), ``[rows, D]`` (:class:`SavedActivations`).
    """
    ens = layout.ens
    n = len(plan.is_input)
    dim = w_in.shape[2]
    block_sizes = layout.block_sizes()
    gemm = gemm_for(x0)
    threads = compiled_pass_threads(x0) if gemm else 0
    if threads:  # the whole loop compiled (on a CPU)
        y, outputs, hidden, inputs = block_forward(
            gemm,
            x0,
            w_in,
            b_in,
            w_hid,
            b_hid,
            plan.is_input,
            plan.param_index,
            layout.starts,
            layout.member_sizes,
            layout.complete,
            layout.sample_of_row,
            layout.entry_rows,
            layout.entry_weights,
            saved is not None,
            threads,
        )
        if saved is not None and hidden is not None and inputs is not None:
            saved.rows = (hidden, inputs)
        return y.view(ens, layout.batch, dim), outputs
    outputs = x0.new_empty(layout.starts[n], dim)
    slots = layout.entry_rows.shape[-1]
    offsets = th.arange(0, max(block_sizes) * slots, slots, device=x0.device)
    # Every per-node view taken at once (one call each instead of a few small ones per node).
    blocks = outputs.split(block_sizes[:n])
    entry_rows = layout.entry_rows.view(-1).split([size * slots for size in block_sizes])
    entry_weights = layout.entry_weights.view(-1).split([size * slots for size in block_sizes])
    w_in_t, w_hid_t = w_in.transpose(2, 3).unbind(1), w_hid.transpose(2, 3).unbind(1)
    b_in_k, b_hid_k = b_in.unbind(1), b_hid.unbind(1)
    for node in range(n):
        size = block_sizes[node]
        k = plan.param_index[node]
        members = layout.member_sizes[node]
        if plan.is_input[node]:
            if size:
                # o = h = relu(M(x0)); the relu mask is recovered from `outputs` in backward.
                x = _input_rows(x0, layout, node)
                _member_products(x, w_in_t[k], members, bias=b_in_k[k], out=blocks[node]).relu_()
            continue
        if not size:
            if saved is not None:
                saved.hidden.append(outputs.new_empty(0, dim))
                saved.inputs.append(outputs.new_empty(0, dim))
            continue
        u = _bag(outputs, entry_rows[node], offsets[:size], entry_weights[node])
        if saved is None:  # nothing kept for a backward pass: h is computed in place in the output rows
            _member_products(u, w_hid_t[k], members, bias=b_hid_k[k], out=blocks[node]).relu_().add_(u)
            continue
        h = _member_products(u, w_hid_t[k], members, bias=b_hid_k[k]).relu_()
        saved.hidden.append(h)
        saved.inputs.append(u)
        th.add(h, u, out=blocks[node])  # residual shortcut: in value s_i == u_i
    y = _bag(outputs, entry_rows[n], offsets[: ens * layout.batch], entry_weights[n])
    return y.view(ens, layout.batch, dim), outputs


class _EdgeGraph:
    """What the backward loop asks of one call's edge bookkeeping (:class:`_PullGraph` on a CPU, :class:`_PushGraph`
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
        by :func:`_hidden_module_backward`), may hold ``gT`` on return; if it does, it is the ``gT`` returned.
        ``output``: the module's output rows ``o`` (for :meth:`start_routing_dots`)."""
        grad_full, grad_total = self.pull(table, module)
        grad_pre = th.ops.aten.threshold_backward(grad_full, hidden, 0)
        if grad_total is None:  # no ResRouting: the shortcut gets gF
            return grad_pre, grad_full
        if shortcut_out is not None:
            shortcut_out.copy_(grad_total)  # gS
        return grad_pre, grad_total


class _PullGraph(_EdgeGraph):
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

    ``threads``: the threads of the compiled pull (:func:`compiled_pass_threads`, decided once per backward pass);
    0: torch's kernels.
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
        """:meth:`_EdgeGraph.takes_routing_dots`: on the compiled path, whose pulls load every reader's row anyway
        (the dots of :func:`_routing_weight_gradient` without a second gather of those rows)."""
        return self.threads > 0

    def start_routing_dots(self, grid_rows: int, like: th.Tensor) -> None:
        # (the last row takes the padding rows, as in _routing_weight_gradient)
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
        """:meth:`_EdgeGraph.pull_hidden` (same values) as one compiled pass on torch's threads
        (:func:`~d2r_sb3.d2r.compiled.pull_through_relu`, :func:`compiled_pass_threads`): the bags, the relu
        mask and the shortcut's copy in one go beat ``embedding_bag``, ``threshold_backward`` and ``copy_`` (96
        against 134 us for a 640-row module on one thread; 8.4 against 10.6 ms a step at batch 1280 on two).
        ``gT`` is written straight into the module's table rows ``node_out`` (and returned as them), where the
        product then adds ``gU`` in place instead of first copying ``gT`` there."""
        if not self.threads:
            return super().pull_hidden(table, module, hidden, shortcut_out, node_out)
        grad_pre = th.empty_like(hidden)
        also = shortcut_out if shortcut_out is not None else node_out[:0]
        self._compiled_pull(table, module, hidden, grad_pre, node_out, also, output)
        return grad_pre, node_out

    def pull_input(self, table: th.Tensor, module: int, output: th.Tensor) -> th.Tensor:
        """:meth:`_EdgeGraph.pull_input` as one compiled pass (the first bag only: no shortcut gradient)."""
        if not self.threads:
            return super().pull_input(table, module, output)
        grad_pre = th.empty_like(output)
        self._compiled_pull(table, module, output, grad_pre, output[:0], output[:0], output)
        return grad_pre

    def pull(self, table: th.Tensor, module: int) -> tuple[th.Tensor, th.Tensor | None]:
        """``(gF_j, gT_j)`` of ``module``'s rows, each ``[rows, D]`` (``gT_j`` is ``None`` without ResRouting)."""
        out = _bag(table, self.rows[module], self.offsets[module], self.weights[module])
        if self.pairs == 1:
            return out, None
        full, total = out.view(-1, 2, out.shape[-1]).unbind(1)
        return full, total


class _PushGraph(_EdgeGraph):
    """The sync-free counterpart of :class:`_PullGraph`, used off the CPU (GPUs).

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


BACKWARD_STRATEGIES: tuple[str, ...] = ("auto", "pull", "push")


class BlockWorkspace:
    """What one network's routed block keeps between calls besides its parameters, owned by that network.

    * ``backward_strategy``: ``"pull"`` (:class:`_PullGraph`, fastest on a CPU), ``"push"`` (:class:`_PushGraph`,
      no host sync: what GPUs need) or ``"auto"`` (pull on a CPU, push elsewhere). Both give the same gradients
      up to the order of the sums; tests run the push strategy on a CPU through this switch.
    * ``skip_unreached``: compute each module only for the samples whose route reaches it (``True``), for every
      sample (``False``: no host sync), or ``None`` (skip on a CPU, not elsewhere). Same values and gradients
      either way, up to the order of the sums.
    * ``reduced_precision``: under mixed precision (``train_precision="bfloat16"``), whether the block computes in
      the reduced dtype too (``True``), in the parameters' dtype (``False``), or ``None``: reduced off the CPU,
      full precision on a CPU. On a CPU the block's products are small and their row counts follow the routes;
      oneDNN, which computes bfloat16 products there, builds a kernel for every new shape (about 1 ms for a
      ``[rows, 128] x [128, 128]`` product on a CPU with AMX, against 0.07 ms once built), so a bfloat16 block made
      the whole step slower than float32.
    * Scratch memory of the backward pass, reused between calls on a CPU: large CPU allocations (>= 32 MB with
      glibc) are fresh mmaps whose first touch costs more than the work done in them. A buffer is taken out for
      the duration of one backward call, so graphs alive at the same time never share one.

    Neither the scratch memory nor anything else cached is pickled or deep-copied: it is rebuilt on first use.
    """

    max_scratch = 4  # buffers kept (one per width and dtype: actor / critic calls, float32 / bfloat16)

    def __init__(
        self,
        plan: BlockPlan,
        backward_strategy: str = "auto",
        skip_unreached: bool | None = None,
        reduced_precision: bool | None = None,
    ):
        if backward_strategy not in BACKWARD_STRATEGIES:
            raise ValueError(
                f"Unknown backward_strategy {backward_strategy!r}; choose one of {BACKWARD_STRATEGIES}."
            )
        self.plan = plan
        self.backward_strategy = backward_strategy
        self.skip_unreached = skip_unreached
        self.reduced_precision = reduced_precision
        self._scratch: dict[tuple, th.Tensor] = {}

    def __getstate__(self) -> dict:
        return {
            "plan": self.plan,
            "backward_strategy": self.backward_strategy,
            "skip_unreached": self.skip_unreached,
            "reduced_precision": self.reduced_precision,
        }  # caches stay behind

    def __setstate__(self, state: dict) -> None:
        self.plan = state["plan"]
        self.backward_strategy = state["backward_strategy"]
        self.skip_unreached = state.get("skip_unreached")
        self.reduced_precision = state.get("reduced_precision")
        self._scratch = {}

    def computes_reduced(self, device: th.device) -> bool:
        """Whether the block computes in the reduced dtype of mixed precision on ``device``
        (``reduced_precision``, above)."""
        if self.reduced_precision is None:
            return device.type != "cpu"
        return self.reduced_precision

    def layout(
        self,
        sources: th.Tensor,
        weights: th.Tensor,
        keep: th.Tensor | None,
        compute_dtype: th.dtype,
        trained_rows: int | None = None,
    ) -> RowLayout:
        """The rows of one call with these routes (skipping unreached modules where this workspace does), for
        module products in ``compute_dtype``; ``trained_rows`` as in :func:`routed_block`."""
        skip = self.skip_unreached
        if skip is None:
            skip = sources.device.type == "cpu"
        return build_row_layout(sources, weights, keep, self.plan.is_input, skip, compute_dtype, trained_rows)

    def gradient_graph(
        self, layout: RowLayout, routed_index: np.ndarray, like: th.Tensor
    ) -> _PullGraph | _PushGraph:
        """The edge bookkeeping of one backward pass, for the chosen strategy (``routed_index``: the rows of the
        routed nodes, :func:`_routed_rows`)."""
        strategy = self.backward_strategy
        if strategy == "auto":
            strategy = "pull" if like.device.type == "cpu" else "push"
        if strategy == "pull":
            return _PullGraph(layout, self.plan, routed_index, compiled_pass_threads(like))
        if strategy == "push":
            return _PushGraph(layout, self.plan, like)
        raise ValueError(f"Unknown backward_strategy {strategy!r}; choose one of {BACKWARD_STRATEGIES}.")

    def take_scratch(self, halves: int, rows: int, like: th.Tensor, most_rows: int) -> th.Tensor:
        """An uninitialised ``[halves, rows, D]`` buffer like ``like``; give it back with :meth:`give_back_scratch`.

        :param most_rows: the most rows a call of this shape can have (the dense layout's). A buffer that is too
            small is replaced by one of that size: the rows vary with the routes, and growing to each new largest
            count would map (and first touch, page by page) a fresh buffer of tens of MB every few steps.
        """
        dim = like.shape[-1]
        if like.device.type != "cpu":
            return like.new_empty(halves, rows, dim)
        key = (dim, like.dtype)
        buffer = self._scratch.pop(key, None)
        if buffer is None or buffer.shape[0] < halves * rows:
            buffer = like.new_empty(halves * max(rows, most_rows), dim)
        return buffer[: halves * rows].view(halves, rows, dim)

    def give_back_scratch(self, buffer: th.Tensor) -> None:
        """Keep ``buffer``'s memory for the next backward pass (the oldest beyond :attr:`max_scratch` are dropped)."""
        if buffer.device.type != "cpu":
            return
        base = buffer._base if buffer._base is not None else buffer
        key = (base.shape[-1], base.dtype)
        kept = self._scratch.get(key)
        if kept is None or kept.shape[0] < base.shape[0]:
            self._scratch[key] = base.view(-1, base.shape[-1])
        while len(self._scratch) > self.max_scratch:
            self._scratch.pop(next(iter(self._scratch)))


class RoutedBlockFunction(th.autograd.Function):
    """Autograd function for the routed modules and the output node. See the module docstring."""

    @staticmethod
    def forward(
        ctx,
        x0: th.Tensor,
        w_in: th.Tensor,
        b_in: th.Tensor,
        w_hid: th.Tensor,
        b_hid: th.Tensor,
        weights: th.Tensor,
        sources: th.Tensor,
        keep: th.Tensor | None,
        workspace: BlockWorkspace,
        trained_rows: int | None,
    ) -> th.Tensor:
        layout = workspace.layout(sources, weights, keep, x0.dtype, trained_rows)
        saved = SavedActivations()
        y, outputs = run_nodes(x0, w_in, b_in, w_hid, b_hid, layout, workspace.plan, saved=saved)
        ctx.kept_rows = saved.rows is not None  # (the compiled forward's buffers, else the per-slot tensors)
        kept = saved.rows if saved.rows is not None else (*saved.hidden, *saved.inputs)
        ctx.save_for_backward(x0, w_in, w_hid, outputs, *kept)
        ctx.workspace, ctx.layout = workspace, layout
        ctx.weights_dtype = weights.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: th.Tensor):
        x0, w_in, w_hid, outputs, *saved = ctx.saved_tensors
        n_hid = w_hid.shape[1]
        workspace: BlockWorkspace = ctx.workspace
        layout: RowLayout = ctx.layout
        plan = workspace.plan
        need_x0, need_w_in, need_b_in, need_w_hid, need_b_hid, need_p = ctx.needs_input_grad[:6]
        n = len(plan.is_input)
        ens, dim = layout.ens, outputs.shape[-1]
        routed, routed_index = _routed_rows(layout, plan, grad_y.device)
        graph = workspace.gradient_graph(layout, routed_index, grad_y)
        most_rows = ens * layout.batch * len(layout.member_sizes)  # every node for every sample
        table = workspace.take_scratch(2 if graph.two_sided else 1, layout.n_rows, grad_y, most_rows)
        grid_rows = (n + 1) * ens * layout.batch
        dots_in_pulls = need_p and graph.takes_routing_dots()
        if dots_in_pulls:
            graph.start_routing_dots(grid_rows, outputs)
        _start_output_gradient(table, graph, grad_y, layout.node_rows(n))
        # Weight gradients in the weights' layout [E, slots, ...]; each module's slot ([E, ...], strided across the
        # members) is written in place (out=), so nothing is transposed or copied afterwards. Input modules no
        # sample reaches keep their zeros.
        n_in, din = w_in.shape[1], w_in.shape[3]
        grad_w_in = x0.new_zeros(ens, n_in, dim, din) if need_w_in else None
        grad_b_in = x0.new_zeros(ens, n_in, dim) if need_b_in else None
        grad_w_hid = x0.new_empty(ens, n_hid, dim, dim) if need_w_hid else None
        grad_b_hid = x0.new_empty(ens, n_hid, dim) if need_b_hid else None

        weight_grads = (grad_w_in, grad_b_in, grad_w_hid, grad_b_hid)
        gemm = gemm_for(x0)
        if ctx.kept_rows and isinstance(graph, _PullGraph) and graph.threads and gemm:
            hidden_rows, input_rows = saved
            grad_x0 = block_backward(
                gemm,
                graph,
                table,
                x0,
                w_in,
                w_hid,
                outputs,
                hidden_rows,
                input_rows,
                layout,
                plan.is_input,
                plan.param_index,
                weight_grads,
                need_x0,
            )
        else:
            hidden, inputs = (
                _slot_views(saved[0], saved[1], layout, plan)
                if ctx.kept_rows
                else (saved[:n_hid], saved[n_hid:])
            )
            grad_x0 = _backward_by_operators(
                graph, table, x0, w_in, w_hid, outputs, hidden, inputs, layout, plan, weight_grads, need_x0
            )
        grad_p = None
        if dots_in_pulls:
            grad_p = graph.routing_dots().view(ens, layout.batch, n + 1, -1).to(ctx.weights_dtype)
        elif need_p:
            grad_p = _routing_weight_gradient(outputs, table[0], layout, routed, n).to(ctx.weights_dtype)
        workspace.give_back_scratch(table)
        return grad_x0, grad_w_in, grad_b_in, grad_w_hid, grad_b_hid, grad_p, None, None, None, None


def _backward_by_operators(
    graph: _PullGraph | _PushGraph,
    table: th.Tensor,
    x0: th.Tensor,
    w_in: th.Tensor,
    w_hid: th.Tensor,
    outputs: th.Tensor,
    hidden: list[th.Tensor],
    inputs: list[th.Tensor],
    layout: RowLayout,
    plan: BlockPlan,
    weight_grads: tuple[th.Tensor | None, th.Tensor | None, th.Tensor | None, th.Tensor | None],
    need_x0: bool,
) -> th.Tensor | None:
    """The backward loop over the nodes as torch operators (and compiled pulls where ``graph`` has them): the
    arguments of :func:`~d2r_sb3.d2r.compiled_block.block_backward`, with the hidden modules' relu outputs and
    inputs by weight slot. Returns ``dL/dx0`` when ``need_x0``."""
    n = len(plan.is_input)
    flat_table = table.view(-1, table.shape[-1])
    grad_x0: th.Tensor | None = None  # written by the first input module that runs (no zero fill)
    grad_w_in, grad_b_in, grad_w_hid, grad_b_hid = weight_grads
    # Every per-node view taken at once (one call each instead of a few small ones per node).
    row_counts = layout.block_sizes()[:n]
    node_grads = table[0, : layout.starts[n]].split(row_counts)
    node_shortcut_grads = table[1, : layout.starts[n]].split(row_counts) if graph.two_sided else None
    node_outputs = outputs.split(row_counts)
    w_hid_k = w_hid.unbind(1)
    grad_w_hid_k = grad_w_hid.unbind(1) if grad_w_hid is not None else None
    grad_b_hid_k = grad_b_hid.unbind(1) if grad_b_hid is not None else None
    for node in range(n - 1, -1, -1):
        size = row_counts[node]
        k = plan.param_index[node]
        members = layout.member_sizes[node]
        if not size:  # no sample reaches this module: its gradients are 0
            if not plan.is_input[node]:
                for grads in (grad_w_hid_k, grad_b_hid_k):
                    if grads is not None:
                        grads[k].zero_()
            continue
        if plan.is_input[node]:
            grad_x0 = _input_module_backward(
                graph.pull_input(flat_table, node, node_outputs[node]),
                x0,
                layout,
                node,
                w_in[:, k],
                grad_x0,
                grad_w_in[:, k] if grad_w_in is not None else None,
                grad_b_in[:, k] if grad_b_in is not None else None,
                need_x0,
            )
            continue
        grad_pre, grad_total = graph.pull_hidden(
            flat_table,
            node,
            hidden[k],
            node_shortcut_grads[node] if node_shortcut_grads is not None else None,
            node_grads[node],
            node_outputs[node],
        )
        _hidden_module_backward(
            grad_pre,
            grad_total,
            members,
            inputs[k],
            w_hid_k[k],
            node_grads[node],
            grad_w_hid_k[k] if grad_w_hid_k is not None else None,
            grad_b_hid_k[k] if grad_b_hid_k is not None else None,
            layout.trained(node),
        )
        graph.push(table, layout.node_rows(node))
    if need_x0 and grad_x0 is None:  # (no input module reached: not possible with a route, but exact)
        grad_x0 = th.zeros_like(x0)
    return grad_x0


def _start_output_gradient(
    table: th.Tensor, graph: _PullGraph | _PushGraph, grad_y: th.Tensor, output_rows: slice
) -> None:
    """Fill the output node's rows of the per-node gradient table (``dL/dy``; no shortcut) and push them.

    Every routed row of the table is written when its node is processed and read afterwards only by the pulls of
    its (earlier) sources, so the table needs no zero fill.
    """
    table[0, output_rows].copy_(grad_y.reshape(-1, grad_y.shape[-1]))
    if graph.two_sided:
        table[1, output_rows].zero_()  # the output node has no shortcut
    graph.push(table, output_rows)


def _input_module_backward(
    grad_pre: th.Tensor,
    x0: th.Tensor,
    layout: RowLayout,
    node: int,
    weight: th.Tensor,
    grad_x0: th.Tensor | None,
    grad_weight: th.Tensor | None,
    grad_bias: th.Tensor | None,
    need_x0: bool,
) -> th.Tensor | None:
    """Backward of input module ``node`` (``o = relu(M(x0))``, output ``[rows, D]``, ``weight [E, D, Din]``) from
    its gradient before the relu ``[rows, D]`` (:meth:`_EdgeGraph.pull_input`): writes its weight and bias gradients
    (``[E, D, Din]`` and ``[E, D]``) and adds its share of ``dL/dx0`` (those requested).

    :param grad_x0: ``dL/dx0`` so far (``None`` before the first input module's share).
    :param need_x0: whether ``dL/dx0`` is wanted.
    :return: ``dL/dx0`` with this module's share (a new tensor for the first share: no zero fill), or ``None``
        when it is not wanted.

    ``rsg(o_1) = sg(o_1)``: the masked edges' gradient stops here.
    """
    members = layout.member_sizes[node]
    if grad_weight is not None or grad_bias is not None:
        x = _input_rows(x0, layout, node)
        _member_weight_gradients(grad_pre, x, members, grad_weight, grad_bias, layout.trained(node))
    if not need_x0:
        return None
    if layout.complete[node]:
        grad_pre = grad_pre.view(x0.shape[0], -1, grad_pre.shape[-1])
        return th.bmm(grad_pre, weight) if grad_x0 is None else grad_x0.baddbmm_(grad_pre, weight)
    total = th.zeros_like(x0) if grad_x0 is None else grad_x0
    grad_rows = _member_products(grad_pre, weight, members)
    samples = layout.sample_of_row[layout.node_rows(node)]
    total.view(-1, x0.shape[-1]).index_add_(0, samples, grad_rows)  # padding rows add 0
    return total


def _hidden_module_backward(
    grad_pre: th.Tensor,
    grad_total: th.Tensor,
    members: list[int],
    inputs: th.Tensor,
    weight: th.Tensor,
    node_grad: th.Tensor,
    grad_weight: th.Tensor | None,
    grad_bias: th.Tensor | None,
    trained: list[int] | None = None,
) -> None:
    """Backward of a routed module from the gradient before its relu and its shortcut's gradient ``gT`` (each
    ``[rows, D]``, :meth:`_EdgeGraph.pull_hidden`): writes its table rows ``A`` (``node_grad``) and its weight and bias
    gradients (those requested).

    :param members: the module's rows of each ensemble member (``weight [E, D, D]`` is applied member by member).
    :param inputs: the module's saved input ``u``.
    :param trained: the rows of each member's slab that train the weights (:meth:`RowLayout.trained`).
    """
    # A = gU + gS, with gU = grad_pre W ("full") or grad_pre W + gT (s_i == u_i).
    _member_products(grad_pre, weight, members, add=grad_total, out=node_grad)
    _member_weight_gradients(grad_pre, inputs, members, grad_weight, grad_bias, trained)


def _routing_weight_gradient(
    outputs: th.Tensor, grad_rows: th.Tensor, layout: RowLayout, routed: slice | th.Tensor, n: int
) -> th.Tensor:
    """``dL/dp[e, b, i, c] = <o_src, A_i>`` for every node and slot (``o``, its masked view and ``rsg(o)`` agree
    in value), ``[E, B, n + 1, C]``; 0 for input nodes and for nodes a sample does not reach.

    The dot products are those of the ``per_sample_weights`` gradient of the forward pass's bags (``u_i = sum_c
    p_c o_src``) with ``A_i`` in place of ``dL/du_i``: one fused gather-and-dot, nothing materialised. (The
    compiled pulls take them on their way instead: :meth:`_EdgeGraph.start_routing_dots`.)
    """
    grid_rows = (n + 1) * layout.ens * layout.batch
    slots = layout.entry_rows.shape[-1]
    source_rows = layout.entry_rows[routed].reshape(-1)
    grads = grad_rows[routed]
    n_entries = source_rows.numel()
    entry = th.arange(n_entries, device=outputs.device)
    dtype = outputs.dtype
    upcast = dtype in _NO_PER_SAMPLE_DOTS.get(outputs.device.type, ())
    if upcast:
        grads, outputs = grads.float(), outputs.float()
    dots = th.ops.aten._embedding_bag_per_sample_weights_backward(
        grads, outputs, source_rows, entry[::slots], entry // slots, _SUM, -1
    ).view(-1, slots)
    if upcast:
        dots = dots.to(dtype)
    grid = dots.new_zeros(grid_rows + 1, slots)  # the last row takes the padding rows
    grid.index_copy_(0, layout.grid_of_row[routed], dots)
    return grid[:grid_rows].view(layout.ens, layout.batch, n + 1, slots)


def routed_block(
    x0: th.Tensor,
    w_in: th.Tensor,
    b_in: th.Tensor,
    w_hid: th.Tensor,
    b_hid: th.Tensor,
    weights: th.Tensor,
    sources: th.Tensor,
    keep: th.Tensor | None,
    workspace: BlockWorkspace,
    trained_rows: int | None = None,
) -> th.Tensor:
    """Run the routed modules and the output node.

    :param x0: ``[E, B, Din]`` module-path input (``relu`` of the state encoding).
    :param w_in: ``[E, n_in, D, Din]`` weights of the input modules; ``b_in``: ``[E, n_in, D]``.
    :param w_hid: ``[E, n_hid, D, D]`` weights of the other modules; ``b_hid``: ``[E, n_hid, D]``.
    :param weights: ``[E, B, n + 1, C]`` routing weights of the chosen sources (differentiable). Unused slots
        must have weight 0 and point at a module every node may read (module 0).
    :param sources: ``[E, B, n + 1, C]`` module indices of the chosen sources.
    :param keep: ``[E, B, n + 1, C]`` ResRouting mask, or ``None`` when ResRouting is off.
    :param workspace: the network's :class:`BlockWorkspace` (its plan, backward strategy and scratch memory).
    :param trained_rows: only the first ``trained_rows`` samples of every member train the module weights; for
        the later ones the weights are constants, as if detached (their gradient still reaches ``x0`` and the
        routing weights). ``None``: every sample trains them.
    :return: ``[E, B, D]`` output-node value.
    """
    sources = sources.expand(weights.shape)
    tensors = (x0, w_in, b_in, w_hid, b_hid, weights)
    if th.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return RoutedBlockFunction.apply(*tensors, sources, keep, workspace, trained_rows)
    # No gradient wanted (targets, acting): nothing to save for a backward pass.
    layout = workspace.layout(sources, weights, keep, x0.dtype)
    return run_nodes(x0, w_in, b_in, w_hid, b_hid, layout, workspace.plan)[0]
