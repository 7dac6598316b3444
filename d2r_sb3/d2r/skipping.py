"""Compute skipping: an inference forward of a :class:`~d2r_sb3.d2r.network.RoutedNetwork` that computes only the
modules some chosen path reaches backward from the output node (paper, "Dynamic Depth Routing": a module that no
later node selects is skipped).

The gate does not depend on module outputs, so the route, and with it the set of modules in use, is known before
any module runs. For batch-1 control a route reaches about 4 to 8 of 16 modules. The sources are those of the
dense :meth:`RoutedNetwork.forward <d2r_sb3.d2r.network.RoutedNetwork.forward>` and the outputs too, up to
rounding. (The authors' code always computes every module; skipping is ours.)

Built for small batches, where per-operation overhead dominates: reachability is a set walk over the route as
Python ints, and a single observation routed with TopK is handled in plain Python and 2-D ops (its TopK and
MaskSoftmax over a dozen small rows cost less as Python floats than as a dozen small tensor operations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch as th
from torch.nn import functional as F

from d2r_sb3.common.ensemble import EnsembleLinear
from d2r_sb3.d2r.network import RoutedNetwork, RouteRequest
from d2r_sb3.d2r.routed_block import run_nodes
from d2r_sb3.d2r.routing import RoutingGraph
from d2r_sb3.d2r.row_layout import build_row_layout


@th.no_grad()
def forward_skipping(
    net: RoutedNetwork, state: th.Tensor, task_ids: th.Tensor, route: RouteRequest
) -> tuple[th.Tensor, th.Tensor, int]:
    """``net``'s output for these inputs with only the reachable modules computed.

    :param state: ``[B, state_dim]`` or ``[E, B, state_dim]``.
    :param task_ids: ``[B]`` task indices.
    :param route: how to route (SampleK, TopK or stored routes).
    :return: ``(out [E, B, out_dim], sources [E, B, n + 1, slots], number of modules computed)``.
    """
    graph = net.graph
    if net.n_nets == 1 and state.shape[-2] == 1:
        x0, logits = _encode_one(net, state, task_ids)
        if graph.routing == "topk" and not route.explore and route.stored is None:
            top_routes, top_weights = top_k_one(graph, logits.view(-1).tolist())
            needed = reachable_modules(graph, [[top_routes]])
            y = _mix_needed_modules(net, x0[0], top_routes, top_weights, needed)
            out = F.linear(y, net.head.weight[0], net.head.bias[0]).unsqueeze(0)
            flat = [source for node in top_routes for source in node]
            sources = th.tensor(flat, device=x0.device).view(1, 1, net.n_modules + 1, -1)
            return out, sources, len(needed)
    else:
        x0, logits = net.encode_flat(state, task_ids)
    sources, weights, _ = net.choose_routes(logits, task_ids, route)
    sources = sources.expand(weights.shape)
    route_list = sources.tolist()  # [E][B][n + 1][k]
    needed = reachable_modules(graph, route_list)
    if x0.shape[0] * x0.shape[1] == 1:
        y = _mix_needed_modules(net, x0[0], route_list[0][0], weights[0, 0].tolist(), needed)
        out = F.linear(y, net.head.weight[0], net.head.bias[0])
        return out.unsqueeze(0), sources, len(needed)
    # Each module runs on the samples whose route reaches it.
    layout = build_row_layout(sources, weights, None, net.plan.is_input, skip=True, compute_dtype=x0.dtype)
    y, _ = run_nodes(x0, net.w_in, net.b_in, net.w_hid, net.b_hid, layout, net.plan)
    return net.head(y), sources, len(needed)


def _encode_one(net: RoutedNetwork, state: th.Tensor, task_ids: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """:meth:`RoutedNetwork.encode_flat` for one observation and one network, with plain 2-D ops (fewer,
    cheaper calls): ``(x0 [1, 1, embed], flat gate logits [1, 1, L])``."""
    f_pre = state.reshape(1, -1)
    # (an EnsembleMLP's ModuleList holds EnsembleLinear layers)
    layers = cast("Sequence[EnsembleLinear]", net.state_encoder.layers)
    for i, layer in enumerate(layers):
        f_pre = F.linear(f_pre, layer.weight[0], layer.bias[0])
        if i < len(layers) - 1:
            f_pre = f_pre.relu_()
    task = task_ids.reshape(-1)
    gate_input = (net.task_encoder.weight[0].index_select(1, task).t() + net.task_encoder.bias[0]) * f_pre
    layers = cast("Sequence[EnsembleLinear]", net.gate.layers)
    for i, layer in enumerate(layers):
        gate_input = F.linear(gate_input, layer.weight[0], layer.bias[0])
        if i < len(layers) - 1:
            gate_input = gate_input.relu_()
    return th.relu(f_pre).unsqueeze(0), gate_input.unsqueeze(0)


def top_k_one(graph: RoutingGraph, logits: list[float]) -> tuple[list[list[int]], list[list[float]]]:
    """TopK sources (Eq. 6) and MaskSoftmax weights (Eq. 5) of one observation from its flat gate logits.

    The same choice as :meth:`RoutingGraph.select <d2r_sb3.d2r.routing.RoutingGraph.select>` (the first of tied
    maxima wins); unused slots hold module 0 with weight 0.

    :return: ``(sources [n + 1][k], weights [n + 1][k])`` as nested lists.
    """
    k = graph.slots
    route, weights = [], []
    for modules, positions in graph.candidate_lists:
        if k == 2 and len(positions) >= 2:
            # One pass keeping the best two (strict '>' keeps the first of tied values, like max()).
            first = second = -1
            best = runner = -math.inf
            for i, p in enumerate(positions):
                value = logits[p]
                if value > best:
                    second, runner, first, best = first, best, i, value
                elif second < 0 or value > runner:
                    second, runner = i, value
            order = [first, second]
        else:
            values = [logits[p] for p in positions]
            order = []
            for _ in range(min(k, len(values))):
                order.append(max((i for i in range(len(values)) if i not in order), key=values.__getitem__))
        chosen = [logits[positions[i]] for i in order]
        top = max(chosen, default=0.0)
        exps = [math.exp(v - top) for v in chosen]
        total = sum(exps)
        padding = k - len(order)
        route.append([modules[i] for i in order] + [0] * padding)
        weights.append([e / total for e in exps] + [0.0] * padding)
    return route, weights


def reachable_modules(graph: RoutingGraph, route_list: list) -> set[int]:
    """Modules reachable backward from the output node along the chosen edges, union over ``route_list[E][B]``
    (each entry ``[n + 1][k]`` source indices)."""
    n = graph.n_modules
    slots_used = graph.slots_used
    needed: set[int] = set()
    for member in route_list:
        for sample in member:  # each sample has its own route: walk it with its own visited set
            reached: set[int] = set()
            stack = [n]
            while stack:
                node = stack.pop()
                for source in sample[node][: slots_used[node]]:
                    if source not in reached:
                        reached.add(source)
                        stack.append(source)
            needed |= reached
    return needed


def _mix_needed_modules(
    net: RoutedNetwork, x0: th.Tensor, route: list, weights: list, needed: set[int]
) -> th.Tensor:
    """Routed block for one observation (``x0 [1, Din]``): only ``needed`` modules, sources by index.

    Returns the output node's value ``[1, D]`` (before the head).
    """
    plan = net.plan
    outputs: list[th.Tensor | None] = [None] * net.n_modules
    slots_used = net.graph.slots_used

    def mix(node: int) -> th.Tensor:
        used = slots_used[node]
        sources, coefficients = route[node][:used], weights[node][:used]
        mixed = outputs[sources[0]] * coefficients[0]
        for source, coefficient in zip(sources[1:], coefficients[1:], strict=True):
            mixed = mixed.add_(outputs[source], alpha=coefficient)
        return mixed

    w_in, b_in, w_hid, b_hid = net.w_in[0], net.b_in[0], net.w_hid[0], net.b_hid[0]
    for node in sorted(needed):
        k = plan.param_index[node]
        if plan.is_input[node]:
            outputs[node] = F.linear(x0, w_in[k], b_in[k]).relu_()
        else:
            u = mix(node)
            outputs[node] = F.linear(u, w_hid[k], b_hid[k]).relu_().add_(u)  # residual shortcut
    return mix(net.n_modules)
