"""Hyperparameter search for ``d2r-sweep --optimize`` (rl-baselines3-zoo's ``--optimize``): Optuna on Ray.

Each Optuna trial is a zoo run (``<folder>/runs/trial_<NNNN>/``, run like a sweep's trials) of one algo on one env
and seed, with hyperparameters sampled by the TPE sampler from the algo's search space
(``d2r_sb3/zoo/search_spaces.yml`` or ``--search-space``). Up to ``cluster CPUs / --cpus-per-trial`` trials run at
once. The value of a trial is its final mean success (``results.json``; the last periodic evaluation when there is
no final one). Every periodic evaluation is reported to Optuna as it is written (step = env steps per task), and
the median pruner stops trials below the median of the earlier ones at the same step (SIGINT to the trial: it
writes a checkpoint and stops).

The study is kept in ``<folder>/study.db`` (SQLite): starting the same command again continues it up to
``--n-trials`` trials in all, and trials that were running when it stopped resume from their checkpoints. The best
settings are written to ``<folder>/best_hyperparams.yml``, a hyperparameter file for ``train.py -conf``: one section
``<benchmark>-<preset>`` with the algo's file values (``n_timesteps`` included: the budget of a full run) updated
with the sweep's ``--hyperparams`` and the best trial's.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from d2r_sb3.common.run_layout import RunLayout
from d2r_sb3.envs import benchmark_task_names
from d2r_sb3.zoo.trials import (
    RUNS_DIR,
    Grid,
    Trial,
    check_resources,
    connect,
    ctrl_c_as_a_flag,
    find_run_dir,
    import_ray,
    remote_trial,
)
from d2r_sb3.zoo.utils import (
    ZooError,
    apply_overrides,
    load_hyperparams,
    parse_env,
    read_yaml_mapping,
    to_plain,
)

SEARCH_SPACES = Path(__file__).resolve().parent / "search_spaces.yml"
STUDY_DB = "study.db"
BEST_FILE = "best_hyperparams.yml"
PARAM_TYPES = ("float", "int", "categorical")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ZooError("--optimize needs Optuna: pip install 'd2r_sb3[sweep]'") from None
    return optuna


def load_search_space(algo: str, path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The search space of ``algo``: ``{name: {type, low, high, log, step, choices, per_task}}``.

    :raises ZooError: Missing file or algo section, or an entry without a valid type and range.
    """
    path = Path(path) if path is not None else SEARCH_SPACES
    if not path.is_file():
        raise ZooError(f"Search space file {path} not found.")
    spaces = read_yaml_mapping(path, f"Search space file {path}", "of algo sections ('d2r: {...}')")
    if algo not in spaces or not isinstance(spaces[algo], dict):
        have = ", ".join(spaces) or "none"
        raise ZooError(
            f"{path} has no search space for {algo!r} (sections: {have}); add a section '{algo}:'."
        )
    space = spaces[algo]
    for name, spec in space.items():
        where = f"{path}, {algo}.{name}"
        if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
            raise ZooError(f"{where}: expected {{type: float|int|categorical, ...}}, got {spec!r}.")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ZooError(f"{where}: a categorical parameter needs a non-empty list of choices.")
        elif (
            not all(isinstance(spec.get(key), (int, float)) for key in ("low", "high"))
            or spec["low"] > spec["high"]
        ):
            raise ZooError(f"{where}: a {spec['type']} parameter needs numbers low <= high, got {spec!r}.")
    return space


def _encode(choice: Any) -> Any:
    """Optuna's categorical choices are scalars: lists and mappings are offered as their JSON text."""
    return json.dumps(choice) if isinstance(choice, (list, dict)) else choice


