"""The one loader: :func:`load_policy` decides whether a name is a local path or a Hub repo id, then loads it.

:func:`load_policy` reads safe policy folders (:mod:`~d2r_sb3.serialization.safe_format`), SB3 ``.zip`` files
(:mod:`~d2r_sb3.serialization.sb3_zip`, only with ``allow_pickle=True``), zoo run folders
(``logs/<algo>/<EnvName>_<N>/``, whose ``policy/`` and ``best_policy/`` hold safe files) and Hugging Face Hub
repo ids (downloaded by :mod:`~d2r_sb3.serialization.hub`). :func:`resolve_model` is the one rule that decides
whether a name is a local path or a Hub repo id.

This module is the top of :mod:`d2r_sb3.serialization`: it imports the others, and none of them imports it.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from d2r_sb3.common.run_layout import POLICY_DIR, RESULTS_FILE, RunLayout
from d2r_sb3.serialization.hub import (
    DEFAULT_REPO_ID,
    HubPolicyNotFoundError,
    download_policy,
    is_bundled,
)
from d2r_sb3.serialization.loaded_policy import LoadedPolicy, read_recorded_evaluation
from d2r_sb3.serialization.safe_format import POLICY_CONFIG_FILE, POLICY_WEIGHTS_FILE, load_safe_folder
from d2r_sb3.serialization.sb3_zip import find_model_zip, load_model_zip

__all__ = [
    "HUB_PREFIX",
    "ModelLocation",
    "ModelNotFoundError",
    "load_from_hub",
    "load_policy",
    "resolve_model",
]

HUB_PREFIX = "hf://"
"""Prefix that marks a name as a Hugging Face Hub repo id, never a local path: ``hf://d2r-sb3/d2r-MT10-rand``."""
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_EXPLICIT_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


class ModelNotFoundError(FileNotFoundError):
    """Nothing to load: no such local file or folder (and, for an ``owner/name`` name, no such Hub repo)."""


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
    layout = RunLayout(path)
    run_policy = layout.best_policy_dir if load_best else layout.policy_dir
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
        loaded = load_safe_folder(safe, device)
        if (safe / RESULTS_FILE).is_file():  # a published policy: its record lies beside it
            _attach_evaluation(loaded, safe / RESULTS_FILE)
        elif safe.name == POLICY_DIR:  # a run's final model: the run's final evaluation
            _attach_evaluation(loaded, RunLayout(safe.parent).results_file)
        return loaded
    if path.is_file():
        if path.suffix == ".zip":
            return load_model_zip(path, device, allow_pickle)
        raise ValueError(
            f"{path} is neither an SB3 .zip nor a safe policy file; pass a .zip, a folder with "
            f"{POLICY_CONFIG_FILE}, a zoo log folder or a Hub repo id."
        )
    zip_path = find_model_zip(path, load_best)
    if zip_path is not None:
        loaded = load_model_zip(zip_path, device, allow_pickle, run_dir=path)
        layout = RunLayout(path)
        if zip_path == layout.final_model:  # the run's final evaluation is of this model
            _attach_evaluation(loaded, layout.results_file)
        return loaded
    raise FileNotFoundError(
        f"{path} holds neither {POLICY_CONFIG_FILE} (safe policy folder) nor a model .zip (zoo log folder)."
    )


def _attach_evaluation(loaded: LoadedPolicy, results: Path) -> None:
    """Give ``loaded`` the evaluation in ``results`` when that record is of exactly this policy."""
    steps = loaded.metadata.get("num_timesteps")
    loaded.evaluation = read_recorded_evaluation(
        results, loaded.task_names, int(steps) if steps is not None else None
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


def load_from_hub(
    repo_id: str = DEFAULT_REPO_ID,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    use_bundled: bool = True,
    device: str = "cpu",
) -> LoadedPolicy:
    """Download a published policy (see :func:`download_policy`) and load it, ready for ``predict``.

    :param repo_id: ``"org/name"`` (default: the bundled pretrained MT10 D2R policy).
    :param revision: branch, tag or commit to pin.
    :param cache_dir: Hugging Face cache folder.
    :param local_files_only: only look in the caches (``None``: follow ``HF_HUB_OFFLINE``).
    :param use_bundled: try the package's bundled pretrained folder first.
    :param device: torch device of the policy.
    :return: the :class:`LoadedPolicy` (``origin`` says whether the bundled snapshot or the
        Hugging Face cache was used).
    """
    folder = download_policy(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        use_bundled=use_bundled,
    )
    loaded = load_policy(folder, device=device)  # a Path: always the local snapshot folder
    label = repo_id + (f"@{revision}" if revision else "")
    loaded.source = f"hf://{label}"
    bundled = is_bundled(folder)
    loaded.origin = f"Hub repo {label} ({'bundled snapshot' if bundled else f'Hugging Face cache, {folder}'})"
    return loaded
