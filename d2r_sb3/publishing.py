"""Publish trained checkpoints: stage a Hub repo folder, upload it, or package the bundled pretrained policy.

One code path builds every published folder (:func:`stage_repo`); the command-line tools in ``hub/`` are thin
wrappers around it:

* ``python hub/push.py --model logs/d2r/MT10-rand_1 --repo-id ORG/d2r-MT10-rand`` stages the full repo
  (:func:`stage_repo`) and uploads it (:func:`push_to_hub`);
* ``python hub/package_pretrained.py --model logs/d2r/MT10-rand_1`` writes the policy-only files into the
  package's Hub-cache folder ``d2r_sb3/pretrained/`` (:func:`package_pretrained`), which
  :func:`d2r_sb3.hub.load_from_hub` reads offline.

A staged repo mirrors rl-baselines3-zoo's Hub layout plus the safe weights:

=========================  ====================================================================================
``<algo>-<EnvName>.zip``   the SB3 model (a pickle), to resume or fine-tune training
``config.yml``             hyperparameters of the run; ``args.yml`` (the CLI arguments) when present
``env_kwargs.yml``         :func:`~d2r_sb3.make_mt_env` keyword arguments
``results.json``           final per-task evaluation (the run's, or computed here with ``evaluate_per_task``)
``evaluations.json``       evaluation history during training, when present
``policy.safetensors``     actor weights + ``policy.json`` (safe policy format, :mod:`d2r_sb3.serialization`)
``replay.mp4``             a short clip of a few tasks (``replay.gif`` for the bundled package)
``learning_curve.png``     success rate vs env steps, from ``evaluations.json``
``README.md``              model card: metadata + model-index, per-task results next to published anchors
=========================  ====================================================================================

This module reads SB3 zips, which are pickles: stage only runs you trained yourself.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token

from d2r_sb3.common.evaluation import evaluate_per_task
from d2r_sb3.common.provenance import hardware, versions
from d2r_sb3.envs import task_index
from d2r_sb3.hub import DEFAULT_ORG, DEFAULT_REPO_ID, PRETRAINED_CACHE, is_repo_id, repo_id_for
from d2r_sb3.registry import ALGOS
from d2r_sb3.serialization import (
    POLICY_CONFIG_FILE,
    POLICY_WEIGHTS_FILE,
    LoadedPolicy,
    find_model_zip,
    load_policy,
    save_policy,
)

__all__ = [
    "ANCHORS",
    "Run",
    "StagedRepo",
    "add_staging_arguments",
    "build_model_card",
    "package_pretrained",
    "push_to_hub",
    "read_run",
    "record_replay",
    "stage_repo",
    "staging_options",
]

RECORD_FILES = ("config.yml", "args.yml", "env_kwargs.yml", "command.txt")
RESULTS_FILE = "results.json"
EVALUATIONS_FILE = "evaluations.json"
CURVE_FILE = "learning_curve.png"
BUNDLE_SIZE_WARNING = 5 * 2**20  # the bundled pretrained folder ships in every wheel: keep it small

ALGO_TITLES = {
    "d2r": "D2R",
    "mtsac": "MT-SAC",
    "mhsac": "MH-SAC",
    "sm": "Soft Modularization",
    "mhsac-wide": "MH-SAC (width-matched)",
}
# Anchor success rates from /work/shared/BENCHMARKS.md: (method, fixed goals, random goals, source).
_T3S_RERUN = "re-run in the T3S paper, paper-like protocol (15M / 50M steps)"
ANCHORS: dict[str, list[tuple[str, str, str, str]]] = {
    "MT10": [
        ("MT-SAC", "0.47", "0.36", _T3S_RERUN),
        ("MH-SAC", "0.65", "0.61", _T3S_RERUN),
        ("Soft Modularization", "0.67", "0.64", _T3S_RERUN),
        ("CAGrad", "0.89", "0.75", _T3S_RERUN),
        ("T3S", "0.95", "0.80", _T3S_RERUN),
        (
            "D2R (paper)",
            "best of all",
            "best of all",
            "D2R paper; only method > 0 on every MT10 task (Table 8 n/a)",
        ),
        ("MOORE", "0.887", "", "own protocol: 150-step episodes, 10 seeds"),
        ("PaCo", "0.736", "", "Meta-World+ re-run, V2 reward (0.262 with V1)"),
    ],
    "MT50": [
        ("MT-SAC", "0.26", "0.25", _T3S_RERUN),
        ("MH-SAC", "0.29", "0.29", _T3S_RERUN),
        ("Soft Modularization", "0.61", "0.62", _T3S_RERUN),
        ("CAGrad", "0.63", "0.67", _T3S_RERUN),
        ("T3S", "0.65", "0.65", _T3S_RERUN),
        ("D2R (paper)", "best of all", "best of all", "D2R paper (Table 8 values n/a)"),
        ("MOORE", "0.729", "", "own protocol: 150-step episodes, 10 seeds"),
    ],
}
"""Published success rates to show next to measured ones (each source uses a slightly different protocol)."""

D2R_BIBTEX = """@inproceedings{he2024d2r,
  title     = {Not All Tasks Are Equally Difficult: Multi-Task Deep Reinforcement Learning with Dynamic Depth Routing},
  author    = {He, Jinmin and Li, Kai and Zang, Yifan and Fu, Haobo and Fu, Qiang and Xing, Junliang and Cheng, Jian},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  volume    = {38},
  year      = {2024}
}"""
SB3_BIBTEX = """@article{stable-baselines3,
  author  = {Antonin Raffin and Ashley Hill and Adam Gleave and Anssi Kanervisto and Maximilian Ernestus and Noah Dormann},
  title   = {Stable-Baselines3: Reliable Reinforcement Learning Implementations},
  journal = {Journal of Machine Learning Research},
  year    = {2021},
  volume  = {22},
  number  = {268},
  pages   = {1-8},
  url     = {http://jmlr.org/papers/v22/20-1364.html}
}"""

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ algo_title }} on Meta-World {{ benchmark }} ({{ goals }} goals, `{{ preset }}` preset)

A multi-task {{ algo_title }} policy trained with `d2r_sb3`, the Stable-Baselines3 implementation of D2R (Dynamic Depth Routing, He et al., AAAI 2024), on the {{ num_tasks }}
tasks of Meta-World {{ benchmark }} with one env per task.

## Results

Mean success rate **{{ "%.3f"|format(mean_success) }}** over {{ num_tasks }} tasks ({{ episodes }} deterministic
episodes per task; an episode succeeds if it succeeds at any step). Mean return over tasks: {{ mean_reward }}.
{{ results_origin }}

{{ results_table }}

{% if has_curve %}![Success rate during training](learning_curve.png)
{% endif %}{% if video_file %}Replay of {{ video_tasks }}: {% if video_file.endswith(".gif") %}![replay]({{ video_file }}){% else %}[{{ video_file }}]({{ video_file }}){% endif %}
{% endif %}{% if notes %}
### About this run

{{ notes }}
{% endif %}
### Published numbers, for orientation only

The first row is what we measured for this model, reported as it is even when far below the published
numbers. These are **not directly comparable**: this model runs on Meta-World 3 (`-v3` envs, mujoco {{ versions.get("mujoco", "3") }}),
while the papers used Meta-World v2 envs on mujoco-py, with other episode lengths, goal sampling and step budgets.
This run: {{ protocol }}; env steps trained: {{ steps_text }}.

| method | {{ benchmark }} fixed goals | {{ benchmark }} random goals | source |
|---|---|---|---|
| **this model** | {{ this_fixed }} | {{ this_rand }} | {{ seeds_text }} |
{% for name, fixed, rand, source in anchors %}| {{ name }} | {{ fixed }} | {{ rand }} | {{ source }} |
{% endfor %}

## Model

| | parameters |
|---|---|
| actor | {{ "{:,}".format(actor_params) }} |
| each critic ({{ n_critics }} critics) | {{ "{:,}".format(critic_params) }} |
| total (actor + critics) | {{ "{:,}".format(total_params) }} |

Policy `{{ policy_class }}` with `{{ policy_kwargs }}`.

## Usage

The safe policy files (`policy.safetensors` + `policy.json`) load without unpickling anything:

```python
from d2r_sb3 import evaluate_per_task
from d2r_sb3.hub import load_from_hub

policy = load_from_hub("{{ repo_id }}")
env = policy.make_env()  # make_mt_env(**env_kwargs.yml)
print(evaluate_per_task(policy, env, n_episodes=10).markdown())
```
{% if zip_name %}
To resume or fine-tune training, load the SB3 model `{{ zip_name }}`. **It is a pickle**: loading it can run
arbitrary code, so only load it from sources you trust.

```python
from huggingface_hub import hf_hub_download
from d2r_sb3 import {{ algo_class }}, make_mt_env

path = hf_hub_download("{{ repo_id }}", "{{ zip_name }}")
model = {{ algo_class }}.load(path, env=make_mt_env(**{{ env_kwargs_repr }}))
```
{% endif %}
Reproduce with the zoo (the training command of this run, then evaluation of this policy):

```bash
{{ train_command }}
{{ enjoy_command }}
```

## Training

| | |
|---|---|
| env steps | {{ steps_text }} |
| seed(s) | {{ seeds_text }} |
| env | `{{ env_kwargs_repr }}` |
{% for key, value in run_record %}| {{ key }} | {{ value }} |
{% endfor %}
Hyperparameters (`config.yml`):

```yaml
{{ config_yaml }}
```

## Citation

```bibtex
{{ d2r_bibtex }}

{{ sb3_bibtex }}
```
"""


# --- reading a run ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a zoo run folder ``logs/<algo>/<EnvName>_<N>/`` holds (contract 1 of the zoo)."""

    run_dir: Path
    model_zip: Path
    env_name: str | None
    # config.yml, args.yml, env_kwargs.yml and command.txt, where found
    records: dict[str, Path] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    evaluations: dict[str, Any] | None = None

    def read_yaml(self, name: str) -> dict[str, Any]:
        """A YAML record of the run as a mapping (empty if absent)."""
        path = self.records.get(name)
        if path is None:
            return {}
        data = yaml.safe_load(path.read_text())
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping, got {type(data).__name__}.")
        return data


def _run_env_name(folder: Path) -> str | None:
    name, sep, number = folder.name.rpartition("_")
    return name if sep and number.isdigit() else None


def read_run(model: str | Path, *, load_best: bool = False) -> Run:
    """Locate the model zip and the records of a zoo run folder (or of a zip inside one).

    :param model: the run folder ``logs/<algo>/<EnvName>_<N>`` or one of its zips.
    :param load_best: publish ``best_model.zip`` instead of the final ``<EnvName>.zip``.
    :return: the :class:`Run`.
    :raises FileNotFoundError: if there is no model zip.
    """
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".zip":
        run_dir, model_zip = path.parent, path
    elif path.is_dir():
        run_dir = path
        found = find_model_zip(path, load_best)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no model zip: pass a zoo run folder logs/<algo>/<EnvName>_<N>."
            )
        model_zip = found
    else:
        raise FileNotFoundError(
            f"{path} does not exist: pass a zoo run folder logs/<algo>/<EnvName>_<N> or a .zip."
        )
    env_name = _run_env_name(run_dir)
    records = {}
    for name in RECORD_FILES:  # the zoo keeps them in <EnvName>/; a staged repo beside the zip
        for folder in (run_dir / (env_name or model_zip.stem), run_dir):
            if (folder / name).is_file():
                records[name] = folder / name
                break
    results = _read_json(run_dir / RESULTS_FILE)
    evaluations = _read_json(run_dir / EVALUATIONS_FILE)
    return Run(run_dir, model_zip, env_name, records, results, evaluations)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return data


