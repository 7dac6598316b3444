"""The NaN guard: non-finite losses, gradients, parameters, actions, rewards and observations are never applied,
stored or saved, and training stops with a NonFiniteTrainingError that names the tasks."""

from __future__ import annotations

import copy
import json
import math
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from helpers import COLLECTION_ONLY, collect_only
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv
from test_d2rsac import TINY, tiny_model
from toy_envs import PointReach, make_point_reach

from d2r_sb3 import D2RSAC, make_mt_env, save_policy
from d2r_sb3.common import NonFiniteTrainingError, PerTaskEvalCallback


def training_state(model: D2RSAC) -> dict:
    """Deep copies of everything a gradient step may change (weights, targets, optimizer states, log alpha)."""
    owners = {
        "policy": model.policy,  # actor, critics and target critics (and D2R's routing temperatures)
        "actor.optimizer": model.actor.optimizer,
        "critic.optimizer": model.critic.optimizer,
        "ent_coef_optimizer": model.ent_coef_optimizer,
    }
    state = {name: copy.deepcopy(owner.state_dict()) for name, owner in owners.items()}
    state["log_ent_coef"] = model.log_ent_coef.detach().clone()
    return state


def assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, th.Tensor):
        assert isinstance(b, th.Tensor) and th.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def all_finite(model: D2RSAC) -> bool:
    return all(bool(th.isfinite(t).all()) for t in model.policy.state_dict().values())


def test_a_nonfinite_step_changes_nothing_and_the_third_in_a_row_raises():
    model = tiny_model(learning_starts=10_000)
    collect_only(model, 300)
    good = model.replay_buffer.sample(64)
    model._gradient_step(good)  # the optimizers have a state
    rewards = good.rewards.clone()
    rewards[good.task_ids == 2] = (
        math.nan
    )  # only task 2's critic loss is NaN (and masked), every gradient too
    bad = good._replace(rewards=rewards)

    def bad_step(expected_in_a_row: int) -> None:
        before, n_updates = training_state(model), model._n_updates
        with pytest.warns(RuntimeWarning, match=r"non-finite loss .* task\(s\): task2\. .*critic_loss=nan"):
            model._gradient_step(bad)
        assert_identical(before, training_state(model))
        assert model._n_updates == n_updates and model._nonfinite_steps == expected_in_a_row
        assert all(p.grad is None for p in [*model.actor.parameters(), *model.critic.parameters()])

    bad_step(1)
    bad_step(2)
    n_updates = model._n_updates
    model._gradient_step(good)  # a good step resets the count
    assert model._nonfinite_steps == 0 and model._n_updates == n_updates + 1
    bad_step(1)
    bad_step(2)
    before = training_state(model)
    with pytest.raises(NonFiniteTrainingError, match="Non-finite loss") as info:
        model._gradient_step(bad)
    assert_identical(before, training_state(model))
    error = info.value
    assert error.kind == "loss" and error.tasks == ["task2"] and error.n_updates == n_updates + 1
    assert "task2: actor_loss=" in error.detail and "critic_loss=nan" in error.detail
    assert "3 non-finite gradient steps in a row" in str(error) and "learning rate" in str(error)


