"""Save and load multi-task policies: a safe weights-only format and SB3 zips.

The **safe policy format** is a folder with two files:

- ``policy.safetensors``: the actor's state dict (all that acting needs), stored with safetensors, so loading it
  never unpickles anything;
- ``policy.json``: everything needed to rebuild the policy and its env as plain JSON -- the format version, the
  registry name of the algorithm, the policy alias (resolved on load only through the algorithms'
  ``policy_aliases``, never by import path), the constructor keyword arguments, the observation and action
  spaces, the task names, the :func:`~d2r_sb3.make_mt_env` keyword arguments, free-form metadata and the
  SHA-256 of the weights file.

:func:`load_policy` also reads SB3 ``.zip`` files, zoo run folders (``logs/<algo>/<EnvName>_<N>/``) and Hugging
Face Hub repo ids (through :func:`d2r_sb3.hub.download_policy`). SB3 zips are pickles, and unpickling can run
arbitrary code: :func:`load_policy` refuses them unless called with ``allow_pickle=True`` (the zoo scripts:
``--allow-pickle``). Zoo runs carry the safe files too (:func:`write_safe_policy`: ``<run>/policy/`` for the final
model, ``<run>/best_policy/`` for ``best_model.zip``), and those are what a run folder loads by default.
:func:`resolve_model` is the one rule that decides whether a name is a local path or a Hub repo id.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch as th
import yaml
from gymnasium import spaces
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import json_to_data, load_from_zip_file
from stable_baselines3.common.utils import get_device

from d2r_sb3.common.files import sha256_file
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.nonfinite import first_nonfinite_tensor
from d2r_sb3.common.policies import MultiTaskPolicy
from d2r_sb3.common.provenance import versions
from d2r_sb3.d2r.d2r import D2RSAC
from d2r_sb3.registry import ALGOS

__all__ = [
    "FORMAT_VERSION",
    "HUB_PREFIX",
    "POLICY_CONFIG_FILE",
    "POLICY_WEIGHTS_FILE",
    "RUN_BEST_POLICY_DIR",
    "RUN_POLICY_DIR",
    "LoadedPolicy",
    "ModelLocation",
    "ModelNotFoundError",
    "PickleNotAllowedError",
    "check_policy_folder",
    "find_model_zip",
    "load_policy",
    "read_policy_config",
    "resolve_model",
    "save_policy",
    "write_safe_policy",
]

FORMAT_VERSION = 1
POLICY_WEIGHTS_FILE = "policy.safetensors"
POLICY_CONFIG_FILE = "policy.json"
REQUIRED_KEYS = (
    "format_version",
    "policy_class",
    "policy_kwargs",
    "observation_space",
    "action_space",
    "num_tasks",
    "task_names",
)
# Constructor arguments that only matter for training (the optimizer is rebuilt by the algorithm).
_TRAINING_ONLY_KWARGS = ("optimizer_class", "optimizer_kwargs")
# Objects that SB3 would unpickle from a zip's "data"; replaced so loading never rebuilds schedules.
_ZIP_CUSTOM_OBJECTS = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0}
# Entries of an SB3 zip's "data" that loading a policy cannot do without.
ZIP_REQUIRED_KEYS = ("policy_class", "policy_kwargs", "observation_space", "action_space", "n_envs")
RUN_POLICY_DIR = "policy"
"""Subfolder of a zoo run holding the safe files of the final model (written by :func:`write_safe_policy`)."""
RUN_BEST_POLICY_DIR = "best_policy"
"""Subfolder of a zoo run holding the safe files of ``best_model.zip`` (written by :func:`write_safe_policy`)."""
BEST_MODEL_ZIP = "best_model.zip"
HUB_PREFIX = "hf://"
"""Prefix that marks a name as a Hugging Face Hub repo id, never a local path: ``hf://d2r-sb3/d2r-MT10-rand``."""
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_EXPLICIT_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


class PickleNotAllowedError(ValueError):
    """Loading this file would unpickle Python objects (an SB3 ``.zip``) and ``allow_pickle`` is off."""


class ModelNotFoundError(FileNotFoundError):
    """Nothing to load: no such local file or folder (and, for an ``owner/name`` name, no such Hub repo)."""


# --- the loaded policy -----------------------------------------------------------------------------------
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
    ):
        self.policy = policy
        self.algo = algo
        self.task_names = list(task_names)
        self.env_kwargs = dict(env_kwargs)
        self.metadata = dict(metadata or {})
        self.source = source
        self.model = model
        self.origin = origin or source

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


# --- policy class allowlist ----------------------------------------------------------------------------
def _policy_aliases() -> dict[str, type[MultiTaskPolicy]]:
    """Every policy class the safe loader may build: the algorithms' registered aliases, nothing else."""
    try:  # baselines register their aliases in MultiTaskSAC.policy_aliases on import
        import d2r_sb3.baselines  # noqa: F401
    except ImportError:
        pass
    return {**MultiTaskSAC.policy_aliases, **D2RSAC.policy_aliases}  # type: ignore[dict-item]


def _policy_alias(policy: MultiTaskPolicy, algo: str | None) -> str:
    aliases = _policy_aliases()
    if algo in ALGOS and aliases.get(ALGOS[algo][1]) is type(policy):
        return ALGOS[algo][1]  # several aliases may share a class: prefer the algorithm's own
    for alias, cls in aliases.items():
        if cls is type(policy):
            return alias
    raise ValueError(
        f"{type(policy).__name__} has no registered alias, so a safe load could not rebuild it. Register it, "
        f"e.g. MultiTaskSAC.policy_aliases['MyPolicy'] = {type(policy).__name__}, in an importable module."
    )


