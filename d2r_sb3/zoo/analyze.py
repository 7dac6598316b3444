"""Routing analysis of a D2R model: modules used per task, routing DAGs and a t-SNE of routes (paper Figs. 6, 8).

Rolls the deterministic policy (TopK routes, as in evaluation) for ``--episodes`` episodes on every task,
records the routing path of every step and writes, into ``--output-dir``:

- ``routing.json``: per task the modules used (mean ± std, histogram), how often each module is active, how
  often each edge is used, the number of distinct paths and the success rate of the same episodes;
- ``routing.md``: the same as a Markdown table (also printed);
- ``modules_per_task.png``: modules used per task, sorted, with error bars (Fig. 8);
- ``routing_graphs.png``: the routing DAG of each task (or of ``--tasks``): candidate edges in grey, used
  edges coloured by how often they are used, modules never active greyed out (Fig. 6 b-d);
- ``routes_tsne.png``: t-SNE of the routing paths, coloured by task (Fig. 6 a).

Examples, from the repository root::

    # the final model of a zoo run (its env: logs/d2r/MT10-rand_1/MT10-rand/env_kwargs.yml)
    python zoo/analyze.py --model logs/d2r/MT10-rand_1 --episodes 5
    # a safe policy folder or a Hub repo id; two tasks side by side, as in the paper's Fig. 6
    python zoo/analyze.py --model d2r-sb3/d2r-MT10-rand --tasks drawer-close peg-insert-side
    # quick look: shorter episodes, 200 t-SNE samples per task; an SB3 zip is a pickle: --allow-pickle (own runs only)
    python zoo/analyze.py --model logs/d2r/MT50-rand_1/MT50-rand.zip --allow-pickle --max-episode-steps 100 \\
        --tsne-samples 200

Runs on the CPU. The t-SNE of 1,000 samples for each of 10 tasks takes about a minute; for MT50, lower
``--tsne-samples``, use ``--embedding pca`` or skip it with ``--tsne-samples 0``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2r_sb3.analysis import analyze_routing, get_router, write_report
from d2r_sb3.analysis.plots import EMBEDDING_METHODS, ROUTE_FEATURES
from d2r_sb3.analysis.routes import resolve_task_index
from d2r_sb3.envs import benchmark_task_names, check_env_kwargs
from d2r_sb3.envs.metaworld import GOAL_MODES, PRESETS
from d2r_sb3.serialization import POLICY_CONFIG_FILE, LoadedPolicy, resolve_model
from d2r_sb3.zoo.utils import (
    MODEL_HELP,
    ZooError,
    add_loading_arguments,
    load_model,
    parse_env,
    parse_key_values,
    run_main,
    set_num_threads,
)

DEFAULT_OUTPUT_NAME = "routing_analysis"
# Options with their own flag; --env-kwargs must not set them a second time.
ENV_FLAGS = {
    "benchmark": "--benchmark",
    "goals": "--goals",
    "preset": "--preset",
    "seed": "--seed",
    "max_episode_steps": "--max-episode-steps",
}
_GENERIC_TASK_NAME = re.compile(r"task\d+")


def _default_model() -> str | None:
    try:
        from d2r_sb3.hub import DEFAULT_REPO_ID
    except ImportError:  # the hub module is optional for this script
        return None
    return DEFAULT_REPO_ID


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones and those the help text already explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Routing analysis of a D2R model: modules used per task, routing DAGs, t-SNE of routes.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--model", default=_default_model(), help=MODEL_HELP)
    parser.add_argument("--load-best", action="store_true", help="Zoo run folder: load the best model")
    parser.add_argument(
        "--benchmark",
        default=None,
        help="MT10, MT50 or comma-separated task names (default: the model's own)",
    )
    parser.add_argument(
        "--goals", default=None, choices=GOAL_MODES, help="Goal mode (default: the model's own)"
    )
    parser.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="Env preset (default: the model's own)"
    )
    parser.add_argument("--seed", type=int, default=None, help="Env seed (default: the model's own)")
    parser.add_argument(
        "--max-episode-steps",
        type=int,
        default=None,
        help="Episode length (default: the model's own / preset's)",
    )
    parser.add_argument(
        "--env-kwargs", nargs="+", default=None, help="More make_mt_env overrides as key:value (YAML values)"
    )
    parser.add_argument(
        "--episodes", type=int, default=5, help="Episodes per task (the paper: 5 x 200 steps)"
    )
    parser.add_argument(
        "--stochastic",
        action="store_true",
        help="Sampled actions and SampleK routes (recorded routes are separate draws from the acting distribution)",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=None, help="Tasks of the routing-DAG picture (default: every task)"
    )
    parser.add_argument(
        "--tsne-samples", type=int, default=1000, help="Routing paths per task in the t-SNE (0: no embedding)"
    )
    parser.add_argument("--embedding", default="tsne", choices=EMBEDDING_METHODS, help="2-D embedding method")
    parser.add_argument(
        "--embedding-features",
        default="edges",
        choices=ROUTE_FEATURES,
        help="Embed the chosen edges (0/1) or the gates' routing probabilities",
    )
    parser.add_argument("--embedding-seed", type=int, default=0, help="Seed of the subsampling and t-SNE")
    parser.add_argument(
        "--tsne-threads",
        type=int,
        default=1,
        help="OpenMP threads of t-SNE (0: all cores; more than 1 helps only on idle cores)",
    )
    parser.add_argument("--no-plots", action="store_true", help="Only write routing.json and routing.md")
    parser.add_argument(
        "-o",
        "--output-dir",
        default=None,
        help=f"Output folder (default: {DEFAULT_OUTPUT_NAME}/ next to a local model, else ./{DEFAULT_OUTPUT_NAME})",
    )
    add_loading_arguments(parser)  # --device (default auto), --allow-pickle
    parser.add_argument(
        "--num-threads", type=int, default=-1, help="PyTorch CPU threads (-1: torch's default)"
    )
    return parser


def default_output_dir(model: str) -> Path:
    """``routing_analysis/`` inside a local model folder, ``routing_analysis_<name>/`` beside a model file,
    ``./routing_analysis`` for a Hub repo id (the rule of :func:`d2r_sb3.serialization.resolve_model`)."""
    try:
        if resolve_model(model).kind == "hub":
            return Path(DEFAULT_OUTPUT_NAME)
    except ValueError:
        return Path(DEFAULT_OUTPUT_NAME)
    path = Path(model).expanduser()
    if path.is_dir():
        return path / DEFAULT_OUTPUT_NAME
    if path.is_file():
        if path.name == POLICY_CONFIG_FILE:
            return path.parent / DEFAULT_OUTPUT_NAME
        return path.parent / f"{DEFAULT_OUTPUT_NAME}_{path.stem}"
    return Path(DEFAULT_OUTPUT_NAME)


def env_overrides(args: argparse.Namespace, loaded: LoadedPolicy) -> dict[str, Any]:
    """make_mt_env keyword arguments that replace the model's saved ones."""
    overrides = parse_key_values(args.env_kwargs, "--env-kwargs")
    try:
        check_env_kwargs(overrides, own_flags=ENV_FLAGS)
    except ValueError as err:
        raise ZooError(str(err)) from None
    flags = {
        "benchmark": parse_env(args.benchmark) if args.benchmark else None,
        "goals": args.goals,
        "preset": args.preset,
        "seed": args.seed,
        "max_episode_steps": args.max_episode_steps,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if "benchmark" not in overrides and "benchmark" not in loaded.env_kwargs:
        overrides["benchmark"] = _benchmark_from_task_names(loaded)
    return overrides


def _benchmark_from_task_names(loaded: LoadedPolicy) -> str | list[str]:
    """The benchmark of a model saved without env kwargs, from its task names."""
    for benchmark in ("MT10", "MT50"):
        if loaded.task_names == benchmark_task_names(benchmark):
            return benchmark
    try:
        benchmark_task_names(loaded.task_names)
    except ValueError:
        raise ZooError(
            f"{loaded.source} was saved without its env settings and its task names {loaded.task_names} are not "
            "Meta-World tasks; pass --benchmark (MT10, MT50 or comma-separated task names)."
        ) from None
    return list(loaded.task_names)


def check_task_order(loaded: LoadedPolicy, env_task_names: Sequence[str]) -> None:
    """The env column ``i`` must be the task of one-hot index ``i`` the model was trained with."""
    if any(_GENERIC_TASK_NAME.fullmatch(name) for name in loaded.task_names):
        return  # saved without real task names: nothing to compare
    if list(env_task_names) != loaded.task_names:
        raise ZooError(
            f"The env's tasks {list(env_task_names)} differ from the model's tasks {loaded.task_names} (same "
            "order needed: the task one-hot says which task the policy solves). Drop --benchmark or pass the "
            "model's tasks."
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: load the model, roll it on every task, write the statistics and the pictures."""
    args = build_parser().parse_args(argv)
    set_num_threads(args.num_threads)
    if args.model is None:
        raise ZooError("pass --model (a safe policy folder, an SB3 .zip, a zoo log folder or a Hub repo id).")
    if args.episodes < 1:
        raise ZooError(f"--episodes must be >= 1, got {args.episodes}.")
    if args.tsne_threads < 0:
        raise ZooError(f"--tsne-threads must be >= 0 (0: all cores), got {args.tsne_threads}.")
    if args.tsne_samples < 0:
        raise ZooError(f"--tsne-samples must be >= 0 (0 skips the embedding), got {args.tsne_samples}.")
    loaded = load_model(args.model, args.load_best, args.device, allow_pickle=args.allow_pickle)
    try:
        get_router(loaded)
    except TypeError as err:
        raise ZooError(f"{args.model} (algo {loaded.algo!r}): {err}") from None

    overrides = env_overrides(args, loaded)
    try:
        env = loaded.make_env(**overrides)
    except (ValueError, TypeError) as err:
        raise ZooError(f"Cannot build the env: {err}") from None
    try:
        check_task_order(loaded, env.task_names)
        for name in args.tasks or []:
            try:
                resolve_task_index(env.task_names, name)
            except ValueError as err:
                raise ZooError(f"--tasks: {err}") from None
        output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model)
        mode = "stochastic (SampleK)" if args.stochastic else "deterministic (TopK)"
        print(
            f"Rolling {loaded!r} on {env.num_envs} tasks: {args.episodes} episodes each, {mode} routes, "
            f"{env.max_episode_steps}-step episodes."
        )
        start = time.time()
        metadata = {
            "model": str(args.model),
            "source": loaded.source,
            "algo": loaded.algo,
            "env_kwargs": env.env_kwargs(),
            "command": shlex.join(["python", "zoo/analyze.py", *(sys.argv[1:] if argv is None else argv)]),
        }
        analysis = analyze_routing(
            loaded, env, n_episodes=args.episodes, deterministic=not args.stochastic, metadata=metadata
        )
    finally:
        env.close()
    print(f"Collected {len(analysis.samples)} routing paths in {time.time() - start:.0f} s.\n")
    print(analysis.markdown())
    print()
    embedding_samples = args.tsne_samples or None
    if embedding_samples and not args.no_plots:
        total = sum(min(embedding_samples, int(n)) for n in analysis.samples.steps_per_task())
        print(f"Embedding {total} routing paths with {args.embedding} ...")
    report = write_report(
        analysis,
        output_dir,
        graph_tasks=args.tasks,
        plots=not args.no_plots,
        embedding_samples_per_task=embedding_samples,
        embedding_method=args.embedding,
        embedding_features=args.embedding_features,
        seed=args.embedding_seed,
        embedding_threads=args.tsne_threads or None,
    )
    for note in report.notes:
        print(f"Note: {note}")
    print(f"Wrote to {output_dir}/: {', '.join(path.name for path in report.files())}")
    return 0


def cli() -> None:
    """The ``d2r-analyze`` console command (and ``python zoo/analyze.py``): :func:`main` with clean error exits."""
    run_main(main)


if __name__ == "__main__":
    cli()
