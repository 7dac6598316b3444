"""The policy :func:`~d2r_sb3.serialization.load_policy` returns: a multi-task policy ready to act, with its env."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.policies import MultiTaskPolicy

__all__ = ["LoadedPolicy", "RecordedEvaluation", "read_recorded_evaluation"]


@dataclass(frozen=True)
class RecordedEvaluation:
    """The evaluation recorded with a policy (its ``results.json``): success per task over many episodes.

    :param success: success rate of each task (full task names, as in :attr:`LoadedPolicy.task_names`).
    :param episodes_per_task: episodes evaluated per task.
    :param deterministic: whether the evaluation acted deterministically.
    :param path: the ``results.json`` it was read from.
    """

    success: dict[str, float]
    episodes_per_task: int
    deterministic: bool
    path: Path

    @property
    def mean_success(self) -> float:
        """Mean of the per-task success rates."""
        return float(np.mean(list(self.success.values())))

    def solved_tasks(self, threshold: float = 0.9) -> list[str]:
        """The tasks with a recorded success rate of at least ``threshold``, in task order."""
        return [task for task, rate in self.success.items() if rate >= threshold]


def read_recorded_evaluation(
    path: Path, task_names: list[str], num_timesteps: int | None = None
) -> RecordedEvaluation | None:
    """Read the ``results.json`` at ``path`` if it describes a policy with these tasks.

    :param path: the ``results.json`` (a published policy's, or a zoo run's final evaluation).
    :param task_names: the loaded policy's tasks; a record of other tasks is not this policy's.
    :param num_timesteps: the loaded policy's env steps, when known: a run's record of another step count (the run
        continued after it) is not this policy's. Records without ``total_timesteps`` are not checked.
    :return: the evaluation, or ``None`` when there is no such file, it has no per-task ``success`` (another
        kind of results record) or it describes another policy. A file that cannot be read as a record
        (unreadable JSON, a ``success`` that is not a mapping of numbers) gives ``None`` with a warning.
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or "success" not in record:
            return None
        success = {str(task): float(rate) for task, rate in record["success"].items()}
        episodes = int(record.get("episodes_per_task") or record.get("episodes") or 0)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        warnings.warn(
            f"Ignored {path}: it is not a readable results record with a per-task 'success' "
            f"({type(error).__name__}: {error}).",
            UserWarning,
            stacklevel=3,
        )
        return None
    steps = record.get("total_timesteps")
    if list(success) != list(task_names) or not all(math.isfinite(rate) for rate in success.values()):
        return None
    if num_timesteps is not None and steps is not None and int(steps) != int(num_timesteps):
        return None
    return RecordedEvaluation(success, episodes, bool(record.get("deterministic", True)), path)


class LoadedPolicy:
    """A multi-task policy ready to act, with what is needed to rebuild its env.

    Only the actor is restored from the safe format; the critics exist (the policy class builds them) but hold
    freshly initialised weights. Load the SB3 ``.zip`` (:attr:`model`) to resume training.

    :param policy: the policy, in eval mode.
    :param algo: registry name of the algorithm (``"d2r"``, ``"mtsac"``, ...) or ``None`` if unknown.
    :param task_names: task of each one-hot index (env column).
    :param env_kwargs: :func:`~d2r_sb3.make_mt_env` keyword arguments of the training env (may be empty).
    :param metadata: free-form information saved with the policy (training steps, results, ...).
    :param source: where the policy was loaded from.
    :param model: the full algorithm when loaded from an SB3 zip (``None`` for the safe format).
    :param origin: what was loaded, for people: ``"local folder logs/d2r/MT10-rand_1/policy"``,
        ``"Hub repo d2r-sb3/d2r-MT10-rand (bundled snapshot)"``, ... (default: ``source``).
    :param evaluation: the evaluation recorded with exactly this policy (a published policy's ``results.json``,
        or a zoo run's final evaluation for its final model), ``None`` when there is none.
    """

    def __init__(
        self,
        policy: MultiTaskPolicy,
        algo: str | None,
        task_names: list[str],
        env_kwargs: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        source: str | None = None,
        model: MultiTaskSAC | None = None,
        origin: str | None = None,
        evaluation: RecordedEvaluation | None = None,
    ):
        self.policy = policy
        self.algo = algo
        self.task_names = list(task_names)
        self.env_kwargs = dict(env_kwargs)
        self.metadata = dict(metadata or {})
        self.source = source
        self.model = model
        self.origin = origin or source
        self.evaluation = evaluation

    @property
    def num_tasks(self) -> int:
        return int(self.policy.num_tasks)

    @property
    def observation_space(self) -> spaces.Space:
        return self.policy.observation_space

    @property
    def action_space(self) -> spaces.Space:
        return self.policy.action_space

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Actions for one observation or a batch (SB3's ``predict``; deterministic by default).

        :param observation: ``[obs_dim]`` or ``[n, obs_dim]`` observations ``[state, task one-hot]``.
        :param state: unused (the policies are not recurrent); kept for SB3 compatibility.
        :param episode_start: unused; kept for SB3 compatibility.
        :param deterministic: ``tanh(mean)`` actions (and TopK routes for D2R) instead of samples.
        :return: ``(actions, None)``.
        """
        return self.policy.predict(observation, state, episode_start, deterministic)

    def route(self, obs: np.ndarray | th.Tensor, deterministic: bool = True) -> Any:
        """The actor's routing path (:class:`~d2r_sb3.RoutingPath`) for a batch of observations.

        :param obs: ``[obs_dim]`` or ``[n, obs_dim]`` observations.
        :param deterministic: TopK routes (else SampleK).
        :raises TypeError: if the policy does not route (e.g. an MLP baseline).
        """
        route = getattr(self.policy, "route", None)
        if route is None:
            raise TypeError(
                f"{type(self.policy).__name__} does not route; only routing policies (D2R) have paths."
            )
        return route(obs, deterministic=deterministic)

    def make_env(self, **overrides: Any) -> Any:
        """Rebuild the policy's env with :func:`~d2r_sb3.make_mt_env` (saved kwargs updated by ``overrides``).

        :param overrides: make_mt_env keyword arguments to change, e.g. ``seed=1``, ``render_mode="rgb_array"``.
        :return: the :class:`~d2r_sb3.envs.metaworld.MultiTaskVecEnv`.
        :raises ValueError: if no benchmark is known, or the env does not match the policy's observations.
        """
        from d2r_sb3.envs import make_mt_env

        kwargs = {**self.env_kwargs, **overrides}
        if "benchmark" not in kwargs:
            raise ValueError(
                f"The env of this policy is unknown (no env_kwargs were saved with {self.source}); pass it "
                f"explicitly, e.g. make_env(benchmark={self.task_names!r})."
            )
        env = make_mt_env(**kwargs)
        if env.observation_space.shape != self.observation_space.shape or env.num_tasks != self.num_tasks:
            shape = env.observation_space.shape
            env.close()
            raise ValueError(
                f"The env built from {kwargs} has {env.num_tasks} tasks and observations of shape {shape}, "
                f"but the policy expects {self.num_tasks} tasks and shape {self.observation_space.shape}."
            )
        return env

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.policy.actor.parameters())
        benchmark = self.env_kwargs.get("benchmark", "?")
        return (
            f"LoadedPolicy(algo={self.algo!r}, policy={type(self.policy).__name__}, num_tasks={self.num_tasks}, "
            f"benchmark={benchmark!r}, actor_params={n_params:,}, source={self.source!r})"
        )
