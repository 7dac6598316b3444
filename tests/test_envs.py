"""Tests of d2r_sb3.envs: multi-task Meta-World VecEnvs (real Meta-World, short rollouts)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import metaworld
import numpy as np
import pytest
from stable_baselines3.common.vec_env import SubprocVecEnv, VecEnvWrapper

from d2r_sb3.envs import (
    GOAL_MODES,
    PRESETS,
    EpisodeLimit,
    EpisodeSuccess,
    MultiTaskVecEnv,
    benchmark_task_names,
    make_mt_env,
    normalize_task_name,
)

MT10_ORDER = [
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
]
GOAL = slice(36, 39)  # goal position inside the 39-d Meta-World state (before the one-hot)


def zero_actions(env: MultiTaskVecEnv) -> np.ndarray:
    return np.zeros((env.num_envs, 4), dtype=np.float32)


def random_actions(env: MultiTaskVecEnv, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1, 1, size=(env.num_envs, 4)).astype(np.float32)


def goals_over_resets(env: MultiTaskVecEnv, n_resets: int) -> np.ndarray:
    """Goal of every sub-env at each of ``n_resets`` resets: shape (n_resets, num_envs, 3)."""
    return np.stack([env.reset()[:, GOAL].copy() for _ in range(n_resets)])


@pytest.fixture(scope="module")
def mt10() -> Iterator[MultiTaskVecEnv]:
    env = make_mt_env("MT10", goals="rand", preset="paper", seed=0)
    yield env
    env.close()


# --------------------------------------------------------------------------------------------------
# Generic wrappers, on a tiny fake env
# --------------------------------------------------------------------------------------------------
class ScriptedSuccessEnv(gym.Env):
    """Emits a fixed per-step success sequence; never ends by itself."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def __init__(self, successes: list[float]) -> None:
        self.successes = successes
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action: Any):
        success = self.successes[self.t]
        self.t += 1
        return np.zeros(1, dtype=np.float32), 0.0, False, False, {"success": success}


@pytest.mark.parametrize(
    ("successes", "expected"),
    [([0.0, 1.0, 0.0, 0.0], 1.0), ([0.0, 0.0, 0.0, 1.0], 1.0), ([0.0, 0.0, 0.0, 0.0], 0.0)],
)
def test_episode_success_is_any_step(successes: list[float], expected: float) -> None:
    env = EpisodeSuccess(EpisodeLimit(ScriptedSuccessEnv(successes), len(successes), terminal=True))
    env.reset()
    for t in range(len(successes)):
        _, _, terminated, truncated, info = env.step(np.zeros(1))
        assert info["success"] == successes[t]  # per-step key untouched
        if t < len(successes) - 1:
            assert "is_success" not in info and not (terminated or truncated)
    assert terminated and info["is_success"] == expected
    env.reset()  # the flag starts over
    assert not env.get_wrapper_attr("episode_success")


@pytest.mark.parametrize("terminal", [True, False])
def test_episode_limit_terminal_or_truncated(terminal: bool) -> None:
    env = EpisodeLimit(ScriptedSuccessEnv([0.0] * 5), 3, terminal=terminal)
    env.reset()
    flags = [env.step(np.zeros(1))[2:4] for _ in range(3)]
    assert flags[:2] == [(False, False), (False, False)]
    assert flags[2] == ((True, False) if terminal else (False, True))
    with pytest.raises(ValueError):
        EpisodeLimit(ScriptedSuccessEnv([]), 0)


