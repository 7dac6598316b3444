"""Train a multi-task agent on Meta-World MT10 / MT50 (an rl-baselines3-zoo style CLI).

Examples, from the repository root::

    # D2R, MT10 with random goals, the paper's settings (zoo/hyperparams/d2r.yml, section MT10-paper)
    python zoo/train.py --algo d2r --env MT10 --goals rand --preset paper --seed 0
    # a quick run with overridden hyperparameters and env settings
    python zoo/train.py --algo d2r --env MT10 -n 200000 --hyperparams batch_size:640 policy_kwargs:"{routing: soft}" \\
        --env-kwargs max_episode_steps:100
    # a checkpoint every 10 minutes; after a crash, continue the run exactly where its last checkpoint was taken
    python zoo/train.py --algo d2r --env MT50 --save-interval-minutes 10
    python zoo/train.py --resume logs/d2r/MT50-rand_1

A run writes ``<log-folder>/<algo>/<EnvName>_<N>/`` (EnvName = ``MT10-rand``, or ``MT10-rand-mw3`` for another preset):
``<EnvName>.zip`` (final model), ``best_model.zip``, ``policy/`` and ``best_policy/`` (their weights in the safe
format), ``checkpoints/step_<steps>/`` (training checkpoints, see
:mod:`d2r_sb3.common.checkpoints`; the newest ``--keep-checkpoints`` are kept), ``replay_buffer.pkl`` (with
``--save-replay-buffer``), ``progress.csv``, ``evaluations.json`` (per-task evaluation history), ``results.json``
(final evaluation), ``.lock`` (held while a process writes the run) and ``<EnvName>/`` with ``config.yml`` (resolved
hyperparameters), ``args.yml``, ``env_kwargs.yml`` and ``command.txt``.

Step counts: ``-n`` is the total number of env steps (summed over tasks, as SB3 counts them); ``--eval-freq`` and
``--save-freq`` are in env steps **per task** (the paper evaluates every 10,000 steps per task).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python zoo/train.py`: make the `zoo` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import csv  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any  # noqa: E402

from stable_baselines3.common.callbacks import BaseCallback, CallbackList  # noqa: E402
from stable_baselines3.common.logger import CSVOutputFormat, Logger, configure  # noqa: E402

from d2r_sb3.common.callbacks import PerTaskEvalCallback  # noqa: E402
from d2r_sb3.common.checkpoints import (  # noqa: E402
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    TrainingCheckpointCallback,
    TrainingInterrupted,
    atomic_save,
    load_buffer,
    replay_buffer_nbytes,
    restore_training_state,
)
from d2r_sb3.common.evaluation import evaluate_per_task  # noqa: E402
from d2r_sb3.common.mt_sac import MultiTaskSAC  # noqa: E402
from d2r_sb3.common.nonfinite import NonFiniteTrainingError  # noqa: E402
from d2r_sb3.common.params import parameter_counts  # noqa: E402
from d2r_sb3.common.provenance import hardware, versions  # noqa: E402
from d2r_sb3.common.run_lock import RunLock, RunLockedError  # noqa: E402
from d2r_sb3.envs import GOAL_MODES, PRESETS, MultiTaskVecEnv, make_mt_env  # noqa: E402
from d2r_sb3.registry import ALGOS  # noqa: E402
from d2r_sb3.serialization import write_safe_policy  # noqa: E402
from zoo.utils import (  # noqa: E402
    HelpFormatter,
    ZooError,
    apply_overrides,
    env_name,
    explicit_options,
    list_checkpoints,
    load_hyperparams,
    next_run_dir,
    normalize_hyperparams,
    parse_env,
    parse_key_values,
    read_yaml,
    run_env_name,
    run_main,
    set_num_threads,
    write_json,
    write_yaml,
)

try:  # the baselines register their policy aliases on import (optional while they are being written)
    import d2r_sb3.baselines  # noqa: E402, F401
except ImportError:
    pass

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


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (flag names follow rl-baselines3-zoo's ``train.py``)."""
    parser = argparse.ArgumentParser(
        description="Train a multi-task agent on Meta-World (logs in <log-folder>/<algo>/<EnvName>_<N>/).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--algo", default="d2r", choices=list(ALGOS), help="Algorithm (registry name)")
    parser.add_argument(
        "--env",
        default="MT10",
        help="Benchmark: MT10, MT50, or comma-separated Meta-World task names (custom)",
    )
    parser.add_argument("--goals", default="rand", choices=GOAL_MODES, help="Goal mode of make_mt_env")
    parser.add_argument("--preset", default="paper", choices=list(PRESETS), help="Env preset of make_mt_env")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the env, the eval env and the algorithm")
    parser.add_argument(
        "-n",
        "--n-timesteps",
        type=int,
        default=-1,
        help="Total env steps, summed over tasks (-1: the YAML's)",
    )
    parser.add_argument("-f", "--log-folder", default="logs", help="Root folder of the logs")
    parser.add_argument(
        "-params",
        "--hyperparams",
        nargs="+",
        metavar="KEY:VALUE",
        help='Override hyperparameters, values in YAML (batch_size:256 policy_kwargs:"{n_modules: 4}"); '
        "mappings such as policy_kwargs are merged into the file's",
    )
    parser.add_argument(
        "-conf", "--conf-file", help="Hyperparameter YAML to use instead of zoo/hyperparams/<algo>.yml"
    )
    parser.add_argument(
        "--env-kwargs",
        nargs="+",
        metavar="KEY:VALUE",
        help="Other make_mt_env arguments (max_episode_steps:500)",
    )
    parser.add_argument(
        "--eval-freq", type=int, default=10_000, help="Evaluate every N env steps per task (<= 0: never)"
    )
    parser.add_argument("--eval-episodes", type=int, default=32, help="Episodes per task of each evaluation")
    parser.add_argument(
        "--final-eval-episodes",
        type=int,
        default=100,
        help="Episodes per task of the final evaluation (0: skip)",
    )
    parser.add_argument(
        "--save-freq",
        type=int,
        default=-1,
        help="Write a training checkpoint every N env steps per task (<= 0: not by steps)",
    )
    parser.add_argument(
        "--save-interval-minutes",
        type=float,
        default=30.0,
        help="Write a training checkpoint every M minutes of wall-clock (<= 0: not by time)",
    )
    parser.add_argument(
        "--keep-checkpoints", type=int, default=2, help="Number of newest training checkpoints kept"
    )
    parser.add_argument(
        "--save-replay-buffer",
        action="store_true",
        help="Also write the replay buffer in SB3's format (replay_buffer.pkl) beside the final model "
        "(checkpoints always hold it)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="Continue the run in RUN_DIR from its newest valid checkpoint (exactly where it stopped)",
    )
    parser.add_argument("--vec-env", default="dummy", choices=["dummy", "subproc"], help="VecEnv type")
    parser.add_argument("--device", default="auto", help="PyTorch device (cpu, cuda, auto)")
    parser.add_argument(
        "--num-threads", type=int, default=-1, help="PyTorch CPU threads (-1: torch's default)"
    )
    parser.add_argument(
        "-P", "--progress", action="store_true", help="Show a progress bar (needs rich and tqdm)"
    )
    parser.add_argument(
        "--log-interval",
        type=int,
        default=-1,
        help="Write the training logs every N episodes (-1: the number of tasks, i.e. once per round of episodes)",
    )
    parser.add_argument("--verbose", type=int, default=1, help="0: quiet, 1: logs and evaluations on stdout")
    return parser


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


