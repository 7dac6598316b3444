"""The trials of a sweep: the grid, each trial's run folder and command, running them on Ray, the live table,
the summary and the sweep's manifest (``sweep.json``).

:mod:`d2r_sb3.zoo.sweep` (the ``d2r-sweep`` command) and :mod:`d2r_sb3.zoo.optimize` (its ``--optimize``
search) both run their trials through this module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from d2r_sb3.common.checkpoints import CheckpointStore
from d2r_sb3.common.run_layout import CHECKPOINTS_DIR, RunLayout
from d2r_sb3.envs import GOAL_MODES, PRESETS
from d2r_sb3.registry import ALGOS
from d2r_sb3.zoo.utils import (
    ZooError,
    call_main,
    parse_env,
    read_yaml,
    read_yaml_mapping,
    write_json,
)

SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
TRIAL_LOG = "trial.log"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
REPORT_DIR = "report"
BASE_SET = "base"
"""Name of the hyperparameter set of a grid without ``hp_sets`` (the files' values and ``hyperparams``)."""

# train.py flags the sweep sets for every trial: refused after `--`, with the sweep flag to use instead.
MANAGED_FLAGS = {
    "--algo": "--algo",
    "--env": "--env",
    "--goals": "--goals",
    "--preset": "--preset",
    "--seed": "--seeds",
    "-f": "-f (the sweep folder)",
    "--log-folder": "-f (the sweep folder)",
    "--resume": "(the sweep resumes its trials itself)",
    "--num-threads": "--num-threads",
    "--device": "--device",
    "-params": "--hyperparams or --hp-sets",
    "--hyperparams": "--hyperparams or --hp-sets",
    "-conf": "--conf-file",
    "--conf-file": "--conf-file",
}
GRID_KEYS = ("algos", "envs", "goals", "preset", "seeds", "hyperparams", "hp_sets", "train_args", "conf_file")


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """One grid point: a zoo run with its own log folder.

    :param id: ``<algo>_<env>_<goals>_<hp set>_s<seed>`` (file-name safe); fixes the trial's folder.
    :param folder: The trial's log folder (``train.py -f``): ``<sweep>/runs/<id>``.
    :param hyperparams: The ``--hyperparams`` of the run (the sweep's common ones and the set's).
    :param train_args: Other ``train.py`` flags.
    """

    id: str
    algo: str
    env: str
    goals: str
    preset: str
    seed: int
    hp_set: str
    hyperparams: dict[str, Any]
    folder: str
    train_args: list[str]
    num_threads: int = 1
    device: str = "cpu"
    conf_file: str | None = None

    def train_argv(self) -> list[str]:
        """The ``train.py`` arguments of a new run of this trial."""
        argv = [
            *("--algo", self.algo, "--env", self.env, "--goals", self.goals, "--preset", self.preset),
            *("--seed", str(self.seed), "-f", self.folder),
            *("--num-threads", str(self.num_threads), "--device", self.device),
        ]
        if self.conf_file:
            argv += ["-conf", self.conf_file]
        if self.hyperparams:
            # JSON is YAML, which is how train.py reads each value.
            argv += [
                "--hyperparams",
                *(f"{key}:{json.dumps(value)}" for key, value in self.hyperparams.items()),
            ]
        return argv + list(self.train_args)

    def resume_argv(self, run_dir: Path) -> list[str]:
        """The ``train.py`` arguments that continue the trial's run (its other settings are saved with it)."""
        return ["--resume", str(run_dir), "--num-threads", str(self.num_threads), "--device", self.device]


@dataclass
class Grid:
    """What a sweep varies (lists) and what it keeps for every trial."""

    algos: list[str] = field(default_factory=lambda: ["d2r"])
    envs: list[str] = field(default_factory=lambda: ["MT10"])
    goals: list[str] = field(default_factory=lambda: ["rand"])
    preset: str = "paper"
    seeds: list[int] = field(default_factory=lambda: [0])
    hyperparams: dict[str, Any] = field(default_factory=dict)
    hp_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_args: list[str] = field(default_factory=list)
    conf_file: str | None = None

    def check(self) -> None:
        """Clear errors for unknown algorithms, goal modes, presets, benchmarks and managed train flags."""
        for algo in self.algos:
            if algo not in ALGOS:
                raise ZooError(f"Unknown algo {algo!r} in the sweep grid; choose from: {', '.join(ALGOS)}.")
        for goals in self.goals:
            if goals not in GOAL_MODES:
                raise ZooError(
                    f"Unknown goal mode {goals!r} in the sweep grid; choose from: {', '.join(GOAL_MODES)}."
                )
        if self.preset not in PRESETS:
            raise ZooError(f"Unknown preset {self.preset!r}; choose from: {', '.join(PRESETS)}.")
        for env in self.envs:
            parse_env(env)
        for key in self.hyperparams:
            prefix = key.split("/", 1)[0] if "/" in key else None
            if prefix is not None and prefix not in ALGOS:
                raise ZooError(
                    f"Hyperparameter {key!r}: {prefix!r} is not an algo (an '<algo>/<key>' item applies to one "
                    f"algo; algos: {', '.join(ALGOS)})."
                )
        if not (self.algos and self.envs and self.goals and self.seeds):
            raise ZooError("The sweep grid is empty: give at least one algo, env, goal mode and seed.")
        for arg in self.train_args:
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_FLAGS:
                raise ZooError(
                    f"The train flag {flag} cannot be passed after -- : the sweep sets it for each trial; "
                    f"use the sweep's {MANAGED_FLAGS[flag]} instead."
                )

    def algo_hyperparams(self, algo: str) -> dict[str, Any]:
        """The common hyperparameters of ``algo``'s trials: plain keys, and ``<algo>/<key>`` keys for it alone."""
        common = {key: value for key, value in self.hyperparams.items() if "/" not in key}
        own = {
            key.split("/", 1)[1]: value
            for key, value in self.hyperparams.items()
            if key.startswith(f"{algo}/")
        }
        return _merge(common, own)

    def trials(self, folder: Path, num_threads: int, device: str) -> list[Trial]:
        """Every grid point, in a fixed order (algo, env, goals, hyperparameter set, seed)."""
        sets = self.hp_sets or {BASE_SET: {}}
        trials = []
        for algo in self.algos:
            for env in self.envs:
                for goals in self.goals:
                    for name, overrides in sets.items():
                        for seed in self.seeds:
                            trial_id = f"{algo}_{_safe(env)}_{goals}_{_safe(name)}_s{seed}"
                            trials.append(
                                Trial(
                                    id=trial_id,
                                    algo=algo,
                                    env=env,
                                    goals=goals,
                                    preset=self.preset,
                                    seed=seed,
                                    hp_set=name,
                                    hyperparams=_merge(self.algo_hyperparams(algo), overrides),
                                    folder=str(folder / RUNS_DIR / trial_id),
                                    train_args=list(self.train_args),
                                    num_threads=num_threads,
                                    device=device,
                                    conf_file=self.conf_file,
                                )
                            )
        return trials


def _safe(text: str) -> str:
    """A file-name-safe, recognisable form of a grid value (``reach,push`` -> ``reach+push``)."""
    safe = re.sub(r"[^A-Za-z0-9.=+-]+", "_", text.replace(",", "+")).strip("_")
    if len(safe) > 48:  # long override sets: a prefix and a hash keep the name unique and short
        safe = f"{safe[:39]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return safe or "x"


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def set_name(overrides: dict[str, Any]) -> str:
    """The name of a ``--hp-sets`` item: its content (``learning_rate=0.001,batch_size=64``)."""
    return (
        ",".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in overrides.items())
        or BASE_SET
    )


