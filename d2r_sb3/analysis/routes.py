"""Routing statistics of a routing policy (D2R): modules and edges each task uses (paper Figs. 6 and 8).

The paper rolls the final policy five times per task with deterministic (TopK) routes, keeps the routing
path of every step (1,000 per task with 200-step episodes) and reports, per task, the number of modules the
path uses (Fig. 8; a module counts when it is reachable backward from the output node along the chosen edges,
the paper's reading of Fig. 3: a module no later module selects is "unutilized").

:func:`collect_routes` does the roll-out with :func:`~d2r_sb3.common.evaluation.evaluate_per_task`, asking
the policy for its routing path before every step, so the success rates belong to the very episodes the
routes come from. :func:`summarize_routes` turns the samples into per-task statistics and
:func:`analyze_routing` does both.

Layout (that of :class:`~d2r_sb3.d2r.routing.RoutingPath`): ``edges[i, j]`` says that node ``i`` reads module
``j + 1``; node ``i < n`` is module ``i + 1`` and node ``n`` is the output node ("out"). Candidate edges are
the finite entries of the gate logits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import VecEnv

from d2r_sb3.common.evaluation import TaskEvaluation, evaluate_per_task
from d2r_sb3.d2r.routing import RoutingPath
from d2r_sb3.envs import short_task_name

Router = Callable[..., RoutingPath]

JSON_FORMAT = "d2r_sb3.routing_analysis"
JSON_VERSION = 1


def get_router(model: Any) -> Router:
    """The ``route(obs, deterministic=...)`` method of a routing model.

    :param model: an SB3 algorithm (e.g. :class:`~d2r_sb3.D2RSAC`), a policy (:class:`~d2r_sb3.D2RPolicy`) or a
        :class:`~d2r_sb3.serialization.LoadedPolicy`.
    :return: the bound ``route`` method of the policy.
    :raises TypeError: when the policy has no routing paths (e.g. an MT-SAC or multi-head SAC baseline).
    """
    policy = model if isinstance(model, BasePolicy) else getattr(model, "policy", model)
    route = getattr(policy, "route", None)
    if not callable(route):
        raise TypeError(
            f"{type(policy).__name__} has no routing paths (no `route` method): routing analysis needs a routing "
            "policy such as D2R (algo 'd2r', D2RPolicy). Baselines like MT-SAC or multi-head SAC do not route."
        )
    return route


def module_labels(n_modules: int) -> list[str]:
    """Labels of the graph nodes in edge-row order: ``"1" .. "n"`` for the modules, then ``"out"``."""
    return [str(i + 1) for i in range(n_modules)] + ["out"]


def path_edges(edges: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Edges on the routing path: the chosen edges into active modules or into the output node.

    A module that the output cannot reach still has gate-chosen sources, but nothing it computes reaches the
    action; these "dead" edges are dropped here.

    :param edges: bool ``[..., n + 1, n]`` chosen edges.
    :param active: bool ``[..., n]`` active modules.
    :return: bool ``[..., n + 1, n]``.
    """
    on_path = np.concatenate([active, np.ones_like(active[..., :1])], axis=-1)  # the output is always on it
    return edges & on_path[..., :, None]


@dataclass
class RouteSamples:
    """Routing paths collected step by step, one row per (step, task) sample.

    :ivar task_names: task names in env-column order.
    :ivar task_ids: int ``[N]``: the task (env column) of each sample.
    :ivar edges: bool ``[N, n + 1, n]``: edges chosen by the gates.
    :ivar active: bool ``[N, n]``: modules reachable backward from the output node.
    :ivar candidates: bool ``[n + 1, n]``: every edge the routing graph allows.
    :ivar probabilities: float32 ``[N, n + 1, n]``: routing probabilities, the softmax of each node's gate
        logits over its candidates (zero off the candidates and for input nodes), or ``None``.
    """

    task_names: list[str]
    task_ids: np.ndarray
    edges: np.ndarray
    active: np.ndarray
    candidates: np.ndarray
    probabilities: np.ndarray | None = None

    @property
    def n_modules(self) -> int:
        return int(self.active.shape[-1])

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])

    def steps_per_task(self) -> np.ndarray:
        """Number of samples of each task, ``int [T]``."""
        return np.bincount(self.task_ids, minlength=len(self.task_names))

    def path_edges(self) -> np.ndarray:
        """:func:`path_edges` of every sample, bool ``[N, n + 1, n]``."""
        return path_edges(self.edges, self.active)

    def edge_features(self, kind: str = "edges") -> np.ndarray:
        """Routing paths flattened over the candidate edges, float32 ``[N, n_candidates]`` (for embeddings).

        :param kind: ``"edges"`` (chosen edges as 0/1) or ``"probabilities"`` (routing probabilities; these
            also vary between steps whose chosen edges are equal).
        """
        if kind == "edges":
            return self.edges[:, self.candidates].astype(np.float32)
        if kind == "probabilities":
            if self.probabilities is None:
                raise ValueError(
                    "these samples have no routing probabilities; collect them with RouteCollector."
                )
            return self.probabilities[:, self.candidates].astype(np.float32)
        raise ValueError(f"Unknown route feature kind {kind!r}; choose 'edges' or 'probabilities'.")

    def distinct_paths(self, rows: np.ndarray | None = None) -> int:
        """Number of different routing paths (chosen edge sets) among the samples (``rows``: a selection)."""
        edges = self.edges if rows is None else self.edges[rows]
        if len(edges) == 0:
            return 0
        return int(np.unique(np.packbits(edges.reshape(len(edges), -1), axis=-1), axis=0).shape[0])


