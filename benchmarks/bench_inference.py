"""Inference latency of the D2R actor: dense (all 16 modules) vs compute skipping (target 2 of issue 6).

    python benchmarks/bench_inference.py                       # a freshly initialised MT10 policy
    python benchmarks/bench_inference.py --model logs/d2r/MT10-rand_1/best_model.zip   # a trained one

Observations are real MT10 observations (resets and random-action steps of every task). Deterministic actions
(TopK routes), timed per call of ``policy.actor`` under ``torch.no_grad`` and of ``policy.predict`` (numpy in
and out, what ``evaluate``/``enjoy`` call). "dense" sets ``skip_max_batch = 0``, so every module is computed by
the regular batched forward; "skipping" is the default (``skip_max_batch = 4``): only the modules that the route
reaches from the output are computed. "dense, same lean path" computes all modules through the skipping code,
which separates the gain of skipping modules from that of the lighter code path. Actions are checked to be
equal (allclose) between dense and skipping for every observation.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch as th
from _common import interleaved, machine_lines, markdown_table, median, paired_ratio, set_threads

from d2r_sb3 import make_mt_env
from d2r_sb3.d2r import D2RPolicy, skipping


def collect_observations(env, steps: int, seed: int) -> np.ndarray:
    """``[(steps + 1) * T, obs_dim]`` observations: a reset, then ``steps`` uniform-random actions."""
    rng = np.random.default_rng(seed)
    obs = [env.reset()]
    for _ in range(steps):
        actions = rng.uniform(-1.0, 1.0, (env.num_envs, *env.action_space.shape)).astype(np.float32)
        obs.append(env.step(actions)[0])
    return np.concatenate(obs).astype(np.float32)


def load_actor_policy(model: str | None, env, seed: int) -> D2RPolicy:
    if model is None:
        th.manual_seed(seed)
        return D2RPolicy(env.observation_space, env.action_space, lambda _: 3e-4, num_tasks=env.num_envs)
    from d2r_sb3 import load_policy

    policy = load_policy(model, allow_pickle=True).policy  # your own trained model
    if not isinstance(policy, D2RPolicy):
        raise SystemExit(f"--model must hold a D2R policy, got {type(policy).__name__}.")
    return policy


def check_skipping_matches_dense(actor: th.nn.Module, single: list[th.Tensor]) -> np.ndarray:
    """Assert that skipping gives the dense actions; the number of modules each observation needed."""
    with th.no_grad():
        actor.skip_max_batch = 0
        dense_actions = th.cat([actor(o, deterministic=True) for o in single])
        actor.skip_max_batch = 4
        skip_actions, computed = [], []
        for o in single:
            skip_actions.append(actor(o, deterministic=True))
            computed.append(actor.last_modules_computed)
    th.testing.assert_close(th.cat(skip_actions), dense_actions, rtol=1e-5, atol=1e-6)
    return np.array(computed)


def modules_computed(actor: th.nn.Module, batches: list[th.Tensor]) -> list[int]:
    """Modules the skipping path computed for each batch."""
    with th.no_grad():
        actor.skip_max_batch = max(4, batches[0].shape[0])
        mods = []
        for o in batches:
            actor(o, deterministic=True)
            mods.append(actor.last_modules_computed)
        actor.skip_max_batch = 4
    return mods


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="a trained D2R model (anything d2r_sb3.load_policy reads)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: batch-1 control is serial)")
    parser.add_argument("--steps", type=int, default=20, help="random-action env steps for the observations")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(args.threads)

    env = make_mt_env("MT10", seed=args.seed)
    observations = collect_observations(env, args.steps, args.seed)
    env.close()
    policy = load_actor_policy(args.model, env, args.seed)
    policy.set_training_mode(False)
    actor, net = policy.actor, policy.actor.net
    obs_t = th.as_tensor(observations)
    single = [obs_t[i : i + 1] for i in range(len(obs_t))]
    batches10 = [obs_t[i : i + 10] for i in range(0, len(obs_t) - 9, 10)]

    # Correctness first: the same actions with and without skipping, and the modules each observation needs.
    computed = check_skipping_matches_dense(actor, single)
    few = [o for o, c in zip(single, computed, strict=True) if c <= 5]

    def actor_loop(
        batches: list[th.Tensor], skip_max_batch: int, lean_dense: bool = False
    ) -> Callable[[], None]:
        def run() -> None:
            actor.skip_max_batch = skip_max_batch
            reachable = skipping.reachable_modules
            if lean_dense:  # the skipping code path, told that every module is reachable
                skipping.reachable_modules = lambda graph, route_list: set(range(net.n_modules))
            with th.no_grad():
                for o in batches:
                    actor(o, deterministic=True)
            skipping.reachable_modules = reachable
            actor.skip_max_batch = 4

        return run

    def predict_loop(batches: list[np.ndarray], skip_max_batch: int) -> Callable[[], None]:
        def run() -> None:
            actor.skip_max_batch = skip_max_batch
            for o in batches:
                policy.predict(o, deterministic=True)
            actor.skip_max_batch = 4

        return run

    rows = []
    cases = [("batch 1, all observations", single), ("batch 10 (one step of MT10)", batches10)]
    if few and len(few) < len(single):
        cases.insert(1, ("batch 1, routes using <= 5 modules", few))
    elif not few:
        print("(no observation uses <= 5 modules with this policy: that row is left out)\n")
    for label, batches in cases:
        candidates = {
            "dense": actor_loop(batches, 0),
            "dense, same lean path": actor_loop(batches, 4, lean_dense=True),
            "skipping": actor_loop(batches, 4),
        }
        if batches[0].shape[0] > 4:  # skipping is for small batches only (skip_max_batch = 4)
            candidates = {"dense": actor_loop(batches, 0), "skipping": actor_loop(batches, 10)}
        times = interleaved(candidates, args.repeats, warmup=1)
        us = {name: 1e6 * median(t) / len(batches) for name, t in times.items()}
        mods = modules_computed(actor, batches)
        row = [
            label,
            f"{us['dense']:.0f}",
            f"{us['dense, same lean path']:.0f}" if "dense, same lean path" in us else "-",
            f"{us['skipping']:.0f}",
            f"{np.mean(mods):.2f}",
            f"{1 / paired_ratio(times, 'skipping', 'dense'):.2f}",
        ]
        row.append(
            f"{1 / paired_ratio(times, 'skipping', 'dense, same lean path'):.2f}"
            if "dense, same lean path" in times
            else "-"
        )
        rows.append(row)
    print(
        f"## D2R actor inference, deterministic ({'trained: ' + args.model if args.model else 'fresh policy'})\n"
    )
    print(
        markdown_table(
            [
                "case",
                "dense µs",
                "dense, lean path µs",
                "skipping µs",
                "mean modules computed",
                "speed-up vs dense",
                "speed-up vs lean dense",
            ],
            rows,
        )
    )

    obs_np = [o.numpy() for o in single]
    times = interleaved({"dense": predict_loop(obs_np, 0), "skipping": predict_loop(obs_np, 4)}, args.repeats)
    print(
        "\n"
        + markdown_table(
            ["policy.predict, batch 1 (numpy in/out)", "dense µs", "skipping µs", "speed-up"],
            [
                [
                    "all observations",
                    f"{1e6 * median(times['dense']) / len(obs_np):.0f}",
                    f"{1e6 * median(times['skipping']) / len(obs_np):.0f}",
                    f"{1 / paired_ratio(times, 'skipping', 'dense'):.2f}",
                ]
            ],
        )
    )
    hist = np.bincount(computed, minlength=net.n_modules + 1)
    print(
        f"\nModules computed per observation (batch 1, {len(single)} observations): mean {computed.mean():.2f}; "
        + ", ".join(f"{k}: {v}" for k, v in enumerate(hist) if v)
    )
    print("Actions with skipping equal the dense actions (allclose, rtol 1e-5) for every observation.")
    print("\n" + "\n".join(machine_lines()))


if __name__ == "__main__":
    main()
