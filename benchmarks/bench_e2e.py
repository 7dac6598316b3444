"""End-to-end ``learn()`` on MT10: env steps per second and where the time goes.

    python benchmarks/bench_e2e.py                        # batch 320, 1 thread: the training campaign's setting
    python benchmarks/bench_e2e.py --threads 2 --steps 500 --vec-env subproc

D2R (``D2RSAC``, default MT10 network; then with the opt-in ``train_precision="bfloat16"``) and SB3's ``SAC("MlpPolicy", net_arch=[400, 400, 400])`` learn on the same
MT10 env (one sub-env per task, 10 transitions per vector step), batch ``--batch``, one gradient step per vector
step (the paper preset's ratio).
The clock is split into: env (``VecEnv.step``), acting (policy inference and, for D2R, storing the routes), train
(gradient steps, including replay sampling) and the rest (buffer writes, callbacks, logging).
"""

from __future__ import annotations

import argparse
import time

import torch as th
from _common import add_malloc_flag, machine_lines, markdown_table, set_threads

from d2r_sb3 import D2RSAC, make_mt_env


class Clock:
    """Accumulates the wall time spent inside wrapped callables."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        self.seconds.setdefault(name, 0.0)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


COLUMNS = [
    "model",
    "env steps / s",
    "env",
    "acting",
    "train",
    "other",
    "outside the gradient steps",
    "ms per gradient step",
]
"""The columns of a :func:`run` row."""


def run(name: str, model, env, warmup_steps: int, steps: int) -> list[str]:
    n_envs = env.num_envs
    model.learn(warmup_steps * n_envs)  # fills the buffer past learning_starts and warms every code path
    clock = Clock()
    model.train = clock.wrap("train", model.train)
    model._sample_action = clock.wrap("acting", model._sample_action)
    env.step_wait = clock.wrap("env", env.step_wait)
    start = time.perf_counter()
    model.learn(steps * n_envs, reset_num_timesteps=False)
    total = time.perf_counter() - start
    del model.train, model._sample_action, env.step_wait  # back to the class methods
    parts = {key: clock.seconds[key] for key in ("env", "acting", "train")}
    parts["other"] = total - sum(parts.values())
    share = {key: f"{100 * value / total:.0f} %" for key, value in parts.items()}
    updates_per_s = steps / clock.seconds["train"]
    return [
        name,
        f"{steps * n_envs / total:.0f}",
        share["env"],
        share["acting"],
        share["train"],
        share["other"],
        f"{100 * (total - clock.seconds['train']) / total:.1f} %",
        f"{1000 / updates_per_s:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300, help="timed vector env steps (x10 transitions)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed vector steps first (default: batch / 10 + 30)"
    )
    parser.add_argument("--batch", type=int, default=320, help="the training campaign's batch by default")
    parser.add_argument("--vec-env", default="dummy", choices=["dummy", "subproc"])
    parser.add_argument("--seed", type=int, default=0)
    add_malloc_flag(parser)
    args = parser.parse_args()
    set_threads(args.threads, args.malloc_defaults)
    if args.warmup is None:
        args.warmup = args.batch // 10 + 30  # past learning_starts, then some gradient steps
    from stable_baselines3 import SAC

    rows = []
    d2r_precisions = {
        "D2R (D2RSAC, default MT10 network)": "float32",
        "D2R, train_precision=bfloat16 (opt-in)": "bfloat16",
    }
    for name in ("SB3 SAC, MlpPolicy [400, 400, 400]", *d2r_precisions):
        env = make_mt_env("MT10", seed=args.seed, vec_env=args.vec_env)
        common = dict(batch_size=args.batch, buffer_size=100_000, learning_starts=args.batch, seed=args.seed)
        if name in d2r_precisions:
            model = D2RSAC(
                "D2RPolicy", env, policy_kwargs=dict(train_precision=d2r_precisions[name]), **common
            )
        else:
            model = SAC("MlpPolicy", env, policy_kwargs=dict(net_arch=[400, 400, 400]), **common)
        rows.append(run(name, model, env, args.warmup, args.steps))
        env.close()
    print(
        f"## learn() on MT10, batch {args.batch}, {args.threads} thread(s), {args.vec_env} VecEnv, "
        f"{args.steps} vector steps ({args.steps * 10} env steps)\n"
    )
    print(markdown_table(COLUMNS, rows))
    print("\n" + "\n".join(machine_lines()))


if __name__ == "__main__":
    th.manual_seed(0)
    main()
