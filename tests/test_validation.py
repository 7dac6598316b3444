"""Clear, early errors for inputs that used to fail late or silently (the validation issue).

Construction-time checks of MultiTaskSAC / D2RSAC (sizes, a multi-task env, policy_kwargs), make_mt_env's argument
checks, observation checks of predict / route / critic_route, the warm-up warning of learn(), the video-writer
check of zoo/enjoy.py and the repo id of hub/push.py. Real objects throughout; the only stand-in is
huggingface_hub.whoami (the Hub is not reachable from tests).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import huggingface_hub
import numpy as np
import pytest
import torch as th
import yaml
from helpers import TINY_D2R, tiny_d2r
from huggingface_hub import constants
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from d2r_sb3 import D2RSAC, make_mt_env
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.nonfinite import NonFiniteTrainingError
from d2r_sb3.common.policies import InvalidObservationError, check_observations
from d2r_sb3.zoo.enjoy import check_video_writer
from d2r_sb3.zoo.utils import ZooError
from tests.toy_envs import PointReach, make_point_reach

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_D2R


tiny = tiny_d2r


def toy_tasks(columns: list[int], num_tasks: int) -> DummyVecEnv:
    """A VecEnv whose column i is toy task ``columns[i]`` of ``num_tasks`` (a subset or a reordering)."""
    return DummyVecEnv([lambda t=t: Monitor(PointReach(t, num_tasks)) for t in columns])


@pytest.fixture(scope="module")
def mt10():
    env = make_mt_env("MT10", max_episode_steps=20, seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def mt10_model(mt10) -> D2RSAC:
    model = D2RSAC(
        "D2RPolicy",
        mt10,
        policy_kwargs=dict(TINY),
        batch_size=20,
        learning_starts=20,
        buffer_size=500,
        seed=0,
    )
    model.learn(60)  # the first-observation check passes on a make_mt_env env, and it trains
    assert model._n_updates > 0
    return model


# --- 1. construction ---------------------------------------------------------------------------------------
def test_batch_size_must_be_a_multiple_of_the_tasks_with_stratified_batches(mt10):
    with pytest.raises(ValueError, match=r"batch_size=85 .*T=10.* multiple of 10, e\.g\. 1280"):
        D2RSAC("D2RPolicy", mt10, batch_size=85)  # raised at once, not after the 40,000-step warm-up
    with pytest.raises(ValueError, match=r"batch_size=30 .*multiple of 4"):
        MultiTaskSAC("MTSACPolicy", make_point_reach(4), batch_size=30, buffer_size=100)
    model = tiny(batch_size=30, stratified_batches=False)  # any size without stratification
    assert model.batch_size == 30 and not model.replay_buffer.stratified


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be a positive int"),
        ("batch_size", -64, "batch_size must be a positive int"),
        ("batch_size", 64.0, "batch_size must be a positive int"),
        ("batch_size", True, "batch_size must be a positive int"),
        ("buffer_size", 0, "buffer_size must be a positive int"),
        ("buffer_size", "1e6", "buffer_size must be a positive int"),
        ("learning_starts", -1, "learning_starts must be an int >= 0"),
        ("learning_starts", 1.5, "learning_starts must be an int >= 0"),
    ],
)
def test_sizes_are_positive_ints_or_none(name, value, message):
    # 0 used to become the default silently (256 / 200,000 through `or`).
    with pytest.raises(ValueError, match=message):
        tiny(**{name: value})


def test_sizes_zero_learning_starts_and_none_defaults():
    model = tiny(learning_starts=0, batch_size=None, buffer_size=None)
    assert model.learning_starts == 0
    assert model.batch_size == 4 * 128 and model.buffer_size == 4 * 100_000
    assert isinstance(tiny(batch_size=np.int64(64)).batch_size, int)


def test_a_single_task_env_is_refused():
    pendulum = DummyVecEnv([lambda: gym.make("Pendulum-v1")])  # its angular velocity would be the "one-hot"
    with pytest.raises(ValueError, match=r"entry 2 has bounds \[-8, 8\], not \[0, 1\]"):
        tiny(pendulum, batch_size=64)
    with pytest.raises(ValueError, match="one-hot"):
        MultiTaskSAC("MTSACPolicy", DummyVecEnv([lambda: gym.make("Pendulum-v1")]), buffer_size=100)
    four = DummyVecEnv([lambda: gym.make("Pendulum-v1")] * 4)  # 3-d observations cannot hold a 4-task one-hot
    with pytest.raises(ValueError, match="width 3 cannot hold a state and a one-hot over the 4 envs"):
        tiny(four)


def test_an_env_of_some_of_the_tasks_or_reordered_is_refused_before_any_step():
    # Two of three toy tasks: 7-d observations whose last 2 entries are not a one-hot over the 2 envs. Unbounded
    # one-hot entries (as the toy env declares) pass the space check; learn() checks the first observations it
    # gets from SB3's own reset (no extra reset), before the first env step.
    for columns, num_tasks in (([0, 1], 3), ([1, 0, 2, 3], 4)):
        model = tiny(toy_tasks(columns, num_tasks), batch_size=8 * len(columns))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the warm-up warning
            with pytest.raises(
                ValueError, match=r"env column 0 \(task0\) ends with .* instead of the one-hot"
            ):
                model.learn(100)
        assert model.num_timesteps == 0 and model.replay_buffer.pos == 0


def test_task_names_and_policy_num_tasks_must_match_the_envs():
    env = make_point_reach(4)
    env.task_names = ["a", "b", "c"]
    with pytest.raises(ValueError, match="names 3 tasks .* but has 4 envs"):
        tiny(env)
    with pytest.raises(ValueError, match=r"policy_kwargs num_tasks=3 does not match the env's 4 tasks"):
        tiny(policy_kwargs=dict(TINY, num_tasks=3))  # used to be a raw "size of tensor a (3) must match"
    assert tiny(policy_kwargs=dict(TINY, num_tasks=4)).policy.num_tasks == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(benchmark=10), "benchmark must be 'MT10', 'MT50', a task name or a list"),
        (dict(benchmark=None), "benchmark must be"),
        (dict(benchmark={"reach", "push"}), "benchmark must be"),  # a set has no column order
        (dict(benchmark=b"MT10"), "benchmark must be"),
        (dict(benchmark=["reach", 3]), "benchmark must list task names"),
        (dict(benchmark="MT10", goals=["rand"]), "Unknown goal mode"),
        (dict(benchmark="MT10", preset=["paper"]), "Unknown preset"),
        (dict(benchmark="MT10", vec_env=None), "Unknown vec_env"),
        (dict(benchmark="MT10", reward_scale="0.5"), "reward_scale must be a positive finite number"),
        (dict(benchmark="MT10", reward_scale=True), "reward_scale must be a positive finite number"),
        (dict(benchmark="MT10", time_limit_terminal="no"), "time_limit_terminal must be True, False or None"),
        (dict(benchmark="MT10", render_mode=["rgb_array"]), "Unknown render_mode"),
        (dict(benchmark="MT10", camera_name=3), "camera_name must be"),
        (dict(benchmark="MT10", width=True), "width must be a positive integer"),
        (dict(benchmark="MT10", height=0), "height must be a positive integer"),
        (dict(benchmark="MT10", max_episode_steps=501), "max_episode_steps must be an integer in"),
        (dict(benchmark="MT10", seed=-1), "seed must be an integer"),
    ],
)
def test_make_mt_env_rejects_bad_arguments_before_building(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_mt_env(**kwargs)


def test_make_mt_env_accepts_a_tuple_and_numpy_values():
    env = make_mt_env(("reach", "push-v3"), max_episode_steps=np.int64(5), reward_scale=np.float32(0.5))
    try:
        assert env.task_names == ["reach-v3", "push-v3"] and env.reward_scale == 0.5
    finally:
        env.close()


# --- 2. predict / route -----------------------------------------------------------------------------------
def test_predict_accepts_what_sb3_accepts(mt10, mt10_model):
    obs = mt10.reset()
    expected = mt10_model.predict(obs, deterministic=True)[0]
    assert expected.shape == (10, 4) and expected.dtype == np.float32
    for same in (
        obs.astype(np.float64),
        obs.tolist(),
        th.as_tensor(obs),
        obs[::-1][::-1],
        np.asfortranarray(obs),
    ):
        np.testing.assert_array_equal(mt10_model.predict(same, deterministic=True)[0], expected)
    reversed_obs = obs[::-1]  # negative strides (torch.as_tensor refuses them)
    np.testing.assert_allclose(
        mt10_model.predict(reversed_obs, deterministic=True)[0], expected[::-1], atol=1e-6
    )
    single = mt10_model.predict(obs[3].astype(np.float64), deterministic=True)[0]
    assert single.shape == (4,)
    np.testing.assert_array_equal(single, mt10_model.predict(obs[3:4], deterministic=True)[0][0])
    assert mt10_model.predict(obs[3].tolist())[0].shape == (4,)  # stochastic too
    empty, state = mt10_model.predict(np.zeros((0, 49)))
    assert empty.shape == (0, 4) and empty.dtype == np.float32 and state is None
    # The policy (what save_policy / load_policy hand out) behaves the same.
    np.testing.assert_array_equal(mt10_model.policy.predict(obs.tolist(), deterministic=True)[0], expected)


def bad_batches(obs: np.ndarray) -> list[tuple[np.ndarray, str, list[int]]]:
    """(observations, message, offending rows): one defect each."""
    cases = []
    zero = obs.copy()
    zero[2, 39:] = 0.0
    cases.append((zero, r"not in row 2 of the batch: in row 2, it is all zero", [2]))
    two = obs.copy()
    two[5, 39:] = np.eye(10)[0] + np.eye(10)[1]
    two[7, 39:] = np.eye(10)[1] + np.eye(10)[2]
    cases.append((two, r"not in rows 5, 7 of the batch: in row 5, it has 2 ones", [5, 7]))
    half = obs.copy()
    half[1, 39:] = 0.1
    cases.append((half, r"in row 1, it holds values other than 0 and 1", [1]))
    almost = obs.copy()
    almost[4, 40] = 1e-10  # 1 + 1e-10 == 1 in float32: a sum-based check would miss it
    cases.append((almost, r"in row 4, it holds values other than 0 and 1", [4]))
    nan = obs.copy()
    nan[6, 0] = math.nan
    cases.append((nan, r"Row 6 of the batch holds NaN or infinite values", [6]))
    inf = obs.copy()
    inf[3, 45] = math.inf
    inf[8, 10] = -math.inf
    cases.append((inf, r"Rows 3, 8 of the batch hold NaN or infinite values", [3, 8]))
    huge = obs.astype(np.float64)
    huge[0, 0] = 1e300  # finite in float64, infinite in float32
    cases.append((huge, r"Row 0 of the batch holds NaN or infinite values \(in float32\)", [0]))
    return cases


def test_predict_and_route_reject_bad_observations_naming_the_rows(mt10, mt10_model):
    obs = mt10.reset()
    policy = mt10_model.policy
    for batch, message, rows in bad_batches(obs):
        for call in (
            lambda b: mt10_model.predict(b),
            lambda b: policy.predict(b, deterministic=True),
            lambda b: policy.route(b),
            lambda b: policy.critic_route(b, np.zeros((10, 4))),
        ):
            with pytest.raises(InvalidObservationError, match=message) as info:
                call(batch)
            assert info.value.rows == rows and isinstance(info.value, ValueError)
    single = obs[0].copy()
    single[39:] = 0.0
    with pytest.raises(ValueError, match="but not in the observation: it is all zero"):
        mt10_model.predict(single)
    for wrong, got in ((obs[:, :48], "got width 48"), (obs[0, :40], "got width 40"), (obs[None], "shape")):
        with pytest.raises(ValueError, match=rf"Expected observations of width 49 .*{got}"):
            mt10_model.predict(wrong)
        with pytest.raises(ValueError, match=rf"Expected observations of width 49 .*{got}"):
            policy.route(wrong)
    with pytest.raises(ValueError, match=r"\(obs, info\) tuple"):
        mt10_model.predict((obs[0], {}))
    with pytest.raises(ValueError, match="numeric array"):
        mt10_model.predict([[1.0, 2.0], [3.0]])


def test_route_and_critic_route_accept_what_predict_accepts(mt10, mt10_model):
    obs = mt10.reset()
    policy = mt10_model.policy
    path = policy.route(obs)
    assert path.edges.shape == (10, 5, 4) and path.num_active.shape == (10,)
    for same in (obs.astype(np.float64), obs.tolist(), th.as_tensor(obs, dtype=th.float64)):
        assert th.equal(policy.route(same).edges, path.edges)
    one = policy.route(obs[2].tolist())  # one observation: a path without the batch dimension
    assert one.edges.shape == (5, 4) and one.num_active.shape == () and th.equal(one.edges, path.edges[2])
    empty = policy.route(np.zeros((0, 49)))
    assert empty.edges.shape == (0, 5, 4) and empty.active.shape == (0, 4) and empty.num_active.shape == (0,)

    paths = policy.critic_route(obs, np.zeros((10, 4)))
    assert len(paths) == 2 and paths[0].edges.shape == (10, 5, 4)
    tensor_paths = policy.critic_route(th.as_tensor(obs), th.zeros(10, 4))
    assert th.equal(tensor_paths[1].edges, paths[1].edges)
    single = policy.critic_route(obs[2], [0.0] * 4)
    assert single[0].edges.shape == (5, 4) and th.equal(single[0].edges, paths[0].edges[2])
    assert policy.critic_route(obs[:0], np.zeros((0, 4)))[0].edges.shape == (0, 5, 4)
    with pytest.raises(
        ValueError, match=r"actions must have shape \(10, 4\) for 10 observations, got \(10, 3\)"
    ):
        policy.critic_route(obs, np.zeros((10, 3)))
    with pytest.raises(ValueError, match="actions hold NaN"):
        policy.critic_route(obs, np.full((10, 4), np.nan))


def test_the_observation_check_costs_microseconds(mt10):
    obs = mt10.reset()
    for _ in range(100):
        check_observations(obs, 49, 10)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        check_observations(obs, 49, 10)
    per_call = (time.perf_counter() - start) / n
    print(f"check_observations, 10 MT10 observations: {per_call * 1e6:.1f} us")
    assert per_call < 200e-6  # ~15 us measured on a loaded 2-core machine; a collection step takes ~30 ms


class NanReset(gym.Wrapper):
    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        obs = obs.copy()
        obs[0] = math.nan
        return obs, info


def test_a_nonfinite_first_observation_during_training_is_still_the_nan_guards_error():
    env = DummyVecEnv(
        [lambda i=i: Monitor(NanReset(PointReach(i, 4)) if i == 2 else PointReach(i, 4)) for i in range(4)]
    )
    model = tiny(env, learning_starts=0)
    with pytest.raises(NonFiniteTrainingError, match="Non-finite observation") as info:
        model.learn(100)
    assert info.value.kind == "observation" and info.value.tasks == ["task2"]
    assert model.num_timesteps == 0  # the env was never stepped


# --- 3. learn() inside the warm-up --------------------------------------------------------------------------
def test_learn_warns_when_it_will_make_no_gradient_step():
    model = tiny(
        make_point_reach(10), learning_starts=None, batch_size=None, buffer_size=5_000
    )  # 40,000 steps
    with pytest.warns(
        UserWarning, match=r"makes no gradient step: .*learning_starts=40,000 .* 40,000 of them remain"
    ):
        model.learn(2_000)
    assert model._n_updates == 0 and model.num_timesteps == 2_000

    model = tiny(learning_starts=300)
    with pytest.warns(
        UserWarning, match=r"300 of them remain \(num_timesteps=0\).* 100 warm-up steps will remain"
    ):
        model.learn(200)
    with pytest.warns(UserWarning, match=r"100 of them remain \(num_timesteps=200\)"):
        model.learn(100, reset_num_timesteps=False)  # 300 <= 300: still no update
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.learn(100, reset_num_timesteps=False)
    assert model._n_updates > 0


def test_learn_still_takes_every_kind_of_callback():
    model = tiny(learning_starts=0)
    calls = []
    model.learn(8, callback=lambda _locals, _globals: calls.append(1) or True)
    assert len(calls) == 2  # one call per vector step of 4 envs
    model.learn(8, callback=[], progress_bar=False)


# --- 4. zoo/enjoy.py: the video writer is checked first ----------------------------------------------------
def test_enjoy_checks_the_video_writer_before_anything_else(tmp_path):
    shim = tmp_path / "shim" / "imageio_ffmpeg"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("imageio_ffmpeg is disabled for this test")\n')
    env = {**os.environ, "PYTHONPATH": str(shim.parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    video = tmp_path / "out.mp4"
    # A model that does not exist: the writer error must come first (nothing is loaded, built or rendered).
    command = [
        sys.executable,
        "zoo/enjoy.py",
        "--task",
        "reach",
        "--model",
        str(tmp_path / "none"),
        "--video",
    ]
    result = subprocess.run(
        [*command, str(video)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install imageio imageio-ffmpeg" in result.stderr and "Nothing was run" in result.stderr
    assert "Traceback" not in result.stderr and not video.exists()
    # The same shim leaves GIFs alone: the error is then the missing model.
    gif = subprocess.run(
        [*command, str(tmp_path / "out.gif")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert gif.returncode == 2 and "imageio" not in gif.stderr and "none" in gif.stderr, gif.stderr


def test_video_writer_check_in_process(tmp_path):
    check_video_writer(tmp_path / "a.mp4", 30)  # imageio-ffmpeg is a dev dependency
    check_video_writer(tmp_path / "a.gif", 15)
    assert list(tmp_path.iterdir()) == []  # the probe writes nothing next to the video
    with pytest.raises(ZooError, match="--fps must be >= 1"):
        check_video_writer(tmp_path / "a.mp4", 0)


# --- 5. hub/push.py never defaults to the official repo id ------------------------------------------------
@pytest.fixture
def hub_sandbox(tmp_path, monkeypatch):
    """No token, no saved login, no user cache; offline unless a test says otherwise."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return monkeypatch