def task_results(results: dict[str, Any], where: str = RESULTS_FILE) -> dict[str, Any]:
    """The per-task evaluation inside a results record (``TaskEvaluation.to_dict()`` keys).

    Accepts the keys at the top level or under ``"evaluation"`` / ``"final"``.

    :raises ValueError: if no per-task ``success`` mapping is found.
    """
    for candidate in (results, results.get("evaluation"), results.get("final")):
        if isinstance(candidate, dict) and isinstance(candidate.get("success"), dict):
            return candidate
    raise ValueError(
        f"{where} has no per-task success: expected the keys of TaskEvaluation.to_dict() (success: {{task: rate}}, "
        "mean_return, std_return, episodes), at the top level or under 'evaluation'."
    )


# --- environment description -----------------------------------------------------------------------------
def _benchmark_label(env_kwargs: dict[str, Any]) -> str:
    benchmark = env_kwargs.get("benchmark", "custom")
    return benchmark if isinstance(benchmark, str) and benchmark.upper() in ("MT10", "MT50") else "custom"


def _env_name(env_kwargs: dict[str, Any]) -> str:
    """Zoo env name from make_mt_env kwargs (``MT10-rand``, ``MT10-rand-mw3``, ``custom-fixed``)."""
    name = f"{_benchmark_label(env_kwargs)}-{env_kwargs.get('goals', 'rand')}"
    preset = env_kwargs.get("preset", "paper")
    return name if preset == "paper" else f"{name}-{preset}"


