"""d2r-sweep on a real local Ray instance: a grid of tiny runs, a trial's worker killed and resumed, the rliable
report on runs with known scores, a 3-trial Optuna search, a trial pruned mid-run, and Ctrl-C on the command.

Ray is started once for the module (2 CPUs, no dashboard); the sweep commands find it and leave it running. The
Ctrl-C test runs ``zoo/sweep.py`` as a user does, a process with its own local Ray instance. Every run is 2
Meta-World tasks with 20-step episodes and tiny networks, so that a trial takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import CommandResult, check_clean_error, check_ok, run_command

from d2r_sb3.common.checkpoints import CheckpointStore
from d2r_sb3.zoo.trials import find_run_dir, read_progress
from d2r_sb3.zoo.utils import load_hyperparams

ray = pytest.importorskip("ray")  # the sweep extra (in dev): skip, not fail, where it is not installed
pytest.importorskip("rliable")
pytest.importorskip("optuna")

TINY = [
    "--hyperparams",
    "batch_size:16",
    "learning_starts:100",
    "buffer_size:2000",
    "d2r/policy_kwargs:{n_modules: 4, module_dim: 16, encoder_sizes: [32, 32], gate_sizes: [16]}",
    "mtsac/policy_kwargs:{net_arch: [32, 32]}",
]
# After --: train.py flags of every trial. 2 tasks x 200 steps; an evaluation and a checkpoint every 50 per task.
TRAIN = "-- -n 400 --env-kwargs max_episode_steps:20 --eval-freq 50 --eval-episodes 2 --final-eval-episodes 2".split()
TRAIN += "--save-freq 50 --verbose 1".split()
ROOT = Path(__file__).resolve().parents[1]


def sweep(*argv: str) -> CommandResult:
    return run_command("sweep", list(argv))


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module (the sweeps connect to it instead of starting their own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_grid_sweep_survives_a_killed_worker_and_skips_finished_trials(tmp_path: Path):
    folder = tmp_path / "sweep"
    argv = [
        "--algo",
        "d2r",
        "mtsac",
        "--env",
        "reach,push",
        "--seeds",
        "0",
        "1",
        "-f",
        str(folder),
        "--refresh",
        "2",
    ]
    argv += [*TINY, *TRAIN]
    result: list[CommandResult] = []
    thread = threading.Thread(target=lambda: result.append(sweep(*argv)))
    thread.start()
    # Kill the first trial's training process (the Ray worker) once it has written a checkpoint.
    run = folder / "runs" / "d2r_reach+push_rand_base_s0" / "d2r" / "custom-rand_1"
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list((run / "checkpoints").glob("step_*")), "no checkpoint was written"
    pid = json.loads((run / ".lock").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive()
    out = check_ok(result[0])

    assert "4 to run" in out and "trial(s) left" in out  # the live table
    summary = json.loads((folder / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == [
        "done (resumed)",
        "done (started)",
        "done (started)",
        "done (started)",
    ]
    assert all(t["env_steps"] == 400 and t["final_success"] is not None for t in summary["trials"])
    assert "| d2r_reach+push_rand_base_s0 | done (resumed) |" in (folder / "summary.md").read_text()
    # The killed trial continued from its checkpoint in the same folder (Ray's retry called train.py --resume).
    commands = (run / "custom-rand" / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and commands[1].startswith("python zoo/train.py --resume")
    log = (run.parents[2] / "d2r_reach+push_rand_base_s0" / "trial.log").read_text()
    assert "Resuming " in log and "from checkpoints/step_" in log
    steps = json.loads((run / "evaluations.json").read_text())["timesteps"]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # one history, continued, not restarted
    manifest = json.loads((folder / "sweep.json").read_text())
    assert len(manifest["trials"]) == 4

    again = check_ok(sweep(*argv))  # the same sweep again: nothing left to run
    assert "4 finished earlier, 0 to run" in again


def test_bad_input_gives_clean_errors(tmp_path: Path):
    assert "Unknown algo 'nope'" in check_clean_error(sweep("--algo", "nope", "--dry-run"))
    bad = tmp_path / "grid.yml"
    bad.write_text("algos: [d2r]\nsteps: 3\n")
    assert "unknown key(s) steps" in check_clean_error(sweep("-c", str(bad), "--dry-run"))
    assert "cannot be passed after --" in check_clean_error(sweep("--dry-run", "--", "--seed", "3"))
    assert "not a sweep folder" in check_clean_error(sweep("report", str(tmp_path)))
    unreachable = check_clean_error(sweep("--address", "ray://127.0.0.1:9", "-f", str(tmp_path / "x")))
    assert "Cannot reach the Ray cluster at --address ray://127.0.0.1:9" in unreachable
    # Ray joins the cluster RAY_ADDRESS names even without --address; --num-cpus cannot size it. (A subprocess:
    # this process may hold a Ray session of its own.)
    joined = subprocess.run(
        [sys.executable, "zoo/sweep.py", "--algo", "mtsac", "--env", "reach,push", "--seeds", "0"]
        + ["-f", str(tmp_path / "joined"), "--num-cpus", "2", "--", "-n", "100"],
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert joined.returncode == 2 and "Traceback" not in joined.stderr, joined.stderr
    assert "RAY_ADDRESS=local for a fresh local instance" in joined.stderr
    grid = tmp_path / "ok.yml"
    grid.write_text(
        "algos: [d2r, mtsac]\nenvs: ['reach,push']\nseeds: [0, 1, 2]\nhp_sets: {a: {gamma: 0.9}, b: {}}\n"
    )
    out = check_ok(sweep("-c", str(grid), "--dry-run", "-f", str(tmp_path / "s")))
    assert len(out.splitlines()) == 12 and "d2r_reach+push_rand_a_s2:" in out and "gamma:0.9" in out


def _write_run(folder: Path, trial_id: str, algo: str, scores: list[float]) -> None:
    """A finished-looking run folder whose last evaluation scores each task as given."""
    run = folder / "runs" / trial_id / algo / "custom-rand_1"
    run.mkdir(parents=True)
    tasks = ["reach-v3", "push-v3"]
    history = {
        "task_names": tasks,
        "timesteps": [100, 200],
        "timesteps_per_task": [50, 100],
        "mean_success": [0.0, float(np.mean(scores))],
        "mean_return": [0.0, 1.0],
        "success": {task: [0.0, score] for task, score in zip(tasks, scores, strict=True)},
        "return": {task: [0.0, 1.0] for task in tasks},
    }
    (run / "evaluations.json").write_text(json.dumps(history))


def test_report_computes_rliable_statistics_of_known_scores(tmp_path: Path):
    folder = tmp_path / "sweep"
    known = {"d2r": [[0.0, 0.2], [0.4, 0.6], [0.8, 1.0], [1.0, 1.0]], "mtsac": [[0.5, 0.5]] * 4}
    trials = {}
    for algo, runs in known.items():
        for seed, scores in enumerate(runs):
            trial_id = f"{algo}_reach+push_rand_base_s{seed}"
            _write_run(folder, trial_id, algo, scores)
            trials[trial_id] = {"algo": algo, "hp_set": "base", "folder": str(folder / "runs" / trial_id)}
    (folder / "sweep.json").write_text(json.dumps({"trials": trials}))

    out = check_ok(sweep("report", str(folder), "--n-bootstrap", "200"))
    stats = json.loads((folder / "report" / "statistics.json").read_text())
    d2r, mtsac = stats["aggregates"]["d2r"], stats["aggregates"]["mtsac"]
    # d2r's 8 scores sorted: 0 .2 .4 .6 .8 1 1 1; the IQM keeps the middle four.
    assert d2r["IQM"]["value"] == pytest.approx(0.7) and d2r["Mean"]["value"] == pytest.approx(0.625)
    assert d2r["Optimality gap"]["value"] == pytest.approx(0.375)
    assert d2r["IQM"]["low"] <= 0.7 <= d2r["IQM"]["high"] and d2r["IQM"]["low"] < d2r["IQM"]["high"]
    assert mtsac["IQM"] == {
        "value": pytest.approx(0.5),
        "low": pytest.approx(0.5),
        "high": pytest.approx(0.5),
    }
    # P(d2r > mtsac): task 1 wins 2 of 4 runs, task 2 wins 3 of 4.
    (improvement,) = stats["probability_of_improvement"]
    assert (improvement["x"], improvement["y"], improvement["value"]) == (
        "d2r",
        "mtsac",
        pytest.approx(0.625),
    )
    assert stats["per_task"]["d2r"]["push-v3"]["value"] == pytest.approx(0.7)
    assert "| d2r | 4 | 0.700 [" in out and "## Probability of improvement" in out
    for name in (
        "curves.png",
        "curves_per_task.png",
        "aggregates.png",
        "performance_profiles.png",
        "per_task.png",
        "probability_of_improvement.png",
    ):
        assert (folder / "report" / name).stat().st_size > 5000, name


def test_optimize_runs_a_persisted_study_and_writes_a_usable_yaml(tmp_path: Path):
    import optuna

    folder = tmp_path / "search"
    space = tmp_path / "space.yml"
    space.write_text(
        "mtsac:\n"
        "  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}\n"
        "  batch_size: {type: categorical, choices: [4, 8], per_task: true}\n"
        "  policy_kwargs.net_arch: {type: categorical, choices: [[16], [32, 32]]}\n"
    )
    argv = ["--optimize", "--algo", "mtsac", "--env", "reach,push", "--n-trials", "3", "-f", str(folder)]
    argv += ["--search-space", str(space), "--hyperparams", "learning_starts:100", "buffer_size:2000"]
    out = check_ok(
        sweep(
            *argv,
            "--",
            *"-n 200 --env-kwargs max_episode_steps:20 --eval-freq 50".split(),
            *"--eval-episodes 1 --final-eval-episodes 1 --verbose 0".split(),
        )
    )
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{folder / 'study.db'}")
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    assert "Wrote" in out and "best_hyperparams.yml" in out
    best, source = load_hyperparams("mtsac", "custom", "paper", conf_file=folder / "best_hyperparams.yml")
    assert source.endswith("best_hyperparams.yml:custom-paper")
    params = study.best_trial.params
    assert best["batch_size"] == 2 * params["batch_size"]  # per task x 2 tasks
    assert best["learning_rate"] == pytest.approx(params["learning_rate"])
    assert best["policy_kwargs"]["net_arch"] == json.loads(params["policy_kwargs.net_arch"])
    assert best["learning_starts"] == 100 and best["n_timesteps"] == 1e6  # the sweep's and the file's values
    assert yaml.safe_load((folder / "best_hyperparams.yml").read_text()).keys() == {"custom-paper"}


def stopped_at(trial_folder: Path, algo: str) -> int:
    """The env steps at which a trial's training stopped on SIGINT, checked against the checkpoint it wrote then."""
    log = (trial_folder / "trial.log").read_text()
    assert "SIGINT: writing a checkpoint, then stopping." in log and "=== exit code 130" in log, log[-3000:]
    steps = int(log.split("Stopped at ")[1].split()[0])
    run = find_run_dir(trial_folder, algo)
    assert run is not None and CheckpointStore(run / "checkpoints").list()[0].num_timesteps == steps
    assert not (run / "results.json").exists()
    return steps


