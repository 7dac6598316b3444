"""Tests of publishing (staging, model card, upload call, bundled package) and of d2r_sb3.hub downloads.

Everything runs offline: HF_HUB_OFFLINE is on for every test, downloads read a real Hugging Face cache laid out on
disk, and uploads only check the arguments given to ``HfApi.create_repo`` / ``HfApi.upload_folder``.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import huggingface_hub
import imageio.v2 as imageio
import numpy as np
import pytest
import torch as th
import yaml
from helpers import TINY_D2R
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

import d2r_sb3.hub as hub
import d2r_sb3.serialization.hub as hub_download  # where the downloads happen (d2r_sb3.hub re-exports)
from d2r_sb3 import D2RSAC, make_mt_env
from d2r_sb3.hub import DEFAULT_REPO_ID, HubPolicyNotFoundError, download_policy, load_from_hub
from d2r_sb3.publishing import package_pretrained, push_to_hub, stage_repo
from d2r_sb3.serialization import (
    POLICY_CONFIG_FILE,
    POLICY_WEIGHTS_FILE,
    ModelNotFoundError,
    PickleNotAllowedError,
    load_policy,
    save_policy,
)
from d2r_sb3.zoo.task_env import make_task_env
from d2r_sb3.zoo.utils import ZooError

REPO_ROOT = Path(__file__).resolve().parents[1]
EPISODE_STEPS = 20  # short episodes keep the evaluation and the replay cheap
FULL_REPO_FILES = {
    "d2r-MT10-rand.zip",
    "config.yml",
    "args.yml",
    "env_kwargs.yml",
    "results.json",
    "evaluations.json",
    "learning_curve.png",
    "replay.mp4",
    POLICY_WEIGHTS_FILE,
    POLICY_CONFIG_FILE,
    "README.md",
}
BUNDLE_FILES = {
    "config.yml",
    "env_kwargs.yml",
    "results.json",
    "learning_curve.png",
    "replay.gif",
    POLICY_WEIGHTS_FILE,
    POLICY_CONFIG_FILE,
    "README.md",
}


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No test may reach the network or read the user's cache and token."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default_hf_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


@pytest.fixture
def no_bundle(tmp_path, monkeypatch):
    """Hide the package's bundled pretrained folder, so downloads go to the cache under test."""
    monkeypatch.setattr(hub_download, "PRETRAINED_CACHE", tmp_path / "no_bundle")


@pytest.fixture(scope="module")
def env():
    env = make_mt_env("MT10", seed=0, max_episode_steps=EPISODE_STEPS)
    yield env
    env.close()


@pytest.fixture(scope="module")
def model(env) -> D2RSAC:
    model = D2RSAC(
        "D2RPolicy", env, policy_kwargs=TINY_D2R, batch_size=20, learning_starts=100, buffer_size=1000, seed=0
    )
    model.learn(200)
    return model


@pytest.fixture(scope="module")
def observations(env) -> np.ndarray:
    rng = np.random.default_rng(0)
    batches = [env.reset()]
    for _ in range(2):
        obs, *_ = env.step(rng.uniform(-1, 1, (env.num_envs, 4)).astype(np.float32))
        batches.append(obs)
    return np.concatenate(batches)


def zoo_results(task_names: list[str]) -> dict[str, Any]:
    """A results.json as zoo/train.py writes it (TaskEvaluation.to_dict() keys plus the run record)."""
    success = {name: round(0.1 * i, 2) for i, name in enumerate(task_names)}
    returns = {name: 10.0 + i for i, name in enumerate(task_names)}
    return {
        "algo": "d2r",
        "env": "MT10-rand",
        "seed": 0,
        "task_names": task_names,
        "success": success,
        "mean_return": returns,
        "std_return": {name: 1.0 for name in task_names},
        "mean_length": {name: float(EPISODE_STEPS) for name in task_names},
        "episodes": 100,
        "deterministic": True,
        "mean_success": float(np.mean(list(success.values()))),
        "mean_return_over_tasks": float(np.mean(list(returns.values()))),
        "total_timesteps": 200,
        "wall_clock_s": {"train": 12.5, "final_eval": 3.0},
    }


