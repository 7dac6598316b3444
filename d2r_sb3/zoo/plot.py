"""Learning curves of zoo runs from their ``evaluations.json``: success vs env steps, shaded across seeds.

Examples, from the repository root::

    python zoo/plot.py logs/d2r/MT10-rand_* logs/mtsac/MT10-rand_* -o curves.png --per-task per_task.png
    python zoo/plot.py logs/d2r logs/mtsac -o curves.png          # every run in these folders

Runs are grouped by algorithm (the folder above the run, ``logs/<algo>/<EnvName>_<N>``) and env. Each group is
drawn as one curve: with 3 or more seeds the interquartile mean (IQM) with a 95% stratified-bootstrap confidence
interval (as rliable recommends), with 2 seeds the mean and the min/max band, with 1 seed the run itself. Runs
evaluated at different steps are interpolated onto common steps, up to the shortest run.
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

from d2r_sb3.common.run_layout import EVALUATIONS_FILE, RunLayout
from d2r_sb3.envs import short_task_name
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


def load_run(path: Path, metric: str, per_task_x: bool) -> Run | None:
    """Read a run's evaluation history (None, with a warning, if it has no evaluation yet)."""
    data = json.loads((path / EVALUATIONS_FILE).read_text())
    mean_key, task_key, _ = METRICS[metric]
    if not data["timesteps"]:
        print(f"Warning: {path} has no evaluation yet; skipped.", file=sys.stderr)
        return None
    steps = np.asarray(data["timesteps_per_task" if per_task_x else "timesteps"], dtype=float)
    return Run(
        path=path,
        algo=path.parent.name,
        env=RunLayout(path).env_name,
        steps=steps,
        mean=np.asarray(data[mean_key], dtype=float),
        per_task={name: np.asarray(values, dtype=float) for name, values in data[task_key].items()},
    )


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% along ``axis`` (``int(n / 4)`` values cut at each end)."""
    values = np.sort(values, axis=axis)
    n = values.shape[axis]
    cut = int(0.25 * n)
    return np.take(values, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def align(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Put curves ``(steps, values)`` on common steps: ``(steps [X], values [n_runs, X])``.

    Curves evaluated at the same steps are stacked as they are; otherwise they are linearly interpolated onto
    the union of their steps up to the end of the shortest run.
    """
    first = runs[0][0]
    if all(len(s) == len(first) and np.array_equal(s, first) for s, _ in runs):
        return first, np.stack([v for _, v in runs])
    end = min(s[-1] for s, _ in runs)
    grid = np.unique(np.concatenate([s[s <= end] for s, _ in runs]))
    return grid, np.stack([np.interp(grid, s, v) for s, v in runs])


def aggregate(steps: np.ndarray, values: np.ndarray, n_bootstrap: int, seed: int = 0) -> Curve:
    """Aggregate ``values [n_runs, X]`` across runs (IQM + bootstrap CI, mean + min/max, or the single run)."""
    n_runs = values.shape[0]
    if n_runs >= 3:
        rng = np.random.default_rng(seed)
        resampled = values[rng.integers(0, n_runs, size=(n_bootstrap, n_runs))]  # [B, n_runs, X]
        estimates = iqm(resampled, axis=1)
        low, high = np.percentile(estimates, [2.5, 97.5], axis=0)
        return Curve(steps, iqm(values, axis=0), low, high, "IQM, 95% CI")
    if n_runs == 2:
        return Curve(steps, values.mean(0), values.min(0), values.max(0), "mean, min/max")
    return Curve(steps, values[0], None, None, "")


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
    """One figure: the mean over tasks of every group."""
    import matplotlib.pyplot as plt

    _, _, y_label = METRICS[args.metric]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves = {}
    for i, (label, runs) in enumerate(groups.items()):
        steps, values = align([(run.steps, run.mean) for run in runs])
        curve = aggregate(steps, values, args.n_bootstrap)
        curves[label] = curve
        method = f", {curve.method}" if curve.method else ""
        _draw(ax, curve, f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)}{method})", f"C{i}")
    _style(ax, args.x_label, f"{y_label} (mean over tasks)", args.metric)
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
                _draw(ax, aggregate(steps, values, args.n_bootstrap), label, f"C{i}")
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
        "--n-bootstrap", type=int, default=2000, help="Bootstrap resamples of the IQM interval"
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
    runs = [
        run for path in find_runs(args.runs) if (run := load_run(path, args.metric, per_task_x)) is not None
    ]
    if not runs:
        raise ZooError("None of the runs has an evaluation yet.")
    groups = group_runs(runs)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    curves = plot_mean(groups, output, args)
    print(f"Wrote {output}")
    for label, curve in curves.items():
        band = f" [{curve.low[-1]:.3f}, {curve.high[-1]:.3f}]" if curve.low is not None else ""
        method = curve.method or "1 run"
        print(
            f"  {label}: {args.metric} {curve.center[-1]:.3f}{band} at {curve.steps[-1]:,.0f} steps ({method})"
        )
    if args.per_task:
        per_task = Path(args.per_task)
        per_task.parent.mkdir(parents=True, exist_ok=True)
        plot_per_task(groups, per_task, args)
        print(f"Wrote {per_task}")
    return 0


def cli() -> None:
    """The ``d2r-plot`` console command (and ``python zoo/plot.py``): :func:`main` with clean error exits."""
    run_main(main)


if __name__ == "__main__":
    cli()
