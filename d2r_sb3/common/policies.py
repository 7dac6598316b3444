"""Base class of every policy trained by :class:`~d2r_sb3.common.mt_sac.MultiTaskSAC`.

The multi-task SAC update calls five policy methods, one per row of D2R_SPEC.md's table 2.4, so that routing
policies can choose routes per call while plain MLP policies ignore routes altogether:

=========================  ===================================================  ============================
method                     used for                                             D2R routes
=========================  ===================================================  ============================
``actor_loss_sample``      ``a ~ pi(.|s)`` in the actor and entropy losses      stored behaviour routes
``target_sample``          ``a' ~ pi(.|s')`` in the TD target                   TopK
``q_values``               ``Q_i(s, a_buffer)`` in the TD regression            fresh SampleK per critic
``q_values_for_actor``     ``Q_i(s, a~)`` in the actor loss (critic frozen)     TopK
``target_q_values``        ``Qbar_i(s', a')`` in the TD target                  TopK
=========================  ===================================================  ============================

Observations are ``[state, task one-hot]`` with the one-hot last, as built by :func:`d2r_sb3.make_mt_env`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import Schedule
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


class MultiTaskPolicy(BasePolicy):
    """SAC-style actor-critic policy for multi-task observations ``[state, task one-hot]``.

    Subclasses implement :meth:`make_actor` and :meth:`make_critic` and, for routing policies, override the
    per-call methods listed in the module docstring. ``num_tasks`` is filled in by the algorithm from the
    number of envs (one env per task).

    :param num_tasks: number of tasks ``T``; the last ``T`` observation entries are the task one-hot.
    :param n_critics: number of Q networks (2 = clipped double Q).
    """

    actor: nn.Module
    critic: nn.Module
    critic_target: nn.Module

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_tasks: int,
        n_critics: int = 2,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=True,
            normalize_images=False,
        )
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise ValueError(
                f"{type(self).__name__} needs a flat Box observation space, got {observation_space}."
            )
        obs_dim = observation_space.shape[0]
        if not 1 <= num_tasks < obs_dim:
            raise ValueError(
                f"num_tasks={num_tasks} does not fit observations of size {obs_dim}: expected the state "
                "followed by a task one-hot of size num_tasks."
            )
        self.num_tasks = num_tasks
        self.n_critics = n_critics
        self.obs_dim = obs_dim
        self.state_dim = obs_dim - num_tasks
        self.action_dim = int(np.prod(action_space.shape))
        self._build(lr_schedule)

    # --- construction ------------------------------------------------------------------------------------
    def make_actor(self) -> nn.Module:
        raise NotImplementedError

    def make_critic(self) -> nn.Module:
        raise NotImplementedError

    def _build(self, lr_schedule: Schedule) -> None:
        self.actor = self.make_actor().to(self.device)
        self.actor.optimizer = self.optimizer_class(
            self.actor.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )
        self.critic = self.make_critic().to(self.device)
        self.critic.optimizer = self.optimizer_class(
            self.critic.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )
        self.critic_target = self.make_critic().to(self.device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.train(False)
        self.critic_target.requires_grad_(False)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            num_tasks=self.num_tasks,
            n_critics=self.n_critics,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
        )
        return data

    # --- observation helpers --------------------------------------------------------------------------
    def split_obs(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """``obs [B, S + T] -> (state [B, S], task ids [B])``; the task id is the one-hot's argmax."""
        return obs[..., : self.state_dim], obs[..., self.state_dim :].argmax(-1)

    # --- acting -------------------------------------------------------------------------------------------
    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        return self._predict(obs, deterministic=deterministic)

    def _predict(self, observation: th.Tensor, deterministic: bool = False) -> th.Tensor:
        return self.actor(observation, deterministic=deterministic)

    def set_training_mode(self, mode: bool) -> None:
        self.actor.train(mode)
        self.critic.train(mode)
        self.training = mode

    def routes_for_buffer(self, obs: np.ndarray, acted: bool) -> np.ndarray | None:
        """Routes to store with the transitions just collected (``None``: this policy does not route).

        :param acted: ``True`` when the policy chose the actions (else they were uniform warm-up actions).
        """
        return None

    def set_route_temperature(self, temperature: th.Tensor) -> None:
        """Per-task routing temperature (route balancing); a no-op for policies that do not route."""

    # --- the five calls of the multi-task SAC update ------------------------------------------------------
    def actor_loss_sample(
        self, obs: th.Tensor, task_ids: th.Tensor, routes: th.Tensor | None
    ) -> tuple[th.Tensor, th.Tensor]:
        return self.actor.action_log_prob(obs, task_ids)

    def target_sample(self, obs: th.Tensor, task_ids: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.actor.action_log_prob(obs, task_ids)

    def q_values(self, obs: th.Tensor, actions: th.Tensor, task_ids: th.Tensor) -> th.Tensor:
        """``[n_critics, B]`` Q values that the TD regression trains."""
        return self.critic.q_values(obs, actions, task_ids)

    def q_values_for_actor(self, obs: th.Tensor, actions: th.Tensor, task_ids: th.Tensor) -> th.Tensor:
        """``[n_critics, B]`` Q values for the actor loss: gradient reaches the actions, not the critic."""
        return self.critic.q_values(obs, actions, task_ids, detach_params=True)

    def target_q_values(self, obs: th.Tensor, actions: th.Tensor, task_ids: th.Tensor) -> th.Tensor:
        return self.critic_target.q_values(obs, actions, task_ids)
