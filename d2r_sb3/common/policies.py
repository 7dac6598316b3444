"""Base class of every policy trained by :class:`~d2r_sb3.common.mt_sac.MultiTaskSAC`.

The multi-task SAC update calls five policy methods, one per network call of a gradient step, so that routing
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

The update asks for ``q_values`` and ``q_values_for_actor`` together, through ``q_values_pair``: both read the
critics from before the update, so a policy may answer them in one pass over its networks (D2R does; the default
makes the two calls).

Observations are ``[state, task one-hot]`` with the one-hot last, as built by :func:`d2r_sb3.make_mt_env`.
:meth:`MultiTaskPolicy.predict` (and D2R's ``route`` / ``critic_route``) accept what SB3's ``predict`` accepts and
check it with :func:`check_observations`: the width, finiteness and an exact task one-hot in every row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import Schedule

# LOG_STD_MIN / LOG_STD_MAX / squashed_gaussian live with the actor; re-exported here, where they used to live.
from d2r_sb3.common.actor_critic import LOG_STD_MAX as LOG_STD_MAX
from d2r_sb3.common.actor_critic import LOG_STD_MIN as LOG_STD_MIN
from d2r_sb3.common.actor_critic import TaskActor, TaskCritic
from d2r_sb3.common.actor_critic import squashed_gaussian as squashed_gaussian
from d2r_sb3.common.optimizers import fused_kwargs

_MAX_ROWS_SHOWN = 10


class InvalidObservationError(ValueError):
    """An input of ``predict`` / ``route`` that is not ``[state, task one-hot]`` observations of the policy.

    :param message: the error message.
    :param kind: ``"type"`` (not numeric), ``"shape"`` (wrong width or rank), ``"nonfinite"`` (NaN or infinity)
        or ``"task"`` (the task part is not exactly a one-hot).
    :param rows: the offending rows of the batch (empty for ``"type"`` / ``"shape"``).
    """

    def __init__(self, message: str, kind: str, rows: Sequence[int] | np.ndarray = ()):
        super().__init__(message)
        self.kind = kind
        self.rows = [int(r) for r in rows]


def _rows_text(rows: np.ndarray, single: bool) -> str:
    if single:
        return "the observation"
    shown = ", ".join(str(int(r)) for r in rows[:_MAX_ROWS_SHOWN])
    more = f", ... ({len(rows)} rows)" if len(rows) > _MAX_ROWS_SHOWN else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more} of the batch"


def _task_part_problem(task: np.ndarray) -> str:
    """Why one row's task part is not a one-hot (its values are finite)."""
    values = np.array2string(task, precision=3, separator=", ", threshold=20)
    if not np.isin(task, (0.0, 1.0)).all():
        return f"it holds values other than 0 and 1: {values}"
    n_ones = int(np.count_nonzero(task))
    return f"it is all zero: {values}" if n_ones == 0 else f"it has {n_ones} ones: {values}"


