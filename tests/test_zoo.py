"""The model zoo CLIs (zoo/train.py, enjoy.py, evaluate.py, plot.py) and the per-task training callbacks.

The commands run for real in this process, as their console scripts do (real MT10 envs, tiny D2R networks,
20-step episodes, a few hundred steps); the SIGKILL and signal drills in test_durability.py run them as processes.
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import yaml
from helpers import COLLECTION_ONLY, TINY_D2R_FLAG, CommandResult, check_clean_error, check_ok, run_command
from stable_baselines3.common.logger import HumanOutputFormat
from toy_envs import make_point_reach

from d2r_sb3 import D2RSAC, make_mt_env
from d2r_sb3.common.callbacks import MultiTaskCheckpointCallback, PerTaskEvalCallback
from d2r_sb3.common.run_layout import RunLayout
from d2r_sb3.envs import benchmark_task_names, short_task_name
from d2r_sb3.zoo import plot, resume, train
from d2r_sb3.zoo.task_env import make_task_env
from d2r_sb3.zoo.utils import ZooError, env_name, load_hyperparams, parse_key_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the in-process commands set threads

ROOT = Path(__file__).resolve().parents[1]

MT10 = benchmark_task_names("MT10")
SHORT = [short_task_name(name) for name in MT10]
TINY = ["--hyperparams", "batch_size:20", "learning_starts:100", "buffer_size:2000", TINY_D2R_FLAG]
# 20-step episodes, evaluations of 1 episode every 10 steps per task (every 100 total steps).
FAST = "--env-kwargs max_episode_steps:20 --eval-freq 10 --eval-episodes 1 --num-threads 1".split()


def run_cli(script: str, *args: str) -> CommandResult:
    """``python zoo/<script> args``, run in this process."""
    return run_command(script.removesuffix(".py"), args)


def train_tiny(folder: Path, args: str) -> None:
    """``zoo/train.py`` with the tiny network and fast settings into ``folder`` (quiet)."""
    check_ok(run_cli("train.py", *args.split(), "--verbose", "0", "-f", str(folder), *TINY, *FAST))


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny MT10 D2R runs: run 1 (300 steps, checkpoints with buffers, final eval) and run 2 (seed 1)."""
    folder = tmp_path_factory.mktemp("logs")
    train_tiny(
        folder,
        "--algo d2r --env MT10 --goals rand --seed 0 -n 300 --save-freq 20 --save-replay-buffer "
        "--final-eval-episodes 1",
    )
    train_tiny(folder, "--env MT10 --seed 1 -n 200 --final-eval-episodes 0")
    return folder


@pytest.fixture(scope="module")
def run1(logs: Path) -> Path:
    return logs / "d2r" / "MT10-rand_1"


