"""Staging: write everything a published checkpoint holds into a folder, ready to upload or to bundle.

:func:`stage_repo` is a short pipeline; each step writes one kind of file and records its name::

    open the run -> name the repo -> model and records -> results -> safe policy -> curve -> replay -> card

This module reads SB3 zips, which are pickles: stage only runs you trained yourself.
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from d2r_sb3.common.evaluation import evaluate_per_task
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.provenance import hardware, versions
from d2r_sb3.common.run_layout import EVALUATIONS_FILE, RESULTS_FILE
from d2r_sb3.envs import task_index
from d2r_sb3.publishing.card import REPRODUCE_INTRO, build_model_card
from d2r_sb3.publishing.environment import protocol, zoo_env_name
from d2r_sb3.publishing.media import CURVE_FILE, plot_learning_curve, record_replay
from d2r_sb3.publishing.runs import Run, read_run, task_results
from d2r_sb3.registry import METHODS
from d2r_sb3.serialization.hub import DEFAULT_ORG, DEFAULT_REPO_ID, is_repo_id, repo_id_for
from d2r_sb3.serialization.loaded_policy import LoadedPolicy
from d2r_sb3.serialization.loading import load_policy
from d2r_sb3.serialization.safe_format import POLICY_CONFIG_FILE, POLICY_WEIGHTS_FILE, save_policy

__all__ = ["StagedRepo", "stage_repo"]


@dataclass
class StagedRepo:
    """A folder ready to upload (:func:`~d2r_sb3.publishing.push_to_hub`) or to bundle
    (:func:`~d2r_sb3.publishing.package_pretrained`)."""

    folder: Path
    repo_id: str
    algo: str
    env_name: str
    mean_success: float
    files: list[str]

    def describe(self) -> str:
        """One line per file with its size, for ``--dry-run``."""
        lines = [f"{self.repo_id}: staged in {self.folder} (mean success {self.mean_success:.3f})"]
        for name in self.files:
            lines.append(f"  {name:<28} {(self.folder / name).stat().st_size / 1024:>10.1f} KiB")
        return "\n".join(lines)


@dataclass
class _Staging:
    """What the steps of :func:`stage_repo` share: the run, its model, where it goes, and the files so far."""

    run: Run
    loaded: LoadedPolicy
    model: MultiTaskSAC
    folder: Path
    env_kwargs: dict[str, Any]
    args: dict[str, Any]  # args.yml (the CLI arguments of the run)
    config: dict[str, Any]  # config.yml (the hyperparameters)
    algo: str = ""
    env_name: str = ""
    repo_id: str = ""
    files: list[str] = field(default_factory=list)

    def copy(self, source: Path, name: str) -> None:
        shutil.copy2(source, self.folder / name)
        self.files.append(name)

    def write(self, name: str, text: str) -> None:
        (self.folder / name).write_text(text)
        self.files.append(name)


def stage_repo(
    model: str | Path,
    stage_dir: str | Path,
    *,
    repo_id: str | None = None,
    org: str = DEFAULT_ORG,
    algo: str | None = None,
    load_best: bool = False,
    include_zip: bool = True,
    video: str | None = "mp4",
    n_eval_episodes: int = 100,
    video_tasks: int | list[str] = 3,
    video_steps: int | None = None,
    video_size: int | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    notes: str | None = None,
) -> StagedRepo:
    """Write everything a published checkpoint holds into ``stage_dir`` (see :mod:`d2r_sb3.publishing`).

    :param model: the zoo run folder ``logs/<algo>/<EnvName>_<N>`` (or one of its zips).
    :param stage_dir: output folder; must be empty or missing unless ``overwrite``.
    :param repo_id: Hub repo id (default ``<org>/<algo>-<EnvName>``).
    :param org: Hub organisation of the default repo id.
    :param algo: registry name (default: from ``args.yml``, the log path or the policy class).
    :param load_best: publish ``best_model.zip`` instead of the final model.
    :param include_zip: copy the SB3 zip and ``args.yml`` (``False``: policy-only files, for the bundle).
    :param video: ``"mp4"`` (``replay.mp4``), ``"gif"`` (``replay.gif``, small) or ``None``.
    :param n_eval_episodes: episodes per task when ``results.json`` is missing and the policy is evaluated here.
    :param video_tasks: number of tasks (or their names) in the replay.
    :param video_steps: env steps in the replay (default: one episode).
    :param video_size: pixels per task tile (default 256 for mp4, 128 for GIF).
    :param overwrite: empty a non-empty ``stage_dir`` first.
    :param device: torch device used to evaluate and render.
    :param notes: Markdown for the card's "About this run" section.
    :return: the :class:`StagedRepo`.
    """
    if video not in ("mp4", "gif", None):
        raise ValueError(f"video must be 'mp4', 'gif' or None, got {video!r}.")
    if algo is not None and algo not in METHODS:
        raise ValueError(f"Unknown algo {algo!r}; choose one of: {', '.join(METHODS)}.")
    stage_dir = _emptied(Path(stage_dir), overwrite)
    staging = _open_run(model, stage_dir, load_best, device)
    if isinstance(video_tasks, list):  # checked before the evaluation and rendering, not after
        names = staging.loaded.task_names
        video_tasks = [names[task_index(names, name, "the policy")] for name in video_tasks]
    _name_repo(staging, algo, repo_id, org)
    stage_dir.mkdir(parents=True, exist_ok=True)

    zip_name = _copy_model_and_records(staging, include_zip)
    results, origin = _results(staging, n_eval_episodes)
    evaluation = task_results(results)
    staging.write(RESULTS_FILE, json.dumps(results, indent=2, default=str) + "\n")
    mean_success = float(np.mean(list(evaluation["success"].values())))
    _save_safe_policy(staging, mean_success)
    has_curve = _learning_curve(staging, include_zip)
    video_file, shown_tasks = _replay(staging, video, video_tasks, video_steps, video_size)
    _model_card(staging, results, origin, zip_name, has_curve, video_file, shown_tasks, notes)
    return StagedRepo(stage_dir, staging.repo_id, staging.algo, staging.env_name, mean_success, staging.files)


# --- the steps -------------------------------------------------------------------------------------------
def _emptied(stage_dir: Path, overwrite: bool) -> Path:
    """``stage_dir``, emptied (removed) if it holds something and ``overwrite`` allows it."""
    if stage_dir.exists() and any(stage_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{stage_dir} is not empty; choose another stage folder or pass overwrite=True."
            )
        shutil.rmtree(stage_dir)
    return stage_dir


def _open_run(model: str | Path, stage_dir: Path, load_best: bool, device: str) -> _Staging:
    """Read the run and load its zip."""
    run = read_run(model, load_best=load_best)
    # The run's own zip (a pickle): staging is for runs the user trained, so unpickling it is their choice.
    loaded = load_policy(run.model_zip, device=device, allow_pickle=True)
    if loaded.model is None:  # (load_policy returns the algorithm for every zip)
        raise ValueError(f"{run.model_zip} did not load as an SB3 model.")
    env_kwargs = run.read_yaml("env_kwargs.yml") or loaded.env_kwargs
    args, config = run.read_yaml("args.yml"), run.read_yaml("config.yml")
    return _Staging(run, loaded, loaded.model, stage_dir, env_kwargs, args, config)


def _name_repo(staging: _Staging, algo: str | None, repo_id: str | None, org: str) -> None:
    """The method (given, else from ``args.yml``, the log path or the policy class), env name and repo id."""
    run, loaded = staging.run, staging.loaded
    parent = run.run_dir.parent.name
    algo = algo or staging.args.get("algo") or (parent if parent in METHODS else None) or loaded.algo
    if algo not in METHODS:
        raise ValueError(
            f"Cannot tell which algorithm trained {run.model_zip}; pass algo= (one of {', '.join(METHODS)})."
        )
    env_kwargs = staging.env_kwargs
    env_name = run.env_name or (zoo_env_name(env_kwargs) if env_kwargs else run.model_zip.stem)
    repo_id = repo_id or repo_id_for(algo, env_name, org)
    if not is_repo_id(repo_id):
        raise ValueError(f"Invalid repo id {repo_id!r}: expected 'org/name', e.g. {DEFAULT_REPO_ID!r}.")
    staging.algo, staging.env_name, staging.repo_id = algo, env_name, repo_id


def _copy_model_and_records(staging: _Staging, include_zip: bool) -> str | None:
    """The SB3 zip (when published), config.yml, args.yml and env_kwargs.yml; returns the zip's name."""
    zip_name = f"{staging.algo}-{staging.env_name}.zip" if include_zip else None
    if zip_name:
        staging.copy(staging.run.model_zip, zip_name)
    for name in ("config.yml", "args.yml") if include_zip else ("config.yml",):
        if name in staging.run.records:
            staging.copy(staging.run.records[name], name)
    if staging.env_kwargs:
        staging.write("env_kwargs.yml", yaml.safe_dump(staging.env_kwargs, sort_keys=False))
    return zip_name


