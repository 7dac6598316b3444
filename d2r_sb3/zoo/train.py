"""Train a multi-task agent on Meta-World MT10 / MT50 (an rl-baselines3-zoo style CLI).

Examples, from the repository root::

    # D2R, MT10 with random goals, the paper's settings (zoo/hyperparams/d2r.yml, section MT10-paper)
    python zoo/train.py --algo d2r --env MT10 --goals rand --preset paper --seed 0
    # a quick run with overridden hyperparameters and env settings
    python zoo/train.py --algo d2r --env MT10 -n 200000 --hyperparams batch_size:640 policy_kwargs:"{routing: soft}" \\
        --env-kwargs max_episode_steps:100
    # a checkpoint every 10 minutes; after a crash, continue the run exactly where its last checkpoint was taken
    python zoo/train.py --algo d2r --env MT50 --save-interval-minutes 10
    python zoo/train.py --resume logs/d2r/MT50-rand_1

A run writes ``<log-folder>/<algo>/<EnvName>_<N>/`` (EnvName = ``MT10-rand``, or ``MT10-rand-mw3`` for another preset):
``<EnvName>.zip`` (final model), ``best_model.zip``, ``policy/`` and ``best_policy/`` (their weights in the safe
format), ``checkpoints/step_<steps>/`` (training checkpoints, see
:mod:`d2r_sb3.common.checkpoints`; the newest ``--keep-checkpoints`` are kept), ``replay_buffer.pkl`` (with
``--save-replay-buffer``), ``progress.csv``, ``evaluations.json`` (per-task evaluation history), ``results.json``
(final evaluation), ``.lock`` (held while a process writes the run) and ``<EnvName>/`` with ``config.yml`` (resolved
hyperparameters), ``args.yml``, ``env_kwargs.yml`` and ``command.txt``.

Step counts: ``-n`` is the total number of env steps (summed over tasks, as SB3 counts them); ``--eval-freq`` and
``--save-freq`` are in env steps **per task** (the paper evaluates every 10,000 steps per task).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from d2r_sb3.envs import GOAL_MODES, PRESETS
from d2r_sb3.registry import ALGOS
from d2r_sb3.zoo.exp_manager import new_run
from d2r_sb3.zoo.resume import resume_run
from d2r_sb3.zoo.training import train
from d2r_sb3.zoo.utils import (
    HelpFormatter,
    ZooError,
    explicit_options,
    run_main,
    set_num_threads,
)


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
        help="Total env steps, summed over tasks (-1: the YAML's)",
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
        "-conf", "--conf-file", help="Hyperparameter YAML to use instead of zoo/hyperparams/<algo>.yml"
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
    parser.add_argument("--vec-env", default="dummy", choices=["dummy", "subproc"], help="VecEnv type")
    parser.add_argument("--device", default="auto", help="PyTorch device (cpu, cuda, auto)")
    parser.add_argument(
        "--num-threads", type=int, default=-1, help="PyTorch CPU threads (-1: torch's default)"
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the flags, set up a new or resumed run, train it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_freq > 0 and args.eval_episodes < 1:
        raise ZooError(
            f"--eval-episodes must be >= 1 (or --eval-freq 0 to skip evaluations), got {args.eval_episodes}."
        )
    if args.final_eval_episodes < 0:
        raise ZooError(f"--final-eval-episodes must be >= 0, got {args.final_eval_episodes}.")
    set_num_threads(args.num_threads)
    if args.resume:
        setup = resume_run(args, explicit_options(parser, argv), command_line(argv))
        if setup is None:
            return 0
    else:
        setup = new_run(args, command_line(argv))
    try:
        return train(setup)
    finally:
        setup.lock.release()


def cli() -> None:
    """The ``d2r-train`` console command (and ``python zoo/train.py``): :func:`main` with clean error exits."""
    run_main(main)


if __name__ == "__main__":
    cli()