def test_max_nonfinite_steps_is_validated_saved_and_defaults_for_older_models(tmp_path):
    for wrong in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_nonfinite_steps must be an int >= 1"):
            tiny_model(max_nonfinite_steps=wrong)
    model = tiny_model(max_nonfinite_steps=5)
    model._nonfinite_steps = 2
    model.save(tmp_path / "model.zip")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        data = json.loads(archive.read("data"))
        files = {name: archive.read(name) for name in archive.namelist()}
    assert data["max_nonfinite_steps"] == 5 and "_nonfinite_steps" not in data
    loaded = D2RSAC.load(tmp_path / "model.zip", env=make_point_reach(4))
    assert loaded.max_nonfinite_steps == 5 and loaded._nonfinite_steps == 0
    # A zip written before the option existed has no such key: the constructor default applies.
    del data["max_nonfinite_steps"]
    files["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(tmp_path / "old.zip", "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    old = D2RSAC.load(tmp_path / "old.zip", env=make_point_reach(4))
    assert old.max_nonfinite_steps == 3 and old._nonfinite_steps == 0


@pytest.mark.parametrize("update", ["first step", "fused update", "torch's steps"])
def test_an_optimizer_step_that_makes_a_parameter_nonfinite_raises_at_once(update):
    """Whichever path takes the step: torch's optimizer steps (always the first, before Adam has state), or the
    fused update (d2r_sb3.common.fused_update), whose pass checks the new parameters."""
    model = tiny_model(learning_starts=10_000)
    collect_only(model, 300)
    data = model.replay_buffer.sample(64)
    if update != "first step":
        model._gradient_step(data)
        model.fused_update = update == "fused update"
        assert model._uses_fused_update() == (update == "fused update")
    updates = model._n_updates
    for group in model.actor.optimizer.param_groups:
        group["lr"] = math.inf  # e.g. a broken learning-rate schedule; loss and gradients stay finite
    with pytest.raises(NonFiniteTrainingError, match="Non-finite parameter") as info:
        model._gradient_step(data)
    assert info.value.kind == "parameter" and info.value.n_updates == updates
    assert "made actor.net." in info.value.detail and model._n_updates == updates


def test_a_huge_learning_rate_stops_training_at_the_first_nonfinite_action():
    # Without clipping Adam still moves every weight by ~lr: after one update the weights are ~1e8, finite, but
    # the actor's computation overflows and its next actions are NaN. Training must not go on silently.
    model = tiny_model(learning_rate=1e8, max_grad_norm=None, learning_starts=100)
    with pytest.raises(NonFiniteTrainingError, match="Non-finite action") as info:
        model.learn(2_000)
    error = info.value
    assert error.kind == "action" and error.tasks == ["task0", "task1", "task2", "task3"]
    assert error.n_updates >= 1 and error.num_timesteps < 2_000 and "overflowed" in error.detail
    assert all_finite(model)
    assert max(p.abs().max().item() for p in model.actor.parameters()) > 1e6  # the huge steps were applied


class PoisonedStep(gym.Wrapper):
    """Returns a NaN reward or a NaN observation at one step."""

    def __init__(self, env: gym.Env, at_step: int, what: str):
        super().__init__(env)
        self.at_step, self.what, self.steps = at_step, what, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps == self.at_step:
            if self.what == "reward":
                reward = math.nan
            else:
                obs = obs.copy()
                obs[0] = math.nan
        return obs, reward, terminated, truncated, info


def poisoned_env(task: int, at_step: int, what: str) -> DummyVecEnv:
    def make(i: int) -> gym.Env:
        env = PointReach(i, 4)
        return Monitor(PoisonedStep(env, at_step, what) if i == task else env)

    return DummyVecEnv([lambda i=i: make(i) for i in range(4)])


# step 30: a NaN in a new observation; step 25: in the last observation of an episode (the horizon is 25)
@pytest.mark.parametrize(("what", "at_step"), [("reward", 30), ("observation", 30), ("observation", 25)])
@COLLECTION_ONLY
def test_a_nonfinite_reward_or_observation_from_the_env_is_not_stored(what, at_step):
    model = tiny_model(poisoned_env(2, at_step, what), learning_starts=10_000)
    with pytest.raises(NonFiniteTrainingError, match=f"Non-finite {what} .* task\\(s\\): task2\\.") as info:
        model.learn(400)
    assert info.value.kind == what and info.value.tasks == ["task2"]
    assert info.value.num_timesteps == 4 * at_step
    buffer = model.replay_buffer
    assert buffer.pos == at_step - 1  # the transitions before it, not this one
    assert np.isfinite(buffer.rewards).all() and np.isfinite(buffer.next_observations).all()


@COLLECTION_ONLY
def test_nonfinite_actions_raise_before_the_env_is_stepped():
    model = tiny_model(learning_starts=10_000)
    with th.no_grad():
        model.actor.net.head.weight[0, 0, 0] = math.nan
    with pytest.raises(NonFiniteTrainingError, match="Non-finite action") as info:
        model.learn(100)
    assert info.value.kind == "action" and info.value.tasks == ["task0", "task1", "task2", "task3"]
    assert "'net.head.weight' is not finite" in info.value.detail
    assert model.num_timesteps == 0 and model.replay_buffer.pos == 0  # the env was never stepped


def test_the_eval_callback_never_saves_nonfinite_weights_as_the_best_model(tmp_path):
    def callback_for(model: D2RSAC, folder) -> PerTaskEvalCallback:
        model.set_logger(configure(str(folder), ["csv"]))
        callback = PerTaskEvalCallback(make_point_reach(4), 10, 1, best_model_save_path=folder, verbose=0)
        callback.init_callback(model)
        return callback

    broken = tiny_model()
    with th.no_grad():
        broken.actor.net.head.bias[0, 0] = math.nan
    callback = callback_for(broken, tmp_path / "broken")
    with pytest.warns(
        RuntimeWarning, match="net.head.bias is not finite.*not evaluated.*best_model.zip is not written"
    ):
        assert callback.evaluate() is None
    assert callback.history["timesteps"] == []  # nothing recorded either
    assert not (tmp_path / "broken" / "best_model.zip").exists()
    assert callback.best_score == (-np.inf, -np.inf)
    # The same evaluation of finite weights is a new best and is saved.
    callback = callback_for(tiny_model(), tmp_path / "finite")
    callback.evaluate()
    assert (tmp_path / "finite" / "best_model.zip").is_file() and callback.best_score > (-np.inf, -np.inf)


def test_save_policy_refuses_nonfinite_weights(tmp_path):
    model = tiny_model()
    with th.no_grad():
        model.actor.net.w_hid[0, 1, 2, 3] = math.inf
    with pytest.raises(ValueError, match="net.w_hid holds NaN or infinite values"):
        save_policy(model, tmp_path / "policy")
    assert not (tmp_path / "policy").exists()


@COLLECTION_ONLY
def test_nan_weights_on_metaworld_raise_our_error_not_metaworlds():
    env = make_mt_env(["reach", "drawer-close"], max_episode_steps=20)
    model = D2RSAC(
        "D2RPolicy", env, learning_starts=100, batch_size=32, buffer_size=1_000, policy_kwargs=TINY
    )
    with th.no_grad():
        for param in model.policy.parameters():
            param.fill_(math.nan)
    with pytest.raises(NonFiniteTrainingError, match="Non-finite action") as info:
        model.learn(50)
    message = str(info.value)
    assert "reach-v3" in message and "drawer-close-v3" in message and "must range" not in message
    assert info.value.tasks == ["reach-v3", "drawer-close-v3"] and model.num_timesteps == 0
    env.close()