def _protocol(env_kwargs: dict[str, Any]) -> str:
    """One line describing the episode protocol of make_mt_env kwargs (for the card and results.json)."""
    parts = [f"preset `{env_kwargs.get('preset', 'paper')}`", f"goals `{env_kwargs.get('goals', 'rand')}`"]
    if env_kwargs.get("max_episode_steps"):
        parts.append(f"{env_kwargs['max_episode_steps']}-step episodes")
    if env_kwargs.get("time_limit_terminal") is not None:
        parts.append(
            "time limit = terminal" if env_kwargs["time_limit_terminal"] else "time limit = truncation"
        )
    if env_kwargs.get("reward_scale") is not None:
        parts.append(f"reward x {env_kwargs['reward_scale']}")
    if env_kwargs.get("reward_function_version"):
        parts.append(f"reward {env_kwargs['reward_function_version']}")
    return ", ".join(parts)


# --- media -----------------------------------------------------------------------------------------------
def record_replay(
    policy: LoadedPolicy,
    path: str | Path,
    *,
    env_kwargs: dict[str, Any] | None = None,
    tasks: int | list[str] = 3,
    n_steps: int | None = None,
    size: int = 256,
    frame_skip: int = 1,
    fps: int = 30,
    camera_name: str | None = None,
) -> Path:
    """Render the policy acting on a few tasks side by side (deterministic actions) into an mp4 or a GIF.

    :param policy: the loaded policy.
    :param path: output file; ``.mp4`` (h264 via imageio-ffmpeg) or ``.gif``.
    :param env_kwargs: make_mt_env kwargs (default: the policy's).
    :param tasks: how many tasks (the first ones) or their names.
    :param n_steps: env steps to record (default: one episode).
    :param size: frame height and width of each task, in pixels.
    :param frame_skip: keep every ``frame_skip``-th frame (smaller GIFs).
    :param fps: frames per second of the output.
    :param camera_name: Meta-World camera (``None``: the env's default view, upright; the ``corner`` cameras
        render upside down with Meta-World 3 on mujoco 3).
    :return: ``path``.
    """
    import imageio.v2 as imageio
    from PIL import Image, ImageDraw

    path = Path(path)
    kwargs = dict(env_kwargs if env_kwargs is not None else policy.env_kwargs)
    kwargs.update(render_mode="rgb_array", width=size, height=size, camera_name=camera_name, vec_env="dummy")
    env = policy.make_env(**kwargs)
    try:
        names = env.task_names[:tasks] if isinstance(tasks, int) else tasks
        indices = [env.task_index(name) for name in names]
        n_steps = n_steps or int(env.max_episode_steps)
        frames = []
        obs = env.reset()
        for step in range(n_steps):
            if step % frame_skip == 0:
                tiles = []
                for index in indices:
                    tile = Image.fromarray(np.ascontiguousarray(env.env_method("render", indices=[index])[0]))
                    ImageDraw.Draw(tile).text(
                        (4, 4), env.task_names[index].removesuffix("-v3"), fill=(255, 255, 255)
                    )
                    tiles.append(np.asarray(tile))
                frames.append(np.concatenate(tiles, axis=1))
            actions, _ = policy.predict(obs, deterministic=True)
            obs, *_ = env.step(actions)
    finally:
        env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000 * frame_skip / fps, loop=0)
    else:
        imageio.mimsave(path, frames, fps=max(1, fps // frame_skip), macro_block_size=16)
    return path


def plot_learning_curve(evaluations: dict[str, Any], path: str | Path) -> Path:
    """Plot mean and per-task success rate vs env steps per task from an ``evaluations.json`` history.

    :param evaluations: the history written by :class:`~d2r_sb3.common.callbacks.PerTaskEvalCallback`.
    :param path: output PNG.
    :return: ``path``.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend and figures alone

    steps = evaluations.get("timesteps_per_task") or evaluations["timesteps"]
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    for values in (evaluations.get("success") or {}).values():
        ax.plot(steps, values, lw=0.8, alpha=0.35)
    ax.plot(steps, evaluations["mean_success"], lw=2.2, color="black", label="mean over tasks")
    ax.set_xlabel("env steps per task" if evaluations.get("timesteps_per_task") else "env steps")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(
        f"{evaluations.get('n_eval_episodes', '?')} deterministic episodes per task (thin: each task)"
    )
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# --- model card ------------------------------------------------------------------------------------------
def _markdown_results(evaluation: dict[str, Any]) -> str:
    success = evaluation["success"]
    mean_return = evaluation.get("mean_return") or {}
    std_return = evaluation.get("std_return") or {}
    episodes = evaluation.get("episodes", "?")
    lines = ["| task | success rate | return (mean ± std) | episodes |", "|---|---|---|---|"]
    for name, rate in success.items():
        ret = f"{mean_return[name]:.1f} ± {std_return.get(name, 0.0):.1f}" if name in mean_return else "n/a"
        lines.append(f"| {name} | {rate:.2f} | {ret} | {episodes} |")
    mean = float(np.mean(list(success.values())))
    lines.append(f"| **mean** | **{mean:.3f}** | | |")
    return "\n".join(lines)


def _mean_reward(evaluation: dict[str, Any]) -> str:
    """rl-zoo's ``"mean +/- std"`` string: mean and spread over tasks of the per-task mean returns."""
    returns = list((evaluation.get("mean_return") or {}).values())
    if not returns:
        return "n/a"
    return f"{np.mean(returns):.2f} +/- {np.std(returns):.2f}"


def build_model_card(
    *,
    repo_id: str,
    algo: str,
    policy: LoadedPolicy,
    env_kwargs: dict[str, Any],
    evaluation: dict[str, Any],
    results: dict[str, Any],
    config: dict[str, Any],
    num_timesteps: int | None,
    train_command: str,
    enjoy_command: str,
    zip_name: str | None = None,
    video_file: str | None = None,
    has_curve: bool = False,
    results_origin: str = "",
    seeds: Any = None,
    video_tasks: list[str] | None = None,
    notes: str | None = None,
) -> ModelCard:
    """Build the model card (``README.md``) of a published policy.

    :param repo_id: the Hub repo id.
    :param algo: registry name of the algorithm.
    :param policy: the loaded policy (parameter counts, policy kwargs).
    :param env_kwargs: make_mt_env kwargs of the run.
    :param evaluation: per-task results (``TaskEvaluation.to_dict()`` keys).
    :param results: the whole results record (its other keys are listed as the run record).
    :param config: hyperparameters (``config.yml``).
    :param num_timesteps: env steps trained (summed over tasks).
    :param train_command: the command that trained the run.
    :param enjoy_command: a command that evaluates it with the zoo.
    :param zip_name: name of the SB3 zip in the repo (``None``: not published).
    :param video_file: name of the replay file (``None``: none).
    :param has_curve: whether ``learning_curve.png`` is in the repo.
    :param results_origin: one sentence saying where the results come from.
    :param seeds: training seed(s) of the run.
    :param video_tasks: tasks shown in the replay.
    :param notes: Markdown written by the publisher under "About this run" (e.g. how and why the run's
        settings differ from the paper's).
    :return: the :class:`huggingface_hub.ModelCard`.
    """
    benchmark = _benchmark_label(env_kwargs)
    goals = env_kwargs.get("goals", "rand")
    mean_success = float(np.mean(list(evaluation["success"].values())))
    mean_reward = _mean_reward(evaluation)
    dataset_type = f"Meta-World/{benchmark}"
    dataset_name = f"Meta-World {benchmark} ({goals} goals, {env_kwargs.get('preset', 'paper')} preset)"
    metrics = [("success_rate", round(mean_success, 4), "mean success rate")]
    if mean_reward != "n/a":
        metrics.append(("mean_reward", mean_reward, "mean_reward"))
    card_data = ModelCardData(
        library_name="stable-baselines3",
        license="mit",
        model_name=repo_id.split("/")[-1],
        tags=[
            "d2r_sb3",
            "stable-baselines3",
            "reinforcement-learning",
            "deep-reinforcement-learning",
            "multi-task-reinforcement-learning",
            "metaworld",
            dataset_type,
            f"{algo}",
        ],
        eval_results=[
            EvalResult(
                task_type="reinforcement-learning",
                task_name="reinforcement-learning",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                metric_type=metric,
                metric_value=value,
                metric_name=name,
            )
            for metric, value, name in metrics
        ],
    )
    module = policy.policy
    actor_params = sum(p.numel() for p in module.actor.parameters())
    n_critics = int(getattr(module, "n_critics", 2))
    critics_total = sum(p.numel() for p in module.critic.parameters())
    critic_params = critics_total // max(n_critics, 1)
    num_tasks = len(evaluation["success"])
    steps_text = (
        f"{num_timesteps:,} in total ({num_timesteps // num_tasks:,} per task)"
        if num_timesteps
        else "unknown"
    )
    this_rate = f"**{mean_success:.3f}**"
    skip = {
        "success",
        "mean_return",
        "std_return",
        "mean_length",
        "task_names",
        "mean_success",
        "mean_return_over_tasks",
        "evaluation",
        "final",
        "env_kwargs",
    }
    run_record = [(key, _inline(value)) for key, value in results.items() if key not in skip]
    algo_class = ALGOS[algo][0].__name__ if algo in ALGOS else "MultiTaskSAC"
    env_kwargs_repr = repr({k: v for k, v in env_kwargs.items() if v is not None})
    return ModelCard.from_template(
        card_data,
        template_str=MODEL_CARD_TEMPLATE,
        algo_title=ALGO_TITLES.get(algo, algo),
        algo_class=algo_class,
        benchmark=benchmark,
        goals=goals,
        preset=env_kwargs.get("preset", "paper"),
        num_tasks=num_tasks,
        mean_success=mean_success,
        mean_reward=mean_reward,
        episodes=evaluation.get("episodes", "?"),
        results_table=_markdown_results(evaluation),
        results_origin=results_origin,
        has_curve=has_curve,
        video_file=video_file,
        video_tasks=", ".join(n.removesuffix("-v3") for n in video_tasks or []),
        versions=results.get("versions") or versions(),
        protocol=_protocol(env_kwargs),
        steps_text=steps_text,
        seeds_text=f"seeds {seeds}" if isinstance(seeds, list) else f"seed {seeds}, one run",
        this_fixed=this_rate if goals == "fixed" else "",
        this_rand=this_rate if goals != "fixed" else "",
        anchors=ANCHORS.get(benchmark, []),
        actor_params=actor_params,
        critic_params=critic_params,
        n_critics=n_critics,
        total_params=actor_params + critics_total,
        policy_class=type(module).__name__,
        policy_kwargs=_inline(_plain_policy_kwargs(policy)),
        repo_id=repo_id,
        zip_name=zip_name,
        env_kwargs_repr=env_kwargs_repr,
        train_command=train_command,
        enjoy_command=enjoy_command,
        run_record=run_record,
        config_yaml=yaml.safe_dump(config, sort_keys=False).strip()
        if config
        else "# config.yml was not found",
        d2r_bibtex=D2R_BIBTEX,
        sb3_bibtex=SB3_BIBTEX,
        notes=notes.strip() if notes else None,
    )


def _plain_policy_kwargs(policy: LoadedPolicy) -> dict[str, Any]:
    params = policy.policy._get_constructor_parameters()
    drop = ("observation_space", "action_space", "optimizer_class", "optimizer_kwargs", "normalize_images")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if k not in drop}


def _inline(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", " ")


# --- staging ---------------------------------------------------------------------------------------------
@dataclass
class StagedRepo:
    """A folder ready to upload (:func:`push_to_hub`) or to bundle (:func:`package_pretrained`)."""

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
    """Write everything a published checkpoint holds into ``stage_dir`` (see the module docstring).

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
    if algo is not None and algo not in ALGOS:
        raise ValueError(f"Unknown algo {algo!r}; choose one of: {', '.join(ALGOS)}.")
    stage_dir = Path(stage_dir)
    if stage_dir.exists() and any(stage_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{stage_dir} is not empty; choose another stage folder or pass overwrite=True."
            )
        shutil.rmtree(stage_dir)
    run = read_run(model, load_best=load_best)
    # The run's own zip (a pickle): staging is for runs the user trained, so unpickling it is their choice.
    loaded = load_policy(run.model_zip, device=device, allow_pickle=True)
    sb3_model = loaded.model
    if sb3_model is None:  # (load_policy returns the algorithm for every zip)
        raise ValueError(f"{run.model_zip} did not load as an SB3 model.")
    if isinstance(video_tasks, list):  # checked before the evaluation and rendering, not after
        video_tasks = [
            loaded.task_names[task_index(loaded.task_names, name, "the policy")] for name in video_tasks
        ]
    env_kwargs = run.read_yaml("env_kwargs.yml") or loaded.env_kwargs
    args = run.read_yaml("args.yml")
    config = run.read_yaml("config.yml")
    parent = run.run_dir.parent.name
    algo = algo or args.get("algo") or (parent if parent in ALGOS else None) or loaded.algo
    if algo not in ALGOS:
        raise ValueError(
            f"Cannot tell which algorithm trained {run.model_zip}; pass algo= (one of {', '.join(ALGOS)})."
        )
    env_name = run.env_name or (_env_name(env_kwargs) if env_kwargs else run.model_zip.stem)
    repo_id = repo_id or repo_id_for(algo, env_name, org)
    if not is_repo_id(repo_id):
        raise ValueError(f"Invalid repo id {repo_id!r}: expected 'org/name', e.g. {DEFAULT_REPO_ID!r}.")
    stage_dir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []

    zip_name = f"{algo}-{env_name}.zip" if include_zip else None
    if zip_name:
        shutil.copy2(run.model_zip, stage_dir / zip_name)
        files.append(zip_name)
    for name in ("config.yml", "args.yml") if include_zip else ("config.yml",):
        if name in run.records:
            shutil.copy2(run.records[name], stage_dir / name)
            files.append(name)
    if env_kwargs:
        (stage_dir / "env_kwargs.yml").write_text(yaml.safe_dump(env_kwargs, sort_keys=False))
        files.append("env_kwargs.yml")

    # Results: the run's own final evaluation, else evaluate here (same evaluator as the zoo).
    if run.results is not None:
        results = run.results
        origin = f"Results from the run's `{RESULTS_FILE}`."
    else:
        env = loaded.make_env(**env_kwargs)
        try:
            evaluation = evaluate_per_task(loaded, env, n_episodes=n_eval_episodes, deterministic=True)
        finally:
            env.close()
        results = {
            **evaluation.to_dict(),
            "protocol": _protocol(env_kwargs),
            "n_timesteps": int(sb3_model.num_timesteps),
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
    evaluation_dict = task_results(results)
    (stage_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str) + "\n")
    files.append(RESULTS_FILE)
    mean_success = float(np.mean(list(evaluation_dict["success"].values())))

    save_policy(
        sb3_model,
        stage_dir,
        algo=algo,
        env_kwargs=env_kwargs,
        metadata={"repo_id": repo_id, "mean_success": mean_success, "source_zip": run.model_zip.name},
    )
    files += [POLICY_WEIGHTS_FILE, POLICY_CONFIG_FILE]

    has_curve = bool(run.evaluations and run.evaluations.get("mean_success"))
    if has_curve and run.evaluations is not None:
        plot_learning_curve(run.evaluations, stage_dir / CURVE_FILE)
        files.append(CURVE_FILE)
        if include_zip:
            shutil.copy2(run.run_dir / EVALUATIONS_FILE, stage_dir / EVALUATIONS_FILE)
            files.append(EVALUATIONS_FILE)

    video_file, shown_tasks = None, None
    if video is not None:
        shown_tasks = video_tasks if isinstance(video_tasks, list) else loaded.task_names[:video_tasks]
        video_file = f"replay.{video}"
        size = video_size or (256 if video == "mp4" else 128)
        record_replay(
            loaded,
            stage_dir / video_file,
            env_kwargs=env_kwargs,
            tasks=shown_tasks,
            n_steps=video_steps,
            size=size,
            frame_skip=1 if video == "mp4" else 4,
        )
        files.append(video_file)

    train_command, enjoy_command = _commands(run, algo, env_kwargs, repo_id)
    card = build_model_card(
        repo_id=repo_id,
        algo=algo,
        policy=loaded,
        env_kwargs=env_kwargs,
        evaluation=evaluation_dict,
        results=results,
        config=config,
        num_timesteps=int(sb3_model.num_timesteps),
        train_command=train_command,
        enjoy_command=enjoy_command,
        zip_name=zip_name,
        video_file=video_file,
        has_curve=has_curve,
        results_origin=origin,
        video_tasks=shown_tasks,
        seeds=next(
            (d[k] for d in (results, args, config) for k in ("seeds", "seed") if d.get(k) is not None), None
        ),
        notes=notes,
    )
    card.save(stage_dir / "README.md")
    files.append("README.md")
    return StagedRepo(stage_dir, repo_id, algo, env_name, mean_success, files)


# --- upload ----------------------------------------------------------------------------------------------
def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> Any:
    """Create the Hub repo if needed and upload a staged folder in one commit.

    :param folder: the staged folder (:func:`stage_repo`).
    :param repo_id: ``"org/name"``.
    :param token: Hugging Face token (default: ``HF_TOKEN`` or the token saved by ``hf auth login``).
    :param private: create the repo as private.
    :param revision: branch to commit to (default ``main``).
    :param commit_message: commit message.
    :return: huggingface_hub's ``CommitInfo``.
    :raises RuntimeError: without a token, or with ``HF_HUB_OFFLINE=1``.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("HF_HUB_OFFLINE=1 is set: unset it to upload to the Hugging Face Hub.")
    token = token or get_token()
    if not token:
        raise RuntimeError(
            "No Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass --token (a token with write "
            f"access to {repo_id.split('/')[0]!r})."
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        token=token,
        commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} (d2r_sb3)",
    )


# --- bundled pretrained policy ---------------------------------------------------------------------------
def _content_commit(folder: Path) -> str:
    """A 40-hex id for a snapshot: SHA-1 of its file names and contents (same files, same id)."""
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def package_pretrained(
    model: str | Path,
    out_dir: str | Path = PRETRAINED_CACHE,
    *,
    repo_id: str = DEFAULT_REPO_ID,
    load_best: bool = False,
    video: bool = True,
    n_eval_episodes: int = 100,
    video_steps: int | None = None,
    video_tasks: int | list[str] = 3,
    device: str = "cpu",
    notes: str | None = None,
) -> Path:
    """Write a run's policy-only files into a Hugging Face cache layout that :mod:`d2r_sb3.hub` reads offline.

    Produces ``<out_dir>/models--<org>--<name>/refs/main`` (a 40-hex commit id derived from the content) and
    ``snapshots/<commit>/`` with ``policy.safetensors``, ``policy.json``, ``results.json``, ``config.yml``,
    ``env_kwargs.yml``, ``README.md``, ``learning_curve.png`` (if the run has an evaluation history) and a small
    ``replay.gif``. A previous bundle of the same repo id is replaced.

    :param model: the zoo run folder (or zip).
    :param out_dir: the cache folder (default: the package's ``d2r_sb3/pretrained``).
    :param repo_id: repo id the bundle answers to.
    :param load_best: bundle ``best_model.zip`` instead of the final model.
    :param video: include ``replay.gif``.
    :param n_eval_episodes: episodes per task if the run has no ``results.json``.
    :param video_steps: env steps in the GIF (default: one episode).
    :param video_tasks: number of tasks (the first ones) or their names in the GIF.
    :param device: torch device for evaluation and rendering.
    :param notes: Markdown for the model card's "About this run" section.
    :return: the snapshot folder.
    """
    if not is_repo_id(repo_id):
        raise ValueError(f"Invalid repo id {repo_id!r}: expected 'org/name'.")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="d2r-bundle-") as tmp:
        staged = stage_repo(
            model,
            Path(tmp) / "stage",
            repo_id=repo_id,
            load_best=load_best,
            include_zip=False,
            video="gif" if video else None,
            n_eval_episodes=n_eval_episodes,
            video_steps=video_steps,
            video_tasks=video_tasks,
            device=device,
            notes=notes,
        )
        commit = _content_commit(staged.folder)
        repo_folder = out_dir / f"models--{repo_id.replace('/', '--')}"
        if repo_folder.exists():
            shutil.rmtree(repo_folder)
        snapshot = repo_folder / "snapshots" / commit
        shutil.copytree(staged.folder, snapshot)
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / "main").write_text(commit)
    size = sum(p.stat().st_size for p in snapshot.iterdir())
    if size > BUNDLE_SIZE_WARNING:
        import warnings

        warnings.warn(
            f"The bundled policy is {size / 2**20:.1f} MiB; it ships in every wheel. Use a shorter GIF "
            "(video_steps) or video=False.",
            stacklevel=2,
        )
    return snapshot