class RouteCollector:
    """``on_step`` callback for :func:`evaluate_per_task` that records the routing path of every counting env.

    :param router: the policy's ``route`` method (see :func:`get_router`).
    :param task_names: names of the env columns.
    :param deterministic: TopK routes (as in evaluation) if ``True``, SampleK otherwise.
    """

    def __init__(self, router: Router, task_names: Sequence[str], deterministic: bool = True):
        self.router = router
        self.task_names = list(task_names)
        self.deterministic = deterministic
        self._task_ids: list[np.ndarray] = []
        self._edges: list[np.ndarray] = []
        self._active: list[np.ndarray] = []
        self._probabilities: list[np.ndarray] = []
        self._candidates: np.ndarray | None = None

    def __call__(self, obs: np.ndarray, counting: np.ndarray) -> None:
        columns = np.flatnonzero(counting)
        if columns.size == 0:
            return
        path = self.router(obs[columns], deterministic=self.deterministic)
        self._task_ids.append(columns)
        self._edges.append(path.edges.cpu().numpy().astype(bool))
        self._active.append(path.active.cpu().numpy().astype(bool))
        # Input-node rows are all -inf; their softmax is NaN and stands for "no routing probability" (0).
        probabilities = th.nan_to_num(th.softmax(path.logits.float(), dim=-1), nan=0.0)
        self._probabilities.append(probabilities.cpu().numpy())
        if self._candidates is None:
            # The candidate set is static; the logits are -inf exactly off it.
            self._candidates = th.isfinite(path.logits[0]).cpu().numpy()

    def samples(self) -> RouteSamples:
        """Everything recorded so far."""
        if self._candidates is None:
            raise RuntimeError("no routing path was collected: run an evaluation with this collector first.")
        return RouteSamples(
            task_names=self.task_names,
            task_ids=np.concatenate(self._task_ids),
            edges=np.concatenate(self._edges),
            active=np.concatenate(self._active),
            candidates=self._candidates,
            probabilities=np.concatenate(self._probabilities),
        )


def collect_routes(
    model: Any, env: VecEnv, n_episodes: int = 5, deterministic: bool = True
) -> tuple[RouteSamples, TaskEvaluation]:
    """Roll the policy on every task and record the routing path of every step.

    :param model: routing model (algorithm, policy or loaded policy; see :func:`get_router`).
    :param env: one env per task (e.g. :func:`d2r_sb3.make_mt_env`); it is reset first.
    :param n_episodes: episodes per task (the paper: 5 episodes of 200 steps = 1,000 paths per task).
    :param deterministic: deterministic actions and TopK routes (as in evaluation). With ``False`` the recorded
        routes are SampleK draws from the same distribution as the acting routes, not the very same draws.
    :return: the samples and the per-task evaluation of the same episodes.
    """
    router = get_router(model)
    task_names = list(getattr(env, "task_names", [f"task{i}" for i in range(env.num_envs)]))
    collector = RouteCollector(router, task_names, deterministic)
    evaluation = evaluate_per_task(
        model,
        env,
        n_episodes=n_episodes,
        deterministic=deterministic,
        task_names=task_names,
        on_step=collector,
    )
    return collector.samples(), evaluation


