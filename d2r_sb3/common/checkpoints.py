"""Training checkpoints that survive a crash: atomic, verified, and exact to resume.

A checkpoint is one folder ``<root>/step_<total env steps>/`` holding everything a run needs to continue as if
it had never stopped:

==================  =====================================================================================
``model.zip``       SB3's save: weights, optimisers, log alpha, routing temperatures, step/update counters
``replay_buffer.npz``  the filled part of the replay buffer, routes included (uncompressed arrays)
``state.json``      what SB3 does not save: every RNG state (torch, numpy, Python, the action space's, each
                    sub-env's), the episode counter and statistics, the last observation, how far each
                    sub-env is into its episode, and the callbacks' state (evaluation history, best score)
``env_kwargs.yml``  the env's ``make_mt_env`` settings (when the env has them), so that a checkpoint folder
                    copied out of its run is still evaluated on the env it was trained on
``manifest.json``   written last: the size and SHA-256 of every other file
==================  =====================================================================================

It is written into a hidden ``.partial-*`` folder, flushed to disk, then renamed into place, so a crash or a
full disk during the write leaves either the complete checkpoint or none (the partial folder is removed on
the next start). :meth:`CheckpointStore.latest` checks the manifest of the newest checkpoint and falls back to
older ones when it is damaged; only the newest ``keep`` checkpoints are kept.

Resuming mid-episode without saving simulator state: the env's sub-envs (wrapped in
:class:`~d2r_sb3.envs.wrappers.EpisodeReplay`, as :func:`~d2r_sb3.make_mt_env` does) remember the RNG state their
current episode started from; on resume each episode is rebuilt by resetting from that state and replaying its
actions, read back from the replay buffer. The rebuilt observation is compared with the saved one, so a resume
that cannot be exact says so.

Usage (the zoo's ``train.py`` does this)::

    store = CheckpointStore("run/checkpoints", keep=2)
    callback = TrainingCheckpointCallback(store, save_interval_minutes=10)
    model.learn(total, callback=callback)
    ...
    checkpoint = store.latest()
    model = D2RSAC.load(checkpoint.model_path, env=env)
    restore_training_state(model, checkpoint)
    model.learn(total - model.num_timesteps, reset_num_timesteps=False, callback=...)
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import yaml
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from d2r_sb3.common.files import atomic_write_bytes, fsync_dir, fsync_file, sha256_file, to_plain
from d2r_sb3.common.run_layout import ENV_KWARGS_FILE
from d2r_sb3.common.schedule import PerTaskPeriod, check_freq_per_task

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "TrainingCheckpointCallback",
    "TrainingInterrupted",
    "capture_training_state",
    "restore_training_state",
]

CHECKPOINT_FORMAT = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.zip"
BUFFER_FILE = "replay_buffer.npz"
STATE_FILE = "state.json"
_PREFIX = "step_"
_PARTIAL_PREFIX = ".partial-"
_BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts", "routes")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged, or cannot be written."""


class TrainingInterrupted(Exception):  # noqa: N818 - it is a stop request, not an error
    """Raised out of ``learn()`` once a stop request (SIGINT / SIGTERM) has been checkpointed.

    :ivar checkpoint: The checkpoint written before stopping.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(f"Training stopped after writing {checkpoint.path}")
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def atomic_save(model: BaseAlgorithm, path: str | Path) -> Path:
    """``model.save(path)`` written atomically (a temporary file renamed into place); returns the ``.zip`` path."""
    path = Path(path)
    if path.suffix != ".zip":
        path = path.with_name(path.name + ".zip")
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.zip")
    try:
        model.save(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# JSON encodings of RNG states and arrays
# --------------------------------------------------------------------------------------------------
def _encode_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode(),
    }


def _decode_array(data: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(data["data"])
    return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()


def _to_json(value: Any) -> Any:
    """Plain JSON types for RNG states (tuples become lists, numpy arrays tagged encodings)."""
    if isinstance(value, np.ndarray):
        return {"__array__": _encode_array(value)}
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return _decode_array(value["__array__"])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def _tuples(value: Any) -> Any:
    """Lists back to tuples (Python's ``random.setstate`` wants nested tuples)."""
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def _global_rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": _encode_array(th.get_rng_state().numpy()),
        "numpy": _to_json(np.random.get_state()),
        "python": _to_json(random.getstate()),
    }
    if th.cuda.is_available() and th.cuda.is_initialized():
        states["cuda"] = [_encode_array(state.numpy()) for state in th.cuda.get_rng_state_all()]
    return states


