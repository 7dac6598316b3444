"""Save and load multi-task policies: a safe weights-only format and SB3 zips.

The **safe policy format** is a folder with two files:

- ``policy.safetensors``: the actor's state dict (all that acting needs), stored with safetensors, so loading it
  never unpickles anything;
- ``policy.json``: everything needed to rebuild the policy and its env as plain JSON -- the format version, the
  registry name of the algorithm, the policy alias (resolved on load only through the algorithms'
  ``policy_aliases``, never by import path), the constructor keyword arguments, the observation and action
  spaces, the task names, the :func:`~d2r_sb3.make_mt_env` keyword arguments, free-form metadata and the
  SHA-256 of the weights file.

:func:`load_policy` also reads SB3 ``.zip`` files, zoo log folders (``logs/<algo>/<EnvName>_<N>/``) and Hugging
Face Hub repo ids (through :func:`d2r_sb3.hub.download_policy`). SB3 zips are pickles: load only zips you trust
(your own training runs); use the safe format to share policies.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import yaml
from gymnasium import spaces
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import json_to_data
from stable_baselines3.common.utils import get_device

from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.nonfinite import first_nonfinite_tensor
from d2r_sb3.common.policies import MultiTaskPolicy
from d2r_sb3.common.provenance import versions
from d2r_sb3.d2r.d2r import D2RSAC
from d2r_sb3.registry import ALGOS

__all__ = [
    "FORMAT_VERSION",
    "POLICY_CONFIG_FILE",
    "POLICY_WEIGHTS_FILE",
    "LoadedPolicy",
    "check_policy_folder",
    "find_model_zip",
    "load_policy",
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
# Constructor arguments that only matter for training (the optimizer is rebuilt by the algorithm).
_TRAINING_ONLY_KWARGS = ("optimizer_class", "optimizer_kwargs")
# Objects that SB3 would unpickle from a zip's "data"; replaced so loading never rebuilds schedules.
_ZIP_CUSTOM_OBJECTS = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0}


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
    ):
        self.policy = policy
        self.algo = algo
        self.task_names = list(task_names)
        self.env_kwargs = dict(env_kwargs)
        self.metadata = dict(metadata or {})
        self.source = source
        self.model = model

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_policy(
    model_or_policy: MultiTaskSAC | MultiTaskPolicy,
    folder: str | Path,
    *,
    algo: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the safe policy format (``policy.safetensors`` + ``policy.json``) into ``folder``.

    :param model_or_policy: a trained :class:`~d2r_sb3.MultiTaskSAC` / :class:`~d2r_sb3.D2RSAC`, or its
        :class:`~d2r_sb3.MultiTaskPolicy`.
    :param folder: output folder (created if needed; existing policy files are overwritten).
    :param algo: registry name (:data:`d2r_sb3.registry.ALGOS`); inferred from the classes when ``None``.
    :param env_kwargs: :func:`~d2r_sb3.make_mt_env` kwargs of the env; default ``model.env.env_kwargs()``
        when the model has such an env.
    :param metadata: extra JSON-able information (e.g. training steps, results).
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
    task_names = list(getattr(model, "task_names", None) or [])
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
        "weights_sha256": _sha256(weights_path),
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


# --- safe load -----------------------------------------------------------------------------------------
def read_policy_config(folder: str | Path) -> dict[str, Any]:
    """Read and validate ``policy.json`` of a safe policy folder (no weights are read).

    :param folder: the folder holding ``policy.json``.
    :return: the parsed configuration.
    :raises FileNotFoundError: if the file is missing.
    :raises ValueError: if it is not valid JSON, lacks required keys or has another format version.
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
    if expected is not None and _sha256(weights) != expected:
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
        return load_file(str(path), device=device)
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}); download or save it again."
        ) from error


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
    return LoadedPolicy(
        policy,
        algo=config.get("algo"),
        task_names=list(config["task_names"]),
        env_kwargs=dict(config.get("env_kwargs") or {}),
        metadata=dict(config.get("metadata") or {}),
        source=str(folder),
    )


