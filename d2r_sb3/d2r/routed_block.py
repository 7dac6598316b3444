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

* Module outputs live in one buffer, **node-major** ``[n, E, B, D]``: the row of module ``j``, ensemble member
  ``e``, sample ``b`` is ``(j * E + e) * B + b``, so every matmul reads and writes contiguous slabs.
* Forward: ``u_i`` is one ``embedding_bag`` (gather and weighted sum fused, no ``[B, k, D]`` intermediate); the
  backward pass keeps each module's ``relu`` output (its mask) and input (its weight gradient).
* Backward on a CPU **pulls** instead of scattering. Module ``j``'s gradient is the weighted sum of the gradients
  of the nodes that read it; every such edge goes from ``j`` to a later node, so when the backward loop reaches
  ``j`` (nodes in reverse order) all of them are known. The edges are sorted by (source, sample) once per
  backward, and each module's two gradients (see below) are one ``embedding_bag`` over a table of per-node
  gradients: no zero-filled gradient buffers, no scatter, and the ResRouting masks become per-edge weights.
  Off the CPU, nodes **push** with ``index_add_`` instead (:class:`_PushGraph`), which needs no host sync.
* Each module's weight gradient is taken right after its relu backward, while that gradient is in cache; the
  routing-weight gradients are a few batched matmuls and one gather after the loop.

Gradient bookkeeping. For a routed node ``i``: ``gU_i`` is the gradient on its mixed input ``u_i`` (the masked
views), ``gS_i`` the gradient on its shortcut ``s_i`` when that shortcut mixes the *full* outputs (authors'
code with ResRouting), and the output node has ``gU = dL/dy``. An edge ``j -> i`` with weight ``p`` and mask
``keep`` sends ``p * keep * gU_i + p * gS_i`` to ``o_j`` ("full" gradient ``gF_j``) and ``p * (1 - keep) * gU_i``
to ``rsg(o_j)``, which reaches ``j``'s shortcut but not its own weights. So with ``gT_j = gF_j + grsg_j``:
``grad_pre_j = gF_j * relu'(h_j)``, ``gU_j = grad_pre_j W_j`` and ``gS_j = gT_j`` ("full"), or
``gU_j = grad_pre_j W_j + gT_j`` ("masked", and without ResRouting, where ``s_j = u_j``). Input nodes keep only
``gF_j``: ``rsg(o_1) = sg(o_1)``.

Every tensor carries a leading ensemble dimension ``E`` (1 for the actor, 2 for the twin critics, which are
evaluated together in one batched call). What a network's block keeps between calls (backward strategy, scratch
memory, index tables) lives in that network's :class:`BlockWorkspace`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch as th
from torch.autograd.function import once_differentiable

from d2r_sb3.common.ensemble import ensemble_linear

_SUM = 0  # embedding_bag mode "sum"


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


def _flat_rows(sources: th.Tensor, n_modules: int) -> th.Tensor:
    """Row of each chosen source in the node-major ``[n * E * B, D]`` view of the output buffer.

    :param sources: ``[E, B, n + 1, C]`` module indices.
    :return: ``[n + 1, E * B, C]`` (contiguous), so that ``rows[i]`` lists node ``i``'s sources per sample.
    """
    ens, batch, nodes, slots = sources.shape
    sample = th.arange(ens * batch, device=sources.device).view(ens, batch, 1, 1)
    rows = sources * (ens * batch) + sample
    return rows.permute(2, 0, 1, 3).contiguous().view(nodes, ens * batch, slots)


def _node_major(weights: th.Tensor) -> th.Tensor:
    """``[E, B, n + 1, C] -> [n + 1, E * B, C]`` contiguous (the per-sample weights of each node's bag)."""
    ens, batch, nodes, slots = weights.shape
    return weights.permute(2, 0, 1, 3).contiguous().view(nodes, ens * batch, slots)