def test_optimize_prunes_a_trial_below_the_median_and_stops_it_with_a_checkpoint(tmp_path: Path):
    import optuna

    folder = tmp_path / "search"
    folder.mkdir()
    space = tmp_path / "space.yml"
    space.write_text("mtsac:\n  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}\n")
    # Two trials of an earlier session of the study, with success 1.0 at every evaluation (50, 100, ... env steps
    # per task). No tiny run gets any success on reach and push, so earlier trials that did are written into the
    # study here; the new trial's real success, 0 at its first evaluation, is below their median at that step.
    study = optuna.create_study(
        study_name="study", storage=f"sqlite:///{folder / 'study.db'}", direction="maximize"
    )
    distribution = optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True)
    for learning_rate in (2e-4, 5e-4):
        study.add_trial(
            optuna.trial.create_trial(
                params={"learning_rate": learning_rate},
                distributions={"learning_rate": distribution},
                value=1.0,
                intermediate_values={step: 1.0 for step in range(50, 501, 50)},
            )
        )
    argv = ["--optimize", "--algo", "mtsac", "--env", "reach,push", "--n-trials", "3", "-f", str(folder)]
    argv += ["--search-space", str(space), "--hyperparams", "learning_starts:100", "buffer_size:2000"]
    argv += ["batch_size:16", "policy_kwargs:{net_arch: [32, 32]}"]
    # 500 env steps per task: the trial is pruned at its first evaluation (50), long before its end.
    argv += ["--", *"-n 1000 --env-kwargs max_episode_steps:20 --eval-freq 50".split()]
    out = check_ok(sweep(*argv, *"--eval-episodes 1 --final-eval-episodes 1 --verbose 1".split()))

    study = optuna.load_study(study_name="study", storage=f"sqlite:///{folder / 'study.db'}")
    states = optuna.trial.TrialState
    assert [t.state for t in study.trials] == [states.COMPLETE, states.COMPLETE, states.PRUNED], out
    pruned = study.trials[2]
    assert pruned.intermediate_values == {50: 0.0}  # below the median (1.0) of the earlier trials at step 50
    assert "Trial 2: pruned at 50 steps per task" in out and "Study: 2 complete, 1 pruned" in out
    # Stopped mid-run (ray.cancel: SIGINT), with a checkpoint of where it stopped.
    steps = stopped_at(folder / "runs" / "trial_0002", "mtsac")
    assert 100 <= steps < 1000
    # The study ends and writes the best settings (an earlier trial's).
    best, _ = load_hyperparams("mtsac", "custom", "paper", conf_file=folder / "best_hyperparams.yml")
    assert best["learning_rate"] == pytest.approx(study.best_trial.params["learning_rate"])
    assert study.best_trial.number in (0, 1) and "Wrote" in out


