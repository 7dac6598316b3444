"""Train a multi-task agent on Meta-World MT10 / MT50 (an rl-baselines3-zoo style CLI).

Examples, from the repository root::

    # D2R, MT10 with random goals, the paper's settings (d2r_sb3/zoo/hyperparams/d2r.yml, section MT10-paper)
    python zoo/train.py --algo d2r --env MT10 --goals rand --preset paper --seed 0
    # a quick run with overridden hyperparameters and env settings
    python zoo/train.py --algo d2r --env MT10 -n 200000 --hyperparams batch_size:640 policy_kwargs:"{routing: soft}" \\
        --env-kwargs max_episode_steps:100
    # a checkpoint every 10 minutes; after a crash, continue the run exactly where its last checkpoint was taken
    python zoo/train.py --algo d2r --env MT50 --save-interval-minutes 10
    python zoo/train.py --resume logs/d2r/MT50-rand_1
    # when a run's folder is lost: keep a small resume seed of it (weights, log alpha, counters; ~14 MB on MT10),
    # then start a new run from it (fresh optimisers, replay buffer refilled by the loaded policy)
    python zoo/train.py --write-seed logs/d2r/MT10-rand_1 --allow-pickle -o seeds/MT10-rand-1M.safetensors
    python zoo/train.py --algo d2r --env MT10 --warm-start seeds/MT10-rand-1M.safetensors -n 4000000

A run writes ``<log-folder>/<algo>/<EnvName>_<N>/`` (EnvName = ``MT10-rand``, or ``MT10-rand-mw3`` for another preset):
``<EnvName>.zip`` (final model), ``best_model.zip``, ``policy/`` and ``best_policy/`` (their weights in the safe
format), ``checkpoints/step_<steps>/`` (training checkpoints, see
:mod:`d2r_sb3.common.checkpoints`; the newest ``--keep-checkpoints`` are kept), ``replay_buffer.pkl`` (with
``--save-replay-buffer``), ``progress.csv``, ``evaluations.json`` (per-task evaluation history), ``results.json``
(final evaluation), ``.lock`` (held while a process writes the run) and ``<EnvName>/`` with ``config.yml`` (resolved
hyperparameters), ``args.yml``, ``env_kwargs.yml`` and ``command.txt``.

Step counts: ``-n`` is the total number of env steps (summed over tasks, as SB3 counts them); ``--eval-freq`` and
``--save-freq`` are in env steps **per task** (the paper evaluates every 10,000 steps per task). With ``--resume``
and ``--warm-start``, ``-n`` is the target total, counted from the first step of the run continued.

``--warm-start PATH`` (:mod:`d2r_sb3.zoo.warm_start`) builds a new run from the hyperparameters as usual, then
loads the actor, the twin critics and their targets, log alpha and D2R's routing temperatures of PATH (a seed file
written by ``--write-seed``, an SB3 zip, a checkpoint folder or a run folder; the last three are pickles and need
``--allow-pickle``). The new run's optimisers are fresh, its replay buffer is refilled for ``learning_starts`` steps
by the loaded policy before updates resume, and its step counter starts at PATH's steps.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from d2r_sb3.common.cpu_products import CPU_PRODUCTS, set_cpu_products
from d2r_sb3.common.memory import keep_freed_memory
from d2r_sb3.envs import GOAL_MODES, PRESETS
from d2r_sb3.registry import ALGOS
from d2r_sb3.serialization import SEED_PRECISIONS
from d2r_sb3.zoo.exp_manager import new_run
from d2r_sb3.zoo.resume import resume_run
from d2r_sb3.zoo.training import train
from d2r_sb3.zoo.utils import (
    HelpFormatter,
    ZooError,
    add_loading_arguments,
    explicit_options,
    run_main,
    set_num_threads,
)
from d2r_sb3.zoo.warm_start import load_seed, write_seed_command


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (flag names follow rl-baselines3-zoo's ``train.py``)."""
    parser = argparse.ArgumentParser(
        description="Train a multi-task agent on Meta-World (logs in <log-folder>/<algo>/<EnvName>_<N>/).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--algo", default="d2r", choices=list(ALGOS), help="Algorithm (registry name)")
    parser.add_argument(
        "--env",
        default="MT10",
        help="Benchmark: MT10, MT50, or comma-separated Meta-World task names (custom)",
    )
    parser.add_argument("--goals", default="rand", choices=GOAL_MODES, help="Goal mode of make_mt_env")
    parser.add_argument("--preset", default="paper", choices=list(PRESETS), help="Env preset of make_mt_env")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the env, the eval env and the algorithm")
    parser.add_argument(
        "-n",
        "--n-timesteps",
        type=int,
        default=-1,
        help="Total env steps, summed over tasks (-1: the YAML's); with --resume and --warm-start the target "
        "total, counting the steps already done",
    )
    parser.add_argument("-f", "--log-folder", default="logs", help="Root folder of the logs")
    parser.add_argument(
        "-params",
        "--hyperparams",
        nargs="+",
        metavar="KEY:VALUE",
        help='Override hyperparameters, values in YAML (batch_size:256 policy_kwargs:"{n_modules: 4}"); '
        "mappings such as policy_kwargs are merged into the file's",
    )
    parser.add_argument(
        "-conf",
        "--conf-file",
        help="Hyperparameter YAML to use instead of d2r_sb3/zoo/hyperparams/<algo>.yml",
    )
    parser.add_argument(
        "--env-kwargs",
        nargs="+",
        metavar="KEY:VALUE",
        help="Other make_mt_env arguments (max_episode_steps:500)",
    )
    parser.add_argument(
        "--eval-freq", type=int, default=10_000, help="Evaluate every N env steps per task (<= 0: never)"
    )
    parser.add_argument("--eval-episodes", type=int, default=32, help="Episodes per task of each evaluation")
    parser.add_argument(
        "--final-eval-episodes",
        type=int,
        default=100,
        help="Episodes per task of the final evaluation (0: skip)",
    )
    parser.add_argument(
        "--save-freq",
        type=int,
        default=-1,
        help="Write a training checkpoint every N env steps per task (<= 0: not by steps)",
    )
    parser.add_argument(
        "--save-interval-minutes",
        type=float,
        default=30.0,
        help="Write a training checkpoint every M minutes of wall-clock (<= 0: not by time)",
    )
    parser.add_argument(
        "--keep-checkpoints", type=int, default=2, help="Number of newest training checkpoints kept"
    )
    parser.add_argument(
        "--save-replay-buffer",
        action="store_true",
        help="Also write the replay buffer in SB3's format (replay_buffer.pkl) beside the final model "
        "(checkpoints always hold it)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="Continue the run in RUN_DIR from its newest valid checkpoint (exactly where it stopped)",
    )
    parser.add_argument(
        "--warm-start",
        metavar="PATH",
        help="Start a NEW run from the learned state of PATH: a seed file (--write-seed), an SB3 .zip, a checkpoint "
        "folder or a run folder (its newest checkpoint). The model is built from the hyperparameters as usual (the "
        "network must match PATH's), then gets PATH's actor, twin critics and their targets, log alpha and routing "
        "temperatures; the optimisers are fresh, the empty replay buffer is refilled for learning_starts steps by "
        "the loaded policy before updates resume, and the step count starts at PATH's steps: -n is the target "
        "total, as with --resume. Not with --resume",
    )
    parser.add_argument(
        "--write-seed",
        metavar="SOURCE",
        help="Do not train: write the resume seed of SOURCE (a run folder: its newest checkpoint; a checkpoint "
        "folder; an SB3 .zip) to -o FILE, for --warm-start: actor, critics and their targets, log alpha, routing "
        "temperatures, env steps, updates, algo and policy arguments in safetensors + JSON (no optimiser state, "
        "no replay buffer; about 14 MB for the default MT10 D2R network). Prints its size",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="The seed file --write-seed writes")
    parser.add_argument(
        "--seed-without-targets",
        action="store_true",
        help="With --write-seed: leave out the critics' target networks (smaller: about 8 MB for the default MT10 "
        "D2R network); --warm-start then starts the targets from the critics",
    )
    parser.add_argument(
        "--seed-precision",
        choices=SEED_PRECISIONS,
        help="With --write-seed: float16 stores the weight matrices in float16 (half the file: about 4 MB without "
        "the targets for the default MT10 D2R network; --warm-start then loads them as float16 rounded them, "
        "relative error at most 5e-4); biases, routing temperatures and log alpha stay float32. Default float32",
    )
    parser.add_argument("--vec-env", default="dummy", choices=["dummy", "subproc"], help="VecEnv type")
    add_loading_arguments(parser)  # --device, --allow-pickle (for --warm-start / --write-seed of SB3 zips)
    parser.add_argument(
        "--num-threads", type=int, default=-1, help="PyTorch CPU threads (-1: torch's default)"
    )
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="Leave glibc's malloc thresholds alone (by default training keeps freed memory for the next step, "
        "which saves D2R thousands of page faults per gradient step; see d2r_sb3.keep_freed_memory)",
    )
    parser.add_argument(
        "--cpu-products",
        choices=CPU_PRODUCTS,
        default=None,
        help="Library of the float32 products of the networks' dense layers on a CPU: auto (oneDNN on AMD CPUs, "
        "where torch's MKL default runs at about half speed; the default), onednn, or default (torch's own). "
        "Unset: the environment variable D2R_SB3_CPU_PRODUCTS, else auto",
    )
    parser.add_argument(
        "-P", "--progress", action="store_true", help="Show a progress bar (needs rich and tqdm)"
    )
    parser.add_argument(
        "--log-interval",
        type=int,
        default=-1,
        help="Write the training logs every N episodes (-1: the number of tasks, i.e. once per round of episodes)",
    )
    parser.add_argument("--verbose", type=int, default=1, help="0: quiet, 1: logs and evaluations on stdout")
    return parser


