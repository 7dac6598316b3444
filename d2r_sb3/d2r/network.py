"""The D2R network (D2R_SPEC.md section 1), shared by the actor and the critics.

``x = [state part, task one-hot]``  (the critic's state part is ``[s, a]``)

* state encoder **F**: ``Linear -> ReLU -> Linear`` (no final activation), giving ``f_pre``;
* task encoder **H**: one ``Linear(T -> 400)`` of the one-hot, i.e. a learned vector per task;
* gate input ``g = H(onehot) * f_pre`` (before the ReLU), module-path input ``x0 = relu(f_pre)``;
* gate **G**: one shared MLP producing every gate logit ``z`` (136 for 16 modules);
* routed block: modules with residual shortcuts and the routed output node (:mod:`.routed_block`);
* head: ``Linear(module_dim -> out)``.

All parameters carry a leading ensemble dimension, so ``n_nets=2`` evaluates the twin critics in one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch as th
from torch import nn

from d2r_sb3.d2r.routed_block import BlockPlan, _flat_rows, _linear, _mix, routed_block
from d2r_sb3.d2r.routing import RoutingGraph, RoutingPath

SHORTCUT_MODES: tuple[str, ...] = ("full", "masked")


@dataclass
class RouteRequest:
    """How a forward pass routes.

    :param explore: SampleK (``True``) or TopK (``False``) when no stored route is given.
    :param stored: stored routes ``uint8 [E or 1, B, routed nodes, slots]`` (see :meth:`RoutingGraph.encode`),
        or ``None`` to pick routes now.
    :param resrouting: apply the ResRouting masks (only changes gradients).
    """

    explore: bool = False
    stored: th.Tensor | None = None
    resrouting: bool = False


TOPK = RouteRequest()


def _uniform_(tensor: th.Tensor, bound: float) -> None:
    with th.no_grad():
        tensor.uniform_(-bound, bound)


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied as one batched matmul (``x [E, B, in] -> [E, B, out]``)."""

    def __init__(self, n_nets: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(th.empty(n_nets, out_features, in_features))
        self.bias = nn.Parameter(th.empty(n_nets, out_features))
        self.basic_init_()

    def basic_init_(self) -> None:
        # The authors' init (spec section 1): U(-b, b) with b = 1/sqrt(out_features) and bias 0.1.
        _uniform_(self.weight, 1.0 / math.sqrt(self.weight.shape[1]))
        nn.init.constant_(self.bias, 0.1)

    def forward(self, x: th.Tensor, detach: bool = False) -> th.Tensor:
        weight, bias = (self.weight.detach(), self.bias.detach()) if detach else (self.weight, self.bias)
        return _linear(x, weight, bias)


class EnsembleMLP(nn.Module):
    """Stack of :class:`EnsembleLinear` with ReLU between layers (and after the last if ``final_relu``)."""

    def __init__(self, n_nets: int, sizes: Sequence[int], final_relu: bool):
        super().__init__()
        self.layers = nn.ModuleList(EnsembleLinear(n_nets, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.final_relu = final_relu

    def forward(self, x: th.Tensor, detach: bool = False) -> th.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, detach)
            if i < len(self.layers) - 1 or self.final_relu:
                x = th.relu(x)
        return x


class RoutedNetwork(nn.Module):
    """D2R network: encoders, gate, routed modules and head, for ``n_nets`` independent copies.

    :param state_dim: size of the state part of the input (39 for the actor, 43 for the critic).
    :param num_tasks: number of tasks ``T`` (size of the one-hot).
    :param out_dim: head output size (``2 * action_dim`` for the actor, 1 for a critic).
    :param n_nets: ensemble size (1 actor, 2 twin critics).
    :param n_modules: routed modules ``n`` (16).
    :param module_dim: module width (128).
    :param top_k: sources per node for Top-K routing (2).
    :param routing: ``"topk"``, ``"hard"`` (top-1) or ``"soft"`` (every earlier module).
    :param routing_level: ``"module"`` (D2R), ``"layer"`` or ``"model"`` (paper Fig. 7(d)).
    :param n_layers: layers (``"layer"``) or chain length (``"model"``).
    :param encoder_sizes: hidden sizes of the state encoder F (``[400, 400]``).
    :param gate_sizes: hidden sizes of the gate MLP G (``[256, 256]``).
    :param resrouting_shortcut: ``"full"`` (authors' code: the shortcut passes full gradient) or ``"masked"``
        (paper Eq. 11: the shortcut uses the masked outputs too).
    """

    def __init__(
        self,
        state_dim: int,
        num_tasks: int,
        out_dim: int,
        n_nets: int = 1,
        n_modules: int = 16,
        module_dim: int = 128,
        top_k: int = 2,
        routing: str = "topk",
        routing_level: str = "module",
        n_layers: int = 4,
        encoder_sizes: Sequence[int] = (400, 400),
        gate_sizes: Sequence[int] = (256, 256),
        resrouting_shortcut: str = "full",
    ):
        super().__init__()
        if resrouting_shortcut not in SHORTCUT_MODES:
            raise ValueError(f"Unknown resrouting_shortcut {resrouting_shortcut!r}; choose one of {SHORTCUT_MODES}.")
        if len(encoder_sizes) < 1:
            raise ValueError("encoder_sizes needs at least one layer size")
        self.num_tasks = num_tasks
        self.n_nets = n_nets
        self.n_modules = n_modules
        self.module_dim = module_dim
        self.graph = RoutingGraph(n_modules, top_k, routing, routing_level, n_layers)
        embed_dim = encoder_sizes[-1]
        self.state_encoder = EnsembleMLP(n_nets, [state_dim, *encoder_sizes], final_relu=False)
        self.task_encoder = EnsembleLinear(n_nets, num_tasks, embed_dim)
        self.gate = EnsembleMLP(n_nets, [embed_dim, *gate_sizes, self.graph.num_logits], final_relu=False)
        n_in = len(self.graph.input_nodes)
        n_hid = n_modules - n_in
        self.w_in = nn.Parameter(th.empty(n_nets, n_in, module_dim, embed_dim))
        self.b_in = nn.Parameter(th.full((n_nets, n_in, module_dim), 0.1))
        self.w_hid = nn.Parameter(th.empty(n_nets, n_hid, module_dim, module_dim))
        self.b_hid = nn.Parameter(th.full((n_nets, n_hid, module_dim), 0.1))
        _uniform_(self.w_in, 1.0 / math.sqrt(module_dim))
        _uniform_(self.w_hid, 1.0 / math.sqrt(module_dim))
        self.head = EnsembleLinear(n_nets, module_dim, out_dim)
        _uniform_(self.head.weight, 3e-3)  # the authors' uniform_init for the last layer
        _uniform_(self.head.bias, 3e-3)
        # Per-task routing temperature tau (route balancing, spec section 2.3). A buffer, not a parameter:
        # it never has a gradient, and it is overwritten after every update.
        self.register_buffer("route_temperature", th.ones(num_tasks))
        counters = {True: 0, False: 0}
        param_index = []
        for node in range(n_modules):
            is_input = node in self.graph.input_nodes
            param_index.append(counters[is_input])
            counters[is_input] += 1
        self.plan = BlockPlan(
            is_input=tuple(node in self.graph.input_nodes for node in range(n_modules)),
            param_index=tuple(param_index),
            masked_shortcut=resrouting_shortcut == "masked",
        )

    # ----------------------------------------------------------------------------------------------------
    def encode(self, state: th.Tensor, task_ids: th.Tensor, detach: bool = False) -> tuple[th.Tensor, th.Tensor]:
        """State and task encodings: ``(x0 [E, B, embed], padded gate logits [E, B, n + 1, n])``."""
        ens = self.n_nets
        if state.dim() == 2:
            state = state.unsqueeze(0).expand(ens, -1, -1)
        f_pre = self.state_encoder(state, detach)
        task_w = self.task_encoder.weight.detach() if detach else self.task_encoder.weight
        task_b = self.task_encoder.bias.detach() if detach else self.task_encoder.bias
        # H(onehot) = W[:, task] + b: a lookup instead of a matmul with a one-hot.
        task_embedding = task_w.transpose(1, 2)[:, task_ids] + task_b.unsqueeze(1)
        gate_logits = self.gate(task_embedding * f_pre, detach)  # gate input is taken before the ReLU
        return th.relu(f_pre), self.graph.padded_logits(gate_logits)

    def choose_sources(self, padded: th.Tensor, task_ids: th.Tensor, route: RouteRequest) -> th.Tensor:
        """Module indices ``[E, B, n + 1, slots]`` of the chosen sources for this request."""
        if route.stored is not None:
            return self.graph.decode(route.stored).expand(self.n_nets, -1, -1, -1)
        temperature = self.route_temperature[task_ids] if route.explore else None
        return self.graph.select(padded, temperature, route.explore)

    def forward(
        self,
        state: th.Tensor,
        task_ids: th.Tensor,
        route: RouteRequest = TOPK,
        detach_params: bool = False,
    ) -> tuple[th.Tensor, th.Tensor]:
        """Run the network.

        :param state: ``[B, state_dim]`` (shared by the ensemble) or ``[E, B, state_dim]``.
        :param task_ids: ``[B]`` long task indices.
        :param route: how to route (TopK by default).
        :param detach_params: use detached parameters, so gradients reach the inputs only (the Q value in
            the actor loss, which must not train the critic).
        :return: ``(out [E, B, out_dim], sources [E, B, n + 1, slots])``.
        """
        x0, padded = self.encode(state, task_ids, detach_params)
        sources = self.choose_sources(padded, task_ids, route)
        weights = self.graph.weights(padded, sources)
        keep = self.graph.keep_mask(padded, sources) if route.resrouting else None
        params = (self.w_in, self.b_in, self.w_hid, self.b_hid)
        if detach_params:
            params = tuple(p.detach() for p in params)
        y = routed_block(x0, *params, weights, sources, keep, self.plan)
        return self.head(y, detach_params), sources

    # ----------------------------------------------------------------------------------------------------
    @th.no_grad()
    def forward_skipping(self, state: th.Tensor, task_ids: th.Tensor, route: RouteRequest = TOPK):
        """Inference forward that computes only the modules some chosen path reaches from the output.

        The gate does not depend on module outputs, so the route (and hence the set of active modules) is
        known before any module runs. For batch-1 control a route reaches ~5-8 of 16 modules. Values equal
        :meth:`forward`'s. Returns ``(out, sources, number of modules computed)``.
        """
        x0, padded = self.encode(state, task_ids)
        sources = self.choose_sources(padded, task_ids, route)
        weights = self.graph.weights(padded, sources)
        path = self.graph.path(padded, sources)
        needed = path.active.flatten(0, -2).any(0).tolist()  # union over ensemble and batch
        ens, batch = x0.shape[:2]
        n_slots = sources.shape[-1]
        rows = _flat_rows(sources, self.n_modules)
        outputs = x0.new_zeros(ens, self.n_modules, batch, self.module_dim)  # unreached modules stay 0
        flat_outputs = outputs.view(-1, self.module_dim)

        def mix_sources(node: int) -> th.Tensor:
            gathered = flat_outputs.index_select(0, rows[node]).view(ens, batch, n_slots, self.module_dim)
            return _mix(gathered, weights[:, :, node])

        for node in range(self.n_modules):
            if not needed[node]:
                continue
            k = self.plan.param_index[node]
            if self.plan.is_input[node]:
                outputs[:, node] = th.relu(_linear(x0, self.w_in[:, k], self.b_in[:, k]))
            else:
                u = mix_sources(node)
                outputs[:, node] = th.relu(_linear(u, self.w_hid[:, k], self.b_hid[:, k])) + u
        return self.head(mix_sources(self.n_modules)), sources, sum(needed)

    @th.no_grad()
    def routing_path(self, state: th.Tensor, task_ids: th.Tensor, route: RouteRequest = TOPK) -> RoutingPath:
        """Routing path ``[E, B, ...]`` the network takes for these inputs (no module is computed)."""
        _, padded = self.encode(state, task_ids)
        sources = self.choose_sources(padded, task_ids, route)
        return self.graph.path(padded, sources)
