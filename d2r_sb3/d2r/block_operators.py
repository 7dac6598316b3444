"""The routed block's loops over the nodes as torch operators.

The same computation as the compiled loops of :mod:`~d2r_sb3.d2r.compiled_block` (the algorithm is in
:mod:`~d2r_sb3.d2r.routed_block`), node by node, for where those do not apply: off the CPU (GPUs), and on a CPU
with a dtype other than float32 / float64 or a torch without exported BLAS. Each module's input is one
``embedding_bag`` (gather and weighted sum fused, no ``[B, k, D]`` intermediate), its product one batched product
where the members' slabs are equal, else one product per member.
"""

from __future__ import annotations

from itertools import accumulate

import torch as th

from d2r_sb3.d2r.block_edges import BAG_SUM, PullGraph, PushGraph, bag
from d2r_sb3.d2r.row_layout import BlockPlan, RowLayout

__all__ = [
    "backward_by_operators",
    "forward_by_operators",
    "routing_weight_gradient",
    "slot_views",
    "start_output_gradient",
]

# Device types whose per-sample-weights gradient of embedding_bag has no kernel for these dtypes (CUDA has none
# for bfloat16 in torch 2.11): the routing weights' gradient takes float32 copies of its operands there.
_NO_PER_SAMPLE_DOTS: dict[str, tuple[th.dtype, ...]] = {"cuda": (th.bfloat16,)}


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


def _input_rows(x0: th.Tensor, layout: RowLayout, node: int) -> th.Tensor:
    """``x0`` of the samples of input ``node``'s rows, ``[rows, Din]``."""
    flat = x0.reshape(-1, x0.shape[-1])
    if layout.complete[node]:
        return flat
    return flat.index_select(0, layout.sample_of_row[layout.node_rows(node)])


def slot_views(
    hidden: th.Tensor, inputs: th.Tensor, layout: RowLayout, plan: BlockPlan
) -> tuple[list[th.Tensor], list[th.Tensor]]:
    """Each hidden module's rows of the ``[module rows, D]`` buffers ``hidden`` and ``inputs``, by weight slot."""
    sizes = layout.block_sizes()[: len(plan.is_input)]
    node_hidden, node_inputs = hidden.split(sizes), inputs.split(sizes)
    hidden_nodes = plan.routed_nodes[:-1]  # in order: their weight slots
    return [node_hidden[node] for node in hidden_nodes], [node_inputs[node] for node in hidden_nodes]


def forward_by_operators(
    x0: th.Tensor,
    w_in: th.Tensor,
    b_in: th.Tensor,
    w_hid: th.Tensor,
    b_hid: th.Tensor,
    layout: RowLayout,
    plan: BlockPlan,
    save: bool,
) -> tuple[th.Tensor, th.Tensor, list[th.Tensor], list[th.Tensor]]:
    """The routed block's forward loop as torch operators (the arguments of
    :func:`~d2r_sb3.d2r.routed_block.run_nodes`): ``(y [E * B, D], outputs [module rows, D], hidden, inputs)``,
    where ``hidden`` and ``inputs`` hold each hidden module's relu output ``h`` and input ``u`` by weight slot
    (empty unless ``save``)."""
    ens = layout.ens
    n = len(plan.is_input)
    dim = w_in.shape[2]
    block_sizes = layout.block_sizes()
    hidden: list[th.Tensor] = []
    inputs: list[th.Tensor] = []
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
            if save:
                hidden.append(outputs.new_empty(0, dim))
                inputs.append(outputs.new_empty(0, dim))
            continue
        u = bag(outputs, entry_rows[node], offsets[:size], entry_weights[node])
        if not save:  # nothing kept for a backward pass: h is computed in place in the output rows
            _member_products(u, w_hid_t[k], members, bias=b_hid_k[k], out=blocks[node]).relu_().add_(u)
            continue
        h = _member_products(u, w_hid_t[k], members, bias=b_hid_k[k]).relu_()
        hidden.append(h)
        inputs.append(u)
        th.add(h, u, out=blocks[node])  # residual shortcut: in value s_i == u_i
    y = bag(outputs, entry_rows[n], offsets[: ens * layout.batch], entry_weights[n])
    return y, outputs, hidden, inputs


def backward_by_operators(
    graph: PullGraph | PushGraph,
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


def start_output_gradient(
    table: th.Tensor, graph: PullGraph | PushGraph, grad_y: th.Tensor, output_rows: slice
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
    its gradient before the relu ``[rows, D]`` (:meth:`~d2r_sb3.d2r.block_edges.EdgeGraph.pull_input`): writes its
    weight and bias gradients (``[E, D, Din]`` and ``[E, D]``) and adds its share of ``dL/dx0`` (those requested).

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
    ``[rows, D]``, :meth:`~d2r_sb3.d2r.block_edges.EdgeGraph.pull_hidden`): writes its table rows ``A``
    (``node_grad``) and its weight and bias gradients (those requested).

    :param members: the module's rows of each ensemble member (``weight [E, D, D]`` is applied member by member).
    :param inputs: the module's saved input ``u``.
    :param trained: the rows of each member's slab that train the weights
        (:meth:`~d2r_sb3.d2r.row_layout.RowLayout.trained`).
    """
    # A = gU + gS, with gU = grad_pre W ("full") or grad_pre W + gT (s_i == u_i).
    _member_products(grad_pre, weight, members, add=grad_total, out=node_grad)
    _member_weight_gradients(grad_pre, inputs, members, grad_weight, grad_bias, trained)


def routing_weight_gradient(
    outputs: th.Tensor, grad_rows: th.Tensor, layout: RowLayout, routed: slice | th.Tensor, n: int
) -> th.Tensor:
    """``dL/dp[e, b, i, c] = <o_src, A_i>`` for every node and slot (``o``, its masked view and ``rsg(o)`` agree
    in value), ``[E, B, n + 1, C]``; 0 for input nodes and for nodes a sample does not reach.

    The dot products are those of the ``per_sample_weights`` gradient of the forward pass's bags (``u_i = sum_c
    p_c o_src``) with ``A_i`` in place of ``dL/du_i``: one fused gather-and-dot, nothing materialised. (The
    compiled pulls take them on their way instead: :meth:`~d2r_sb3.d2r.block_edges.EdgeGraph.start_routing_dots`.)
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
        grads, outputs, source_rows, entry[::slots], entry // slots, BAG_SUM, -1
    ).view(-1, slots)
    if upcast:
        dots = dots.to(dtype)
    grid = dots.new_zeros(grid_rows + 1, slots)  # the last row takes the padding rows
    grid.index_copy_(0, layout.grid_of_row[routed], dots)
    return grid[:grid_rows].view(layout.ens, layout.batch, n + 1, slots)
