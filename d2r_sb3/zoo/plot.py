"""Learning curves and statistics of zoo runs from their ``evaluations.json``, aggregated over seeds with rliable.

Examples, from the repository root::

    python zoo/plot.py logs/d2r/MT10-rand_* logs/mtsac/MT10-rand_* -o curves.png --per-task per_task.png
    python zoo/plot.py logs/d2r logs/mtsac -o curves.png          # every run in these folders
    python zoo/plot.py logs/d2r logs/mtsac --stats stats/          # + final-score tables and figures
    python zoo/plot.py logs/d2r logs/mhsac-wide --at-steps 1000000 --stats stats/   # at equal env steps

Runs are grouped by algorithm (the folder above the run, ``logs/<algo>/<EnvName>_<N>``) and env. Each group is
drawn as one curve: the interquartile mean (IQM, or ``--estimator``) over runs x tasks with a 95% stratified
bootstrap confidence interval, as rliable computes it (:mod:`d2r_sb3.zoo.statistics`); a single run is drawn
without a band. Runs evaluated at different steps are interpolated onto common steps, up to the shortest run.

``--stats DIR`` writes the statistics of the final scores (the final evaluation in ``results.json``, else the
last periodic one; with ``--at-steps N``, each run's evaluation at N env steps, to compare methods at equal
budgets) of each env: IQM, mean, median and optimality gap with intervals, the probability of
improvement between methods, performance profiles and per-task means, as tables (``statistics.md``) and PNGs.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2r_sb3.common.callbacks import evaluations_up_to
from d2r_sb3.common.run_layout import EVALUATIONS_FILE, RunLayout
from d2r_sb3.envs import short_task_name
from d2r_sb3.zoo import statistics
from d2r_sb3.zoo.utils import HelpFormatter, ZooError, run_main

METRICS = {
    "success": ("mean_success", "success", "Success rate"),
    "return": ("mean_return", "return", "Return"),
}


@dataclass
class Run:
    """The evaluation history of one run."""

    path: Path
    algo: str
    env: str
    steps: np.ndarray  # x values
    mean: np.ndarray  # mean over tasks at each evaluation
    per_task: dict[str, np.ndarray]
    final: dict[str, float]  # per-task final score: results.json, else the last evaluation
    final_steps: int = 0  # env steps (summed over tasks) of the final score

    @property
    def task_matrix(self) -> np.ndarray:
        """The per-task curves as ``[tasks, X]``, tasks in the run's order."""
        return np.stack(list(self.per_task.values()))


@dataclass
class Curve:
    """A group's aggregate curve: ``center`` with an optional ``[low, high]`` band."""

    steps: np.ndarray
    center: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    method: str


def find_runs(patterns: Sequence[str]) -> list[Path]:
    """Run folders from paths, glob patterns, or folders holding runs (``logs/d2r``).

    :raises ZooError: If a pattern matches nothing with an ``evaluations.json``.
    """
    runs: list[Path] = []
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern))] or [Path(pattern)]
        found = []
        for path in matches:
            if (path / EVALUATIONS_FILE).is_file():
                found.append(path)
            elif path.is_dir():
                found += sorted(p.parent for p in path.glob(f"**/{EVALUATIONS_FILE}"))
        if not found:
            raise ZooError(
                f"No run with an {EVALUATIONS_FILE} at {pattern!r} (runs are logs/<algo>/<EnvName>_<N> folders "
                f"trained with --eval-freq > 0)."
            )
        runs += [p for p in found if p not in runs]
    return runs


