"""Pictures of routing statistics (matplotlib, Agg canvas): the paper's Figs. 6 and 8.

* :func:`plot_modules_per_task`: modules used per task with error bars, tasks sorted (Fig. 8).
* :func:`plot_routing_graphs`: the routing DAG of each task: candidate edges in light grey, path edges
  coloured by how often they are used, modules never active greyed out (Fig. 6 b-d).
* :func:`embed_routes` + :func:`plot_route_embedding`: a 2-D t-SNE of the routing paths coloured by task
  (Fig. 6 a).

matplotlib and scikit-learn are optional dependencies (``pip install d2r_sb3[zoo]``); they are imported when a
function needs them. Figures are drawn on their own Agg canvas, so pyplot's global state is left alone and no
display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from d2r_sb3.analysis.routes import (
    RouteSamples,
    RoutingAnalysis,
    TaskRouting,
    module_labels,
    resolve_task_index,
)
from d2r_sb3.envs import short_task_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

EMBEDDING_METHODS: tuple[str, ...] = ("tsne", "pca")
ROUTE_FEATURES: tuple[str, ...] = ("edges", "probabilities")
# Greys for everything the route does not use, so that the used part stands out as in the paper's figure.
CANDIDATE_EDGE_COLOR = "#d0d0d0"
INACTIVE_FACE, INACTIVE_EDGE, INACTIVE_TEXT = "#f0f0f0", "#c0c0c0", "#a8a8a8"
OUTPUT_FACE = "#404040"


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.cm
        import matplotlib.colors
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError(
            "Routing pictures need matplotlib: pip install 'd2r_sb3[zoo]' (or matplotlib)."
        ) from error
    return matplotlib


def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot, works headless)."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def task_colors(n_tasks: int) -> list[tuple[float, float, float, float]]:
    """Distinct colours for ``n_tasks`` tasks (tab10 up to 10, tab20 up to 20, then tab20 + tab20b + tab20c)."""
    matplotlib = _matplotlib()
    if n_tasks <= 10:
        names = ["tab10"]
    elif n_tasks <= 20:
        names = ["tab20"]
    else:
        names = ["tab20", "tab20b", "tab20c"]
    palette = [color for name in names for color in matplotlib.colormaps[name].colors]
    if n_tasks > len(palette):
        palette = [matplotlib.colormaps["hsv"](i / n_tasks) for i in range(n_tasks)]
    return [tuple(palette[i]) for i in range(n_tasks)]


# --------------------------------------------------------------------------------------------------------
# Fig. 8: modules used per task
# --------------------------------------------------------------------------------------------------------
def plot_modules_per_task(
    analysis: RoutingAnalysis, path: str | Path, sort: bool = True, title: str | None = None, dpi: int = 150
) -> Path:
    """Bar chart of the mean number of active modules per task with ± std error bars (paper Fig. 8).

    Bars are coloured by the task's success rate when the analysis has an evaluation.

    :param analysis: the routing statistics.
    :param path: PNG file to write.
    :param sort: order tasks by the mean number of modules (ascending), as in the paper.
    :param title: figure title (default: a description with the number of steps per task).
    :param dpi: resolution.
    :return: ``path``.
    """
    matplotlib = _matplotlib()
    tasks = [task for task in analysis.tasks if task.steps > 0]
    if not tasks:
        raise ValueError("no task has routing samples: nothing to plot.")
    if sort:
        tasks.sort(key=lambda task: task.modules_mean)
    means = np.array([task.modules_mean for task in tasks])
    stds = np.array([task.modules_std for task in tasks])
    figure = _new_figure(max(6.0, 0.32 * len(tasks) + 2.5), 4.2 if len(tasks) <= 20 else 5.5)
    ax = figure.add_subplot()
    positions = np.arange(len(tasks))
    successes = [task.success for task in tasks]
    if all(success is not None for success in successes):
        cmap = matplotlib.colormaps["viridis"]
        colors = [cmap(success) for success in successes]
        mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=cmap)
        figure.colorbar(mappable, ax=ax, label="success rate", fraction=0.04, pad=0.01)
    else:
        colors = ["tab:green"] * len(tasks)
    ax.bar(positions, means, yerr=stds, color=colors, capsize=3, edgecolor="black", linewidth=0.5)
    if len(tasks) <= 20:
        for x, mean, std in zip(positions, means, stds, strict=True):
            ax.text(float(x), mean + std + 0.1, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(
        positions, [short_task_name(task.name) for task in tasks], rotation=45 if len(tasks) <= 20 else 90
    )
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right" if len(tasks) <= 20 else "center")
    ax.set_ylabel("modules used per step")
    ax.set_ylim(0, analysis.n_modules + 1.0)  # room for the value labels
    ax.set_xlim(-0.6, len(tasks) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    steps = {task.steps for task in tasks}
    per_task = f"{steps.pop()} steps per task" if len(steps) == 1 else "steps per task vary"
    ax.set_title(
        title or f"Modules used per task\n(mean ± std over {per_task}, {analysis.n_modules} modules)"
    )
    return _save(figure, path, dpi)


# --------------------------------------------------------------------------------------------------------
# Fig. 6 b-d: routing DAGs
# --------------------------------------------------------------------------------------------------------
def _edge_colormap() -> Colormap:
    """Greens without its near-white start, so rarely used edges stay visible against the grey ones."""
    matplotlib = _matplotlib()
    greens = matplotlib.colormaps["Greens"]
    return matplotlib.colors.ListedColormap(greens(np.linspace(0.3, 1.0, 256)), name="GreensVisible")


def node_positions(n_modules: int) -> np.ndarray:
    """Positions of modules ``1..n`` and the output node on a circle, clockwise from the top, ``[n + 1, 2]``."""
    angles = math.pi / 2 - 2 * math.pi * np.arange(n_modules + 1) / (n_modules + 1)
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def draw_routing_graph(
    ax: Axes, task: TaskRouting, candidates: np.ndarray, title: str | None = None, show_title: bool = True
) -> None:
    """Draw one task's routing DAG on ``ax``.

    Light grey lines are all candidate edges; arrows (source module -> reading node) are the edges on the
    routing path, coloured and widened by the fraction of steps using them. Modules are filled by how often
    they are active; modules never active are greyed out.

    :param ax: matplotlib axes.
    :param task: the task's statistics.
    :param candidates: bool ``[n + 1, n]`` candidate edges.
    :param title: panel title (default: task name, modules used and success).
    :param show_title: whether to draw the title.
    """
    matplotlib = _matplotlib()
    from matplotlib.collections import LineCollection
    from matplotlib.patches import FancyArrowPatch

    n = candidates.shape[-1]
    positions = node_positions(n)
    node_radius_pt = 7.0 if n <= 16 else 5.0
    targets, sources = np.nonzero(candidates)
    ax.add_collection(
        LineCollection(
            [(positions[s], positions[t]) for t, s in zip(targets, sources, strict=True)],
            colors=CANDIDATE_EDGE_COLOR,
            linewidths=0.5,
            zorder=1,
        )
    )
    cmap = _edge_colormap()
    frequency = np.nan_to_num(task.edge_frequency)
    used = [(frequency[t, s], t, s) for t, s in zip(targets, sources, strict=True) if frequency[t, s] > 0]
    for value, target, source in sorted(used):  # most used drawn last, on top
        ax.add_patch(
            FancyArrowPatch(
                positions[source],
                positions[target],
                arrowstyle="-|>",
                mutation_scale=6 + 4 * value,
                color=cmap(value),
                linewidth=0.6 + 2.4 * value,
                shrinkA=node_radius_pt,
                shrinkB=node_radius_pt,
                zorder=2 + value,
            )
        )
    module_frequency = np.nan_to_num(task.module_frequency)
    greens = matplotlib.colormaps["Greens"]
    labels = module_labels(n)
    for node in range(n + 1):
        x, y = positions[node]
        if node == n:
            face, edge, text = OUTPUT_FACE, "black", "white"
        elif module_frequency[node] > 0:
            face, edge, text = greens(0.15 + 0.45 * module_frequency[node]), "darkgreen", "black"
        else:
            face, edge, text = INACTIVE_FACE, INACTIVE_EDGE, INACTIVE_TEXT
        ax.plot(
            x,
            y,
            marker="o",
            markersize=2 * node_radius_pt,
            markerfacecolor=face,
            markeredgecolor=edge,
            zorder=5,
            linestyle="none",
        )
        ax.text(
            x, y, labels[node], ha="center", va="center", fontsize=6 if node < n else 5, color=text, zorder=6
        )
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_aspect("equal")
    ax.axis("off")
    if show_title:
        if title is None:
            success = "" if task.success is None else f", success {task.success:.2f}"
            title = f"{short_task_name(task.name)}\nmodules {task.modules_mean:.1f} ± {task.modules_std:.1f}{success}"
        ax.set_title(title, fontsize=9)


def plot_routing_graphs(
    analysis: RoutingAnalysis,
    path: str | Path,
    tasks: Sequence[str] | None = None,
    ncols: int | None = None,
    panel_size: float = 3.0,
    dpi: int = 150,
) -> Path:
    """One routing-DAG panel per task (paper Fig. 6 b-d), in a grid, with a shared edge-frequency colour bar.

    :param analysis: the routing statistics.
    :param path: PNG file to write.
    :param tasks: tasks to draw (names with or without ``-v3``; e.g. two tasks side by side); default all.
    :param ncols: panels per row (default: all chosen tasks up to 5 per row, 10 for more than 25 tasks).
    :param panel_size: inches per panel.
    :param dpi: resolution.
    :return: ``path``.
    """
    matplotlib = _matplotlib()
    indices = (
        [resolve_task_index(analysis.task_names, name) for name in tasks]
        if tasks
        else range(len(analysis.tasks))
    )
    chosen = [analysis.tasks[i] for i in indices]
    if not chosen:
        raise ValueError("no task to draw: pass at least one task name.")
    if ncols is None:
        ncols = min(len(chosen), 5 if len(chosen) <= 25 else 10)
    nrows = math.ceil(len(chosen) / ncols)
    figure = _new_figure(panel_size * ncols + 0.8, panel_size * nrows + 0.6)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax, task in zip(axes.flat, chosen, strict=False):
        if task.steps == 0:
            ax.set_title(f"{short_task_name(task.name)}\n(no samples)", fontsize=9)
            ax.axis("off")
            continue
        draw_routing_graph(ax, task, analysis.candidates)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=_edge_colormap())
    figure.colorbar(mappable, ax=axes, label="fraction of steps using the edge", fraction=0.03, pad=0.01)
    figure.suptitle(
        "Routing paths (grey: candidate edges; green: used edges; grey nodes: modules never active)",
        fontsize=10,
    )
    return _save(figure, path, dpi)


# --------------------------------------------------------------------------------------------------------
# Fig. 6 a: 2-D embedding of routing paths
# --------------------------------------------------------------------------------------------------------
@dataclass
class RouteEmbedding:
    """2-D embedding of routing paths.

    :ivar points: float ``[M, 2]`` embedded samples.
    :ivar task_ids: int ``[M]`` task of each point.
    :ivar task_names: task names.
    :ivar requested_per_task: samples per task that were asked for.
    :ivar counts: int ``[T]`` samples per task actually embedded (fewer when a task had fewer steps).
    :ivar method: ``"tsne"`` or ``"pca"``.
    :ivar features: ``"edges"`` or ``"probabilities"``.
    :ivar distinct_paths: number of different routing paths among the embedded samples (equal paths land on
        the same point when ``features="edges"``).
    """

    points: np.ndarray
    task_ids: np.ndarray
    task_names: list[str]
    requested_per_task: int
    counts: np.ndarray
    method: str
    features: str
    distinct_paths: int

    @property
    def shortfalls(self) -> dict[str, int]:
        """Tasks with fewer samples than requested, with the number used."""
        return {
            name: int(count)
            for name, count in zip(self.task_names, self.counts, strict=True)
            if count < self.requested_per_task
        }


def subsample_per_task(samples: RouteSamples, per_task: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``per_task`` samples of each task, drawn without replacement (all of a task's samples
    when it has fewer).

    :param samples: routing samples.
    :param per_task: samples wanted per task.
    :param seed: seed of the draw.
    :return: sorted int indices into ``samples``.
    """
    if per_task < 1:
        raise ValueError(f"samples per task must be >= 1, got {per_task}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for task in range(len(samples.task_names)):
        rows = np.flatnonzero(samples.task_ids == task)
        chosen.append(rows if rows.size <= per_task else rng.choice(rows, size=per_task, replace=False))
    return np.sort(np.concatenate(chosen))


def embed_routes(
    samples: RouteSamples | RoutingAnalysis,
    samples_per_task: int = 1000,
    method: str = "tsne",
    features: str = "edges",
    perplexity: float = 30.0,
    seed: int = 0,
    n_threads: int | None = 1,
) -> RouteEmbedding:
    """Embed routing paths (flattened over the candidate edges) in 2-D, as the paper's Fig. 6 a.

    t-SNE costs grow with the number of points: 10 tasks x 1,000 samples take about a minute on one CPU core;
    use fewer samples per task or ``method="pca"`` for a quick look.

    :param samples: routing samples (or an analysis, whose samples are used).
    :param samples_per_task: samples drawn per task (the paper: 1,000); tasks with fewer steps use all of
        theirs (see :attr:`RouteEmbedding.shortfalls`).
    :param method: ``"tsne"`` (scikit-learn's Barnes-Hut t-SNE) or ``"pca"``.
    :param features: ``"edges"`` (the chosen edges, 0/1: steps with the same path share one point) or
        ``"probabilities"`` (the gates' routing probabilities, which also separate steps with equal paths).
    :param perplexity: t-SNE perplexity, lowered automatically below a third of the number of points.
    :param seed: seed of the subsampling and of t-SNE.
    :param n_threads: OpenMP threads of t-SNE (``None``: scikit-learn's default, every core). One thread is the
        default because Barnes-Hut t-SNE's threads spin-wait: on a busy or shared machine several threads make
        it many times slower (50 points: 20 s instead of 0.5 s); more threads help only on idle cores.
    """
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"Unknown embedding method {method!r}; choose one of {EMBEDDING_METHODS}.")
    if features not in ROUTE_FEATURES:
        raise ValueError(f"Unknown route features {features!r}; choose one of {ROUTE_FEATURES}.")
    if isinstance(samples, RoutingAnalysis):
        samples = samples.samples
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError("Route embeddings need scikit-learn: pip install 'd2r_sb3[zoo]'.") from error
    index = subsample_per_task(samples, samples_per_task, seed)
    if index.size < 4:
        raise ValueError(f"an embedding needs at least 4 routing samples, got {index.size}.")
    vectors = samples.edge_features(features)[index]
    if method == "tsne":
        # sklearn needs perplexity < number of points; a third keeps every neighbourhood meaningful.
        effective = min(perplexity, max(1.0, (index.size - 1) / 3))
        # sklearn's PCA initialisation divides by the spread of the first component: when every sample is the
        # same vector that is 0 and Barnes-Hut t-SNE crashes, so start from a random layout instead.
        init = "pca" if np.unique(vectors, axis=0).shape[0] > 1 else "random"
        tsne = TSNE(n_components=2, perplexity=effective, init=init, random_state=seed)
        with threadpool_limits(limits=n_threads):
            points = tsne.fit_transform(vectors)
    else:
        points = PCA(n_components=2, random_state=seed).fit_transform(vectors)
    task_ids = samples.task_ids[index]
    return RouteEmbedding(
        points=np.asarray(points, dtype=np.float32),
        task_ids=task_ids,
        task_names=list(samples.task_names),
        requested_per_task=samples_per_task,
        counts=np.bincount(task_ids, minlength=len(samples.task_names)),
        method=method,
        features=features,
        distinct_paths=samples.distinct_paths(index),
    )


