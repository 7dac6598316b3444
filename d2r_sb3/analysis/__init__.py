"""Routing analysis of D2R policies: which modules and edges each task uses (paper Figs. 6 and 8).

Typical use::

    from d2r_sb3 import load_policy
    from d2r_sb3.analysis import analyze_routing, write_report

    loaded = load_policy("logs/d2r/MT10-rand_1")
    analysis = analyze_routing(loaded, loaded.make_env(), n_episodes=5)
    print(analysis.markdown())
    write_report(analysis, "routing_analysis", graph_tasks=["drawer-close", "peg-insert-side"])

The command-line version is ``python zoo/analyze.py --model ...``.
"""

from d2r_sb3.analysis.plots import (
    RouteEmbedding,
    draw_routing_graph,
    embed_routes,
    plot_modules_per_task,
    plot_route_embedding,
    plot_routing_graphs,
)
from d2r_sb3.analysis.report import RoutingReport, write_report
from d2r_sb3.analysis.routes import (
    RouteCollector,
    RouteSamples,
    RoutingAnalysis,
    TaskRouting,
    analyze_routing,
    collect_routes,
    get_router,
    path_edges,
    summarize_routes,
)

__all__ = [
    "RouteCollector",
    "RouteEmbedding",
    "RouteSamples",
    "RoutingAnalysis",
    "RoutingReport",
    "TaskRouting",
    "analyze_routing",
    "collect_routes",
    "draw_routing_graph",
    "embed_routes",
    "get_router",
    "path_edges",
    "plot_modules_per_task",
    "plot_route_embedding",
    "plot_routing_graphs",
    "summarize_routes",
    "write_report",
]
