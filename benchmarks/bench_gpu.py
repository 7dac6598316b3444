"""GPU throughput: gradient steps per second and end-to-end learn() with SubprocVecEnv (target 3 of issue 6).

    python benchmarks/bench_gpu.py                    # on CUDA when available
    python benchmarks/bench_gpu.py --device cpu --repeats 2 --steps 2 --e2e-steps 20    # check the script on a CPU

Table 1: milliseconds per gradient step (and steps per second) of D2R and SB3's MLP SAC at batch 1280 (MT10)
and 6400 (MT50-sized batch on the same data), timed with the device synchronised before every clock read.
Table 2 (CUDA only): the GPU's work per gradient step: how many operations (kernels, copies) it ran and how long it was
busy with them, against the step's time from table 1 (a low busy share: the step is bound by launching them).
Table 3: ``learn()`` on MT10 with one subprocess per task (``SubprocVecEnv``): env steps per second and the time
split between env, acting and training, so one can see what a full 15M-step MT10 run costs on this GPU.

On a GPU the routed block's backward pass pushes gradients with ``index_add_`` instead of pulling them by
module, so a D2R step reads nothing back to the host (see tests/test_speed_equivalence.py); replay sampling is
SB3's (a host-to-device copy of the batch per step).
"""

from __future__ import annotations

import argparse

import torch as th
from _common import interleaved, machine_lines, markdown_table, median, paired_ratio, set_threads
from bench_e2e import COLUMNS as E2E_COLUMNS
from bench_e2e import run as run_e2e
from bench_update import D2R, D2R_BF16, build_models
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from d2r_sb3 import D2RSAC, make_mt_env

PAPER_UPDATES = 1_500_000  # MT10: 15M env steps, one gradient step per vector step of 10 envs
D2R_PRECISION = {D2R: "float32", D2R_BF16: "bfloat16"}  # the D2R rows that --precisions chooses between


def gpu_work(model, batch: int, steps: int) -> tuple[float, float]:
    """Operations the GPU ran per gradient step (kernels, copies, fills) and the milliseconds it was busy with
    them, from ``steps`` profiled steps. A busy share far below 1 means the step waits on the host launching its
    operations, not on the GPU's arithmetic."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.train(steps, batch)
        th.cuda.synchronize()
    ops = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
    busy_us = sum(event.time_range.elapsed_us() for event in ops)  # one stream: operations do not overlap
    return len(ops) / steps, busy_us / 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if th.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (env processes use their own)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1280, 6400])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="gradient steps per timed repeat")
    parser.add_argument(
        "--e2e-steps", type=int, default=300, help="timed vector env steps of learn() (0: skip table 3)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32", "bfloat16"],
        help="train_precision of the D2R rows of table 1",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    device = th.device(args.device)
    sync = th.cuda.synchronize if device.type == "cuda" else None
    if device.type != "cuda":
        print(f"NOTE: no CUDA device used (device={device}); these numbers check the script, not a GPU.\n")

    rows: list[list] = []
    work_rows: list[list] = []
    for batch in args.batches:
        env, models = build_models(batch, max(batch // 10 + 10, 150), args.seed, device=str(device))
        chosen = {
            name: model
            for name, model in models.items()
            if not name.startswith("MT-SAC")
            and D2R_PRECISION.get(name, args.precisions[0]) in args.precisions
        }
        candidates = {
            name: (lambda m=model, b=batch: m.train(args.steps, b)) for name, model in chosen.items()
        }
        times = interleaved(candidates, args.repeats, warmup=2, sync=sync)
        reference = next(iter(chosen))
        for name, model in chosen.items():
            ms = 1000 * median(times[name]) / args.steps
            if device.type == "cuda":
                operations, busy_ms = gpu_work(model, batch, args.steps)
                work_rows.append(
                    [name, batch, f"{operations:.0f}", f"{busy_ms:.2f}", f"{ms:.2f}", f"{busy_ms / ms:.0%}"]
                )
            hours = PAPER_UPDATES * ms / 1000 / 3600
            rows.append(
                [
                    name,
                    batch,
                    f"{ms:.2f}",
                    f"{1000 / ms:.0f}",
                    f"{paired_ratio(times, name, reference):.2f}",
                    f"{hours:.1f}",
                ]
            )
        env.close()
    print(f"## Gradient steps on {th.cuda.get_device_name(device) if device.type == 'cuda' else device}\n")
    print(
        markdown_table(
            [
                "model",
                "batch",
                "ms per step",
                "steps / s",
                "ratio to SB3 SAC",
                "hours for 1.5M steps (training only)",
            ],
            rows,
        )
    )

    if device.type == "cuda":
        print("\n## GPU work per gradient step (torch.profiler)\n")
        columns = ["model", "batch", "GPU operations", "GPU busy ms", "ms per step (table 1)", "busy share"]
        print(markdown_table(columns, work_rows))
    if args.e2e_steps <= 0:
        print("\n" + "\n".join(machine_lines()))
        return

    from stable_baselines3 import SAC

    e2e_rows = []
    for name in ("SB3 SAC, MlpPolicy [400, 400, 400]", "D2R (D2RSAC, default MT10 network)"):
        env = make_mt_env("MT10", seed=args.seed, vec_env="subproc")
        common = dict(
            batch_size=1280, buffer_size=100_000, learning_starts=1280, seed=args.seed, device=str(device)
        )
        if name.startswith("D2R"):
            model = D2RSAC("D2RPolicy", env, **common)
        else:
            model = SAC("MlpPolicy", env, policy_kwargs=dict(net_arch=[400, 400, 400]), **common)
        e2e_rows.append(run_e2e(name, model, env, 130, args.e2e_steps))
        env.close()
    print(f"\n## learn() on MT10 with SubprocVecEnv, batch 1280, {args.e2e_steps} vector steps\n")
    print(markdown_table(E2E_COLUMNS, e2e_rows))
    print("\n" + "\n".join(machine_lines()))


if __name__ == "__main__":
    main()
