"""The experiment manager of the zoo: set up a new run (env, model, run folder and its records) and lock it.

:mod:`d2r_sb3.zoo.resume` sets up a run that continues from its checkpoints; :mod:`d2r_sb3.zoo.warm_start` reads
the learned state a new run can start from (``--warm-start``); :mod:`d2r_sb3.zoo.training` trains any of them.
``python zoo/train.py`` (:mod:`d2r_sb3.zoo.train`) is the command line over them.
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
from d2r_sb3.serialization.seed import ResumeSeed, SeedMismatchError, warm_start
from d2r_sb3.zoo.utils import (
    ZooError,
    apply_overrides,
    env_name,
    load_hyperparams,
    normalize_hyperparams,
    parse_env,
    parse_key_values,
    write_json,
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
class WarmStart:
    """The learned state a new run starts from (``train.py --warm-start``), read by
    :func:`d2r_sb3.zoo.warm_start.load_seed`.

    :param seed: the actor, critics, their targets, log alpha and the counters.
    :param origin: what was read, for people (``"seed file seeds/MT10-rand-1M.safetensors"``).
    :param record: what the run's ``warm_start.yml`` records about it (path, SHA-256, steps, ...).
    """

    seed: ResumeSeed
    origin: str
    record: dict[str, Any]


@dataclass
class RunSetup:
    """Everything :func:`train` needs, for a new, warm-started or resumed run."""

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
    warm_started_from: str | None = None  # what the run's first launch loaded its weights from (--warm-start)

    @property
    def continues_steps(self) -> bool:
        """Whether ``learn`` continues the model's step counter (a resumed or warm-started run)."""
        return self.resumed_from is not None or self.warm_started_from is not None

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


def new_run(args: argparse.Namespace, command: str, warm: WarmStart | None = None) -> RunSetup:
    """Build the env and the model of a new run and write the run's settings (``command``: its command line).

    :param warm: the learned state to start from (``--warm-start``): loaded into the model once it is built;
        the step counter then starts at its steps and ``n_timesteps`` is the target total.
    """
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
    if warm is not None and n_timesteps <= warm.seed.num_timesteps:
        raise ZooError(
            f"-n {n_timesteps} is not above the {warm.seed.num_timesteps:,} env steps of {warm.origin}: with "
            f"--warm-start, -n is the target total (as with --resume); pass -n N with N > {warm.seed.num_timesteps}."
        )
    cls, default_policy = ALGOS[args.algo]
    policy = hyperparams.pop("policy", default_policy)
    check_hyperparams(cls, policy, hyperparams, source)

    check_writable_folder(Path(args.log_folder), "-f/--log-folder")
    env = build_env(env_kwargs)
    name = env_name(env.benchmark, env.goals, env.preset)
    run_dir, lock = create_run_dir(args.log_folder, args.algo, name)
    try:
        model = _build_model(cls, policy, env, args, hyperparams, source)
        # config.yml: the hyperparameters as used, with the algorithm's None defaults resolved.
        config: dict[str, Any] = {"policy": policy, "n_timesteps": int(n_timesteps), **hyperparams}
        for key in ("buffer_size", "learning_starts", "batch_size"):
            config[key] = int(getattr(model, key))
        if warm is not None:
            _warm_start(model, env, warm, args)
    except BaseException:
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise

    layout = RunLayout(run_dir, name)
    write_yaml(layout.record("config.yml"), config)
    write_yaml(layout.record("args.yml"), dict(sorted(vars(args).items())))
    write_yaml(layout.record("env_kwargs.yml"), env.env_kwargs())
    layout.record("command.txt").write_text(command + "\n")
    if warm is not None:
        write_yaml(
            layout.record("warm_start.yml"), {**warm.record, "warmup_until": int(model.learning_starts)}
        )
        if warm.seed.evaluations:  # the learning curve continues from the seed's run
            write_json(layout.evaluations_file, warm.seed.evaluations)
    if args.verbose >= 1:
        print(f"Hyperparameters from {source}; run folder {run_dir}")
    return RunSetup(
        args,
        run_dir,
        name,
        env,
        env.env_kwargs(),
        model,
        int(n_timesteps),
        resumed_from=None,
        lock=lock,
        warm_started_from=warm.origin if warm is not None else None,
    )


def _build_model(
    cls: type[MultiTaskSAC],
    policy: str,
    env: MultiTaskVecEnv,
    args: argparse.Namespace,
    hyperparams: dict[str, Any],
    source: str,
) -> MultiTaskSAC:
    """The algorithm of a new run, with its construction errors as :class:`ZooError`."""
    try:
        model = cls(policy, env, seed=args.seed, device=args.device, verbose=args.verbose, **hyperparams)
    except (ValueError, TypeError) as err:
        raise ZooError(f"Cannot build {cls.__name__} with the hyperparameters of {source}: {err}") from None
    if model.replay_buffer.stratified and model.batch_size % env.num_tasks:
        raise ZooError(
            f"batch_size={model.batch_size} must be a multiple of the {env.num_tasks} tasks (stratified batches "
            f"take batch_size / T samples of every task), e.g. {128 * env.num_tasks}."
        )
    return model


def _warm_start(model: MultiTaskSAC, env: MultiTaskVecEnv, warm: WarmStart, args: argparse.Namespace) -> None:
    """Load the seed into the new model (:func:`d2r_sb3.serialization.seed.warm_start`), or a clear error."""
    seed = warm.seed
    try:
        warm_start(model, seed)
    except SeedMismatchError as err:
        raise ZooError(
            f"--warm-start {args.warm_start} does not fit this run: {err} (differing key: {err.key})"
        ) from None
    if seed.task_names != list(env.task_names):
        warn_user(
            f"{warm.origin} was trained on the tasks {seed.task_names}, this run's are {list(env.task_names)}: "
            "each task one-hot index now means another task."
        )
    if not model.policy_warmup:
        warn_user(
            "policy_warmup is off: the replay buffer is refilled with uniform actions, not the loaded policy."
        )
    if args.verbose >= 1:
        refill = model.learning_starts - seed.num_timesteps
        print(
            f"Warm start from {warm.origin}: {seed.num_timesteps:,} env steps and {seed.n_updates:,} updates done; "
            f"fresh optimiser moments and an empty replay buffer, refilled for {refill:,} steps (learning_starts) "
            f"before updates resume at env step {model.learning_starts:,}."
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