def _set_global_rng_states(states: dict[str, Any]) -> None:
    th.set_rng_state(th.from_numpy(_decode_array(states["torch"])))
    numpy_state = _from_json(states["numpy"])
    np.random.set_state(tuple(numpy_state))
    random.setstate(_tuples(states["python"]))
    if "cuda" in states and th.cuda.is_available():
        cuda_states = [th.from_numpy(_decode_array(state)) for state in states["cuda"]]
        if len(cuda_states) == th.cuda.device_count():
            th.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------------
# Replay buffer
# --------------------------------------------------------------------------------------------------
def _filled_rows(buffer: ReplayBuffer) -> int:
    return buffer.buffer_size if buffer.full else buffer.pos


def replay_buffer_nbytes(buffer: ReplayBuffer) -> int:
    """Bytes of a replay buffer's arrays at their full allocated size (what a checkpoint of a full buffer holds)."""
    return sum(
        getattr(buffer, name).nbytes for name in _BUFFER_ARRAYS if getattr(buffer, name, None) is not None
    )


def save_buffer(buffer: ReplayBuffer, path: Path) -> None:
    """Write the filled rows of a replay buffer (and its routes) as an uncompressed ``.npz``."""
    rows = _filled_rows(buffer)
    arrays = {
        name: getattr(buffer, name)[:rows]
        for name in _BUFFER_ARRAYS
        if getattr(buffer, name, None) is not None
    }
    meta = np.array([buffer.pos, int(buffer.full), buffer.buffer_size, buffer.n_envs], dtype=np.int64)
    with open(path, "wb") as file:
        np.savez(file, _meta=meta, **arrays)
        file.flush()
        os.fsync(file.fileno())


def load_buffer(buffer: ReplayBuffer, path: Path) -> None:
    """Fill ``buffer`` (already allocated with the run's size) from :func:`save_buffer`'s file."""
    with np.load(path, allow_pickle=False) as data:
        pos, full, size, n_envs = (int(x) for x in data["_meta"])
        if (size, n_envs) != (buffer.buffer_size, buffer.n_envs):
            raise CheckpointError(
                f"{path} holds a replay buffer of {size} rows x {n_envs} envs; the model's has "
                f"{buffer.buffer_size} x {buffer.n_envs} (the run's buffer_size or env changed)."
            )
        for name in _BUFFER_ARRAYS:
            if name not in data.files:
                continue
            saved = data[name]
            target = getattr(buffer, name, None)
            if target is None:  # routes are allocated on the first write
                target = np.zeros((buffer.buffer_size, *saved.shape[1:]), dtype=saved.dtype)
                setattr(buffer, name, target)
            target[: len(saved)] = saved
        buffer.pos, buffer.full = pos, bool(full)


# --------------------------------------------------------------------------------------------------
# Training state beyond SB3's save
# --------------------------------------------------------------------------------------------------
def _sub_env_supports_replay(env: VecEnv) -> bool:
    try:
        return all(callable(fn) for fn in env.get_attr("replay_episode")) and all(
            isinstance(steps, int) for steps in env.get_attr("elapsed_steps")
        )
    except AttributeError:
        return False


def env_rng_states(env: VecEnv) -> list[dict[str, Any]] | None:
    """Each sub-env's current RNG state (``None`` when the sub-envs cannot report it)."""
    try:
        return [_to_json(state) for state in env.env_method("rng_state")]
    except AttributeError:
        return None


def set_env_rng_states(env: VecEnv, states: list[dict[str, Any]]) -> None:
    """Set each sub-env's RNG state (see :class:`~d2r_sb3.envs.wrappers.EpisodeReplay`)."""
    for index, state in enumerate(states):
        env.env_method("set_rng_state", _from_json(state), indices=[index])


