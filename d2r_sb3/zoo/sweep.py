"""Many runs at once: a grid of algorithms x benchmarks x goal modes x seeds x hyperparameter sets, run on Ray.

Examples, from the repository root::

    # 2 algorithms x 5 seeds on MT10, 2 trials at a time on this machine; train.py flags after --
    python zoo/sweep.py --algo d2r mtsac --env MT10 --seeds 0 1 2 3 4 -f sweeps/mt10 --cpus-per-trial 1 \\
        -- -n 2000000 --save-interval-minutes 10
    # the same grid from a YAML file, on a running Ray cluster (the folder must be on a disk every node sees)
    python zoo/sweep.py -c sweep.yml -f /shared/sweeps/mt10 --address auto
    # statistics of the finished runs (rliable): tables and PNGs in sweeps/mt10/report/
    python zoo/sweep.py report sweeps/mt10
    # hyperparameter search (Optuna) instead of a grid: see d2r_sb3.zoo.optimize
    python zoo/sweep.py --optimize --algo d2r --env MT10 --n-trials 20 -f sweeps/d2r-search -- -n 500000

Every trial is an ordinary zoo run: ``zoo/train.py`` with its own log folder ``<sweep>/runs/<trial id>/``, so its
run folder is always ``<sweep>/runs/<trial id>/<algo>/<EnvName>_1`` (the trial id names the grid point, e.g.
``d2r_MT10_rand_base_s0``). ``<sweep>/sweep.json`` records every trial, its command line and its folder. Starting
the same sweep again skips the finished trials (``results.json``, or the final model, present), resumes the
interrupted ones from their newest checkpoint (``train.py --resume``) and starts the others. A trial whose
worker process dies is retried by Ray (``--max-retries``) and resumes from its checkpoint the same way.

While it runs, a table (trial, status, env steps, last evaluation's mean success) is printed every ``--refresh``
seconds from the run folders; at the end ``<sweep>/summary.md`` and ``summary.json`` hold the outcome and each
trial's output is in ``<sweep>/runs/<trial id>/trial.log``.

A grid file (``-c``) is YAML with any of these keys (flags given on the command line win)::

    algos: [d2r, mtsac]
    envs: [MT10]                      # MT10, MT50 or comma-separated task names
    goals: [rand]
    preset: paper
    seeds: [0, 1, 2, 3, 4]
    hyperparams:                      # for every trial (--hyperparams); <algo>/<key> for one algo only
      batch_size: 320
      d2r/policy_kwargs: {n_modules: 8}
    hp_sets:                          # a grid dimension of overrides, name -> hyperparameters (--hp-sets)
      lr-low: {learning_rate: 1.0e-4}
      lr-high: {learning_rate: 1.0e-3}
    train_args: "-n 2000000 --save-interval-minutes 10"   # other train.py flags (after -- on the command line)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from d2r_sb3.common.run_layout import RunLayout
from d2r_sb3.zoo.optimize import optimize
from d2r_sb3.zoo.trials import (
    GRID_KEYS,
    REPORT_DIR,
    SUMMARY_JSON,
    SUMMARY_MD,
    Grid,
    check_address,
    find_run_dir,
    load_grid_file,
    load_manifest,
    run_sweep,
    set_name,
    table,
    write_manifest,
    write_summary,
)
from d2r_sb3.zoo.utils import (
    HelpFormatter,
    ZooError,
    parse_key_values,
    run_main,
)


def report(
    folder: str | Path, output: str | Path | None = None, n_bootstrap: int = 2000, dpi: int = 150
) -> list[Path]:
    """Curves and final-score statistics (rliable) of a sweep's runs, grouped by method (the algorithm, and the
    hyperparameter set when the sweep has several) and env: ``<folder>/report/`` by default.

    :return: The files written.
    :raises ZooError: If no run of the sweep has an evaluation yet.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from d2r_sb3.zoo import plot

    folder = Path(folder)
    manifest = load_manifest(folder)
    output = Path(output) if output is not None else folder / REPORT_DIR
    output.mkdir(parents=True, exist_ok=True)
    several_sets = len({trial["hp_set"] for trial in manifest["trials"].values()}) > 1
    runs = []
    for trial in manifest["trials"].values():
        run_dir = find_run_dir(trial["folder"], trial["algo"])
        if run_dir is None or not RunLayout(run_dir).evaluations_file.is_file():
            continue
        run = plot.load_run(run_dir, "success", per_task_x=False)
        if run is not None:
            label = f"{trial['algo']} [{trial['hp_set']}]" if several_sets else trial["algo"]
            runs.append((label, run))
    if not runs:
        raise ZooError(f"No run of the sweep {folder} has an evaluation yet (runs need --eval-freq > 0).")
    several_envs = len({run.env for _, run in runs}) > 1
    groups: dict[str, list[plot.Run]] = {}
    for label, run in runs:
        groups.setdefault(f"{label} {run.env}" if several_envs else label, []).append(run)
    args = argparse.Namespace(
        metric="success",
        x_label="Env steps (all tasks)",
        n_bootstrap=n_bootstrap,
        estimator="IQM",
        title=f"Sweep {folder.name}",
        dpi=dpi,
    )
    files = [output / "curves.png", output / "curves_per_task.png"]
    curves = plot.plot_mean(groups, files[0], args)
    plot.plot_per_task(groups, files[1], args)
    for label, curve in curves.items():
        band = (
            f" [{curve.low[-1]:.3f}, {curve.high[-1]:.3f}]"
            if curve.low is not None and curve.high is not None
            else ""
        )
        print(
            f"  {label}: success {curve.center[-1]:.3f}{band} at {curve.steps[-1]:,.0f} steps ({curve.method or '1 run'})"
        )
    for result in plot.write_statistics(groups, output, n_bootstrap, dpi):
        print(result.markdown)
        files += result.files
    print("Wrote " + ", ".join(str(path) for path in files))
    return files


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of a sweep (``report`` has its own, :func:`build_report_parser`)."""
    parser = argparse.ArgumentParser(
        description="Run a grid of zoo trainings (algos x envs x goal modes x hyperparameter sets x seeds) on Ray; "
        "train.py flags for every trial go after --. `d2r-sweep report FOLDER` writes the statistics of a sweep.",
        formatter_class=HelpFormatter,
    )
    grid = parser.add_argument_group("grid (each flag overrides the grid file's key)")
    grid.add_argument("-c", "--config", metavar="YAML", help="Grid file (keys: " + ", ".join(GRID_KEYS) + ")")
    grid.add_argument("--algo", nargs="+", dest="algos", help="Algorithms (default d2r)")
    grid.add_argument(
        "--env", nargs="+", dest="envs", help="Benchmarks: MT10, MT50 or task lists (default MT10)"
    )
    grid.add_argument("--goals", nargs="+", help="Goal modes (default rand)")
    grid.add_argument("--preset", help="Env preset (default paper)")
    grid.add_argument("--seeds", nargs="+", type=int, help="Seeds (default 0)")
    grid.add_argument("--n-seeds", type=int, help="Seeds 0..N-1 (instead of --seeds)")
    grid.add_argument(
        "-params", "--hyperparams", nargs="+", metavar="KEY:VALUE", help="Hyperparameters of every trial"
    )
    grid.add_argument(
        "--hp-sets",
        nargs="+",
        metavar="SET",
        help="A grid dimension of hyperparameter sets, each a quoted list of KEY:VALUE "
        "('learning_rate:1e-4' 'learning_rate:1e-3 batch_size:640')",
    )
    grid.add_argument("-conf", "--conf-file", help="Hyperparameter YAML of every trial (train.py -conf)")
    resources = parser.add_argument_group("resources")
    resources.add_argument(
        "-f", "--folder", default="sweeps/sweep", help="Sweep folder (run it again to continue)"
    )
    resources.add_argument(
        "--address", help="Ray cluster to use (auto, ray://<head>:10001); default: a local instance"
    )
    resources.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    resources.add_argument("--num-gpus", type=int, help="GPUs of the local Ray instance (default: all)")
    resources.add_argument(
        "--cpus-per-trial", type=float, default=1.0, help="CPUs Ray reserves for each trial"
    )
    resources.add_argument(
        "--gpus-per-trial",
        type=float,
        default=0.0,
        help="GPUs for each trial (a fraction shares a GPU; > 0: cuda)",
    )
    resources.add_argument(
        "--num-threads",
        type=int,
        default=-1,
        help="Torch threads per trial (-1: --cpus-per-trial, at least 1)",
    )
    resources.add_argument(
        "--device", help="Torch device of the trials (default: cuda with --gpus-per-trial, else cpu)"
    )
    resources.add_argument(
        "--max-retries", type=int, default=3, help="Retries of a trial whose worker process died"
    )
    resources.add_argument(
        "--refresh", type=float, default=10.0, help="Seconds between two prints of the table"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="List the trials and their commands; run nothing"
    )
    parser.add_argument(
        "--report", action="store_true", help="Write the report (d2r-sweep report) at the end"
    )
    parser.add_argument(
        "--n-bootstrap", type=int, default=2000, help="Bootstrap resamples of the report's intervals"
    )
    search = parser.add_argument_group("hyperparameter search (--optimize, one algo and one env)")
    search.add_argument(
        "--optimize", action="store_true", help="Search hyperparameters with Optuna instead of a grid"
    )
    search.add_argument(
        "--n-trials", type=int, default=20, help="Trials the study should hold in all (continued)"
    )
    search.add_argument(
        "--search-space", metavar="YAML", help="Search spaces per algo (default: the package's)"
    )
    search.add_argument(
        "--pruner",
        default="median",
        choices=["median", "none"],
        help="Stop trials below the median at an evaluation",
    )
    search.add_argument("--sampler-seed", type=int, default=0, help="Seed of the TPE sampler")
    search.add_argument("--study-name", default="study", help="Name of the study in <folder>/study.db")
    return parser


def split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` split at the first ``--``: the sweep's flags, then the train.py flags of every trial."""
    argv = list(argv)
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def grid_from_args(args: argparse.Namespace, train_args: list[str]) -> Grid:
    """The grid: the file's keys, overridden by the flags given."""
    values = load_grid_file(args.config) if args.config else {}
    for key in ("algos", "envs", "goals", "preset", "seeds", "conf_file"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.n_seeds is not None:
        if args.n_seeds < 1:
            raise ZooError(f"--n-seeds must be >= 1, got {args.n_seeds}.")
        values["seeds"] = list(range(args.n_seeds))
    if args.hyperparams:
        values["hyperparams"] = {
            **values.get("hyperparams", {}),
            **parse_key_values(args.hyperparams, "--hyperparams"),
        }
    if args.hp_sets:
        sets = [parse_key_values(shlex.split(item), "--hp-sets") for item in args.hp_sets]
        values["hp_sets"] = {set_name(overrides): overrides for overrides in sets}
    if train_args:
        values["train_args"] = train_args
    grid = Grid(**values)
    grid.check()
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``report FOLDER``, ``--optimize``, or a grid sweep."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    own, train_args = split_train_args(argv)
    args = build_parser().parse_args(own)
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise ZooError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0.")
    if args.max_retries < 0 or args.refresh <= 0:
        raise ZooError("--max-retries must be >= 0 and --refresh > 0.")
    num_threads = args.num_threads if args.num_threads > 0 else max(1, int(args.cpus_per_trial))
    device = args.device or ("cuda" if args.gpus_per_trial > 0 else "cpu")
    grid = grid_from_args(args, train_args)
    if grid.conf_file:
        grid.conf_file = str(Path(grid.conf_file).resolve())
    # Absolute paths: Ray workers do not run in this directory.
    folder = Path(args.folder).resolve()
    if not args.dry_run:
        check_address(args.address)
    if args.optimize:
        return optimize(grid, folder, args, num_threads, device)
    trials = grid.trials(folder, num_threads, device)
    if args.dry_run:
        for trial in trials:
            print(f"{trial.id}: python zoo/train.py {shlex.join(trial.train_argv())}")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, trials, grid)
    start = time.monotonic()
    statuses: dict[str, str] = {}  # filled in by run_sweep, also when Ctrl-C interrupts it
    try:
        run_sweep(trials, folder, args, statuses)
    finally:
        print()
        print(table(trials, statuses))
        print()
        print(write_summary(folder, trials, statuses, time.monotonic() - start))
        print(f"Wrote {folder / SUMMARY_MD} and {folder / SUMMARY_JSON}")
    failed = [trial_id for trial_id, status in statuses.items() if status.startswith("failed")]
    if args.report:
        report(folder, n_bootstrap=args.n_bootstrap)
    return 1 if failed else 0


def build_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2r-sweep report",
        description="Curves and rliable statistics (IQM, mean, median, optimality gap, probability of improvement, "
        "performance profiles, per-task means) of a sweep's runs.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("folder", help="Sweep folder")
    parser.add_argument("-o", "--output", help="Report folder (default: <folder>/report)")
    parser.add_argument("--n-bootstrap", type=int, default=2000, help="Stratified bootstrap resamples")
    parser.add_argument("--dpi", type=int, default=150, help="Resolution of the PNGs")
    return parser


def report_main(argv: Sequence[str]) -> int:
    """``d2r-sweep report FOLDER``."""
    args = build_report_parser().parse_args(argv)
    if args.n_bootstrap < 1:
        raise ZooError("--n-bootstrap must be >= 1.")
    report(args.folder, args.output, args.n_bootstrap, args.dpi)
    return 0


def cli() -> None:
    """The ``d2r-sweep`` console command (and ``python zoo/sweep.py``): :func:`main` with clean error exits."""
    run_main(main)


if __name__ == "__main__":
    cli()
