"""A single task of a multi-task env, seen exactly as the policy saw it in training (for ``enjoy.py``).

Stepping the whole benchmark to watch one task wastes nine (or 49) simulations per step. :func:`make_task_env`
builds only the task's Meta-World env, and its observations are identical to the task's column of
``make_mt_env(**env_kwargs)``: the same state, the same goal/object sequence and the task one-hot at the
model's index over all ``T`` tasks.

Why this is exact: :func:`d2r_sb3.make_mt_env` seeds every sub-env from ``(seed, task name)`` only, so a
one-task env built from the task's name draws the same goals; the one-hot (of length 1 there) is widened back
to ``T`` entries at the task's index. The one exception is the ``"mw3"`` goal mode on MT10/MT50, whose 50 goals
per task are sampled for the whole benchmark at once: there the full env is built and the task's sub-env used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from d2r_sb3.envs import make_mt_env, task_index


class TaskOneHot(gym.ObservationWrapper):
    """Replace the trailing one-hot of a one-task env by a one-hot over ``num_tasks`` tasks.

    :param env: A one-task env whose observation ends with a 1-entry one-hot.
    :param task_index: Index of the task in the multi-task env.
    :param num_tasks: Number of tasks of the multi-task env.
    """

    def __init__(self, env: gym.Env, task_index: int, num_tasks: int) -> None:
        super().__init__(env)
        if not 0 <= task_index < num_tasks:
            raise ValueError(f"task_index must be in [0, {num_tasks}), got {task_index}.")
        inner = env.observation_space
        assert isinstance(inner, gym.spaces.Box)
        self.state_dim = inner.shape[0] - 1
        self._one_hot = np.zeros(num_tasks, dtype=np.float32)
        self._one_hot[task_index] = 1.0
        self.observation_space = gym.spaces.Box(
            low=np.concatenate([inner.low[: self.state_dim], np.zeros(num_tasks)]).astype(np.float32),
            high=np.concatenate([inner.high[: self.state_dim], np.ones(num_tasks)]).astype(np.float32),
            dtype=np.float32,
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.concatenate([observation[: self.state_dim], self._one_hot])


def make_task_env(
    env_kwargs: dict[str, Any],
    task: str,
    task_names: Sequence[str],
    **overrides: Any,
) -> gym.Env:
    """One task of ``make_mt_env(**env_kwargs)`` as a Gymnasium env (with ``info["is_success"]`` at episode end).

    :param env_kwargs: make_mt_env arguments of the model's env (``benchmark``, ``goals``, ``seed``, ...).
    :param task: Task name, with or without ``-v3``.
    :param task_names: The model's tasks in one-hot order.
    :param overrides: make_mt_env arguments to change (``render_mode``, ``camera_name``, ``width``, ...).
    :return: The env; close it when done (it may hold a rendering context).
    :raises ValueError: If ``task`` is not one of ``task_names``.
    """
    index = task_index(task_names, task, owner="the model")
    names = list(task_names)
    full_name = names[index]
    kwargs = {**env_kwargs, **overrides, "vec_env": "dummy"}
    benchmark = kwargs.pop("benchmark")
    if kwargs.get("goals") == "mw3" and isinstance(benchmark, str):
        # Meta-World 3 goal pools are sampled per benchmark: only the full env reproduces them.
        return make_mt_env(benchmark, **kwargs).venv.envs[index]  # type: ignore[attr-defined]
    single = make_mt_env([full_name], **kwargs).venv.envs[0]  # type: ignore[attr-defined]
    return TaskOneHot(single, index, len(names))