def load_run(path: Path, metric: str, per_task_x: bool, at_steps: int | None = None) -> Run | None:
    """Read a run's evaluation history (None, with a warning, if it has no evaluation yet).

    :param at_steps: keep only the evaluations at or before this many env steps (summed over tasks); the final
        scores are then those of the last of them (or the run's ``results.json`` if it was written at exactly
        that step).
    :raises ZooError: with ``at_steps``, if the run has no evaluation at or before it.
    """
    data = json.loads((path / EVALUATIONS_FILE).read_text())
    mean_key, task_key, _ = METRICS[metric]
    if at_steps is not None and data["timesteps"]:
        data = evaluations_up_to(data, at_steps)
        if not data["timesteps"]:
            raise ZooError(f"{path} has no evaluation at or before {at_steps:,} env steps (--at-steps).")
    if not data["timesteps"]:
        print(f"Warning: {path} has no evaluation yet; skipped.", file=sys.stderr)
        return None
    steps = np.asarray(data["timesteps_per_task" if per_task_x else "timesteps"], dtype=float)
    per_task = {name: np.asarray(values, dtype=float) for name, values in data[task_key].items()}
    final = {name: float(values[-1]) for name, values in per_task.items()}
    final_steps = int(data["timesteps"][-1])
    results_path = RunLayout(path).results_file
    if results_path.is_file():  # the final evaluation (more episodes) when the run finished
        results = json.loads(results_path.read_text())
        final_key = "success" if metric == "success" else "mean_return"
        written_at = results.get("total_timesteps")
        if set(results.get(final_key, {})) == set(final) and (at_steps is None or written_at == at_steps):
            final = {name: float(results[final_key][name]) for name in final}
            final_steps = int(written_at) if written_at is not None else final_steps
    return Run(
        path=path,
        algo=path.parent.name,
        env=RunLayout(path).env_name,
        steps=steps,
        mean=np.asarray(data[mean_key], dtype=float),
        per_task=per_task,
        final=final,
        final_steps=final_steps,
    )


def align(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Put curves ``(steps [X], values [..., X])`` on common steps: ``(steps, values [n_runs, ..., X])``.

    Curves evaluated at the same steps are stacked as they are; otherwise they are linearly interpolated onto
    the union of their steps up to the end of the shortest run.
    """
    first = runs[0][0]
    if all(len(s) == len(first) and np.array_equal(s, first) for s, _ in runs):
        return first, np.stack([v for _, v in runs])
    end = min(s[-1] for s, _ in runs)
    grid = np.unique(np.concatenate([s[s <= end] for s, _ in runs]))

    def interpolate(steps: np.ndarray, values: np.ndarray) -> np.ndarray:
        rows = values.reshape(-1, values.shape[-1])
        return np.stack([np.interp(grid, steps, row) for row in rows]).reshape(*values.shape[:-1], len(grid))

    return grid, np.stack([interpolate(s, v) for s, v in runs])


def aggregate(
    steps: np.ndarray, values: np.ndarray, n_bootstrap: int, seed: int = 0, estimator: str = "IQM"
) -> Curve:
    """Aggregate ``values`` (``[runs, tasks, X]``, or ``[runs, X]`` for one task) over runs x tasks with rliable:
    the estimator with a 95% stratified bootstrap interval; a single run has no band."""
    if values.ndim == 2:
        values = values[:, None, :]
    if values.shape[0] == 1:
        center = statistics.ESTIMATORS[estimator](values)
        return Curve(steps, center, None, None, "")
    center, low, high = statistics.curve_estimates(values, estimator, reps=n_bootstrap, seed=seed)
    return Curve(steps, center, low, high, f"{estimator}, 95% CI")


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by label: the algorithm, plus the env when the runs span several envs."""
    several_envs = len({run.env for run in runs}) > 1
    groups: dict[str, list[Run]] = {}
    for run in runs:
        label = f"{run.algo} {run.env}" if several_envs else run.algo
        groups.setdefault(label, []).append(run)
    return groups


def _draw(ax, curve: Curve, label: str | None, color: str) -> None:
    ax.plot(curve.steps, curve.center, color=color, label=label, lw=1.6)
    if curve.low is not None and curve.high is not None:  # no band for a single run
        ax.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.2, lw=0)


