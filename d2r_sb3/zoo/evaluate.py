"""Evaluate a multi-task policy on every task: per-task success table (Markdown) and an optional JSON file.

Examples, from the repository root::

    python zoo/evaluate.py                                             # the bundled pretrained MT10 policy
    python zoo/evaluate.py --model logs/d2r/MT10-rand_1 --load-best --episodes 100 -o results.json
    python zoo/evaluate.py --model my_policy_folder --goals fixed --seed 1

The protocol is the one of training's evaluation: one env per task built from the model's env settings (same
seed unless ``--seed``), ``--episodes`` episodes per task, success = success at any step of an episode,
deterministic policy unless ``--stochastic``. When the policy carries the evaluation recorded with it (a published
policy's ``results.json``, a run's final evaluation) and the protocol is the same, the command says whether every
task's success rate was reproduced.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from d2r_sb3.common.evaluation import TaskEvaluation, evaluate_per_task
from d2r_sb3.common.provenance import hardware, versions
from d2r_sb3.envs import make_mt_env, short_task_name
from d2r_sb3.zoo.utils import (
    HelpFormatter,
    ZooError,
    add_model_arguments,
    load_model,
    model_env_kwargs,
    parse_key_values,
    run_main,
    set_num_threads,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Evaluate a multi-task policy on every task of its benchmark (per-task success rates).",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--episodes", type=int, default=100, help="Episodes per task")
    parser.add_argument("--vec-env", default="dummy", choices=["dummy", "subproc"], help="VecEnv type")
    parser.add_argument("-o", "--output", metavar="JSON", help="Also write the results to this JSON file")
    return parser


def compare_with_recorded(
    loaded: Any, result: TaskEvaluation, deterministic: bool, same_env: bool
) -> tuple[bool | None, str] | None:
    """Set this evaluation beside the one recorded with the policy (its ``results.json``), if any.

    Under the recorded protocol (same episodes per task, same determinism, the policy's own env settings and seed)
    the evaluation is deterministic, so every task's success rate should be equal; under another protocol the
    recorded mean is only shown.

    :return: ``(reproduced, line to print)`` (``reproduced`` is ``None`` when the protocols differ), or ``None``
        when no evaluation was recorded with the policy.
    """
    record = loaded.evaluation
    if record is None:
        return None
    head = f"Recorded evaluation ({record.path.name}, {record.episodes_per_task} episodes per task)"
    if not (
        same_env and deterministic == record.deterministic and result.episodes == record.episodes_per_task
    ):
        return None, f"{head}: mean success {record.mean_success:.3f} (another protocol: not compared)."
    measured = dict(zip(loaded.task_names, (float(rate) for rate in result.success), strict=True))
    differing = [task for task in loaded.task_names if abs(measured[task] - record.success[task]) > 1e-9]
    if not differing:
        return True, f"{head}: reproduced exactly, every task's success rate is the recorded one."
    listed = ", ".join(
        f"{short_task_name(task)} {record.success[task]:.2f} -> {measured[task]:.2f}" for task in differing
    )
    return False, f"{head}: differs on {len(differing)} task(s) (recorded -> now): {listed}."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.episodes < 1:
        raise ZooError(f"--episodes must be >= 1, got {args.episodes}.")
    set_num_threads(args.num_threads)
    loaded = load_model(args.model, args.load_best, args.device, allow_pickle=args.allow_pickle)
    overrides = parse_key_values(args.env_kwargs, "--env-kwargs")
    flags = {"seed": args.seed, "goals": args.goals, "vec_env": args.vec_env}
    overrides.update({key: value for key, value in flags.items() if value is not None})
    env_kwargs = model_env_kwargs(loaded, overrides)
    try:
        env = make_mt_env(**env_kwargs)
    except (ValueError, TypeError) as err:
        raise ZooError(f"Cannot build the env: {err}") from None
    if env.num_tasks != loaded.num_tasks or env.observation_space.shape != loaded.observation_space.shape:
        raise ZooError(
            f"The env ({env.num_tasks} tasks, observations {env.observation_space.shape}) does not match the policy "
            f"({loaded.num_tasks} tasks, {loaded.observation_space.shape})."
        )
    deterministic = not args.stochastic
    print(
        f"Evaluating {loaded.source} on {env!r}: {args.episodes} episodes per task, "
        f"{'deterministic' if deterministic else 'stochastic'} policy"
    )
    start = time.time()
    result = evaluate_per_task(loaded, env, n_episodes=args.episodes, deterministic=deterministic)
    seconds = time.time() - start
    env.close()
    print(result.markdown())
    # The recorded protocol: the policy's own env settings and seed (how the envs are stepped does not matter).
    same_env = all(
        loaded.env_kwargs.get(key) == value for key, value in overrides.items() if key != "vec_env"
    )
    comparison = compare_with_recorded(loaded, result, deterministic, same_env)
    if comparison is not None:
        print(comparison[1])
    if args.output:
        output = Path(args.output)
        write_json(
            output,
            {
                "model": loaded.source,
                "algo": loaded.algo,
                "env_kwargs": env.env_kwargs(),
                **result.to_dict(),
                "episodes_per_task": result.episodes,
                **({"reproduces_recorded": comparison[0]} if comparison is not None else {}),
                "wall_clock_s": round(seconds, 1),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(),
                "hardware": hardware(),
            },
        )
        print(f"Wrote {output}")
    return 0


def cli() -> None:
    """The ``d2r-evaluate`` console command (and ``python zoo/evaluate.py``): :func:`main` with clean error exits."""
    run_main(main)


if __name__ == "__main__":
    cli()