@dataclass
class TaskRouting:
    """Routing statistics of one task.

    :ivar name: task name.
    :ivar steps: number of routing paths (samples) behind the statistics.
    :ivar modules_mean: mean number of active modules per step (paper Fig. 8).
    :ivar modules_std: its standard deviation over steps.
    :ivar modules_histogram: ``int [n + 1]``: steps using 0, 1, ..., n modules.
    :ivar module_frequency: ``[n]``: fraction of steps in which each module is active.
    :ivar edge_frequency: ``[n + 1, n]``: fraction of steps in which each edge is on the routing path
        (chosen and leading into an active module or the output).
    :ivar selected_edge_frequency: ``[n + 1, n]``: fraction of steps in which the gates choose each edge,
        including edges into modules the output does not reach.
    :ivar distinct_paths: number of different routing paths among the steps.
    :ivar success: success rate of the episodes the samples come from (``None`` if unknown).
    :ivar mean_return: mean episode return of those episodes (``None`` if unknown).
    """

    name: str
    steps: int
    modules_mean: float
    modules_std: float
    modules_histogram: np.ndarray
    module_frequency: np.ndarray
    edge_frequency: np.ndarray
    selected_edge_frequency: np.ndarray
    distinct_paths: int
    success: float | None = None
    mean_return: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able statistics (matrices as nested lists; ``NaN`` as ``None``)."""
        return {
            "steps": self.steps,
            "modules_mean": _finite_or_none(self.modules_mean),
            "modules_std": _finite_or_none(self.modules_std),
            "modules_histogram": self.modules_histogram.astype(int).tolist(),
            "module_frequency": _rounded(self.module_frequency),
            "edge_frequency": _rounded(self.edge_frequency),
            "selected_edge_frequency": _rounded(self.selected_edge_frequency),
            "distinct_paths": self.distinct_paths,
            "success": _finite_or_none(self.success),
            "mean_return": _finite_or_none(self.mean_return),
        }


@dataclass
class RoutingAnalysis:
    """Per-task routing statistics of a policy (see :func:`analyze_routing`).

    :ivar tasks: one :class:`TaskRouting` per task, in env-column order.
    :ivar candidates: bool ``[n + 1, n]`` candidate edges of the routing graph.
    :ivar samples: the raw samples the statistics come from.
    :ivar evaluation: the evaluation of the same episodes (``None`` when built from samples alone).
    :ivar metadata: free-form provenance (model path, env kwargs, ...), written to the JSON.
    """

    tasks: list[TaskRouting]
    candidates: np.ndarray
    samples: RouteSamples = field(repr=False)
    evaluation: TaskEvaluation | None = field(default=None, repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_modules(self) -> int:
        return int(self.candidates.shape[-1])

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def node_labels(self) -> list[str]:
        return module_labels(self.n_modules)

    def task(self, name: str) -> TaskRouting:
        """Statistics of one task; ``name`` may omit the ``-v3`` suffix (``"drawer-close"``)."""
        return self.tasks[resolve_task_index(self.task_names, name)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: layout description, candidate edges and one entry per task."""
        modules = np.array([task.modules_mean for task in self.tasks], dtype=float)
        data: dict[str, Any] = {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "n_modules": self.n_modules,
            "node_labels": self.node_labels,
            "layout": (
                "edge matrices are [n + 1][n]: entry [i][j] is the edge from module j + 1 into node_labels[i] "
                "(module i + 1 for i < n, the output node for i = n)"
            ),
            "candidate_edges": self.candidates.astype(int).tolist(),
            "deterministic": None if self.evaluation is None else self.evaluation.deterministic,
            "episodes_per_task": None if self.evaluation is None else self.evaluation.episodes,
            "mean_modules_over_tasks": _finite_or_none(
                float(np.nanmean(modules)) if len(modules) else math.nan
            ),
            "mean_success": None if self.evaluation is None else self.evaluation.mean_success,
            "metadata": self.metadata,
            "tasks": {task.name: task.to_dict() for task in self.tasks},
        }
        return data

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def markdown(self, top_modules: int = 5) -> str:
        """A Markdown table: per task the modules used (mean ± std), success, steps and most-used modules.

        :param top_modules: how many of the most frequently active modules to list per task.
        """
        lines = [
            "| task | modules used (mean ± std) | success | steps | distinct paths | most active modules (fraction of steps) |",
            "|---|---|---|---|---|---|",
        ]
        for task in self.tasks:
            order = np.argsort(-task.module_frequency, kind="stable")[:top_modules]
            top = ", ".join(
                f"{i + 1} ({task.module_frequency[i]:.2f})" for i in order if task.module_frequency[i] > 0
            )
            success = "n/a" if task.success is None else f"{task.success:.2f}"
            lines.append(
                f"| {task.name} | {task.modules_mean:.2f} ± {task.modules_std:.2f} | {success} | {task.steps} | {task.distinct_paths} | {top} |"
            )
        means = np.array([task.modules_mean for task in self.tasks], dtype=float)
        success = "n/a" if self.evaluation is None else f"{self.evaluation.mean_success:.3f}"
        lines.append(
            f"| **all tasks** | **{np.nanmean(means):.2f}** | **{success}** | {len(self.samples)} | {self.samples.distinct_paths()} | |"
        )
        return "\n".join(lines)


