"""Warm starts: ``train.py --warm-start PATH`` starts a new run from the learned state of another, and
``train.py --write-seed SOURCE -o FILE`` writes that state as a small resume seed file.

A seed (:mod:`d2r_sb3.serialization.seed`) holds the actor, the twin critics and their targets, log alpha (and so
D2R's routing temperatures), the env steps and updates done, the algorithm and the policy's constructor arguments:
no optimiser state and no replay buffer. :func:`load_seed` reads one from

- a seed file (safetensors; never unpickled);
- an SB3 model ``.zip`` (a final model, ``best_model.zip``, a checkpoint's ``model.zip``): a pickle, so only with
  ``--allow-pickle``, as for ``enjoy.py`` / ``evaluate.py``;
- a checkpoint folder ``<run>/checkpoints/step_<N>/`` (verified against its manifest first; its ``model.zip``
  needs ``--allow-pickle``), also when copied out of its run;
- a zoo run folder: its newest valid checkpoint, else its newest model zip (``--allow-pickle``).

:func:`d2r_sb3.zoo.exp_manager.new_run` then builds the new run's model from its hyperparameters as usual and
loads the seed into it (:func:`d2r_sb3.serialization.seed.warm_start`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from d2r_sb3.common.callbacks import evaluations_up_to
from d2r_sb3.common.checkpoints import (
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointStore,
)
from d2r_sb3.common.files import sha256_file
from d2r_sb3.common.run_layout import CHECKPOINTS_DIR, RunLayout
from d2r_sb3.serialization.safe_format import POLICY_CONFIG_FILE
from d2r_sb3.serialization.sb3_zip import PickleNotAllowedError, load_model_zip
from d2r_sb3.serialization.seed import ResumeSeed, read_seed, seed_from_model, write_seed
from d2r_sb3.zoo.exp_manager import WarmStart, warn_user
from d2r_sb3.zoo.resume import find_resume_point
from d2r_sb3.zoo.utils import ZooError, read_yaml

__all__ = ["SOURCES", "describe", "load_seed", "write_seed_command"]

SOURCES = (
    "Pass a seed file (python zoo/train.py --write-seed RUN -o FILE), an SB3 model .zip, a checkpoint folder "
    "(<run>/checkpoints/step_<N>) or a zoo run folder (logs/<algo>/<EnvName>_<N>)."
)


def _checkpoint_steps(folder: Path) -> int:
    digits = folder.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else 0


def _run_of(path: Path) -> Path | None:
    """The zoo run folder a model zip or checkpoint folder belongs to (``None`` when it is on its own)."""
    for candidate in (path.parent, path.parent.parent, path.parent.parent.parent):
        if candidate.name == CHECKPOINTS_DIR:
            continue
        if RunLayout(candidate).record("args.yml").is_file():
            return candidate
    return None


def _from_zip(zip_path: Path, allow_pickle: bool, flag: str, origin: str, given: Path) -> WarmStart:
    """The seed of an SB3 model zip (unpickled: only with ``--allow-pickle``)."""
    try:
        loaded = load_model_zip(zip_path, "cpu", allow_pickle)
    except PickleNotAllowedError:
        alternative = (
            "; the seed file it writes is never unpickled"
            if flag == "--write-seed"
            else ", or start from a seed file, which is never unpickled (write one once with: python zoo/train.py "
            f"--write-seed {given} --allow-pickle -o FILE)"
        )
        raise ZooError(
            f"{flag} {given}: {zip_path} is an SB3 .zip, a pickle, and unpickling a file can run arbitrary code. "
            f"Pass --allow-pickle if you trust it (your own run's files){alternative}."
        ) from None
    except (ValueError, OSError) as err:
        raise ZooError(f"{flag} {given}: cannot read {zip_path}: {err}") from None
    assert loaded.model is not None  # (load_model_zip loads the whole algorithm)
    run_dir = _run_of(zip_path)
    algo, env_kwargs = loaded.algo, loaded.env_kwargs
    if run_dir is not None:  # the run's records say what the zip alone cannot (its env, its --algo)
        layout = RunLayout(run_dir)
        algo = read_yaml(layout.record("args.yml")).get("algo", algo)
        if layout.record("env_kwargs.yml").is_file():
            env_kwargs = read_yaml(layout.record("env_kwargs.yml")) or {}
    try:
        seed = seed_from_model(loaded.model, algo=algo, env_kwargs=env_kwargs, source=str(zip_path.resolve()))
    except ValueError as err:
        raise ZooError(f"{flag} {given}: {err}") from None
    if run_dir is not None:
        _add_evaluations(seed, RunLayout(run_dir).evaluations_file)
    elif (zip_path.parent / STATE_FILE).is_file():  # a checkpoint folder copied out of its run (a milestone)
        _add_evaluations(seed, zip_path.parent / STATE_FILE, checkpoint_state=True)
    return _warm_start(seed, given, origin, zip_path)


def _add_evaluations(seed: ResumeSeed, path: Path, checkpoint_state: bool = False) -> None:
    """Give the seed its run's evaluation history up to the seed's steps (nothing when the run has none).

    :param path: the run's ``evaluations.json``, or a checkpoint's ``state.json`` (``checkpoint_state``), which
        keeps the history the run had when the checkpoint was written.
    """
    if not path.is_file():
        return
    try:
        history = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        warn_user(f"{path} is unreadable ({err}); the seed carries no evaluation history.")
        return
    if checkpoint_state and isinstance(history, dict):
        history = (history.get("callbacks") or {}).get("evaluation", {}).get("history")
    if isinstance(history, dict) and history.get("task_names") == seed.task_names:
        cut = evaluations_up_to(history, seed.num_timesteps)
        if cut.get("timesteps"):
            seed.config["evaluations"] = cut


def _from_checkpoint(folder: Path, allow_pickle: bool, flag: str, given: Path, verified: bool) -> WarmStart:
    if not verified:
        try:
            Checkpoint(folder, _checkpoint_steps(folder)).verify()
        except CheckpointError as err:
            raise ZooError(f"{flag} {given}: the checkpoint is damaged: {err}") from None
    return _from_zip(folder / MODEL_FILE, allow_pickle, flag, f"checkpoint {folder}", given)


def _from_run(run_dir: Path, allow_pickle: bool, flag: str) -> WarmStart:
    layout = RunLayout(run_dir)
    store = CheckpointStore(layout.checkpoints_dir)
    checkpoint = store.latest(report=warn_user)
    if checkpoint is not None:
        return _from_checkpoint(checkpoint.path, allow_pickle, flag, run_dir, verified=True)
    if store.list():
        raise ZooError(
            f"{flag} {run_dir}: every checkpoint in {store.root} is damaged (see the warnings above)."
        )
    _, zip_path, _ = find_resume_point(run_dir, layout.env_name)
    return _from_zip(zip_path, allow_pickle, flag, f"{zip_path.name} of run {run_dir}", run_dir)


def _warm_start(seed: ResumeSeed, given: Path, origin: str, file: Path) -> WarmStart:
    record: dict[str, Any] = {
        "source": str(given.resolve()),
        "origin": origin,
        "file_sha256": sha256_file(file),
        "algo": seed.algo,
        "policy_class": seed.policy_class,
        "num_timesteps": seed.num_timesteps,
        "n_updates": seed.n_updates,
        "critic_target": "loaded" if seed.has_critic_target else "copied from the critics",
        "log_ent_coef": seed.log_ent_coef.tolist() if seed.log_ent_coef is not None else None,
        "task_names": seed.task_names,
        "env_kwargs": seed.env_kwargs,
        "seed_written_from": seed.config.get("source"),
        "evaluations": len(seed.evaluations["timesteps"]) if seed.evaluations else 0,
    }
    return WarmStart(seed, origin, record)


def load_seed(path: str | Path, *, allow_pickle: bool = False, flag: str = "--warm-start") -> WarmStart:
    """Read the learned state of a seed file, a model zip, a checkpoint folder or a zoo run folder.

    :param path: what to read (see the module docstring).
    :param allow_pickle: allow SB3 zips (checkpoints and run folders hold them); unpickling can run arbitrary
        code, so only for files you trust. Seed files never need it.
    :param flag: the option being served, for the messages.
    :return: the :class:`~d2r_sb3.zoo.exp_manager.WarmStart` (the seed, where it came from, its record).
    :raises ZooError: if there is no such file or folder, it holds nothing to start from, it is damaged, or it is
        a pickle and ``allow_pickle`` is off.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise ZooError(f"{flag} {given}: no such file or folder. {SOURCES}")
    if given.is_file():
        if given.suffix == ".zip":
            return _from_zip(given, allow_pickle, flag, f"model zip {given}", given)
        try:
            seed = read_seed(given)
        except (ValueError, OSError) as err:
            raise ZooError(f"{flag} {given}: {err} {SOURCES}") from None
        return _warm_start(seed, given, f"seed file {given}", given)
    if (given / MANIFEST_FILE).is_file():
        return _from_checkpoint(given, allow_pickle, flag, given, verified=False)
    if RunLayout(given).record("args.yml").is_file() or (given / CHECKPOINTS_DIR).is_dir():
        return _from_run(given, allow_pickle, flag)
    if (given / POLICY_CONFIG_FILE).is_file():
        raise ZooError(
            f"{flag} {given} is a safe policy folder: it holds the actor only, for acting, not the critics and log "
            f"alpha a warm start needs. {SOURCES}"
        )
    raise ZooError(
        f"{flag} {given} is a folder, but neither a checkpoint (no {MANIFEST_FILE}) nor a zoo run folder. {SOURCES}"
    )