def _results(staging: _Staging, n_eval_episodes: int) -> tuple[dict[str, Any], str]:
    """The run's own final evaluation, else one made here (same evaluator as the zoo); and where it came from."""
    if staging.run.results is not None:
        return staging.run.results, f"Results from the run's `{RESULTS_FILE}`."
    env_kwargs = staging.env_kwargs
    env = staging.loaded.make_env(**env_kwargs)
    try:
        evaluation = evaluate_per_task(staging.loaded, env, n_episodes=n_eval_episodes, deterministic=True)
    finally:
        env.close()
    results = {
        **evaluation.to_dict(),
        "protocol": protocol(env_kwargs),
        "n_timesteps": int(staging.model.num_timesteps),
        "seed": env_kwargs.get("seed"),
        "env_kwargs": env_kwargs,
        "eval_datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "evaluated_by": "d2r_sb3.publishing.stage_repo (the run had no results.json)",
        "versions": versions(),
        "hardware": hardware(),
    }
    origin = (
        f"The run had no `{RESULTS_FILE}`: evaluated while staging with `evaluate_per_task` "
        f"({n_eval_episodes} episodes per task)."
    )
    return results, origin


def _save_safe_policy(staging: _Staging, mean_success: float) -> None:
    metadata = {
        "repo_id": staging.repo_id,
        "mean_success": mean_success,
        "source_zip": staging.run.model_zip.name,
    }
    save_policy(
        staging.model, staging.folder, algo=staging.algo, env_kwargs=staging.env_kwargs, metadata=metadata
    )
    staging.files += [POLICY_WEIGHTS_FILE, POLICY_CONFIG_FILE]


