"""The experiment manager of the zoo: set up a new run (env, model, run folder and its records) and lock it.

:mod:`d2r_sb3.zoo.resume` sets up a run that continues from its checkpoints; :mod:`d2r_sb3.zoo.training` trains
either one. ``python zoo/train.py`` (:mod:`d2r_sb3.zoo.train`) is the command line over them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2r_sb3.common.checkpoints import (
    CheckpointStore,
)
from d2r_sb3.common.kwargs import accepted_kwargs
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.run_layout import RunLayout
from d2r_sb3.common.run_lock import RunLock, RunLockedError
from d2r_sb3.envs import MultiTaskVecEnv, check_env_kwargs, make_mt_env
from d2r_sb3.registry import ALGOS
from d2r_sb3.zoo.utils import (
    ZooError,
    apply_overrides,
    env_name,
    load_hyperparams,
    normalize_hyperparams,
    parse_env,
    parse_key_values,
    write_yaml,
)

# make_mt_env arguments that have their own flag.
ENV_FLAGS = {
    "benchmark": "--env",
    "goals": "--goals",
    "preset": "--preset",
    "seed": "--seed",
    "vec_env": "--vec-env",
}
# Constructor arguments the script sets itself.
SCRIPT_SET = {
    "seed": "--seed",
    "device": "--device",
    "verbose": "--verbose",
    "env": "--env",
    "tensorboard_log": None,
}


@dataclass
class RunSetup:
    """Everything :func:`train` needs, for a new or a resumed run."""

    args: argparse.Namespace
    run_dir: Path
    name: str
    env: MultiTaskVecEnv
    env_kwargs: dict[str, Any]
    model: MultiTaskSAC
    n_timesteps: int
    resumed_from: str | None
    lock: RunLock
    training_state: dict[str, Any] | None = (
        None  # from the checkpoint resumed (restored just before learning)
    )

    @property
    def layout(self) -> RunLayout:
        """The paths of the run folder."""
        return RunLayout(self.run_dir, self.name)


def env_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """make_mt_env arguments from the flags and ``--env-kwargs`` (checked against its signature)."""
    overrides = parse_key_values(args.env_kwargs, "--env-kwargs")
    try:
        check_env_kwargs(overrides, own_flags=ENV_FLAGS)
    except ValueError as err:
        raise ZooError(str(err)) from None
    return dict(
        benchmark=parse_env(args.env),
        goals=args.goals,
        preset=args.preset,
        seed=args.seed,
        vec_env=args.vec_env,
        **overrides,
    )


def build_env(env_kwargs: dict[str, Any]) -> MultiTaskVecEnv:
    """``make_mt_env(**env_kwargs)``, with its errors (bad values) reported as :class:`ZooError`."""
    try:
        return make_mt_env(**env_kwargs)
    except (ValueError, TypeError) as err:
        raise ZooError(f"Cannot build the env: {err}") from None


def check_hyperparams(cls: type[MultiTaskSAC], policy: str, hyperparams: dict[str, Any], source: str) -> None:
    """Clear errors for an unknown policy alias or constructor argument, before anything is built."""
    if policy not in cls.policy_aliases:
        known = ", ".join(cls.policy_aliases) or "none registered"
        raise ZooError(f"Unknown policy {policy!r} (from {source}) for {cls.__name__}; known: {known}.")
    accepted = accepted_kwargs(cls) - {"policy", "_init_setup_model"}
    for key in hyperparams:
        if key in SCRIPT_SET:
            flag = SCRIPT_SET[key]
            hint = f"use {flag}" if flag else "the script logs to the run folder itself"
            raise ZooError(f"Hyperparameter {key!r} (from {source}) is set by the script: {hint}.")
        if key not in accepted:
            raise ZooError(
                f"Unknown hyperparameter {key!r} (from {source}) for {cls.__name__}; "
                f"valid: n_timesteps, policy, {', '.join(sorted(accepted - set(SCRIPT_SET)))}."
            )


def new_run(args: argparse.Namespace, command: str) -> RunSetup:
    """Build the env and the model of a new run and write the run's settings (``command``: its command line)."""
    env_kwargs = env_kwargs_from_args(args)
    benchmark = env_kwargs["benchmark"]
    label = "custom" if isinstance(benchmark, list) else benchmark
    hyperparams, source = load_hyperparams(args.algo, label, args.preset, args.conf_file)
    overrides = parse_key_values(args.hyperparams, "--hyperparams")
    hyperparams = normalize_hyperparams(apply_overrides(hyperparams, overrides))
    if overrides:
        source += " + --hyperparams"
    n_timesteps = hyperparams.pop("n_timesteps", None)
    if args.n_timesteps > 0:
        n_timesteps = args.n_timesteps
    if n_timesteps is None:
        raise ZooError(f"{source} sets no n_timesteps: add it there or pass -n.")
    cls, default_policy = ALGOS[args.algo]
    policy = hyperparams.pop("policy", default_policy)
    check_hyperparams(cls, policy, hyperparams, source)

    check_writable_folder(Path(args.log_folder), "-f/--log-folder")
    env = build_env(env_kwargs)
    name = env_name(env.benchmark, env.goals, env.preset)
    run_dir, lock = create_run_dir(args.log_folder, args.algo, name)
    try:
        model = cls(policy, env, seed=args.seed, device=args.device, verbose=args.verbose, **hyperparams)
    except (ValueError, TypeError) as err:
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise ZooError(f"Cannot build {cls.__name__} with the hyperparameters of {source}: {err}") from None
    if model.replay_buffer.stratified and model.batch_size % env.num_tasks:
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise ZooError(
            f"batch_size={model.batch_size} must be a multiple of the {env.num_tasks} tasks (stratified batches "
            f"take batch_size / T samples of every task), e.g. {128 * env.num_tasks}."
        )

    # config.yml: the hyperparameters as used, with the algorithm's None defaults resolved.
    config: dict[str, Any] = {"policy": policy, "n_timesteps": int(n_timesteps), **hyperparams}
    for key in ("buffer_size", "learning_starts", "batch_size"):
        config[key] = int(getattr(model, key))
    layout = RunLayout(run_dir, name)
    write_yaml(layout.record("config.yml"), config)
    write_yaml(layout.record("args.yml"), dict(sorted(vars(args).items())))
    write_yaml(layout.record("env_kwargs.yml"), env.env_kwargs())
    layout.record("command.txt").write_text(command + "\n")
    if args.verbose >= 1:
        print(f"Hyperparameters from {source}; run folder {run_dir}")
    return RunSetup(
        args, run_dir, name, env, env.env_kwargs(), model, int(n_timesteps), resumed_from=None, lock=lock
    )