def summarize_routes(
    samples: RouteSamples, evaluation: TaskEvaluation | None = None, metadata: dict[str, Any] | None = None
) -> RoutingAnalysis:
    """Per-task statistics of collected routing paths.

    :param samples: routing paths, e.g. from :func:`collect_routes`.
    :param evaluation: the evaluation of the same episodes, for the success rates (optional).
    :param metadata: provenance to keep in the JSON.
    :return: the analysis; a task without samples gets ``steps = 0`` and ``NaN`` statistics.
    """
    n = samples.n_modules
    on_path = samples.path_edges()
    num_active = samples.active.sum(-1)
    tasks = []
    for index, name in enumerate(samples.task_names):
        rows = samples.task_ids == index
        steps = int(rows.sum())
        if steps:
            counts = num_active[rows]
            mean, std = float(counts.mean()), float(counts.std())
            module_frequency = samples.active[rows].mean(0)
            edge_frequency = on_path[rows].mean(0)
            selected = samples.edges[rows].mean(0)
        else:
            mean = std = math.nan
            module_frequency = np.full(n, math.nan)
            edge_frequency = selected = np.full((n + 1, n), math.nan)
        tasks.append(
            TaskRouting(
                name=name,
                steps=steps,
                modules_mean=mean,
                modules_std=std,
                modules_histogram=np.bincount(num_active[rows], minlength=n + 1),
                module_frequency=module_frequency,
                edge_frequency=edge_frequency,
                selected_edge_frequency=selected,
                distinct_paths=samples.distinct_paths(rows),
                success=None if evaluation is None else float(evaluation.success[index]),
                mean_return=None if evaluation is None else float(evaluation.mean_return[index]),
            )
        )
    return RoutingAnalysis(
        tasks=tasks,
        candidates=samples.candidates,
        samples=samples,
        evaluation=evaluation,
        metadata=dict(metadata or {}),
    )


def analyze_routing(
    model: Any,
    env: VecEnv,
    n_episodes: int = 5,
    deterministic: bool = True,
    metadata: dict[str, Any] | None = None,
) -> RoutingAnalysis:
    """Roll the policy on every task and compute its routing statistics (paper Figs. 6 and 8).

    :param model: routing model: an algorithm (:class:`~d2r_sb3.D2RSAC`), a policy (:class:`~d2r_sb3.D2RPolicy`)
        or a loaded policy (:func:`d2r_sb3.load_policy`).
    :param env: one env per task, matching the model's tasks (e.g. :func:`d2r_sb3.make_mt_env`).
    :param n_episodes: episodes per task.
    :param deterministic: deterministic actions and TopK routes, as in evaluation.
    :param metadata: provenance to keep in the JSON.
    :raises TypeError: for a policy without routing paths.
    """
    samples, evaluation = collect_routes(model, env, n_episodes=n_episodes, deterministic=deterministic)
    return summarize_routes(samples, evaluation, metadata)


def resolve_task_index(task_names: Sequence[str], name: str) -> int:
    """Index of a task given its full name or its name without the ``-v3`` suffix.

    :raises ValueError: listing the available tasks when ``name`` is not one of them.
    """
    for index, candidate in enumerate(task_names):
        if name == candidate or f"{name}-v3" == candidate:
            return index
    short = ", ".join(short_task_name(t) for t in task_names)
    raise ValueError(f"Unknown task {name!r}; this analysis has: {short}.")


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _rounded(array: np.ndarray, digits: int = 6) -> Any:
    """Nested lists with ``NaN`` as ``None`` (JSON has no NaN) and 6 digits: enough for frequencies over up to 1e6 steps."""
    rounded = np.round(np.asarray(array, dtype=float), digits)
    # (numpy's stubs take no None here; at run time it makes an object array holding None for NaN)
    return np.where(np.isfinite(rounded), rounded, None).tolist()  # type: ignore[call-overload]
