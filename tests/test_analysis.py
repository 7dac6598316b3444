"""Routing analysis (d2r_sb3.analysis, zoo/analyze.py) on real MT10 roll-outs with tiny D2R models.

Every statistic is checked against a count made here, independently: the test rolls the same policy on an
identically seeded env, asks ``policy.route`` for the paths itself and recomputes the active modules with its
own backward walk from the output node.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_command
from matplotlib.image import imread
from stable_baselines3 import SAC
from toy_envs import make_point_reach

from d2r_sb3 import D2RSAC, evaluate_per_task, make_mt_env
from d2r_sb3.analysis import (
    RouteCollector,
    analyze_routing,
    embed_routes,
    get_router,
    plot_modules_per_task,
    plot_route_embedding,
    plot_routing_graphs,
    write_report,
)
from d2r_sb3.analysis.plots import subsample_per_task
from d2r_sb3.d2r.routing import build_candidates
from d2r_sb3.serialization import save_policy

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_KWARGS = dict(n_modules=6, module_dim=16, encoder_sizes=[32, 32], gate_sizes=[16])
EPISODE_STEPS = 20
EPISODES = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_env():
    return make_mt_env("MT10", max_episode_steps=EPISODE_STEPS, seed=0)


def make_model(env, policy_kwargs=None, seed=0) -> D2RSAC:
    return D2RSAC(
        "D2RPolicy",
        env,
        buffer_size=2000,
        learning_starts=100,
        batch_size=2 * env.num_envs,  # stratified: a multiple of the task count
        policy_kwargs=dict(TINY_KWARGS) if policy_kwargs is None else policy_kwargs,
        seed=seed,
    )


@pytest.fixture(scope="module")
def fresh_model() -> D2RSAC:
    return make_model(make_env())


@pytest.fixture(scope="module")
def trained_model() -> D2RSAC:
    model = make_model(make_env(), seed=1)
    model.learn(300)  # 30 vector steps: 10 warm-up steps per task, then 20 gradient steps
    assert model._n_updates > 0
    return model


@pytest.fixture(scope="module")
def default_net_analysis():
    """The paper's 16-module network (cheap to build), analysed on one short episode per task."""
    env = make_env()
    model = make_model(env, policy_kwargs={}, seed=2)
    analysis = analyze_routing(model, env, n_episodes=1)
    env.close()
    return analysis


def reachable_modules(edges: np.ndarray) -> np.ndarray:
    """Modules reachable backward from the output node (last row), by an explicit graph walk."""
    n = edges.shape[-1]
    active = np.zeros(n, dtype=bool)
    stack = [n]  # node n is the output node; node i < n is module i + 1
    while stack:
        node = stack.pop()
        for source in np.flatnonzero(edges[node]):
            if not active[source]:
                active[source] = True
                stack.append(source)
    return active


def independent_count(model: D2RSAC, n_episodes: int, env_factory=make_env) -> dict:
    """Per-task lists of (active modules, chosen edges) and the success rates, collected here directly."""
    env = env_factory()  # same seed as the analysed env: the very same episodes
    per_task = {i: {"active": [], "edges": []} for i in range(env.num_envs)}

    def on_step(obs: np.ndarray, counting: np.ndarray) -> None:
        path = model.policy.route(obs, deterministic=True)  # every env, then keep the counting ones
        edges = path.edges.numpy()
        for i in np.flatnonzero(counting):
            active = reachable_modules(edges[i])
            assert np.array_equal(active, path.active[i].numpy())
            per_task[i]["active"].append(active)
            per_task[i]["edges"].append(edges[i])

    evaluation = evaluate_per_task(model, env, n_episodes=n_episodes, on_step=on_step)
    env.close()
    return {"per_task": per_task, "evaluation": evaluation}