# --------------------------------------------------------------------------------------------------
# train.py
# --------------------------------------------------------------------------------------------------
def test_train_writes_the_logs_layout(run1: Path):
    assert sorted(p.name for p in run1.parent.iterdir()) == ["MT10-rand_1", "MT10-rand_2"]
    for name in ("MT10-rand.zip", "best_model.zip", "progress.csv", "evaluations.json", "results.json"):
        assert (run1 / name).is_file(), name
    for name in ("policy", "best_policy"):  # the safe files: the run loads without unpickling
        assert (run1 / name / "policy.safetensors").is_file() and (run1 / name / "policy.json").is_file()
    assert (run1 / "replay_buffer.pkl").is_file()
    # Training checkpoints every 20 steps per task (200 total) and at the end; the newest 2 are kept.
    checkpoints = sorted(p.name for p in (run1 / "checkpoints").iterdir())
    assert checkpoints == ["step_000000000200", "step_000000000300"]
    for name in ("manifest.json", "model.zip", "replay_buffer.npz", "state.json"):
        assert (run1 / "checkpoints" / "step_000000000300" / name).is_file(), name
    assert not (run1 / ".lock").read_text()  # released: it names no owner

    meta = run1 / "MT10-rand"
    config = yaml.safe_load((meta / "config.yml").read_text())
    assert config["policy"] == "D2RPolicy" and config["n_timesteps"] == 300
    assert config["batch_size"] == 20 and config["buffer_size"] == 2000 and config["learning_starts"] == 100
    assert config["policy_kwargs"]["n_modules"] == 4
    assert config["policy_kwargs"]["top_k"] == 2  # merged into the YAML's policy_kwargs
    assert config["ent_coef_lr"] == 1e-4  # from d2r_sb3/zoo/hyperparams/d2r.yml, section MT10-paper
    args = yaml.safe_load((meta / "args.yml").read_text())
    assert args["algo"] == "d2r" and args["seed"] == 0 and args["save_freq"] == 20
    env_kwargs = yaml.safe_load((meta / "env_kwargs.yml").read_text())
    assert (env_kwargs["benchmark"], env_kwargs["max_episode_steps"], env_kwargs["seed"]) == ("MT10", 20, 0)
    assert "zoo/train.py" in (meta / "command.txt").read_text()

    rows = list(csv.DictReader((run1 / "progress.csv").open()))
    columns = set(rows[0])
    assert {f"eval/success/{name}" for name in SHORT} <= columns
    assert {"eval/success", "eval/return", "train/alpha/reach", "train/temp/reach"} <= columns
    evaluated = [row for row in rows if row["eval/success"] != ""]
    assert [int(row["time/total_timesteps"]) for row in evaluated] == [100, 200, 300]

    history = json.loads((run1 / "evaluations.json").read_text())
    assert history["timesteps"] == [100, 200, 300] and history["timesteps_per_task"] == [10, 20, 30]
    assert history["task_names"] == MT10 and all(len(history["success"][name]) == 3 for name in MT10)

    results = json.loads((run1 / "results.json").read_text())
    assert set(results["success"]) == set(MT10) and 0.0 <= results["mean_success"] <= 1.0
    assert results["episodes_per_task"] == 1 and results["seed"] == 0
    assert results["total_timesteps"] == 300 and results["timesteps_per_task"] == 30
    assert results["n_updates"] == 20  # one gradient step per vector step after the 100 warm-up steps
    assert results["protocol"]["max_episode_steps"] == 20 and results["protocol"]["reward_scale"] == 0.1
    versions = set(results["versions"])
    assert {"d2r_sb3", "stable_baselines3", "torch", "metaworld", "mujoco", "python"} <= versions
    assert {"cpu", "cpu_cores", "torch_threads", "gpu"} <= set(results["hardware"])
    assert results["parameters"]["actor"] > 0 and results["parameters"]["n_critics"] == 2