def _style(ax, x_label: str, y_label: str, metric: str) -> None:
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.xaxis.set_major_formatter(EngFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if metric == "success":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def plot_mean(groups: dict[str, list[Run]], output: Path, args: argparse.Namespace) -> dict[str, Curve]:
    """One figure: every group aggregated over runs x tasks (the estimator of ``--estimator``)."""
    import matplotlib.pyplot as plt

    _, _, y_label = METRICS[args.metric]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves = {}
    for i, (label, runs) in enumerate(groups.items()):
        if args.estimator == "Mean" and len(runs) == 1:
            # The run's recorded mean over tasks: the same numbers, and known where per-task values are not (a
            # history rebuilt after its run folder was lost).
            curve = Curve(runs[0].steps, runs[0].mean, None, None, "")
        else:
            steps, values = align([(run.steps, run.task_matrix) for run in runs])
            curve = aggregate(steps, values, args.n_bootstrap, estimator=args.estimator)
        curves[label] = curve
        method = f", {curve.method}" if curve.method else ""
        _draw(ax, curve, f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)}{method})", f"C{i}")
    _style(ax, args.x_label, f"{y_label} ({args.estimator} over runs x tasks)", args.metric)
    ax.legend(fontsize=8)
    if args.title:
        ax.set_title(args.title)
    fig.tight_layout()
    fig.savefig(output, dpi=args.dpi)
    plt.close(fig)
    return curves


