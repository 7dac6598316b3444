"""Milliseconds per SAC gradient step: D2R vs SB3's MLP SAC on the same MT10 data (target 1 of issue 6).

    python benchmarks/bench_update.py                 # 2 threads, batch 1280, 7 interleaved repeats
    python benchmarks/bench_update.py --threads 1 --repeats 9

One gradient step = everything ``model.train(gradient_steps, batch_size)`` does per step: replay sampling, actor,
twin critics, targets, entropy coefficient(s), backward, gradient clipping (D2R), Adam, Polyak update and, for
D2R, the per-task routing temperatures. The replay buffers of all models hold the same transitions, collected
on MT10 by the untrained D2R policy. A second table times the actor network alone (forward + backward at
batch 1280 with stored routes and ResRouting): the authors-style dense computation vs the optimised block.
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch as th
from _common import (
    add_malloc_flag,
    interleaved,
    machine_lines,
    machine_record,
    markdown_table,
    median,
    paired_ratio,
    set_threads,
    settle,
)
from naive_d2r import naive_forward

from d2r_sb3 import D2RSAC, MultiTaskSAC, make_mt_env
from d2r_sb3.common import cpu_products
from d2r_sb3.d2r.network import RouteRequest

MLP_ARCH = [400, 400, 400]
D2R = "D2R (D2RSAC, default MT10 network)"
D2R_BF16 = "D2R, train_precision=bfloat16 (mixed precision, opt-in)"
D2R_TORCH_PRODUCTS = "D2R, torch's default products for its dense layers (as SB3's MLP)"


def _with_torch_products(model, steps: int, batch: int) -> None:
    """``model.train`` with the dense layers' products left to torch (``set_cpu_products("default")``)."""
    choice = cpu_products.cpu_products()
    cpu_products.set_cpu_products("default")
    try:
        model.train(steps, batch)
    finally:
        cpu_products.set_cpu_products(choice)


def copy_replay(source, target) -> None:
    """Copy the transitions of one replay buffer into another with the same ``[size, n_envs, ...]`` layout."""
    n = source.buffer_size if source.full else source.pos
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        getattr(target, name)[:n] = getattr(source, name)[:n]
    if getattr(source, "routes", None) is not None and hasattr(target, "routes"):
        target.routes = source.routes.copy()
    target.pos, target.full = n % target.buffer_size, source.full or n == target.buffer_size


def build_models(batch: int, collect_steps: int, seed: int, device: str = "cpu"):
    """MT10 env and the models, whose replay buffers hold the same collected transitions.

    The two D2R models hold the same weights; the second computes its gradient steps in bfloat16 (mixed
    precision, ``train_precision="bfloat16"``, not the default).
    """
    from stable_baselines3 import SAC

    env = make_mt_env("MT10", seed=seed)
    buffer_size = max(collect_steps * env.num_envs, batch) + env.num_envs
    common = dict(batch_size=batch, buffer_size=buffer_size, seed=seed, device=device)
    d2r = D2RSAC("D2RPolicy", env, learning_starts=10**9, **common)
    with warnings.catch_warnings():  # the warning that this learn() makes no gradient step: intended here
        warnings.simplefilter("ignore", UserWarning)
        d2r.learn(collect_steps * env.num_envs)  # collection only (learning_starts is never reached)
    mtsac = MultiTaskSAC(
        "MTSACPolicy", env, learning_starts=0, policy_kwargs=dict(net_arch=MLP_ARCH), **common
    )
    sb3 = SAC("MlpPolicy", env, learning_starts=0, policy_kwargs=dict(net_arch=MLP_ARCH), **common)
    d2r_bf16 = D2RSAC(
        "D2RPolicy",
        env,
        learning_starts=10**9,
        policy_kwargs=dict(train_precision="bfloat16"),
        **common,
    )
    d2r_bf16.policy.load_state_dict(d2r.policy.state_dict())
    for model in (mtsac, sb3, d2r_bf16):
        copy_replay(d2r.replay_buffer, model.replay_buffer)
    for model in (d2r, mtsac, sb3, d2r_bf16):
        model._setup_learn(0)  # a logger, as learn() would have set up
    return env, {
        "SB3 SAC, MlpPolicy [400, 400, 400]": sb3,
        "MT-SAC (MultiTaskSAC, MLP [400, 400, 400])": mtsac,
        D2R: d2r,
        D2R_BF16: d2r_bf16,
    }


def modules_computed(model, batch: int) -> float:
    """The share of (module, sample) pairs the routed blocks computed over one gradient step of ``model``."""
    from d2r_sb3.d2r import routed_block

    build = routed_block.build_row_layout
    counts = [0, 0]

    def counting(sources, *args, **kwargs):
        layout = build(sources, *args, **kwargs)
        n_modules = len(layout.member_sizes) - 1
        counts[0] += layout.starts[n_modules]
        counts[1] += layout.ens * layout.batch * n_modules
        return layout

    routed_block.build_row_layout = counting
    try:
        model.train(1, batch)
    finally:
        routed_block.build_row_layout = build
    return counts[0] / max(counts[1], 1)