def test_resume_continues_the_run_with_its_steps_and_buffer(run1: Path, tmp_path: Path):
    before = pickle.loads((run1 / "replay_buffer.pkl").read_bytes())
    n_rows = len(list(csv.DictReader((run1 / "progress.csv").open())))
    with pytest.raises(ZooError, match="cannot change"):  # the run's settings are fixed
        train.main(["--resume", str(run1), "--seed", "3"])

    check_ok(
        run_cli("train.py", "--resume", str(run1), *"-n 500 --final-eval-episodes 0 --verbose 0".split())
    )

    with zipfile.ZipFile(run1 / "MT10-rand.zip") as archive:
        assert json.loads(archive.read("data"))["num_timesteps"] == 500
    after = pickle.loads((run1 / "replay_buffer.pkl").read_bytes())
    assert before.pos == 30 and after.pos == 50  # 30 + 20 more rows of 10 tasks
    assert after.routes is not None and after.routes.shape == before.routes.shape
    np.testing.assert_array_equal(after.routes[:30], before.routes[:30])
    np.testing.assert_array_equal(after.observations[:30], before.observations[:30])
    assert after.routes[30:50].any()  # the new rows got their routes too

    rows = list(csv.DictReader((run1 / "progress.csv").open()))
    assert len(rows) > n_rows and int(rows[-1]["time/total_timesteps"]) == 500
    history = json.loads((run1 / "evaluations.json").read_text())
    assert history["timesteps"] == [100, 200, 300, 400, 500]
    # The checkpoint schedule keeps counting per task (400), the final one (500); older ones are pruned.
    assert sorted(p.name for p in (run1 / "checkpoints").iterdir()) == [
        "step_000000000400",
        "step_000000000500",
    ]
    assert len((run1 / "MT10-rand" / "command.txt").read_text().splitlines()) == 2
    assert yaml.safe_load((run1 / "MT10-rand" / "config.yml").read_text())["n_timesteps"] == 500
    assert not (run1 / "results.json").exists()  # no final evaluation this time: no stale results

    # A run written before training checkpoints existed (rl_model_<steps>_steps.zip and its pickled buffer)
    # resumes from its newest model and buffer.
    legacy = tmp_path / "MT10-rand_7"
    shutil.copytree(run1, legacy)
    shutil.rmtree(legacy / "checkpoints")
    shutil.copy(legacy / "MT10-rand.zip", legacy / "rl_model_400_steps.zip")
    shutil.copy(legacy / "replay_buffer.pkl", legacy / "rl_model_replay_buffer_400_steps.pkl")
    (legacy / "MT10-rand.zip").unlink()
    steps, model_path, buffer_path = resume.find_resume_point(legacy, "MT10-rand")
    assert (steps, model_path.name) == (400, "rl_model_400_steps.zip")
    assert buffer_path is not None and buffer_path.name == "rl_model_replay_buffer_400_steps.pkl"
    resume.drop_progress_after(legacy / "progress.csv", steps)  # the logs of the lost steps go
    kept = list(csv.DictReader((legacy / "progress.csv").open()))
    assert kept == [row for row in rows if int(row["time/total_timesteps"]) <= 400] and len(kept) < len(rows)
    out = check_ok(
        run_cli("train.py", "--resume", str(legacy), *"-n 600 --final-eval-episodes 0 --verbose 1".split())
    )
    assert "from rl_model_400_steps.zip at 400 steps" in out
    assert (legacy / "checkpoints" / "step_000000000600").is_dir()


def test_train_rejects_bad_input_clearly(tmp_path: Path):
    with pytest.raises(ZooError, match="Unknown hyperparameter 'batchsize'"):
        train.main(["--env", "MT10", "-f", str(tmp_path), "--hyperparams", "batchsize:20"])
    with pytest.raises(ZooError, match="Set seed with --seed"):
        train.main(["--env", "MT10", "-f", str(tmp_path), "--env-kwargs", "seed:3"])
    with pytest.raises(ZooError, match="Unknown --env-kwargs key 'max_steps'"):
        train.main(["--env", "MT10", "-f", str(tmp_path), "--env-kwargs", "max_steps:3"])
    with pytest.raises(ZooError, match="Unknown benchmark"):
        train.main(["--env", "MT11", "-f", str(tmp_path)])
    with pytest.raises(ZooError, match="not a zoo run folder"):
        train.main(["--resume", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written for a rejected command


def test_train_chooses_the_cpu_products_library(tmp_path: Path, products):
    import torch as th

    assert train.build_parser().parse_args([]).cpu_products is None  # unset: the environment's, else auto
    with pytest.raises(SystemExit):  # argparse names the choices
        train.build_parser().parse_args(["--cpu-products", "mkl"])
    with pytest.raises(ZooError, match="Unknown benchmark"):  # (set before the run is built)
        train.main(["--env", "MT11", "-f", str(tmp_path), "--cpu-products", "default"])
    assert products.cpu_products() == "default"
    assert not products.uses_onednn(th.zeros(64, 4))


# --------------------------------------------------------------------------------------------------
# enjoy.py
# --------------------------------------------------------------------------------------------------
def test_enjoy_writes_playable_mp4_and_gif(run1: Path, tmp_path: Path):
    from d2r_sb3.zoo import enjoy

    mp4 = tmp_path / "drawer.mp4"
    out = check_ok(
        run_cli(
            "enjoy.py",
            *("--task", "drawer-open", "--model", str(run1), "--video", str(mp4)),
            *"--episodes 1 --env-kwargs max_episode_steps:20 --width 96 --height 64 --num-threads 1".split(),
        )
    )
    assert "Episode 1: return" in out and "success rate" in out and "modules per step" in out
    frames = imageio.mimread(mp4)
    assert len(frames) == 20 and frames[0].shape == (64, 96, 3)

    gif = tmp_path / "reach.gif"  # in-process: the same main() the script runs
    argv = [
        "--task",
        "reach-v3",
        "--model",
        str(run1 / "best_model.zip"),
        "--allow-pickle",
        "--video",
        str(gif),
    ]
    assert enjoy.main([*argv, *"--episodes 1 --env-kwargs max_episode_steps:20 --width 48".split()]) == 0
    frames = imageio.mimread(gif)
    assert len(frames) == 10 and frames[0].shape[:2] == (48, 48)  # every 2nd frame by default for GIFs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run that finished with its final evaluation (results.json, 2 episodes per task); not modified."""
    folder = tmp_path_factory.mktemp("finished")
    train_tiny(folder, "--algo d2r --env MT10 --seed 2 -n 200 --final-eval-episodes 2")
    return folder / "d2r" / "MT10-rand_1"


def copy_of_run(run: Path, folder: Path) -> Path:
    """A copy of a run folder (its final model, policy and records) that a test may modify."""
    copy = folder / run.parent.name / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "*.pkl"))
    return copy