# --- SB3 zips and zoo log folders ------------------------------------------------------------------------
def _zip_policy_class(path: Path) -> type | None:
    """The policy class stored in an SB3 zip's ``data`` (unpickles it: trusted files only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = json_to_data(archive.read("data").decode(), custom_objects=_ZIP_CUSTOM_OBJECTS)
    except (zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{path} is not an SB3 model zip ({error}).") from error
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


def _load_zip(path: Path, device: str) -> LoadedPolicy:
    algo, algo_cls = _algo_of_zip(path)
    # Same as rl-zoo's enjoy: a 1-row buffer and constant schedules, so loading allocates nothing big.
    model = algo_cls.load(path, device=device, buffer_size=1, custom_objects=_ZIP_CUSTOM_OBJECTS)
    model.policy.set_training_mode(False)
    if algo is None:
        algo = _infer_algo(model, model.policy)
    return LoadedPolicy(
        model.policy,
        algo=algo,
        task_names=list(getattr(model, "task_names", [f"task{i}" for i in range(model.policy.num_tasks)])),
        env_kwargs=_env_kwargs_near(path),
        metadata={"num_timesteps": int(model.num_timesteps)},
        source=str(path),
        model=model,
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


# --- public loader -------------------------------------------------------------------------------------
def load_policy(
    model: str | Path,
    *,
    device: str = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    load_best: bool = False,
    local_files_only: bool | None = None,
) -> LoadedPolicy:
    """Load a multi-task policy for acting.

    ``model`` may be:

    (a) a folder with ``policy.json`` + ``policy.safetensors`` (safe: nothing is unpickled);
    (b) an SB3 ``.zip`` -- a pickle, so load only files you trust;
    (c) a zoo log folder ``logs/<algo>/<EnvName>_<N>/`` (its final ``<EnvName>.zip``, or ``best_model.zip``
        with ``load_best=True``; a pickle as well);
    (d) a Hugging Face Hub repo id ``"org/name"`` that is not a local path (safe format, through
        :func:`d2r_sb3.hub.download_policy`).

    :param model: what to load (see above).
    :param device: torch device of the policy (``"cpu"``, ``"cuda"``, ``"auto"``).
    :param revision: Hub revision (branch, tag or commit) for (d).
    :param cache_dir: Hub cache folder for (d).
    :param load_best: (c) load ``best_model.zip`` instead of the final model.
    :param local_files_only: (d) use only the local Hub cache (``None``: follow ``HF_HUB_OFFLINE``).
    :return: the :class:`LoadedPolicy`.
    :raises FileNotFoundError: if nothing loadable is found at ``model``.
    :raises ValueError: if the files are corrupted or inconsistent.
    """
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".zip":
            return _load_zip(path, device)
        if path.name in (POLICY_CONFIG_FILE, POLICY_WEIGHTS_FILE):
            return _load_safe(path.parent, device)
        raise ValueError(
            f"{path} is neither an SB3 .zip nor a safe policy file; pass a .zip, a folder with "
            f"{POLICY_CONFIG_FILE}, a zoo log folder or a Hub repo id."
        )
    if path.is_dir():
        if (path / POLICY_CONFIG_FILE).is_file() or (path / POLICY_WEIGHTS_FILE).is_file():
            return _load_safe(path, device)
        zip_path = find_model_zip(path, load_best)
        if zip_path is not None:
            return _load_zip(zip_path, device)
        raise FileNotFoundError(
            f"{path} holds neither {POLICY_CONFIG_FILE} (safe policy folder) nor a model .zip (zoo log folder)."
        )
    from d2r_sb3.hub import is_repo_id, load_from_hub

    if isinstance(model, str) and is_repo_id(model) and not model.endswith(".zip"):
        return load_from_hub(
            model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, device=device
        )
    raise FileNotFoundError(
        f"{model} does not exist. Pass a safe policy folder, an SB3 .zip, a zoo log folder (logs/<algo>/<Env>_<N>) "
        "or a Hugging Face Hub repo id 'org/name'."
    )
