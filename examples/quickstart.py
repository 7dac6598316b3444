"""Quickstart: build Meta-World MT10 and run a short D2R training loop on CPU.

    python examples/quickstart.py --steps 3000

It builds the 10-task env (paper preset, continuous random goals), trains D2RSAC with the paper's network
for a few thousand env steps (a smoke run, far from the paper's 15M), saves the model, reloads it and
reports the per-task success of one deterministic episode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from d2r_sb3 import D2RSAC, make_mt_env


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", default="MT10", help="MT10, MT50 or a comma-separated task list")
    parser.add_argument("--steps", type=int, default=3000, help="env steps summed over tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default="d2r_quickstart", help="where to save the model (.zip)")
    args = parser.parse_args()
    benchmark = args.benchmark if args.benchmark in ("MT10", "MT50") else args.benchmark.split(",")

    env = make_mt_env(benchmark, goals="rand", preset="paper", seed=args.seed)
    T = env.num_tasks
    # Paper network and batch; a short warm-up so that a few hundred updates happen in a quick run.
    model = D2RSAC("D2RPolicy", env, learning_starts=100 * T, seed=args.seed, verbose=1)
    start = time.time()
    model.learn(total_timesteps=args.steps, log_interval=1000)
    print(
        f"trained {model.num_timesteps} env steps ({model._n_updates} updates) in {time.time() - start:.0f} s"
    )
    model.save(args.save)
    model = D2RSAC.load(args.save, env=env, buffer_size=1)

    obs = env.reset()
    finished = np.zeros(T, dtype=bool)
    success = np.zeros(T)
    modules = []
    while not finished.all():
        actions, _ = model.predict(obs, deterministic=True)
        modules.append(model.policy.route(obs).num_active.float().mean().item())
        obs, _, dones, infos = env.step(actions)
        for i in np.flatnonzero(dones & ~finished):
            success[i] = infos[i]["is_success"]
            finished[i] = True
    for name, s in zip(env.task_names, success, strict=True):
        print(f"{name:28s} success {s:.0f}")
    print(f"mean success {success.mean():.2f}; modules used per step {np.mean(modules):.1f} of 16")
    env.close()


if __name__ == "__main__":
    main()