def _bag(table: th.Tensor, index: th.Tensor, offsets: th.Tensor, weights: th.Tensor) -> th.Tensor:
    """``out[g] = sum_{m in bag g} weights[m] * table[index[m]]``: one fused gather and weighted sum."""
    return th.embedding_bag(table, index, offsets, False, _SUM, False, weights, False, None)[0]


def _fixed_offsets(n_bags: int, slots: int, device: th.device) -> th.Tensor:
    return th.arange(0, n_bags * slots, slots, device=device)


def run_nodes(
    x0: th.Tensor,
    w_in: th.Tensor,
    b_in: th.Tensor,
    w_hid: th.Tensor,
    b_hid: th.Tensor,
    weights_nm: th.Tensor,
    rows: th.Tensor,
    plan: BlockPlan,
    needed: list[bool] | None = None,
    saved: tuple[list[th.Tensor], list[th.Tensor]] | None = None,
) -> tuple[th.Tensor, th.Tensor]:
    """Forward pass of the routed block (no autograd): ``(y [E, B, D], outputs [n, E, B, D])``.

    :param weights_nm: node-major routing weights ``[n + 1, E * B, C]``.
    :param rows: node-major source rows ``[n + 1, E * B, C]`` (see :func:`_flat_rows`).
    :param needed: compute only the modules marked ``True`` (compute skipping; the others stay 0 and must not
        be read by any node with a non-zero weight).
    :param saved: ``(hidden, inputs)`` lists that receive, by weight slot, each hidden module's ``relu`` output
        ``h_i`` (its mask for the backward pass) and its input ``u_i`` (for the weight gradients).
    """
    ens, batch = x0.shape[:2]
    n = len(plan.is_input)
    dim = w_in.shape[2]
    n_samples = ens * batch
    alloc = x0.new_zeros if needed is not None else x0.new_empty
    outputs = alloc(n, ens, batch, dim)
    flat_outputs = outputs.view(-1, dim)
    offsets = _fixed_offsets(n_samples, rows.shape[-1], x0.device)
    for node in range(n):
        if needed is not None and not needed[node]:
            continue
        k = plan.param_index[node]
        if plan.is_input[node]:
            # Input modules: o = h = relu(M(x0)); the relu mask is recovered from `outputs` in backward.
            th.baddbmm(b_in[:, k].unsqueeze(1), x0, w_in[:, k].transpose(1, 2), out=outputs[node]).relu_()
            continue
        u = _bag(flat_outputs, rows[node].view(-1), offsets, weights_nm[node].view(-1)).view(ens, batch, dim)
        h = ensemble_linear(u, w_hid[:, k], b_hid[:, k]).relu_()
        if saved is not None:
            saved[0].append(h)
            saved[1].append(u)
        th.add(h, u, out=outputs[node])  # residual shortcut: in value s_i == u_i
    y = _bag(flat_outputs, rows[n].view(-1), offsets, weights_nm[n].view(-1)).view(ens, batch, dim)
    return y, outputs