def sample(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ask ``trial`` for every parameter of ``space``: the raw Optuna params (before ``per_task``)."""
    for name, spec in space.items():
        if spec["type"] == "float":
            trial.suggest_float(
                name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False))
            )
        elif spec["type"] == "int":
            trial.suggest_int(
                name,
                int(spec["low"]),
                int(spec["high"]),
                step=int(spec.get("step", 1)),
                log=bool(spec.get("log", False)),
            )
        else:
            trial.suggest_categorical(name, [_encode(choice) for choice in spec["choices"]])
    return dict(trial.params)


def to_hyperparams(
    params: dict[str, Any], space: dict[str, dict[str, Any]], num_tasks: int
) -> dict[str, Any]:
    """Optuna params as constructor arguments: JSON choices decoded, ``per_task`` scaled, dotted names nested."""
    hyperparams: dict[str, Any] = {}
    for name, value in params.items():
        spec = space.get(name, {})
        if spec.get("type") == "categorical" and isinstance(value, str):
            encoded = {_encode(choice): choice for choice in spec["choices"]}
            value = encoded.get(value, value)
        if spec.get("per_task"):
            value = value * num_tasks
        *parents, leaf = name.split(".")
        target = hyperparams
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return hyperparams


def trial_value(run_dir: Path | None) -> float | None:
    """The objective of a finished run: its final mean success, else its last periodic one (None: neither)."""
    if run_dir is None:
        return None
    layout = RunLayout(run_dir)
    for path, key in ((layout.results_file, "mean_success"), (layout.evaluations_file, "mean_success")):
        try:
            value = json.loads(path.read_text())[key]
        except (OSError, KeyError, ValueError):
            continue
        if isinstance(value, list):
            if not value:
                continue
            value = value[-1]
        return float(value)
    return None


def _evaluations(run_dir: Path | None) -> list[tuple[int, float]]:
    """``(env steps per task, mean success)`` of a run's periodic evaluations so far."""
    if run_dir is None:
        return []
    try:
        history = json.loads(RunLayout(run_dir).evaluations_file.read_text())
        return list(zip(history["timesteps_per_task"], history["mean_success"], strict=True))
    except (OSError, KeyError, ValueError):
        return []


def write_best(
    folder: Path, grid: Grid, best: Any, space: dict[str, dict[str, Any]], num_tasks: int
) -> tuple[Path, str]:
    """``best_hyperparams.yml``: the algo's file values, the sweep's and the best trial's hyperparameters."""
    algo, env, preset = grid.algos[0], grid.envs[0], grid.preset
    benchmark = parse_env(env)
    label = "custom" if isinstance(benchmark, list) else benchmark
    base, source = load_hyperparams(algo, label, preset, grid.conf_file)
    values = apply_overrides(
        apply_overrides(base, grid.algo_hyperparams(algo)), to_hyperparams(best.params, space, num_tasks)
    )
    section = f"{label}-{preset}"
    header = (
        f"# Best hyperparameters of the Optuna study in {folder / STUDY_DB}: trial {best.number}, mean success "
        f"{best.value:.4f} ({algo} on {env}).\n"
        f"# Base values from {source}. Train with:\n"
        f"#   python zoo/train.py --algo {algo} --env {env} --preset {preset} -conf {folder / BEST_FILE}\n"
    )
    path = folder / BEST_FILE
    path.write_text(
        header + yaml.safe_dump({section: to_plain(values)}, sort_keys=False, default_flow_style=None)
    )
    return path, section


def _check_optimize_arguments(grid: Grid, args: argparse.Namespace) -> None:
    """``--optimize`` searches one algo on one env and goal mode, for at least one trial."""
    if len(grid.algos) != 1 or len(grid.envs) != 1 or len(grid.goals) != 1 or grid.hp_sets:
        raise ZooError(
            "--optimize searches one algo on one env and goal mode (no --hp-sets): narrow the grid."
        )
    if args.n_trials < 1:
        raise ZooError(f"--n-trials must be >= 1, got {args.n_trials}.")


def _open_study(optuna: Any, folder: Path, args: argparse.Namespace) -> Any:
    """The study ``args.study_name`` in the folder's SQLite storage, created or continued."""
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        if args.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    storage = f"sqlite:///{folder / STUDY_DB}"
    # A continued study seeds its sampler past the trials it holds: the same seed would draw the same startup
    # points again.
    try:
        held = len(optuna.load_study(study_name=args.study_name, storage=storage).trials)
    except KeyError:  # no such study yet
        held = 0
    return optuna.create_study(
        study_name=args.study_name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=args.sampler_seed + held),
        pruner=pruner,
        load_if_exists=True,
    )