def capture_training_state(model: BaseAlgorithm, callbacks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything beyond ``model.save`` that an exact resume needs, as plain JSON data.

    Call it at a point where the last transition is stored and its gradient step done (the start of a
    rollout, or after ``learn()`` returned).

    :param callbacks: Extra JSON state to keep with the checkpoint (e.g. the evaluation callback's).
    """
    env = model.get_env()
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "num_timesteps": int(model.num_timesteps),
        "n_updates": int(getattr(model, "_n_updates", 0)),
        "episode_num": int(model._episode_num),
        "ep_info_buffer": list(model.ep_info_buffer or []),
        "ep_success_buffer": [float(x) for x in (model.ep_success_buffer or [])],
        "last_obs": _encode_array(model._last_obs) if isinstance(model._last_obs, np.ndarray) else None,
        "rng": _global_rng_states(),
        "action_space_rng": _to_json(model.action_space.np_random.bit_generator.state),
        "nonfinite_steps": int(getattr(model, "_nonfinite_steps", 0)),
        "pending_logs": _pending_logs(model),
        "episodes": None,
        "callbacks": callbacks or {},
        "wall_time": time.time(),
    }
    if env is not None and _sub_env_supports_replay(env):
        state["episodes"] = {
            "elapsed_steps": [int(steps) for steps in env.get_attr("elapsed_steps")],
            "start_rng": [_to_json(s) for s in env.get_attr("episode_start_rng_state")],
        }
    return state


def _pending_logs(model: BaseAlgorithm) -> list[list[Any]]:
    """Values recorded but not yet written (e.g. the last ``train/*`` losses, which the next dump writes)."""
    logger = getattr(model, "_logger", None)
    if logger is None:
        return []
    pending = []
    for key, value in logger.name_to_value.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (bool, int, float, str)) or value is None:
            excluded = logger.name_to_excluded.get(key)
            pending.append([key, value, list(excluded) if excluded is not None else None])
    return pending


def _restore_pending_logs(model: BaseAlgorithm, pending: list[list[Any]]) -> None:
    logger = getattr(model, "_logger", None)
    if logger is None:
        return
    for key, value, excluded in pending:
        logger.record(key, value, exclude=tuple(excluded) if excluded is not None else None)


def _episode_actions(buffer: ReplayBuffer, env_index: int, steps: int) -> np.ndarray | None:
    """The last ``steps`` actions of one env column, in order (``None`` if the buffer no longer holds them)."""
    if steps == 0:
        return np.zeros((0, *buffer.actions.shape[2:]), dtype=buffer.actions.dtype)
    if steps > _filled_rows(buffer):
        return None
    rows = (buffer.pos - steps + np.arange(steps)) % buffer.buffer_size
    return buffer.actions[rows, env_index]


def _rebuild_episodes(model: BaseAlgorithm, episodes: dict[str, Any]) -> np.ndarray | None:
    """Replay every sub-env's current episode; the rebuilt observations, or None if it is not possible."""
    env = model.get_env()
    buffer = getattr(model, "replay_buffer", None)
    if env is None or buffer is None or not _sub_env_supports_replay(env):
        return None
    observations = []
    for index, (steps, start) in enumerate(
        zip(episodes["elapsed_steps"], episodes["start_rng"], strict=True)
    ):
        actions = _episode_actions(buffer, index, steps)
        if actions is None or start is None:
            return None
        env_actions = model.policy.unscale_action(actions) if len(actions) else actions
        obs = env.env_method("replay_episode", _from_json(start), list(env_actions), indices=[index])[0]
        observations.append(obs)
    return np.stack(observations)


def restore_training_state(
    model: BaseAlgorithm, state: dict[str, Any], warn: Callable[[str], None] | None = None
) -> bool:
    """Put a freshly loaded model and its env back where :func:`capture_training_state` found them.

    Restores the episode counter and statistics, the logged values not yet written (set the model's logger
    first), the env's current episodes (replayed from the replay buffer, which must be loaded first) and, last,
    every RNG state. Returns ``True`` when the resume is exact: the
    rebuilt observations equal the saved ones. Otherwise the env is reset (new episodes from its seed) and
    ``warn`` is told why.
    """
    warn = warn or (lambda message: None)
    model._episode_num = int(state["episode_num"])
    model.ep_info_buffer = deque(state["ep_info_buffer"], maxlen=model._stats_window_size)
    model.ep_success_buffer = deque(state["ep_success_buffer"], maxlen=model._stats_window_size)
    if hasattr(model, "_nonfinite_steps"):
        model._nonfinite_steps = int(state.get("nonfinite_steps", 0))
    exact = False
    env = model.get_env()
    saved_obs = _decode_array(state["last_obs"]) if state.get("last_obs") is not None else None
    if state.get("episodes") is not None and saved_obs is not None:
        rebuilt = _rebuild_episodes(model, state["episodes"])
        if rebuilt is None:
            warn("the env cannot replay its current episodes (not an EpisodeReplay env, or no buffer)")
        elif rebuilt.shape != saved_obs.shape or not np.array_equal(
            rebuilt.astype(saved_obs.dtype), saved_obs
        ):
            warn("the replayed episodes do not reproduce the saved observations (env or simulator changed)")
        else:
            exact = True
    elif saved_obs is not None:
        warn("the checkpoint holds no episode-replay data (the env does not support it)")
    if exact:
        assert saved_obs is not None  # (exact only when the replay reproduced saved_obs)
        model._last_obs = saved_obs
        model._last_episode_starts = np.zeros(saved_obs.shape[0], dtype=bool)
    elif env is not None:
        model._last_obs = env.reset()  # type: ignore[assignment]
        model._last_episode_starts = np.ones(env.num_envs, dtype=bool)
    _restore_pending_logs(model, state.get("pending_logs", []))
    model.action_space.np_random.bit_generator.state = _from_json(state["action_space_rng"])
    _set_global_rng_states(state["rng"])
    return exact


# --------------------------------------------------------------------------------------------------
# The store: atomic writes, verification, fallback, pruning
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder (its manifest was written)."""

    path: Path
    num_timesteps: int

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def buffer_path(self) -> Path | None:
        path = self.path / BUFFER_FILE
        return path if path.is_file() else None

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST_FILE).read_text())

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE_FILE).read_text())

    def verify(self) -> None:
        """Check every file against the manifest (sizes and SHA-256).

        :raises CheckpointError: Naming the first missing, truncated or altered file.
        """
        try:
            manifest = self.manifest()
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.path}: unreadable {MANIFEST_FILE} ({err})") from None
        if manifest.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.path}: unknown checkpoint format {manifest.get('format')!r}")
        for name, entry in manifest["files"].items():
            path = self.path / name
            if not path.is_file():
                raise CheckpointError(f"{self.path}: {name} is missing")
            if path.stat().st_size != entry["size"]:
                raise CheckpointError(
                    f"{self.path}: {name} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
                )
            if sha256_file(path) != entry["sha256"]:
                raise CheckpointError(f"{self.path}: {name} does not match its checksum")


class CheckpointStore:
    """The checkpoints of one run, in ``root/step_<steps>/`` folders.

    :param root: Folder of the checkpoints (created on the first save).
    :param keep: Number of newest complete checkpoints to keep (>= 1).
    """

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (checkpoints kept), got {keep!r}")
        self.root = Path(root)
        self.keep = keep

    def list(self) -> list[Checkpoint]:
        """Complete checkpoints (with a manifest), newest first. Partial writes are not listed."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            steps = path.name[len(_PREFIX) :]
            if path.name.startswith(_PREFIX) and steps.isdigit() and (path / MANIFEST_FILE).is_file():
                found.append(Checkpoint(path, int(steps)))
        return sorted(found, key=lambda c: c.num_timesteps, reverse=True)

    def latest(self, report: Callable[[str], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies; damaged newer ones are reported and skipped (not deleted)."""
        for checkpoint in self.list():
            try:
                checkpoint.verify()
            except CheckpointError as err:
                if report is not None:
                    report(f"skipping a damaged checkpoint: {err}")
                continue
            return checkpoint
        return None

    def remove_partial_writes(self) -> None:
        """Delete the leftovers of writes that were interrupted (they never became checkpoints)."""
        if self.root.is_dir():
            for path in self.root.glob(_PARTIAL_PREFIX + "*"):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, model: BaseAlgorithm, state: dict[str, Any], include_buffer: bool = True) -> Checkpoint:
        """Write a checkpoint of ``model`` (and ``state`` from :func:`capture_training_state`) atomically.

        :raises CheckpointError: If writing fails (disk full, folder not writable); no partial checkpoint is
            left and the earlier checkpoints are untouched.
        """
        steps = int(model.num_timesteps)
        final = self.root / f"{_PREFIX}{steps:012d}"
        partial = self.root / f"{_PARTIAL_PREFIX}{steps}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            model.save(partial / MODEL_FILE)
            fsync_file(partial / MODEL_FILE)
            buffer = getattr(model, "replay_buffer", None)
            if include_buffer and buffer is not None:
                save_buffer(buffer, partial / BUFFER_FILE)
            atomic_write_bytes(partial / STATE_FILE, json.dumps(state).encode())
            env_kwargs = getattr(getattr(model, "env", None), "env_kwargs", None)
            if callable(env_kwargs):  # plain types, so an env's numpy seed or tuple cannot stop the write
                env_yaml = yaml.safe_dump(to_plain(env_kwargs()), sort_keys=False)
                atomic_write_bytes(partial / ENV_KWARGS_FILE, env_yaml.encode())
            files = {
                path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
                for path in sorted(partial.iterdir())
            }
            manifest = {"format": CHECKPOINT_FORMAT, "num_timesteps": steps, "files": files}
            atomic_write_bytes(partial / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
            fsync_dir(partial)
            if final.exists():  # the same step reached again after resuming from an older checkpoint
                stale = self.root / f"{_PARTIAL_PREFIX}stale-{steps}-{os.getpid()}"
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(partial, final)
            fsync_dir(self.root)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(
                f"could not write the checkpoint at {steps} steps to {self.root}: {err}"
            ) from err
        self._prune()
        return Checkpoint(final, steps)

    def _prune(self) -> None:
        for old in self.list()[self.keep :]:
            shutil.rmtree(old.path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------------------
class TrainingCheckpointCallback(BaseCallback):
    """Write full training checkpoints every N env steps per task and/or every M minutes, and on request.

    A checkpoint that falls due is written at the start of the next rollout: the last transition is then stored
    and its gradient step done, so model, buffer and counters agree. :meth:`request_stop` (e.g. from a signal
    handler) writes one at that point and raises :class:`TrainingInterrupted` out of ``learn()``.

    :param store: Where the checkpoints go.
    :param save_freq_per_task: Every this many env steps per task (None: not by steps).
    :param save_interval_minutes: Every this many minutes of wall-clock (None: not by time).
    :param include_buffer: Save the replay buffer (needed for an exact resume).
    :param extra_state: Called at each checkpoint for more JSON state (e.g. the evaluation callback's).
    :param verbose: 1 prints every checkpoint written.
    """

    def __init__(
        self,
        store: CheckpointStore,
        save_freq_per_task: int | None = None,
        save_interval_minutes: float | None = None,
        include_buffer: bool = True,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose=verbose)
        self._period = (
            PerTaskPeriod(check_freq_per_task("save_freq_per_task", save_freq_per_task))
            if save_freq_per_task is not None
            else None
        )
        if save_interval_minutes is not None and not save_interval_minutes > 0:
            raise ValueError(f"save_interval_minutes must be > 0 or None, got {save_interval_minutes!r}")
        self.store = store
        self.save_freq_per_task = save_freq_per_task
        self.save_interval_minutes = save_interval_minutes
        self.include_buffer = include_buffer
        self.extra_state = extra_state
        self.last_checkpoint: Checkpoint | None = None
        self._last_time = time.monotonic()
        self._due = False
        self._stop_requested = False

    def _init_callback(self) -> None:
        if self._period is not None:
            self._period.start(self.model.n_envs, self.model.num_timesteps)
        self._last_time = time.monotonic()
        self.store.remove_partial_writes()

    def request_stop(self) -> None:
        """Checkpoint at the next consistent point, then stop training (safe to call from a signal handler)."""
        self._stop_requested = True

    def _on_step(self) -> bool:
        if self._period is not None and self._period.due(self.num_timesteps):
            self._due = True
        if self.save_interval_minutes is not None:
            if time.monotonic() - self._last_time >= 60.0 * self.save_interval_minutes:
                self._due = True
        return True

    def _on_rollout_start(self) -> None:
        if self._stop_requested:
            raise TrainingInterrupted(self.save())
        if self._due:
            self.save()

    def save(self) -> Checkpoint:
        """Write a checkpoint now (call only at a consistent point: see the class docstring)."""
        extra = self.extra_state() if self.extra_state is not None else {}
        state = capture_training_state(self.model, extra)
        checkpoint = self.store.save(self.model, state, include_buffer=self.include_buffer)
        self.last_checkpoint = checkpoint
        self._due = False
        self._last_time = time.monotonic()
        if self.verbose >= 1:
            print(f"Checkpoint written: {checkpoint.path}")
        return checkpoint