# --------------------------------------------------------------------------------------------------
# Names and bad input
# --------------------------------------------------------------------------------------------------
def test_task_names() -> None:
    assert benchmark_task_names("MT10") == MT10_ORDER
    assert benchmark_task_names("mt50") == list(metaworld.env_dict.MT50_V3)
    assert len(benchmark_task_names("MT50")) == 50
    assert benchmark_task_names(["reach-v3", "drawer-open"]) == ["reach-v3", "drawer-open-v3"]
    assert benchmark_task_names("push") == ["push-v3"]
    assert normalize_task_name("drawer-open") == "drawer-open-v3"
    assert normalize_task_name("drawer-open-v3") == "drawer-open-v3"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(benchmark="MT11"), "MT10"),
        (dict(benchmark=["reach", "not-a-task"]), "reach-v3"),
        (dict(benchmark=["reach-v2"]), "-v3"),
        (dict(benchmark=["reach", "reach-v3"]), "Duplicate"),
        (dict(benchmark=[]), "MT10"),
        (dict(benchmark=["reach"], goals="random"), "fixed, rand, mw3"),
        (dict(benchmark=["reach"], preset="d2r"), "paper, mw3"),
        (dict(benchmark=["reach"], max_episode_steps=501), "500"),
        (dict(benchmark=["reach"], max_episode_steps=0), "500"),
        (dict(benchmark=["reach"], vec_env="async"), "dummy, subproc"),
        (dict(benchmark=["reach"], reward_function_version="v3"), "v1, v2"),
        (dict(benchmark=["reach"], seed=-1), "seed"),
        (dict(benchmark=["reach"], render_mode="rgb"), "rgb_array"),
    ],
)
def test_bad_input_raises_with_choices(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_mt_env(**kwargs)


def test_presets_and_goal_modes_exported() -> None:
    assert GOAL_MODES == ("fixed", "rand", "mw3")
    paper, mw3 = PRESETS["paper"], PRESETS["mw3"]
    assert (paper.max_episode_steps, paper.time_limit_terminal, paper.reward_scale) == (200, True, 0.1)
    assert (mw3.max_episode_steps, mw3.time_limit_terminal, mw3.reward_scale) == (500, False, 1.0)
    assert paper.reward_function_version == mw3.reward_function_version == "v2"
    assert not paper.handle_timeout_termination and mw3.handle_timeout_termination


# --------------------------------------------------------------------------------------------------
# MT10 / MT50 layout
# --------------------------------------------------------------------------------------------------
def test_mt10_layout(mt10: MultiTaskVecEnv) -> None:
    assert isinstance(mt10, VecEnvWrapper)
    assert mt10.num_envs == mt10.num_tasks == 10
    assert mt10.task_names == MT10_ORDER and mt10.benchmark == "MT10"
    assert (mt10.goals, mt10.preset, mt10.env_seed, mt10.max_episode_steps) == ("rand", "paper", 0, 200)
    assert mt10.reward_scale == pytest.approx(0.1) and mt10.handle_timeout_termination is False
    assert mt10.observation_space.shape == (49,) and mt10.observation_space.dtype == np.float32
    assert mt10.action_space == gym.spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
    obs = mt10.reset()
    assert obs.shape == (10, 49) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs[:, 39:], np.eye(10, dtype=np.float32))  # one-hot at the end, in order
    assert all(mt10.observation_space.contains(o) for o in obs)
    assert mt10.get_attr("task_name") == MT10_ORDER
    assert mt10.get_attr("task_index") == list(range(10))
    assert mt10.task_index("drawer-open") == 4
    obs, rewards, dones, infos = mt10.step(zero_actions(mt10))
    assert obs.dtype == np.float32 and rewards.shape == (10,) and not dones.any()
    assert all("success" in info for info in infos)


def test_env_kwargs_round_trip(mt10: MultiTaskVecEnv) -> None:
    kwargs = mt10.env_kwargs()
    json.dumps(kwargs)  # plain types only
    assert (
        kwargs["benchmark"] == "MT10" and kwargs["seed"] == 0 and kwargs["reward_scale"] == pytest.approx(0.1)
    )
    custom = make_mt_env(["window-close", "reach"], goals="fixed", preset="mw3", seed=3, max_episode_steps=50)
    try:
        rebuilt = make_mt_env(**custom.env_kwargs())
        try:
            assert rebuilt.env_kwargs() == custom.env_kwargs()
            assert rebuilt.benchmark == "custom" and rebuilt.task_names == ["window-close-v3", "reach-v3"]
            np.testing.assert_array_equal(rebuilt.reset(), custom.reset())
        finally:
            rebuilt.close()
    finally:
        custom.close()