class _PullGraph:
    """The edges of one batch of routes, grouped by source module for the pulling backward pass.

    Built once per backward. Edge ``(source j -> routed node i, slot c)`` of sample ``g = e * B + b`` becomes one
    entry of sample ``g``'s bag(s) in module ``j``'s segment. Entries index rows of the per-node gradient table
    ``[halves, n + 1, E * B, D]``: half 0 is ``A_i = gU_i + gS_i`` (just ``gU_i`` without the "full" shortcut),
    half 1 (only with ResRouting and the "full" shortcut) is ``gS_i``. Each sample has up to two bags:

    * ``gF_j`` (gradient on ``o_j``): ``sum p * (keep ? A_i : gS_i)`` ("full"), ``sum p * keep * gU_i`` ("masked"),
      ``sum p * gU_i`` (no ResRouting);
    * ``gT_j = gF_j + grad on rsg(o_j)`` (gradient on the shortcut): ``sum p * A_i``. Without ResRouting it
      equals ``gF_j`` and is not computed.

    With both, the two bags of a sample are adjacent in one ``embedding_bag`` call: they read (mostly) the same
    table rows, so the second read comes from cache.
    """

    def __init__(self, sources: th.Tensor, weights: th.Tensor, keep: th.Tensor | None, plan: BlockPlan):
        ens, batch, nodes, slots = sources.shape
        n = nodes - 1
        n_samples = ens * batch
        device = sources.device
        routed = plan.routed_nodes
        if len(routed) != nodes:  # input nodes have no edges
            picked = th.tensor(routed, device=device)
            sources, weights = sources.index_select(2, picked), weights.index_select(2, picked)
            keep = keep.index_select(2, picked) if keep is not None else None
        node_ids = th.tensor(routed, device=device).view(1, 1, -1, 1)
        sample = th.arange(n_samples, device=device).view(ens, batch, 1, 1)
        target = sources.expand(ens, batch, len(routed), slots)
        # Edges are enumerated sample-major, so a stable sort by source module alone groups them by (source,
        # sample) and keeps a fixed order inside each bag (deterministic sums). Small integer keys sort fastest.
        key_type = th.uint8 if n <= 256 else th.int32
        _, order = th.sort(target.flatten().to(key_type), stable=True)
        bag_key = (target * n_samples + sample).flatten()[order]
        counts = th.bincount(bag_key, minlength=n * n_samples)
        starts = counts.cumsum(0) - counts  # global start of every (source, sample) bag
        main_row = (node_ids * n_samples + sample).expand_as(target).flatten()[order]
        p = weights.flatten()[order]
        self.two_sided = keep is not None and not plan.masked_shortcut
        self.pairs = 1 if keep is None else 2  # bags per sample
        if keep is None:
            rows, entry_weights = main_row, p
        else:
            kept = keep.flatten()[order]
            if self.two_sided:
                full_rows, full_weights = th.where(kept, main_row, main_row + nodes * n_samples), p
            else:
                full_rows, full_weights = main_row, p * kept
            # Bag F of sample g starts at 2 * start_g, bag T right after it: edge e goes to e + start_g (F)
            # and e + start_g + count_g (T).
            edge = th.arange(bag_key.numel(), device=device)
            at_f = edge + starts[bag_key]
            at_t = at_f + counts[bag_key]
            rows = th.empty(2 * edge.numel(), dtype=main_row.dtype, device=device)
            entry_weights = p.new_empty(2 * edge.numel())
            rows[at_f], rows[at_t] = full_rows, main_row
            entry_weights[at_f], entry_weights[at_t] = full_weights, p
            starts = th.stack([2 * starts, 2 * starts + counts], -1)
        starts = starts.view(n, -1)
        segment = [*starts[:, 0].tolist(), rows.numel()]  # entry range of each source module
        sizes = [hi - lo for lo, hi in zip(segment[:-1], segment[1:], strict=True)]
        self.rows, self.weights = rows.split(sizes), entry_weights.split(sizes)
        self.offsets = (starts - starts[:, :1]).unbind(0)

    def push(self, table: th.Tensor, node: int) -> None:
        """Nothing to do: sources pull their gradient when their turn comes."""

    def pull(self, table: th.Tensor, module: int) -> tuple[th.Tensor, th.Tensor | None]:
        """``(gF_j, gT_j)`` of ``module``, each ``[E * B, D]`` (``gT_j`` is ``None`` without ResRouting)."""
        out = _bag(table, self.rows[module], self.offsets[module], self.weights[module])
        if self.pairs == 1:
            return out, None
        out = out.view(-1, 2, out.shape[-1])
        return out[:, 0], out[:, 1]


