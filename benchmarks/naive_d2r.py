"""A dense, plain-autograd D2R forward pass in the style of the authors' code, as a speed baseline.

Every module is computed, each node mixes *all* earlier module outputs with a dense weight vector (zeros off the
chosen sources), and ResRouting is a ``where(keep, o, o_bar)`` over the stacked outputs, exactly the
routed block of :func:`d2r_sb3.d2r.reference.routed_block` batched over the ensemble. It reuses a
:class:`~d2r_sb3.d2r.network.RoutedNetwork`'s parameters and its routing (gate, sources, weights, masks), so only the
routed block differs from the optimised code.
"""

from __future__ import annotations

import torch as th

from d2r_sb3.d2r.network import RoutedNetwork, RouteRequest


def naive_forward(
    net: RoutedNetwork, state: th.Tensor, task_ids: th.Tensor, route: RouteRequest
) -> th.Tensor:
    """``[E, B, out_dim]`` output of ``net`` computed the dense way (module-level graph with one input node)."""
    x0, logits = net.encode_flat(state, task_ids)
    sources, weights, keep = net.choose_routes(logits, task_ids, route)
    n = net.n_modules
    ens, batch = x0.shape[:2]
    # Dense per-node weights [E, B, n + 1, n]: the chosen sources' weights scattered into zeros.
    dense = x0.new_zeros(ens, batch, n + 1, n).scatter_add(-1, sources, weights)
    dense_keep = None
    if keep is not None:
        dense_keep = th.zeros(ens, batch, n + 1, n, dtype=th.bool).scatter(-1, sources, keep)
    full = [th.relu(th.baddbmm(net.b_in[:, 0].unsqueeze(1), x0, net.w_in[:, 0].transpose(1, 2)))]
    rsg = [full[0].detach()]
    for node in range(1, n + 1):
        stacked = th.stack(full, dim=2)  # [E, B, node, D]
        view = stacked
        if dense_keep is not None:
            view = th.where(dense_keep[:, :, node, :node, None], stacked, th.stack(rsg, dim=2))
        p = dense[:, :, node, :node, None]
        u = (p * view).sum(2)
        if node == n:
            return net.head(u)
        k = node - 1
        hidden = th.relu(th.baddbmm(net.b_hid[:, k].unsqueeze(1), u, net.w_hid[:, k].transpose(1, 2)))
        shortcut = (p * stacked).sum(2)
        full.append(hidden + shortcut)
        rsg.append(hidden.detach() + shortcut)
    raise AssertionError("unreachable")
