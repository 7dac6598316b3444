"""The model card (``README.md``) of a published policy: metadata, results, published anchors, usage.

The card's text is the Jinja template ``templates/model_card.md`` in this package; :func:`build_model_card`
computes its fields.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import numpy as np
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from d2r_sb3.common.provenance import versions
from d2r_sb3.envs import short_task_name
from d2r_sb3.publishing.environment import benchmark_label, protocol
from d2r_sb3.registry import METHODS
from d2r_sb3.serialization.loaded_policy import LoadedPolicy

__all__ = ["ALGO_TITLES", "ANCHORS", "MODEL_CARD_TEMPLATE", "build_model_card"]

MODEL_CARD_TEMPLATE = (
    resources.files("d2r_sb3.publishing").joinpath("templates/model_card.md").read_text(encoding="utf-8")
)
"""The card's Jinja template (``d2r_sb3/publishing/templates/model_card.md``)."""
ALGO_TITLES = {name: method.title for name, method in METHODS.items()}
REPRODUCE_INTRO = "Reproduce with the zoo (the training command of this run, then evaluation of this policy):"
"""The sentence before the card's commands, for a run trained from scratch."""
"""The title of each registered method (:attr:`d2r_sb3.registry.Method.title`)."""

# Published success rates on the same benchmarks, for the card's comparison table: (method, fixed goals, random
# goals, where the number comes from).
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
    commands_intro: str = REPRODUCE_INTRO,
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
    :param commands_intro: the sentence before the commands (:data:`REPRODUCE_INTRO` for a run trained from
        scratch; a run restarted from a resume seed says so, since its commands do not rebuild it alone).
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
    mean_success = float(np.mean(list(evaluation["success"].values())))
    mean_reward = _mean_reward(evaluation)
    fields = {
        **_results_fields(algo, env_kwargs, evaluation, mean_success, mean_reward),
        **_comparison_fields(env_kwargs, evaluation, results, num_timesteps, seeds, mean_success),
        **_model_fields(policy),
        **_usage_fields(repo_id, algo, env_kwargs, zip_name),
        "results_origin": results_origin,
        "has_curve": has_curve,
        "video_file": video_file,
        "video_tasks": ", ".join(short_task_name(name) for name in video_tasks or []),
        "notes": notes.strip() if notes else None,
        "commands_intro": commands_intro,
        "train_command": train_command,
        "enjoy_command": enjoy_command,
        "run_record": _run_record(results),
        "config_yaml": yaml.safe_dump(config, sort_keys=False).strip()
        if config
        else "# config.yml was not found",
        "d2r_bibtex": D2R_BIBTEX,
        "sb3_bibtex": SB3_BIBTEX,
    }
    card_data = _card_data(repo_id, algo, env_kwargs, mean_success, mean_reward)
    return ModelCard.from_template(card_data, template_str=MODEL_CARD_TEMPLATE, **fields)


def _usage_fields(
    repo_id: str, algo: str, env_kwargs: dict[str, Any], zip_name: str | None
) -> dict[str, Any]:
    """The "Usage" section: the repo to load, and the SB3 zip with the class that loads it."""
    method = METHODS.get(algo)
    return {
        "repo_id": repo_id,
        "zip_name": zip_name,
        "algo_class": method.algo_class.__name__ if method else "MultiTaskSAC",
        "env_kwargs_repr": repr({k: v for k, v in env_kwargs.items() if v is not None}),
    }


def _card_data(
    repo_id: str, algo: str, env_kwargs: dict[str, Any], mean_success: float, mean_reward: str
) -> ModelCardData:
    """The card's YAML header: library, tags and the model-index with the measured success rate."""
    benchmark = benchmark_label(env_kwargs)
    goals = env_kwargs.get("goals", "rand")
    dataset_type = f"Meta-World/{benchmark}"
    dataset_name = f"Meta-World {benchmark} ({goals} goals, {env_kwargs.get('preset', 'paper')} preset)"
    metrics: list[tuple[str, Any, str]] = [("success_rate", round(mean_success, 4), "mean success rate")]
    if mean_reward != "n/a":
        metrics.append(("mean_reward", mean_reward, "mean_reward"))
    return ModelCardData(
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


def _results_fields(
    algo: str, env_kwargs: dict[str, Any], evaluation: dict[str, Any], mean_success: float, mean_reward: str
) -> dict[str, Any]:
    """The title and the "Results" section."""
    return {
        "algo_title": ALGO_TITLES.get(algo, algo),
        "benchmark": benchmark_label(env_kwargs),
        "goals": env_kwargs.get("goals", "rand"),
        "preset": env_kwargs.get("preset", "paper"),
        "num_tasks": len(evaluation["success"]),
        "mean_success": mean_success,
        "mean_reward": mean_reward,
        "episodes": evaluation.get("episodes", "?"),
        "results_table": _markdown_results(evaluation),
    }


def _comparison_fields(
    env_kwargs: dict[str, Any],
    evaluation: dict[str, Any],
    results: dict[str, Any],
    num_timesteps: int | None,
    seeds: Any,
    mean_success: float,
) -> dict[str, Any]:
    """The "Published numbers" section (this model's row next to the anchors) and the training budget."""
    num_tasks = len(evaluation["success"])
    goals = env_kwargs.get("goals", "rand")
    this_rate = f"**{mean_success:.3f}**"
    return {
        "versions": results.get("versions") or versions(),
        "protocol": protocol(env_kwargs),
        "steps_text": (
            f"{num_timesteps:,} in total ({num_timesteps // num_tasks:,} per task)"
            if num_timesteps
            else "unknown"
        ),
        "seeds_text": f"seeds {seeds}" if isinstance(seeds, list) else f"seed {seeds}, one run",
        "this_fixed": this_rate if goals == "fixed" else "",
        "this_rand": this_rate if goals != "fixed" else "",
        "anchors": ANCHORS.get(benchmark_label(env_kwargs), []),
    }


def _model_fields(policy: LoadedPolicy) -> dict[str, Any]:
    """The "Model" section: parameter counts, policy class and its constructor arguments."""
    module = policy.policy
    actor_params = sum(p.numel() for p in module.actor.parameters())
    n_critics = int(getattr(module, "n_critics", 2))
    critics_total = sum(p.numel() for p in module.critic.parameters())
    return {
        "actor_params": actor_params,
        "critic_params": critics_total // max(n_critics, 1),
        "n_critics": n_critics,
        "total_params": actor_params + critics_total,
        "policy_class": type(module).__name__,
        "policy_kwargs": _inline(_plain_policy_kwargs(policy)),
    }


# results.json keys that the card shows elsewhere (or that are too long for the run record's table).
_NOT_IN_RUN_RECORD = {
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


def _run_record(results: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, _inline(value)) for key, value in results.items() if key not in _NOT_IN_RUN_RECORD]


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


def _plain_policy_kwargs(policy: LoadedPolicy) -> dict[str, Any]:
    params = policy.policy._get_constructor_parameters()
    drop = ("observation_space", "action_space", "optimizer_class", "optimizer_kwargs", "normalize_images")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if k not in drop}


def _inline(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", " ")