def test_enjoy_prints_the_recorded_evaluation_of_exactly_the_loaded_model(finished_run: Path, tmp_path: Path):
    """A run's final model carries the run's final evaluation (results.json) into enjoy's output; the best model,
    or a run whose results.json is of another step count (it continued after it), do not."""
    run = copy_of_run(finished_run, tmp_path)
    results = json.loads(RunLayout(run).results_file.read_text())
    expected = f"drawer-open success {results['success']['drawer-open-v3']:.2f}, mean over the 10 tasks"
    quick = "--episodes 1 --env-kwargs max_episode_steps:5 --num-threads 1".split()
    for model in (run, run / "policy"):
        out = check_ok(run_cli("enjoy.py", "--task", "drawer-open", "--model", str(model), *quick))
        assert (
            "Recorded evaluation of this policy (results.json, 2 deterministic episodes per task, with its own "
            in out
        )
        assert expected in out
    best = check_ok(run_cli("enjoy.py", "--task", "reach", "--model", str(run), "--load-best", *quick))
    assert "Recorded evaluation" not in best

    record = RunLayout(run).results_file
    record.write_text(json.dumps({**results, "total_timesteps": results["total_timesteps"] + 10}))
    assert "Recorded evaluation" not in check_ok(
        run_cli("enjoy.py", "--task", "reach", "--model", str(run), *quick)
    )
    from d2r_sb3 import load_policy

    record.write_text("{not json")
    with pytest.warns(UserWarning, match="not a readable results record"):
        assert load_policy(run).evaluation is None


def test_enjoy_unknown_task_lists_the_valid_tasks(run1: Path):
    message = check_clean_error(run_cli("enjoy.py", "--task", "hammer", "--model", str(run1)))
    assert "Unknown task 'hammer'" in message and "Valid tasks: " + ", ".join(SHORT) in message


def test_enjoy_missing_model_says_how_to_get_one(tmp_path: Path, offline_hub):
    bundled = ROOT / "d2r_sb3" / "pretrained" / "models--d2r-sb3--d2r-MT10-rand"
    if bundled.is_dir():  # the pretrained policy ships: a missing hub id takes the same path
        message = check_clean_error(
            run_cli("enjoy.py", "--task", "reach", "--model", "d2r-sb3/d2r-MT10-missing")
        )
    else:  # until then the default model itself is missing
        message = check_clean_error(run_cli("enjoy.py", "--task", "reach"))
        assert "default pretrained policy 'd2r-sb3/d2r-MT10-rand'" in message
    assert "python zoo/train.py" in message and "--model d2r-sb3/d2r-MT10-rand" in message

    from d2r_sb3.zoo import enjoy

    with pytest.raises(ZooError, match="Cannot load the model .*does not exist"):
        enjoy.main(["--task", "reach", "--model", str(tmp_path / "nothing.zip")])