# --------------------------------------------------------------------------------------------------
# New run
# --------------------------------------------------------------------------------------------------
def env_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """make_mt_env arguments from the flags and ``--env-kwargs`` (checked against its signature)."""
    overrides = parse_key_values(args.env_kwargs, "--env-kwargs")
    valid = [name for name in inspect.signature(make_mt_env).parameters if name not in ENV_FLAGS]
    for key in overrides:
        if key in ENV_FLAGS:
            raise ZooError(f"Set {key} with {ENV_FLAGS[key]}, not with --env-kwargs.")
        if key not in valid:
            raise ZooError(f"Unknown --env-kwargs key {key!r}; make_mt_env accepts: {', '.join(valid)}.")
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


def accepted_kwargs(cls: type) -> set[str]:
    """Keyword arguments of an algorithm class, following ``**kwargs`` up the class hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - {"self", "policy", "_init_setup_model"}


def check_hyperparams(cls: type[MultiTaskSAC], policy: str, hyperparams: dict[str, Any], source: str) -> None:
    """Clear errors for an unknown policy alias or constructor argument, before anything is built."""
    if policy not in cls.policy_aliases:
        known = ", ".join(cls.policy_aliases) or "none registered"
        raise ZooError(f"Unknown policy {policy!r} (from {source}) for {cls.__name__}; known: {known}.")
    accepted = accepted_kwargs(cls)
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
    meta = run_dir / name
    write_yaml(meta / "config.yml", config)
    write_yaml(meta / "args.yml", dict(sorted(vars(args).items())))
    write_yaml(meta / "env_kwargs.yml", env.env_kwargs())
    (meta / "command.txt").write_text(command + "\n")
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
        run_dir = next_run_dir(log_folder, algo, name)
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


def command_line(argv: Sequence[str] | None) -> str:
    """The command that started this run, for ``command.txt``."""
    return shlex.join(["python", "zoo/train.py", *(sys.argv[1:] if argv is None else argv)])


# --------------------------------------------------------------------------------------------------
# Resumed run
# --------------------------------------------------------------------------------------------------
def _saved_num_timesteps(model_zip: Path) -> int:
    """``num_timesteps`` stored in an SB3 model zip (read from its JSON ``data`` member, nothing unpickled)."""
    with zipfile.ZipFile(model_zip) as archive:
        return int(json.loads(archive.read("data"))["num_timesteps"])


def find_resume_point(run_dir: Path, name: str) -> tuple[int, Path, Path | None]:
    """The most advanced saved model of a run: ``(total steps, model zip, its replay buffer or None)``.

    Candidates are the final ``<EnvName>.zip`` (buffer ``replay_buffer.pkl``) and the checkpoints
    ``rl_model_<steps>_steps.zip`` (buffer ``rl_model_replay_buffer_<steps>_steps.pkl``); on a tie the final
    model wins.

    :raises ZooError: If the run holds no model.
    """
    candidates: list[tuple[int, int, Path, Path]] = [
        (steps, 0, path, run_dir / f"rl_model_replay_buffer_{steps}_steps.pkl")
        for steps, path in list_checkpoints(run_dir)
    ]
    final = run_dir / f"{name}.zip"
    if final.is_file():
        candidates.append((_saved_num_timesteps(final), 1, final, run_dir / "replay_buffer.pkl"))
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


CHECKPOINTS_DIR = "checkpoints"


def checkpoint_store(run_dir: Path, keep: int = 2) -> CheckpointStore:
    """The training checkpoints of a run: ``<run_dir>/checkpoints/step_<steps>/``."""
    if keep < 1:
        raise ZooError(f"--keep-checkpoints must be >= 1, got {keep}.")
    return CheckpointStore(run_dir / CHECKPOINTS_DIR, keep=keep)


def _warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


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
    name = run_env_name(run_dir)
    meta = run_dir / name
    if not (meta / "args.yml").is_file():
        raise ZooError(f"{run_dir} is not a zoo run folder: {meta / 'args.yml'} is missing.")
    fixed = sorted(key for key in FIXED_ON_RESUME if key in explicit)
    if fixed:
        flags = ", ".join("--" + key.replace("_", "-") for key in fixed)
        raise ZooError(
            f"--resume continues {run_dir} with its saved settings ({meta / 'args.yml'}); {flags} cannot change. "
            f"Start a new run to change them."
        )
    saved = read_yaml(meta / "args.yml")
    merged = {**saved, **{key: getattr(args, key) for key in explicit}}
    merged["resume"] = str(run_dir)
    effective = argparse.Namespace(**{**vars(args), **merged})
    config = read_yaml(meta / "config.yml")
    n_timesteps = (
        int(args.n_timesteps) if "n_timesteps" in explicit and args.n_timesteps > 0 else config["n_timesteps"]
    )
    env_kwargs = read_yaml(meta / "env_kwargs.yml")
    if "vec_env" in explicit:
        env_kwargs["vec_env"] = args.vec_env
    check_writable_folder(run_dir, "--resume")
    lock = lock_run(run_dir)
    try:
        return _load_resume_point(effective, run_dir, name, env_kwargs, n_timesteps, config, command, lock)
    except BaseException:
        lock.release()
        raise


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
    checkpoint: Checkpoint | None = store.latest(report=_warn)
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
    if n_timesteps <= steps:
        print(
            f"{run_dir} already has {steps} steps (target {n_timesteps}); nothing to do and nothing changed. "
            f"Pass -n N with N > {steps} to train further."
        )
        lock.release()
        return None

    drop_progress_after(run_dir / "progress.csv", steps)
    env = build_env(env_kwargs)
    cls = ALGOS[args.algo][0]
    model = cls.load(model_path, env=env, device=args.device)
    model.verbose = args.verbose
    if buffer_path is None:
        _warn(f"no replay buffer was saved with {origin}; continuing with an empty buffer.")
    elif checkpoint is not None:
        load_buffer(model.replay_buffer, buffer_path)
    else:
        model.load_replay_buffer(buffer_path)
    if args.verbose >= 1:
        print(f"Resuming {run_dir} from {origin} at {steps} steps (target {n_timesteps}).")
    if n_timesteps != config["n_timesteps"]:
        write_yaml(run_dir / name / "config.yml", {**config, "n_timesteps": n_timesteps})
    with open(run_dir / name / "command.txt", "a") as file:
        file.write(command + "\n")
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
    )


# --------------------------------------------------------------------------------------------------
# Training and final evaluation
# --------------------------------------------------------------------------------------------------
def make_logger(run_dir: Path, verbose: int, resumed: bool) -> Logger:
    """stdout (verbose >= 1) + ``progress.csv`` (continued on resume) + TensorBoard when it is installed."""
    formats = ["stdout"] if verbose >= 1 else []
    try:
        import tensorboard  # noqa: F401

        formats.append("tensorboard")
    except ImportError:
        pass
    if not resumed:
        return configure(str(run_dir), [*formats, "csv"])
    logger = configure(str(run_dir), formats)
    logger.output_formats.append(ContinuedCSVOutputFormat(str(run_dir / "progress.csv")))
    return logger


@dataclass
class Callbacks:
    """The callbacks of a run: the periodic evaluation (if any) and the training checkpoints."""

    evaluation: PerTaskEvalCallback | None
    checkpoints: TrainingCheckpointCallback

    def as_list(self) -> list[BaseCallback]:
        return [c for c in (self.evaluation, self.checkpoints) if c is not None]


def make_callbacks(setup: RunSetup) -> Callbacks:
    """The periodic per-task evaluation and the training checkpoints requested by the flags."""
    args, run_dir = setup.args, setup.run_dir
    evaluation = None
    if args.eval_freq > 0:
        evaluation = PerTaskEvalCallback(
            build_env(setup.env_kwargs),  # separate env, same seed as the training env
            eval_freq_per_task=args.eval_freq,
            n_eval_episodes=args.eval_episodes,
            best_model_save_path=run_dir,
            log_path=run_dir,
            verbose=args.verbose,
        )
    checkpoints = TrainingCheckpointCallback(
        checkpoint_store(run_dir, args.keep_checkpoints),
        save_freq_per_task=args.save_freq if args.save_freq > 0 else None,
        save_interval_minutes=args.save_interval_minutes if args.save_interval_minutes > 0 else None,
        extra_state=(lambda: {"evaluation": evaluation.state_dict()}) if evaluation is not None else None,
        verbose=args.verbose,
    )
    return Callbacks(evaluation, checkpoints)


def restore_callbacks_and_state(setup: RunSetup, callbacks: Callbacks) -> None:
    """Put the evaluation history and every RNG, counter and episode back as the checkpoint saved them."""
    state = setup.training_state
    if state is None:
        return
    saved_evaluation = state["callbacks"].get("evaluation")
    if callbacks.evaluation is not None and saved_evaluation is not None:
        callbacks.evaluation.load_state_dict(saved_evaluation)
    problems: list[str] = []
    exact = restore_training_state(setup.model, state, warn=problems.append)
    if not exact:
        _warn(f"the resume is not exact ({'; '.join(problems)}): the env starts new episodes.")
    elif setup.args.verbose >= 1:
        print("Resumed exactly where the checkpoint was taken (episodes replayed, RNG states restored).")


STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopOnSignal:
    """While active, SIGINT / SIGTERM ask the checkpoint callback to checkpoint and stop (a 2nd SIGINT aborts)."""

    def __init__(self, checkpoints: TrainingCheckpointCallback) -> None:
        self.checkpoints = checkpoints
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        self.checkpoints.request_stop()
        print(f"{signal.Signals(signum).name}: writing a checkpoint, then stopping.", file=sys.stderr)

    def __enter__(self) -> StopOnSignal:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def final_evaluation(setup: RunSetup, train_seconds: float) -> dict[str, Any]:
    """Evaluate the final model on a fresh env (same seed) and describe the run: the content of results.json."""
    args, model = setup.args, setup.model
    eval_env = build_env(setup.env_kwargs)
    start = time.time()
    result = evaluate_per_task(model, eval_env, n_episodes=args.final_eval_episodes, deterministic=True)
    eval_seconds = time.time() - start
    eval_env.close()
    num_tasks = eval_env.num_tasks
    results: dict[str, Any] = {
        "algo": args.algo,
        "env": setup.name,
        "benchmark": eval_env.benchmark,
        "seed": args.seed,
        "evaluated_model": f"{setup.name}.zip",
        **result.to_dict(),
        "episodes_per_task": result.episodes,
        "total_timesteps": int(model.num_timesteps),
        "timesteps_per_task": int(model.num_timesteps) // num_tasks,
        "n_updates": int(model._n_updates),
        "protocol": {
            "preset": eval_env.preset,
            "goals": eval_env.goals,
            "max_episode_steps": eval_env.max_episode_steps,
            "time_limit_terminal": eval_env.time_limit_terminal,
            "reward_scale": eval_env.reward_scale,
            "reward_function_version": eval_env.reward_function_version,
            "env_seed": eval_env.env_seed,
            "success": "success at any step of the episode, deterministic policy",
        },
        "wall_clock_s": {"train": round(train_seconds, 1), "final_eval": round(eval_seconds, 1)},
        "resumed_from": setup.resumed_from,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "hardware": hardware(),
    }
    results["parameters"] = parameter_counts(model.policy)
    if args.verbose >= 1:
        print(result.markdown())
    return results


def warn_if_checkpoints_may_not_fit(model: MultiTaskSAC, run_dir: Path, keep: int) -> None:
    """Warn up front when the disk cannot hold ``keep + 1`` checkpoints with a full replay buffer (the newest
    ``keep`` and the one being written); a run that fills the disk later stops cleanly, but late."""
    buffer = model.replay_buffer
    buffer_bytes = replay_buffer_nbytes(buffer)
    if getattr(buffer, "routes", None) is None and hasattr(
        model.policy, "route"
    ):  # allocated on the first write
        buffer_bytes += 32 * buffer.buffer_size * buffer.n_envs
    params = sum(p.numel() for p in model.policy.parameters())
    needed = (keep + 1) * (
        buffer_bytes + 16 * params
    )  # weights, target critics and two Adam moments, roughly
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        _warn(
            f"{run_dir} has {free / 2**30:.1f} GB free; {keep} checkpoints plus the one being written need about "
            f"{needed / 2**30:.1f} GB once the replay buffer is full. Free some space, pass --keep-checkpoints 1, "
            f"or use another -f folder."
        )


def _last_checkpoint_note(callbacks: Callbacks) -> str:
    store = callbacks.checkpoints.store
    checkpoints = store.list()
    if not checkpoints:
        return f"No checkpoint was written yet (they go to {store.root})."
    return f"The last good checkpoint is {checkpoints[0].path}; continue with: python zoo/train.py --resume {{run}}"


def train(setup: RunSetup) -> int:
    """Learn up to ``setup.n_timesteps``, checkpoint, save the final model and write results.json.

    :return: The exit code: 0, 130 / 143 after SIGINT / SIGTERM (checkpointed), 1 when training failed
        (non-finite values, a write error); the last good checkpoint is untouched then.
    """
    args, model, run_dir = setup.args, setup.model, setup.run_dir
    remaining = setup.n_timesteps - model.num_timesteps
    if setup.resumed_from is not None:
        (run_dir / "results.json").unlink(missing_ok=True)  # it describes the previous final model
    model.set_logger(make_logger(run_dir, args.verbose, resumed=setup.resumed_from is not None))
    num_tasks = setup.env.num_tasks
    if args.verbose >= 1:
        print(
            f"Training {args.algo} on {setup.name} ({num_tasks} tasks) for {remaining} steps "
            f"({remaining // num_tasks} per task); logs in {run_dir}"
        )
    log_interval = args.log_interval if args.log_interval > 0 else num_tasks
    warn_if_checkpoints_may_not_fit(model, run_dir, args.keep_checkpoints)
    callbacks = make_callbacks(setup)
    restore_callbacks_and_state(setup, callbacks)
    start = time.time()
    failure: str | None = None
    with StopOnSignal(callbacks.checkpoints) as stop:
        try:
            model.learn(
                remaining,
                callback=CallbackList(callbacks.as_list()),
                log_interval=log_interval,
                progress_bar=args.progress,
                reset_num_timesteps=setup.resumed_from is None,
            )
            final_checkpoint = callbacks.checkpoints.save()
        except TrainingInterrupted as stopped:
            print(
                f"Stopped at {model.num_timesteps} steps; checkpoint {stopped.checkpoint.path}. "
                f"Continue with: python zoo/train.py --resume {run_dir}",
                file=sys.stderr,
            )
            return STOP_SIGNALS.get(stop.received or signal.SIGINT, 130)
        except NonFiniteTrainingError as err:
            failure = f"training stopped: {err}"
        except (CheckpointError, OSError) as err:
            failure = f"a write failed: {err}"
        finally:
            if callbacks.evaluation is not None:
                callbacks.evaluation.eval_env.close()
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        print(_last_checkpoint_note(callbacks).format(run=run_dir), file=sys.stderr)
        return 1
    train_seconds = time.time() - start

    model_path = atomic_save(model, run_dir / f"{setup.name}.zip")
    # policy/ (and best_policy/): the safe files, so the run loads for acting without unpickling anything.
    write_safe_policy(model, run_dir, model_zip=model_path)
    if args.save_replay_buffer:
        tmp = run_dir / f".replay_buffer.tmp-{os.getpid()}.pkl"
        model.save_replay_buffer(tmp)
        os.replace(tmp, run_dir / "replay_buffer.pkl")
    if args.verbose >= 1:
        print(f"Saved {model_path} and {final_checkpoint.path} ({model.num_timesteps} steps)")
    setup.env.close()
    if args.final_eval_episodes > 0:
        write_json(run_dir / "results.json", final_evaluation(setup, train_seconds))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the flags, set up a new or resumed run, train it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_freq > 0 and args.eval_episodes < 1:
        raise ZooError(
            f"--eval-episodes must be >= 1 (or --eval-freq 0 to skip evaluations), got {args.eval_episodes}."
        )
    if args.final_eval_episodes < 0:
        raise ZooError(f"--final-eval-episodes must be >= 0, got {args.final_eval_episodes}.")
    set_num_threads(args.num_threads)
    if args.resume:
        setup = resume_run(args, explicit_options(parser, argv), command_line(argv))
        if setup is None:
            return 0
    else:
        setup = new_run(args, command_line(argv))
    try:
        return train(setup)
    finally:
        setup.lock.release()


if __name__ == "__main__":
    run_main(main)
