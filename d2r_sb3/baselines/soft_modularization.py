"""Soft Modularization (SM; Yang, Xu, Wu, Wang, "Multi-Task Reinforcement Learning with Soft Modularization",
NeurIPS 2020) on the multi-task SAC core (alias ``"SMPolicy"``).

Network, for input ``x`` (the state, or ``[state, action]`` for a critic) and task ``z``::

    f      = F(x)                       state encoder: Linear -> ReLU -> Linear (no final activation)
    e      = H(z)                       task embedding: one Linear of the one-hot
    g      = G(relu(f * e))             routing trunk (product taken before the ReLU), last layer without ReLU
    p^1    = softmax(W_d^1 relu(g))                              routing probabilities, [m, m] per sample
    p^l+1  = softmax(W_d^l+1 relu(W_u^l [p^1, ..., p^l] * g))     each layer's probabilities feed the next
    w_out  = softmax(W_d^L relu(W_u^L-1 [p^1, ..., p^L-1] * g))   [m]: mixes the last layer's modules
    o^1_i  = M^1_i(relu(f))                                       modules of the first layer
    o^l+1_j = M^l+1_j(relu(sum_i p^l[j, i] o^l_i))                module j of layer l+1 mixes layer l's outputs
    y      = Head(relu(sum_i w_out[i] o^L_i))

The softmax of ``p^l`` runs over the source modules (the last axis), so every destination module receives a
proper distribution over the previous layer. ``L`` layers of ``m`` modules each (``4 x 4`` of width 128 in the
D2R paper's comparison). SM's loss reweighting by ``softmax(-log alpha)`` is the core's
``task_loss_reweighting``, on by default.

Choices we made (the paper leaves them open or its public code differs from its equations):

* **Routing recursion on all previous layers.** The paper writes ``p^{l+1}`` as a function of ``p^l``; the
  authors' code (the torchrl "Soft-Module" codebase, on which D2R is built) conditions each routing layer on the
  concatenation of *all* previous layers' probabilities. We follow the code, which produced the published results.
* **Where the activations sit.** As in the code, a module is a plain Linear; the ReLU is applied to the mixed
  input of the next layer (and to the mixed output before the head), the routing logits of layer ``l > 1`` come
  from ``relu(W_u [p] * g)``, and the first from ``relu(g)``.
* **Output mixing.** The last layer's modules are combined by one more learned soft weight vector ``w_out``
  (the code's last gating layer), not averaged.
* **No batch normalisation** in the modules (the code's ``add_bn`` is off in its Meta-World configurations).
* **Initialisation** is the authors': hidden layers ``U(-1/sqrt(out), 1/sqrt(out))`` with bias 0.1, the routing
  output layers and the head ``U(-3e-3, 3e-3)``, so routing starts near uniform.
* Twin critics are two independent SM networks with their own routing, evaluated as one batched ensemble.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from d2r_sb3.baselines.actor_critic import TaskNetworkPolicy
from d2r_sb3.common.ensemble import EnsembleLinear, EnsembleMLP, ensemble_linear, output_init_


@dataclass
class SoftRoutingWeights:
    """Soft routing weights of one forward pass.

    ``layers[..., l, j, i]`` (``[..., L - 1, m, m]``): weight of module ``i`` of layer ``l`` in the input of module
    ``j`` of layer ``l + 1``; ``output[..., i]`` (``[..., m]``): weight of module ``i`` of the last layer in the
    head's input. Each row (over ``i``) is non-negative and sums to 1.
    """

    layers: th.Tensor
    output: th.Tensor


def _mix_modules(outputs: th.Tensor, weights: th.Tensor) -> th.Tensor:
    """``mixed[e, j, b] = sum_i weights[e, b, j, i] * outputs[e, i, b]``.

    :param outputs: ``[E, m, B, D]`` outputs of the ``m`` modules of a layer.
    :param weights: ``[E, B, J, m]`` soft weights of ``J`` destinations over the ``m`` sources.
    :return: ``[E, J, B, D]``.
    """
    return th.einsum("ebji,eibd->ejbd", weights, outputs)


class SoftModularNetwork(nn.Module):
    """``n_nets`` Soft-Modularization networks (an ensemble, for the twin critics).

    :param in_dim: size of the input ``x`` without the task one-hot.
    :param num_tasks: number of tasks ``T``.
    :param out_dim: output size.
    :param n_nets: ensemble size (1 actor, ``n_critics`` critics).
    :param n_layers: module layers ``L`` (>= 2).
    :param n_modules: modules per layer ``m``.
    :param module_dim: module width.
    :param encoder_sizes: hidden sizes of the state encoder F; the last is the embedding size.
    :param gate_sizes: hidden sizes of the routing trunk G (may be empty).
    """

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        out_dim: int,
        n_nets: int = 1,
        n_layers: int = 4,
        n_modules: int = 4,
        module_dim: int = 128,
        encoder_sizes: Sequence[int] = (400, 400),
        gate_sizes: Sequence[int] = (256, 256),
    ):
        super().__init__()
        if n_layers < 2:
            raise ValueError(
                f"Soft Modularization routes between layers: n_layers must be >= 2, got {n_layers}."
            )
        if n_modules < 1 or module_dim < 1:
            raise ValueError(f"n_modules and module_dim must be >= 1, got {n_modules} and {module_dim}.")
        if len(encoder_sizes) < 1:
            raise ValueError("encoder_sizes needs at least one layer size (the last is the embedding size).")
        self.num_tasks = num_tasks
        self.n_nets = n_nets
        self.n_layers = n_layers
        self.n_modules = n_modules
        self.module_dim = module_dim
        embed_dim = encoder_sizes[-1]
        gate_dim = gate_sizes[-1] if len(gate_sizes) else embed_dim
        self.state_encoder = EnsembleMLP(n_nets, [in_dim, *encoder_sizes], final_relu=False)
        self.task_encoder = EnsembleLinear(n_nets, num_tasks, embed_dim)
        self.gate = EnsembleMLP(n_nets, [embed_dim, *gate_sizes], final_relu=False)
        n_pairs = n_modules * n_modules
        # route_logits[l] gives the logits between layers l and l+1 (the last one: the output mix);
        # route_cond[l] embeds the probabilities of layers 0..l for the next routing layer (W_u).
        self.route_logits = nn.ModuleList(
            EnsembleLinear(n_nets, gate_dim, n_pairs) for _ in range(n_layers - 1)
        )
        self.route_logits.append(EnsembleLinear(n_nets, gate_dim, n_modules))
        self.route_cond = nn.ModuleList(
            EnsembleLinear(n_nets, (layer + 1) * n_pairs, gate_dim) for layer in range(n_layers - 1)
        )
        for layer in cast("Sequence[EnsembleLinear]", self.route_logits):
            output_init_(layer)
        bound = 1.0 / math.sqrt(module_dim)  # the authors' fan-in quirk: 1/sqrt(out_features)
        self.w_first = nn.Parameter(
            th.empty(n_nets, n_modules, module_dim, embed_dim).uniform_(-bound, bound)
        )
        self.b_first = nn.Parameter(th.full((n_nets, n_modules, module_dim), 0.1))
        shape = (n_nets, n_layers - 1, n_modules, module_dim, module_dim)
        self.w_modules = nn.Parameter(th.empty(shape).uniform_(-bound, bound))
        self.b_modules = nn.Parameter(th.full(shape[:-1], 0.1))
        self.head = EnsembleLinear(n_nets, module_dim, out_dim)
        output_init_(self.head)

    def _encode(self, x: th.Tensor, task_ids: th.Tensor, detach: bool) -> tuple[th.Tensor, th.Tensor]:
        """``(relu(f) [E, B, embed], routing trunk output g [E, B, gate])``."""
        x = x.unsqueeze(0).expand(self.n_nets, -1, -1)
        f_pre = self.state_encoder(x, detach)
        task_w: th.Tensor = self.task_encoder.weight
        task_b: th.Tensor = self.task_encoder.bias
        if detach:
            task_w, task_b = task_w.detach(), task_b.detach()
        task_embedding = task_w.transpose(1, 2)[:, task_ids] + task_b.unsqueeze(1)  # H(one-hot) as a lookup
        gate_out = self.gate(th.relu(task_embedding * f_pre), detach)
        return th.relu(f_pre), gate_out

    def _route(self, gate_out: th.Tensor, detach: bool) -> SoftRoutingWeights:
        ens, batch = gate_out.shape[:2]
        m = self.n_modules
        probs = [th.softmax(self.route_logits[0](th.relu(gate_out), detach).view(ens, batch, m, m), dim=-1)]

        def next_logits(layer: int) -> th.Tensor:
            # Routing recursion: the probabilities of every earlier layer condition this layer's logits.
            previous = th.cat([p.flatten(-2) for p in probs], dim=-1)
            hidden = th.relu(self.route_cond[layer - 1](previous, detach) * gate_out)
            return self.route_logits[layer](hidden, detach)

        for layer in range(1, self.n_layers - 1):
            probs.append(th.softmax(next_logits(layer).view(ens, batch, m, m), dim=-1))
        output = th.softmax(next_logits(self.n_layers - 1), dim=-1)
        return SoftRoutingWeights(layers=th.stack(probs, dim=2), output=output)

    def routing_weights(self, x: th.Tensor, task_ids: th.Tensor) -> SoftRoutingWeights:
        """Routing weights ``layers [E, B, L - 1, m, m]`` and ``output [E, B, m]`` (no module is computed)."""
        return self._route(self._encode(x, task_ids, detach=False)[1], detach=False)

    def forward(self, x: th.Tensor, task_ids: th.Tensor, detach: bool = False) -> th.Tensor:
        """``x [B, in_dim]``, ``task_ids [B]`` -> ``[n_nets, B, out_dim]``.

        :param detach: use detached parameters (gradient reaches the inputs only).
        """
        x0, gate_out = self._encode(x, task_ids, detach)
        weights = self._route(gate_out, detach)
        params = (self.w_first, self.b_first, self.w_modules, self.b_modules)
        w_first, b_first, w_modules, b_modules = (p.detach() for p in params) if detach else params
        ens, batch = x0.shape[:2]
        m, dim = self.n_modules, self.module_dim
        # Module outputs are kept module-major, [E, m, B, dim], so that a layer is one batched matmul over E * m.
        first = ensemble_linear(x0, w_first.reshape(ens, m * dim, -1), b_first.reshape(ens, m * dim))
        outputs = first.view(ens, batch, m, dim).transpose(1, 2)
        for layer in range(self.n_layers - 1):
            mixed = th.relu(_mix_modules(outputs, weights.layers[:, :, layer]))  # [E, m, B, dim]
            flat = ensemble_linear(
                mixed.reshape(ens * m, batch, dim),
                w_modules[:, layer].reshape(ens * m, dim, dim),
                b_modules[:, layer].reshape(ens * m, dim),
            )
            outputs = flat.view(ens, m, batch, dim)
        y = th.relu(_mix_modules(outputs, weights.output.unsqueeze(2))[:, 0])  # [E, B, dim]
        return self.head(y, detach)


class SMPolicy(TaskNetworkPolicy):
    """Soft Modularization actor and twin critics (alias ``"SMPolicy"``); defaults are the D2R paper's 4 x 4.

    :param num_tasks: number of tasks (set by the algorithm from the env).
    :param n_layers: module layers ``L`` (4).
    :param n_modules: modules per layer ``m`` (4).
    :param module_dim: module width (128).
    :param encoder_sizes: state-encoder hidden sizes (``[400, 400]``).
    :param gate_sizes: routing-trunk hidden sizes (``[256, 256]``).
    :param n_critics: number of Q networks.
    """

    network_class = SoftModularNetwork

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_tasks: int,
        n_layers: int = 4,
        n_modules: int = 4,
        module_dim: int = 128,
        encoder_sizes: Sequence[int] = (400, 400),
        gate_sizes: Sequence[int] = (256, 256),
        n_critics: int = 2,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        self.net_kwargs: dict[str, Any] = dict(
            n_layers=n_layers,
            n_modules=n_modules,
            module_dim=module_dim,
            encoder_sizes=list(encoder_sizes),
            gate_sizes=list(gate_sizes),
        )
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            num_tasks,
            n_critics,
            optimizer_class,
            optimizer_kwargs,
        )

    @th.no_grad()
    def routing_weights(self, obs: th.Tensor | np.ndarray) -> SoftRoutingWeights:
        """The actor's soft routing weights for a batch of observations (``layers [B, L-1, m, m]``, ``output [B, m]``)."""
        obs_t = th.as_tensor(obs, device=self.device).float().reshape(-1, self.obs_dim)
        state, task_ids = self.split_obs(obs_t)
        weights = cast(SoftModularNetwork, self.actor.net).routing_weights(
            state, task_ids
        )  # (make_network's)
        return SoftRoutingWeights(layers=weights.layers[0], output=weights.output[0])
