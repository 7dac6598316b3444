"""A cheap multi-task env for learning tests: point reaching with one goal per task.

The agent starts near the origin of a 2-D plane and must reach its task's goal; the observation is
``[position, zeros]`` plus the task one-hot, so only the task id tells which goal to reach. A random policy
almost never succeeds; a working multi-task SAC solves every task within a few thousand updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv


def goal_of(task: int, num_tasks: int) -> np.ndarray:
    """Goals evenly spaced on a circle of radius 0.8 (4 tasks: right, up, left, down)."""
    angle = 2 * np.pi * task / num_tasks
    return (0.8 * np.array([np.cos(angle), np.sin(angle)])).astype(np.float32)


class PointReach(gym.Env):
    def __init__(self, task: int, num_tasks: int, horizon: int = 25, state_pad: int = 2):
        self.task, self.num_tasks, self.horizon = task, num_tasks, horizon
        self.state_pad = state_pad
        dim = 2 + state_pad + num_tasks
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.goal = goal_of(task, num_tasks)

    def _obs(self) -> np.ndarray:
        onehot = np.zeros(self.num_tasks, np.float32)
        onehot[self.task] = 1.0
        return np.concatenate([self.pos, np.zeros(self.state_pad, np.float32), onehot]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-0.1, 0.1, 2).astype(np.float32)
        self.t = 0
        self.any_success = False
        return self._obs(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + 0.1 * np.asarray(action, np.float32), -1.0, 1.0)
        self.t += 1
        dist = float(np.linalg.norm(self.pos - self.goal))
        success = dist < 0.15
        self.any_success |= success
        info = {"success": float(success)}
        truncated = self.t >= self.horizon
        if truncated:
            info["is_success"] = float(self.any_success)
        return self._obs(), -dist, False, truncated, info


def make_point_reach(num_tasks: int = 4, seed: int = 0) -> DummyVecEnv:
    env = DummyVecEnv([lambda i=i: Monitor(PointReach(i, num_tasks)) for i in range(num_tasks)])
    env.seed(seed)
    return env


class RandomAgent:
    """Uniform random actions from its own seeded generator (a premise must not depend on test order)."""

    def __init__(self, action_dim: int = 2, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.action_dim = action_dim

    def predict(self, obs: np.ndarray, *args: Any, **kwargs: Any) -> tuple[np.ndarray, None]:
        return self.rng.uniform(-1, 1, (len(obs), self.action_dim)).astype(np.float32), None


POINT_REACH_TRAINING = dict(learning_starts=400, learning_rate=1e-3, ent_coef_lr=3e-3)
"""The learning tests' SAC settings for :func:`assert_learns_point_reach` (with a batch and buffer of each test's
own). ``ent_coef_lr`` is the Adam learning rate of ``log alpha``: the default (1e-4, the authors') suits runs of
millions of steps; in a test's few thousand, alpha hardly moves from 1, a large entropy bonus next to these rewards
(minus a distance under 1.2 per step). With 3e-3 every method's seed 0 solves point reaching in 3k-8k env steps
instead of 8k-22k (PaCo's took the whole 20k)."""


def assert_learns_point_reach(
    model: Any, budget: int = 20_000, chunk: int = 1_000, episodes: int = 8
) -> None:
    """Train ``model`` (built on :func:`make_point_reach` with 4 tasks) until it reaches every goal, or fail.

    The premise is checked first: random actions never reach the goals. Training stops as soon as the mean
    success is at least 0.9 with every task at 0.75 or more, checked every ``chunk`` env steps up to ``budget``.
    """
    from d2r_sb3 import evaluate_per_task

    eval_env = make_point_reach(4, seed=1)
    assert evaluate_per_task(RandomAgent(), eval_env, episodes).mean_success == 0.0
    success = np.zeros(4)
    while model.num_timesteps < budget:
        model.learn(chunk, reset_num_timesteps=False)
        success = evaluate_per_task(model, eval_env, episodes).success
        if success.mean() >= 0.9 and success.min() >= 0.75:
            return
    raise AssertionError(
        f"{type(model.policy).__name__} success after {model.num_timesteps} steps: {success}"
    )


def assert_a_seed_learns_point_reach(
    build: Callable[[int], Any], seeds: tuple[int, ...] = (0, 1, 2), budget: int = 20_000
) -> int:
    """:func:`assert_learns_point_reach` for the model ``build(seed)`` of each of ``seeds`` in turn, until one
    learns (returned); fails with every seed's outcome when none does.

    For an algorithm whose single runs are chaotic: how many steps one seed takes can depend on the float32 rounding
    of the CPU's kernels, so a single seed can miss a budget on one CPU and not on another. An algorithm that does
    not learn still fails every seed (random actions never reach the goals).
    """
    missed = []
    for seed in seeds:
        try:
            assert_learns_point_reach(build(seed), budget)
        except AssertionError as error:
            missed.append(f"seed {seed}: {error}")
        else:
            return seed
    raise AssertionError("no seed learned point reaching: " + "; ".join(missed))
