"""SB3 ``.zip`` models: reading their plain-JSON part, refusing to unpickle them unless asked, and finding them.

An SB3 zip holds ``data`` (JSON in which some values are base64 cloudpickles: the policy class, schedules, spaces)
and ``policy.pth`` (weights). Unpickling can run arbitrary code, so :func:`read_zip_data` checks a zip without
unpickling anything, and :func:`load_model_zip` unpickles only with ``allow_pickle=True``.
"""

from __future__ import annotations

import copy
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, cast

import yaml
from stable_baselines3.common.save_util import json_to_data, load_from_zip_file

from d2r_sb3.common.files import sha256_file
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.nonfinite import first_nonfinite_tensor
from d2r_sb3.common.policies import MultiTaskPolicy
from d2r_sb3.common.run_layout import (
    BEST_MODEL_ZIP,
    CHECKPOINTS_DIR,
    ENV_KWARGS_FILE,
    LEGACY_CHECKPOINT,
    RunLayout,
)
from d2r_sb3.registry import METHODS
from d2r_sb3.serialization.loaded_policy import LoadedPolicy
from d2r_sb3.serialization.safe_format import infer_algo

__all__ = [
    "ZIP_REQUIRED_KEYS",
    "PickleNotAllowedError",
    "find_model_zip",
    "load_model_zip",
    "policy_from_zip_weights",
    "read_zip_data",
]

# Objects that SB3 would unpickle from a zip's "data"; replaced so loading never rebuilds schedules.
_ZIP_CUSTOM_OBJECTS = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0}
# Entries of an SB3 zip's "data" that loading a policy cannot do without.
ZIP_REQUIRED_KEYS = ("policy_class", "policy_kwargs", "observation_space", "action_space", "n_envs")


class PickleNotAllowedError(ValueError):
    """Loading this file would unpickle Python objects (an SB3 ``.zip``) and ``allow_pickle`` is off."""


def read_zip_data(path: Path) -> dict[str, Any]:
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
        layout = RunLayout(run_dir)
        folder = layout.best_policy_dir if path.name == BEST_MODEL_ZIP else layout.policy_dir
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
    for name, method in METHODS.items():
        if method.policy_class is policy_class:
            return name, method.algo_class
    for method in METHODS.values():  # e.g. a subclass of D2RPolicy: D2RSAC, but no registered name
        if isinstance(policy_class, type) and issubclass(policy_class, method.policy_class):
            return None, method.algo_class
    return None, MultiTaskSAC


def _env_kwargs_near(zip_path: Path) -> dict[str, Any]:
    """make_mt_env kwargs saved beside a zip: ``env_kwargs.yml`` in its folder (a training checkpoint, also when
    copied elsewhere) or in one subfolder (zoo), or, for a checkpoint written before checkpoints held the file,
    ``<run>/checkpoints/step_<N>/model.zip``, in its run's records."""
    candidates = [zip_path.parent / ENV_KWARGS_FILE, zip_path.parent / zip_path.stem / ENV_KWARGS_FILE]
    candidates += sorted(zip_path.parent.glob(f"*/{ENV_KWARGS_FILE}"))
    if zip_path.parent.parent.name == CHECKPOINTS_DIR:
        candidates += sorted(zip_path.parent.parent.parent.glob(f"*/{ENV_KWARGS_FILE}"))
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


def load_model_zip(path: Path, device: str, allow_pickle: bool, run_dir: Path | None = None) -> LoadedPolicy:
    read_zip_data(path)  # plain JSON checks first: a damaged zip gets a clear error, and nothing is unpickled
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
        algo = infer_algo(model, model.policy)
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
    layout = RunLayout(folder)
    zips = sorted(folder.glob("*.zip"))
    if load_best:
        best = layout.best_model
        if not best.is_file():
            raise FileNotFoundError(
                f"{best} does not exist (it is written by evaluation during training); load the final model "
                "with load_best=False."
            )
        return best
    names = [layout.env_name] if layout.is_numbered else []
    names += [z.stem for z in zips if (folder / z.stem).is_dir()]  # <EnvName>.zip next to <EnvName>/
    for name in names:
        if (folder / f"{name}.zip").is_file():
            return folder / f"{name}.zip"
    final = [z for z in zips if z.name != BEST_MODEL_ZIP and not LEGACY_CHECKPOINT.match(z.name)]
    if len(final) == 1:
        return final[0]
    if zips:
        raise FileNotFoundError(
            f"{folder} has no final model zip <EnvName>.zip; it holds {[z.name for z in zips]}. Pass one of "
            "them directly, or load_best=True for best_model.zip."
        )
    return None


def policy_from_zip_weights(model: MultiTaskSAC, path: Path) -> tuple[MultiTaskPolicy, dict[str, Any]]:
    """A copy of ``model.policy`` holding the weights of the SB3 zip ``path`` (its ``data`` is not unpickled)."""
    data = read_zip_data(path)  # plain JSON: nothing is unpickled
    _, params, _ = load_from_zip_file(path, load_data=False, device="cpu")  # torch.load(weights_only=True)
    if "policy" not in params:
        raise ValueError(f"{path} holds no policy.pth: not an SB3 model zip.")
    state_dict = cast("dict[str, Any]", params["policy"])  # (SB3 types each entry as a tensor: a state dict)
    policy = copy.deepcopy(model.policy)
    try:
        policy.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the architecture of the final model: {error}") from error
    metadata: dict[str, Any] = {"source_zip": path.name, "source_zip_sha256": sha256_file(path)}
    if isinstance(data.get("num_timesteps"), int):
        metadata["num_timesteps"] = data["num_timesteps"]
    return policy, metadata
