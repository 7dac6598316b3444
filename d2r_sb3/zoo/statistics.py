"""Statistics over seeds with rliable (Agarwal et al., "Deep RL at the Edge of the Statistical Precipice", 2021).

Scores are arrays ``[runs, tasks]`` (final success rates) or ``[runs, tasks, steps]`` (learning curves), one per
method. Every interval is a 95% stratified bootstrap confidence interval: runs are resampled within each task, as
rliable does, so a method with few seeds on many tasks still gets an honest interval.

* :func:`aggregate_estimates`: IQM, mean, median and optimality gap over runs x tasks;
* :func:`improvement_probabilities`: P(X > Y), the probability that a run of method X beats a run of method Y on
  a task, for each pair of methods;
* :func:`profiles`: performance profiles (the fraction of runs x tasks with a score above tau);
* :func:`per_task_estimates`: the mean over seeds of each task;
* :func:`curve_estimates`: an aggregate at every evaluation step (learning curves);
* :func:`write_report`: all of the above as Markdown tables, a JSON file and one PNG each.

rliable (and its bootstrap backend arch) is an optional dependency: ``pip install "d2r_sb3[sweep]"``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d2r_sb3.envs import short_task_name
from d2r_sb3.zoo.utils import ZooError

CONFIDENCE = 0.95
TAUS = np.linspace(0.0, 1.0, 41)
"""Score thresholds of the performance profiles (success rates)."""


def _rliable() -> Any:
    """rliable's modules, with an install hint when it is missing."""
    try:
        from rliable import library, metrics
    except ImportError as err:
        raise ZooError(
            f"The statistics need rliable ({err}); install it with: pip install 'd2r_sb3[sweep]'"
        ) from None
    return library, metrics


def _iqm(values: np.ndarray) -> np.ndarray:
    """Interquartile mean over runs x tasks, for every trailing index (scipy's trim_mean, as rliable uses)."""
    from scipy.stats import trim_mean

    return np.asarray(trim_mean(values.reshape(values.shape[0] * values.shape[1], -1), 0.25, axis=0))


def _mean(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0] * values.shape[1], -1).mean(axis=0)


def _median(values: np.ndarray) -> np.ndarray:
    return np.median(values.reshape(values.shape[0] * values.shape[1], -1), axis=0)


def _optimality_gap(values: np.ndarray) -> np.ndarray:
    """How far the scores fall short of 1 (a success rate of 100%), on average: lower is better."""
    return np.clip(1.0 - values.reshape(values.shape[0] * values.shape[1], -1), 0.0, None).mean(axis=0)


