"""Actor, twin critics and policy base shared by every baseline network.

A baseline only defines a *task network*: a module that maps ``(x [B, in], task_ids [B])`` to ``[E, B, out]``
for an ensemble of ``E`` independent copies (1 for the actor, ``n_critics`` for the critics, which are then
evaluated together in one batched call). :class:`TaskActor` turns it into a tanh-Gaussian policy and
:class:`TaskCritic` into Q functions; :class:`TaskNetworkPolicy` wires both into the multi-task SAC core.
"""

from __future__ import annotations

import torch as th
from torch import nn

from d2r_sb3.common.params import parameter_counts
from d2r_sb3.common.policies import MultiTaskPolicy, squashed_gaussian


class TaskActor(nn.Module):
    """Tanh-Gaussian actor on a task network whose single output is ``mean || log_std``.

    :param net: task network with ``n_nets == 1``, input size ``state_dim`` and output size ``2 * action_dim``.
    :param state_dim: size of the state part of the observation (the task one-hot follows it).
    """

    def __init__(self, net: nn.Module, state_dim: int):
        super().__init__()
        self.net = net
        self.state_dim = state_dim

    def distribution(self, obs: th.Tensor, task_ids: th.Tensor | None = None) -> tuple[th.Tensor, th.Tensor]:
        """``(mean, log_std)``, each ``[B, action_dim]``; ``task_ids`` defaults to the one-hot's argmax."""
        state = obs[..., : self.state_dim]
        if task_ids is None:
            task_ids = obs[..., self.state_dim :].argmax(-1)
        mean, log_std = self.net(state, task_ids)[0].chunk(2, dim=-1)
        return mean, log_std

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        mean, log_std = self.distribution(obs)
        return squashed_gaussian(mean, log_std, deterministic, with_log_prob=False)[0]

    def action_log_prob(
        self, obs: th.Tensor, task_ids: th.Tensor | None = None
    ) -> tuple[th.Tensor, th.Tensor]:
        """Reparameterised action sample ``[B, A]`` and its log-probability ``[B]``."""
        mean, log_std = self.distribution(obs, task_ids)
        return squashed_gaussian(mean, log_std)  # type: ignore[return-value]


class TaskCritic(nn.Module):
    """``n_critics`` Q networks on ``[state, action]`` plus the task, evaluated as one ensemble.

    :param net: task network with ``n_nets == n_critics``, input size ``state_dim + action_dim``, output size 1.
    :param state_dim: size of the state part of the observation.
    """

    def __init__(self, net: nn.Module, state_dim: int, n_critics: int):
        super().__init__()
        self.net = net
        self.state_dim = state_dim
        self.n_critics = n_critics

    def q_values(
        self,
        obs: th.Tensor,
        actions: th.Tensor,
        task_ids: th.Tensor | None = None,
        detach_params: bool = False,
    ) -> th.Tensor:
        """``[n_critics, B]`` Q values.

        :param detach_params: use detached parameters, so gradients reach the actions only (actor loss).
        """
        state = obs[..., : self.state_dim]
        if task_ids is None:
            task_ids = obs[..., self.state_dim :].argmax(-1)
        return self.net(th.cat([state, actions], dim=-1), task_ids, detach_params)[..., 0]

    def forward(self, obs: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        """SB3's critic interface: a tuple of ``[B, 1]`` Q values."""
        return tuple(q.unsqueeze(-1) for q in self.q_values(obs, actions))


class TaskNetworkPolicy(MultiTaskPolicy):
    """Multi-task policy whose actor and critics are copies of one task network architecture.

    Subclasses implement :meth:`make_network`; every other policy method comes from
    :class:`~d2r_sb3.common.policies.MultiTaskPolicy` (no routing, so its five update calls are plain).
    """

    actor: TaskActor
    critic: TaskCritic
    critic_target: TaskCritic

    def make_network(self, role: str, in_dim: int, out_dim: int, n_nets: int) -> nn.Module:
        """Build a task network ``(x [B, in_dim], task_ids [B], detach=False) -> [n_nets, B, out_dim]``.

        :param role: ``"actor"`` or ``"critic"`` (some baselines size the two differently).
        """
        raise NotImplementedError

    def make_actor(self) -> TaskActor:
        return TaskActor(self.make_network("actor", self.state_dim, 2 * self.action_dim, 1), self.state_dim)

    def make_critic(self) -> TaskCritic:
        net = self.make_network("critic", self.state_dim + self.action_dim, 1, self.n_critics)
        return TaskCritic(net, self.state_dim, self.n_critics)

    def parameter_counts(self) -> dict[str, int]:
        """``{"actor", "critic" (one critic), "n_critics", "total"}``, see :func:`~.params.parameter_counts`."""
        return parameter_counts(self)