def plot_route_embedding(
    embedding: RouteEmbedding,
    path: str | Path,
    title: str | None = None,
    point_size: float = 6.0,
    dpi: int = 150,
) -> Path:
    """Scatter plot of an embedding, one colour per task (paper Fig. 6 a).

    :param embedding: from :func:`embed_routes`.
    :param path: PNG file to write.
    :param title: figure title (default: method and samples per task).
    :param point_size: marker area.
    :param dpi: resolution.
    :return: ``path``.
    """
    n_tasks = len(embedding.task_names)
    figure = _new_figure(7.5 if n_tasks <= 20 else 10.0, 6.0)
    ax = figure.add_subplot()
    colors = task_colors(n_tasks)
    for task, name in enumerate(embedding.task_names):
        points = embedding.points[embedding.task_ids == task]
        if len(points):
            ax.scatter(
                points[:, 0],
                points[:, 1],
                s=point_size,
                color=colors[task],
                alpha=0.7,
                linewidths=0,
                label=f"{short_task_name(name)} ({len(points)})",
            )
    ax.legend(
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=7,
        markerscale=2.5,
        frameon=False,
        ncols=1 if n_tasks <= 25 else 2,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    label = "t-SNE" if embedding.method == "tsne" else "PCA"
    what = "routing paths" if embedding.features == "edges" else "routing probabilities"
    ax.set_title(
        title
        or f"{label} of {what}\n(up to {embedding.requested_per_task} samples per task, "
        f"{embedding.distinct_paths} distinct path{'' if embedding.distinct_paths == 1 else 's'})"
    )
    return _save(figure, path, dpi)
