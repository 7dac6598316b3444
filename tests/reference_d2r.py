"""A straightforward reference implementation of the D2R network, written from D2R_SPEC.md section 1.

It shares nothing with the optimised code but the parameters: plain autograd, one Python step per module,
dense per-chunk routing weights, and the spec's pseudocode for ResRouting (``o`` / ``o_bar`` lists).
Tests compare the library's values and gradients against it (module-level graph only).
"""

from __future__ import annotations

import torch as th

from d2r_sb3.d2r.network import RoutedNetwork


def reference_forward(
    net: RoutedNetwork,
    member: int,
    state: th.Tensor,
    task_ids: th.Tensor,
    sources: th.Tensor,
    resrouting: bool,
    shortcut: str = "full",
    routing: str = "topk",
) -> th.Tensor:
    """Output ``[B, out_dim]`` of ensemble member ``member`` for explicit routes.

    :param sources: ``[B, n + 1, k]`` chosen source modules per node (as the library picks them; rows with
        fewer candidates than ``k`` use only their first ``min(k, i)`` slots).
    :param routing: ``"topk"`` weighs the chosen sources by the softmax over their logits only (MaskSoftmax);
        ``"hard"`` and ``"soft"`` use the full-softmax probabilities of the chosen sources (with ``"soft"``,
        ``sources`` lists every earlier module).
    """
    n = net.n_modules
    k = sources.shape[-1]
    # State encoder F (no activation after the last layer) and task encoder H on the one-hot.
    f = state
    layers = net.state_encoder.layers
    for idx, layer in enumerate(layers):
        f = f @ layer.weight[member].T + layer.bias[member]
        if idx < len(layers) - 1:
            f = th.relu(f)
    onehot = th.nn.functional.one_hot(task_ids, net.num_tasks).to(state.dtype)
    h = onehot @ net.task_encoder.weight[member].T + net.task_encoder.bias[member]
    z = h * f  # gate input before the ReLU
    gate_layers = net.gate.layers
    for idx, layer in enumerate(gate_layers):
        z = z @ layer.weight[member].T + layer.bias[member]
        if idx < len(gate_layers) - 1:
            z = th.relu(z)
    x0 = th.relu(f)

    o = [th.relu(x0 @ net.w_in[member, 0].T + net.b_in[member, 0])]
    o_bar = [o[0].detach()]  # module 1 has no shortcut: its rsg version is sg(o_1)
    offset = 0
    for node in range(1, n + 1):
        chunk = z[:, offset : offset + node]  # chunk with `node` logits: sources among modules 0..node-1
        offset += node
        used = min(k, node)
        chosen = sources[:, node, :used]
        if routing == "topk":
            probs = th.softmax(chunk.gather(1, chosen), dim=1)  # MaskSoftmax over the chosen sources
        else:
            probs = th.softmax(chunk, dim=1).gather(1, chosen)  # full-softmax share of each chosen source
        p = th.zeros_like(chunk).scatter(1, chosen, probs)
        keep = th.softmax(chunk, dim=1).detach() > 1.0 / (node + 1)
        full = th.stack(o, dim=1)  # [B, node, D]
        rsg = th.stack(o_bar, dim=1)
        if resrouting:
            view = th.where(keep.unsqueeze(-1), full, rsg)
        else:
            view = full
        u = (p.unsqueeze(-1) * view).sum(1)
        if node == n:
            y = u  # output node: no module, no shortcut
            break
        hidden = th.relu(u @ net.w_hid[member, node - 1].T + net.b_hid[member, node - 1])
        s = (p.unsqueeze(-1) * full).sum(1) if shortcut == "full" else u
        o.append(hidden + s)
        o_bar.append(hidden.detach() + s)
    head = net.head
    return y @ head.weight[member].T + head.bias[member]
