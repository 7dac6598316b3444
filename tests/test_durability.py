"""Training that survives anything: real training processes on real Meta-World envs, killed and resumed.

Every run here is ``zoo/train.py`` as a user starts it (a subprocess, one torch thread), on two Meta-World tasks
with 20-step episodes and a tiny D2R network, so that a whole run takes seconds.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch as th
import yaml
from helpers import TINY_D2R_FLAG as TINY_POLICY

from d2r_sb3 import D2RSAC
from d2r_sb3.common.checkpoints import CheckpointStore
from d2r_sb3.common.run_lock import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
NAME = "custom-rand"
# 2 tasks x 300 = 600 env steps; an evaluation every 50 steps per task, a checkpoint every 35.
RUN = [
    *"--algo d2r --env reach,drawer-close --seed 0 -n 600".split(),
    *("--hyperparams", "batch_size:16", "learning_starts:100", "buffer_size:2000", TINY_POLICY),
    *"--env-kwargs max_episode_steps:20 --eval-freq 50 --eval-episodes 2 --final-eval-episodes 2".split(),
    *"--save-freq 35 --num-threads 1 --verbose 1".split(),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
WALL_CLOCK_COLUMNS = {"time/fps", "time/time_elapsed"}


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "zoo/train.py", *args]


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def start_train(*args: str, new_session: bool = False) -> subprocess.Popen:
    """The training process; ``new_session``: in its own process group, as a terminal's foreground job."""
    return subprocess.Popen(
        train_cmd(*args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=new_session,
    )


def check_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


def new_run(folder: Path, *extra: str) -> Path:
    check_ok(run_train(*RUN, "-f", str(folder), *extra))
    return folder / "d2r" / f"{NAME}_1"


def outcome(run: Path) -> dict:
    """What must be identical between an interrupted run and an uninterrupted one (wall-clock aside)."""
    model = D2RSAC.load(run / f"{NAME}.zip", device="cpu")
    newest = CheckpointStore(run / "checkpoints").list()[0]
    with np.load(newest.buffer_path) as data:
        buffer = {key: data[key].copy() for key in data.files}
    with open(run / "progress.csv", newline="") as file:
        rows = [
            {key: value for key, value in row.items() if key not in WALL_CLOCK_COLUMNS}
            for row in csv.DictReader(file)
        ]
    evaluations = json.loads((run / "evaluations.json").read_text())
    evaluations.pop("wall_time")
    results = json.loads((run / "results.json").read_text())
    return {
        "params": model.policy.state_dict(),
        "log_alpha": model.log_ent_coef.detach().clone(),
        "n_updates": model._n_updates,
        "episodes": model._episode_num,
        "buffer": buffer,
        "rows": rows,
        "evaluations": evaluations,
        "results": {key: results[key] for key in ("success", "mean_return", "total_timesteps", "n_updates")},
    }


def assert_same_outcome(got: dict, expected: dict, note: str) -> None:
    for key, tensor in expected["params"].items():
        assert th.equal(got["params"][key], tensor), f"{note}: parameter {key} differs"
    assert th.equal(got["log_alpha"], expected["log_alpha"]), note
    assert (got["n_updates"], got["episodes"]) == (expected["n_updates"], expected["episodes"]), note
    assert got["buffer"].keys() == expected["buffer"].keys(), note
    for key, array in expected["buffer"].items():
        np.testing.assert_array_equal(got["buffer"][key], array, err_msg=f"{note}: buffer {key}")
    assert len(got["rows"]) == len(expected["rows"]), note
    for i, (row, want) in enumerate(zip(got["rows"], expected["rows"], strict=True)):
        assert row == want, f"{note}: progress.csv row {i} differs"
    assert got["evaluations"] == expected["evaluations"], note
    assert got["results"] == expected["results"], note


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (tests that change a run work on a copy)."""
    return new_run(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> dict:
    return outcome(reference_run)


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "d2r" / run.name
    shutil.copytree(run, copy)
    return copy


def wait_for(predicate, timeout: float = 120.0, step: float = 0.001) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("the training process did not get there in time")
        time.sleep(step)


def newest_steps(run: Path) -> int:
    checkpoints = CheckpointStore(run / "checkpoints").list()
    return checkpoints[0].num_timesteps if checkpoints else 0


def checkpoint_names(run: Path) -> list[str]:
    try:
        return os.listdir(run / "checkpoints")
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("goals, preset", [("rand", "paper"), ("mw3", "mw3"), ("fixed", "paper")])
def test_in_process_resume_from_any_checkpoint_is_exact_for_every_goal_mode(goals, preset, tmp_path: Path):
    """The library API: checkpoints mid-episode (every 37 vector steps of 20-step episodes), each resumed."""
    from d2r_sb3 import make_mt_env
    from d2r_sb3.common.checkpoints import TrainingCheckpointCallback, load_buffer, restore_training_state

    def env():
        return make_mt_env(
            ["reach", "drawer-close"], goals=goals, preset=preset, max_episode_steps=20, seed=0
        )

    def model(venv):
        kwargs = dict(n_modules=4, module_dim=16, encoder_sizes=[32], gate_sizes=[16])
        return D2RSAC(
            "D2RPolicy",
            venv,
            seed=0,
            batch_size=16,
            learning_starts=60,
            buffer_size=2000,
            policy_kwargs=kwargs,
        )

    uninterrupted = model(env())
    uninterrupted.learn(300)
    store = CheckpointStore(tmp_path, keep=3)
    model(env()).learn(300, callback=TrainingCheckpointCallback(store, save_freq_per_task=37))
    assert [c.num_timesteps for c in store.list()] == [296, 222, 148]
    for checkpoint in store.list():
        resumed = D2RSAC.load(checkpoint.model_path, env=env())
        load_buffer(resumed.replay_buffer, checkpoint.buffer_path)
        assert restore_training_state(resumed, checkpoint.state()), "not exact"
        resumed.learn(300 - resumed.num_timesteps, reset_num_timesteps=False)
        for got, expected in zip(resumed.policy.parameters(), uninterrupted.policy.parameters(), strict=True):
            assert th.equal(got, expected), checkpoint.num_timesteps
        assert resumed._episode_num == uninterrupted._episode_num


def test_checkpoints_record_env_settings_given_as_numpy_values_and_tuples(tmp_path: Path):
    """An env whose ``env_kwargs()`` holds numpy numbers or tuples still checkpoints; the YAML reads back plain."""
    from d2r_sb3 import make_mt_env
    from d2r_sb3.common.checkpoints import TrainingCheckpointCallback
    from d2r_sb3.common.run_layout import ENV_KWARGS_FILE

    env = make_mt_env(["reach", "drawer-close"], max_episode_steps=20, seed=0)
    plain = env.env_kwargs()
    env.env_kwargs = lambda: {  # type: ignore[method-assign]
        **plain,
        "benchmark": tuple(plain["benchmark"]),
        "seed": np.int64(plain["seed"]),
        "reward_scale": np.float32(plain["reward_scale"]),
    }
    model = D2RSAC(
        "D2RPolicy",
        env,
        seed=0,
        batch_size=16,
        learning_starts=40,
        buffer_size=500,
        policy_kwargs=dict(n_modules=4, module_dim=16, encoder_sizes=[32], gate_sizes=[16]),
    )
    store = CheckpointStore(tmp_path)
    model.learn(60, callback=TrainingCheckpointCallback(store, save_freq_per_task=25))
    newest = store.latest()
    assert newest is not None and newest.num_timesteps == 50
    newest.verify()
    saved = yaml.safe_load((newest.path / ENV_KWARGS_FILE).read_text())
    assert saved == {**plain, "reward_scale": float(np.float32(plain["reward_scale"]))}
    assert type(saved["seed"]) is int and type(saved["benchmark"]) is list


@pytest.mark.slow
def test_sigkill_at_random_moments_and_during_checkpoint_writes_resumes_bit_identical(
    reference: dict, tmp_path: Path
):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    run = tmp_path / "d2r" / f"{NAME}_1"
    process = start_train(*RUN, "-f", str(tmp_path))
    kills = []
    # Kill 1: at a random moment once training is under way; kill 2: the instant a checkpoint write starts
    # (its partial folder appears); kills 3-4: random moments of resumed processes.
    for attempt in range(4):
        done = newest_steps(run)
        if attempt == 1:
            writing = lambda p=process: (  # noqa: E731
                any(n.startswith(".partial-") for n in checkpoint_names(run)) or p.poll() is not None
            )
            wait_for(writing)
        else:  # once this process has made progress (a new checkpoint), at a random moment
            wait_for(lambda d=done, p=process: newest_steps(run) > d or p.poll() is not None)
            time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills.append(sorted(checkpoint_names(run)))
        process = start_train("--resume", str(run))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, (
        f"seed {seed}: exit {process.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    )
    assert len(kills) >= 2, f"seed {seed}: the run finished before it could be killed twice"
    # The last process resumed and trained, unless the last kill landed once the run had written everything
    # (results.json last): then it rightly had nothing to do, and the outcome below is what shows it was exact.
    if "nothing to do and nothing changed" not in stdout:
        assert "Resumed exactly where the checkpoint was taken" in stdout, stdout[-2000:]
    assert_same_outcome(outcome(run), reference, f"seed {seed}, checkpoints at the kills: {kills}")
    assert not [n for n in checkpoint_names(run) if n.startswith(".partial-")]  # leftovers cleaned


def test_sigterm_and_sigint_checkpoint_then_exit_and_the_resume_is_exact(reference: dict, tmp_path: Path):
    run = tmp_path / "d2r" / f"{NAME}_1"
    process = start_train(*RUN, "-f", str(tmp_path))
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        done = newest_steps(run)
        wait_for(lambda d=done: newest_steps(run) > d)  # training is under way
        time.sleep(0.5)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == code, stdout + stderr
        assert "writing a checkpoint, then stopping" in stderr and "Continue with" in stderr
        assert "Traceback" not in stderr
        steps = int(stderr.split("Stopped at ")[1].split()[0])
        assert CheckpointStore(run / "checkpoints").list()[0].num_timesteps == steps  # taken at the stop
        if signum == signal.SIGTERM:
            process = start_train("--resume", str(run))
    check_ok(run_train("--resume", str(run)))
    assert_same_outcome(outcome(run), reference, "stopped by SIGTERM and SIGINT")


def test_stop_signals_to_the_process_group_of_a_subprocess_env_run_still_checkpoint(tmp_path: Path):
    """Ctrl-C in a terminal, systemd and Slurm signal every process of the job, SubprocVecEnv's env workers too:
    they ignore it, so the training process can still step them to the checkpoint it writes before stopping.
    SIGTERM to the group, resume from that checkpoint, then SIGINT to the group."""
    run = tmp_path / "d2r" / f"{NAME}_1"
    args = (*RUN, "--vec-env", "subproc", "-f", str(tmp_path))
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        done = newest_steps(run)
        process = start_train(*args, new_session=True)
        wait_for(lambda d=done: newest_steps(run) > d)
        time.sleep(0.5)
        os.killpg(process.pid, signum)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == code, stdout[-2000:] + stderr[-2000:]
        assert "Traceback" not in stderr and "a write failed" not in stderr, stderr[-2000:]
        steps = int(stderr.split("Stopped at ")[1].split()[0])
        assert CheckpointStore(run / "checkpoints").list()[0].num_timesteps == steps
        if signum == signal.SIGTERM:
            args = ("--resume", str(run))
        else:
            assert "Resumed exactly where the checkpoint was taken" in stdout


def test_a_second_sigint_aborts_only_when_it_comes_apart_from_the_first(monkeypatch: pytest.MonkeyPatch):
    """`timeout -s INT` signals the process and then its process group: two SIGINTs microseconds apart are one
    stop (a checkpoint, exit 130), not a second Ctrl-C that aborts without one."""
    from d2r_sb3.zoo import training

    class Checkpoints:
        stops = 0

        def request_stop(self) -> None:
            self.stops += 1

    clock = [100.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    checkpoints = Checkpoints()
    stop = training.StopOnSignal(checkpoints)  # type: ignore[arg-type]
    stop._handle(signal.SIGINT, None)
    clock[0] += training.SECOND_CTRL_C_AFTER_S / 10
    stop._handle(signal.SIGINT, None)  # the same stop, delivered twice
    stop._handle(signal.SIGTERM, None)  # SIGTERM never aborts
    assert (stop.received, checkpoints.stops) == (signal.SIGINT, 1)
    clock[0] += training.SECOND_CTRL_C_AFTER_S
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)  # a second Ctrl-C


def test_a_run_stopped_after_its_last_checkpoint_is_finished_by_resume(
    reference_run: Path, reference: dict, tmp_path: Path
):
    """Killed after the checkpoint at its target, during the final evaluation: the final files are missing, and
    --resume writes them (training no further) instead of saying that there is nothing to do."""
    run = copy_run(reference_run, tmp_path)
    for name in (f"{NAME}.zip", "results.json"):
        (run / name).unlink()
    shutil.rmtree(run / "policy")
    result = check_ok(run_train("--resume", str(run)))
    assert "has trained its 600 steps; writing its final model and evaluation" in result
    assert "Training" not in result and "nothing to do" not in result
    assert (run / "policy" / "policy.safetensors").is_file()
    assert_same_outcome(outcome(run), reference, "finished by --resume after the last checkpoint")
    # Now finished: a resume has nothing to do.
    assert "nothing to do and nothing changed" in check_ok(run_train("--resume", str(run)))


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(
    reference_run: Path, reference: dict, tmp_path: Path
):
    run = copy_run(reference_run, tmp_path)
    store = CheckpointStore(run / "checkpoints")
    newest, previous = store.list()
    assert (newest.num_timesteps, previous.num_timesteps) == (600, 560)  # the final one and the last periodic
    with open(newest.model_path, "r+b") as file:  # a truncated zip, as a kill or a full disk leaves it
        file.truncate(newest.model_path.stat().st_size // 2)
    (run / "checkpoints" / ".partial-630-99999").mkdir()  # an interrupted write
    (run / "checkpoints" / ".partial-630-99999" / "model.zip").write_bytes(b"half")
    (run / f"{NAME}.zip").unlink()  # as if the run had been killed while writing its end
    (run / "results.json").unlink()
    out = check_ok(run_train("--resume", str(run)))
    assert "skipping a damaged checkpoint" in out and "model.zip has" in out
    assert "from checkpoints/step_000000000560 at 560 steps" in out
    assert not (run / "checkpoints" / ".partial-630-99999").exists()
    assert_same_outcome(outcome(run), reference, "resumed from the checkpoint before a damaged one")


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(
    reference_run: Path, tmp_path: Path
):
    run = copy_run(reference_run, tmp_path)
    first = start_train("--resume", str(run), "-n", "100000")
    wait_for(lambda: '"pid"' in (run / ".lock").read_text())
    second = run_train("--resume", str(run), "-n", "100000")
    assert second.returncode == 2 and "being written by another training process" in second.stderr
    assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    first.send_signal(signal.SIGKILL)  # its lock file stays behind, naming a dead process
    first.wait()
    assert str(first.pid) in (run / ".lock").read_text()
    third = run_train("--resume", str(run), "-n", "100")  # nothing to do, but the lock is taken first
    assert f"took over the lock of {run} left by PID {first.pid}" in check_ok(third)
    # In-process too: the lock is exclusive while held.
    lock = RunLock(run)
    assert lock.acquire() is None
    with pytest.raises(RunLockedError):
        RunLock(run).acquire()  # a second open file description of the same process is refused too
    lock.release()


def test_resume_with_no_more_steps_to_do_changes_nothing(reference_run: Path, tmp_path: Path):
    run = copy_run(reference_run, tmp_path)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    for extra in ([], ["-n", "100"]):
        out = check_ok(run_train("--resume", str(run), *extra))
        assert "nothing to do and nothing changed" in out and "already has 600 steps" in out
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert after == before
    assert yaml.safe_load((run / NAME / "config.yml").read_text())["n_timesteps"] == 600


def test_an_unusable_log_folder_is_refused_before_anything_is_built(tmp_path: Path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for folder, message in ((a_file, "is a file, not a folder"), (Path("/proc/1/logs"), "is not writable")):
        start = time.monotonic()
        result = run_train(*RUN, "-f", str(folder))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "Using cpu device" not in result.stdout
        assert time.monotonic() - start < 60


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 150 MB file system (tmpfs) to fill up; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_refused_up_front_and_filling_up_mid_run_keeps_the_last_checkpoint(small_disk: Path):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (100 * 2**20))  # 50 MB left: less than a run asks for
    result = run_train(*RUN, "-f", str(small_disk / "logs"))
    assert result.returncode == 2 and "MB free" in result.stderr, result.stderr
    filler.unlink()

    run = small_disk / "logs" / "d2r" / f"{NAME}_1"
    process = start_train(*RUN, "-n", "100000", "-f", str(small_disk / "logs"))
    wait_for(lambda: newest_steps(run) > 0 or process.poll() is not None)
    with open(filler, "wb") as file:  # the disk fills up while the run goes on
        try:
            while True:
                file.write(b"\0" * 2**20)
        except OSError:
            pass
    stdout, stderr = process.communicate(timeout=120)
    filler.unlink()
    assert process.returncode == 1, stdout + stderr
    assert "error: a write failed" in stderr and "No space left on device" in stderr, stderr
    assert "The last good checkpoint is" in stderr and f"--resume {run}" in stderr
    assert "Traceback" not in stderr
    assert not [n for n in checkpoint_names(run) if n.startswith(".partial-")]
    newest = CheckpointStore(run / "checkpoints").latest()
    assert newest is not None
    newest.verify()  # intact, and the run continues from it once there is room again
    check_ok(
        run_train("--resume", str(run), "-n", str(newest.num_timesteps + 40), "--final-eval-episodes", "0")
    )


def test_tensorboards_writer_thread_failing_on_a_full_disk_prints_one_line_and_is_closed(
    small_disk: Path, capsys
):
    from stable_baselines3.common.logger import configure

    from d2r_sb3.zoo.training import BackgroundWriteErrorsInOneLine, Callbacks, _close_after_learning

    others = set(threading.enumerate())  # other tests' writers may still run in this process
    logger = configure(str(small_disk / "run"), ["tensorboard"])
    with open(small_disk / "filler", "wb", buffering=0) as filler:
        with pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 2**16)
    main_saw = None
    with BackgroundWriteErrorsInOneLine():
        for step in range(10_000):  # the writer thread fails first; the next dump raises the same error here
            logger.record("train/loss", float(step))
            try:
                logger.dump(step)
            except OSError as err:
                main_saw = err
                break
            time.sleep(0.001)
        _close_after_learning(Callbacks(None, None), logger, failed=True)  # type: ignore[arg-type]
    assert main_saw is not None and main_saw.errno == 28
    err = capsys.readouterr().err
    assert "a background writer (thread" in err and "No space left on device" in err, err
    assert "Traceback" not in err
    assert [t for t in threading.enumerate() if t not in others] == []  # this logger's writer was joined


def test_a_disk_too_small_for_the_checkpoints_is_announced_before_training(small_disk: Path, capsys):
    from d2r_sb3 import make_mt_env
    from d2r_sb3.zoo.training import warn_if_checkpoints_may_not_fit

    env = make_mt_env(["reach", "drawer-close"], max_episode_steps=20)
    kwargs = dict(n_modules=4, module_dim=16, encoder_sizes=[32], gate_sizes=[16])
    small = D2RSAC("D2RPolicy", env, buffer_size=2_000, batch_size=16, policy_kwargs=kwargs)
    warn_if_checkpoints_may_not_fit(small, small_disk, keep=2)
    assert capsys.readouterr().err == ""
    large = D2RSAC("D2RPolicy", env, buffer_size=400_000, batch_size=16, policy_kwargs=kwargs)  # ~0.3 GB each
    warn_if_checkpoints_may_not_fit(large, small_disk, keep=2)
    err = capsys.readouterr().err
    assert (
        "GB free" in err and "3 checkpoints" not in err and "2 checkpoints plus the one being written" in err
    )


def test_a_run_folder_turning_read_only_mid_run_stops_clearly_and_keeps_the_last_checkpoint(tmp_path: Path):
    run = tmp_path / "d2r" / f"{NAME}_1"
    process = start_train(*RUN, "-n", "100000", "-f", str(tmp_path))
    wait_for(lambda: newest_steps(run) > 0 or process.poll() is not None)
    folders = [str(run), str(run / "checkpoints")]
    frozen = subprocess.run(["chattr", "+i", *folders], capture_output=True)  # immutable even for root
    if frozen.returncode != 0:
        process.kill()
        pytest.skip(f"chattr +i is not supported here: {frozen.stderr.decode().strip()}")
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        subprocess.run(["chattr", "-i", *folders], check=True)
    assert process.returncode == 1, stdout + stderr
    assert "error: a write failed" in stderr and "Operation not permitted" in stderr, stderr
    assert "The last good checkpoint is" in stderr and "Traceback" not in stderr
    CheckpointStore(run / "checkpoints").list()[0].verify()


def _finite(path: Path) -> bool:
    model = D2RSAC.load(path, device="cpu")
    return all(th.isfinite(t).all() for t in model.policy.state_dict().values() if t.is_floating_point())


def test_a_diverging_run_stops_with_a_clear_error_and_leaves_only_finite_models(tmp_path: Path):
    # The durability issue's drill: the default network, a learning rate of 1e8 and no gradient clipping.
    result = run_train(
        *"--algo d2r --env reach,drawer-close -n 1200 --num-threads 1 -f".split(),
        str(tmp_path),
        *"-params batch_size:20 learning_starts:100 buffer_size:2000 learning_rate:1e8 max_grad_norm:None".split(),
        *"--env-kwargs max_episode_steps:20 --eval-freq 10 --eval-episodes 1 --save-freq 10".split(),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: training stopped:" in result.stderr and "Traceback" not in result.stderr
    run = tmp_path / "d2r" / f"{NAME}_1"
    assert "The last good checkpoint is" in result.stderr
    checkpoints = CheckpointStore(run / "checkpoints").list()
    assert checkpoints, "the run wrote checkpoints before diverging"
    for checkpoint in checkpoints:
        checkpoint.verify()
        assert _finite(checkpoint.model_path), checkpoint.path
    if (run / "best_model.zip").exists():
        assert _finite(run / "best_model.zip")
    assert not (run / f"{NAME}.zip").exists() and not (run / "results.json").exists()