def start_sweep_process(argv: list[str], output: Path) -> subprocess.Popen:
    """``python zoo/sweep.py`` as a user starts it in a terminal: a shell job (the leader of its own process group)
    that starts its own local Ray instance. Its stdout and stderr go to ``output``.{out,err}."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_ADDRESS": "local",  # a new instance, not this module's nor a `ray start` cluster of the machine
    }
    with output.with_suffix(".out").open("w") as out, output.with_suffix(".err").open("w") as err:
        return subprocess.Popen(
            [sys.executable, "zoo/sweep.py", *argv],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_running_trials_and_the_same_command_resumes_them(tmp_path: Path):
    """Ctrl-C in the terminal: SIGINT to the sweep's process group. Ray starts its own processes with SIGINT blocked
    (and its workers in other process groups), so only the sweep process gets it; it cancels the running trials
    (ray.cancel: SIGINT in each worker), whose training writes a checkpoint and stops."""
    folder = tmp_path / "sweep"
    trial_ids = ["d2r_reach+push_rand_base_s0", "d2r_reach+push_rand_base_s1"]
    argv = [*"--algo d2r --env reach,push --seeds 0 1 --num-cpus 2 --refresh 2 -f".split(), str(folder)]
    # 3,000 env steps, random actions until the last 40 (the later learning_starts wins): Ray starts the two trials
    # seconds apart, and both must still be training when the second one has logged its first steps (measured: the
    # first trial had done 280 steps by then, the second 172).
    argv += [*TINY, "learning_starts:2960"]
    argv += [*"-- -n 3000 --env-kwargs max_episode_steps:20 --eval-freq 500 --eval-episodes 1".split()]
    argv += "--final-eval-episodes 1 --verbose 1".split()
    process = start_sweep_process(argv, tmp_path / "first")
    try:
        # Both trials train (2 CPUs, 2 trials), then Ctrl-C: SIGINT to the terminal's foreground process group.
        deadline = time.monotonic() + 240
        runs = [folder / "runs" / trial_id for trial_id in trial_ids]
        while not all(read_progress(find_run_dir(run, "d2r")).steps > 0 for run in runs):
            assert process.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the trials made no progress"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    out, err = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert code == 130, out[-3000:] + err[-3000:]
    assert (
        "Interrupted: the running trials write a checkpoint and stop; run the sweep again to continue." in out
    )
    assert "Interrupted." in err.splitlines() and "Traceback" not in err, err[-3000:]
    stops = {trial_id: stopped_at(folder / "runs" / trial_id, "d2r") for trial_id in trial_ids}
    assert all(0 < steps < 3000 for steps in stops.values()), stops
    summary = json.loads((folder / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["interrupted", "interrupted"]
    # The table's steps are where each trial stopped: its checkpoint, past its last log line.
    assert all(t["env_steps"] == stops[t["trial"]] for t in summary["trials"]), summary

    again = start_sweep_process(argv, tmp_path / "second")
    try:
        assert again.wait(timeout=300) == 0, (tmp_path / "second.err").read_text()[-3000:]
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
    assert "2 trials, 0 finished earlier, 2 to run" in (tmp_path / "second.out").read_text()
    summary = json.loads((folder / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["done (resumed)", "done (resumed)"]
    assert all(t["env_steps"] == 3000 and t["final_success"] is not None for t in summary["trials"])
    for trial_id, steps in stops.items():
        run = find_run_dir(folder / "runs" / trial_id, "d2r")
        assert run is not None
        log = (folder / "runs" / trial_id / "trial.log").read_text()
        assert f"from checkpoints/step_{steps:012d} at {steps} steps (target 3000)" in log, log[-3000:]
        commands = (run / "custom-rand" / "command.txt").read_text().splitlines()
        assert len(commands) == 2 and commands[1].startswith("python zoo/train.py --resume")
        history = json.loads((run / "evaluations.json").read_text())["timesteps"]
        # One history: the first session's evaluations, then the resumed session's, each once (not restarted).
        assert history == list(range(1000, 3001, 1000))


def test_ctrl_c_during_the_sweeps_wait_is_a_flag_that_cannot_be_lost():
    """The first SIGINT only sets the flag the sweep's loop reads between Ray waits (a KeyboardInterrupt raised
    inside ray.wait's C++ call can be lost); a second one interrupts at once; the previous handler comes back."""
    from d2r_sb3.zoo.trials import ctrl_c_as_a_flag

    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_as_a_flag() as ctrl_c:
        assert not ctrl_c.requested
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # (the handler runs at the next bytecode)
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
    # Off the main thread (signals reach the main thread only) nothing is installed.
    seen = []
    thread = threading.Thread(target=lambda: seen.append(ctrl_c_as_a_flag().__enter__().requested))
    thread.start()
    thread.join()
    assert seen == [False] and signal.getsignal(signal.SIGINT) is before
