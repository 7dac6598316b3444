"""Where the time of one D2R gradient step goes (torch.profiler), by phase and by kind of work.

    python benchmarks/profile_update.py              # 1 thread, 5 profiled steps, MT10 data, batch 1280
    python benchmarks/profile_update.py --batch 320 --precision bfloat16   # the opt-in mixed precision

Phases are the policy calls of the multi-task SAC update (table in d2r_sb3/common/policies.py; ``q_values_pair``
evaluates the critics for the TD regression and for the actor loss in one pass), the backward pass and the
optimiser steps; inside each phase the self time of every operator is put in one bucket: matrix products,
the routed block's gathers (``embedding_bag``), other tensor operations, and Python/dispatch overhead (the
time spent in the phase that no operator accounts for).

The same steps are first timed without the profiler, and the minor page faults per step are printed for both runs.
The profiler's own allocations keep the process's heap from settling, so under it large outputs often land in
fresh memory: many more page faults per step, whose cost is charged to whichever operator first writes the new
pages (measured at batch 320 with one thread: 1,463-1,746 faults per step under the profiler against 83-147
without, and a ``[2, 640, 400]`` ``mul`` at 1.7 ms per call against 85 us alone). Read elementwise operators on large
tensors with that in mind, and take the speed itself from ``bench_update.py``.
"""

from __future__ import annotations

import argparse
import time

import torch as th
from _common import add_malloc_flag, machine_lines, markdown_table, minor_page_faults, set_threads
from bench_update import D2R_BF16, build_models
from torch.profiler import ProfilerActivity, profile, record_function

# Matrix products: torch's (MKL on a CPU) and oneDNN's, which the ensemble layers call directly on AMD CPUs
# (d2r_sb3.common.cpu_products).
MATMUL = {
    "aten::bmm",
    "aten::baddbmm",
    "aten::baddbmm_",
    "aten::mm",
    "aten::addmm",
    "aten::matmul",
    "mkldnn::_linear_pointwise",
}
GATHER = {"aten::_embedding_bag_forward_only", "aten::embedding_bag", "aten::index_select"}
POLICY_CALLS = ("actor_loss_sample", "target_sample", "target_q_values", "q_values_pair")


def instrument(model) -> None:
    """Wrap the policy calls, the backward pass and the optimiser steps in named profiler ranges."""
    policy = model.policy

    def ranged(name, fn):
        def wrapper(*args, **kwargs):
            with record_function(f"phase: {name}"):
                return fn(*args, **kwargs)

        return wrapper

    for name in POLICY_CALLS:
        setattr(policy, name, ranged(name, getattr(policy, name)))
    for optimizer in (model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer):
        optimizer.step = ranged("optimizer steps", optimizer.step)
    backward = th.Tensor.backward
    th.Tensor.backward = lambda self, *a, **k: ranged("backward", backward)(self, *a, **k)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1280)
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="train_precision of the D2R model",
    )
    add_malloc_flag(parser)
    args = parser.parse_args()
    set_threads(args.threads, args.malloc_defaults)
    env, models = build_models(args.batch, 150, seed=0)
    model = models["D2R (D2RSAC, default MT10 network)" if args.precision == "float32" else D2R_BF16]
    instrument(model)
    model.train(2, args.batch)  # warm-up
    faults = minor_page_faults()
    start = time.perf_counter()
    model.train(args.steps, args.batch)
    plain_ms = (time.perf_counter() - start) / args.steps * 1000
    plain_faults = (minor_page_faults() - faults) / args.steps
    faults = minor_page_faults()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("phase: whole step"):
            model.train(args.steps, args.batch)
    profiled_faults = (minor_page_faults() - faults) / args.steps
    events = prof.events()
    total = next(e for e in events if e.name == "phase: whole step").cpu_time_total / args.steps / 1000

    def phase_of(event) -> str | None:
        node = event
        while node is not None:
            if node.name.startswith("phase: ") and node.name != "phase: whole step":
                return node.name[len("phase: ") :]
            node = node.cpu_parent
        return "other (losses, replay sampling, clipping, target update, routing temperature)"

    buckets: dict[str, dict[str, float]] = {}
    phase_totals: dict[str, float] = {}
    for event in events:
        if event.name.startswith("phase: "):
            if event.name != "phase: whole step":
                key = event.name[len("phase: ") :]
                phase_totals[key] = phase_totals.get(key, 0.0) + event.cpu_time_total
            continue
        phase = phase_of(event)
        if event.name in MATMUL:
            kind = "matmul"
        elif event.name in GATHER:
            kind = "gathers"
        elif event.name.startswith("RoutedBlockFunction"):
            kind = "python"  # the Python bodies of the routed block's forward and backward
        else:
            kind = "other ops"
        buckets.setdefault(phase, {}).setdefault(kind, 0.0)
        buckets[phase][kind] += event.self_cpu_time_total
    rows = []
    order = [*POLICY_CALLS, "backward", "optimizer steps"]
    for phase in [*order, *sorted(set(buckets) - set(order))]:
        parts = {k: v / args.steps / 1000 for k, v in buckets.get(phase, {}).items()}
        in_phase = phase_totals.get(phase, sum(buckets.get(phase, {}).values())) / args.steps / 1000
        python = parts.get("python", 0.0) + max(in_phase - sum(parts.values()), 0.0)
        rows.append(
            [
                phase,
                f"{in_phase:.1f}",
                f"{parts.get('matmul', 0):.1f}",
                f"{parts.get('gathers', 0):.1f}",
                f"{parts.get('other ops', 0):.1f}",
                f"{python:.1f}",
            ]
        )
    print(
        f"## One D2R gradient step ({args.precision}), batch {args.batch}, {args.threads} thread(s): "
        f"{total:.0f} ms under the profiler ({plain_ms:.0f} ms without)\n\n"
        f"Minor page faults per step: {profiled_faults:.0f} under the profiler, {plain_faults:.0f} without "
        "(each fault's cost lands on the operator that first writes the page).\n"
    )
    print(
        markdown_table(
            ["phase", "ms", "matmul", "gathers (embedding_bag)", "other ops", "Python / dispatch"], rows
        )
    )
    print("\nLargest operators (self time per step):\n")
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:30]
    print(
        markdown_table(
            ["operator", "ms per step", "calls per step"],
            [
                [e.key, f"{e.self_cpu_time_total / args.steps / 1000:.1f}", f"{e.count / args.steps:.0f}"]
                for e in top
            ],
        )
    )
    print("\n" + "\n".join(machine_lines()))
    env.close()


if __name__ == "__main__":
    main()