class _PushGraph:
    """The sync-free counterpart of :class:`_PullGraph`, used off the CPU (GPUs).

    Pulling slices the edge list by module, which needs the segment bounds on the host (a device sync per
    backward). Here every routed node instead adds its edges' contributions into per-module accumulators with
    ``index_add_`` (atomic adds on a GPU) as soon as its gradient is known: no host sync and static shapes (what
    capturing a training step in a CUDA graph needs). Same values as pulling, up to the order of the sums.
    """

    def __init__(
        self, sources: th.Tensor, weights: th.Tensor, keep: th.Tensor | None, plan: BlockPlan, like: th.Tensor
    ):
        ens, batch, nodes, slots = sources.shape
        n_samples = ens * batch
        self.n_samples, self.slots = n_samples, slots
        self.two_sided = keep is not None and not plan.masked_shortcut
        sample = th.arange(n_samples, device=sources.device).view(ens, batch, 1, 1)
        # Node-major [n + 1, E * B, C]: target row of each edge in the [n * E * B, D] accumulators.
        self.rows = _node_major(sources * n_samples + sample)
        self.weights = _node_major(weights)
        self.keep = _node_major(keep) if keep is not None else None
        n, dim = nodes - 1, like.shape[-1]
        self.grad_full = like.new_zeros(n * n_samples, dim)
        self.grad_total = like.new_zeros(n * n_samples, dim) if keep is not None else None

    def pull(self, table: th.Tensor, module: int) -> tuple[th.Tensor, th.Tensor | None]:
        rows = slice(module * self.n_samples, (module + 1) * self.n_samples)
        return self.grad_full[rows], (self.grad_total[rows] if self.grad_total is not None else None)

    def push(self, table: th.Tensor, node: int) -> None:
        """Send node ``node``'s gradient (its table rows, complete now) to its sources."""
        main = table[0, node].unsqueeze(1)  # [E * B, 1, D]
        p = self.weights[node].unsqueeze(-1)  # [E * B, C, 1]
        rows = self.rows[node].reshape(-1)
        dim = main.shape[-1]
        if self.keep is None:
            self.grad_full.index_add_(0, rows, (p * main).view(-1, dim))
            return
        kept = self.keep[node].unsqueeze(-1)
        if self.two_sided:
            full = p * th.where(kept, main, table[1, node].unsqueeze(1))
        else:
            full = (p * kept) * main
        assert self.grad_total is not None  # (allocated whenever keep is given)
        self.grad_full.index_add_(0, rows, full.view(-1, dim))
        self.grad_total.index_add_(0, rows, (p * main).view(-1, dim))


BACKWARD_STRATEGIES: tuple[str, ...] = ("auto", "pull", "push")


