"""Write a complete routing report (JSON, Markdown table and the three pictures) into one folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from d2r_sb3.analysis.plots import (
    RouteEmbedding,
    embed_routes,
    plot_modules_per_task,
    plot_route_embedding,
    plot_routing_graphs,
)
from d2r_sb3.analysis.routes import RoutingAnalysis

JSON_NAME = "routing.json"
MARKDOWN_NAME = "routing.md"
MODULES_PLOT_NAME = "modules_per_task.png"
GRAPHS_PLOT_NAME = "routing_graphs.png"
EMBEDDING_PLOT_NAME = "routes_tsne.png"


@dataclass
class RoutingReport:
    """Files written by :func:`write_report` (``None`` for a picture that was not asked for).

    :ivar json: per-task statistics.
    :ivar markdown: the Markdown table.
    :ivar modules_plot: modules used per task (Fig. 8).
    :ivar graphs_plot: routing DAGs (Fig. 6 b-d).
    :ivar embedding_plot: 2-D embedding of routing paths (Fig. 6 a).
    :ivar embedding: the embedding behind ``embedding_plot``.
    :ivar notes: remarks for the user (e.g. tasks with fewer samples than requested).
    """

    json: Path
    markdown: Path
    modules_plot: Path | None = None
    graphs_plot: Path | None = None
    embedding_plot: Path | None = None
    embedding: RouteEmbedding | None = None
    notes: list[str] = field(default_factory=list)

    def files(self) -> list[Path]:
        """Every file written."""
        paths = (self.json, self.markdown, self.modules_plot, self.graphs_plot, self.embedding_plot)
        return [path for path in paths if path is not None]


def write_report(
    analysis: RoutingAnalysis,
    output_dir: str | Path,
    graph_tasks: Sequence[str] | None = None,
    plots: bool = True,
    embedding_samples_per_task: int | None = 1000,
    embedding_method: str = "tsne",
    embedding_features: str = "edges",
    seed: int = 0,
    embedding_threads: int | None = 1,
) -> RoutingReport:
    """Write ``routing.json``, ``routing.md`` and the pictures into ``output_dir``.

    :param analysis: the routing statistics (e.g. from :func:`~d2r_sb3.analysis.analyze_routing`).
    :param output_dir: folder to write into (created if needed).
    :param graph_tasks: tasks of the routing-DAG picture (default: every task).
    :param plots: draw the pictures at all.
    :param embedding_samples_per_task: samples per task of the embedding (the paper: 1,000); ``None`` skips it.
    :param embedding_method: ``"tsne"`` or ``"pca"``.
    :param embedding_features: ``"edges"`` or ``"probabilities"`` (see :func:`~d2r_sb3.analysis.embed_routes`).
    :param seed: seed of the embedding's subsampling and t-SNE.
    :param embedding_threads: OpenMP threads of t-SNE (see :func:`~d2r_sb3.analysis.embed_routes`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = RoutingReport(
        json=analysis.save_json(output_dir / JSON_NAME), markdown=output_dir / MARKDOWN_NAME
    )
    report.markdown.write_text(analysis.markdown() + "\n")
    if not plots:
        return report
    report.modules_plot = plot_modules_per_task(analysis, output_dir / MODULES_PLOT_NAME)
    report.graphs_plot = plot_routing_graphs(analysis, output_dir / GRAPHS_PLOT_NAME, tasks=graph_tasks)
    if embedding_samples_per_task is not None:
        embedding = embed_routes(
            analysis,
            embedding_samples_per_task,
            method=embedding_method,
            features=embedding_features,
            seed=seed,
            n_threads=embedding_threads,
        )
        report.embedding = embedding
        report.embedding_plot = plot_route_embedding(embedding, output_dir / EMBEDDING_PLOT_NAME)
        if embedding.shortfalls:
            used = ", ".join(f"{name}: {count}" for name, count in embedding.shortfalls.items())
            report.notes.append(
                f"{embedding_samples_per_task} samples per task were requested for the embedding, but some tasks "
                f"have fewer routing steps, so all of theirs were used ({used}). Run more --episodes for more."
            )
    return report