@pytest.mark.slow
def test_mt50_builds() -> None:
    env = make_mt_env("MT50", goals="rand", seed=1)
    try:
        assert env.num_envs == env.num_tasks == 50
        assert env.task_names == list(metaworld.env_dict.MT50_V3)
        obs = env.reset()
        assert obs.shape == (50, 89) and obs.dtype == np.float32
        np.testing.assert_array_equal(obs[:, 39:], np.eye(50, dtype=np.float32))
        assert all(env.observation_space.contains(o) for o in obs)
        env.step(zero_actions(env))
    finally:
        env.close()


# --------------------------------------------------------------------------------------------------
# Goal modes
# --------------------------------------------------------------------------------------------------
def test_fixed_goals_identical_across_episodes() -> None:
    env = make_mt_env(["pick-place", "drawer-open"], goals="fixed", seed=0, max_episode_steps=5)
    try:
        first = env.reset()
        rng = np.random.default_rng(0)
        for _ in range(4):  # full episodes, auto-reset by the VecEnv
            for _ in range(5):
                obs, _, dones, _ = env.step(random_actions(env, rng))
            assert dones.all()
            np.testing.assert_array_equal(obs, first)  # every episode starts from the same state
        goals = goals_over_resets(env, 10)
        assert (goals == first[None, :, GOAL]).all()
    finally:
        env.close()


def test_rand_goals_differ_across_resets(mt10: MultiTaskVecEnv) -> None:
    goals = goals_over_resets(mt10, 5)
    for i in range(mt10.num_envs):
        assert len({tuple(g) for g in goals[:, i]}) == 5, mt10.task_names[i]