# --------------------------------------------------------------------------------------------------
# Command-line flags shared by hub/push.py and hub/package_pretrained.py
# --------------------------------------------------------------------------------------------------
def add_staging_arguments(parser: argparse.ArgumentParser, *, replay_file: str) -> None:
    """Add the flags that choose the model, how it is evaluated and rendered, and the card's notes.

    :param parser: the script's parser.
    :param replay_file: name of the replay the script writes (``replay.mp4``, ``replay.gif``), for the help.
    """
    parser.add_argument(
        "--model", required=True, help="Zoo run folder logs/<algo>/<EnvName>_<N> (or one of its zips)"
    )
    parser.add_argument(
        "--load-best", action="store_true", help="Use best_model.zip instead of the final model"
    )
    parser.add_argument("--no-video", action="store_true", help=f"Do not render {replay_file}")
    parser.add_argument(
        "--video-steps", type=int, default=None, help="Env steps in the replay (default: one episode)"
    )
    parser.add_argument(
        "--video-tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="Tasks shown side by side in the replay (default: the first three)",
    )
    parser.add_argument(
        "--n-eval-episodes", type=int, default=100, help="Episodes per task if the run has no results.json"
    )
    parser.add_argument("--device", default="cpu", help="PyTorch device for evaluation and rendering")
    parser.add_argument(
        "--notes",
        default=None,
        metavar="FILE",
        help="Markdown file for the model card's 'About this run' section (e.g. how the run differs from the paper)",
    )


def staging_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`stage_repo` / :func:`package_pretrained` keyword arguments set by :func:`add_staging_arguments`.

    ``video`` is left to the caller (its type differs between the two). Reading ``--notes`` may raise ``OSError``.
    """
    return {
        "load_best": args.load_best,
        "video_steps": args.video_steps,
        "video_tasks": args.video_tasks or 3,
        "n_eval_episodes": args.n_eval_episodes,
        "device": args.device,
        "notes": Path(args.notes).read_text() if args.notes else None,
    }
