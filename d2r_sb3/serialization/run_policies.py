"""The safe policy files of a zoo run (``<run>/policy/``, ``<run>/best_policy/``), so loading a run never unpickles."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from d2r_sb3.common.files import sha256_file
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.run_layout import RunLayout
from d2r_sb3.serialization.safe_format import infer_algo, save_policy
from d2r_sb3.serialization.sb3_zip import policy_from_zip_weights

__all__ = ["write_safe_policy"]


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
    layout = RunLayout(Path(run_dir))
    if env_kwargs is None:
        env_kwargs_fn = getattr(getattr(model, "env", None), "env_kwargs", None)
        env_kwargs = env_kwargs_fn() if callable(env_kwargs_fn) else {}
    task_names = list(getattr(model, "task_names", None) or []) or None
    algo = infer_algo(model, model.policy)
    written = []
    jobs: list[tuple[Path, Path | None]] = [(layout.policy_dir, None)]
    if layout.best_model.is_file():
        jobs.append((layout.best_policy_dir, layout.best_model))
    for folder, best_zip in jobs:
        try:
            if best_zip is None:
                source: Any = model
                metadata = _final_model_metadata(model, model_zip)
            else:
                source, metadata = policy_from_zip_weights(model, best_zip)
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


def _final_model_metadata(model: MultiTaskSAC, model_zip: str | Path | None) -> dict[str, Any]:
    """Training steps, and the zip the policy was saved with (so a later, different zip is noticed)."""
    metadata: dict[str, Any] = {"num_timesteps": int(model.num_timesteps)}
    if model_zip is not None:
        metadata.update(source_zip=Path(model_zip).name, source_zip_sha256=sha256_file(Path(model_zip)))
    return metadata
