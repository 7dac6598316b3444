"""Does bfloat16 training keep D2R's learning curve? A short MT10 run per precision, same seed and budget.

    python benchmarks/bf16_learning.py                       # 150k env steps each, batch 320, 1 thread
    python benchmarks/bf16_learning.py --steps 300000 --eval-every 50000 --batch 1280

Both runs start from the same initial weights, env seed and replay seed; they differ only in
``D2RPolicy(train_precision=...)`` (the five network calls of a gradient step in float32 or bfloat16; acting and
evaluation are float32 in both). Every ``--eval-every`` env steps (summed over tasks) both policies are evaluated
on a separate MT10 env (deterministic, ``--eval-episodes`` per task): mean success over tasks, mean return, and
the training wall-clock so far. One seed and a short budget: this can show a gross difference, not equivalence
at the paper's 15M steps.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch as th
from _common import machine_lines, markdown_table, set_threads

from d2r_sb3 import D2RSAC, evaluate_per_task, make_mt_env

PRECISIONS = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150_000, help="env steps per run, summed over tasks")
    parser.add_argument("--eval-every", type=int, default=50_000, help="env steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes per task of each evaluation")
    parser.add_argument("--batch", type=int, default=320)
    parser.add_argument("--learning-starts", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.eval_every < 1 or args.steps < args.eval_every:
        parser.error("--eval-every must be in [1, --steps]")

    # The same initial weights for both runs: build one model and copy its policy into the other.
    models, envs = {}, {}
    for precision in PRECISIONS:
        envs[precision] = make_mt_env("MT10", goals="rand", preset="paper", seed=args.seed)
        models[precision] = D2RSAC(
            "D2RPolicy",
            envs[precision],
            batch_size=args.batch,
            learning_starts=args.learning_starts,
            seed=args.seed,
            policy_kwargs=dict(train_precision=precision),
        )
    models["bfloat16"].policy.load_state_dict(models["float32"].policy.state_dict())

    rows = []
    wall = dict.fromkeys(PRECISIONS, 0.0)
    for precision, model in models.items():
        # Each run gets its own eval env built with the same seed: both are scored on the same goals.
        eval_env = make_mt_env("MT10", goals="rand", preset="paper", seed=args.seed + 1)
        th.manual_seed(args.seed)  # same action / route noise stream at the start of both runs
        np.random.seed(args.seed)  # same replay sampling
        done = 0
        while done < args.steps:
            chunk = min(args.eval_every, args.steps - done)
            start = time.perf_counter()
            model.learn(chunk, reset_num_timesteps=done == 0)
            wall[precision] += time.perf_counter() - start
            done += chunk
            result = evaluate_per_task(model, eval_env, args.eval_episodes)
            rows.append(
                [
                    precision,
                    f"{model.num_timesteps:,}",
                    f"{model._n_updates:,}",
                    f"{result.mean_success:.2f}",
                    f"{float(result.mean_return.mean()):.1f}",
                    ", ".join(f"{s:.1f}" for s in result.success),
                    f"{wall[precision]:.0f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
        envs[precision].close()
        eval_env.close()

    print(
        f"\n## D2R on MT10 (paper preset, Rand goals), float32 vs bfloat16 training, seed {args.seed}, "
        f"batch {args.batch}, {args.eval_episodes} deterministic eval episodes per task\n"
    )
    print(
        markdown_table(
            [
                "train_precision",
                "env steps",
                "updates",
                "mean success",
                "mean return",
                "success per task (MT10 order)",
                "train wall-clock (s)",
            ],
            rows,
        )
    )
    print("\n" + "\n".join(machine_lines()))


if __name__ == "__main__":
    main()