def check_observations(
    observation: Any, obs_dim: int, num_tasks: int, name: str = "observation"
) -> tuple[np.ndarray, bool]:
    """Check multi-task observations ``[state, task one-hot]`` and return them as a float32 batch.

    Accepts what SB3's ``predict`` accepts: one observation ``[obs_dim]`` or a batch ``[n, obs_dim]`` (``n`` may
    be 0), as a NumPy array of any real dtype, a nested list or a tensor. Vectorised NumPy: a few microseconds
    for a batch of 10 MT10 observations.

    :param observation: the observation(s).
    :param obs_dim: observation width (state + ``num_tasks``).
    :param num_tasks: width of the task one-hot (the last entries).
    :param name: what the input is called in error messages.
    :return: ``(batch, single)``: a float32 ``[n, obs_dim]`` array (the input itself when it already is one) and
        whether a single observation was given.
    :raises InvalidObservationError: (a ``ValueError``) for a non-numeric input, a wrong width or rank, a row
        with a NaN or an infinity (in float32), or a row whose last ``num_tasks`` entries are not exactly a
        one-hot (all zero, several ones, values other than 0 and 1); the message names the rows.
    """
    state_dim = obs_dim - num_tasks
    if isinstance(observation, th.Tensor):
        observation = observation.detach().cpu().numpy()
    elif isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict):
        raise InvalidObservationError(
            f"The {name} is an (obs, info) tuple, as gymnasium's env.reset() returns: pass only the obs "
            "(obs, info = env.reset(); predict(obs)).",
            "type",
        )
    try:
        if isinstance(observation, np.ndarray) and observation.dtype == np.float32:
            batch = observation
        else:
            with np.errstate(over="ignore"):  # beyond float32's range: reported as non-finite below
                batch = np.asarray(observation, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InvalidObservationError(
            f"The {name} must be a numeric array of width {obs_dim} (or a list of such rows), got "
            f"{type(observation).__name__}: {err}",
            "type",
        ) from None
    single = batch.ndim == 1
    if batch.ndim not in (1, 2) or batch.shape[-1] != obs_dim:
        got = (
            f"width {batch.shape[-1]} (shape {batch.shape})"
            if batch.ndim in (1, 2)
            else f"an array of shape {batch.shape}"
        )
        raise InvalidObservationError(
            f"Expected {name}s of width {obs_dim} ({state_dim} state entries, then the one-hot of the "
            f"{num_tasks} tasks): one [{obs_dim}] or a batch [n, {obs_dim}]; got {got}.",
            "shape",
        )
    if single:
        batch = batch[None]
    if not (batch.flags.c_contiguous and batch.flags.writeable):  # (torch refuses or warns otherwise)
        batch = np.array(batch, order="C")
    n = batch.shape[0]
    if n == 0:
        return batch, single
    if not np.isfinite(batch).all():
        rows = np.flatnonzero(~np.isfinite(batch).all(axis=1))
        raise InvalidObservationError(
            f"{_rows_text(rows, single).capitalize()} hold{'s' if single or len(rows) == 1 else ''} NaN or "
            f"infinite values (in float32); {name}s must be finite.",
            "nonfinite",
            rows,
        )
    task = batch[:, state_dim:]
    # Exact one-hot rows, in two reductions: every row's maximum is 1 and there are n non-zeros in all, so
    # every row has exactly one non-zero, and it is its maximum, 1.
    if (task.max(axis=1) == 1.0).all() and np.count_nonzero(task) == n:
        return batch, single
    ones = task == 1.0
    bad = ~((ones.sum(axis=1) == 1) & (ones | (task == 0.0)).all(axis=1))
    rows = np.flatnonzero(bad)
    raise InvalidObservationError(
        f"The last {num_tasks} entries of an {name} are its task one-hot (exactly one 1, the rest 0), but not "
        f"in {_rows_text(rows, single)}: {'' if single else f'in row {rows[0]}, '}"
        f"{_task_part_problem(task[rows[0]])}. Build observations as [state, one-hot of the task] "
        "(make_mt_env does).",
        "task",
        rows,
    )


class MultiTaskPolicy(BasePolicy):
    """SAC-style actor-critic policy for multi-task observations ``[state, task one-hot]``.

    Subclasses implement :meth:`make_actor` and :meth:`make_critic` and, for routing policies, override the
    per-call methods listed in the module docstring. ``num_tasks`` is filled in by the algorithm from the
    number of envs (one env per task).

    :param num_tasks: number of tasks ``T``; the last ``T`` observation entries are the task one-hot.
    :param n_critics: number of Q networks (2 = clipped double Q).
    """

    action_space: spaces.Box  # (SAC's action spaces are boxes)
    actor: TaskActor
    critic: TaskCritic
    critic_target: TaskCritic

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
    def make_actor(self) -> TaskActor:
        raise NotImplementedError

    def make_critic(self) -> TaskCritic:
        raise NotImplementedError

    def _build(self, lr_schedule: Schedule) -> None:
        # A concrete optimizer class, whose constructor takes ``lr`` (the base Optimizer's does not).
        make_optimizer: Callable[..., th.optim.Optimizer] = self.optimizer_class
        self.actor = self.make_actor().to(self.device)
        kwargs = fused_kwargs(self.optimizer_class, self.optimizer_kwargs, self.actor.parameters())
        self.actor.optimizer = make_optimizer(self.actor.parameters(), lr=lr_schedule(1), **kwargs)
        self.critic = self.make_critic().to(self.device)
        kwargs = fused_kwargs(self.optimizer_class, self.optimizer_kwargs, self.critic.parameters())
        self.critic.optimizer = make_optimizer(self.critic.parameters(), lr=lr_schedule(1), **kwargs)
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

    def check_observations(self, observation: Any, name: str = "observation") -> tuple[np.ndarray, bool]:
        """:func:`check_observations` for this policy's width and number of tasks: ``(float32 batch, single)``."""
        return check_observations(observation, self.obs_dim, self.num_tasks, name)

    # --- acting -------------------------------------------------------------------------------------------
    def predict(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """SB3's ``predict``, with the observations checked (:func:`check_observations`).

        :param observation: one observation ``[obs_dim]`` (gives one action) or a batch ``[n, obs_dim]`` (gives
            ``[n, action_dim]``; an empty batch gives an empty one), any real dtype, a list or a tensor.
        :param state: unused (not recurrent), returned as is.
        :param episode_start: unused.
        :param deterministic: ``tanh(mean)`` actions instead of samples.
        :return: ``(actions, state)``, actions in the action space's bounds.
        :raises InvalidObservationError: (a ``ValueError``) wrong width, non-finite rows or a task part that is
            not exactly a one-hot.
        """
        self.set_training_mode(False)
        batch, single = self.check_observations(observation)
        shape = self.action_space.shape
        if batch.shape[0] == 0:
            actions = np.zeros((0, *shape), dtype=self.action_space.dtype)
        else:
            with th.no_grad():
                actions_t = self._predict(
                    th.as_tensor(batch, device=self.device), deterministic=deterministic
                )
            actions = actions_t.cpu().numpy().reshape((-1, *shape))
            if isinstance(self.action_space, spaces.Box):
                if self.squash_output:
                    actions = self.unscale_action(actions)
                else:
                    actions = np.clip(actions, self.action_space.low, self.action_space.high)
        return (actions[0] if single else actions), state

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        return self._predict(obs, deterministic=deterministic)

    # SB3's signature also allows dict observations; multi-task observations are flat Boxes.
    def _predict(self, observation: th.Tensor, deterministic: bool = False) -> th.Tensor:  # type: ignore[override]
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

    def q_values_pair(
        self, obs: th.Tensor, actions: th.Tensor, actions_pi: th.Tensor, task_ids: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor]:
        """``(q_values(obs, actions), q_values_for_actor(obs, actions_pi))``, in that order.

        The update needs both from the same (pre-update) critics; a policy may compute them in one pass over its
        networks (D2R does). This default makes the two calls.
        """
        return self.q_values(obs, actions, task_ids), self.q_values_for_actor(obs, actions_pi, task_ids)

    def target_q_values(self, obs: th.Tensor, actions: th.Tensor, task_ids: th.Tensor) -> th.Tensor:
        return self.critic_target.q_values(obs, actions, task_ids)