def describe(seed: ResumeSeed) -> str:
    """One line on what a seed holds."""
    parts = ["actor", "twin critics"]
    if seed.has_critic_target:
        parts.append("their targets")
    if seed.log_ent_coef is not None:
        count = seed.log_ent_coef.numel()
        parts.append(f"log alpha ({count} coefficient{'s' if count > 1 else ''})")
    if any(name.endswith("route_temperature") for name in seed.tensors):
        parts.append("routing temperatures")
    if seed.evaluations:
        steps = seed.evaluations["timesteps"]
        parts.append(f"evaluation history ({len(steps)} evaluations, up to {steps[-1]:,} env steps)")
    if seed.matrix_precision != "float32":
        parts.append(f"weight matrices in {seed.matrix_precision}")
    return (
        f"{seed.algo or '?'} / {seed.policy_class} on {len(seed.task_names)} tasks at {seed.num_timesteps:,} env "
        f"steps and {seed.n_updates:,} updates: {', '.join(parts)}"
    )


def write_seed_command(args: argparse.Namespace) -> int:
    """``train.py --write-seed SOURCE -o FILE``: write the resume seed of SOURCE and print its size."""
    if not args.output:
        raise ZooError(
            "--write-seed needs -o FILE, the seed file to write (e.g. -o seeds/MT10-rand-1M.safetensors)."
        )
    output = Path(args.output).expanduser()
    if output.is_dir():
        raise ZooError(
            f"-o {output} is a folder; pass the seed file to write (e.g. {output}/seed.safetensors)."
        )
    warm = load_seed(args.write_seed, allow_pickle=args.allow_pickle, flag="--write-seed")
    seed = warm.seed.without_critic_target() if args.seed_without_targets else warm.seed
    try:
        if args.seed_precision == "float16":
            seed = seed.with_matrices_in_float16()
        write_seed(seed, output)
    except (OSError, ValueError) as err:
        raise ZooError(f"Cannot write the seed to {output}: {err}") from None
    size = output.stat().st_size
    print(f"Wrote {output} ({size / 1e6:.1f} MB, {size:,} bytes) from {warm.origin}")
    print(f"  {describe(seed)}")
    print(
        f"  no optimiser state, no replay buffer. Start a new run from it with the run's flags and the target total:\n"
        f"  python zoo/train.py --algo {seed.algo or '<algo>'} ... --warm-start {output} -n TOTAL"
    )
    return 0
