"""Policy base shared by every baseline network.

A baseline only defines a *task network*: a module that maps ``(x [B, in], task_ids [B])`` to ``[E, B, out]``
for an ensemble of ``E`` independent copies (1 for the actor, ``n_critics`` for the critics, which are then
evaluated together in one batched call). :class:`TaskNetworkPolicy` wires it into the multi-task SAC core through
the shared :class:`~d2r_sb3.common.actor_critic.TaskActor` and :class:`~d2r_sb3.common.actor_critic.TaskCritic`
(re-exported here, where they used to live).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from d2r_sb3.common.actor_critic import TaskActor, TaskCritic
from d2r_sb3.common.params import parameter_counts
from d2r_sb3.common.policies import MultiTaskPolicy

__all__ = ["TaskActor", "TaskCritic", "TaskNetworkPolicy"]


class TaskNetworkPolicy(MultiTaskPolicy):
    """Multi-task policy whose actor and critics are copies of one task network architecture.

    A subclass either sets :attr:`network_class` and fills ``self.net_kwargs`` (the network's settings, also
    saved with the policy) before calling ``super().__init__``, or overrides :meth:`make_network`; every other
    policy method comes from :class:`~d2r_sb3.common.policies.MultiTaskPolicy` (no routing, so its five update
    calls are plain).
    """

    actor: TaskActor
    critic: TaskCritic
    critic_target: TaskCritic
    network_class: type[nn.Module] | None = None
    """Built as ``network_class(in_dim, num_tasks, out_dim, n_nets, **net_kwargs)`` by the default
    :meth:`make_network`."""
    net_kwargs: dict[str, Any]

    def make_network(self, role: str, in_dim: int, out_dim: int, n_nets: int) -> nn.Module:
        """Build a task network ``(x [B, in_dim], task_ids [B], detach=False) -> [n_nets, B, out_dim]``.

        :param role: ``"actor"`` or ``"critic"`` (some baselines size the two differently).
        """
        if self.network_class is None:
            raise NotImplementedError(
                f"{type(self).__name__} sets no network_class and does not build its network"
            )
        return self.network_class(in_dim, self.num_tasks, out_dim, n_nets, **self.net_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(getattr(self, "net_kwargs", {}))  # the network's settings, saved with the policy
        return data

    def make_actor(self) -> TaskActor:
        return TaskActor(self.make_network("actor", self.state_dim, 2 * self.action_dim, 1), self.state_dim)

    def make_critic(self) -> TaskCritic:
        net = self.make_network("critic", self.state_dim + self.action_dim, 1, self.n_critics)
        return TaskCritic(net, self.state_dim, self.n_critics)

    def parameter_counts(self) -> dict[str, int]:
        """``{"actor", "critic" (one critic), "n_critics", "total"}``, see :func:`~.params.parameter_counts`."""
        return parameter_counts(self)