def _probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) of rliable (``metrics.probability_of_improvement``: the Mann-Whitney U statistic over n x m
    per task, averaged over tasks), with every pair of runs compared at once: rliable's version calls scipy once
    per task, which dominates the bootstrap."""
    wins = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))
    ties = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return float((wins + 0.5 * ties).mean())


ESTIMATORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "IQM": _iqm,
    "Mean": _mean,
    "Median": _median,
    "Optimality gap": _optimality_gap,
}
"""The aggregate metrics over runs x tasks (rliable's four), each vectorised over trailing axes."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _check_scores(scores: Mapping[str, np.ndarray], ndim: int) -> None:
    if not scores:
        raise ZooError("No scores to aggregate: no method has a finished evaluation.")
    tasks = {value.shape[1] for value in scores.values()}
    for method, value in scores.items():
        if value.ndim != ndim or value.shape[0] < 1:
            raise ZooError(
                f"Scores of {method!r} have shape {value.shape}; expected {ndim} axes [runs, tasks, ...]."
            )
    if len(tasks) > 1:
        raise ZooError(
            f"The methods were scored on different numbers of tasks ({sorted(tasks)}); compare runs of one env."
        )


def _random_state(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed)  # rliable/arch take the legacy RandomState


def _bootstrap(
    library: Any, scores: Mapping[str, Any], function: Callable[..., np.ndarray], reps: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """rliable's ``get_interval_estimates`` (stratified bootstrap, percentile intervals), seeded."""
    import warnings

    with warnings.catch_warnings():
        # arch deprecates the RandomState argument rliable passes it; the intervals are unaffected.
        warnings.filterwarnings("ignore", category=FutureWarning, module="arch")
        return library.get_interval_estimates(
            dict(scores),
            function,
            reps=reps,
            confidence_interval_size=CONFIDENCE,
            random_state=_random_state(seed),
        )


def aggregate_estimates(
    scores: Mapping[str, np.ndarray], reps: int = 2000, seed: int = 0
) -> dict[str, dict[str, Estimate]]:
    """IQM, mean, median and optimality gap of each method's ``[runs, tasks]`` scores, with 95% intervals.

    :param scores: Final scores per method, ``[runs, tasks]``.
    :param reps: Bootstrap resamples.
    :param seed: Seed of the bootstrap (the same inputs give the same intervals).
    :return: ``{method: {metric: Estimate}}``, metrics in the order of :data:`ESTIMATORS`.
    """
    library, _ = _rliable()
    _check_scores(scores, 2)

    def all_metrics(values: np.ndarray) -> np.ndarray:
        return np.array([float(estimator(values)[0]) for estimator in ESTIMATORS.values()])

    points, intervals = _bootstrap(library, dict(scores), all_metrics, reps, seed)
    return {
        method: {
            name: Estimate(
                float(points[method][i]), float(intervals[method][0, i]), float(intervals[method][1, i])
            )
            for i, name in enumerate(ESTIMATORS)
        }
        for method in scores
    }


def improvement_probabilities(
    scores: Mapping[str, np.ndarray], reps: int = 2000, seed: int = 0
) -> dict[tuple[str, str], Estimate]:
    """P(X > Y) for each pair of methods (in the order given): the probability that a run of X scores higher than
    a run of Y on a task picked at random (ties count half), with its 95% interval.

    :return: ``{(x, y): Estimate}``; empty with fewer than two methods.
    """
    library, _ = _rliable()
    _check_scores(scores, 2)
    methods = list(scores)
    pairs = {f"{x},{y}": (scores[x], scores[y]) for i, x in enumerate(methods) for y in methods[i + 1 :]}
    if not pairs:
        return {}
    points, intervals = _bootstrap(
        library, pairs, lambda x, y: np.array([_probability_of_improvement(x, y)]), reps, seed
    )
    result = {}
    for i, x in enumerate(methods):
        for y in methods[i + 1 :]:
            key = f"{x},{y}"
            result[(x, y)] = Estimate(
                float(points[key][0]), float(intervals[key][0, 0]), float(intervals[key][1, 0])
            )
    return result


def per_task_estimates(
    scores: Mapping[str, np.ndarray], reps: int = 2000, seed: int = 0
) -> dict[str, list[Estimate]]:
    """The mean over runs of every task, with its 95% interval (runs resampled within the task).

    :return: ``{method: [Estimate per task]}``.
    """
    library, _ = _rliable()
    _check_scores(scores, 2)
    points, intervals = _bootstrap(library, dict(scores), lambda values: values.mean(axis=0), reps, seed)
    return {
        method: [
            Estimate(float(points[method][t]), float(intervals[method][0, t]), float(intervals[method][1, t]))
            for t in range(scores[method].shape[1])
        ]
        for method in scores
    }


def profiles(
    scores: Mapping[str, np.ndarray], reps: int = 2000, taus: np.ndarray = TAUS
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Performance profiles: for each tau, the fraction of runs x tasks scoring above it, with 95% bands.

    :return: ``(profiles, bands)`` as rliable returns them (``bands[method]`` is ``[2, len(taus)]``).
    """
    library, _ = _rliable()
    _check_scores(scores, 2)
    return library.create_performance_profile(
        dict(scores), taus, reps=reps, confidence_interval_size=CONFIDENCE
    )


def curve_estimates(
    values: np.ndarray, estimator: str = "IQM", reps: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An aggregate of ``values [runs, tasks, steps]`` at every step, with its 95% interval.

    One bootstrap covers all the steps (each resample draws runs once, per task), so the band is consistent
    along the curve.

    :param estimator: A name of :data:`ESTIMATORS`.
    :return: ``(center, low, high)``, each ``[steps]``.
    """
    library, _ = _rliable()
    if estimator not in ESTIMATORS:
        raise ZooError(f"Unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}.")
    if values.ndim != 3:
        raise ValueError(f"values must be [runs, tasks, steps], got shape {values.shape}")
    function = ESTIMATORS[estimator]
    points, intervals = _bootstrap(library, {"curve": values}, function, reps, seed)
    return points["curve"], intervals["curve"][0], intervals["curve"][1]


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What :func:`write_report` wrote: the Markdown text and the files."""

    markdown: str
    files: list[Path]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_report(
    scores: Mapping[str, np.ndarray],
    task_names: Sequence[str],
    output: str | Path,
    reps: int = 2000,
    seed: int = 0,
    title: str = "",
    dpi: int = 150,
    sources: Mapping[str, Sequence[str]] | None = None,
) -> Report:
    """The statistics of final scores as ``statistics.md`` / ``statistics.json`` and PNGs in ``output``.

    PNGs: ``aggregates.png`` (the four metrics with intervals), ``performance_profiles.png``, ``per_task.png``
    and, with two methods or more, ``probability_of_improvement.png``.

    :param scores: Final scores per method, ``[runs, tasks]``, tasks in the order of ``task_names``.
    :param sources: The run folders behind each method (listed in the JSON file).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    aggregates = aggregate_estimates(scores, reps, seed)
    improvements = improvement_probabilities(scores, reps, seed)
    tasks = per_task_estimates(scores, reps, seed)
    curves, bands = profiles(scores, reps)
    short = [short_task_name(name) for name in task_names]

    runs = {method: int(value.shape[0]) for method, value in scores.items()}
    lines = [f"# {title or 'Statistics'}", ""]
    lines += [
        f"Final success rates of {sum(runs.values())} runs on {len(task_names)} tasks; "
        f"95% stratified bootstrap intervals ({reps} resamples, rliable).",
        "",
        "## Aggregates over runs x tasks (optimality gap: lower is better)",
        "",
    ]
    lines += _table(
        ["method", "runs", *ESTIMATORS],
        [
            [method, str(runs[method]), *(str(aggregates[method][name]) for name in ESTIMATORS)]
            for method in scores
        ],
    )
    if improvements:
        lines += ["", "## Probability of improvement P(X > Y)", ""]
        lines += _table(
            ["X", "Y", "P(X > Y)"], [[x, y, str(estimate)] for (x, y), estimate in improvements.items()]
        )
    lines += ["", "## Per task: mean success over runs", ""]
    lines += _table(
        ["task", *scores],
        [[name, *(str(tasks[method][t]) for method in scores)] for t, name in enumerate(short)],
    )
    markdown = "\n".join(lines) + "\n"
    files = [output / "statistics.md", output / "statistics.json"]
    files[0].write_text(markdown)
    summary = {
        "confidence": CONFIDENCE,
        "bootstrap_reps": reps,
        "task_names": list(task_names),
        "runs": runs,
        "sources": {method: list(paths) for method, paths in (sources or {}).items()},
        "scores": {method: value.tolist() for method, value in scores.items()},
        "aggregates": {
            method: {name: estimate.as_dict() for name, estimate in values.items()}
            for method, values in aggregates.items()
        },
        "probability_of_improvement": [
            {"x": x, "y": y, **estimate.as_dict()} for (x, y), estimate in improvements.items()
        ],
        "per_task": {
            method: dict(zip(task_names, (e.as_dict() for e in values), strict=True))
            for method, values in tasks.items()
        },
    }
    files[1].write_text(json.dumps(summary, indent=1) + "\n")

    colors = {method: f"C{i}" for i, method in enumerate(scores)}
    files.append(_plot_aggregates(aggregates, colors, output / "aggregates.png", dpi, plt))
    files.append(_plot_profiles(curves, bands, colors, output / "performance_profiles.png", dpi, plt))
    files.append(_plot_per_task(tasks, short, colors, output / "per_task.png", dpi, plt))
    if improvements:
        files.append(_plot_improvements(improvements, output / "probability_of_improvement.png", dpi, plt))
    return Report(markdown, files)


# Inches of a bar chart besides its rows (titles, axis labels): with less, one row left matplotlib no room for them
# ("Tight layout not applied") and the chart came out squashed.
_BAR_ROWS_BASE = 1.2


def _plot_aggregates(
    aggregates: dict[str, dict[str, Estimate]], colors: dict[str, str], path: Path, dpi: int, plt: Any
) -> Path:
    """One panel per metric, one horizontal interval per method (the layout of rliable's figures)."""
    methods = list(aggregates)
    fig, axes = plt.subplots(
        1,
        len(ESTIMATORS),
        figsize=(3.0 * len(ESTIMATORS), _BAR_ROWS_BASE + 0.45 * len(methods)),
        squeeze=False,
    )
    for ax, name in zip(axes[0], ESTIMATORS, strict=True):
        for row, method in enumerate(methods):
            estimate = aggregates[method][name]
            ax.barh(
                row,
                estimate.high - estimate.low,
                left=estimate.low,
                height=0.6,
                color=colors[method],
                alpha=0.75,
            )
            ax.vlines(estimate.value, row - 0.3, row + 0.3, color="black", lw=1.2)
        ax.set_yticks(range(len(methods)), methods if ax is axes[0, 0] else [""] * len(methods))
        ax.set_title(name, fontsize=10)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].invert_yaxis()
    fig.supxlabel("Success rate", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _plot_profiles(
    curves: dict[str, np.ndarray],
    bands: dict[str, np.ndarray],
    colors: dict[str, str],
    path: Path,
    dpi: int,
    plt: Any,
) -> Path:
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for method, curve in curves.items():
        ax.plot(TAUS, curve, color=colors[method], label=method, lw=1.6)
        ax.fill_between(TAUS, bands[method][0], bands[method][1], color=colors[method], alpha=0.2, lw=0)
    ax.set_xlabel(r"Success rate $\tau$")
    ax.set_ylabel(r"Fraction of runs x tasks with score $> \tau$")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _plot_per_task(
    tasks: dict[str, list[Estimate]],
    short: Sequence[str],
    colors: dict[str, str],
    path: Path,
    dpi: int,
    plt: Any,
) -> Path:
    methods = list(tasks)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(short) * max(1, len(methods) / 2) + 1.5), 3.8))
    x = np.arange(len(short))
    for i, method in enumerate(methods):
        values = np.array([e.value for e in tasks[method]])
        errors = np.array(
            [[e.value - e.low for e in tasks[method]], [e.high - e.value for e in tasks[method]]]
        )
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            values,
            width,
            yerr=errors,
            capsize=2,
            color=colors[method],
            label=method,
        )
    ax.set_xticks(
        x, short, rotation=45 if len(short) > 4 else 0, ha="right" if len(short) > 4 else "center", fontsize=8
    )
    ax.set_ylabel("Mean success over runs")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _plot_improvements(improvements: dict[tuple[str, str], Estimate], path: Path, dpi: int, plt: Any) -> Path:
    pairs = list(improvements)
    fig, ax = plt.subplots(figsize=(5.0, _BAR_ROWS_BASE + 0.45 * len(pairs)))
    for row, pair in enumerate(pairs):
        estimate = improvements[pair]
        ax.barh(row, estimate.high - estimate.low, left=estimate.low, height=0.6, color="C0", alpha=0.75)
        ax.vlines(estimate.value, row - 0.3, row + 0.3, color="black", lw=1.2)
    ax.axvline(0.5, color="gray", ls="--", lw=1)
    ax.set_yticks(range(len(pairs)), [f"P({x} > {y})" for x, y in pairs])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("Probability of improvement")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


__all__ = [
    "CONFIDENCE",
    "ESTIMATORS",
    "Estimate",
    "Report",
    "aggregate_estimates",
    "curve_estimates",
    "improvement_probabilities",
    "per_task_estimates",
    "profiles",
    "write_report",
]