def optimize(grid: Grid, folder: Path, args: argparse.Namespace, num_threads: int, device: str) -> int:
    """Run (or continue) the study until it holds ``args.n_trials`` finished trials; write the best settings.

    :return: 0 (1 when no trial succeeded).
    """
    optuna = _optuna()
    _check_optimize_arguments(grid, args)
    algo, env = grid.algos[0], grid.envs[0]
    space = load_search_space(algo, args.search_space)
    num_tasks = len(benchmark_task_names(parse_env(env)))
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(optuna, folder, args)
    states = optuna.trial.TrialState
    finished = (states.COMPLETE, states.PRUNED, states.FAIL)

    def spec_of(number: int, params: dict[str, Any]) -> Trial:
        trial_id = f"trial_{number:04d}"
        hyperparams = apply_overrides(grid.algo_hyperparams(algo), to_hyperparams(params, space, num_tasks))
        return Trial(
            id=trial_id,
            algo=algo,
            env=env,
            goals=grid.goals[0],
            preset=grid.preset,
            seed=grid.seeds[0],
            hp_set=trial_id,
            hyperparams=hyperparams,
            folder=str(folder / RUNS_DIR / trial_id),
            train_args=list(grid.train_args),
            num_threads=num_threads,
            device=device,
            conf_file=grid.conf_file,
        )

    ray = import_ray()
    started = connect(args.address, args.num_cpus, args.num_gpus)
    try:
        check_resources(args.cpus_per_trial, args.gpus_per_trial)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // args.cpus_per_trial))
        task = remote_trial(args.cpus_per_trial, args.gpus_per_trial, args.max_retries)
        running: dict[Any, tuple[Any, Trial]] = {}
        pruned: set[int] = set()
        reported: dict[int, int] = {}
        # Trials a stopped search left running continue from their checkpoints.
        for frozen in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            trial = optuna.trial.Trial(study, frozen._trial_id)
            reported[frozen.number] = max(frozen.intermediate_values, default=-1)
            spec = spec_of(frozen.number, frozen.params)
            running[task.remote(asdict(spec))] = (trial, spec)
            print(f"Trial {frozen.number}: continuing ({spec.folder})")
        with ctrl_c_as_a_flag() as ctrl_c:  # (ray.wait can lose a KeyboardInterrupt: read a flag instead)
            while True:
                if ctrl_c.requested:
                    raise KeyboardInterrupt
                done = len(study.get_trials(deepcopy=False, states=finished))
                while len(running) < slots and done + len(running) < args.n_trials:
                    trial = study.ask()
                    spec = spec_of(trial.number, sample(trial, space))
                    running[task.remote(asdict(spec))] = (trial, spec)
                    print(f"Trial {trial.number}: {json.dumps(trial.params)} ({spec.folder})", flush=True)
                if not running:
                    break
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    trial, spec = running.pop(ref)
                    _finish(ray, study, ref, trial, spec, pruned, reported, states)
                for ref, (trial, spec) in running.items():
                    if trial.number not in pruned and _report(trial, spec, reported):
                        pruned.add(trial.number)
                        study.tell(trial, state=states.PRUNED)
                        print(
                            f"Trial {trial.number}: pruned at {reported[trial.number]} steps per task",
                            flush=True,
                        )
                        ray.cancel(ref)  # SIGINT: the trial checkpoints and stops
                time.sleep(0.5)
    finally:
        if started:
            ray.shutdown()
    return _conclude(study, grid, folder, space, num_tasks, states)


def _report(trial: Any, spec: Trial, reported: dict[int, int]) -> bool:
    """Report the trial's new evaluations to Optuna (``reported``: the last step reported, per trial number);
    whether it should be pruned."""
    for step, success in _evaluations(find_run_dir(spec.folder, spec.algo)):
        if step > reported.get(trial.number, -1):
            trial.report(success, step)
            reported[trial.number] = step
            if trial.should_prune():
                return True
    return False


def _finish(
    ray: Any,
    study: Any,
    ref: Any,
    trial: Any,
    spec: Trial,
    pruned: set[int],
    reported: dict[int, int],
    states: Any,
) -> None:
    """Tell Optuna how a trial ended (pruned trials were told when they were stopped)."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as err:
        result = {"code": None, "error": type(err).__name__}
    if trial.number in pruned:
        return
    _report(trial, spec, reported)  # the evaluations written since the last poll
    value = trial_value(find_run_dir(spec.folder, spec.algo))
    if result.get("code") == 0 and value is not None:
        study.tell(trial, value)
        print(f"Trial {trial.number}: mean success {value:.4f}", flush=True)
    else:
        study.tell(trial, state=states.FAIL)
        print(
            f"Trial {trial.number}: failed (exit {result.get('code')}; see {spec.folder}/trial.log)",
            flush=True,
        )


def _conclude(
    study: Any, grid: Grid, folder: Path, space: dict[str, dict[str, Any]], num_tasks: int, states: Any
) -> int:
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in states}
    print("Study: " + ", ".join(f"{count} {name}" for name, count in counts.items() if count))
    try:
        best = study.best_trial
    except ValueError:
        print("No trial finished successfully: no best settings to write.")
        return 1
    path, section = write_best(folder, grid, best, space, num_tasks)
    print(
        f"Best: trial {best.number}, mean success {best.value:.4f}, {json.dumps(copy.deepcopy(best.params))}"
    )
    print(f"Wrote {path} (section {section}; use it with train.py -conf {path})")
    return 0