def test_mw3_goals_come_from_the_50_presampled(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another library's gym.make_vec(..., num_goals=3) overwrites this module global; mw3 must not inherit it.
    monkeypatch.setattr(metaworld, "_N_GOALS", 3)
    env = make_mt_env(["reach", "push"], goals="mw3", seed=7)
    try:
        assert metaworld._N_GOALS == 3  # restored
        pools = env.get_attr("goal_pool")
        assert [len(p) for p in pools] == [50, 50]
        # Same goals as Meta-World's own MT1 benchmark for this seed.
        monkeypatch.setattr(metaworld, "_N_GOALS", 50)
        reference = metaworld.MT1("reach-v3", seed=7).train_tasks
        assert [t.data for t in pools[0]] == [t.data for t in reference]
        pool_vecs = [{tuple(pickle.loads(t.data)["rand_vec"]) for t in pool} for pool in pools]
        seen: list[set[tuple[float, ...]]] = [set(), set()]
        for _ in range(60):
            env.reset()
            for i, vec in enumerate(env.get_attr("rand_vec")):
                assert tuple(vec) in pool_vecs[i]
                seen[i].add(tuple(vec))
        assert all(1 < len(s) <= 50 for s in seen)  # several goals, drawn with repeats
    finally:
        env.close()


def test_mw3_mt10_matches_metaworld_and_leaves_n_goals(mt10: MultiTaskVecEnv) -> None:
    assert metaworld._N_GOALS == 50
    fixed = make_mt_env(["reach", "push"], goals="fixed", seed=0)
    fixed.close()
    env = make_mt_env("MT10", goals="mw3", preset="mw3", seed=0)
    try:
        assert metaworld._N_GOALS == 50
        reference = metaworld.MT10(seed=0).train_tasks
        for name, pool in zip(env.task_names, env.get_attr("goal_pool"), strict=True):
            assert [t.data for t in pool] == [t.data for t in reference if t.env_name == name]
    finally:
        env.close()


# --------------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------------
def rollout(env: MultiTaskVecEnv, n_steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = [env.reset()]
    for _ in range(n_steps):
        frames.append(env.step(random_actions(env, rng))[0])
    return np.stack(frames)


@pytest.mark.parametrize("goals", GOAL_MODES)
def test_same_seed_same_sequence_different_seed_differs(goals: str) -> None:
    kwargs: dict[str, Any] = dict(benchmark=["reach", "pick-place"], goals=goals, max_episode_steps=4)
    a, b, c = make_mt_env(seed=5, **kwargs), make_mt_env(seed=5, **kwargs), make_mt_env(seed=6, **kwargs)
    try:
        b.seed(1234)  # SB3 (e.g. SAC(seed=...)) seeds the VecEnv; the env's own seed must stay in charge
        run_a, run_b, run_c = rollout(a, 22), rollout(b, 22), rollout(c, 22)  # 5+ episodes with resets
        np.testing.assert_array_equal(run_a, run_b)
        assert not np.array_equal(run_a[0], run_c[0])
        if goals != "fixed":  # the goal sequence changes along the run, identically for a and b
            assert len({tuple(g) for g in run_a[:, 0, GOAL]}) > 1
    finally:
        for env in (a, b, c):
            env.close()


def test_task_streams_independent_of_other_tasks() -> None:
    """Different tasks get different streams; a task's stream does not depend on its neighbours."""
    alone = make_mt_env(["reach"], goals="rand", seed=2)
    paired = make_mt_env(["push", "reach"], goals="rand", seed=2)
    try:
        g_alone, g_paired = goals_over_resets(alone, 3), goals_over_resets(paired, 3)
        np.testing.assert_array_equal(g_alone[:, 0], g_paired[:, 1])
        assert paired.reset()[0, 39:].tolist() == [1.0, 0.0]  # one-hot over this env's 2 tasks
    finally:
        alone.close()
        paired.close()


# --------------------------------------------------------------------------------------------------
# Episodes, rewards, success
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "length", "truncated"), [("paper", 200, False), ("mw3", 500, True)])
def test_episode_end(preset: str, length: int, truncated: bool) -> None:
    env = make_mt_env(["reach"], goals="rand", preset=preset, seed=0)
    try:
        assert env.max_episode_steps == length and env.handle_timeout_termination is truncated
        env.reset()
        for t in range(1, length + 1):
            _, _, dones, infos = env.step(zero_actions(env))
            assert dones[0] == (t == length)
        info = infos[0]
        assert info["TimeLimit.truncated"] is truncated
        assert info["episode"]["l"] == length and "terminal_observation" in info
        assert info["is_success"] in (0.0, 1.0) and info["episode"]["is_success"] == info["is_success"]
        env.step(zero_actions(env))  # auto-reset happened: stepping on is fine
    finally:
        env.close()


def test_reward_scale() -> None:
    kwargs: dict[str, Any] = dict(benchmark=["push", "reach"], goals="rand", seed=4)
    scaled, raw = make_mt_env(**kwargs), make_mt_env(reward_scale=1.0, **kwargs)
    try:
        scaled.reset(), raw.reset()
        rng = np.random.default_rng(0)
        for _ in range(20):
            actions = random_actions(scaled, rng)
            _, r_scaled, _, infos = scaled.step(actions)
            _, r_raw, _, _ = raw.step(actions)
            np.testing.assert_allclose(r_scaled, 0.1 * r_raw, rtol=1e-6)
            np.testing.assert_allclose(r_raw, [info["unscaled_reward"] for info in infos], rtol=1e-6)
        assert raw.reward_scale == 1.0 and raw.preset == "paper"
    finally:
        scaled.close()
        raw.close()