def test_task_env_matches_the_models_env_column():
    """enjoy's one-task env sees exactly the observations of the task's column of the full env."""
    kwargs = dict(benchmark="MT10", goals="rand", preset="paper", seed=3, max_episode_steps=4)
    full = make_mt_env(**kwargs)
    column = MT10.index("drawer-open-v3")
    single = make_task_env(kwargs, "drawer-open", MT10)
    rng = np.random.default_rng(0)
    full_obs, (obs, _) = full.reset(), single.reset()
    np.testing.assert_array_equal(full_obs[column], obs)
    for _ in range(9):  # crosses two episode ends
        actions = rng.uniform(-1, 1, (10, 4)).astype(np.float32)
        full_obs, rewards, dones, infos = full.step(actions)
        obs, reward, terminated, truncated, info = single.step(actions[column])
        assert dones[column] == (terminated or truncated) and rewards[column] == pytest.approx(reward)
        if dones[column]:
            assert infos[column]["is_success"] == info["is_success"]
            obs, _ = single.reset()
        np.testing.assert_array_equal(full_obs[column], obs)
    with pytest.raises(ValueError, match="not one of the model's tasks"):
        make_task_env(kwargs, "hammer", MT10)


# --------------------------------------------------------------------------------------------------
# evaluate.py and plot.py
# --------------------------------------------------------------------------------------------------
def test_evaluate_prints_one_row_per_task(logs: Path, tmp_path: Path):
    output = tmp_path / "results.json"
    run2 = logs / "d2r" / "MT10-rand_2"
    out = check_ok(
        run_cli(
            "evaluate.py",
            *("--model", str(run2), "-o", str(output)),
            *"--episodes 1 --env-kwargs max_episode_steps:5".split(),
        )
    )
    rows = [line for line in out.splitlines() if line.startswith("| ") and "-v3 |" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == MT10
    assert "| **mean** |" in out
    results = json.loads(output.read_text())
    assert set(results["success"]) == set(MT10) and results["episodes_per_task"] == 1
    assert results["env_kwargs"]["max_episode_steps"] == 5 and results["env_kwargs"]["seed"] == 1


def test_evaluate_reproduces_the_recorded_evaluation_exactly(finished_run: Path, tmp_path: Path):
    """Under the recorded protocol, evaluate.py gives every task's recorded success rate again (the evaluation is
    deterministic) and says so; a changed record is reported task by task; another protocol is not compared."""
    run = copy_of_run(finished_run, tmp_path)
    output = tmp_path / "again.json"
    out = check_ok(run_cli("evaluate.py", "--model", str(run), "--episodes", "2", "-o", str(output)))
    assert "Recorded evaluation (results.json, 2 episodes per task): reproduced exactly" in out
    assert json.loads(output.read_text())["reproduces_recorded"] is True

    record = RunLayout(run).results_file
    results = json.loads(record.read_text())
    was = results["success"]["push-v3"]
    results["success"]["push-v3"] = 1.0 - was
    record.write_text(json.dumps(results))
    out = check_ok(run_cli("evaluate.py", "--model", str(run), "--episodes", "2", "-o", str(output)))
    assert f"differs on 1 task(s) (recorded -> now): push {1.0 - was:.2f} -> {was:.2f}." in out
    assert json.loads(output.read_text())["reproduces_recorded"] is False
    out = check_ok(run_cli("evaluate.py", "--model", str(run), "--episodes", "1", "--seed", "5"))
    assert "(another protocol: not compared)" in out


def test_evaluate_a_checkpoint_with_its_runs_env_settings(logs: Path, tmp_path: Path):
    """A checkpoint's model.zip is evaluated on its run's env (here 20-step episodes), not on the defaults; so is a
    copy of the checkpoint folder outside its run (a kept milestone), which carries its env settings itself."""
    output = tmp_path / "results.json"
    newest = sorted((logs / "d2r" / "MT10-rand_1" / "checkpoints").glob("step_*"))[
        -1
    ]  # (other tests extend run 1)
    assert yaml.safe_load((newest / "env_kwargs.yml").read_text())["max_episode_steps"] == 20
    copied = shutil.copytree(newest, tmp_path / "milestone")
    for checkpoint in (newest / "model.zip", copied / "model.zip"):
        result = run_cli(
            "evaluate.py", "--model", str(checkpoint), "--allow-pickle", "--episodes", "1", "-o", str(output)
        )
        check_ok(result)
        assert "no env settings were saved" not in result.stderr
        env = json.loads(output.read_text())["env_kwargs"]
        assert (env["max_episode_steps"], env["seed"], env["goals"]) == (20, 0, "rand")


def test_plot_draws_curves_from_two_runs(logs: Path, tmp_path: Path):
    curves, grid = tmp_path / "curves.png", tmp_path / "grid.png"
    pattern = str(logs / "d2r" / "MT10-rand_*")
    out = check_ok(run_cli("plot.py", pattern, "-o", str(curves), "--per-task", str(grid)))
    assert "d2r: success" in out and "IQM, 95% CI" in out  # rliable: IQM over runs x tasks with its interval
    for path in (curves, grid):
        image = imageio.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0
    message = check_clean_error(run_cli("plot.py", str(tmp_path / "nothing"), "-o", str(curves)))
    assert "No run with an evaluations.json" in message


def test_plot_compares_runs_at_equal_env_steps(logs: Path, tmp_path: Path):
    from d2r_sb3.zoo.plot import load_run

    run1, run2 = logs / "d2r" / "MT10-rand_1", logs / "d2r" / "MT10-rand_2"  # evaluated at 100, 200 (, 300)
    history = json.loads((run1 / "evaluations.json").read_text())  # (other tests may have extended run 1)
    assert history["timesteps"][:3] == [100, 200, 300]
    at_200 = load_run(run1, "success", per_task_x=False, at_steps=200)
    assert at_200.final_steps == 200 and list(at_200.steps) == [100, 200]
    assert at_200.final == {task: values[1] for task, values in history["success"].items()}
    results = run1 / "results.json"  # the final evaluation when present, else the last periodic one
    finished_at = (
        json.loads(results.read_text())["total_timesteps"] if results.is_file() else history["timesteps"][-1]
    )
    assert load_run(run1, "success", per_task_x=False).final_steps == finished_at

    stats = tmp_path / "stats"
    result = run_cli("plot.py", str(run1), str(run2), "-o", str(tmp_path / "c.png"), "--at-steps", "250")
    check_ok(result)
    for run in (run1, run2):
        assert (
            f"{run} has no evaluation at 250 env steps; its scores are those of its last evaluation before, at 200"
            in (result.stderr)
        )
    with warnings.catch_warnings(record=True) as caught:  # (one method: the smallest bar charts)
        warnings.simplefilter("always")
        check_ok(
            run_cli(
                "plot.py",
                str(run1),
                str(run2),
                "-o",
                str(tmp_path / "c.png"),
                "--at-steps",
                "200",
                "--stats",
                str(stats),
            )
        )
    assert (stats / "statistics.md").is_file()
    assert not [w for w in caught if "layout" in str(w.message)]  # room for the titles and labels
    error = check_clean_error(
        run_cli("plot.py", str(run1), "-o", str(tmp_path / "c.png"), "--at-steps", "50")
    )
    assert "has no evaluation at or before 50 env steps" in error


def test_plot_draws_a_runs_recorded_mean_where_its_tasks_are_unknown(logs: Path, tmp_path: Path):
    """A history rebuilt after a lost run folder: the first evaluation keeps its mean only."""
    run = tmp_path / "d2r" / "MT10-rand_1"
    run.mkdir(parents=True)
    history = json.loads((logs / "d2r" / "MT10-rand_1" / "evaluations.json").read_text())
    history["mean_success"][0] = 0.25
    history["success"] = {task: [None, *values[1:]] for task, values in history["success"].items()}
    (run / "evaluations.json").write_text(json.dumps(history))
    png = str(tmp_path / "c.png")
    out = check_ok(run_cli("plot.py", str(run), "-o", png, "--estimator", "Mean", "--at-steps", "100"))
    assert "d2r: success 0.250 at 100 steps (1 run)" in out
    out = check_ok(run_cli("plot.py", str(run), "-o", png, "--estimator", "Mean"))
    last = np.mean([v[-1] for v in history["success"].values()])
    assert f"d2r: success {last:.3f} at {history['timesteps'][-1]} steps" in out


def test_plot_aggregates_seeds_with_iqm_and_bootstrap():
    values = np.array([[0.0, 0.2], [0.1, 0.4], [0.2, 0.6], [0.9, 1.0]])  # [runs, steps], one task
    curve = plot.aggregate(np.array([1, 2]), values, n_bootstrap=500)
    np.testing.assert_allclose(curve.center, [0.15, 0.5])  # the middle two of four
    assert curve.method.startswith("IQM")
    assert plot.aggregate(np.array([1, 2]), values[:1], n_bootstrap=500).low is None  # one run: no band
    assert np.all(curve.low <= curve.center) and np.all(curve.center <= curve.high)
    long_run = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 1.0, 2.0]))
    short_run = (np.array([0.0, 10.0]), np.array([0.0, 0.5]))
    steps, stacked = plot.align([long_run, short_run])
    np.testing.assert_array_equal(steps, [0.0, 10.0])  # up to the shortest run
    np.testing.assert_allclose(stacked, [[0.0, 1.0], [0.0, 0.5]])


