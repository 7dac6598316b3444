"""Tanh-Gaussian actor and ensemble critic on a *task network*, shared by D2R and the baselines.

A task network maps ``(x [B, in], task_ids [B])`` to ``[E, B, out]`` for an ensemble of ``E`` independent copies
(1 for the actor, ``n_critics`` for the critics, which are evaluated together in one batched call).
:class:`TaskActor` turns it into a tanh-Gaussian policy and :class:`TaskCritic` into Q functions.

Networks whose call takes more than ``(x, task_ids, detach)`` or returns more than the output (D2R's routed
network also takes a route request and returns the chosen sources) override :meth:`TaskActor.network_output` /
:meth:`TaskCritic.network_output`; the extra keyword arguments of :meth:`TaskActor.action_log_prob` and
:meth:`TaskCritic.q_values` are passed through to it.
"""

from __future__ import annotations

import math
from typing import Any

import torch as th
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def squashed_gaussian(
    mean: th.Tensor, log_std: th.Tensor, deterministic: bool = False, with_log_prob: bool = True
) -> tuple[th.Tensor, th.Tensor | None]:
    """Tanh-Gaussian action and its log-probability (the same density as SB3's squashed Gaussian).

    ``log pi = sum_dims [log N(z; mean, std) - log(1 - tanh(z)^2 + 1e-6)]``; the deterministic action is
    ``tanh(mean)``.
    """
    log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
    if deterministic:
        pre_tanh = mean
        noise = th.zeros_like(mean)
    else:
        noise = th.randn_like(mean)
        pre_tanh = mean + log_std.exp() * noise
    action = th.tanh(pre_tanh)
    if not with_log_prob:
        return action, None
    log_prob = (-0.5 * noise.square() - log_std - _HALF_LOG_2PI).sum(-1)
    log_prob = log_prob - th.log(1.0 - action.square() + 1e-6).sum(-1)
    return action, log_prob


def split_observation(obs: th.Tensor, state_dim: int) -> tuple[th.Tensor, th.Tensor]:
    """``obs [B, S + T] -> (state [B, S], task ids [B])``; the task id is the argmax of the one-hot."""
    return obs[..., :state_dim], obs[..., state_dim:].argmax(-1)


class TaskActor(nn.Module):
    """Tanh-Gaussian actor on a task network whose single output is ``mean || log_std``.

    :param net: task network with ``n_nets == 1``, input size ``state_dim`` and output size ``2 * action_dim``.
    :param state_dim: size of the state part of the observation (the task one-hot follows it).
    """

    optimizer: th.optim.Optimizer  # set by MultiTaskPolicy._build

    def __init__(self, net: nn.Module, state_dim: int):
        super().__init__()
        self.net = net
        self.state_dim = state_dim

    def split_obs(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """``obs [B, S + T] -> (state [B, S], task ids [B])``."""
        return split_observation(obs, self.state_dim)

    def network_output(self, state: th.Tensor, task_ids: th.Tensor, **net_kwargs: Any) -> th.Tensor:
        """The network's output ``[1, B, 2 * action_dim]``; ``net_kwargs`` are those of :meth:`distribution`."""
        return self.net(state, task_ids, **net_kwargs)

    def distribution(
        self, obs: th.Tensor, task_ids: th.Tensor | None = None, **net_kwargs: Any
    ) -> tuple[th.Tensor, th.Tensor]:
        """``(mean, log_std)``, each ``[B, action_dim]``; ``task_ids`` defaults to the one-hot's argmax.

        :param net_kwargs: passed to :meth:`network_output` (none for a plain task network).
        """
        state = obs[..., : self.state_dim]
        if task_ids is None:
            task_ids = obs[..., self.state_dim :].argmax(-1)
        out = self.network_output(state, task_ids, **net_kwargs)
        mean, log_std = out[0].chunk(2, dim=-1)
        return mean, log_std

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        """Action ``[B, action_dim]``: a sample, or ``tanh(mean)`` when ``deterministic``."""
        mean, log_std = self.distribution(obs)
        return squashed_gaussian(mean, log_std, deterministic, with_log_prob=False)[0]

    def action_log_prob(
        self, obs: th.Tensor, task_ids: th.Tensor | None = None, **net_kwargs: Any
    ) -> tuple[th.Tensor, th.Tensor]:
        """Reparameterised action sample ``[B, A]`` and its log-probability ``[B]``.

        :param net_kwargs: passed to :meth:`network_output`.
        """
        mean, log_std = self.distribution(obs, task_ids, **net_kwargs)
        return squashed_gaussian(mean, log_std)  # type: ignore[return-value]


class TaskCritic(nn.Module):
    """``n_critics`` Q networks on ``[state, action]`` plus the task, evaluated as one ensemble.

    :param net: task network with ``n_nets == n_critics``, input size ``state_dim + action_dim``, output size 1.
    :param state_dim: size of the state part of the observation.
    :param n_critics: number of Q networks.
    """

    optimizer: th.optim.Optimizer  # set by MultiTaskPolicy._build (not on a target critic)

    def __init__(self, net: nn.Module, state_dim: int, n_critics: int):
        super().__init__()
        self.net = net
        self.state_dim = state_dim
        self.n_critics = n_critics

    def network_output(
        self, state_action: th.Tensor, task_ids: th.Tensor, detach_params: bool, **net_kwargs: Any
    ) -> th.Tensor:
        """The network's output ``[n_critics, B, 1]`` for ``[state, action]`` inputs."""
        return self.net(state_action, task_ids, detach_params, **net_kwargs)

    def q_values(
        self,
        obs: th.Tensor,
        actions: th.Tensor,
        task_ids: th.Tensor | None = None,
        detach_params: bool = False,
        **net_kwargs: Any,
    ) -> th.Tensor:
        """``[n_critics, B]`` Q values.

        :param task_ids: ``[B]`` task indices; ``None`` reads them from the observations' one-hot.
        :param detach_params: use detached parameters, so gradients reach the actions only (actor loss).
        :param net_kwargs: passed to :meth:`network_output` (none for a plain task network).
        """
        state = obs[..., : self.state_dim]
        if task_ids is None:
            task_ids = obs[..., self.state_dim :].argmax(-1)
        out = self.network_output(th.cat([state, actions], dim=-1), task_ids, detach_params, **net_kwargs)
        return out[..., 0]

    def forward(self, obs: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        """SB3's critic interface: a tuple of ``[B, 1]`` Q values."""
        return tuple(q.unsqueeze(-1) for q in self.q_values(obs, actions))
