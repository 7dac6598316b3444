"""Replay buffer for one-env-per-task training: task ids, stratified batches and stored routing paths."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecNormalize


class MultiTaskReplayBufferSamples(NamedTuple):
    """SB3's ``ReplayBufferSamples`` fields (less ``discounts``: no n-step returns here), the task id and the stored
    route of every transition."""

    observations: th.Tensor
    actions: th.Tensor
    next_observations: th.Tensor
    dones: th.Tensor
    rewards: th.Tensor
    task_ids: th.Tensor
    routes: th.Tensor | None


class MultiTaskReplayBuffer(ReplayBuffer):
    """SB3 replay buffer whose env column is the task id (one env per task, in task order).

    Arrays are ``[buffer_size // T, T, ...]``, so every task keeps ``buffer_size // T`` transitions, as in the
    authors' shared buffer (100k per task on MT10 with ``buffer_size=1e6``).

    :param stratified: sample ``batch_size / T`` time indices and take **all** tasks at each (D2R's stratified
        batch: exactly ``batch_size / T`` transitions per task). ``False`` samples an env column per transition
        (SB3's behaviour).
    Routes (uint8 arrays, e.g. ``[16, 2]`` per transition for D2R) are written with :meth:`add_routes` just before
    :meth:`add`; the array is allocated on the first write, so buffers of non-routing policies hold none.
    """

    routes: np.ndarray | None

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        stratified: bool = True,
    ):
        if optimize_memory_usage:
            raise ValueError("MultiTaskReplayBuffer does not support optimize_memory_usage=True.")
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device=device,
            n_envs=n_envs,
            optimize_memory_usage=False,
            handle_timeout_termination=handle_timeout_termination,
        )
        self.stratified = stratified
        self.routes = None

    def add_routes(self, routes: np.ndarray) -> None:
        """Store the behaviour policy's routes ``[n_envs, ...]`` for the transition that :meth:`add` writes next."""
        routes = np.asarray(routes)
        if routes.shape[0] != self.n_envs:
            raise ValueError(f"routes must have one row per env ({self.n_envs}), got shape {routes.shape}.")
        if self.routes is None:
            self.routes = np.zeros((self.buffer_size, self.n_envs, *routes.shape[1:]), dtype=np.uint8)
        self.routes[self.pos] = routes

    def sample(self, batch_size: int, env: VecNormalize | None = None) -> MultiTaskReplayBufferSamples:  # type: ignore[override]
        upper = self.buffer_size if self.full else self.pos
        if upper == 0:
            raise RuntimeError("Cannot sample from an empty replay buffer.")
        if self.stratified:
            if batch_size % self.n_envs != 0:
                raise ValueError(
                    f"Stratified batches take the same number of samples from each of the {self.n_envs} tasks: "
                    f"batch_size={batch_size} must be a multiple of {self.n_envs} (e.g. {128 * self.n_envs})."
                )
            rows = np.random.randint(0, upper, size=batch_size // self.n_envs)
            batch_inds = np.repeat(rows, self.n_envs)
            env_inds = np.tile(np.arange(self.n_envs), len(rows))
        else:
            batch_inds = np.random.randint(0, upper, size=batch_size)
            env_inds = np.random.randint(0, self.n_envs, size=batch_size)
        return self._get_task_samples(batch_inds, env_inds, env)

    def _get_task_samples(
        self, batch_inds: np.ndarray, env_inds: np.ndarray, env: VecNormalize | None
    ) -> MultiTaskReplayBufferSamples:
        # (SB3 types the result as an array or a dict of arrays; an array gives an array)
        obs = cast(np.ndarray, self._normalize_obs(self.observations[batch_inds, env_inds, :], env))
        next_obs = cast(np.ndarray, self._normalize_obs(self.next_observations[batch_inds, env_inds, :], env))
        # Time-limit truncations are not terminals when handle_timeout_termination is on (SB3 semantics).
        dones = self.dones[batch_inds, env_inds] * (1 - self.timeouts[batch_inds, env_inds])
        rewards = self._normalize_reward(self.rewards[batch_inds, env_inds].reshape(-1, 1), env)
        routes = self.to_torch(self.routes[batch_inds, env_inds]) if self.routes is not None else None
        return MultiTaskReplayBufferSamples(
            observations=self.to_torch(obs),
            actions=self.to_torch(self.actions[batch_inds, env_inds, :]),
            next_observations=self.to_torch(next_obs),
            dones=self.to_torch(dones.reshape(-1, 1)),
            rewards=self.to_torch(rewards),
            task_ids=th.as_tensor(env_inds, device=self.device, dtype=th.long),
            routes=routes,
        )

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> Any:
        env_inds = np.random.randint(0, self.n_envs, size=(len(batch_inds),))
        return self._get_task_samples(batch_inds, env_inds, env)