def plot_per_task(groups: dict[str, list[Run]], output: Path, args: argparse.Namespace) -> None:
    """A grid with one panel per task."""
    import matplotlib.pyplot as plt

    tasks: list[str] = []
    for runs in groups.values():
        for run in runs:
            tasks += [name for name in run.per_task if name not in tasks]
    ncols = min(5, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    _, _, y_label = METRICS[args.metric]
    for index, (ax, task) in enumerate(zip(axes.flat, tasks, strict=False)):  # spare panels stay empty
        for i, (label, runs) in enumerate(groups.items()):
            having = [run for run in runs if task in run.per_task]
            if having:
                steps, values = align([(run.steps, run.per_task[task]) for run in having])
                curve = aggregate(steps, values, args.n_bootstrap, estimator=args.estimator)
                _draw(ax, curve, label, f"C{i}")
        # Axis labels on the outer panels only.
        last_row = index + ncols >= len(tasks)
        _style(ax, args.x_label if last_row else "", y_label if index % ncols == 0 else "", args.metric)
        ax.set_title(short_task_name(task), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the legend
    fig.savefig(output, dpi=args.dpi)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Plot learning curves (success vs env steps) of zoo runs from their evaluations.json.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "runs", nargs="+", help="Run folders, glob patterns, or folders holding runs (logs/d2r)"
    )
    parser.add_argument("-o", "--output", default="curves.png", help="PNG of the mean over tasks")
    parser.add_argument("--per-task", metavar="PNG", help="Also write a grid with one panel per task")
    parser.add_argument(
        "-x",
        "--x-axis",
        default="total",
        choices=["total", "per-task"],
        help="Env steps summed over tasks, or per task",
    )
    parser.add_argument("-y", "--metric", default="success", choices=list(METRICS), help="Evaluation metric")
    parser.add_argument(
        "--estimator",
        default="IQM",
        choices=["IQM", "Mean", "Median"],
        help="Aggregate over runs x tasks drawn as the curve",
    )
    parser.add_argument(
        "--n-bootstrap", type=int, default=2000, help="Stratified bootstrap resamples of the 95%% intervals"
    )
    parser.add_argument(
        "--stats",
        metavar="DIR",
        help="Also write the final-score statistics (IQM, mean, median, optimality gap, probability of "
        "improvement, performance profiles, per-task means; tables and PNGs) to DIR",
    )
    parser.add_argument(
        "--at-steps",
        type=int,
        metavar="N",
        help="Compare at equal env steps: only the evaluations at or before N env steps (summed over tasks) count; "
        "curves stop there and the final scores of --stats are each run's evaluation at N (a run evaluated last "
        "before N is named with a warning)",
    )
    parser.add_argument("--title", help="Figure title")
    parser.add_argument("--dpi", type=int, default=150, help="Resolution of the PNGs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.n_bootstrap < 1:
        raise ZooError("--n-bootstrap must be >= 1.")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed

    per_task_x = args.x_axis == "per-task"
    args.x_label = "Env steps per task" if per_task_x else "Env steps (all tasks)"
    if args.at_steps is not None and args.at_steps < 1:
        raise ZooError(f"--at-steps must be a positive number of env steps, got {args.at_steps}.")
    runs = [
        run
        for path in find_runs(args.runs)
        if (run := load_run(path, args.metric, per_task_x, args.at_steps)) is not None
    ]
    if not runs:
        raise ZooError("None of the runs has an evaluation yet.")
    if args.at_steps is not None:
        for run in runs:
            if run.final_steps != args.at_steps:
                print(
                    f"Warning: {run.path} has no evaluation at {args.at_steps:,} env steps; its scores are those "
                    f"of its last evaluation before, at {run.final_steps:,}.",
                    file=sys.stderr,
                )
    groups = group_runs(runs)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    curves = plot_mean(groups, output, args)
    print(f"Wrote {output}")
    for label, curve in curves.items():
        band = (
            f" [{curve.low[-1]:.3f}, {curve.high[-1]:.3f}]"
            if curve.low is not None and curve.high is not None
            else ""
        )
        method = curve.method or "1 run"
        print(
            f"  {label}: {args.metric} {curve.center[-1]:.3f}{band} at {curve.steps[-1]:,.0f} steps ({method})"
        )
    if args.per_task:
        per_task = Path(args.per_task)
        per_task.parent.mkdir(parents=True, exist_ok=True)
        plot_per_task(groups, per_task, args)
        print(f"Wrote {per_task}")
    if args.stats:
        for report in write_statistics(groups, Path(args.stats), args.n_bootstrap, args.dpi):
            print(report.markdown)
            print("Wrote " + ", ".join(str(path) for path in report.files))
    return 0


def write_statistics(
    groups: dict[str, list[Run]], output: Path, n_bootstrap: int = 2000, dpi: int = 150
) -> list[statistics.Report]:
    """The final-score statistics of each env's groups (:func:`d2r_sb3.zoo.statistics.write_report`): in
    ``output`` for one env, in ``output/<EnvName>/`` for several.

    :param groups: Runs by method label (as :func:`group_runs` makes them, or any other labels).
    :raises ZooError: If the runs of an env were evaluated on different tasks.
    """
    by_env: dict[str, dict[str, list[Run]]] = {}
    for label, runs in groups.items():
        for run in runs:
            by_env.setdefault(run.env, {}).setdefault(label.removesuffix(f" {run.env}"), []).append(run)
    reports = []
    for env, methods in by_env.items():
        task_names = list(next(iter(methods.values()))[0].final)
        scores = {}
        for label, runs in methods.items():
            for run in runs:
                if list(run.final) != task_names:
                    raise ZooError(
                        f"{run.path} was evaluated on other tasks than {runs[0].path}; compare one env."
                    )
            scores[label] = np.array([[run.final[name] for name in task_names] for run in runs])
        folder = output if len(by_env) == 1 else output / env
        sources = {label: [str(run.path) for run in runs] for label, runs in methods.items()}
        reports.append(
            statistics.write_report(
                scores, task_names, folder, n_bootstrap, title=env, dpi=dpi, sources=sources
            )
        )
    return reports


def cli() -> None:
    """The ``d2r-plot`` console command (and ``python zoo/plot.py``): :func:`main` with clean error exits."""
    run_main(main)


if __name__ == "__main__":
    cli()
