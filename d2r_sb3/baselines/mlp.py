"""MT-SAC and MH-SAC: MLP policies on ``[state, task one-hot]`` (Meta-World paper's multi-task baselines).

* **MT-SAC** (``"MTSACPolicy"``): one MLP for the actor and one per critic; the task one-hot is part of the input.
* **MH-SAC** (``"MHSACPolicy"``): the same shared trunk with one output head per task; the task id selects the
  head, so a head is trained only by its own task's samples.

Both use the per-task entropy coefficients and the rest of the multi-task core
(:class:`~d2r_sb3.common.mt_sac.MultiTaskSAC`). The default ``net_arch=[400, 400, 400]`` is the MT-SAC / MT-MH-SAC
network of the Soft-Modularization and D2R papers. Initialisation is the authors' (the torchrl codebase that
produced those papers' baselines, see :class:`~d2r_sb3.common.ensemble.EnsembleLinear`): hidden layers
``U(-1/sqrt(out), 1/sqrt(out))`` with bias 0.1, output layer ``U(-3e-3, 3e-3)``, so that every method in the
comparison starts from the same scheme.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import Schedule
from torch import nn
from torch.nn import functional as F

from d2r_sb3.baselines.actor_critic import TaskNetworkPolicy
from d2r_sb3.common.ensemble import EnsembleLinear, EnsembleMLP, output_init_

NetArch = Sequence[int] | dict[str, Sequence[int]]


def resolve_net_arch(net_arch: NetArch) -> dict[str, list[int]]:
    """``[400, 400]`` or SB3's ``dict(pi=[...], qf=[...])`` -> ``{"actor": [...], "critic": [...]}``."""
    if isinstance(net_arch, dict):
        unknown = set(net_arch) - {"pi", "qf"}
        if unknown or not {"pi", "qf"} <= set(net_arch):
            raise ValueError(
                f"net_arch as a dict needs exactly the keys 'pi' (actor) and 'qf' (critics), got {sorted(net_arch)}."
            )
        arch = {"actor": list(net_arch["pi"]), "critic": list(net_arch["qf"])}
    else:
        arch = {"actor": list(net_arch), "critic": list(net_arch)}
    for role, sizes in arch.items():
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(
                f"net_arch for the {role} must be a non-empty list of positive layer sizes, got {sizes}."
            )
    return arch


class TaskMLP(nn.Module):
    """``n_nets`` MLPs on ``[x, task one-hot]`` with one output head, or one head per task.

    :param in_dim: size of ``x`` (the state part of the input, without the one-hot).
    :param num_tasks: number of tasks ``T``.
    :param out_dim: output size of a head.
    :param hidden_sizes: hidden layer sizes of the shared trunk (ReLU after each).
    :param n_nets: ensemble size (1 actor, ``n_critics`` critics).
    :param multi_head: one head per task, selected by the task id (MH-SAC); ``False``: a single head (MT-SAC).
    """

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        out_dim: int,
        hidden_sizes: Sequence[int],
        n_nets: int = 1,
        multi_head: bool = False,
    ):
        super().__init__()
        self.num_tasks = num_tasks
        self.out_dim = out_dim
        self.n_nets = n_nets
        self.n_heads = num_tasks if multi_head else 1
        self.trunk = EnsembleMLP(n_nets, [in_dim + num_tasks, *hidden_sizes], final_relu=True)
        # All heads live in one layer: a head is a block of out_dim rows, computed together and then picked.
        self.head = EnsembleLinear(n_nets, hidden_sizes[-1], self.n_heads * out_dim)
        output_init_(self.head)

    def forward(self, x: th.Tensor, task_ids: th.Tensor, detach: bool = False) -> th.Tensor:
        """``x [B, in_dim]``, ``task_ids [B]`` -> ``[n_nets, B, out_dim]``.

        :param detach: use detached parameters (gradient reaches the inputs only).
        """
        onehot = F.one_hot(task_ids, self.num_tasks).to(x.dtype)
        inputs = th.cat([x, onehot], dim=-1).unsqueeze(0).expand(self.n_nets, -1, -1)
        out = self.head(self.trunk(inputs, detach), detach)
        if self.n_heads == 1:
            return out
        ens, batch = out.shape[:2]
        per_head = out.view(ens, batch, self.n_heads, self.out_dim)
        # Only the sample's own head is picked, so the other heads get exactly zero gradient from it.
        index = task_ids.view(1, batch, 1, 1).expand(ens, batch, 1, self.out_dim)
        return per_head.gather(2, index).squeeze(2)


class MTSACPolicy(TaskNetworkPolicy):
    """MT-SAC: MLP actor and twin MLP critics on ``[state, task one-hot]`` (alias ``"MTSACPolicy"``).

    :param num_tasks: number of tasks (set by the algorithm from the env).
    :param net_arch: hidden sizes, shared by the actor and the critics, or ``dict(pi=[...], qf=[...])``.
    :param n_critics: number of Q networks.
    """

    multi_head = False

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_tasks: int,
        net_arch: NetArch = (400, 400, 400),
        n_critics: int = 2,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        self.net_arch = net_arch
        self.hidden_sizes = resolve_net_arch(net_arch)
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            num_tasks,
            n_critics,
            optimizer_class,
            optimizer_kwargs,
        )

    def make_network(self, role: str, in_dim: int, out_dim: int, n_nets: int) -> TaskMLP:
        return TaskMLP(in_dim, self.num_tasks, out_dim, self.hidden_sizes[role], n_nets, self.multi_head)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(net_arch=self.net_arch)
        return data


class MHSACPolicy(MTSACPolicy):
    """MH-SAC: shared MLP trunk with one output head per task (alias ``"MHSACPolicy"``).

    The actor has ``T`` heads of ``mean || log_std`` and each critic ``T`` scalar heads. During training the task
    id is the sample's env column (given by the core); when acting it is the argmax of the observation's one-hot.
    Arguments are those of :class:`MTSACPolicy`.
    """

    multi_head = True
