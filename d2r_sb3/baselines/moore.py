"""MOORE (Hendawy, Peters, D'Eramo, "Multi-Task Reinforcement Learning with Mixture of Orthogonal Experts",
ICLR 2024) on the multi-task SAC core (alias ``"MOOREPolicy"``).

Network, for input ``x`` (the state, or ``[state, action]`` for a critic) and task ``tau``::

    u_i    = expert_i(x)                    k experts, MLPs [400, 400, 400], no activation after the last layer
    U      = GramSchmidt(u_1, ..., u_k)     per sample: k orthonormal representations (the shared subspace)
    v_tau  = tanh(sum_i w_tau[i] * U_i)     task-specific combination, w_tau = row tau of a T x k matrix
    y      = Head_tau(v_tau)                one linear output head per task (multi-head SAC)

Defaults are the authors' Meta-World configuration (the MOORE repository's ``run_metaworld_mt10/mt50_mhsac_mt_
moore.sh``): ``k = 4`` experts on MT10 and ``k = 6`` on MT50 (``n_experts=None`` picks by ``num_tasks``), experts
``[400, 400, 400]`` without a final activation, aggregation ``Linear`` before and ``Tanh`` after the mixing, no
hidden head layers, mean and log-std from one shared head output. Parameters of one network::

    k * mlp([in, 400, 400, 400]) + T * k + T * (400 * out + out)

which is 1,379,320 for the MT10 actor (``in`` 39, ``out`` 8), the 1.38M a 2025 re-run reports.

Choices we made:

* **Gram-Schmidt** is the classical one of the authors' code (each expert's output minus its projections on the
  basis built so far, then normalised), in the experts' fixed order. We divide by ``max(norm, 1e-8)`` so that a
  degenerate sample (an expert output in the span of the earlier ones) gives a zero vector instead of NaN; the
  code divides by the raw norm.
* **Initialisation** is the comparison's common scheme (:mod:`d2r_sb3.baselines.mlp`); the code uses Xavier
  uniform. The task-weight matrix keeps the code's Xavier uniform init (it has no counterpart in the others).
* Twin critics are two independent MOORE networks (their own experts and task weights), one batched ensemble.
"""

from __future__ import annotations

import math
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from d2r_sb3.baselines.actor_critic import TaskNetworkPolicy
from d2r_sb3.baselines.grouped import GroupedMLP
from d2r_sb3.common.ensemble import output_init_
from d2r_sb3.d2r.network import EnsembleLinear

__all__ = ["MOORENetwork", "MOOREPolicy", "gram_schmidt", "moore_experts_for", "moore_parameter_count"]

GRAM_SCHMIDT_EPS = 1e-8  # smallest norm divided by; below it a direction is dropped (zero vector)
TASK_ACTIVATIONS = ("tanh", "linear")


def moore_experts_for(num_tasks: int) -> int:
    """The authors' number of experts: 4 up to 10 tasks (MT10), 6 above (MT50)."""
    return 4 if num_tasks <= 10 else 6


def gram_schmidt(vectors: th.Tensor, eps: float = GRAM_SCHMIDT_EPS) -> th.Tensor:
    """Orthonormalise ``k`` vectors per sample, in order: ``[..., k, d] -> [..., k, d]``.

    Row ``i`` of the result is vector ``i`` minus its projections on rows ``0..i-1`` of the result, normalised
    (classical Gram-Schmidt, as in the MOORE code). Needs ``k <= d`` for the rows to be orthonormal.
    """
    basis: list[th.Tensor] = []
    for i in range(vectors.shape[-2]):
        vector = vectors[..., i, :]
        if basis:
            done = th.stack(basis, dim=-2)  # [..., i, d]
            coefficients = (done @ vector.unsqueeze(-1)).squeeze(-1)  # [..., i]
            vector = vector - (coefficients.unsqueeze(-1) * done).sum(-2)
        norm = vector.norm(dim=-1, keepdim=True)
        basis.append(vector / norm.clamp_min(eps))
    return th.stack(basis, dim=-2)


