"""D2R written plainly: the paper's equations one at a time, in ordinary PyTorch with autograd.

This module is the readable statement of the algorithm. The library's fast code (:mod:`.network`, :mod:`.routing`,
:mod:`.routed_block`, :mod:`.skipping`) computes the same routes, values and gradients with batched, fused and
hand-differentiated operations, and the tests check it against the functions here. Nothing here is used in
training; it trades every speed for clarity (one Python step per module, dense per-node weights, autograd only).

Equation numbers are those of He et al., "Not All Tasks Are Equally Difficult: Multi-Task Deep Reinforcement
Learning with Dynamic Depth Routing", AAAI 2024 (arXiv:2312.14472). Where the paper's text and the authors' code
differ, the library follows the code by default and offers the paper's version as an option, and so do the
functions here:

* The residual shortcut of ResRouting mixes the *un-masked* module outputs (``shortcut="full"``, the code); Eq. 11
  as printed mixes the masked ones (``shortcut="masked"``).
* The ResRouting threshold is a strict ``>`` (the code) where Eq. 10 writes ``>=``.
* The route-balancing temperature is ``N`` times Eq. 14 (mean 1 over the tasks, the code) or Eq. 14 as printed.
* The paper's last module "outputs the action distribution"; in the code every module is a hidden module and an
  extra routed **output node** (its own gate logits, no module, no shortcut) feeds a linear head.
* The state encoder F has no activation after its last layer: the gate reads ``F(s) * H(T)`` before the ReLU,
  the first module reads ``relu(F(s))``.

Indexing: the paper numbers modules ``M^1..M^n`` and module ``i`` reads modules ``1..i-1``. Here modules are
0-based: **node** ``i`` in ``1..n`` reads modules ``0..i-1`` (``i`` candidates), node ``n`` is the output node and
module 0 (the paper's ``M^1``) reads the state encoding. Every routed node has a logit vector ``z`` with one entry
per candidate, a routing path ``d`` (a 0/1 vector over the candidates) and routing probabilities ``p``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch as th
from torch.nn import functional as F

if TYPE_CHECKING:
    from d2r_sb3.common.ensemble import EnsembleLinear
    from d2r_sb3.d2r.network import RoutedNetwork

__all__ = [
    "encode",
    "gate_logit_chunks",
    "mask_softmax",
    "reference_forward",
    "resrouting_keep",
    "route_temperature",
    "routed_block",
    "routing_probabilities",
    "sample_k",
    "top_k",
]


# --- routing: which sources, with which weights (Eqs. 4-8, 13-14) ----------------------------------------------
def gate_logit_chunks(logits: th.Tensor, n_modules: int) -> list[th.Tensor]:
    """Cut the gate output into one logit vector per routed node (Eq. 4's ``z^i``, one routing sub-network each).

    The gate G is one MLP whose ``n (n + 1) / 2`` outputs are read in order as chunks of 1, 2, ..., n logits:
    chunk ``i - 1`` holds the logits of node ``i`` over its candidates, modules ``0..i-1``.

    :param logits: ``[B, n (n + 1) / 2]`` gate output.
    :return: ``n`` tensors, the ``i``-th ``[B, i + 1]``; the last one is the output node's.
    """
    sizes = list(range(1, n_modules + 1))
    return list(logits.split(sizes, dim=-1))


def top_k(logits: th.Tensor, k: int) -> th.Tensor:
    """TopK routing path (Eq. 6): ``d_j = 1`` iff ``z_j`` is among the ``k`` largest logits.

    A node with at most ``k`` candidates takes all of them. Ties (which real-valued logits almost never have) go to
    the earlier module.

    :param logits: ``[B, c]`` logits of one node.
    :return: bool ``[B, c]`` routing path.
    """
    order = th.argsort(logits, dim=-1, descending=True, stable=True)
    chosen = order[..., : min(k, logits.shape[-1])]
    return th.zeros_like(logits, dtype=th.bool).scatter(-1, chosen, True)


def sample_k(
    logits: th.Tensor, k: int, temperature: th.Tensor, generator: th.Generator | None = None
) -> th.Tensor:
    """SampleK routing path (Eqs. 7 and 13): ``k`` sources drawn without replacement from ``softmax(z / tau)``.

    Used to explore routes while training; ``tau`` is the task's route-balancing temperature
    (:func:`route_temperature`). It only changes which sources are drawn, never their weights.

    :param logits: ``[B, c]`` logits of one node.
    :param temperature: ``[B]`` temperature of each sample's task.
    :return: bool ``[B, c]`` routing path with ``min(k, c)`` ones per row.
    """
    probabilities = th.softmax(logits / temperature.unsqueeze(-1), dim=-1)
    chosen = th.multinomial(probabilities, min(k, logits.shape[-1]), replacement=False, generator=generator)
    return th.zeros_like(logits, dtype=th.bool).scatter(-1, chosen, True)


def mask_softmax(logits: th.Tensor, path: th.Tensor) -> th.Tensor:
    """MaskSoftmax (Eq. 5; Eq. 8 with a stored behaviour path ``d_old``).

    ``p_j = exp(z_j) d_j / sum_k exp(z_k) d_k``: the softmax of the (un-tempered) logits over the chosen sources
    only, zero elsewhere. The weights stay differentiable in ``z``, so the gate learns through them.

    :param logits: ``[B, c]`` logits of one node.
    :param path: bool ``[B, c]`` routing path (at least one source per row).
    :return: ``[B, c]`` routing probabilities.
    """
    return th.softmax(logits.masked_fill(~path, float("-inf")), dim=-1)


def routing_probabilities(logits: th.Tensor, path: th.Tensor, routing: str = "topk") -> th.Tensor:
    """Routing probabilities of one node for the routing functions of the paper's Fig. 7(a).

    * ``"topk"``: MaskSoftmax over the chosen sources (Eq. 5).
    * ``"hard"`` (Top-1): the chosen source keeps its *full*-softmax probability, not rescaled to 1, so that the
      gate still gets a gradient (as in Switch Transformers).
    * ``"soft"``: every candidate, weighted by the full softmax (the path is all ones).

    :param logits: ``[B, c]`` logits of one node.
    :param path: bool ``[B, c]`` routing path.
    :return: ``[B, c]`` routing probabilities, zero off the path.
    """
    if routing == "topk":
        return mask_softmax(logits, path)
    return th.softmax(logits, dim=-1) * path


def resrouting_keep(logits: th.Tensor) -> th.Tensor:
    """ResRouting's choice between ``m`` and ``rsg[m]`` (Eq. 10's indicator, with Eq. 11's ``rsg``).

    A candidate is *suitable* for the current policy, and passes its full gradient, iff its full-softmax
    probability exceeds ``sigma = 1 / (number of candidates + 1)`` (the paper's ``1/i`` for module ``i``);
    unsuitable sources pass gradient only through their residual shortcut. Decided without gradient.

    :param logits: ``[B, c]`` logits of one node.
    :return: bool ``[B, c]``.
    """
    with th.no_grad():
        return th.softmax(logits, dim=-1) > 1.0 / (logits.shape[-1] + 1)


def route_temperature(log_alpha: th.Tensor, scale: str = "num_tasks") -> th.Tensor:
    """Automatic route balancing (Eq. 14): the per-task temperature of SampleK from SAC's per-task alphas.

    ``tau_t = (1 / alpha_t) / sum_j (1 / alpha_j)``: a task whose policy entropy is still high (small alpha, not
    mastered) routes with a higher temperature, so it keeps exploring routes.

    :param log_alpha: ``[N]`` log entropy coefficients, one per task.
    :param scale: ``"num_tasks"`` multiplies by ``N`` (the authors' code: the mean over tasks is 1) and
        ``"paper"`` leaves Eq. 14 as printed (mean ``1 / N``).
    :return: ``[N]`` temperatures.
    """
    inverse_alpha = th.exp(-log_alpha)
    tau = inverse_alpha / inverse_alpha.sum()
    return tau * len(log_alpha) if scale == "num_tasks" else tau


# --- the network (Eqs. 3-4 and 9-12) -------------------------------------------------------------------------
def encode(
    net: RoutedNetwork, member: int, state: th.Tensor, task_ids: th.Tensor
) -> tuple[th.Tensor, th.Tensor]:
    """State and task encodings and the gate logits of ensemble member ``member`` (Eq. 4).

    ``F``: the state encoder MLP, without an activation after its last layer. ``H``: one linear layer of the task
    one-hot. The gate ``G`` reads ``F(s) * H(T)``; the first module reads ``relu(F(s))``.

    :param net: the network whose parameters are used (read only).
    :param state: ``[B, state_dim]``; ``task_ids``: ``[B]``.
    :return: ``(x0 = relu(F(s)) [B, embed], gate logits [B, n (n + 1) / 2])``.
    """

    def mlp(x: th.Tensor, module_list: th.nn.ModuleList) -> th.Tensor:
        layers = cast("Sequence[EnsembleLinear]", module_list)  # (an EnsembleMLP's layers)
        for index, layer in enumerate(layers):
            x = F.linear(x, layer.weight[member], layer.bias[member])
            if index < len(layers) - 1:
                x = th.relu(x)
        return x

    state_encoding = mlp(state, net.state_encoder.layers)  # F(s)
    onehot = F.one_hot(task_ids, net.num_tasks).to(state.dtype)
    task_encoding = F.linear(onehot, net.task_encoder.weight[member], net.task_encoder.bias[member])  # H(T)
    gate_logits = mlp(state_encoding * task_encoding, net.gate.layers)  # G(F(s) * H(T))
    return th.relu(state_encoding), gate_logits


def routed_block(
    x0: th.Tensor,
    modules: list[tuple[th.Tensor, th.Tensor]],
    probabilities: list[th.Tensor],
    keep: list[th.Tensor] | None,
    shortcut: str = "full",
) -> th.Tensor:
    """The base module network with residual routing and ResRouting (Eqs. 3 and 9-12).

    Module 0 reads ``x0``: ``m_0 = relu(M_0(x0))``. Each later node ``i`` mixes the earlier outputs with its routing
    probabilities; with ResRouting an unsuitable source enters as ``rsg[m_j]`` instead of ``m_j`` (equal in value,
    different in gradient)::

        mixed_i    = sum_j p_ij * (keep_ij ? m_j : rsg[m_j])            module input (Eqs. 9-10)
        shortcut_i = sum_j p_ij * m_j   ("full")   or   mixed_i   ("masked", Eq. 11 as printed)
        h_i        = relu(M_i(mixed_i))
        m_i        = shortcut_i + h_i                                    residual routing (Eq. 11)
        rsg[m_i]   = shortcut_i + sg[h_i]                                (Eq. 12)

    so an unsuitable module gets no gradient for its own weights but still passes gradient to its sources through
    its shortcut. Module 0 has no shortcut: ``rsg[m_0] = sg[m_0]``. The output node (the last one) is the mix
    alone: no module, no shortcut. Without ResRouting (``keep=None``) every source enters as ``m_j`` (Eq. 3 with
    the residual shortcut).

    :param x0: ``[B, embed]`` input of module 0.
    :param modules: ``(weight, bias)`` of modules ``0..n-1``.
    :param probabilities: routing probabilities of nodes ``1..n``, the ``i``-th ``[B, i]`` (dense over the
        candidates, zero off the path).
    :param keep: ResRouting choice of nodes ``1..n`` (:func:`resrouting_keep`), or ``None`` without ResRouting.
    :param shortcut: ``"full"`` (the authors' code) or ``"masked"`` (Eq. 11 as printed).
    :return: ``[B, module_dim]`` value of the output node.
    """
    outputs = [th.relu(F.linear(x0, *modules[0]))]
    stopped = [outputs[0].detach()]  # rsg[m_0] = sg[m_0]
    for node, p in enumerate(probabilities, start=1):
        weights = p.unsqueeze(-1)
        full = th.stack(outputs, dim=1)  # [B, node, D]
        sources = full
        if keep is not None:  # m_j where suitable, rsg[m_j] elsewhere
            sources = th.where(keep[node - 1].unsqueeze(-1), full, th.stack(stopped, dim=1))
        mixed = (weights * sources).sum(1)
        if node == len(probabilities):
            return mixed  # the output node
        hidden = th.relu(F.linear(mixed, *modules[node]))
        residual = (weights * full).sum(1) if shortcut == "full" else mixed
        outputs.append(residual + hidden)
        stopped.append(residual + hidden.detach())
    raise ValueError("probabilities must list at least the output node")


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
    """Output ``[B, out_dim]`` of ensemble member ``member`` of ``net`` on explicit routes, written plainly.

    Covers D2R's module-level graph (each module may read every earlier one; module 0 reads the state encoding).
    It shares only the parameters with the library's fast forward pass.

    :param net: the network whose parameters are used (read only).
    :param state: ``[B, state_dim]``; ``task_ids``: ``[B]``.
    :param sources: ``[B, n + 1, k]`` chosen source modules per node, as the library picks them (node ``i``
        uses only its first ``min(k, i)`` slots; row 0, module 0, is unused).
    :param resrouting: apply ResRouting (Eqs. 9-12); ``False`` routes every source with its full gradient.
    :param shortcut: ``"full"`` or ``"masked"`` (see :func:`routed_block`).
    :param routing: ``"topk"``, ``"hard"`` or ``"soft"`` (see :func:`routing_probabilities`; with ``"soft"``,
        ``sources`` lists every earlier module).
    """
    n = net.n_modules
    x0, logits = encode(net, member, state, task_ids)
    chunks = gate_logit_chunks(logits, n)
    paths = []
    for node, z in enumerate(chunks, start=1):
        chosen = sources[:, node, : min(sources.shape[-1], node)]
        paths.append(th.zeros_like(z, dtype=th.bool).scatter(-1, chosen, True))
    probabilities = [routing_probabilities(z, d, routing) for z, d in zip(chunks, paths, strict=True)]
    keep = [resrouting_keep(z) for z in chunks] if resrouting else None
    modules = [(net.w_in[member, 0], net.b_in[member, 0])]
    modules += [(net.w_hid[member, i], net.b_hid[member, i]) for i in range(n - 1)]
    y = routed_block(x0, modules, probabilities, keep, shortcut)
    return F.linear(y, net.head.weight[member], net.head.bias[member])