def _infer_algo(model: BaseAlgorithm | None, policy: MultiTaskPolicy) -> str | None:
    aliases = _policy_aliases()
    for name, (algo_cls, alias) in ALGOS.items():
        if aliases.get(alias) is type(policy) and (model is None or type(model) is algo_cls):
            return name
    return None


# --- JSON encoding helpers -----------------------------------------------------------------------------
def _encode_bounds(values: np.ndarray) -> list[Any]:
    # Strict JSON has no infinities: unbounded entries are written as the strings "inf" / "-inf".
    return [
        v if math.isfinite(v) else ("inf" if v > 0 else "-inf")
        for v in np.asarray(values, np.float64).ravel().tolist()
    ]


def _decode_bounds(values: list[Any], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=dtype).reshape(shape)


def _encode_box(space: spaces.Space, name: str) -> dict[str, Any]:
    if not isinstance(space, spaces.Box):
        raise ValueError(f"The {name} space must be a gymnasium Box to be saved, got {space}.")
    return {
        "shape": list(space.shape),
        "low": _encode_bounds(space.low),
        "high": _encode_bounds(space.high),
        "dtype": np.dtype(space.dtype).name,
    }


def _decode_box(data: Mapping[str, Any], name: str, where: Path) -> spaces.Box:
    try:
        shape = tuple(int(n) for n in data["shape"])
        dtype = np.dtype(data["dtype"])
        low = _decode_bounds(data["low"], shape, dtype)
        high = _decode_bounds(data["high"], shape, dtype)
        return spaces.Box(low=low, high=high, shape=shape, dtype=dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: {name} must be {{shape, low, high, dtype}} describing a Box ({error!r}); re-save the policy "
            "with d2r_sb3.save_policy."
        ) from error


