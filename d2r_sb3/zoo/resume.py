"""Continuing a zoo run where it stopped: from its newest valid training checkpoint (exactly: RNG states, episodes
in progress, evaluation history), or, for runs of earlier versions, from its newest model zip.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import CSVOutputFormat

from d2r_sb3.common.checkpoints import (
    Checkpoint,
    load_buffer,
)
from d2r_sb3.common.run_layout import CHECKPOINTS_DIR, RunLayout
from d2r_sb3.common.run_lock import RunLock
from d2r_sb3.registry import ALGOS
from d2r_sb3.serialization.sb3_zip import read_zip_data
from d2r_sb3.zoo.exp_manager import (
    RunSetup,
    build_env,
    check_writable_folder,
    checkpoint_store,
    lock_run,
    warn_user,
)
from d2r_sb3.zoo.utils import (
    ZooError,
    read_yaml,
    write_yaml,
)

# Options fixed by a run's saved settings: `--resume` refuses them (they would change the experiment).
FIXED_ON_RESUME = (
    "algo",
    "env",
    "goals",
    "preset",
    "seed",
    "hyperparams",
    "conf_file",
    "env_kwargs",
    "log_folder",
)


def _saved_num_timesteps(model_zip: Path) -> int:
    """``num_timesteps`` stored in an SB3 model zip (read from its JSON ``data`` member, nothing unpickled)."""
    with zipfile.ZipFile(model_zip) as archive:
        return int(json.loads(archive.read("data"))["num_timesteps"])


def find_resume_point(run_dir: Path, name: str) -> tuple[int, Path, Path | None]:
    """The most advanced saved model of a run of an earlier version: ``(total steps, model zip, its replay buffer
    or None)``.

    Candidates are the final ``<EnvName>.zip`` (buffer ``replay_buffer.pkl``) and the checkpoints
    ``rl_model_<steps>_steps.zip`` (buffer ``rl_model_replay_buffer_<steps>_steps.pkl``); on a tie the final
    model wins.

    :raises ZooError: If the run holds no model.
    """
    layout = RunLayout(run_dir, name)
    candidates: list[tuple[int, int, Path, Path]] = [
        (steps, 0, path, layout.legacy_buffer(steps)) for steps, path in layout.legacy_checkpoints()
    ]
    final = layout.final_model
    if final.is_file():
        candidates.append((_saved_num_timesteps(final), 1, final, layout.replay_buffer_pickle))
    if not candidates:
        raise ZooError(
            f"{run_dir} holds no model to resume from (neither {final.name} nor rl_model_<steps>_steps.zip "
            f"checkpoints; train with --save-freq N to get checkpoints)."
        )
    steps, _, model_path, buffer_path = max(candidates, key=lambda c: (c[0], c[1]))
    return steps, model_path, buffer_path if buffer_path.is_file() else None


class ContinuedCSVOutputFormat(CSVOutputFormat):
    """SB3's CSV output, continuing an existing ``progress.csv`` (SB3's own truncates it): rows and columns kept.

    :param filename: The CSV file; a missing one is created.
    """

    def __init__(self, filename: str) -> None:
        if not os.path.isfile(filename):
            super().__init__(filename)
            return
        self.file = open(filename, "r+")  # closed by Logger.close(), like SB3's own
        header = self.file.readline().rstrip("\n")
        self.keys = header.split(",") if header else []
        self.separator = ","
        self.quotechar = '"'
        self.file.seek(0, os.SEEK_END)


def drop_progress_after(path: Path, num_timesteps: int) -> None:
    """Remove the ``progress.csv`` rows logged after ``num_timesteps`` (a run resumed from an older checkpoint)."""
    if not path.is_file():
        return
    with path.open(newline="") as file:
        rows = list(csv.reader(file))
    if not rows or "time/total_timesteps" not in rows[0]:
        return
    column = rows[0].index("time/total_timesteps")
    kept = [rows[0]] + [
        row
        for row in rows[1:]
        if column >= len(row) or not row[column] or float(row[column]) <= num_timesteps
    ]
    if len(kept) < len(rows):
        with path.open("w", newline="") as file:
            csv.writer(file, lineterminator="\n").writerows(kept)


def resume_run(args: argparse.Namespace, explicit: set[str], command: str) -> RunSetup | None:
    """Load the newest valid checkpoint of a run to continue it in the same folder, exactly where it stopped.

    Runs written before training checkpoints existed resume from their newest ``rl_model_<steps>_steps.zip`` or
    final model (and its pickled replay buffer, if any), with new episodes.

    :param args: The parsed flags.
    :param explicit: The flags given on the command line (the others come from the run's ``args.yml``).
    :param command: The command line, appended to ``command.txt``.
    :return: The set-up, or None when the run already has the requested steps (nothing is changed then).
    """
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise ZooError(f"--resume {run_dir}: no such folder.")
    layout = RunLayout(run_dir)
    name = layout.env_name
    if not layout.record("args.yml").is_file():
        raise ZooError(f"{run_dir} is not a zoo run folder: {layout.record('args.yml')} is missing.")
    fixed = sorted(key for key in FIXED_ON_RESUME if key in explicit)
    if fixed:
        flags = ", ".join("--" + key.replace("_", "-") for key in fixed)
        raise ZooError(
            f"--resume continues {run_dir} with its saved settings ({layout.record('args.yml')}); {flags} cannot change. "
            f"Start a new run to change them."
        )
    saved = read_yaml(layout.record("args.yml"))
    merged = {**saved, **{key: getattr(args, key) for key in explicit}}
    merged["resume"] = str(run_dir)
    effective = argparse.Namespace(**{**vars(args), **merged})
    config = read_yaml(layout.record("config.yml"))
    n_timesteps = (
        int(args.n_timesteps) if "n_timesteps" in explicit and args.n_timesteps > 0 else config["n_timesteps"]
    )
    env_kwargs = read_yaml(layout.record("env_kwargs.yml"))
    if "vec_env" in explicit:
        env_kwargs["vec_env"] = args.vec_env
    check_writable_folder(run_dir, "--resume")
    lock = lock_run(run_dir)
    try:
        return _load_resume_point(effective, run_dir, name, env_kwargs, n_timesteps, config, command, lock)
    except BaseException:
        lock.release()
        raise


def _finished(layout: RunLayout, steps: int, final_eval_episodes: int) -> bool:
    """Whether a run's final files describe its newest checkpoint (at ``steps``): its final evaluation
    (``results.json``), or, when the run skips that (``final_eval_episodes`` 0), its final model."""
    if layout.results_file.is_file():
        try:
            return int(json.loads(layout.results_file.read_text())["total_timesteps"]) >= steps
        except (OSError, KeyError, TypeError, ValueError):
            return False
    if final_eval_episodes > 0 or not layout.final_model.is_file():
        return False
    try:
        return int(read_zip_data(layout.final_model)["num_timesteps"]) >= steps
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _load_resume_point(
    args: argparse.Namespace,
    run_dir: Path,
    name: str,
    env_kwargs: dict[str, Any],
    n_timesteps: int,
    config: dict[str, Any],
    command: str,
    lock: RunLock,
) -> RunSetup | None:
    store = checkpoint_store(run_dir, args.keep_checkpoints)
    checkpoint: Checkpoint | None = store.latest(report=warn_user)
    if checkpoint is not None:
        steps, model_path, buffer_path = (
            checkpoint.num_timesteps,
            checkpoint.model_path,
            checkpoint.buffer_path,
        )
        origin = f"{CHECKPOINTS_DIR}/{checkpoint.path.name}"
    elif store.list():
        raise ZooError(
            f"Every checkpoint in {store.root} is damaged (see the warnings above); nothing to resume from."
        )
    else:  # a run written before training checkpoints existed
        steps, model_path, buffer_path = find_resume_point(run_dir, name)
        origin = model_path.name
    layout = RunLayout(run_dir, name)
    if n_timesteps <= steps and _finished(layout, steps, args.final_eval_episodes):
        print(
            f"{run_dir} already has {steps} steps (target {n_timesteps}); nothing to do and nothing changed. "
            f"Pass -n N with N > {steps} to train further."
        )
        lock.release()
        return None
    # (At or past the target but unfinished: stopped after its last checkpoint, before the final model or its
    # evaluation was written; the resumed run trains no further and writes them.)

    drop_progress_after(layout.progress_file, steps)
    env = build_env(env_kwargs)
    cls = ALGOS[args.algo][0]
    model = cls.load(model_path, env=env, device=args.device)
    model.verbose = args.verbose
    if buffer_path is None:
        warn_user(f"no replay buffer was saved with {origin}; continuing with an empty buffer.")
    elif checkpoint is not None:
        load_buffer(model.replay_buffer, buffer_path)
    else:
        model.load_replay_buffer(buffer_path)
    if args.verbose >= 1:
        print(f"Resuming {run_dir} from {origin} at {steps} steps (target {n_timesteps}).")
    if n_timesteps != config["n_timesteps"]:
        write_yaml(layout.record("config.yml"), {**config, "n_timesteps": n_timesteps})
    with open(layout.record("command.txt"), "a") as file:
        file.write(command + "\n")
    warm = layout.record("warm_start.yml")
    warm_started_from = (read_yaml(warm) or {}).get("origin") if warm.is_file() else None
    return RunSetup(
        args,
        run_dir,
        name,
        env,
        env_kwargs,
        model,
        n_timesteps,
        resumed_from=origin,
        lock=lock,
        training_state=checkpoint.state() if checkpoint is not None else None,
        warm_started_from=warm_started_from,
    )