def make_run(root: Path, model: D2RSAC, env: Any, with_results: bool) -> Path:
    """A zoo run folder logs/d2r/MT10-rand_1 (contract 1), written by hand."""
    run = root / "logs" / "d2r" / "MT10-rand_1"
    meta = run / "MT10-rand"
    meta.mkdir(parents=True)
    model.save(run / "MT10-rand.zip")
    (meta / "env_kwargs.yml").write_text(yaml.safe_dump(env.env_kwargs(), sort_keys=False))
    config = {"policy": "D2RPolicy", "n_timesteps": 200, "batch_size": 20, "policy_kwargs": TINY_D2R}
    (meta / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (meta / "args.yml").write_text(yaml.safe_dump({"algo": "d2r", "env": "MT10", "goals": "rand", "seed": 0}))
    (meta / "command.txt").write_text("python zoo/train.py --algo d2r --env MT10 -n 200\n")
    names = env.task_names
    history = {
        "task_names": names,
        "n_eval_episodes": 2,
        "deterministic": True,
        "timesteps": [100, 200],
        "timesteps_per_task": [10, 20],
        "mean_success": [0.0, 0.1],
        "mean_return": [1.0, 2.0],
        "wall_time": [0.0, 1.0],
        "success": {name: [0.0, 0.1] for name in names},
        "return": {name: [1.0, 2.0] for name in names},
    }
    (run / "evaluations.json").write_text(json.dumps(history))
    if with_results:
        (run / "results.json").write_text(json.dumps(zoo_results(names)))
    return run


def actions(predictor: Any, obs: np.ndarray) -> np.ndarray:
    return predictor.predict(obs, deterministic=True)[0]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"hub_{name}", REPO_ROOT / "hub" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- staging ---------------------------------------------------------------------------------------------
def test_stage_full_repo_evaluates_when_the_run_has_no_results(model, env, observations, tmp_path):
    run = make_run(tmp_path, model, env, with_results=False)
    staged = stage_repo(
        run, tmp_path / "stage", n_eval_episodes=2, video_tasks=2, video_steps=3, video_size=64
    )
    folder = staged.folder
    assert (staged.repo_id, staged.algo, staged.env_name) == ("d2r-sb3/d2r-MT10-rand", "d2r", "MT10-rand")
    assert set(staged.files) == FULL_REPO_FILES == {p.name for p in folder.iterdir()}
    assert all(name in staged.describe() for name in FULL_REPO_FILES)

    results = json.loads((folder / "results.json").read_text())
    assert results["episodes"] == 2 and set(results["success"]) == set(env.task_names)
    assert results["n_timesteps"] == 200 and "evaluated_by" in results and "hardware" in results
    assert yaml.safe_load((folder / "env_kwargs.yml").read_text()) == env.env_kwargs()

    # Both the safe files and the zip act like the trained model.
    expected = actions(model, observations)
    np.testing.assert_array_equal(actions(load_policy(folder), observations), expected)
    staged_zip = folder / "d2r-MT10-rand.zip"
    np.testing.assert_array_equal(actions(load_policy(staged_zip, allow_pickle=True), observations), expected)
    policy_json = json.loads((folder / POLICY_CONFIG_FILE).read_text())
    assert policy_json["metadata"]["repo_id"] == "d2r-sb3/d2r-MT10-rand"

    frames = imageio.mimread(folder / "replay.mp4")
    assert len(frames) == 3 and frames[0].shape == (64, 2 * 64, 3)
    assert (folder / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "stable-baselines3"
    assert {
        "d2r_sb3",
        "multi-task-reinforcement-learning",
        "reinforcement-learning",
        "Meta-World/MT10",
    } <= set(card.data.tags)
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["success_rate"] == pytest.approx(np.mean(list(results["success"].values())), abs=1e-4)
    assert re.fullmatch(r"-?\d+\.\d\d \+/- \d+\.\d\d", metrics["mean_reward"])
    assert all(r.dataset_type == "Meta-World/MT10" for r in card.data.eval_results)
    text = card.text
    for expected_text in [
        *env.task_names,  # the per-task table
        "T3S",  # the published anchors
        "0.95",
        "not directly comparable",
        "mujoco-py",
        "It is a pickle",
        "Reproduce with the zoo (the training command of this run",  # trained from scratch
        "python zoo/train.py --algo d2r --env MT10 -n 200",
        "python zoo/evaluate.py --model d2r-sb3/d2r-MT10-rand",
        f"{sum(p.numel() for p in model.policy.actor.parameters()):,}",
        "@inproceedings{he2024d2r",
        "@article{stable-baselines3",
        "evaluated while staging",
        "learning_curve.png",
    ]:
        assert expected_text in text, expected_text


def test_stage_copies_the_run_results_and_reports_them(model, env, tmp_path):
    run = make_run(tmp_path, model, env, with_results=True)
    staged = stage_repo(run, tmp_path / "stage", video=None, repo_id="me/custom-name")
    assert "replay.mp4" not in staged.files and staged.repo_id == "me/custom-name"
    assert json.loads((staged.folder / "results.json").read_text()) == zoo_results(env.task_names)
    card = ModelCard.load(staged.folder / "README.md")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["success_rate"] == pytest.approx(0.45)
    assert metrics["mean_reward"] == "14.50 +/- 2.87"
    assert "| window-close-v3 | 0.90 | 19.0 ± 1.0 | 100 |" in card.text
    assert "Results from the run's `results.json`" in card.text
    assert "About this run" not in card.text  # no notes given
    assert staged.mean_success == pytest.approx(0.45)


def test_stage_rejects_bad_input(model, env, tmp_path):
    run = make_run(tmp_path, model, env, with_results=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("stale")
    with pytest.raises(FileExistsError, match="not empty"):
        stage_repo(run, tmp_path / "busy", video=None)
    staged = stage_repo(run, tmp_path / "busy", video=None, overwrite=True)
    assert not (staged.folder / "old.txt").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stage_repo(tmp_path / "no_run", tmp_path / "s1", video=None)
    with pytest.raises(ValueError, match="Unknown algo"):
        stage_repo(run, tmp_path / "s2", algo="ppo", video=None)
    with pytest.raises(ValueError, match="video must be"):
        stage_repo(run, tmp_path / "s3", video="avi")
    (run / "results.json").write_text(json.dumps({"mean_success": 0.5}))
    with pytest.raises(ValueError, match="no per-task success"):
        stage_repo(run, tmp_path / "s4", video=None)


# --- upload ----------------------------------------------------------------------------------------------
@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """Record HfApi.create_repo / upload_folder instead of calling the Hub."""
    calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args: Any, **kwargs: Any) -> str:
        calls.append(("create_repo", args, kwargs))
        return "https://huggingface.co/" + (args[0] if args else kwargs["repo_id"])

    def upload_folder(self, *args: Any, **kwargs: Any) -> str:
        calls.append(("upload_folder", args, kwargs))
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the two calls above are the only Hub access
    return calls


def test_push_cli_stages_then_uploads(model, env, tmp_path, hub_calls, capsys):
    from d2r_sb3.zoo import push

    run = make_run(tmp_path, model, env, with_results=True)
    stage = tmp_path / "stage"
    base = ["--model", str(run), "--stage-dir", str(stage), "--no-video", "--repo-id", "me/d2r-MT10-rand"]

    notes = tmp_path / "notes.md"
    notes.write_text("Trained at **batch 320** instead of 1280 to fit a CPU budget.\n")
    assert push.main([*base, "--dry-run", "--notes", str(notes)]) == 0
    assert hub_calls == [] and "Dry run" in capsys.readouterr().out
    assert {p.name for p in stage.iterdir()} == FULL_REPO_FILES - {"replay.mp4"}
    card_text = ModelCard.load(stage / "README.md").text
    assert "### About this run\n\nTrained at **batch 320** instead of 1280 to fit a CPU budget." in card_text
    assert push.main([*base, "--dry-run", "--overwrite", "--notes", str(tmp_path / "absent.md")]) == 2
    assert "absent.md" in capsys.readouterr().err

    assert push.main([*base, "--overwrite", "--token", "hf_test", "--private", "-m", "first model"]) == 0
    (name1, args1, kwargs1), (name2, args2, kwargs2) = hub_calls
    assert name1 == "create_repo" and (args1 or (kwargs1["repo_id"],))[0] == "me/d2r-MT10-rand"
    assert kwargs1["exist_ok"] is True and kwargs1["private"] is True and kwargs1["token"] == "hf_test"
    assert name2 == "upload_folder" and args2 == ()
    assert kwargs2["repo_id"] == "me/d2r-MT10-rand" and Path(kwargs2["folder_path"]) == stage
    assert kwargs2["repo_type"] == "model" and kwargs2["commit_message"] == "first model"
    assert kwargs2["token"] == "hf_test"
    assert "Uploaded to https://huggingface.co/me/d2r-MT10-rand" in capsys.readouterr().out


def test_push_without_token_or_offline_is_a_clear_error(model, env, tmp_path, hub_calls, monkeypatch, capsys):
    from d2r_sb3.zoo import push

    run = make_run(tmp_path, model, env, with_results=True)
    args = ["--model", str(run), "--stage-dir", str(tmp_path / "stage"), "--no-video"]
    assert push.main(args) == 2
    assert "No Hugging Face token found" in capsys.readouterr().err and hub_calls == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1 is set"):
        push_to_hub(tmp_path / "stage", "me/name", token="hf_test")
    assert push.main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- downloads -------------------------------------------------------------------------------------------
def populate_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> str:
    """Lay out ``files`` as huggingface_hub's cache does: refs/main + snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef" + f"{len(files):08x}"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return commit


def policy_files(model: D2RSAC, folder: Path) -> dict[str, bytes]:
    save_policy(model, folder)
    return {name: (folder / name).read_bytes() for name in (POLICY_CONFIG_FILE, POLICY_WEIGHTS_FILE)}


def test_load_from_hub_reads_the_cache_offline(model, observations, tmp_path, no_bundle, monkeypatch):
    cache = tmp_path / "cache"
    files = policy_files(model, tmp_path / "saved")
    commit = populate_cache(cache, "org/d2r-MT10-rand", {**files, "results.json": b"{}"})

    # Nothing on the Hub path may unpickle.
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("something was unpickled")

    for module, name in [(pickle, "loads"), (pickle, "load"), (cloudpickle, "loads"), (th, "load")]:
        monkeypatch.setattr(module, name, refuse)

    folder = download_policy("org/d2r-MT10-rand", cache_dir=cache)
    assert folder == cache / "models--org--d2r-MT10-rand" / "snapshots" / commit
    loaded = load_from_hub("org/d2r-MT10-rand", cache_dir=cache)
    assert loaded.source == "hf://org/d2r-MT10-rand" and loaded.algo == "d2r"
    np.testing.assert_array_equal(actions(loaded, observations), actions(model, observations))
    pinned = load_from_hub("org/d2r-MT10-rand", cache_dir=cache, revision=commit)
    np.testing.assert_array_equal(actions(pinned, observations), actions(model, observations))
    via_load_policy = load_policy("org/d2r-MT10-rand", cache_dir=cache)
    np.testing.assert_array_equal(actions(via_load_policy, observations), actions(model, observations))
    # local_files_only works without HF_HUB_OFFLINE too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert download_policy("org/d2r-MT10-rand", cache_dir=cache, local_files_only=True) == folder


def test_download_errors_are_clear(model, tmp_path, no_bundle, monkeypatch):
    cache = tmp_path / "cache"
    files = policy_files(model, tmp_path / "saved")
    populate_cache(cache, "org/only-json", {POLICY_CONFIG_FILE: files[POLICY_CONFIG_FILE]})
    weights = files[POLICY_WEIGHTS_FILE]
    populate_cache(cache, "org/truncated", {**files, POLICY_WEIGHTS_FILE: weights[: len(weights) // 2]})
    populate_cache(cache, "org/good", files)

    with pytest.raises(
        FileNotFoundError, match=r"'org/absent' is not in the Hugging Face cache.*HF_HUB_OFFLINE"
    ):
        load_from_hub("org/absent", cache_dir=cache)
    with pytest.raises(
        FileNotFoundError, match=r"'org/good' \(revision 'v2'\) is not in the Hugging Face cache"
    ):
        load_from_hub("org/good", cache_dir=cache, revision="v2")
    with pytest.raises(FileNotFoundError, match=r"'org/only-json' has no policy\.safetensors"):
        load_from_hub("org/only-json", cache_dir=cache)
    with pytest.raises(ValueError, match=r"files of 'org/truncated' are corrupted.*policy\.safetensors"):
        load_from_hub("org/truncated", cache_dir=cache)
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        download_policy("not a repo id")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy("no/such/local/path")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        download_policy("org/absent", cache_dir=cache, local_files_only=True)


# --- the bundled pretrained policy -----------------------------------------------------------------------
def test_package_pretrained_loads_offline_from_the_bundle(model, env, observations, tmp_path, monkeypatch):
    package = load_script("package_pretrained")
    run = make_run(tmp_path, model, env, with_results=True)
    out = tmp_path / "pretrained"
    base = ["--model", str(run), "--out", str(out), "--video-steps", "8"]
    assert package.main([*base, "--video-tasks", "drawer-close", "reach-v3"]) == 0

    repo = out / "models--d2r-sb3--d2r-MT10-rand"
    commit = (repo / "refs" / "main").read_text()
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    snapshot = repo / "snapshots" / commit
    assert {p.name for p in snapshot.iterdir()} == BUNDLE_FILES
    assert sum(p.stat().st_size for p in snapshot.iterdir()) < 3 * 2**20
    assert len(imageio.mimread(snapshot / "replay.gif")) == 2  # every 4th of 8 steps
    card_text = ModelCard.load(snapshot / "README.md").text
    assert "Replay of drawer-close, reach: ![replay](replay.gif)" in card_text
    assert imageio.mimread(snapshot / "replay.gif")[0].shape[1] == 2 * 128  # two task tiles side by side
    assert package.main([*base, "--video-tasks", "drawer-closed"]) == 2  # checked before any work

    # The bundle answers first, offline, even with an empty cache.
    monkeypatch.setattr(hub_download, "PRETRAINED_CACHE", out)
    loaded = load_from_hub(DEFAULT_REPO_ID, cache_dir=tmp_path / "empty_cache")
    np.testing.assert_array_equal(actions(loaded, observations), actions(model, observations))
    assert loaded.metadata["repo_id"] == DEFAULT_REPO_ID
    np.testing.assert_array_equal(
        actions(load_policy(DEFAULT_REPO_ID), observations), actions(model, observations)
    )
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        load_from_hub(DEFAULT_REPO_ID, use_bundled=False)

    # Packaging again replaces the bundle (one snapshot, refs/main pointing at it).
    new_snapshot = package_pretrained(run, out, video=False)
    assert [p.name for p in (repo / "snapshots").iterdir()] == [new_snapshot.name]
    assert (repo / "refs" / "main").read_text() == new_snapshot.name != commit
    assert "replay.gif" not in {p.name for p in new_snapshot.iterdir()}


BUNDLED_REPO_IDS = sorted(
    folder.name.removeprefix("models--").replace("--", "/", 1)
    for folder in hub.PRETRAINED_CACHE.glob("models--*")
)


def test_the_default_pretrained_policy_is_bundled():
    """The README's main job (zoo/enjoy.py --task drawer-open) runs this bundle, offline."""
    assert DEFAULT_REPO_ID in BUNDLED_REPO_IDS


def bundled_results(repo_id: str) -> dict[str, Any]:
    """The ``results.json`` of a bundled policy's current snapshot."""
    folder = hub.PRETRAINED_CACHE / f"models--{repo_id.replace('/', '--')}"
    revision = (folder / "refs" / "main").read_text().strip()
    return json.loads((folder / "snapshots" / revision / "results.json").read_text())


def test_the_readme_quotes_the_bundled_policies_results():
    """The README's tables of the bundles (mean per bundle, success per task) are the bundled results.json's."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Pretrained MT10 policies", 1)[1].split("\n## ", 1)[0]
    columns = {"Rand": "d2r-sb3/d2r-MT10-rand", "Fixed": "d2r-sb3/d2r-MT10-fixed"}
    results = {goals: bundled_results(repo_id) for goals, repo_id in columns.items()}
    for goals, repo_id in columns.items():
        row = re.search(rf"^\| `{re.escape(repo_id)}` \| {goals} \|.*\| \*\*([0-9.]+)\*\* \|$", section, re.M)
        assert row is not None, f"no row for {repo_id} in the README's table of bundles"
        assert float(row.group(1)) == pytest.approx(results[goals]["mean_success"], abs=5e-4), repo_id
    header = re.search(r"^\| task \| (Rand|Fixed), [^|]+ \| (Rand|Fixed), [^|]+ \|$", section, re.M)
    assert header is not None, "no per-task table of the bundles in the README"
    order = [header.group(1), header.group(2)]
    quoted = dict.fromkeys(results["Rand"]["success"], 0)
    for line in section[header.end() :].splitlines()[2:]:
        cells = [cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3:
            break
        task = cells[0] if cells[0] == "mean" else f"{cells[0]}-v3"
        for goals, value in zip(order, cells[1:], strict=True):
            expected = results[goals]["mean_success" if task == "mean" else "success"]
            expected = expected if task == "mean" else expected[task]
            assert float(value) == pytest.approx(expected, abs=5e-3 if task != "mean" else 5e-4), (
                goals,
                task,
            )
        if task != "mean":
            quoted[task] += 1
    assert all(count == 1 for count in quoted.values()), quoted


@pytest.mark.parametrize("repo_id", BUNDLED_REPO_IDS)
def test_bundled_pretrained_policies_load_without_pickle_and_run_drawer_open(repo_id, monkeypatch):
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("something was unpickled")

    with monkeypatch.context() as blocked:  # only while loading: Meta-World itself unpickles its task data
        for module, name in [(pickle, "loads"), (pickle, "load"), (cloudpickle, "loads"), (th, "load")]:
            blocked.setattr(module, name, refuse)
        loaded = load_from_hub(repo_id)
    assert loaded.num_tasks == 10 and loaded.env_kwargs["benchmark"] == "MT10"
    assert loaded.metadata["repo_id"] == repo_id

    env = make_task_env(loaded.env_kwargs, "drawer-open", loaded.task_names, max_episode_steps=20)
    obs, _ = env.reset()
    for _ in range(20):
        action, _ = loaded.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, info = env.step(action)
        assert np.isfinite(reward)
    assert terminated or truncated
    assert info["is_success"] in (0.0, 1.0)
    env.close()

    folder = download_policy(repo_id)
    results = json.loads((folder / "results.json").read_text())
    assert set(results["success"]) == set(loaded.task_names)
    assert loaded.evaluation is not None and loaded.evaluation.success == results["success"]
    assert loaded.evaluation.episodes_per_task == 100  # the final evaluation the README quotes
    assert ModelCard.load(folder / "README.md").data.library_name == "stable-baselines3"


def test_the_main_job_says_what_the_bundle_recorded_on_its_task(capsys):
    """The README's main job prints the bundle's recorded success on drawer-open before playing it and, while
    the bundle does not solve drawer-open, names the tasks it does solve, so a 0.00 is expected, not a fault."""
    from d2r_sb3.zoo import enjoy

    assert (
        enjoy.main(["--task", "drawer-open", "--episodes", "1", "--env-kwargs", "max_episode_steps:3"]) == 0
    )
    out = capsys.readouterr().out
    results = bundled_results(DEFAULT_REPO_ID)
    rate = results["success"]["drawer-open-v3"]
    assert (
        f"Recorded evaluation of this policy (results.json, 100 deterministic episodes per task, with its own env "
        f"settings, which this run overrides): drawer-open success {rate:.2f}, mean over the 10 tasks "
        f"{results['mean_success']:.3f}." in out
    )
    solved = [name.removesuffix("-v3") for name, value in results["success"].items() if value >= 0.9]
    assert (
        f"This policy does not solve drawer-open; it solves {', '.join(solved[:-1])} and {solved[-1]}" in out
    ) == (rate < 0.5)
    assert out.index("Recorded evaluation") < out.index("Episode 1:")


def test_hub_module_exports():
    assert hub.load_from_hub is load_from_hub and hub.download_policy is download_policy
    assert {"load_from_hub", "download_policy"} <= set(hub.__all__)
    assert huggingface_hub.__version__  # the real library, not a stub


# --- a local folder named like a Hub id: the shadowing drill ---------------------------------------------
BUNDLED_ORIGIN = f"Hub repo {DEFAULT_REPO_ID} (bundled snapshot)"
NETWORK_WORDS = ("cache_dir", "network", "connection", "could not be reached")


class Payload:
    """Unpickling this runs ``touch <marker>`` (what a crafted SB3 zip can do with any command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def crafted_zip(source: Path, target: Path, marker: Path) -> Path:
    """A copy of the SB3 zip ``source`` whose pickled ``data`` entries all run the payload when unpickled."""
    payload = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            content = old.read(name)
            if name == "data":
                data = json.loads(content)
                for value in data.values():
                    if isinstance(value, dict) and ":serialized:" in value:
                        value[":serialized:"] = payload
                content = json.dumps(data).encode()
            new.writestr(name, content)
    return target


@pytest.fixture
def shadowed_cwd(model, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A working directory holding ``d2r-sb3/d2r-MT10-rand/MT10-rand.zip``, a crafted pickle; and its marker."""
    cwd = tmp_path / "cwd"
    model.save(tmp_path / "legit.zip")
    marker = tmp_path / "MARKER"
    crafted_zip(tmp_path / "legit.zip", cwd / DEFAULT_REPO_ID / "MT10-rand.zip", marker)
    monkeypatch.chdir(cwd)
    return cwd, marker


def test_shadowing_folder_is_never_unpickled(shadowed_cwd, model, observations, tmp_path):
    cwd, marker = shadowed_cwd
    for allow_pickle in (False, True):  # the rule does not depend on allow_pickle
        with pytest.warns(
            UserWarning, match=r"local folder d2r-sb3/d2r-MT10-rand exists but was NOT used"
        ) as seen:
            loaded = load_policy(DEFAULT_REPO_ID, allow_pickle=allow_pickle)
        assert "pass ./d2r-sb3/d2r-MT10-rand" in str(seen[0].message)
        assert loaded.origin == BUNDLED_ORIGIN and loaded.source == f"hf://{DEFAULT_REPO_ID}"
        assert loaded.model is None and loaded.num_tasks == 10
        assert not marker.exists()
    # Meant explicitly as a local path, the zip is refused without allow_pickle.
    with pytest.raises(PickleNotAllowedError, match="can run arbitrary code"):
        load_policy(f"./{DEFAULT_REPO_ID}")
    assert not marker.exists()

    # With allow_pickle, an explicitly local path to a legitimate SB3 zip loads.
    mine = cwd / "d2r-sb3" / "d2r-MT10-mine"
    mine.mkdir()
    shutil.copy(tmp_path / "legit.zip", mine / "MT10-mine.zip")
    loaded = load_policy("./d2r-sb3/d2r-MT10-mine", allow_pickle=True)
    assert loaded.origin.startswith("local SB3 zip d2r-sb3/d2r-MT10-mine/MT10-mine.zip")
    np.testing.assert_array_equal(actions(loaded, observations), actions(model, observations))
    # Under its Hub-like name it is a Hub id, and the error says how to mean the folder.
    with pytest.raises(
        ModelNotFoundError, match=r"read as a Hub repo id.*pass ./d2r-sb3/d2r-MT10-mine"
    ) as info:
        load_policy("d2r-sb3/d2r-MT10-mine", allow_pickle=True)
    assert "not a cached Hub repo either" in str(info.value)
    assert not marker.exists()


def test_shadowing_drill_enjoy_cli(shadowed_cwd, tmp_path):
    from d2r_sb3.zoo import enjoy

    cwd, marker = shadowed_cwd
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "zoo" / "enjoy.py"), "--task", "reach", "--episodes", "1"]
        + ["--env-kwargs", "max_episode_steps:3", "--num-threads", "1"],  # --device: the default, auto
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(tmp_path / "hf"),
            "OMP_NUM_THREADS": "1",
        },
    )
    assert result.returncode == 0, result.stderr
    assert f"Loaded {BUNDLED_ORIGIN}" in result.stdout and "Episode 1: return" in result.stdout
    assert "Warning: Loaded the Hub repo" in result.stderr and "was NOT used" in result.stderr
    assert not marker.exists()
    with pytest.raises(ZooError, match=r"without --allow-pickle.*can run arbitrary code"):
        enjoy.main(["--task", "reach", "--model", f"./{DEFAULT_REPO_ID}"])
    assert not marker.exists()


def test_mistyped_local_path_says_no_such_file(tmp_path, monkeypatch):
    from d2r_sb3.zoo import enjoy

    monkeypatch.chdir(tmp_path)
    checks = []
    with pytest.raises(ModelNotFoundError) as info:
        load_policy("logs/nope")
    checks.append(str(info.value))
    with pytest.raises(ZooError) as cli:
        enjoy.main(["--task", "reach", "--model", "logs/nope"])
    checks.append(str(cli.value))
    # Online: the Hub not answering, or answering that there is no such repo, changes nothing.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # (RepositoryNotFoundError's __init__ wants an HTTP response object)
    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(not_found, "404 Client Error: Repository Not Found")
    for error in (LocalEntryNotFoundError("no connection"), not_found):

        def fail(*args: Any, error: Exception = error, **kwargs: Any) -> None:
            raise error

        monkeypatch.setattr(hub_download, "snapshot_download", fail)
        with pytest.raises(ModelNotFoundError) as info:
            load_policy("logs/nope")
        checks.append(str(info.value))
    for message in checks:
        assert "'logs/nope' does not exist: no such file or folder" in message, message
        assert "Hub repo either" in message, message
        assert not any(word in message for word in NETWORK_WORDS), message
    assert "not a cached Hub repo either" in checks[0] and "HF_HUB_OFFLINE=1" in checks[0]
    assert "the Hugging Face Hub has no repo of that name" in checks[-1]


def test_hf_prefix_forces_the_hub_and_local_safe_folders_win(model, tmp_path, no_bundle, monkeypatch):
    cache = tmp_path / "cache"
    populate_cache(cache, "org/d2r-MT10-rand", policy_files(model, tmp_path / "saved"))
    monkeypatch.chdir(tmp_path)
    save_policy(model, tmp_path / "org" / "d2r-MT10-rand", metadata={"where": "local"})

    local = load_policy("org/d2r-MT10-rand", cache_dir=cache)  # a local folder with safe files: local
    assert local.origin == "local folder org/d2r-MT10-rand" and local.metadata["where"] == "local"
    remote = load_policy("hf://org/d2r-MT10-rand", cache_dir=cache)
    assert remote.origin.startswith("Hub repo org/d2r-MT10-rand (Hugging Face cache, ")
    assert "where" not in remote.metadata
    with pytest.raises(HubPolicyNotFoundError, match="'org/absent' is not in the Hugging Face cache"):
        load_policy("hf://org/absent", cache_dir=cache)  # explicit Hub ids keep the Hub's message


def test_cli_loading_options(tmp_path):
    from d2r_sb3.zoo import analyze, enjoy, evaluate

    for parser, argv in [
        (enjoy.build_parser(), ["--task", "reach"]),
        (evaluate.build_parser(), []),
        (analyze.build_parser(), []),
    ]:
        args = parser.parse_args(argv)
        assert (args.device, args.allow_pickle, args.model) == ("auto", False, DEFAULT_REPO_ID)
        assert parser.parse_args([*argv, "--allow-pickle"]).allow_pickle is True
    loaded = load_policy(DEFAULT_REPO_ID, device="auto")  # auto works without a GPU
    assert loaded.policy.device.type == ("cuda" if th.cuda.is_available() else "cpu")
    assert analyze.default_output_dir(DEFAULT_REPO_ID) == Path("routing_analysis")


def test_learning_curve_with_evaluations_known_only_in_part(tmp_path):
    """A history rebuilt after a run's folder was lost: early points with the mean only (None elsewhere)."""
    from matplotlib.figure import Figure

    from d2r_sb3.common.callbacks import evaluations_up_to
    from d2r_sb3.publishing import plot_learning_curve

    history = {
        "task_names": ["reach-v3", "push-v3"],
        "n_eval_episodes": 32,
        "timesteps": [100, 200, 300],
        "timesteps_per_task": [50, 100, 150],
        "mean_success": [0.25, 0.5, 0.75],
        "mean_return": [None, None, 90.0],
        "wall_time": [None, None, 1.0],
        "success": {"reach-v3": [None, None, 1.0], "push-v3": [None, None, 0.5]},
        "return": {"reach-v3": [None, None, 100.0], "push-v3": [None, None, 80.0]},
    }
    drawn: list[list[float]] = []
    real_plot = Figure.subplots

    def spy(self: Figure, *args: Any, **kwargs: Any) -> Any:
        ax = real_plot(self, *args, **kwargs)
        real = ax.plot
        ax.plot = lambda x, y, **kw: drawn.append(list(y)) or real(x, y, **kw)
        return ax

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "subplots", spy)
        path = plot_learning_curve(history, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn[-1] == [0.25, 0.5, 0.75]  # the mean over tasks, every point
    assert np.isnan(drawn[0][:2]).all() and drawn[0][2] == 1.0  # per task: gaps where unknown

    cut = evaluations_up_to(history, 200)
    assert cut["timesteps"] == [100, 200] and cut["success"]["push-v3"] == [None, None]
    assert cut["task_names"] == history["task_names"] and history["timesteps"] == [100, 200, 300]