# --------------------------------------------------------------------------------------------------
# Helpers and the library callbacks
# --------------------------------------------------------------------------------------------------
def test_hyperparameter_files_and_options(tmp_path: Path):
    mt10, source = load_hyperparams("d2r", "MT10", "paper")
    assert source.endswith("d2r.yml:MT10-paper")
    assert (mt10["batch_size"], mt10["buffer_size"], mt10["learning_starts"]) == (1280, 1_000_000, 40_000)
    assert mt10["n_timesteps"] == 1.5e7
    mt50, _ = load_hyperparams("d2r", "MT50", "paper")
    assert (mt50["batch_size"], mt50["buffer_size"], mt50["learning_starts"]) == (6400, 10_000_000, 200_000)
    assert mt50["n_timesteps"] == 5e7
    assert load_hyperparams("d2r", "custom", "paper")[1].endswith(":default")
    with pytest.raises(ZooError, match="No hyperparameter file for algo 'nope'.*algos with a file: .*d2r"):
        load_hyperparams("nope", "MT10", "paper")
    flat = tmp_path / "config.yml"  # a run's config.yml can be passed back with -conf
    flat.write_text(
        "policy: D2RPolicy\nn_timesteps: 1000\nlearning_rate: 1e-3\npolicy_kwargs: {n_modules: 4}\n"
    )
    assert load_hyperparams("d2r", "MT50", "mw3", conf_file=flat)[0]["learning_rate"] == 1e-3
    keyed = tmp_path / "keyed.yml"
    keyed.write_text("MT10-paper: {batch_size: 10}\n")
    with pytest.raises(ZooError, match="no section 'MT50-paper' and no 'default' section .*MT10-paper"):
        load_hyperparams("d2r", "MT50", "paper", conf_file=keyed)

    parsed = parse_key_values(
        ["learning_rate:3e-4", "policy_kwargs:{n_modules: 4, gate_sizes: [16]}", "x:None"], "-p"
    )
    assert parsed == {"learning_rate": 3e-4, "policy_kwargs": {"n_modules": 4, "gate_sizes": [16]}, "x": None}
    with pytest.raises(ZooError, match="key:value"):
        parse_key_values(["batch_size=3"], "--hyperparams")

    assert env_name("MT10", "rand", "paper") == "MT10-rand"
    assert env_name("MT50", "fixed", "mw3") == "MT50-fixed-mw3"
    (tmp_path / "d2r" / "MT10-rand_4").mkdir(parents=True)
    (tmp_path / "d2r" / "MT10-rand-mw3_9").mkdir()
    assert RunLayout.next_free(tmp_path, "d2r", "MT10-rand").run_dir == tmp_path / "d2r" / "MT10-rand_5"