@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
def test_is_success_any_step_on_real_env() -> None:
    """Meta-World's scripted reach policy succeeds, then we move away: is_success stays 1 at done."""
    from metaworld.policies import SawyerReachV3Policy

    env = make_mt_env(["reach"], goals="fixed", seed=0, max_episode_steps=150)
    policy = SawyerReachV3Policy()
    try:
        obs = env.reset()
        succeeded_at = None
        for t in range(150):
            state = obs[0, :39]
            if succeeded_at is None:
                action = policy.get_action(state)
            else:  # leave the goal
                action = np.r_[np.clip(50 * (state[:3] - state[GOAL]), -1, 1), 0.0]
            obs, _, dones, infos = env.step(action[None].astype(np.float32))
            if succeeded_at is None and infos[0]["success"]:
                succeeded_at = t
        assert succeeded_at is not None and succeeded_at < 149
        assert dones[0] and infos[0]["success"] == 0.0
        assert infos[0]["is_success"] == 1.0 and infos[0]["episode"]["is_success"] == 1.0
    finally:
        env.close()


def _scripted_policy(task: str) -> Any:
    """Meta-World's hand-written expert for an MT10 task (``drawer-open-v3`` -> ``SawyerDrawerOpenV3Policy``)."""
    import metaworld.policies

    words = task.removesuffix("-v3").replace("peg-insert-side", "peg-insertion-side").split("-")
    return getattr(metaworld.policies, "Sawyer" + "".join(w.capitalize() for w in words) + "V3Policy")()


@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
def test_every_mt10_task_is_solvable_within_the_paper_presets_episodes() -> None:
    """Meta-World's scripted experts solve every MT10 task within the paper preset's 200 steps (Rand goals), so a
    task a trained policy fails, like drawer-open, is left to training, not cut off by the env's settings."""
    env = make_mt_env("MT10", goals="rand", preset="paper", seed=0)
    experts = [_scripted_policy(task) for task in env.task_names]
    solved = np.zeros((3, env.num_envs), dtype=bool)
    try:
        for episode in range(3):  # new goals each episode
            obs = env.reset()
            for _ in range(200):
                actions = np.stack([experts[i].get_action(state[:39]) for i, state in enumerate(obs)])
                obs, _, dones, infos = env.step(np.clip(actions, -1, 1).astype(np.float32))
                solved[episode] |= [bool(info["success"]) for info in infos]
                if dones.any():
                    break
            assert dones.all(), "every episode ends after 200 steps in the paper preset"
            solved[episode] |= [info["is_success"] == 1.0 for info in infos]
    finally:
        env.close()
    per_task = dict(zip(env.task_names, solved.sum(0).tolist(), strict=True))
    assert all(count >= 1 for count in per_task.values()), per_task
    assert per_task["drawer-open-v3"] == 3, per_task  # the README's demo task: solved in every episode


def test_sb3_logs_episode_stats() -> None:
    from stable_baselines3 import SAC

    env = make_mt_env(["reach", "push"], goals="rand", seed=0, max_episode_steps=10)
    try:
        model = SAC(
            "MlpPolicy",
            env,
            buffer_size=1000,
            learning_starts=1000,
            replay_buffer_kwargs=dict(handle_timeout_termination=env.handle_timeout_termination),
            seed=0,
        )
        model.learn(total_timesteps=60)
        assert len(model.ep_info_buffer) == 6 and len(model.ep_success_buffer) == 6
        # time limit is terminal in the paper preset: stored as done
        assert model.replay_buffer.dones[9].all() and not model.replay_buffer.dones[8].any()
    finally:
        env.close()


# --------------------------------------------------------------------------------------------------
# Rendering and SubprocVecEnv
# --------------------------------------------------------------------------------------------------
def test_rgb_array_rendering_headless() -> None:
    env = make_mt_env(
        ["reach", "push"],
        goals="fixed",
        seed=0,
        render_mode="rgb_array",
        camera_name="corner",
        width=64,
        height=48,
    )
    try:
        env.reset()
        (frame,) = env.env_method("render", indices=[1])
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.std() > 0
        assert env.env_kwargs()["width"] == 64
    finally:
        env.close()


