"""The safe policy format: ``policy.safetensors`` (the actor's weights) + ``policy.json`` (how to rebuild it).

- ``policy.safetensors``: the actor's state dict (all that acting needs), stored with safetensors, so loading it
  never unpickles anything;
- ``policy.json``: everything needed to rebuild the policy and its env as plain JSON -- the format version, the
  registry name of the algorithm, the policy alias (resolved on load only through
  :func:`d2r_sb3.registry.policy_classes`, never by import path), the constructor keyword arguments, the
  observation and action spaces, the task names, the :func:`~d2r_sb3.make_mt_env` keyword arguments, free-form
  metadata and the SHA-256 of the weights file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch as th
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.utils import get_device

from d2r_sb3.common.files import sha256_file
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.nonfinite import first_nonfinite_tensor
from d2r_sb3.common.policies import MultiTaskPolicy
from d2r_sb3.common.provenance import versions
from d2r_sb3.registry import METHODS, method_name, policy_classes
from d2r_sb3.serialization.json_codec import decode_box, decode_kwarg, encode_box, encode_kwarg, policy_kwargs
from d2r_sb3.serialization.loaded_policy import LoadedPolicy

__all__ = [
    "FORMAT_VERSION",
    "POLICY_CONFIG_FILE",
    "POLICY_WEIGHTS_FILE",
    "REQUIRED_KEYS",
    "check_policy_folder",
    "infer_algo",
    "load_safe_folder",
    "read_policy_config",
    "save_policy",
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


# --- which class a policy.json names --------------------------------------------------------------------
def _policy_alias(policy: MultiTaskPolicy, algo: str | None) -> str:
    if algo in METHODS and METHODS[algo].policy_class is type(policy):
        return METHODS[algo].policy_alias  # several aliases may share a class: prefer the method's own
    for alias, cls in policy_classes().items():
        if cls is type(policy):
            return alias
    raise ValueError(
        f"{type(policy).__name__} has no registered alias, so a safe load could not rebuild it. Register it, "
        f"e.g. MultiTaskSAC.policy_aliases['MyPolicy'] = {type(policy).__name__}, in an importable module, or add "
        "its method to d2r_sb3.registry.METHODS."
    )


def infer_algo(model: BaseAlgorithm | None, policy: MultiTaskPolicy) -> str | None:
    """Registry name of the method of ``policy`` (and of ``model``'s algorithm class, when given), if any."""
    return method_name(type(policy), None if model is None else type(model))


# --- save ------------------------------------------------------------------------------------------------
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
    :param algo: registry name (:data:`d2r_sb3.registry.METHODS`); inferred from the classes when ``None``.
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
    if algo is not None and algo not in METHODS:
        raise ValueError(f"Unknown algo {algo!r}; choose one of: {', '.join(METHODS)}.")
    algo = algo or infer_algo(model, policy)
    alias = _policy_alias(policy, algo)
    env_kwargs = _env_kwargs_of(model, env_kwargs)
    task_names = _task_names_of(model, policy, env_kwargs, task_names)
    info = dict(metadata or {})
    if model is not None:
        info.setdefault("num_timesteps", int(model.num_timesteps))
    tensors = _actor_tensors(policy)  # checked before anything is written

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
        "policy_kwargs": policy_kwargs(policy),
        "observation_space": encode_box(policy.observation_space, "observation"),
        "action_space": encode_box(policy.action_space, "action"),
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


def _env_kwargs_of(model: BaseAlgorithm | None, env_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The given make_mt_env kwargs as JSON, else those of ``model.env`` (a MultiTaskVecEnv), else none."""
    if env_kwargs is None:
        env_kwargs_fn = getattr(getattr(model, "env", None), "env_kwargs", None)
        env_kwargs = env_kwargs_fn() if callable(env_kwargs_fn) else {}
    return {k: encode_kwarg(f"env_kwargs.{k}", v) for k, v in env_kwargs.items()}


def _task_names_of(
    model: BaseAlgorithm | None,
    policy: MultiTaskPolicy,
    env_kwargs: dict[str, Any],
    task_names: list[str] | None,
) -> list[str]:
    """The given names, else the model's, else the benchmark's, else ``task0``, ``task1``, ..."""
    names = list(task_names or getattr(model, "task_names", None) or [])
    if not names and "benchmark" in env_kwargs:
        from d2r_sb3.envs.metaworld import benchmark_task_names  # (Meta-World loads only when needed)

        names = benchmark_task_names(env_kwargs["benchmark"])
    if not names:
        names = [f"task{i}" for i in range(policy.num_tasks)]
    if len(names) != policy.num_tasks:
        raise ValueError(f"{len(names)} task names for a policy with {policy.num_tasks} tasks: {names}.")
    return names


def _actor_tensors(policy: MultiTaskPolicy) -> dict[str, th.Tensor]:
    """The actor's state dict as safetensors can store it, refusing NaN or infinite weights."""
    # safetensors refuses tensors that share memory or are views: store contiguous copies on the CPU.
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in policy.actor.state_dict().items()}
    broken = first_nonfinite_tensor(tensors.items())
    if broken is not None:
        raise ValueError(
            f"The actor's {broken} holds NaN or infinite values; save_policy refuses to write broken weights. "
            "Load a checkpoint from before the values went non-finite and save that (training raises "
            "NonFiniteTrainingError when they do)."
        )
    return tensors


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


def _build_policy(config: Mapping[str, Any], where: Path) -> MultiTaskPolicy:
    """The policy ``policy.json`` describes, with fresh weights; its class comes from the registry only."""
    aliases = policy_classes()
    alias = config["policy_class"]
    if alias not in aliases:
        raise ValueError(
            f"{where}: unknown policy_class {alias!r}; this d2r_sb3 knows {sorted(aliases)}. Newer policies "
            "need a newer d2r_sb3 (aliases are looked up in d2r_sb3.registry only, never imported by path)."
        )
    kwargs = config["policy_kwargs"]
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: policy_kwargs must be a JSON object.")
    decoded = {k: decode_kwarg(v, where) for k, v in kwargs.items()}
    observation_space = decode_box(config["observation_space"], "observation_space", where)
    action_space = decode_box(config["action_space"], "action_space", where)
    try:
        policy = aliases[alias](observation_space, action_space, lambda _: 0.0, **decoded)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot build {alias} from the saved policy_kwargs: {error}") from error
    if policy.num_tasks != config["num_tasks"]:
        raise ValueError(
            f"{where}: num_tasks={config['num_tasks']} but the policy built from it has a task one-hot of width "
            f"{policy.num_tasks}; re-save the policy with d2r_sb3.save_policy."
        )
    return policy


def load_safe_folder(folder: Path, device: str) -> LoadedPolicy:
    """Load a safe policy folder (checked first: JSON, checksum, weights header); nothing is unpickled."""
    config = check_policy_folder(folder)
    alias = config["policy_class"]
    policy = _build_policy(config, folder / POLICY_CONFIG_FILE)
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