def _read_grid_mapping(path: Path) -> dict[str, Any]:
    """The grid file's YAML mapping, with only :data:`GRID_KEYS` keys (an empty file is an empty grid)."""
    if not path.is_file():
        raise ZooError(f"Grid file {path} not found.")
    data = read_yaml_mapping(path, f"Grid file {path}", "(algos: [...], envs: [...], ...)")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise ZooError(
            f"Grid file {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(GRID_KEYS)}."
        )
    return data


def _grid_lists(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The list entries of a grid file (a single value is a list of one): names as strings, integer seeds."""
    lists: dict[str, Any] = {}
    for key in ("algos", "envs", "goals", "seeds"):
        if key in data:
            value = data[key] if isinstance(data[key], list) else [data[key]]
            if key == "seeds" and not all(isinstance(seed, int) for seed in value):
                raise ZooError(f"Grid file {path}: seeds must be integers, got {value}.")
            lists[key] = [item if key == "seeds" else str(item) for item in value]
    return lists


def _grid_hp_sets(sets: Any, path: Path) -> dict[str, dict[str, Any]]:
    """A grid file's ``hp_sets``: a mapping of names to hyperparameters, or a list of them named by content."""
    if isinstance(sets, list):  # unnamed sets are named by their content
        sets = {set_name(item) if isinstance(item, dict) else str(item): item for item in sets}
    if not isinstance(sets, dict) or not all(isinstance(item, dict) for item in sets.values()):
        raise ZooError(
            f"Grid file {path}: hp_sets must map names to hyperparameters ({{lr-low: {{learning_rate: 1.0e-4}}}})."
        )
    return {str(name): item or {} for name, item in sets.items()}


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """Read a grid YAML file (keys: :data:`GRID_KEYS`).

    :raises ZooError: Missing file, invalid YAML, unknown keys or values of the wrong type.
    """
    path = Path(path)
    data = _read_grid_mapping(path)
    grid = _grid_lists(data, path)
    if "preset" in data:
        grid["preset"] = str(data["preset"])
    if "conf_file" in data:
        grid["conf_file"] = str(data["conf_file"])
    if "hyperparams" in data:
        if not isinstance(data["hyperparams"], dict):
            raise ZooError(
                f"Grid file {path}: hyperparams must be a mapping (batch_size: 320), got {data['hyperparams']!r}."
            )
        grid["hyperparams"] = data["hyperparams"]
    if "hp_sets" in data:
        grid["hp_sets"] = _grid_hp_sets(data["hp_sets"], path)
    if "train_args" in data:
        args = data["train_args"]
        grid["train_args"] = (
            shlex.split(args) if isinstance(args, str) else [str(item) for item in args or []]
        )
    return grid


# --------------------------------------------------------------------------------------------------
# Run folders: what a trial has done
# --------------------------------------------------------------------------------------------------
def find_run_dir(trial_folder: str | Path, algo: str) -> Path | None:
    """The run folder of a trial: ``<trial folder>/<algo>/<EnvName>_<N>`` (the lowest N; a trial makes one)."""
    parent = Path(trial_folder) / algo
    if not parent.is_dir():
        return None
    runs = [path for path in parent.iterdir() if path.is_dir() and RunLayout(path).is_numbered]
    return min(runs, key=lambda path: int(path.name.rsplit("_", 1)[1])) if runs else None


@dataclass
class Progress:
    """What a run folder says about its run (read while it trains)."""

    steps: int = 0
    target: int | None = None
    success: float | None = None  # mean success of the last periodic evaluation
    final_success: float | None = None  # of the final evaluation (results.json)
    sessions: int = 0  # training sessions (1 + resumes), from command.txt
    running: bool = False
    done: bool = False


def read_progress(run_dir: Path | None) -> Progress:
    """The progress of a run folder (an empty one when it does not exist yet). Never raises on partial files."""
    progress = Progress()
    if run_dir is None or not run_dir.is_dir():
        return progress
    layout = RunLayout(run_dir)
    try:
        progress.target = int(read_yaml(layout.record("config.yml"))["n_timesteps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        pass
    try:
        history = json.loads(layout.evaluations_file.read_text())
        if history["timesteps"]:
            progress.steps = int(history["timesteps"][-1])
            progress.success = float(history["mean_success"][-1])
    except (OSError, KeyError, ValueError):
        pass
    progress.steps = max(progress.steps, _last_logged_steps(layout.progress_file))
    # A run stopped by a signal checkpoints past its last log line.
    checkpoints = CheckpointStore(layout.checkpoints_dir).list()
    if checkpoints:
        progress.steps = max(progress.steps, checkpoints[0].num_timesteps)
    try:
        results = json.loads(layout.results_file.read_text())
        progress.final_success = float(results["mean_success"])
        progress.steps = max(progress.steps, int(results["total_timesteps"]))
    except (OSError, KeyError, ValueError):
        pass
    try:
        progress.sessions = len(layout.record("command.txt").read_text().splitlines())
    except OSError:
        pass
    try:  # a live writer names itself in the lock file; a released lock is empty
        progress.running = bool((run_dir / ".lock").read_text().strip())
    except OSError:
        pass
    progress.done = is_done(run_dir)
    return progress


def _last_logged_steps(path: Path) -> int:
    """``time/total_timesteps`` of the last row of a ``progress.csv`` (read from its end: files grow long)."""
    try:
        with path.open("rb") as file:
            header = file.readline().decode().rstrip("\n").split(",")
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 65536))
            rows = file.read().decode(errors="replace").splitlines()
        column = header.index("time/total_timesteps")
        for row in reversed(rows[1:] if size <= 65536 else rows):
            cells = row.split(",")
            if len(cells) == len(header) and cells[column]:
                return int(float(cells[column]))
    except (OSError, ValueError, IndexError):
        pass
    return 0


def is_done(run_dir: Path) -> bool:
    """A finished run: its final evaluation (``results.json``) or its final model is written."""
    layout = RunLayout(run_dir)
    return layout.results_file.is_file() or layout.final_model.is_file()


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``train.py --resume`` has something to continue from."""
    layout = RunLayout(run_dir)
    return layout.record("args.yml").is_file() and (
        any((run_dir / CHECKPOINTS_DIR).glob("step_*")) or bool(layout.legacy_checkpoints())
    )


# --------------------------------------------------------------------------------------------------
# A trial, in a Ray worker
# --------------------------------------------------------------------------------------------------
def run_trial(trial: dict[str, Any]) -> dict[str, Any]:
    """Run one trial to its end in this process: skip it when done, resume it when it has a checkpoint, start it
    otherwise. Its output is appended to ``<trial folder>/trial.log``.

    This is the body of the sweep's Ray task; a retry after the worker died calls it again and so resumes.

    :param trial: A :class:`Trial` as a dict (``dataclasses.asdict``).
    :return: ``{"id", "code" (train.py's exit code), "run_dir", "action" (skipped, resumed, started)}``.
    """
    from d2r_sb3.common.run_lock import RunLock, RunLockedError
    from d2r_sb3.zoo import train

    spec = Trial(**trial)
    folder = Path(spec.folder)
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = find_run_dir(folder, spec.algo)
    if run_dir is not None and is_done(run_dir):
        return {"id": spec.id, "code": 0, "run_dir": str(run_dir), "action": "skipped"}
    if run_dir is not None and has_checkpoint(run_dir):
        action, argv = "resumed", spec.resume_argv(run_dir)
    else:
        if run_dir is not None:  # stopped before its first checkpoint: nothing to keep, start it again
            lock = RunLock(run_dir)
            try:
                lock.acquire()
            except RunLockedError as err:
                return {
                    "id": spec.id,
                    "code": 2,
                    "run_dir": str(run_dir),
                    "action": "locked",
                    "error": str(err),
                }
            lock.release()
            shutil.rmtree(run_dir)
        action, argv = "started", spec.train_argv()
    with (folder / TRIAL_LOG).open("a", buffering=1) as log, redirect_stdout(log), redirect_stderr(log):
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        print(f"=== {stamp} pid {os.getpid()} ({action}): python zoo/train.py {shlex.join(argv)}")
        code = call_main(train.main, argv)
        print(f"=== exit code {code}")
    run_dir = find_run_dir(folder, spec.algo)
    return {"id": spec.id, "code": code, "run_dir": str(run_dir) if run_dir else None, "action": action}


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------
def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ZooError("Sweeps run on Ray, which is not installed: pip install 'd2r_sb3[sweep]'") from None
    return ray


def connect(address: str | None, num_cpus: int | None, num_gpus: int | None) -> bool:
    """Connect to Ray: the running session of this process, the cluster at ``address``, or a new local instance.

    :return: Whether this call started Ray (and so should shut it down).
    :raises ZooError: If the cluster cannot be reached (the message says how to start or point at one).
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    # Trials write their own logs (trial.log); the workers' stdout would garble the table.
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as err:  # Ray raises ConnectionError, RuntimeError or its own errors here
            raise ZooError(
                f"Cannot connect to the Ray cluster at --address {address}: {err}\n"
                "Start one with `ray start --head` (then --address auto on that machine, or "
                "--address ray://<head>:10001 from elsewhere), or leave out --address for a local instance."
            ) from None
    else:
        try:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
        except ValueError as err:
            if num_cpus is None and num_gpus is None:
                raise
            # Without --address Ray still joins an existing cluster (RAY_ADDRESS, or one `ray start`ed here),
            # whose size is its own.
            found = os.environ.get("RAY_ADDRESS") or "a cluster started with `ray start` on this machine"
            raise ZooError(
                f"Ray joins an existing cluster here ({found}), and --num-cpus/--num-gpus only size a new local "
                f"instance ({err}). Leave them out to run on that cluster (or pass its --address), or set "
                "RAY_ADDRESS=local for a fresh local instance of that size."
            ) from None
    return True


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast when ``--address host:port`` or ``ray://host:port`` does not answer (Ray itself keeps retrying for
    minutes). ``auto`` and a missing address are left to Ray.

    :raises ZooError: If nothing accepts a connection there, with how to start a cluster or run locally.
    """
    if not address or address == "auto":
        return
    target = address.removeprefix("ray://")
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit():
        raise ZooError(
            f"--address {address}: expected auto, <host>:<port> (the head's GCS, 6379) or ray://<host>:<port> "
            "(Ray Client, 10001)."
        )
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ZooError(
            f"Cannot reach the Ray cluster at --address {address} ({err.strerror or err}). Start one with "
            "`ray start --head` on the head node (port 6379; Ray Client on 10001), check the host and port, or "
            "leave out --address to run on a local Ray instance."
        ) from None


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Fail early when no node could ever run a trial (it would wait forever)."""
    ray = import_ray()
    total = ray.cluster_resources()
    if total.get("CPU", 0) < cpus_per_trial:
        raise ZooError(
            f"--cpus-per-trial {cpus_per_trial} is more than the Ray cluster's {total.get('CPU', 0):g} CPUs; lower it."
        )
    if gpus_per_trial > 0 and total.get("GPU", 0) < gpus_per_trial:
        raise ZooError(
            f"--gpus-per-trial {gpus_per_trial} but the Ray cluster has {total.get('GPU', 0):g} GPUs; "
            "pass --gpus-per-trial 0 to train on CPUs."
        )


def remote_trial(cpus_per_trial: float, gpus_per_trial: float, max_retries: int) -> Any:
    """:func:`run_trial` as a Ray task with the trial's resources; Ray runs it again when its worker dies."""
    ray = import_ray()
    return ray.remote(run_trial).options(
        num_cpus=cpus_per_trial,
        num_gpus=gpus_per_trial,
        max_retries=max_retries,
        retry_exceptions=False,  # a trial that fails by itself (bad hyperparameters) fails the same way again
    )


# --------------------------------------------------------------------------------------------------
# The table and the summary
# --------------------------------------------------------------------------------------------------
def _format_success(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(trials: Sequence[Trial], statuses: dict[str, str]) -> str:
    """A plain-text table of the trials' status and progress, read from their run folders."""
    header = ("trial", "status", "env steps", "success", "final", "sessions")
    rows = []
    for trial in trials:
        progress = read_progress(find_run_dir(trial.folder, trial.algo))
        status = statuses.get(trial.id, "queued")
        if status == "queued" and progress.running:
            status = "running"
        target = f"/{progress.target:,}" if progress.target else ""
        rows.append(
            (
                trial.id,
                status,
                f"{progress.steps:,}{target}",
                _format_success(progress.success),
                _format_success(progress.final_success),
                str(progress.sessions),
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def write_summary(folder: Path, trials: Sequence[Trial], statuses: dict[str, str], seconds: float) -> str:
    """``summary.md`` and ``summary.json`` of the sweep folder; returns the Markdown."""
    records: list[dict[str, Any]] = []
    for trial in trials:
        run_dir = find_run_dir(trial.folder, trial.algo)
        progress = read_progress(run_dir)
        records.append(
            {
                "trial": trial.id,
                "algo": trial.algo,
                "env": trial.env,
                "goals": trial.goals,
                "seed": trial.seed,
                "hp_set": trial.hp_set,
                "status": statuses.get(trial.id, "not run"),
                "env_steps": progress.steps,
                "target_steps": progress.target,
                "last_eval_success": progress.success,
                "final_success": progress.final_success,
                "sessions": progress.sessions,
                "run_dir": str(run_dir) if run_dir else None,
            }
        )
    finished = sum(record["status"].startswith(("done", "skipped")) for record in records)
    lines = [
        f"# Sweep {folder}",
        "",
        f"{finished} of {len(records)} trials finished; {seconds / 60:.1f} min in this session.",
        "",
        "| trial | status | env steps | last eval success | final success | sessions | run folder |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        lines.append(
            f"| {record['trial']} | {record['status']} | {record['env_steps']:,} | "
            f"{_format_success(record['last_eval_success'])} | {_format_success(record['final_success'])} | "
            f"{record['sessions']} | {record['run_dir'] or '-'} |"
        )
    markdown = "\n".join(lines) + "\n"
    (folder / SUMMARY_MD).write_text(markdown)
    write_json(folder / SUMMARY_JSON, {"trials": records, "session_seconds": round(seconds, 1)})
    return markdown


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------
def write_manifest(folder: Path, trials: Sequence[Trial], grid: Grid) -> None:
    """``sweep.json``: every trial (old and new) with its folder and command line, for restarts and reports."""
    path = folder / SWEEP_FILE
    manifest: dict[str, Any] = {"trials": {}}
    if path.is_file():
        manifest = json.loads(path.read_text())
    for trial in trials:
        previous = manifest["trials"].get(trial.id)
        record = {**asdict(trial), "train_argv": trial.train_argv()}
        if (
            previous is not None
            and previous.get("train_argv") != record["train_argv"]
            and find_run_dir(trial.folder, trial.algo)
        ):
            print(
                f"Warning: trial {trial.id} was started with other settings; it continues with the settings saved "
                f"in its run folder.",
                file=sys.stderr,
            )
            continue
        manifest["trials"][trial.id] = record
    manifest["grid"] = asdict(grid)
    manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(path, manifest)


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``sweep.json`` of a sweep folder.

    :raises ZooError: If the folder holds no sweep.
    """
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        raise ZooError(f"{folder} is not a sweep folder: {path} is missing (start a sweep with -f {folder}).")
    return json.loads(path.read_text())


@dataclass
class _CtrlC:
    requested: bool = False


@contextmanager
def ctrl_c_as_a_flag() -> Iterator[_CtrlC]:
    """While inside, the first SIGINT (Ctrl-C) only sets ``requested``; a second one interrupts at once.

    The sweep's loop spends nearly all its time inside ``ray.wait``, whose blocking C++ call runs Python's signal
    handlers itself and can lose the ``KeyboardInterrupt`` they raise (a sweep on CI ran its trials to the end
    after Ctrl-C). A flag cannot be lost: the loop reads it after every wait (at most a second). Outside the
    main thread (signals go to the main thread only) nothing is installed and ``requested`` stays ``False``.
    """
    flag = _CtrlC()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sweep(
    trials: Sequence[Trial],
    folder: Path,
    args: argparse.Namespace,
    statuses: dict[str, str] | None = None,
) -> dict[str, str]:
    """Run the trials that are not finished on Ray, printing the table every ``args.refresh`` seconds.

    :param statuses: Filled in with the trials' statuses as they become known (a new dict when None), so that the
        caller has them when Ctrl-C stops the sweep: the trials still running or queued are ``interrupted`` then.
    :return: The status of every trial (``done``, ``skipped (finished earlier)``, ``failed (...)``, ...).
    """
    statuses = {} if statuses is None else statuses
    todo = []
    for trial in trials:
        run_dir = find_run_dir(trial.folder, trial.algo)
        if run_dir is not None and is_done(run_dir):
            statuses[trial.id] = "skipped (finished earlier)"
        else:
            todo.append(trial)
    print(
        f"Sweep {folder}: {len(trials)} trials, {len(trials) - len(todo)} finished earlier, {len(todo)} to run."
    )
    if not todo:
        return statuses
    ray = import_ray()
    started = connect(args.address, args.num_cpus, args.num_gpus)
    try:
        check_resources(args.cpus_per_trial, args.gpus_per_trial)
        task = remote_trial(args.cpus_per_trial, args.gpus_per_trial, args.max_retries)
        pending = {task.remote(asdict(trial)): trial for trial in todo}
        last = 0.0
        try:
            with ctrl_c_as_a_flag() as ctrl_c:
                while pending:
                    if ctrl_c.requested:
                        raise KeyboardInterrupt
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(1.0, args.refresh))
                    for ref in ready:
                        trial = pending.pop(ref)
                        statuses[trial.id] = _outcome(ray, ref)
                    if time.monotonic() - last >= args.refresh and pending:
                        last = time.monotonic()
                        print(f"\n[{time.strftime('%H:%M:%S')}] {len(pending)} trial(s) left", flush=True)
                        print(table(trials, statuses), flush=True)
        except KeyboardInterrupt:
            # Ray delivers SIGINT to the running trials: each writes a checkpoint and stops.
            print(
                "Interrupted: the running trials write a checkpoint and stop; run the sweep again to continue."
            )
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=120)
            statuses.update({trial.id: "interrupted" for trial in pending.values()})
            raise
    finally:
        if started:
            ray.shutdown()
    return statuses


def _outcome(ray: Any, ref: Any) -> str:
    """The status of a finished Ray task."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as err:  # the worker died more often than --max-retries allows
        return f"failed ({type(err).__name__}; see trial.log)"
    if result["code"] == 0:
        return "skipped (finished earlier)" if result["action"] == "skipped" else f"done ({result['action']})"
    if result["action"] == "locked":
        return "failed (another process writes its run folder)"
    return f"failed (exit {result['code']}; see trial.log)"


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
