"""Per-task evaluation on a one-env-per-task VecEnv (the metric of multi-task Meta-World: success rate).

SB3's ``evaluate_policy`` spreads episodes over envs without saying which env each came from; here env column
``i`` is task ``i``, so every task gets exactly ``n_episodes`` episodes and its own success rate. An episode
counts as a success if it succeeded at any step (``info["is_success"]`` at episode end, as set by
:func:`d2r_sb3.make_mt_env`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

import numpy as np
from stable_baselines3.common.vec_env import VecEnv


class Predictor(Protocol):
    """Anything with SB3's ``predict`` (an algorithm or a policy)."""

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]: ...


@dataclass
class TaskEvaluation:
    """Per-task results of :func:`evaluate_per_task` (arrays are in task order)."""

    task_names: list[str]
    success: np.ndarray  # success rate per task
    mean_return: np.ndarray
    std_return: np.ndarray
    mean_length: np.ndarray
    episodes: int  # per task
    deterministic: bool
    per_episode_success: np.ndarray = field(repr=False)  # [T, episodes]
    per_episode_return: np.ndarray = field(repr=False)  # [T, episodes]

    @property
    def mean_success(self) -> float:
        return float(self.success.mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: per-task success/return and the means over tasks."""
        data = asdict(self)
        data.pop("per_episode_success")
        data.pop("per_episode_return")
        for key in ("success", "mean_return", "std_return", "mean_length"):
            data[key] = {name: float(v) for name, v in zip(self.task_names, data[key], strict=True)}
        data["mean_success"] = self.mean_success
        data["mean_return_over_tasks"] = float(self.mean_return.mean())
        return data

    def markdown(self) -> str:
        """A Markdown table with one row per task and a mean row."""
        lines = ["| task | success | return (mean ± std) | episodes |", "|---|---|---|---|"]
        for i, name in enumerate(self.task_names):
            lines.append(
                f"| {name} | {self.success[i]:.2f} | {self.mean_return[i]:.1f} ± {self.std_return[i]:.1f} | {self.episodes} |"
            )
        lines.append(
            f"| **mean** | **{self.mean_success:.3f}** | {self.mean_return.mean():.1f} | {self.episodes} |"
        )
        return "\n".join(lines)


def evaluate_per_task(
    model: Predictor,
    env: VecEnv,
    n_episodes: int = 32,
    deterministic: bool = True,
    task_names: list[str] | None = None,
    on_step: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> TaskEvaluation:
    """Run ``n_episodes`` episodes on every task (env column) and return per-task success and return.

    :param model: an SB3 algorithm or policy (anything with ``predict``).
    :param env: one env per task; it is reset first.
    :param n_episodes: episodes per task.
    :param deterministic: deterministic actions (TopK routes and ``tanh(mean)`` for D2R).
    :param task_names: names for the report (default: ``env.task_names`` or ``task0..``).
    :param on_step: called before each step with ``(observations, counting)``, where ``counting[i]`` says that
        env ``i`` is still inside its ``n_episodes`` (e.g. to collect routing paths).
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}.")
    n_envs = env.num_envs
    names = task_names or list(getattr(env, "task_names", [f"task{i}" for i in range(n_envs)]))
    successes = np.zeros((n_envs, n_episodes))
    returns = np.zeros((n_envs, n_episodes))
    lengths = np.zeros((n_envs, n_episodes))
    done_count = np.zeros(n_envs, dtype=int)
    running_return = np.zeros(n_envs)
    running_length = np.zeros(n_envs)
    obs = cast(np.ndarray, env.reset())  # (multi-task observations are flat boxes)
    while (done_count < n_episodes).any():
        if on_step is not None:
            on_step(obs, done_count < n_episodes)
        actions, _ = model.predict(obs, deterministic=deterministic)
        step_obs, rewards, dones, infos = env.step(actions)
        obs = cast(np.ndarray, step_obs)
        running_return += rewards
        running_length += 1
        for i in np.flatnonzero(dones):
            if done_count[i] < n_episodes:
                successes[i, done_count[i]] = float(infos[i].get("is_success", 0.0))
                returns[i, done_count[i]] = running_return[i]
                lengths[i, done_count[i]] = running_length[i]
                done_count[i] += 1
            running_return[i] = 0.0
            running_length[i] = 0
    return TaskEvaluation(
        task_names=names,
        success=successes.mean(1),
        mean_return=returns.mean(1),
        std_return=returns.std(1),
        mean_length=lengths.mean(1),
        episodes=n_episodes,
        deterministic=deterministic,
        per_episode_success=successes,
        per_episode_return=returns,
    )