def _learning_curve(staging: _Staging, include_zip: bool) -> bool:
    """The learning curve from ``evaluations.json`` (and the history itself, with the zip); whether drawn."""
    evaluations = staging.run.evaluations
    if not (evaluations and evaluations.get("mean_success")):
        return False
    plot_learning_curve(evaluations, staging.folder / CURVE_FILE)
    staging.files.append(CURVE_FILE)
    if include_zip:
        staging.copy(staging.run.layout.evaluations_file, EVALUATIONS_FILE)
    return True


def _replay(
    staging: _Staging,
    video: str | None,
    video_tasks: int | list[str],
    video_steps: int | None,
    video_size: int | None,
) -> tuple[str | None, list[str] | None]:
    """``replay.mp4`` or ``replay.gif`` (a GIF: smaller tiles, every 4th frame); its name and its tasks."""
    if video is None:
        return None, None
    loaded = staging.loaded
    shown_tasks = video_tasks if isinstance(video_tasks, list) else loaded.task_names[:video_tasks]
    video_file = f"replay.{video}"
    record_replay(
        loaded,
        staging.folder / video_file,
        env_kwargs=staging.env_kwargs,
        tasks=shown_tasks,
        n_steps=video_steps,
        size=video_size or (256 if video == "mp4" else 128),
        frame_skip=1 if video == "mp4" else 4,
    )
    staging.files.append(video_file)
    return video_file, shown_tasks


def _model_card(
    staging: _Staging,
    results: dict[str, Any],
    origin: str,
    zip_name: str | None,
    has_curve: bool,
    video_file: str | None,
    shown_tasks: list[str] | None,
    notes: str | None,
) -> None:
    """``README.md``, naming the files the steps before wrote."""
    seeds = next(
        (
            d[k]
            for d in (results, staging.args, staging.config)
            for k in ("seeds", "seed")
            if d.get(k) is not None
        ),
        None,
    )
    train_command, enjoy_command = _commands(staging.run, staging.algo, staging.env_kwargs, staging.repo_id)
    card = build_model_card(
        commands_intro=_commands_intro(staging.run),
        repo_id=staging.repo_id,
        algo=staging.algo,
        policy=staging.loaded,
        env_kwargs=staging.env_kwargs,
        evaluation=task_results(results),
        results=results,
        config=staging.config,
        num_timesteps=int(staging.model.num_timesteps),
        train_command=train_command,
        enjoy_command=enjoy_command,
        zip_name=zip_name,
        video_file=video_file,
        has_curve=has_curve,
        results_origin=origin,
        video_tasks=shown_tasks,
        seeds=seeds,
        notes=notes,
    )
    card.save(staging.folder / "README.md")
    staging.files.append("README.md")


def _commands_intro(run: Run) -> str:
    """The sentence before the card's commands: a run restarted from a resume seed cannot be rebuilt from its own
    commands alone, so the card names the seed it loaded (``warm_start.yml``)."""
    if "warm_start.yml" not in run.records:
        return REPRODUCE_INTRO
    record = run.read_yaml("warm_start.yml")
    steps = record.get("num_timesteps")
    seed = f"a resume seed at {int(steps):,} env steps" if steps is not None else "a resume seed"
    digest = record.get("file_sha256")
    return (
        f"The commands of this run, as its records hold them: it was restarted from {seed} "
        f"(`{record.get('origin', record.get('source', 'unknown'))}`"
        + (f", SHA-256 `{str(digest)[:16]}…`" if digest else "")
        + "), so they continue an earlier run rather than rebuild this policy from scratch (its history is under "
        '"About this run"); then the evaluation of this policy:'
    )


def _commands(run: Run, algo: str, env_kwargs: dict[str, Any], repo_id: str) -> tuple[str, str]:
    """(training command of the run, commands that evaluate and watch the published policy)."""
    if "command.txt" in run.records:  # one line per launch (a resumed run appends its command)
        train = run.records["command.txt"].read_text().strip()
    else:
        args = run.read_yaml("args.yml")
        benchmark = env_kwargs.get("benchmark", "MT10")
        env_arg = ",".join(benchmark) if isinstance(benchmark, list) else benchmark
        train = (
            f"python zoo/train.py --algo {algo} --env {env_arg} --goals {env_kwargs.get('goals', 'rand')} "
            f"--preset {env_kwargs.get('preset', 'paper')} --seed {args.get('seed', 0)}"
        )
    evaluate = (
        f"python zoo/evaluate.py --model {repo_id} --episodes 100\n"
        f"python zoo/enjoy.py --model {repo_id} --task drawer-close --video drawer-close.mp4"
    )
    return train, evaluate