def command_line(argv: Sequence[str] | None) -> str:
    """The command that started this run, for ``command.txt``."""
    return shlex.join(["python", "zoo/train.py", *(sys.argv[1:] if argv is None else argv)])


def check_modes(args: argparse.Namespace) -> None:
    """Clear errors for flags that do not go together (before anything is read or written)."""
    if args.eval_freq > 0 and args.eval_episodes < 1:
        raise ZooError(
            f"--eval-episodes must be >= 1 (or --eval-freq 0 to skip evaluations), got {args.eval_episodes}."
        )
    if args.final_eval_episodes < 0:
        raise ZooError(f"--final-eval-episodes must be >= 0, got {args.final_eval_episodes}.")
    if args.resume and args.warm_start:
        raise ZooError(
            f"--warm-start starts a new run from the weights of {args.warm_start}; --resume continues {args.resume} "
            "exactly from its own checkpoint. Pass one of them: --resume RUN to continue a run whose folder you "
            "still have, --warm-start PATH (without --resume) to start a new run when it is lost."
        )
    if args.write_seed and (args.resume or args.warm_start):
        flag = "--resume" if args.resume else "--warm-start"
        raise ZooError(
            f"--write-seed only writes a seed file and trains nothing: drop {flag}, or run it separately."
        )
    seed_flags = [
        flag
        for flag, value in (
            ("-o", args.output),
            ("--seed-without-targets", args.seed_without_targets),
            ("--seed-precision", args.seed_precision),
        )
        if value
    ]
    if not args.write_seed and seed_flags:
        raise ZooError(
            f"{seed_flags[0]} goes with --write-seed SOURCE (it names the seed file to write / what it holds)."
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the flags, set up a new, warm-started or resumed run and train it, or write a seed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_modes(args)
    set_num_threads(args.num_threads)
    if not args.malloc_defaults:
        keep_freed_memory()
    if args.cpu_products is not None:
        set_cpu_products(args.cpu_products)
    if args.write_seed:
        return write_seed_command(args)
    if args.resume:
        setup = resume_run(args, explicit_options(parser, argv), command_line(argv))
        if setup is None:
            return 0
    else:
        warm = load_seed(args.warm_start, allow_pickle=args.allow_pickle) if args.warm_start else None
        setup = new_run(args, command_line(argv), warm)
    try:
        return train(setup)
    finally:
        setup.lock.release()


def cli() -> None:
    """The ``d2r-train`` console command (and ``python zoo/train.py``): :func:`main` with clean error exits."""
    run_main(main)


if __name__ == "__main__":
    cli()
