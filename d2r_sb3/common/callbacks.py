"""Training callbacks for one-env-per-task training: per-task evaluation and periodic checkpoints.

Both count their period in env steps **per task** (as the multi-task RL papers do) and trigger on the algorithm's
total step counter, so a resumed run (``learn(..., reset_num_timesteps=False)``) keeps the same schedule: with
``T`` tasks, ``eval_freq_per_task=10_000`` evaluates at 100k, 200k, ... total steps on MT10.

Example::

    from d2r_sb3 import D2RSAC, make_mt_env
    from d2r_sb3.common.callbacks import PerTaskEvalCallback

    model = D2RSAC("D2RPolicy", make_mt_env("MT10", seed=0))
    callback = PerTaskEvalCallback(make_mt_env("MT10", seed=0), best_model_save_path="run", log_path="run")
    model.learn(1_000_000, callback=callback)
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from d2r_sb3.common.checkpoints import atomic_save, env_rng_states, set_env_rng_states
from d2r_sb3.common.evaluation import TaskEvaluation, evaluate_per_task
from d2r_sb3.common.files import atomic_write_bytes
from d2r_sb3.common.nonfinite import first_nonfinite_tensor
from d2r_sb3.common.schedule import PerTaskPeriod, check_freq_per_task
from d2r_sb3.envs import short_task_name

__all__ = ["MultiTaskCheckpointCallback", "PerTaskEvalCallback", "evaluations_up_to"]

EVALUATIONS_FILE = "evaluations.json"
BEST_MODEL_NAME = "best_model"
_PER_EVALUATION_LISTS = ("timesteps", "timesteps_per_task", "mean_success", "mean_return", "wall_time")
_PER_TASK_LISTS = ("success", "return")


def evaluations_up_to(history: dict[str, Any], num_timesteps: int) -> dict[str, Any]:
    """An ``evaluations.json`` history cut to the evaluations made at or before ``num_timesteps`` env steps.

    :param history: the history (:class:`PerTaskEvalCallback`'s format).
    :param num_timesteps: the last env step (summed over tasks) to keep.
    :return: a new history with the same other entries (task names, episodes per evaluation, ...).
    """
    keep = [i for i, steps in enumerate(history.get("timesteps", [])) if steps <= num_timesteps]
    cut = dict(history)
    for key in _PER_EVALUATION_LISTS:
        if key in history:
            cut[key] = [history[key][i] for i in keep]
    for key in _PER_TASK_LISTS:
        if key in history:
            cut[key] = {name: [values[i] for i in keep] for name, values in history[key].items()}
    return cut


class PerTaskEvalCallback(BaseCallback):
    """Evaluate every task periodically on a separate env; log per-task success and keep the best model.

    Every ``eval_freq_per_task`` env steps per task it runs ``n_eval_episodes`` episodes on every task of
    ``eval_env`` (:func:`~d2r_sb3.common.evaluation.evaluate_per_task`) and

    * logs ``eval/success`` (mean over tasks), ``eval/success/<task>`` (short names, without ``-v3``) and
      ``eval/return`` (mean over tasks of the mean episode return), then dumps the logger;
    * appends the result to ``<log_path>/evaluations.json``: ``timesteps``, ``timesteps_per_task``,
      ``mean_success``, ``mean_return``, ``wall_time`` (Unix time) lists, and ``success`` / ``return`` mappings
      ``task -> list`` (full task names), plus ``task_names``, ``n_eval_episodes`` and ``deterministic``;
    * saves ``<best_model_save_path>/best_model.zip`` when the mean success improves (ties: higher mean return).

    When ``evaluations.json`` already exists (a resumed run), its history up to the current step count is kept
    and the best score so far is taken from it.

    :param eval_env: One env per task, in the training env's task order (e.g. ``make_mt_env`` with the
        training env's arguments).
    :param eval_freq_per_task: Evaluate every this many env steps per task (the paper: 10,000).
    :param n_eval_episodes: Episodes per task at each evaluation (the paper: 32).
    :param best_model_save_path: Folder of ``best_model.zip`` (None: not saved).
    :param log_path: Folder of ``evaluations.json`` (None: not written).
    :param deterministic: Deterministic actions (for D2R also deterministic TopK routes).
    :param verbose: 1 prints one line per evaluation.
    """

    def __init__(
        self,
        eval_env: VecEnv,
        eval_freq_per_task: int = 10_000,
        n_eval_episodes: int = 32,
        best_model_save_path: str | Path | None = None,
        log_path: str | Path | None = None,
        deterministic: bool = True,
        verbose: int = 1,
    ) -> None:
        super().__init__(verbose=verbose)
        self.eval_env = eval_env
        self.eval_freq_per_task = check_freq_per_task("eval_freq_per_task", eval_freq_per_task)
        self.n_eval_episodes = check_freq_per_task("n_eval_episodes", n_eval_episodes)
        self.best_model_save_path = Path(best_model_save_path) if best_model_save_path is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.deterministic = deterministic
        self._period = PerTaskPeriod(self.eval_freq_per_task)
        self.best_score: tuple[float, float] = (-np.inf, -np.inf)
        self.last_evaluation: TaskEvaluation | None = None
        self.history: dict[str, Any] = {}

    @property
    def evaluations_path(self) -> Path | None:
        """``<log_path>/evaluations.json`` (None without a log path)."""
        return self.log_path / EVALUATIONS_FILE if self.log_path is not None else None

    def _init_callback(self) -> None:
        num_tasks = self.model.n_envs
        if self.eval_env.num_envs != num_tasks:
            raise ValueError(
                f"The eval env has {self.eval_env.num_envs} envs but the model trains on {num_tasks} (one env per "
                f"task): build the eval env with the training env's arguments."
            )
        train_names = getattr(self.model, "task_names", None)
        eval_names = getattr(self.eval_env, "task_names", None)
        if train_names is not None and eval_names is not None and list(train_names) != list(eval_names):
            raise ValueError(
                f"The eval env's tasks {eval_names} differ from the training tasks {train_names}."
            )
        self.task_names = list(eval_names or train_names or [f"task{i}" for i in range(num_tasks)])
        self._period.start(num_tasks, self.model.num_timesteps)
        for folder in (self.best_model_save_path, self.log_path):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        self.history = self._load_history(self.model.num_timesteps)

    def _empty_history(self) -> dict[str, Any]:
        return {
            "task_names": self.task_names,
            "n_eval_episodes": self.n_eval_episodes,
            "deterministic": self.deterministic,
            "timesteps": [],
            "timesteps_per_task": [],
            "mean_success": [],
            "mean_return": [],
            "wall_time": [],
            "success": {name: [] for name in self.task_names},
            "return": {name: [] for name in self.task_names},
        }

    def _load_history(self, num_timesteps: int) -> dict[str, Any]:
        """Evaluations of an earlier session of this run, up to the current step count (resume)."""
        path = self.evaluations_path
        if path is None or not path.is_file():
            return self._empty_history()
        saved = json.loads(path.read_text())
        if saved.get("task_names") != self.task_names:
            raise ValueError(f"{path} holds evaluations of other tasks ({saved.get('task_names')}).")
        cut = evaluations_up_to(saved, num_timesteps)
        history = self._empty_history()
        for key in _PER_EVALUATION_LISTS:
            history[key] = cut[key]
        for key in _PER_TASK_LISTS:
            history[key] = {name: cut[key][name] for name in self.task_names}
        best_model = (
            None
            if self.best_model_save_path is None
            else self.best_model_save_path / f"{BEST_MODEL_NAME}.zip"
        )
        # The earlier best counts only while its model exists: a run warm-started with its seed's history has
        # none yet, and its first evaluation must write one. (A rebuilt history may lack returns: None ranks lowest.)
        if history["timesteps"] and (best_model is None or best_model.is_file()):
            returns = [-np.inf if r is None else r for r in history["mean_return"]]
            self.best_score = max(zip(history["mean_success"], returns, strict=True))
        return history

    def _on_step(self) -> bool:
        if self._period.due(self.num_timesteps):
            self.evaluate()
        return True

    def evaluate(self) -> TaskEvaluation | None:
        """Run one evaluation now: log it, record it in the history and save the best model.

        A policy with a non-finite weight is not evaluated (its actions would be garbage), never saved as the best
        model nor counted as a best: a warning says so and ``None`` is returned.
        """
        broken = first_nonfinite_tensor(self.model.policy.state_dict().items())
        if broken is not None:
            warnings.warn(
                f"Eval num_timesteps={self.num_timesteps}: the policy's {broken} is not finite, so it is not "
                f"evaluated and {BEST_MODEL_NAME}.zip is not written.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        result = evaluate_per_task(
            self.model, self.eval_env, n_episodes=self.n_eval_episodes, deterministic=self.deterministic
        )
        self.last_evaluation = result
        mean_return = float(result.mean_return.mean())
        self._record(result, mean_return)

        self.logger.record("eval/success", result.mean_success)
        self.logger.record("eval/return", mean_return)
        for name, success in zip(self.task_names, result.success, strict=True):
            self.logger.record(f"eval/success/{short_task_name(name)}", float(success))
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")

        score = (result.mean_success, mean_return)
        is_best = score > self.best_score
        if is_best:
            self.best_score = score
            if self.best_model_save_path is not None:
                atomic_save(self.model, self.best_model_save_path / BEST_MODEL_NAME)
        if self.verbose >= 1:
            marker = " (new best)" if is_best else ""
            print(
                f"Eval num_timesteps={self.num_timesteps}: success {result.mean_success:.3f}, "
                f"return {mean_return:.2f}{marker}"
            )
        self.logger.dump(self.num_timesteps)
        return result

    def state_dict(self) -> dict[str, Any]:
        """What a training checkpoint keeps of this callback: the history, the best score and the eval env's RNG.

        With :meth:`load_state_dict` a resumed run evaluates on the same goals as the uninterrupted one would.
        """
        rng = env_rng_states(self.eval_env)
        return {"history": self.history, "best_score": list(self.best_score), "eval_env_rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` before ``learn()`` (it rewrites ``evaluations.json`` from the saved history)."""
        if state.get("eval_env_rng") is not None:
            set_env_rng_states(self.eval_env, state["eval_env_rng"])
        self.best_score = tuple(state["best_score"])
        self.history = state["history"]
        if self.evaluations_path is not None and self.history:
            self._write_history()

    def _record(self, result: TaskEvaluation, mean_return: float) -> None:
        history = self.history
        history["timesteps"].append(int(self.num_timesteps))
        history["timesteps_per_task"].append(int(self.num_timesteps) // len(self.task_names))
        history["mean_success"].append(result.mean_success)
        history["mean_return"].append(mean_return)
        history["wall_time"].append(time.time())
        for i, name in enumerate(self.task_names):
            history["success"][name].append(float(result.success[i]))
            history["return"][name].append(float(result.mean_return[i]))
        if self.evaluations_path is not None:
            self._write_history()

    def _write_history(self) -> None:
        path = self.evaluations_path
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic: a plot reading the file mid-run, or a crash, never leaves half of it.
        atomic_write_bytes(path, (json.dumps(self.history, indent=1) + "\n").encode())


class MultiTaskCheckpointCallback(BaseCallback):
    """Save ``<name_prefix>_<total steps>_steps.zip`` every ``save_freq_per_task`` env steps per task.

    The names are those of SB3's ``CheckpointCallback``. With ``save_replay_buffer=True`` the replay buffer is
    saved next to it as ``<name_prefix>_replay_buffer_<total steps>_steps.pkl``; only the newest
    ``keep_replay_buffers`` buffers are kept, since each one holds the whole buffer (hundreds of MB on MT10).

    :param save_freq_per_task: Save every this many env steps per task.
    :param save_path: Folder of the checkpoints.
    :param name_prefix: File name prefix.
    :param save_replay_buffer: Also save the replay buffer (needed to resume training from a checkpoint).
    :param keep_replay_buffers: Number of newest replay-buffer checkpoints to keep (>= 1).
    :param verbose: 1 prints the path of every checkpoint.
    """

    def __init__(
        self,
        save_freq_per_task: int,
        save_path: str | Path,
        name_prefix: str = "rl_model",
        save_replay_buffer: bool = False,
        keep_replay_buffers: int = 1,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose=verbose)
        self.save_freq_per_task = check_freq_per_task("save_freq_per_task", save_freq_per_task)
        self.save_path = Path(save_path)
        self.name_prefix = name_prefix
        self.save_replay_buffer = save_replay_buffer
        self.keep_replay_buffers = check_freq_per_task("keep_replay_buffers", keep_replay_buffers)
        self._period = PerTaskPeriod(self.save_freq_per_task)

    def _init_callback(self) -> None:
        self.save_path.mkdir(parents=True, exist_ok=True)
        self._period.start(self.model.n_envs, self.model.num_timesteps)

    def checkpoint_path(self, num_timesteps: int, replay_buffer: bool = False) -> Path:
        """Path of the model (or replay-buffer) checkpoint taken at ``num_timesteps`` total steps."""
        if replay_buffer:
            return self.save_path / f"{self.name_prefix}_replay_buffer_{num_timesteps}_steps.pkl"
        return self.save_path / f"{self.name_prefix}_{num_timesteps}_steps.zip"

    def _on_step(self) -> bool:
        if not self._period.due(self.num_timesteps):
            return True
        path = self.checkpoint_path(self.num_timesteps)
        self.model.save(path)
        if self.verbose >= 1:
            print(f"Saving model checkpoint to {path}")
        if self.save_replay_buffer and getattr(self.model, "replay_buffer", None) is not None:
            buffer_path = self.checkpoint_path(self.num_timesteps, replay_buffer=True)
            self.model.save_replay_buffer(buffer_path)  # type: ignore[attr-defined]
            # Newest by write time, not by step count: after resuming from an older checkpoint, buffers of
            # the abandoned later steps are the stale ones.
            others = sorted(
                (
                    p
                    for p in self.save_path.glob(f"{self.name_prefix}_replay_buffer_*_steps.pkl")
                    if p != buffer_path
                ),
                key=lambda p: p.stat().st_mtime,
            )
            for stale in others[: len(others) - (self.keep_replay_buffers - 1)]:
                stale.unlink()
            if self.verbose >= 1:
                print(f"Saving replay buffer checkpoint to {buffer_path}")
        return True