class MOORENetwork(nn.Module):
    """``n_nets`` MOORE networks (an ensemble, for the twin critics).

    :param in_dim: size of the input ``x`` without the task one-hot.
    :param num_tasks: number of tasks ``T``.
    :param out_dim: output size of a head.
    :param n_nets: ensemble size (1 actor, ``n_critics`` critics).
    :param n_experts: experts ``k`` (at most the representation size).
    :param expert_sizes: layer sizes of an expert; the last is the representation size ``d``.
    :param orthogonal: Gram-Schmidt the experts' outputs (``False``: a plain mixture of experts, the paper's MOE
        baseline).
    :param task_activation: ``"tanh"`` (code) or ``"linear"`` after mixing the representations.
    :param multi_head: one output head per task (MOORE's Meta-World setting); ``False``: one shared head.
    """

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        out_dim: int,
        n_nets: int = 1,
        n_experts: int = 4,
        expert_sizes: tuple[int, ...] | list[int] = (400, 400, 400),
        orthogonal: bool = True,
        task_activation: str = "tanh",
        multi_head: bool = True,
    ):
        super().__init__()
        if not expert_sizes or not all(isinstance(s, int) and s > 0 for s in expert_sizes):
            raise ValueError(f"expert_sizes must be a non-empty list of positive sizes, got {expert_sizes}.")
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}.")
        if orthogonal and n_experts > expert_sizes[-1]:
            raise ValueError(
                f"{n_experts} orthonormal representations do not fit in {expert_sizes[-1]} dimensions: "
                "n_experts must be <= the last expert size."
            )
        if task_activation not in TASK_ACTIVATIONS:
            raise ValueError(f"task_activation must be one of {TASK_ACTIVATIONS}, got {task_activation!r}.")
        self.num_tasks = num_tasks
        self.out_dim = out_dim
        self.n_nets = n_nets
        self.n_experts = n_experts
        self.orthogonal = orthogonal
        self.task_activation = task_activation
        self.n_heads = num_tasks if multi_head else 1
        dim = expert_sizes[-1]
        self.experts = GroupedMLP(n_nets, n_experts, [in_dim, *expert_sizes], final_relu=False)
        # w_tau: the code's bias-free Linear(T -> k) on the one-hot, i.e. a T x k table, Xavier-uniform.
        bound = math.sqrt(6.0 / (num_tasks + n_experts))
        self.task_weights = nn.Parameter(th.empty(n_nets, num_tasks, n_experts).uniform_(-bound, bound))
        self.head = EnsembleLinear(n_nets, dim, self.n_heads * out_dim)
        output_init_(self.head)

    def representations(self, x: th.Tensor, detach: bool = False) -> th.Tensor:
        """The experts' (orthonormalised when ``orthogonal``) representations ``[E, B, k, d]`` of ``x [B, in]``."""
        batch = x.shape[0]
        inputs = x.expand(self.n_nets, self.n_experts, batch, x.shape[-1])
        per_expert = self.experts(inputs, detach).transpose(1, 2)  # [E, B, k, d]
        return gram_schmidt(per_expert) if self.orthogonal else per_expert

    def forward(self, x: th.Tensor, task_ids: th.Tensor, detach: bool = False) -> th.Tensor:
        """``x [B, in_dim]``, ``task_ids [B]`` -> ``[n_nets, B, out_dim]``.

        :param detach: use detached parameters (gradient reaches the inputs only).
        """
        basis = self.representations(x, detach)
        task_weights = self.task_weights.detach() if detach else self.task_weights
        weights = task_weights[:, task_ids]  # [E, B, k]
        features = th.einsum("ebk,ebkd->ebd", weights, basis)
        if self.task_activation == "tanh":
            features = th.tanh(features)
        out = self.head(features, detach)
        if self.n_heads == 1:
            return out
        ens, batch = out.shape[:2]
        per_head = out.view(ens, batch, self.n_heads, self.out_dim)
        # Only the sample's own head is picked, so the other heads get exactly zero gradient from it.
        index = task_ids.view(1, batch, 1, 1).expand(ens, batch, 1, self.out_dim)
        return per_head.gather(2, index).squeeze(2)


def moore_parameter_count(
    in_dim: int, num_tasks: int, out_dim: int, n_experts: int, expert_sizes: list[int]
) -> int:
    """Parameters of one :class:`MOORENetwork` with one head per task (the formula of the module docstring)."""
    sizes = [in_dim, *expert_sizes]
    expert = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=False))
    return n_experts * expert + num_tasks * n_experts + num_tasks * (expert_sizes[-1] * out_dim + out_dim)


class MOOREPolicy(TaskNetworkPolicy):
    """MOORE actor and twin critics (alias ``"MOOREPolicy"``); defaults are the authors' Meta-World settings.

    :param num_tasks: number of tasks (set by the algorithm from the env).
    :param n_experts: experts ``k`` (``None``: 4 up to 10 tasks, 6 above, as the authors' MT10 / MT50 runs).
    :param expert_sizes: expert layer sizes (``[400, 400, 400]``); the last is the representation size.
    :param orthogonal: Gram-Schmidt the representations (``False``: the plain mixture-of-experts baseline).
    :param task_activation: ``"tanh"`` or ``"linear"`` after the task's mixing of the representations.
    :param multi_head: one output head per task (``True``, MOORE's Meta-World setting).
    :param n_critics: number of Q networks.
    """

    network_class = MOORENetwork

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_tasks: int,
        n_experts: int | None = None,
        expert_sizes: tuple[int, ...] | list[int] = (400, 400, 400),
        orthogonal: bool = True,
        task_activation: str = "tanh",
        multi_head: bool = True,
        n_critics: int = 2,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        self.net_kwargs: dict[str, Any] = dict(
            n_experts=moore_experts_for(num_tasks) if n_experts is None else n_experts,
            expert_sizes=list(expert_sizes),
            orthogonal=orthogonal,
            task_activation=task_activation,
            multi_head=multi_head,
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