def make_run(root: Path, model: D2RSAC, env) -> Path:
    run = root / "logs" / "d2r" / "MT10-rand_1"
    (run / "MT10-rand").mkdir(parents=True)
    model.save(run / "MT10-rand.zip")
    (run / "MT10-rand" / "env_kwargs.yml").write_text(yaml.safe_dump(env.env_kwargs(), sort_keys=False))
    (run / "MT10-rand" / "args.yml").write_text(yaml.safe_dump({"algo": "d2r", "env": "MT10", "seed": 0}))
    success = {name: 0.5 for name in env.task_names}
    results = {
        "task_names": env.task_names,
        "success": success,
        "mean_return": {name: 1.0 for name in env.task_names},
        "std_return": {name: 0.0 for name in env.task_names},
        "mean_length": {name: 20.0 for name in env.task_names},
        "episodes": 2,
        "deterministic": True,
        "mean_success": 0.5,
        "mean_return_over_tasks": 1.0,
        "total_timesteps": 60,
    }
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_push_needs_a_repo_id_when_the_user_is_unknown(mt10, mt10_model, tmp_path, hub_sandbox, capsys):
    from d2r_sb3.zoo import push

    run = make_run(tmp_path, mt10_model, mt10)
    stage = tmp_path / "stage"
    args = ["--model", str(run), "--stage-dir", str(stage), "--no-video", "--dry-run"]
    assert push.main(args) == 2  # offline
    err = capsys.readouterr().err
    assert "--repo-id is required" in err and "HF_HUB_OFFLINE=1 is set" in err and "d2r-sb3/" not in err
    hub_sandbox.setattr(constants, "HF_HUB_OFFLINE", False)
    assert push.main(args) == 2  # online, but no token: no user to name the repo after
    assert "No Hugging Face token found" in capsys.readouterr().err
    assert not stage.exists()  # refused before staging (evaluation and rendering take minutes)

    # A logged-in user owns the default repo id; --org and --repo-id choose explicitly (no user look-up).
    # (Whether staging then succeeds depends on loading the run's zip, which is not what is tested here.)
    def whoami(token=None):
        assert token == "hf_test"
        return {"name": "alice"}

    hub_sandbox.setattr(huggingface_hub, "whoami", whoami)
    code = push.main([*args, "--token", "hf_test"])
    out, err = capsys.readouterr()
    assert "Repo owner: alice (the logged-in Hugging Face user" in out and "--repo-id is required" not in err
    if code == 0:
        assert "alice/d2r-MT10-rand" in out and "d2r-sb3/" not in out

    def no_lookup(token=None):
        raise AssertionError("whoami() must not be called when the owner is given")

    hub_sandbox.setattr(huggingface_hub, "whoami", no_lookup)
    for chosen, repo_id in ((["--org", "my-lab"], "my-lab/d2r-MT10-rand"), (["--repo-id", "bob/x"], "bob/x")):
        code = push.main([*args, "--overwrite", *chosen])
        out, err = capsys.readouterr()
        assert "Repo owner" not in out and "--repo-id is required" not in err
        if code == 0:
            assert repo_id in out

    def failing_whoami(token=None):
        raise OSError("401 Client Error: Unauthorized")

    hub_sandbox.setattr(huggingface_hub, "whoami", failing_whoami)
    assert push.main([*args, "--overwrite", "--token", "hf_bad"]) == 2
    assert "whoami() failed: 401" in capsys.readouterr().err
    # A missing run is still the first error reported.
    assert push.main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- the device ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "enjoy", "evaluate", "analyze"])
def test_zoo_device_flag_refuses_a_device_torch_cannot_use(command, capsys):
    """SB3 would silently run on the CPU: an explicit --device is an error when torch cannot use it."""
    main = importlib.import_module(f"d2r_sb3.zoo.{command}").main
    missing = f"cuda:{th.cuda.device_count()}"  # one past the last GPU: none on a machine without
    for device, message in ((missing, "torch sees"), ("gpu", "is not a torch device")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--device", device])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --device: '{device}'" in err and message in err and "--device auto" in err, err


@pytest.mark.skipif(th.cuda.is_available(), reason="a GPU is there: nothing to fall back from")
def test_a_model_asked_for_cuda_without_a_gpu_warns_that_it_runs_on_the_cpu(tmp_path):
    with pytest.warns(UserWarning, match="device='cuda' was asked for, but torch sees no CUDA device"):
        model = tiny_d2r(device="cuda")
    assert model.device.type == "cpu"
    model.save(tmp_path / "model.zip")
    with pytest.warns(UserWarning, match="runs on cpu instead"):
        D2RSAC.load(tmp_path / "model.zip", device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_d2r(device="auto")
        tiny_d2r(device="cpu")