class BlockWorkspace:
    """What one network's routed block keeps between calls besides its parameters, owned by that network.

    * ``backward_strategy``: ``"pull"`` (:class:`_PullGraph`, fastest on a CPU), ``"push"`` (:class:`_PushGraph`,
      no host sync: what GPUs need) or ``"auto"`` (pull on a CPU, push elsewhere). Both give the same gradients
      up to the order of the sums; tests run the push strategy on a CPU through this switch.
    * Scratch memory of the backward pass, reused between calls on a CPU: large CPU allocations (>= 32 MB with
      glibc) are fresh mmaps whose first touch costs more than the work done in them. A buffer is taken out for
      the duration of one backward call, so graphs alive at the same time never share one.
    * Index tables of the routing-weight gradient, built once per device (building them on a GPU would sync).

    Neither the scratch memory nor the tables are pickled or deep-copied: they are rebuilt on first use.
    """

    max_scratch = 4  # buffers kept (one per shape and dtype: actor / critic calls, float32 / bfloat16)

    def __init__(self, plan: BlockPlan, backward_strategy: str = "auto"):
        if backward_strategy not in BACKWARD_STRATEGIES:
            raise ValueError(
                f"Unknown backward_strategy {backward_strategy!r}; choose one of {BACKWARD_STRATEGIES}."
            )
        self.plan = plan
        self.backward_strategy = backward_strategy
        self._scratch: dict[tuple, th.Tensor] = {}
        self._tables: dict[str, tuple[list[tuple[int, int]], th.Tensor, th.Tensor]] = {}

    def __getstate__(self) -> dict:
        return {"plan": self.plan, "backward_strategy": self.backward_strategy}  # caches stay behind

    def __setstate__(self, state: dict) -> None:
        self.plan = state["plan"]
        self.backward_strategy = state["backward_strategy"]
        self._scratch = {}
        self._tables = {}

    def gradient_graph(
        self, sources: th.Tensor, weights: th.Tensor, keep: th.Tensor | None, like: th.Tensor
    ) -> _PullGraph | _PushGraph:
        """The edge bookkeeping of one backward pass, for the chosen strategy."""
        strategy = self.backward_strategy
        if strategy == "auto":
            strategy = "pull" if like.device.type == "cpu" else "push"
        if strategy == "pull":
            return _PullGraph(sources, weights, keep, self.plan)
        if strategy == "push":
            return _PushGraph(sources, weights, keep, self.plan, like)
        raise ValueError(f"Unknown backward_strategy {strategy!r}; choose one of {BACKWARD_STRATEGIES}.")

    def take_scratch(self, shape: tuple[int, ...], like: th.Tensor) -> th.Tensor:
        """An uninitialised ``shape`` buffer like ``like``; give it back with :meth:`give_back_scratch`."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        buffer = self._scratch.pop((shape, like.dtype), None)
        return buffer if buffer is not None else like.new_empty(shape)

    def give_back_scratch(self, buffer: th.Tensor) -> None:
        """Keep ``buffer`` for the next backward pass (the oldest buffers beyond :attr:`max_scratch` are dropped)."""
        if buffer.device.type != "cpu":
            return
        self._scratch[(tuple(buffer.shape), buffer.dtype)] = buffer
        while len(self._scratch) > self.max_scratch:
            self._scratch.pop(next(iter(self._scratch)))

    def weight_gradient_tables(self, device: th.device) -> tuple[list[tuple[int, int]], th.Tensor, th.Tensor]:
        """``(blocks, position, input_rows)`` of :func:`_routing_weight_gradient` on ``device``.

        ``blocks``: module blocks ``[lo, hi)``; ``position``: for every (module j, node i) with ``j < i``, the
        column of their dot product in the concatenated block results (flat ``[n * (n + 1)]``); ``input_rows``:
        ``[n + 1, 1]`` bool, true on input nodes.
        """
        key = str(device)
        if key not in self._tables:
            n = len(self.plan.is_input)
            size = -(-n // 4)
            blocks = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
            position = th.zeros(n, n + 1, dtype=th.long)
            column = 0
            for lo, hi in blocks:
                width = n + 1 - (lo + 1)
                for j in range(lo, hi):
                    position[j, lo + 1 :] = column + (j - lo) * width + th.arange(width)
                column += (hi - lo) * width
            input_rows = th.tensor(self.plan.is_input + (False,)).view(-1, 1)
            self._tables[key] = (blocks, position.flatten().to(device), input_rows.to(device))
        return self._tables[key]


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
    ) -> th.Tensor:
        plan = workspace.plan
        n = len(plan.is_input)
        rows = _flat_rows(sources, n)
        hidden: list[th.Tensor] = []
        inputs: list[th.Tensor] = []
        y, outputs = run_nodes(
            x0, w_in, b_in, w_hid, b_hid, _node_major(weights), rows, plan, saved=(hidden, inputs)
        )
        ctx.save_for_backward(x0, w_in, w_hid, weights, sources, keep, outputs, *hidden, *inputs)
        ctx.workspace = workspace
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: th.Tensor):
        x0, w_in, w_hid, weights, sources, keep, outputs, *saved = ctx.saved_tensors
        n_hid = w_hid.shape[1]
        hidden, inputs = saved[:n_hid], saved[n_hid:]
        workspace: BlockWorkspace = ctx.workspace
        plan = workspace.plan
        need_x0, need_w_in, need_b_in, need_w_hid, need_b_hid, need_p = ctx.needs_input_grad[:6]
        n, ens, batch, dim = outputs.shape
        graph = workspace.gradient_graph(sources, weights, keep, grad_y)
        table = _output_gradient_table(workspace, graph, grad_y, n, ens * batch, dim)
        flat_table = table.view(-1, dim)
        grad_x0 = th.zeros_like(x0) if need_x0 else None
        grad_w_in = th.zeros_like(w_in) if need_w_in else None
        grad_b_in = x0.new_zeros(w_in.shape[:3]) if need_b_in else None
        # Weight gradients by slot first ([n_hid, E, ...]), so each module's is written in place (out=).
        grad_w_hid = x0.new_empty(n_hid, ens, dim, dim) if need_w_hid else None
        grad_b_hid = x0.new_empty(n_hid, ens, dim) if need_b_hid else None

        for node in range(n - 1, -1, -1):
            k = plan.param_index[node]
            grad_full, grad_total = graph.pull(flat_table, node)
            grad_full = grad_full.view(ens, batch, dim)
            if plan.is_input[node]:
                _input_module_backward(grad_full, outputs[node], x0, w_in, k, grad_x0, grad_w_in, grad_b_in)
            else:
                _hidden_module_backward(
                    graph,
                    table,
                    node,
                    grad_full,
                    grad_total,
                    hidden[k],
                    inputs[k],
                    w_hid,
                    k,
                    grad_w_hid,
                    grad_b_hid,
                )

        grad_p = _routing_weight_gradient(outputs, table[0], sources, workspace) if need_p else None
        workspace.give_back_scratch(table)
        if grad_w_hid is not None:
            grad_w_hid = grad_w_hid.transpose(0, 1).contiguous()
        if grad_b_hid is not None:
            grad_b_hid = grad_b_hid.transpose(0, 1).contiguous()
        return grad_x0, grad_w_in, grad_b_in, grad_w_hid, grad_b_hid, grad_p, None, None, None


def _output_gradient_table(
    workspace: BlockWorkspace,
    graph: _PullGraph | _PushGraph,
    grad_y: th.Tensor,
    n: int,
    n_samples: int,
    dim: int,
) -> th.Tensor:
    """The per-node gradient table ``[halves, n + 1, E * B, D]`` of one backward pass, with the output node's
    row filled (``dL/dy``; no shortcut) and pushed to its sources.

    Row ``i`` of the table is written when node ``i`` is processed and read afterwards only by the pulls of its
    (earlier) sources, so it needs no zero fill. Give it back with :meth:`BlockWorkspace.give_back_scratch`.
    """
    table = workspace.take_scratch((2 if graph.two_sided else 1, n + 1, n_samples, dim), grad_y)
    table[0, n].copy_(grad_y.reshape(n_samples, dim))
    if graph.two_sided:
        table[1, n].zero_()  # the output node has no shortcut
    graph.push(table, n)
    return table


def _input_module_backward(
    grad_full: th.Tensor,
    output: th.Tensor,
    x0: th.Tensor,
    w_in: th.Tensor,
    k: int,
    grad_x0: th.Tensor | None,
    grad_w_in: th.Tensor | None,
    grad_b_in: th.Tensor | None,
) -> None:
    """Backward of input module ``k`` (``o = relu(M(x0))``, output ``[E, B, D]``) from its gradient ``gF``
    ``[E, B, D]``: writes its weight and bias gradients and adds its share of ``grad_x0`` (those requested).

    ``rsg(o_1) = sg(o_1)``: the masked edges' gradient stops here. The relu mask comes from ``o = relu(.)``.
    """
    grad_pre = th.ops.aten.threshold_backward(grad_full, output, 0)
    if grad_w_in is not None:
        grad_w_in[:, k] = th.bmm(grad_pre.transpose(1, 2), x0)
    if grad_b_in is not None:
        grad_b_in[:, k] = grad_pre.sum(1)
    if grad_x0 is not None:
        grad_x0.baddbmm_(grad_pre, w_in[:, k])


def _hidden_module_backward(
    graph: _PullGraph | _PushGraph,
    table: th.Tensor,
    node: int,
    grad_full: th.Tensor,
    grad_total: th.Tensor | None,
    hidden: th.Tensor,
    inputs: th.Tensor,
    w_hid: th.Tensor,
    k: int,
    grad_w_hid: th.Tensor | None,
    grad_b_hid: th.Tensor | None,
) -> None:
    """Backward of routed module ``node`` (weight slot ``k``) from ``gF`` ``[E, B, D]`` and ``gT`` (``[E * B, D]``,
    ``None`` without ResRouting): writes its table rows, pushes them to its sources and writes its weight and bias
    gradients (those requested, slot-major).

    :param hidden: the module's saved ``relu`` output ``h`` (its mask); ``inputs``: its saved input ``u``.
    """
    ens, batch, dim = grad_full.shape
    grad_pre = th.ops.aten.threshold_backward(grad_full, hidden, 0)
    if grad_total is None:  # no ResRouting: the shortcut gets gF
        grad_total = grad_full
    else:
        grad_total = grad_total.view(ens, batch, dim)
        if graph.two_sided:
            table[1, node].view(ens, batch, dim).copy_(grad_total)  # gS_node
    # A_node = gU_node + gS_node, with gU = grad_pre W ("full") or grad_pre W + gT (s_i == u_i).
    th.baddbmm(grad_total, grad_pre, w_hid[:, k], out=table[0, node].view(ens, batch, dim))
    graph.push(table, node)
    if grad_w_hid is not None:
        th.bmm(grad_pre.transpose(1, 2), inputs, out=grad_w_hid[k])
    if grad_b_hid is not None:
        th.sum(grad_pre, 1, out=grad_b_hid[k])


def _routing_weight_gradient(
    outputs: th.Tensor, grad_nodes: th.Tensor, sources: th.Tensor, workspace: BlockWorkspace
) -> th.Tensor:
    """``dL/dp[e, b, i, c] = <o_src, A_i>`` for every node and slot (``o``, its masked view and ``rsg(o)`` agree
    in value).

    A few batched matmuls give the (module j, node i > j) dot products of each sample and a gather picks the
    chosen ones: cheaper than gathering each node's sources again (the block is memory-bound). The modules are
    taken in four blocks, each against the nodes after its first module, which skips most pairs with j >= i.
    """
    n, ens, batch, dim = outputs.shape
    n_samples = ens * batch
    slots = sources.shape[-1]
    module_rows = outputs.view(n, n_samples, dim).transpose(0, 1)  # [E * B, n, D]
    node_grads = grad_nodes.view(n + 1, n_samples, dim).permute(1, 2, 0)  # [E * B, D, n + 1]
    blocks, position, input_rows = workspace.weight_gradient_tables(sources.device)
    dots = th.cat(
        [th.bmm(module_rows[:, lo:hi], node_grads[:, :, lo + 1 :]).view(n_samples, -1) for lo, hi in blocks],
        dim=1,
    )
    node_ids = th.arange(n + 1, device=sources.device).view(1, 1, n + 1, 1)
    pick = position[sources * (n + 1) + node_ids].reshape(n_samples, -1)
    grad_p = dots.gather(1, pick).view(ens, batch, n + 1, slots)
    return grad_p.masked_fill_(input_rows, 0)  # input-node rows: no weights, garbage A


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
    :return: ``[E, B, D]`` output-node value.
    """
    sources = sources.expand(weights.shape)
    tensors = (x0, w_in, b_in, w_hid, b_hid, weights)
    if th.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return RoutedBlockFunction.apply(*tensors, sources, keep, workspace)
    # No gradient wanted (targets, acting): nothing to save for a backward pass.
    rows = _flat_rows(sources, len(workspace.plan.is_input))
    return run_nodes(x0, w_in, b_in, w_hid, b_hid, _node_major(weights), rows, workspace.plan)[0]
