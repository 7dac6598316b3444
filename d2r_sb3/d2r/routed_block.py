"""The routed block of D2R as one autograd function with a hand-written backward pass.

Forward (D2R_SPEC.md section 1; ``v_j`` is the *masked view* of module ``j``'s output):

    o_j = relu(M_j(x0))                           for input nodes (module 1)
    v_j = o_j if keep_ij else rsg(o_j)            rsg(o_j) = sg(h_j) + s_j   (Eq. 12)
    u_i = sum_j p_ij * v_j                        module input (Eq. 10, ResRouting)
    s_i = sum_j p_ij * o_j    ("full", authors' code)   or   u_i   ("masked", paper Eq. 11)
    h_i = relu(M_i(u_i)),     o_i = h_i + s_i     residual shortcut
    y   = sum_j p_out,j * v_j                     routed output node: no module, no shortcut

``v_j``, ``o_j`` and ``rsg(o_j)`` are equal in value, so the forward pass is a plain gather-and-matmul chain; the
masks only decide where gradients go. Writing the backward by hand lets every module output live in one
preallocated buffer (no autograd graph per module, no copies of growing stacks), and makes the stop-gradient
bookkeeping explicit: ``grad_full[j]`` collects gradient for ``o_j`` and ``grad_rsg[j]`` for ``rsg(o_j)``, which
reaches the shortcut ``s_j`` but not module ``j``'s own weights.

Every tensor carries a leading ensemble dimension ``E`` (1 for the actor, 2 for the twin critics, which are
evaluated together in one batched call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch as th
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class BlockPlan:
    """Static per-network description: for node ``i < n``, whether it is an input node and its weight slot."""

    is_input: tuple[bool, ...]
    param_index: tuple[int, ...]
    masked_shortcut: bool


def _linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """Ensemble linear layer: ``x [E, B, in]``, ``weight [E, out, in]``, ``bias [E, out]``."""
    return th.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _flat_rows(sources: th.Tensor, n_modules: int) -> th.Tensor:
    """Row index of each chosen source in the ``[E * n * B, D]`` view of the output buffer, per node.

    :param sources: ``[E, B, n + 1, C]`` module indices.
    :return: ``[n + 1, E * B * C]`` so that ``buffer.index_select(0, rows[i])`` gathers node ``i``'s sources.
    """
    ens, batch = sources.shape[:2]
    ens_offset = th.arange(ens, device=sources.device).view(ens, 1, 1, 1) * (n_modules * batch)
    batch_offset = th.arange(batch, device=sources.device).view(1, batch, 1, 1)
    rows = ens_offset + sources * batch + batch_offset
    return rows.permute(2, 0, 1, 3).reshape(sources.shape[2], -1)


def _mix(values: th.Tensor, weights: th.Tensor) -> th.Tensor:
    """``sum_c weights[..., c] * values[..., c, :]`` for ``values [E, B, C, D]``, ``weights [E, B, C]``."""
    if values.shape[2] == 2:  # the default Top-2 case, without a reduction kernel
        return th.addcmul(values[:, :, 0] * weights[:, :, 0, None], values[:, :, 1], weights[:, :, 1, None])
    return (values * weights.unsqueeze(-1)).sum(2)


class RoutedBlockFunction(th.autograd.Function):
    """Autograd function for the routed modules and the output node. See the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x0: th.Tensor,
        w_in: th.Tensor,
        b_in: th.Tensor,
        w_hid: th.Tensor,
        b_hid: th.Tensor,
        weights: th.Tensor,
        sources: th.Tensor,
        keep: th.Tensor | None,
        plan: BlockPlan,
    ) -> th.Tensor:
        ens, batch = x0.shape[:2]
        n = len(plan.is_input)
        dim = w_in.shape[2]
        rows = _flat_rows(sources, n)
        outputs = x0.new_empty(ens, n, batch, dim)
        flat_outputs = outputs.view(-1, dim)
        hidden = x0.new_empty(ens, n, batch, dim)  # relu(M_i(u_i)), for the relu mask in backward
        inputs = x0.new_empty(ens, n, batch, dim)  # u_i, for the weight gradients in backward
        n_slots = weights.shape[-1]
        for node in range(n):
            k = plan.param_index[node]
            if plan.is_input[node]:
                h = th.relu(_linear(x0, w_in[:, k], b_in[:, k]))
                hidden[:, node] = h
                outputs[:, node] = h
                continue
            gathered = flat_outputs.index_select(0, rows[node]).view(ens, batch, n_slots, dim)
            u = _mix(gathered, weights[:, :, node])
            h = th.relu(_linear(u, w_hid[:, k], b_hid[:, k]))
            inputs[:, node] = u
            hidden[:, node] = h
            th.add(h, u, out=outputs[:, node])  # residual shortcut: in value s_i == u_i
        gathered = flat_outputs.index_select(0, rows[n]).view(ens, batch, n_slots, dim)
        y = _mix(gathered, weights[:, :, n])
        ctx.save_for_backward(x0, w_in, w_hid, weights, rows, keep, outputs, hidden, inputs)
        ctx.plan = plan
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: th.Tensor):  # type: ignore[override]
        x0, w_in, w_hid, weights, rows, keep, outputs, hidden, inputs = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        need_x0, need_w_in, need_b_in, need_w_hid, need_b_hid, need_p = ctx.needs_input_grad[:6]
        ens, n, batch, dim = outputs.shape
        n_slots = weights.shape[-1]
        flat_outputs = outputs.view(-1, dim)
        grad_full = th.zeros_like(outputs)  # dL/do_j
        grad_rsg = th.zeros_like(outputs) if keep is not None else None  # dL/d rsg(o_j)
        flat_full = grad_full.view(-1, dim)
        flat_rsg = grad_rsg.view(-1, dim) if grad_rsg is not None else None
        grad_p = th.zeros_like(weights) if need_p else None
        grad_x0 = th.zeros_like(x0) if need_x0 else None
        grad_w_in = th.zeros_like(w_in) if need_w_in else None
        grad_b_in = x0.new_zeros(w_in.shape[:3]) if need_b_in else None
        grad_w_hid = th.zeros_like(w_hid) if need_w_hid else None
        grad_b_hid = x0.new_zeros(w_hid.shape[:3]) if need_b_hid else None

        def route_back(node: int, grad_view: th.Tensor, grad_shortcut: th.Tensor | None) -> None:
            """Send gradient from node ``node`` to its sources.

            ``grad_view`` flows through the masked views ``v_j`` (module input, or the output node);
            ``grad_shortcut`` through the full outputs ``o_j`` (the authors' shortcut), or ``None``.
            """
            p = weights[:, :, node].unsqueeze(-1)  # [E, B, C, 1]
            if need_p:
                total = grad_view if grad_shortcut is None else grad_view + grad_shortcut
                gathered = flat_outputs.index_select(0, rows[node]).view(ens, batch, n_slots, dim)
                grad_p[:, :, node] = (gathered * total.unsqueeze(2)).sum(-1)
            view_part = p * grad_view.unsqueeze(2)
            if keep is None:
                to_full = view_part
            else:
                kept = keep[:, :, node].unsqueeze(-1)
                to_full = view_part * kept
                flat_rsg.index_put_((rows[node],), (view_part - to_full).view(-1, dim), accumulate=True)
            if grad_shortcut is not None:
                to_full = to_full + p * grad_shortcut.unsqueeze(2)
            # index_put_ with accumulate is far faster than index_add_ on CPU (which adds row by row).
            flat_full.index_put_((rows[node],), to_full.reshape(-1, dim), accumulate=True)

        route_back(n, grad_y, None)
        for node in range(n - 1, -1, -1):
            k = plan.param_index[node]
            grad_pre = grad_full[:, node] * (hidden[:, node] > 0)  # through relu(M_i(.))
            if plan.is_input[node]:
                # rsg(o_1) = sg(o_1): gradient through the rsg view stops here.
                if need_w_in:
                    grad_w_in[:, k] = th.bmm(grad_pre.transpose(1, 2), x0)
                if need_b_in:
                    grad_b_in[:, k] = grad_pre.sum(1)
                if need_x0:
                    grad_x0.baddbmm_(grad_pre, w_in[:, k])
                continue
            if need_w_hid:
                grad_w_hid[:, k] = th.bmm(grad_pre.transpose(1, 2), inputs[:, node])
            if need_b_hid:
                grad_b_hid[:, k] = grad_pre.sum(1)
            grad_input = th.bmm(grad_pre, w_hid[:, k])
            # o_i = h_i + s_i and rsg(o_i) = sg(h_i) + s_i: the shortcut receives both gradients.
            grad_s = grad_full[:, node] if grad_rsg is None else grad_full[:, node] + grad_rsg[:, node]
            if plan.masked_shortcut or keep is None:
                route_back(node, grad_input + grad_s, None)  # s_i == u_i (or no masks at all)
            else:
                route_back(node, grad_input, grad_s)
        return grad_x0, grad_w_in, grad_b_in, grad_w_hid, grad_b_hid, grad_p, None, None, None


def routed_block(
    x0: th.Tensor,
    w_in: th.Tensor,
    b_in: th.Tensor,
    w_hid: th.Tensor,
    b_hid: th.Tensor,
    weights: th.Tensor,
    sources: th.Tensor,
    keep: th.Tensor | None,
    plan: BlockPlan,
) -> th.Tensor:
    """Run the routed modules and the output node.

    :param x0: ``[E, B, Din]`` module-path input (``relu`` of the state encoding).
    :param w_in: ``[E, n_in, D, Din]`` weights of the input modules; ``b_in``: ``[E, n_in, D]``.
    :param w_hid: ``[E, n_hid, D, D]`` weights of the other modules; ``b_hid``: ``[E, n_hid, D]``.
    :param weights: ``[E, B, n + 1, C]`` routing weights of the chosen sources (differentiable).
    :param sources: ``[E, B, n + 1, C]`` module indices of the chosen sources.
    :param keep: ``[E, B, n + 1, C]`` ResRouting mask, or ``None`` when ResRouting is off.
    :return: ``[E, B, D]`` output-node value.
    """
    return RoutedBlockFunction.apply(x0, w_in, b_in, w_hid, b_hid, weights, sources.contiguous(), keep, plan)