MIN_FREE_BYTES = 100 * 2**20


def check_writable_folder(folder: Path, flag: str) -> None:
    """Fail early, before any env or model is built, when ``folder`` cannot hold a run.

    :raises ZooError: If it is a file, cannot be created or written, or its disk has under 100 MB free.
    """
    if folder.exists() and not folder.is_dir():
        raise ZooError(f"{flag} {folder} is a file, not a folder: pass a folder for the run logs.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ZooError(
            f"{flag} {folder} is not writable ({err.strerror or err}): pass a folder you can write to."
        ) from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise ZooError(
            f"{flag} {folder} has only {free / 2**20:.0f} MB free; a run needs room for its checkpoints "
            f"(about the size of the replay buffer each): free some space or pass another folder."
        )


def create_run_dir(log_folder: str | Path, algo: str, name: str) -> tuple[Path, RunLock]:
    """Create the next free ``<log_folder>/<algo>/<name>_<N>`` and lock it (two new runs never share a folder)."""
    for _ in range(100):
        run_dir = RunLayout.next_free(log_folder, algo, name).run_dir
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            continue  # taken by a run started at the same moment: try the next number
        lock = RunLock(run_dir)
        lock.acquire()
        return run_dir, lock
    raise ZooError(f"Could not create a new run folder under {Path(log_folder) / algo}.")


def lock_run(run_dir: Path) -> RunLock:
    """Lock an existing run folder for this process, or stop with a clear error if another process writes it."""
    lock = RunLock(run_dir)
    try:
        warning = lock.acquire()
    except RunLockedError as err:
        raise ZooError(str(err)) from None
    if warning is not None:
        print(f"Warning: {warning}.", file=sys.stderr)
    return lock


def checkpoint_store(run_dir: Path, keep: int = 2) -> CheckpointStore:
    """The training checkpoints of a run: ``<run_dir>/checkpoints/step_<steps>/``."""
    if keep < 1:
        raise ZooError(f"--keep-checkpoints must be >= 1, got {keep}.")
    return CheckpointStore(RunLayout(run_dir).checkpoints_dir, keep=keep)


def warn_user(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)