@pytest.mark.slow
def test_subproc_vec_env() -> None:
    kwargs: dict[str, Any] = dict(
        benchmark=["reach", "drawer-close"], goals="rand", seed=3, max_episode_steps=5
    )
    sub = make_mt_env(vec_env="subproc", **kwargs)
    dummy = make_mt_env(**kwargs)
    try:
        assert isinstance(sub.venv, SubprocVecEnv)
        assert sub.get_attr("task_name") == ["reach-v3", "drawer-close-v3"]
        np.testing.assert_array_equal(rollout(sub, 12), rollout(dummy, 12))  # crosses two auto-resets
        sub.reset()
        for _ in range(5):
            _, _, dones, infos = sub.step(zero_actions(sub))
        assert dones.all() and all("is_success" in info and "episode" in info for info in infos)
    finally:
        sub.close()
        dummy.close()


# A script that builds a 2-task SubprocVecEnv, prints its workers' pids, and exits without closing it; "wait" first
# waits for a word on stdin (the test signals the workers meanwhile) and steps the envs once more.
_WORKERS_SCRIPT = """
import sys
from d2r_sb3 import make_mt_env
env = make_mt_env(["reach", "drawer-close"], vec_env="subproc", max_episode_steps=5)
env.reset()
print(*[p.pid for p in env.venv.processes], flush=True)
if sys.argv[1] == "wait":
    sys.stdin.readline()  # the test signals the workers meanwhile
    env.step(__import__("numpy").zeros((2, 4), dtype="float32"))
    print("stepped", flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not alive
        return stat.read().split(")")[-1].split()[0] != "Z"


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(pid) for pid in pids)


def _start_workers_script() -> tuple[subprocess.Popen, list[int]]:
    """:data:`_WORKERS_SCRIPT` in its "wait" mode, and its two workers' pids once they are up."""
    process = subprocess.Popen(
        [sys.executable, "-c", _WORKERS_SCRIPT, "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    workers = [int(pid) for pid in process.stdout.readline().split()]
    assert len(workers) == 2, process.stderr.read() if process.stderr else ""
    return process, workers


def test_subproc_workers_ignore_stop_signals_and_an_env_left_open_is_closed_at_exit() -> None:
    """SIGINT / SIGTERM sent to the whole job leave the env workers running (the training process stops them
    after its checkpoint); an env that was never closed is closed at exit, so the interpreter still exits at once
    (multiprocessing would otherwise SIGTERM the workers, which they ignore, and wait for them forever)."""
    process, workers = _start_workers_script()
    assert process.stdin is not None
    for pid in workers:  # from this process, not the workers' creator
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    assert all(_alive(pid) for pid in workers)
    process.stdin.write("go\n")
    process.stdin.flush()
    start = time.monotonic()
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-2000:]
    assert "stepped" in stdout
    assert time.monotonic() - start < 20
    assert _gone_within(workers, 10)


def test_subproc_workers_end_when_the_process_that_created_them_is_killed() -> None:
    """Ignoring SIGINT and SIGTERM leaves no orphans: a worker ends when its pipe to the creator closes."""
    process, workers = _start_workers_script()
    process.kill()
    process.communicate()
    assert _gone_within(workers, 20)


# Exits while its workers are stuck in a step (as when Ctrl-C interrupts step_wait on a hung simulator).
_STUCK_STEP_SCRIPT = """
import time
import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import SubprocVecEnv
from d2r_sb3.envs.workers import close_at_exit, ignore_stop_signals

class Stuck(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        time.sleep(600)

def make():
    ignore_stop_signals()
    return Stuck()

env = close_at_exit(SubprocVecEnv([make, make]))
env.reset()
print(*[p.pid for p in env.processes], flush=True)
env.step_async(np.zeros((2, 1), np.float32))
"""


def test_workers_stuck_in_a_step_do_not_hold_up_the_exit() -> None:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _STUCK_STEP_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - start < 30
    workers = [int(pid) for pid in result.stdout.split()]
    assert len(workers) == 2 and _gone_within(workers, 0)