# --------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["fresh_model", "trained_model"])
def test_statistics_match_an_independent_count(model_name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    env = make_env()
    analysis = analyze_routing(model, env, n_episodes=EPISODES)
    env.close()
    reference = independent_count(model, EPISODES)
    n = TINY_KWARGS["n_modules"]

    assert analysis.task_names == env.task_names
    assert analysis.n_modules == n
    assert np.array_equal(analysis.candidates, build_candidates(n).numpy())
    for index, task in enumerate(analysis.tasks):
        active = np.array(reference["per_task"][index]["active"])
        edges = np.array(reference["per_task"][index]["edges"])
        counts = active.sum(-1)
        assert task.steps == len(counts) == EPISODES * EPISODE_STEPS
        assert task.modules_mean == pytest.approx(counts.mean())
        assert task.modules_std == pytest.approx(counts.std())
        assert np.array_equal(task.modules_histogram, np.bincount(counts, minlength=n + 1))
        np.testing.assert_allclose(task.module_frequency, active.mean(0))
        np.testing.assert_allclose(task.selected_edge_frequency, edges.mean(0))
        # An edge is on the path when the node it feeds is active (or is the output node).
        on_path = np.array(
            [
                [[edges[s, i, j] and (i == n or active[s, i]) for j in range(n)] for i in range(n + 1)]
                for s in range(len(edges))
            ]
        )
        np.testing.assert_allclose(task.edge_frequency, on_path.mean(0))
        assert task.distinct_paths == len({e.tobytes() for e in edges})
        assert task.success == reference["evaluation"].success[index]
        # Consistency of the summary itself.
        assert task.module_frequency.sum() == pytest.approx(task.modules_mean)
        assert not task.edge_frequency[~analysis.candidates].any()
        assert 1 <= task.modules_mean <= n  # the output always reads at least one module
    assert analysis.evaluation is not None
    np.testing.assert_array_equal(analysis.evaluation.success, reference["evaluation"].success)
    assert f"| {analysis.tasks[0].name} | {analysis.tasks[0].modules_mean:.2f} ±" in analysis.markdown()


def test_collector_records_only_counting_envs(fresh_model: D2RSAC) -> None:
    collector = RouteCollector(get_router(fresh_model), [f"task{i}" for i in range(10)])
    env = make_env()
    obs = env.reset()
    env.close()
    counting = np.zeros(10, dtype=bool)
    counting[[2, 7]] = True
    collector(obs, counting)
    collector(obs, np.zeros(10, dtype=bool))  # nothing counting: nothing recorded
    samples = collector.samples()
    assert samples.task_ids.tolist() == [2, 7]
    assert samples.edges.shape == (2, 7, 6)
    expected = fresh_model.policy.route(obs[[2, 7]])
    assert np.array_equal(samples.active, expected.active.numpy())
    # Routing probabilities: a distribution over each routed node's candidates.
    np.testing.assert_allclose(samples.probabilities[:, 1:].sum(-1), 1.0, rtol=1e-5)
    assert not samples.probabilities[:, ~samples.candidates].any()


def test_json_has_one_entry_per_task(trained_model: D2RSAC, tmp_path: Path) -> None:
    env = make_env()
    analysis = analyze_routing(trained_model, env, n_episodes=1, metadata={"model": "in-memory"})
    env.close()
    path = analysis.save_json(tmp_path / "out" / "routing.json")
    data = json.loads(path.read_text())
    assert list(data["tasks"]) == env.task_names
    assert data["n_modules"] == 6 and data["node_labels"] == ["1", "2", "3", "4", "5", "6", "out"]
    assert data["episodes_per_task"] == 1 and data["deterministic"] is True
    assert data["metadata"] == {"model": "in-memory"}
    for name, entry in data["tasks"].items():
        task = analysis.task(name)
        assert entry["steps"] == EPISODE_STEPS
        assert entry["modules_mean"] == pytest.approx(task.modules_mean)
        assert entry["success"] == task.success
        assert np.allclose(entry["edge_frequency"], task.edge_frequency, atol=1e-6)
        assert len(entry["module_frequency"]) == 6 and len(entry["modules_histogram"]) == 7
    assert analysis.task("drawer-close").name == "drawer-close-v3"
    with pytest.raises(ValueError, match="Unknown task 'drawer-closed'.*drawer-close"):
        analysis.task("drawer-closed")


def test_non_routing_policy_gives_a_clear_error() -> None:
    model = SAC("MlpPolicy", make_point_reach(num_tasks=2), buffer_size=10)
    with pytest.raises(TypeError, match="no routing paths.*D2R"):
        get_router(model)
    with pytest.raises(TypeError, match="no routing paths"):
        analyze_routing(model, make_point_reach(num_tasks=2), n_episodes=1)


# --------------------------------------------------------------------------------------------------------
# Pictures and embedding
# --------------------------------------------------------------------------------------------------------
def assert_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert (image[..., :3] < 0.9).any()  # something was drawn
    return image


def test_pictures_of_the_default_network(default_net_analysis, tmp_path: Path) -> None:
    analysis = default_net_analysis
    assert analysis.n_modules == 16
    bars = assert_png(plot_modules_per_task(analysis, tmp_path / "bars.png"))
    every_task = assert_png(plot_routing_graphs(analysis, tmp_path / "graphs_all.png"))
    two_tasks = assert_png(
        plot_routing_graphs(
            analysis, tmp_path / "graphs_two.png", tasks=["drawer-close", "peg-insert-side-v3"]
        )
    )
    assert two_tasks.shape[1] > two_tasks.shape[0]  # two panels side by side
    assert every_task.shape[0] > two_tasks.shape[0]  # 10 panels take two rows
    assert bars.shape[1] > bars.shape[0]
    with pytest.raises(ValueError, match="Unknown task 'peg-insert'"):
        plot_routing_graphs(analysis, tmp_path / "bad.png", tasks=["peg-insert"])


def test_embedding_subsamples_and_reports_shortfalls(default_net_analysis, tmp_path: Path) -> None:
    samples = default_net_analysis.samples
    index = subsample_per_task(samples, 5, seed=0)
    assert len(np.unique(index)) == len(index) == 50
    assert np.array_equal(np.bincount(samples.task_ids[index]), [5] * 10)

    embedding = embed_routes(samples, samples_per_task=8)
    assert embedding.points.shape == (80, 2) and np.isfinite(embedding.points).all()
    assert embedding.counts.tolist() == [8] * 10 and embedding.shortfalls == {}
    assert embedding.distinct_paths == samples.distinct_paths(subsample_per_task(samples, 8, seed=0))
    assert_png(plot_route_embedding(embedding, tmp_path / "tsne.png"))

    # More than the 20 steps each task has: use what exists and say so.
    more = embed_routes(samples, samples_per_task=50, method="pca", features="probabilities")
    assert more.points.shape == (200, 2)
    assert more.shortfalls == {name: EPISODE_STEPS for name in samples.task_names}
    with pytest.raises(ValueError, match="Unknown embedding method"):
        embed_routes(samples, method="umap")


def test_write_report_writes_every_file(default_net_analysis, tmp_path: Path) -> None:
    report = write_report(
        default_net_analysis,
        tmp_path / "report",
        graph_tasks=["reach", "push"],
        embedding_samples_per_task=30,
    )
    assert [path.name for path in report.files()] == [
        "routing.json",
        "routing.md",
        "modules_per_task.png",
        "routing_graphs.png",
        "routes_tsne.png",
    ]
    for path in report.files()[2:]:
        assert_png(path)
    assert report.notes and "fewer routing steps" in report.notes[0]
    assert report.markdown.read_text().startswith("| task | modules used (mean ± std)")


@pytest.mark.slow
def test_mt50_analysis_counts_and_pictures(tmp_path: Path) -> None:
    """MT50: one entry per task, per-task counts equal to a direct count from the routes, every picture."""

    def make_mt50():
        return make_mt_env("MT50", max_episode_steps=5, seed=0)

    env = make_mt50()
    model = make_model(env)
    analysis = analyze_routing(model, env, n_episodes=1)
    env.close()
    assert [task.name for task in analysis.tasks] == env.task_names and len(analysis.tasks) == 50
    direct = independent_count(model, 1, env_factory=make_mt50)
    for i, task in enumerate(analysis.tasks):
        active = np.array(direct["per_task"][i]["active"])
        assert task.steps == len(active) == 5
        assert task.modules_mean == pytest.approx(active.sum(-1).mean())
        assert np.allclose(task.module_frequency, active.mean(0))
    report = write_report(
        analysis, tmp_path / "mt50", graph_tasks=["reach", "bin-picking"], embedding_samples_per_task=5
    )
    data = json.loads((tmp_path / "mt50" / "routing.json").read_text())
    assert list(data["tasks"]) == env.task_names
    for path in report.files()[2:]:
        assert_png(path)


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------
def test_cli_end_to_end_on_a_saved_zip(fresh_model: D2RSAC, tmp_path: Path) -> None:
    fresh_model.save(tmp_path / "tiny.zip")  # no env_kwargs.yml beside it: the env comes from the task names
    argv = [
        *("--model", str(tmp_path / "tiny.zip"), "--episodes", "1"),
        "--allow-pickle",  # a zip of our own making
    ]
    argv += [
        "--max-episode-steps",
        "10",
        "--tasks",
        "drawer-close",
        "peg-insert-side",
        "--tsne-samples",
        "5",
    ]
    result = run_command("analyze", argv)
    assert result.returncode == 0, result.stderr
    out_dir = tmp_path / "routing_analysis_tiny"
    data = json.loads((out_dir / "routing.json").read_text())
    assert len(data["tasks"]) == 10 and all(entry["steps"] == 10 for entry in data["tasks"].values())
    assert data["metadata"]["env_kwargs"]["max_episode_steps"] == 10
    for name in ("modules_per_task.png", "routing_graphs.png", "routes_tsne.png"):
        assert_png(out_dir / name)
    assert "| reach-v3 |" in result.stdout and "routing.json" in result.stdout


def test_cli_on_a_safe_policy_folder(trained_model: D2RSAC, tmp_path: Path) -> None:
    from d2r_sb3.zoo.analyze import main

    folder = save_policy(trained_model, tmp_path / "policy")
    out_dir = tmp_path / "analysis"
    assert main(["--model", str(folder), "--episodes", "1", "--no-plots", "-o", str(out_dir)]) == 0
    data = json.loads((out_dir / "routing.json").read_text())
    # The env is rebuilt from the saved env kwargs: 20-step episodes.
    assert [entry["steps"] for entry in data["tasks"].values()] == [EPISODE_STEPS] * 10
    assert sorted(p.name for p in out_dir.iterdir()) == ["routing.json", "routing.md"]


def test_cli_errors(trained_model: D2RSAC, tmp_path: Path) -> None:
    from d2r_sb3.common import MultiTaskSAC
    from d2r_sb3.zoo.analyze import main
    from d2r_sb3.zoo.utils import ZooError

    folder = save_policy(trained_model, tmp_path / "policy")
    with pytest.raises(ZooError, match="--tasks: Unknown task 'drawer'"):
        main(["--model", str(folder), "--tasks", "drawer", "-o", str(tmp_path / "x")])
    with pytest.raises(ZooError, match="env's tasks .* differ from the model's tasks"):
        main(
            [
                "--model",
                str(folder),
                "--benchmark",
                "reach,push,pick-place,door-open,drawer-open,drawer-close,"
                "button-press-topdown,peg-insert-side,window-close,window-open",
                "-o",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(ZooError, match="Cannot load"):
        main(["--model", str(tmp_path / "missing.zip")])

    mtsac = MultiTaskSAC("MTSACPolicy", make_env(), buffer_size=100, policy_kwargs=dict(net_arch=[16]))
    mtsac.save(tmp_path / "mtsac.zip")
    with pytest.raises(ZooError, match="no routing paths"):
        main(["--model", str(tmp_path / "mtsac.zip"), "--allow-pickle"])