def test_per_task_logger_keys_stay_unique_on_mt50():
    """SB3's stdout logger truncates keys at 36 characters and raises on collisions."""
    keys = {}
    for name in benchmark_task_names("MT50"):
        for prefix in ("eval/success/", "train/alpha/", "train/temp/"):
            keys[prefix + short_task_name(name)] = 0.0
    truncated = {HumanOutputFormat(sys.stdout)._truncate(key) for key in keys}
    assert len(truncated) == len(keys)


@COLLECTION_ONLY
def test_callbacks_evaluate_per_task_and_resume_their_schedule(tmp_path: Path):
    """PerTaskEvalCallback / MultiTaskCheckpointCallback on a cheap 4-task env, without the zoo."""
    model = D2RSAC(
        "D2RPolicy",
        make_point_reach(4),
        learning_starts=160,  # a few updates, in the second learn() only
        batch_size=16,
        buffer_size=1000,
        policy_kwargs=dict(n_modules=4, module_dim=16, encoder_sizes=[32], gate_sizes=[16]),
        seed=0,
    )
    evaluation = PerTaskEvalCallback(
        make_point_reach(4), 10, 2, best_model_save_path=tmp_path, log_path=tmp_path
    )
    checkpoints = MultiTaskCheckpointCallback(15, tmp_path, save_replay_buffer=True)
    model.learn(120, callback=[evaluation, checkpoints])
    history = json.loads((tmp_path / "evaluations.json").read_text())
    assert history["timesteps"] == [40, 80, 120] and history["n_eval_episodes"] == 2
    assert len(history["success"]["task0"]) == 3 and (tmp_path / "best_model.zip").is_file()
    assert (tmp_path / "rl_model_60_steps.zip").is_file() and (tmp_path / "rl_model_120_steps.zip").is_file()
    assert [p.name for p in tmp_path.glob("*.pkl")] == ["rl_model_replay_buffer_120_steps.pkl"]

    # A new callback on the same folder keeps the history and continues at the next multiple of 40 steps.
    again = PerTaskEvalCallback(make_point_reach(4), 10, 2, log_path=tmp_path, verbose=0)
    model.learn(80, callback=again, reset_num_timesteps=False)
    assert json.loads((tmp_path / "evaluations.json").read_text())["timesteps"] == [40, 80, 120, 160, 200]
    assert again.best_score >= (max(history["mean_success"]), -np.inf)
    with pytest.raises(ValueError, match="eval env has 2 envs"):
        model.learn(8, callback=PerTaskEvalCallback(make_point_reach(2), 10), reset_num_timesteps=False)
    with pytest.raises(ValueError, match="positive integer"):
        PerTaskEvalCallback(make_point_reach(4), eval_freq_per_task=0)


def test_run_layout_names_every_file_of_a_run(tmp_path: Path):
    layout = RunLayout(tmp_path / "d2r" / "MT10-rand-mw3_12")
    assert layout.env_name == "MT10-rand-mw3" and layout.is_numbered
    assert layout.final_model.name == "MT10-rand-mw3.zip" and layout.best_model.name == "best_model.zip"
    assert layout.record("args.yml") == layout.run_dir / "MT10-rand-mw3" / "args.yml"
    with pytest.raises(ValueError, match="not a run record; the records are: config.yml"):
        layout.record("args.yaml")
    staged = RunLayout(tmp_path / "d2r-MT10-rand")  # a folder without the _<N> suffix (a staged Hub repo)
    assert staged.env_name == "d2r-MT10-rand" and not staged.is_numbered
    layout.run_dir.mkdir(parents=True)
    for steps in (900, 50, 300):
        (layout.run_dir / f"rl_model_{steps}_steps.zip").write_bytes(b"")
    (layout.run_dir / "rl_model_x_steps.zip").write_bytes(b"")  # not a checkpoint name
    assert [steps for steps, _ in layout.legacy_checkpoints()] == [50, 300, 900]
