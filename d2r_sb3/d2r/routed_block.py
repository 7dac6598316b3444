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
  the products, one pass for the bias, relu and shortcut of each slab); elsewhere the loop is torch operators
  (:mod:`.block_operators`), where ``u_i`` is one ``embedding_bag`` (gather and weighted sum fused, no
  ``[B, k, D]`` intermediate). The backward pass keeps each module's ``relu`` output (its mask) and input (its
  weight gradient).
* Backward on a CPU **pulls** instead of scattering. Module ``j``'s gradient is the weighted sum of the gradients
  of the nodes that read it; every such edge goes from ``j`` to a later node, so when the backward loop reaches
  ``j`` (nodes in reverse order) all of them are known. The edges are sorted by source row once per backward
  (:class:`~d2r_sb3.d2r.block_edges.PullGraph`), and each module's two gradients (see below) are one bag sum
  over a table of per-node gradients: no zero-filled gradient buffers, no scatter, and the ResRouting masks become
  per-edge weights. On a CPU the loop is one compiled call
  (:func:`~d2r_sb3.d2r.compiled_block.block_backward`), where the pulls are compiled passes. Off the CPU, nodes
  **push** with ``index_add_`` instead (:class:`~d2r_sb3.d2r.block_edges.PushGraph`), which needs no host sync.
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

import numpy as np
import torch as th
from torch.autograd.function import once_differentiable

from d2r_sb3.d2r import compiled
from d2r_sb3.d2r.block_edges import PullGraph, PushGraph, routed_rows
from d2r_sb3.d2r.block_operators import (
    backward_by_operators,
    forward_by_operators,
    routing_weight_gradient,
    slot_views,
    start_output_gradient,
)
from d2r_sb3.d2r.compiled_block import block_backward, block_forward, gemm_for
from d2r_sb3.d2r.row_layout import BlockPlan, RowLayout, build_row_layout

__all__ = [
    "BACKWARD_STRATEGIES",
    "BlockPlan",
    "BlockWorkspace",
    "RoutedBlockFunction",
    "SavedActivations",
    "compiled_pass_threads",
    "routed_block",
    "run_nodes",
]


def compiled_pass_threads(like: th.Tensor) -> int:
    """On how many threads the compiled passes that stand in for torch's kernels (:mod:`~d2r_sb3.d2r.compiled`:
    the gradient pull, the gate inputs) run for tensors like ``like``: torch's thread count, where they can use
    all of its threads (a CPU, float32 or float64, :func:`~d2r_sb3.d2r.compiled.loop_threads`); else 0, and
    torch's kernels run (elsewhere the tensors are not on the host; on fewer threads torch's are faster)."""
    if like.device.type != "cpu" or like.dtype not in (th.float32, th.float64):
        return 0
    threads = th.get_num_threads()
    return threads if compiled.loop_threads(threads) == threads else 0


@dataclass
class SavedActivations:
    """What a forward pass keeps for its backward pass: each hidden module's relu output ``h`` and input ``u``. The
    operator loop gives them by weight slot (``[rows, D]`` each, in the lists); the compiled forward writes them
    into two ``[module rows, D]`` buffers, ``rows = (h, u)``, in the modules' own rows (what the compiled backward
    reads; :func:`slot_views` gives the per-slot views of them), and leaves the lists empty."""

    hidden: list[th.Tensor] = field(default_factory=list)
    inputs: list[th.Tensor] = field(default_factory=list)
    rows: tuple[th.Tensor, th.Tensor] | None = None


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
    dim = w_in.shape[2]
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
            layout,
            plan.is_input,
            plan.param_index,
            saved is not None,
            threads,
        )
        if saved is not None and hidden is not None and inputs is not None:
            saved.rows = (hidden, inputs)
        return y.view(ens, layout.batch, dim), outputs
    y, outputs, slot_hidden, slot_inputs = forward_by_operators(
        x0, w_in, b_in, w_hid, b_hid, layout, plan, saved is not None
    )
    if saved is not None:
        saved.hidden, saved.inputs = slot_hidden, slot_inputs
    return y.view(ens, layout.batch, dim), outputs


BACKWARD_STRATEGIES: tuple[str, ...] = ("auto", "pull", "push")


class BlockWorkspace:
    """What one network's routed block keeps between calls besides its parameters, owned by that network.

    * ``backward_strategy``: ``"pull"`` (:class:`PullGraph`, fastest on a CPU), ``"push"`` (:class:`PushGraph`,
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
    ) -> PullGraph | PushGraph:
        """The edge bookkeeping of one backward pass, for the chosen strategy (``routed_index``: the rows of the
        routed nodes, :func:`routed_rows`)."""
        strategy = self.backward_strategy
        if strategy == "auto":
            strategy = "pull" if like.device.type == "cpu" else "push"
        if strategy == "pull":
            return PullGraph(layout, self.plan, routed_index, compiled_pass_threads(like))
        if strategy == "push":
            return PushGraph(layout, self.plan, like)
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
        routed, routed_index = routed_rows(layout, plan, grad_y.device)
        graph = workspace.gradient_graph(layout, routed_index, grad_y)
        most_rows = ens * layout.batch * len(layout.member_sizes)  # every node for every sample
        table = workspace.take_scratch(2 if graph.two_sided else 1, layout.n_rows, grad_y, most_rows)
        grid_rows = (n + 1) * ens * layout.batch
        dots_in_pulls = need_p and graph.takes_routing_dots()
        if dots_in_pulls:
            graph.start_routing_dots(grid_rows, outputs)
        start_output_gradient(table, graph, grad_y, layout.node_rows(n))
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
        if ctx.kept_rows and isinstance(graph, PullGraph) and graph.threads and gemm:
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
                slot_views(saved[0], saved[1], layout, plan)
                if ctx.kept_rows
                else (saved[:n_hid], saved[n_hid:])
            )
            grad_x0 = backward_by_operators(
                graph, table, x0, w_in, w_hid, outputs, hidden, inputs, layout, plan, weight_grads, need_x0
            )
        grad_p = None
        if dots_in_pulls:
            grad_p = graph.routing_dots().view(ens, layout.batch, n + 1, -1).to(ctx.weights_dtype)
        elif need_p:
            grad_p = routing_weight_gradient(outputs, table[0], layout, routed, n).to(ctx.weights_dtype)
        workspace.give_back_scratch(table)
        return grad_x0, grad_w_in, grad_b_in, grad_w_hid, grad_b_hid, grad_p, None, None, None, None


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