def write_json(args: argparse.Namespace, reference: str, records: list[dict]) -> None:
    """The gradient-step table of this run, with its setting and machine, as JSON at ``args.json``."""
    run = {
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "steps": args.steps,
        "reference": reference,
        "models": records,
        "machine": machine_record(),
    }
    with open(args.json, "w") as file:
        json.dump(run, file, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed repeats (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="gradient steps per timed repeat")
    parser.add_argument("--collect", type=int, default=300, help="vector env steps collected for the replay")
    parser.add_argument("--no-network", action="store_true", help="skip the network-only table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=16,
        help="untimed gradient steps per model first (a D2R process's heap reaches its steady size in about a dozen)",
    )
    parser.add_argument(
        "--settle-faults",
        type=int,
        default=100,
        help="after the warm-up, more untimed rounds until no model takes more minor page faults per step than this",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write the gradient-step table as JSON (what bench_targets.py reads)",
    )
    add_malloc_flag(parser)
    args = parser.parse_args()
    set_threads(args.threads, args.malloc_defaults)
    th.manual_seed(args.seed)
    np.random.seed(args.seed)

    env, models = build_models(args.batch, args.collect, args.seed)
    candidates = {name: (lambda m=model: m.train(args.steps, args.batch)) for name, model in models.items()}
    if cpu_products.uses_onednn(th.zeros(1)):
        # The same D2R model with torch's own products, as SB3's MLP computes them: the like-for-like ratio.
        candidates[D2R_TORCH_PRODUCTS] = lambda m=models[D2R]: _with_torch_products(m, args.steps, args.batch)
    warmup = max(1, -(-args.warmup_steps // args.steps))
    interleaved(candidates, 0, warmup=warmup)
    # Then until the heap has settled: the models' allocations interleave, so that takes longer than for one.
    settled = settle(candidates, most_faults=args.settle_faults * args.steps)
    faults: dict[str, list[int]] = {}
    times = interleaved(candidates, args.repeats, warmup=0, faults=faults)
    reference = next(iter(models))
    records = [
        {
            "model": name,
            "ms_per_step": 1000 * median(times[name]) / args.steps,
            "ratio": paired_ratio(times, name, reference),
            "page_faults_per_step": median(faults[name]) / args.steps,
        }
        for name in candidates
    ]
    rows = [
        [r["model"], f"{r['ms_per_step']:.1f}", f"{r['ratio']:.2f}", f"{r['page_faults_per_step']:.0f}"]
        for r in records
    ]
    print(f"## SAC gradient step, batch {args.batch}, {args.threads} thread(s)\n")
    header = ["model", "ms per gradient step", f"ratio to {reference.split(',')[0]}", "page faults per step"]
    print(markdown_table(header, rows))
    print(
        f"\nWarm-up: {warmup * args.steps} steps per model, then {settled} more round(s) of {args.steps} until no "
        f"model's round took more than {args.settle_faults} minor page faults per step."
    )
    if args.json:
        write_json(args, reference, records)
    share = modules_computed(models["D2R (D2RSAC, default MT10 network)"], args.batch)
    print(
        f"\nD2R computed {100 * share:.0f} % of the (module, sample) pairs of a dense block in these steps "
        "(the rest are not reached by the sample's route and are skipped)."
    )

    if not args.no_network:
        d2r = models["D2R (D2RSAC, default MT10 network)"]
        data = d2r.replay_buffer.sample(args.batch)
        net = d2r.policy.actor.net
        state, task_ids = d2r.policy.split_obs(data.observations)
        request = RouteRequest(stored=data.routes.unsqueeze(0), resrouting=True)

        def fast() -> None:
            out, _ = net(state, task_ids, request)
            out.square().sum().backward()

        def naive() -> None:
            naive_forward(net, state, task_ids, request).square().sum().backward()

        net_times = interleaved({"naive": naive, "optimised": fast}, args.repeats, warmup=1)
        net.zero_grad(set_to_none=True)
        print(f"\n## Actor network forward + backward, batch {args.batch} (stored routes, ResRouting)\n")
        print(
            markdown_table(
                ["implementation", "ms", "ratio to naive"],
                [
                    [
                        "naive: dense per-node mix over all earlier modules, plain autograd",
                        f"{1000 * median(net_times['naive']):.1f}",
                        "1.00",
                    ],
                    [
                        "optimised: routed block with hand-written pulling backward",
                        f"{1000 * median(net_times['optimised']):.1f}",
                        f"{paired_ratio(net_times, 'optimised', 'naive'):.2f}",
                    ],
                ],
            )
        )
    print("\n" + "\n".join(machine_lines()))
    env.close()


if __name__ == "__main__":
    main()