def _encode_kwarg(key: str, value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_encode_kwarg(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode_kwarg(key, v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if (
        isinstance(value, type)
        and issubclass(value, th.nn.Module)
        and getattr(th.nn, value.__name__, None) is value
    ):
        return {"torch.nn": value.__name__}  # e.g. activation_fn=nn.ReLU, resolved on load from torch.nn only
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(
        f"Policy constructor argument {key}={value!r} cannot be written as JSON; the safe format stores plain "
        "values (numbers, strings, lists, dicts) and torch.nn classes only."
    )


def _decode_kwarg(value: Any, where: Path) -> Any:
    if isinstance(value, list):
        return [_decode_kwarg(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"torch.nn"}:
            cls = getattr(th.nn, str(value["torch.nn"]), None)
            if not (isinstance(cls, type) and issubclass(cls, th.nn.Module)):
                raise ValueError(f"{where}: {value['torch.nn']!r} is not a torch.nn module class.")
            return cls
        return {k: _decode_kwarg(v, where) for k, v in value.items()}
    return value


def _accepted_kwargs(cls: type) -> set[str]:
    """Keyword arguments a policy class accepts, following ``**kwargs`` up the class hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters
        names.update(name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break
    return names


def _policy_kwargs(policy: MultiTaskPolicy) -> dict[str, Any]:
    """JSON-able constructor kwargs: those the class accepts, minus the spaces and the optimizer."""
    accepted = _accepted_kwargs(type(policy))
    return {
        key: _encode_kwarg(key, value)
        for key, value in policy._get_constructor_parameters().items()
        if key in accepted and key not in ("observation_space", "action_space", *_TRAINING_ONLY_KWARGS)
    }


def save_policy(
    model_or_policy: MultiTaskSAC | MultiTaskPolicy,
    folder: str | Path,
    *,
    algo: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    task_names: list[str] | None = None,
) -> Path:
    """Write the safe policy format (``policy.safetensors`` + ``policy.json``) into ``folder``.

    :param model_or_policy: a trained :class:`~d2r_sb3.MultiTaskSAC` / :class:`~d2r_sb3.D2RSAC`, or its
        :class:`~d2r_sb3.MultiTaskPolicy`.
    :param folder: output folder (created if needed; existing policy files are overwritten).
    :param algo: registry name (:data:`d2r_sb3.registry.ALGOS`); inferred from the classes when ``None``.
    :param env_kwargs: :func:`~d2r_sb3.make_mt_env` kwargs of the env; default ``model.env.env_kwargs()``
        when the model has such an env.
    :param metadata: extra JSON-able information (e.g. training steps, results).
    :param task_names: task of each one-hot index; default ``model.task_names``, else the benchmark's tasks.
    :return: the folder.
    :raises TypeError: if given something other than a multi-task model or policy.
    :raises ValueError: if the policy class has no registered alias, a value is not JSON-able or a weight is not
        finite (NaN or infinite; nothing is written then).
    """
    model = model_or_policy if isinstance(model_or_policy, BaseAlgorithm) else None
    policy = model.policy if model is not None else model_or_policy
    if not isinstance(policy, MultiTaskPolicy):
        raise TypeError(
            f"save_policy needs a MultiTaskSAC/D2RSAC model or a MultiTaskPolicy, got {type(model_or_policy).__name__}."
        )
    if algo is not None and algo not in ALGOS:
        raise ValueError(f"Unknown algo {algo!r}; choose one of: {', '.join(ALGOS)}.")
    algo = algo or _infer_algo(model, policy)
    alias = _policy_alias(policy, algo)

    if env_kwargs is None:
        env_kwargs_fn = (
            getattr(getattr(model, "env", None), "env_kwargs", None) if model is not None else None
        )
        env_kwargs = env_kwargs_fn() if callable(env_kwargs_fn) else {}
    env_kwargs = {k: _encode_kwarg(f"env_kwargs.{k}", v) for k, v in env_kwargs.items()}
    task_names = list(task_names or getattr(model, "task_names", None) or [])
    if not task_names and "benchmark" in env_kwargs:
        from d2r_sb3.envs.metaworld import benchmark_task_names

        task_names = benchmark_task_names(env_kwargs["benchmark"])
    if not task_names:
        task_names = [f"task{i}" for i in range(policy.num_tasks)]
    if len(task_names) != policy.num_tasks:
        raise ValueError(
            f"{len(task_names)} task names for a policy with {policy.num_tasks} tasks: {task_names}."
        )
    info = dict(metadata or {})
    if model is not None:
        info.setdefault("num_timesteps", int(model.num_timesteps))

    # safetensors refuses tensors that share memory or are views: store contiguous copies on the CPU.
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in policy.actor.state_dict().items()}
    broken = first_nonfinite_tensor(tensors.items())
    if broken is not None:
        raise ValueError(
            f"The actor's {broken} holds NaN or infinite values; save_policy refuses to write broken weights. "
            "Load a checkpoint from before the values went non-finite and save that (training raises "
            "NonFiniteTrainingError when they do)."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / POLICY_WEIGHTS_FILE
    save_file(tensors, str(weights_path), metadata={"format": "pt", "policy_class": alias})
    config = {
        "format_version": FORMAT_VERSION,
        "library": "d2r_sb3",
        "library_version": versions()["d2r_sb3"],
        "algo": algo,
        "policy_class": alias,
        "policy_kwargs": _policy_kwargs(policy),
        "observation_space": _encode_box(policy.observation_space, "observation"),
        "action_space": _encode_box(policy.action_space, "action"),
        "num_tasks": int(policy.num_tasks),
        "task_names": task_names,
        "env_kwargs": env_kwargs,
        "metadata": info,
        "weights_sha256": sha256_file(weights_path),
        "versions": versions(),
    }
    try:
        text = json.dumps(config, indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"metadata/env_kwargs must be plain JSON values (finite numbers, strings, ...): {error}"
        ) from error
    (folder / POLICY_CONFIG_FILE).write_text(text + "\n")
    return folder


def _save_policy_atomically(model_or_policy: Any, folder: Path, **kwargs: Any) -> Path:
    """:func:`save_policy` into a hidden sibling folder renamed into place: readers never see half a policy."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_policy(model_or_policy, tmp, **kwargs)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def write_safe_policy(
    model: MultiTaskSAC,
    run_dir: str | Path,
    *,
    model_zip: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the safe policy files of a zoo run, so that loading the run never needs unpickling.

    - ``<run_dir>/policy/``: the final model (``model``, in memory);
    - ``<run_dir>/best_policy/``: ``<run_dir>/best_model.zip`` if it exists. Only its weights are read, with
      ``torch.load(weights_only=True)`` (tensors and plain containers, no Python objects), into a copy of
      ``model``'s policy (same architecture); its pickled ``data`` is never unpickled.

    Each folder is written to a temporary folder and renamed into place. ``policy.json`` records the zip it
    was written from (``metadata.source_zip`` and its SHA-256), so that :func:`load_policy` warns when the zip was
    replaced later (e.g. by an interrupted ``--resume``). A folder that cannot be written (broken weights, a full
    disk) only gives a warning: the zips, saved before, stay the run's record.

    ``zoo/train.py`` calls it right after saving the final model::

        model_path = atomic_save(model, run_dir / f"{setup.name}.zip")
        write_safe_policy(model, run_dir, model_zip=model_path)

    For a run written before this existed: ``write_safe_policy(load_policy(run, allow_pickle=True).model, run,
    model_zip=find_model_zip(run))`` (a pickle: your own runs only).

    :param model: the trained algorithm (final model of the run).
    :param run_dir: the run folder ``logs/<algo>/<EnvName>_<N>``.
    :param model_zip: the final model's zip, recorded in ``policy.json`` (``None``: not recorded).
    :param env_kwargs: :func:`~d2r_sb3.make_mt_env` kwargs; default ``model.env.env_kwargs()``.
    :return: the folders written.
    """
    run_dir = Path(run_dir)
    if env_kwargs is None:
        env_kwargs_fn = getattr(getattr(model, "env", None), "env_kwargs", None)
        env_kwargs = env_kwargs_fn() if callable(env_kwargs_fn) else {}
    task_names = list(getattr(model, "task_names", None) or []) or None
    algo = _infer_algo(model, model.policy)
    written = []
    jobs: list[tuple[Path, Any]] = [(run_dir / RUN_POLICY_DIR, None)]
    if (run_dir / BEST_MODEL_ZIP).is_file():
        jobs.append((run_dir / RUN_BEST_POLICY_DIR, run_dir / BEST_MODEL_ZIP))
    for folder, best_zip in jobs:
        try:
            if best_zip is None:
                metadata: dict[str, Any] = {"num_timesteps": int(model.num_timesteps)}
                if model_zip is not None:
                    metadata.update(
                        source_zip=Path(model_zip).name, source_zip_sha256=sha256_file(Path(model_zip))
                    )
                source: Any = model
            else:
                source, metadata = _policy_from_zip_weights(model, best_zip)
            _save_policy_atomically(
                source, folder, algo=algo, env_kwargs=env_kwargs, metadata=metadata, task_names=task_names
            )
            written.append(folder)
        except (ValueError, OSError) as error:
            what = "best_model.zip" if best_zip is not None else "the final model"
            warnings.warn(
                f"Could not write the safe policy files of {what} to {folder}: {error}. The run loads only with "
                "allow_pickle=True (--allow-pickle) until they are written (d2r_sb3.serialization."
                "write_safe_policy).",
                RuntimeWarning,
                stacklevel=2,
            )
    return written


def _policy_from_zip_weights(model: MultiTaskSAC, path: Path) -> tuple[MultiTaskPolicy, dict[str, Any]]:
    """A copy of ``model.policy`` holding the weights of the SB3 zip ``path`` (its ``data`` is not unpickled)."""
    data = _check_zip(path)  # plain JSON: nothing is unpickled
    _, params, _ = load_from_zip_file(path, load_data=False, device="cpu")  # torch.load(weights_only=True)
    if "policy" not in params:
        raise ValueError(f"{path} holds no policy.pth: not an SB3 model zip.")
    policy = copy.deepcopy(model.policy)
    try:
        policy.load_state_dict(params["policy"], strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the architecture of the final model: {error}") from error
    metadata: dict[str, Any] = {"source_zip": path.name, "source_zip_sha256": sha256_file(path)}
    if isinstance(data.get("num_timesteps"), int):
        metadata["num_timesteps"] = data["num_timesteps"]
    return policy, metadata


# --- safe load -----------------------------------------------------------------------------------------
def _check_task_names(config: Mapping[str, Any], path: Path) -> None:
    num_tasks, names = config["num_tasks"], config["task_names"]
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"{path}: num_tasks must be a positive integer, got {num_tasks!r}.")
    kwargs = config.get("policy_kwargs")
    if isinstance(kwargs, dict) and "num_tasks" in kwargs and kwargs["num_tasks"] != num_tasks:
        raise ValueError(
            f"{path}: num_tasks={num_tasks} but policy_kwargs.num_tasks={kwargs['num_tasks']!r} (the width of the "
            "task one-hot); the file is inconsistent. Re-save the policy with d2r_sb3.save_policy."
        )
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: task_names must be a list of strings, got {names!r}.")
    if len(names) != num_tasks:
        raise ValueError(
            f"{path}: task_names has {len(names)} entries but the policy has num_tasks={num_tasks} (one name per "
            f"one-hot index): {names}. The file is inconsistent; re-save the policy with d2r_sb3.save_policy."
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: task_names lists {duplicates} more than once.")


def read_policy_config(folder: str | Path) -> dict[str, Any]:
    """Read and validate ``policy.json`` of a safe policy folder (no weights are read).

    :param folder: the folder holding ``policy.json``.
    :return: the parsed configuration.
    :raises FileNotFoundError: if the file is missing.
    :raises ValueError: if it is not valid JSON, lacks required keys, has another format version, or its task
        names do not match ``num_tasks`` (one name per one-hot index).
    """
    path = Path(folder) / POLICY_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: a safe policy folder holds {POLICY_CONFIG_FILE} and {POLICY_WEIGHTS_FILE}, "
            "as written by d2r_sb3.save_policy."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); re-save the policy with d2r_sb3.save_policy."
        ) from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; re-save the policy with d2r_sb3.save_policy.")
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={config['format_version']!r}, but this d2r_sb3 reads version "
            f"{FORMAT_VERSION}; install the d2r_sb3 version that wrote it (library_version="
            f"{config.get('library_version')!r})."
        )
    _check_task_names(config, path)
    return config


def check_policy_folder(folder: str | Path) -> dict[str, Any]:
    """Validate a safe policy folder without building the policy: JSON, weights header and checksum.

    :param folder: the folder holding ``policy.json`` and ``policy.safetensors``.
    :return: the parsed ``policy.json``.
    :raises FileNotFoundError: if a file is missing.
    :raises ValueError: if a file is corrupted (bad JSON, unreadable safetensors header, checksum mismatch).
    """
    folder = Path(folder)
    config = read_policy_config(folder)
    weights = folder / POLICY_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} does not exist; the folder holds {POLICY_CONFIG_FILE} but no weights."
        )
    expected = config.get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise ValueError(
            f"{weights} is corrupted: its SHA-256 does not match weights_sha256 in {POLICY_CONFIG_FILE}. "
            "Download or save it again."
        )
    try:  # parses the header and checks that the file covers every tensor it lists
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise ValueError(
            f"{weights} is not a valid safetensors file ({error}); download or save it again."
        ) from error
    return config


def _read_weights(path: Path, device: str) -> dict[str, th.Tensor]:
    try:
        tensors = load_file(str(path), device=device)
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}); download or save it again."
        ) from error
    broken = first_nonfinite_tensor(tensors.items())
    if broken is not None:
        raise ValueError(
            f"{path}: the tensor {broken!r} holds NaN or infinite values; refusing to load broken weights. Save "
            "the policy again from a checkpoint taken before training diverged."
        )
    return tensors


def _warn_if_stale(folder: Path, config: Mapping[str, Any]) -> None:
    """Warn when the zip a run's safe folder was written from has been replaced since."""
    metadata = config.get("metadata") or {}
    name, digest = metadata.get("source_zip"), metadata.get("source_zip_sha256")
    if not (isinstance(name, str) and isinstance(digest, str)) or Path(name).name != name:
        return
    zip_path = folder.parent / name
    if zip_path.is_file() and sha256_file(zip_path) != digest:
        warnings.warn(
            f"{folder} was written from an earlier {name} (the zip has changed since): it may be out of date. "
            f"Rewrite it with d2r_sb3.serialization.write_safe_policy, or load {zip_path} itself with "
            "allow_pickle=True (--allow-pickle; a pickle: your own runs only).",
            UserWarning,
            stacklevel=4,
        )


def _load_safe(folder: Path, device: str) -> LoadedPolicy:
    config = check_policy_folder(folder)
    where = folder / POLICY_CONFIG_FILE
    aliases = _policy_aliases()
    alias = config["policy_class"]
    if alias not in aliases:
        raise ValueError(
            f"{where}: unknown policy_class {alias!r}; this d2r_sb3 knows {sorted(aliases)}. Newer policies "
            "need a newer d2r_sb3 (aliases are looked up in D2RSAC/MultiTaskSAC.policy_aliases only)."
        )
    kwargs = config["policy_kwargs"]
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: policy_kwargs must be a JSON object.")
    policy_kwargs = {k: _decode_kwarg(v, where) for k, v in kwargs.items()}
    observation_space = _decode_box(config["observation_space"], "observation_space", where)
    action_space = _decode_box(config["action_space"], "action_space", where)
    try:
        policy = aliases[alias](observation_space, action_space, lambda _: 0.0, **policy_kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot build {alias} from the saved policy_kwargs: {error}") from error
    if policy.num_tasks != config["num_tasks"]:
        raise ValueError(
            f"{where}: num_tasks={config['num_tasks']} but the policy built from it has a task one-hot of width "
            f"{policy.num_tasks}; re-save the policy with d2r_sb3.save_policy."
        )
    policy.to(get_device(device))
    weights_path = folder / POLICY_WEIGHTS_FILE
    state_dict = _read_weights(weights_path, str(policy.device))
    try:
        policy.actor.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{weights_path} does not match the {alias} described in {POLICY_CONFIG_FILE}: {error}"
        ) from error
    policy.set_training_mode(False)
    _warn_if_stale(folder, config)
    return LoadedPolicy(
        policy,
        algo=config.get("algo"),
        task_names=list(config["task_names"]),
        env_kwargs=dict(config.get("env_kwargs") or {}),
        metadata=dict(config.get("metadata") or {}),
        source=str(folder),
        origin=f"local folder {folder}",
    )


# --- SB3 zips and zoo log folders ------------------------------------------------------------------------
def _check_zip(path: Path) -> dict[str, Any]:
    """The ``data`` of an SB3 zip as plain JSON (serialized objects stay base64 text: nothing is unpickled).

    :raises ValueError: if ``path`` is not a zip, has no ``data`` or ``policy.pth``, or ``data`` lacks keys.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "data" not in names:
                raise ValueError(
                    f"{path} is not an SB3 model zip: it has no 'data' entry (it holds {names}); save models with "
                    "model.save(path)."
                )
            text = archive.read("data")
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not an SB3 model zip ({error}).") from error
    try:
        data = json.loads(text.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not an SB3 model zip: its 'data' is not JSON ({error}).") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an SB3 model zip: its 'data' is not a JSON object.")
    missing = [key for key in ZIP_REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(
            f"{path} is not a complete SB3 model zip: its 'data' lacks {missing} (an SB3 model.save writes "
            f"{list(ZIP_REQUIRED_KEYS)}). The file is damaged or was not written by Stable-Baselines3."
        )
    if "policy.pth" not in names:
        raise ValueError(f"{path} is not a complete SB3 model zip: it has no policy.pth (the weights).")
    if "num_tasks" not in data:
        raise ValueError(
            f"{path} is an SB3 zip but not of a d2r_sb3 multi-task model (MultiTaskSAC / D2RSAC): its 'data' has "
            "no num_tasks."
        )
    return data


def _local_name(path: Path) -> str:
    """``path`` as a string that :func:`resolve_model` reads as local (``./`` in front of a relative path)."""
    return str(path) if path.is_absolute() else f"./{path}"


def _pickle_refusal(path: Path, run_dir: Path | None) -> str:
    message = (
        f"{path} is an SB3 .zip: loading it unpickles Python objects, and unpickling a file can run arbitrary "
        "code. Load it only if you trust where it came from (e.g. your own training run): pass "
        "allow_pickle=True to load_policy, or --allow-pickle to the zoo scripts. "
    )
    if run_dir is not None:
        best = path.name == BEST_MODEL_ZIP
        folder = run_dir / (RUN_BEST_POLICY_DIR if best else RUN_POLICY_DIR)
        return message + (
            f"Safe files need no opt-in: this run has no {folder} (policy.json + policy.safetensors), which "
            "zoo/train.py writes at the end of a run; write them once for an older run with "
            f"d2r_sb3.serialization.write_safe_policy(load_policy({_local_name(run_dir)!r}, allow_pickle=True)"
            f".model, {_local_name(run_dir)!r})."
        )
    return message + (
        "Or use the safe policy files (policy.json + policy.safetensors, never unpickled): convert the zip once "
        f"with d2r_sb3.save_policy(load_policy({_local_name(path)!r}, allow_pickle=True).model, './my_policy')."
    )


def _zip_policy_class(path: Path) -> type | None:
    """The policy class stored in an SB3 zip's ``data`` (unpickles it: only after the allow_pickle check)."""
    with zipfile.ZipFile(path) as archive:
        data = json_to_data(archive.read("data").decode(), custom_objects=_ZIP_CUSTOM_OBJECTS)
    return data.get("policy_class")


def _algo_of_zip(path: Path) -> tuple[str | None, type[MultiTaskSAC]]:
    policy_class = _zip_policy_class(path)
    aliases = _policy_aliases()
    for name, (algo_cls, alias) in ALGOS.items():
        if aliases.get(alias) is policy_class:
            return name, algo_cls
    if isinstance(policy_class, type) and issubclass(policy_class, D2RSAC.policy_aliases["D2RPolicy"]):
        return None, D2RSAC
    return None, MultiTaskSAC


def _env_kwargs_near(zip_path: Path) -> dict[str, Any]:
    """make_mt_env kwargs saved beside a zip: ``env_kwargs.yml`` in its folder or in one subfolder (zoo)."""
    candidates = [zip_path.parent / "env_kwargs.yml", zip_path.parent / zip_path.stem / "env_kwargs.yml"]
    candidates += sorted(zip_path.parent.glob("*/env_kwargs.yml"))
    for path in candidates:
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as error:
                warnings.warn(f"Ignoring {path}: not plain YAML ({error}).", stacklevel=3)
                continue
            if isinstance(data, dict):
                return data
    return {}


def _load_zip(path: Path, device: str, allow_pickle: bool, run_dir: Path | None = None) -> LoadedPolicy:
    _check_zip(path)  # plain JSON checks first: a damaged zip gets a clear error, and nothing is unpickled
    if not allow_pickle:
        raise PickleNotAllowedError(_pickle_refusal(path, run_dir))
    algo, algo_cls = _algo_of_zip(path)
    # Same as rl-zoo's enjoy: a 1-row buffer and constant schedules, so loading allocates nothing big.
    try:
        model = algo_cls.load(path, device=device, buffer_size=1, custom_objects=_ZIP_CUSTOM_OBJECTS)
    except (KeyError, AttributeError, TypeError) as error:
        raise ValueError(
            f"{path} is not a complete SB3 model zip: loading it failed with {type(error).__name__}: {error}. The "
            "file is damaged or was written by another algorithm or library version."
        ) from error
    model.policy.set_training_mode(False)
    broken = first_nonfinite_tensor(model.policy.actor.state_dict().items())
    if broken is not None:
        raise ValueError(
            f"{path}: the actor's tensor {broken!r} holds NaN or infinite values; refusing to load broken weights. "
            "Load a checkpoint from before training diverged."
        )
    num_tasks = int(model.policy.num_tasks)
    task_names = list(getattr(model, "task_names", None) or [f"task{i}" for i in range(num_tasks)])
    if len(task_names) != num_tasks:
        raise ValueError(
            f"{path}: task_names has {len(task_names)} entries but the policy has {num_tasks} tasks (one name per "
            "one-hot index); the file is inconsistent."
        )
    if algo is None:
        algo = _infer_algo(model, model.policy)
    return LoadedPolicy(
        model.policy,
        algo=algo,
        task_names=task_names,
        env_kwargs=_env_kwargs_near(path),
        metadata={"num_timesteps": int(model.num_timesteps)},
        source=str(path),
        model=model,
        origin=f"local SB3 zip {path} (unpickled: allow_pickle)",
    )


def find_model_zip(folder: str | Path, load_best: bool = False) -> Path | None:
    """The model zip of a zoo log folder ``<EnvName>_<N>/``: ``<EnvName>.zip``, or ``best_model.zip``.

    :param folder: the run folder.
    :param load_best: return ``best_model.zip`` (written by evaluation during training).
    :return: the zip, or ``None`` when the folder holds no zip at all.
    :raises FileNotFoundError: if the requested zip is not there.
    """
    folder = Path(folder)
    zips = sorted(folder.glob("*.zip"))
    if load_best:
        best = folder / "best_model.zip"
        if not best.is_file():
            raise FileNotFoundError(
                f"{best} does not exist (it is written by evaluation during training); load the final model "
                "with load_best=False."
            )
        return best
    match = re.fullmatch(r"(.+)_(\d+)", folder.name)
    names = [match.group(1)] if match else []
    names += [z.stem for z in zips if (folder / z.stem).is_dir()]  # <EnvName>.zip next to <EnvName>/
    for name in names:
        if (folder / f"{name}.zip").is_file():
            return folder / f"{name}.zip"
    final = [z for z in zips if z.name != "best_model.zip" and not z.name.startswith("rl_model_")]
    if len(final) == 1:
        return final[0]
    if zips:
        raise FileNotFoundError(
            f"{folder} has no final model zip <EnvName>.zip; it holds {[z.name for z in zips]}. Pass one of "
            "them directly, or load_best=True for best_model.zip."
        )
    return None


# --- which model a name means: one rule ------------------------------------------------------------------
@dataclass(frozen=True)
class ModelLocation:
    """Where a model name points, as decided by :func:`resolve_model` (nothing is read yet).

    :param kind: ``"local"`` (a file or folder) or ``"hub"`` (a Hugging Face Hub repo).
    :param name: the name as given.
    :param path: the local path (``kind == "local"``), user-expanded.
    :param repo_id: the repo id ``"owner/name"`` (``kind == "hub"``).
    :param explicit: an explicit local path (``./``, ``../``, ``/``, ``~``, a ``Path`` object) or an explicit Hub
        id (``hf://``).
    :param shadowed: for a Hub id, an existing local path of the same name that is *not* used.
    """

    kind: Literal["local", "hub"]
    name: str
    path: Path | None = None
    repo_id: str | None = None
    explicit: bool = False
    shadowed: Path | None = None


def _looks_like_repo_id(text: str) -> bool:
    return (
        _REPO_ID.fullmatch(text) is not None
        and not text.endswith(".zip")
        and not any(part in (".", "..") for part in text.split("/"))
    )


def _safe_source(path: Path, load_best: bool = False) -> Path | None:
    """The safe policy folder that loading ``path`` would read, or ``None`` if it needs a zip (or is missing)."""
    if path.is_file():
        return path.parent if path.name in (POLICY_CONFIG_FILE, POLICY_WEIGHTS_FILE) else None
    if not path.is_dir():
        return None
    if (path / POLICY_CONFIG_FILE).is_file() or (path / POLICY_WEIGHTS_FILE).is_file():
        return path
    run_policy = path / (RUN_BEST_POLICY_DIR if load_best else RUN_POLICY_DIR)
    return run_policy if (run_policy / POLICY_CONFIG_FILE).is_file() else None


def resolve_model(model: str | os.PathLike[str], *, load_best: bool = False) -> ModelLocation:
    """Decide whether ``model`` names a local file or folder or a Hugging Face Hub repo (the rule of
    :func:`load_policy`; nothing is loaded and the Hub is not asked).

    1. ``hf://owner/name`` is a Hub repo.
    2. A ``Path`` object, or a string starting with ``/``, ``./``, ``../`` or ``~``, is a local path.
    3. A string of the form ``owner/name`` (one slash, Hub-id characters, not ending in ``.zip``) is a Hub repo,
       unless a local path of that name holds safe policy files (``policy.json`` + ``policy.safetensors``, or a
       zoo run's ``policy/`` / ``best_policy/`` with them): then it is that local path. A local path of that
       name without safe files (e.g. a folder holding only SB3 zips) is never used; :func:`load_policy` warns
       that it was skipped.
    4. Any other string (``logs/d2r/MT10-rand_1``, ``my_policy``, ``model.zip``) is a local path.

    :param model: the name.
    :param load_best: for a zoo run folder, the safe files looked for are ``best_policy/`` (else ``policy/``).
    :return: the :class:`ModelLocation`.
    :raises ValueError: on ``hf://`` followed by something that is not ``owner/name``.
    """
    if not isinstance(model, str):
        path = Path(model).expanduser()
        return ModelLocation("local", str(model), path=path, explicit=True)
    if model.startswith(HUB_PREFIX):
        repo_id = model[len(HUB_PREFIX) :]
        if not _looks_like_repo_id(repo_id):
            raise ValueError(f"Invalid Hub repo id {repo_id!r} in {model!r}: expected hf://owner/name.")
        return ModelLocation("hub", model, repo_id=repo_id, explicit=True)
    path = Path(model).expanduser()
    explicit = model.startswith(_EXPLICIT_LOCAL_PREFIXES) or model in (".", "..") or os.path.isabs(model)
    if explicit or not _looks_like_repo_id(model):
        return ModelLocation("local", model, path=path, explicit=explicit)
    if _safe_source(path, load_best) is not None:
        return ModelLocation("local", model, path=path)
    return ModelLocation("hub", model, repo_id=model, shadowed=path if path.exists() else None)


def _skipped_local(location: ModelLocation) -> str:
    what = "folder" if location.shadowed is not None and location.shadowed.is_dir() else "file"
    return (
        f"A local {what} {location.name} exists but was NOT used: it holds no safe policy files (policy.json + "
        "policy.safetensors), and a name of the form owner/name means a Hub repo unless a local path of that "
        f"name holds them. To load the local {what}, pass ./{location.name} (an SB3 .zip there also needs "
        "allow_pickle=True / --allow-pickle: it is a pickle, for files you trust only)."
    )


def _not_found(location: ModelLocation, error: Exception) -> ModelNotFoundError:
    """The error for an ``owner/name`` that is neither a local path with safe files nor a findable Hub repo."""
    reason = getattr(error, "reason", None)
    if reason == "no_repo":
        hub = "and it is not a Hub repo either (the Hugging Face Hub has no repo of that name)"
    else:
        hub = "and it is not a cached Hub repo either (neither bundled with d2r_sb3 nor in the Hugging Face cache"
        hub += "; HF_HUB_OFFLINE=1, so the Hub itself was not asked)" if reason == "offline" else ")"
    if location.shadowed is None:
        first = f"{location.name!r} does not exist: no such file or folder in {Path.cwd()}, {hub}."
    else:
        first = f"{location.name!r} was read as a Hub repo id (owner/name), {hub}. {_skipped_local(location)}"
    return ModelNotFoundError(
        f"{first} Check the name: published policies are Hub repo ids such as 'd2r-sb3/d2r-MT10-rand'; zoo runs "
        "are folders such as logs/d2r/MT10-rand_1."
    )


# --- public loader -------------------------------------------------------------------------------------
def _load_local(location: ModelLocation, device: str, load_best: bool, allow_pickle: bool) -> LoadedPolicy:
    path = location.path
    assert path is not None
    if not path.exists():
        message = f"{location.name!r} does not exist: no such file or folder"
        message += "" if path.is_absolute() else f" in {Path.cwd()}"
        if not location.explicit:  # a name that could have been a Hub id is handled by _not_found
            message += "; it is not a Hub repo id either (those are owner/name, e.g. 'd2r-sb3/d2r-MT10-rand')"
        raise ModelNotFoundError(message + ".")
    safe = _safe_source(path, load_best)
    if safe is not None:
        return _load_safe(safe, device)
    if path.is_file():
        if path.suffix == ".zip":
            return _load_zip(path, device, allow_pickle)
        raise ValueError(
            f"{path} is neither an SB3 .zip nor a safe policy file; pass a .zip, a folder with "
            f"{POLICY_CONFIG_FILE}, a zoo log folder or a Hub repo id."
        )
    zip_path = find_model_zip(path, load_best)
    if zip_path is not None:
        return _load_zip(zip_path, device, allow_pickle, run_dir=path)
    raise FileNotFoundError(
        f"{path} holds neither {POLICY_CONFIG_FILE} (safe policy folder) nor a model .zip (zoo log folder)."
    )


def load_policy(
    model: str | os.PathLike[str],
    *,
    device: str = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    load_best: bool = False,
    local_files_only: bool | None = None,
    allow_pickle: bool = False,
) -> LoadedPolicy:
    """Load a multi-task policy for acting. Safe by default: nothing is unpickled unless ``allow_pickle=True``.

    ``model`` may be:

    (a) a folder with ``policy.json`` + ``policy.safetensors``, or either file (safe: nothing is unpickled);
    (b) a zoo run folder ``logs/<algo>/<EnvName>_<N>/``: its safe files ``policy/`` (final model) or, with
        ``load_best=True``, ``best_policy/`` (written by :func:`write_safe_policy`); without them its
        ``<EnvName>.zip`` / ``best_model.zip``, which needs ``allow_pickle=True``;
    (c) an SB3 ``.zip`` (a checkpoint, ``best_model.zip``, ...): a pickle, loaded only with ``allow_pickle=True``;
    (d) a Hugging Face Hub repo id (safe format only, through :func:`d2r_sb3.hub.download_policy`): looked up in
        the bundled snapshots, then the Hugging Face cache, then the Hub unless offline.

    **Local path or Hub id** (:func:`resolve_model`): ``hf://owner/name`` is always a Hub repo; a ``Path`` or a
    string starting with ``/``, ``./``, ``../`` or ``~`` is always local; a string ``owner/name`` (one slash) is a
    Hub repo unless a local path of that name holds safe policy files (then it is local). A local folder merely
    named like a Hub id (e.g. ``d2r-sb3/d2r-MT10-rand/`` holding a zip) is never used for ``owner/name`` -- the
    Hub repo is loaded and a warning says so; pass ``./d2r-sb3/d2r-MT10-rand`` to mean the folder. Any other
    string (``logs/d2r/MT10-rand_1``, ``my_policy``, ``model.zip``) is local. :attr:`LoadedPolicy.origin` says
    which was loaded.

    :param model: what to load (see above).
    :param device: torch device of the policy (``"cpu"``, ``"cuda"``, ``"auto"``).
    :param revision: Hub revision (branch, tag or commit) for (d).
    :param cache_dir: Hub cache folder for (d).
    :param load_best: (b) load the best model instead of the final one.
    :param local_files_only: (d) use only the local Hub cache (``None``: follow ``HF_HUB_OFFLINE``).
    :param allow_pickle: allow loading SB3 ``.zip`` files, which unpickles Python objects and so can run
        arbitrary code: only for files you trust (your own runs). The safe format never needs it.
    :return: the :class:`LoadedPolicy`.
    :raises ModelNotFoundError: (a :class:`FileNotFoundError`) if there is no such file or folder (nor, for an
        ``owner/name``, such a Hub repo).
    :raises PickleNotAllowedError: (a :class:`ValueError`) if loading needs unpickling and ``allow_pickle`` is off.
    :raises FileNotFoundError: if a folder holds nothing loadable, or a Hub repo has no safe files.
    :raises ValueError: if the files are corrupted or inconsistent (task names, non-finite weights, a zip
        without its data).
    """
    location = resolve_model(model, load_best=load_best)
    if location.kind == "local":
        return _load_local(location, device, load_best, allow_pickle)
    from d2r_sb3.hub import HubPolicyNotFoundError, load_from_hub

    assert location.repo_id is not None
    try:
        loaded = load_from_hub(
            location.repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            device=device,
        )
    except HubPolicyNotFoundError as error:
        if location.explicit:
            raise
        raise _not_found(location, error) from error
    if location.shadowed is not None:
        warnings.warn(
            f"Loaded the {loaded.origin}. {_skipped_local(location)}",
            UserWarning,
            stacklevel=2,
        )
    return loaded
