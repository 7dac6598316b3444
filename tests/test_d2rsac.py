"""D2RSAC and the multi-task SAC core: formulas, masking, routing buffer, save/load and learning."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from helpers import TINY_D2R, collect_only, tiny_d2r
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv
from toy_envs import (
    POINT_REACH_TRAINING,
    PointReach,
    assert_a_seed_learns_point_reach,
    make_point_reach,
)

from d2r_sb3 import D2RSAC, make_mt_env
from d2r_sb3.common.buffers import MultiTaskReplayBufferSamples
from d2r_sb3.common.precision import bfloat16_is_native, cpu_flags
from d2r_sb3.d2r import reference

TINY = dict(n_modules=4, module_dim=32, encoder_sizes=[64, 64], gate_sizes=[32])


def tiny_model(env=None, **kwargs) -> D2RSAC:
    """helpers.tiny_d2r with this file's wider network and a 20k buffer (the learning test sizes its own)."""
    kwargs.setdefault("buffer_size", 20_000)
    kwargs.setdefault("policy_kwargs", dict(TINY))
    return tiny_d2r(env, **kwargs)


def test_defaults_are_the_papers_mt10_configuration():
    model = D2RSAC("D2RPolicy", make_point_reach(10), seed=0, buffer_size=10_000)
    assert model.batch_size == 1280 and model.learning_starts == 40_000
    assert model.ent_coef_optimizer.param_groups[0]["lr"] == 1e-4
    assert model.log_ent_coef.shape == (10,) and model.max_log_ent_coef == 0.0
    assert model.max_grad_norm == 1.0 and model.extreme_task_loss_threshold == 3e3
    assert model.replay_buffer.stratified
    assert D2RSAC("D2RPolicy", make_point_reach(10), seed=0).buffer_size == 1_000_000


def test_route_temperature_and_task_weights_follow_eq_14():
    model = tiny_model()
    log_alpha = th.tensor([-1.0, -2.0, 0.0, -0.5])
    model.log_ent_coef.data.copy_(log_alpha)
    expected = reference.route_temperature(log_alpha)  # Eq. 14 times the number of tasks (authors' code)
    th.testing.assert_close(model.route_temperature(), expected)
    th.testing.assert_close(model.task_weights(), expected)
    assert abs(model.route_temperature().mean().item() - 1.0) < 1e-6
    model._after_gradient_step()
    for net in (model.actor.net, model.critic.net, model.critic_target.net):
        th.testing.assert_close(net.route_temperature, expected)

    paper = tiny_model(route_temperature_scale="paper")
    paper.log_ent_coef.data.copy_(log_alpha)
    th.testing.assert_close(paper.route_temperature(), reference.route_temperature(log_alpha, scale="paper"))
    floor = tiny_model(min_route_temperature=0.5)
    floor.log_ent_coef.data.copy_(th.tensor([0.0, -20.0, -20.0, -20.0]))
    assert floor.route_temperature()[0].item() == 0.5
    fixed = tiny_model(route_balancing=False)
    fixed.log_ent_coef.data.copy_(log_alpha)
    assert th.all(fixed.route_temperature() == 1.0)
    plain = tiny_model(task_loss_reweighting=False)
    assert th.all(plain.task_weights() == 1.0)


def fill_buffer(model: D2RSAC, steps: int = 300) -> None:
    collect_only(model, steps)  # learning_starts above `steps`


def test_extreme_task_masking_zeroes_exactly_that_tasks_loss():
    model = tiny_model(learning_starts=10_000)
    fill_buffer(model)
    data = model.replay_buffer.sample(64)
    rewards = data.rewards.clone()
    rewards[data.task_ids == 2] = 1e3  # task 2's TD error explodes
    data = data._replace(rewards=rewards)
    losses = model._task_losses(data)
    loss, kept = model._combine_task_losses(losses)
    assert kept.tolist() == [True, True, False, True]
    per_task = losses["ent_coef_loss"] + model.task_weights() * (losses["actor_loss"] + losses["critic_loss"])
    assert per_task[2] > 3e3
    th.testing.assert_close(loss, per_task[[0, 1, 3]].sum() / 4)  # divided by T, masked task included
    off = tiny_model(learning_starts=10_000, extreme_task_loss_threshold=None)
    assert off._combine_task_losses(losses)[1].all()


def _reference_step_with_a_clip_per_critic(model: D2RSAC, data: MultiTaskReplayBufferSamples) -> None:
    """One update written plainly: each network clipped with torch's own clip_grad_norm_, each critic alone."""
    losses = model._task_losses(data)
    loss, _ = model._combine_task_losses(losses)
    optimizers = [model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer]
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    th.nn.utils.clip_grad_norm_(list(model.actor.parameters()), 1.0)
    for critic in range(model.policy.n_critics):  # critic i alone, as a network of its own
        alone = []
        for param in model.critic.parameters():
            copy_ = th.nn.Parameter(param.detach()[critic].clone())
            copy_.grad = param.grad[critic].clone()
            alone.append(copy_)
        th.nn.utils.clip_grad_norm_(alone, 1.0)
        for param, copy_ in zip(model.critic.parameters(), alone, strict=True):
            param.grad[critic] = copy_.grad
    th.nn.utils.clip_grad_norm_([model.log_ent_coef], 1.0)
    for optimizer in optimizers:
        optimizer.step()


def test_each_critic_is_clipped_on_its_own_gradient_norm():
    import copy

    model = tiny_model(learning_starts=10_000)
    fill_buffer(model)
    data = model.replay_buffer.sample(64)
    data = data._replace(rewards=data.rewards * 50.0)  # large TD errors: every clip is active
    reference = copy.deepcopy(model)
    # The premise: both critics' gradients are above the limit and differ, so joint clipping would differ.
    loss, _ = reference._combine_task_losses(reference._task_losses(data))
    loss.backward()
    norms = [
        th.linalg.vector_norm(th.stack([p.grad[i].norm() for p in reference.critic.parameters()])).item()
        for i in range(2)
    ]
    assert min(norms) > 1.0 and abs(norms[0] - norms[1]) > 1e-3 * max(norms), norms
    reference = copy.deepcopy(model)

    th.manual_seed(123)
    model._gradient_step(data)
    th.manual_seed(123)
    _reference_step_with_a_clip_per_critic(reference, data)
    # The clipped gradients are the same (the optimiser steps read them; Adam's first step then moves tiny
    # gradients by ~lr whatever their scale, so parameters would hide a wrong clip).
    for (name, got), expected in zip(
        model.policy.named_parameters(), reference.policy.parameters(), strict=True
    ):
        if got.grad is not None:
            th.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-9, msg=name)
    th.testing.assert_close(model.log_ent_coef.grad, reference.log_ent_coef.grad)
    for critic in range(2):
        norm = th.linalg.vector_norm(th.stack([p.grad[critic].norm() for p in model.critic.parameters()]))
        assert norm.item() == pytest.approx(1.0, rel=1e-4)  # joint clipping would leave them unequal, below 1


def test_clip_per_member_matches_torch_on_one_member_and_leaves_small_gradients():
    from d2r_sb3.common.clipping import clip_grad_norm_per_member_

    params = [th.nn.Parameter(th.ones(3, 4)), th.nn.Parameter(th.ones(3))]
    params[0].grad = th.tensor([[3.0] * 4, [0.1] * 4, [1.0] * 4])
    params[1].grad = th.tensor([4.0, 0.1, 0.0])
    norms = clip_grad_norm_per_member_(params, 1.0, 3)
    th.testing.assert_close(norms, th.tensor([(36 + 16) ** 0.5, (0.04 + 0.01) ** 0.5, 2.0]))
    for member in range(3):
        clipped = th.linalg.vector_norm(th.cat([p.grad[member].flatten() for p in params])).item()
        assert clipped == pytest.approx(min(1.0, norms[member].item()), rel=1e-5)
    assert params[1].grad[1].item() == pytest.approx(0.1)  # under the limit: untouched
    with pytest.raises(ValueError, match=r"shape \[3, ...\]"):
        clip_grad_norm_per_member_([th.nn.Parameter(th.ones(2, 2))], 1.0, 3)


def test_stratified_batches_take_the_same_rows_from_every_task():
    model = tiny_model(learning_starts=10_000)
    fill_buffer(model)
    data = model.replay_buffer.sample(64)
    assert isinstance(data, MultiTaskReplayBufferSamples)
    assert th.equal(data.task_ids, th.arange(4).repeat(16))
    onehot = data.observations[:, -4:].argmax(-1)
    assert th.equal(onehot, data.task_ids), "task id = env column = one-hot"
    with pytest.raises(ValueError, match="multiple of 4"):
        model.replay_buffer.sample(30)


def test_routes_stored_at_collection_are_aligned_with_their_transitions():
    # With TopK routes and no update yet, the stored route is a function of the stored observation.
    model = tiny_model(learning_starts=10_000, sample_k=False)
    fill_buffer(model, 200)
    buffer = model.replay_buffer
    assert buffer.routes.dtype == np.uint8 and buffer.routes.shape[1:] == (4, 4, 2)
    assert buffer.routes[0].nbytes // 4 <= 34  # compact: at most 34 bytes per transition
    obs = th.as_tensor(buffer.observations[: buffer.pos].reshape(-1, buffer.observations.shape[-1]))
    state, task_ids = model.policy.split_obs(obs)
    with th.no_grad():
        _, sources = model.actor.net(state, task_ids)
    expected = model.actor.net.graph.encode(sources[0]).numpy()
    np.testing.assert_array_equal(buffer.routes[: buffer.pos].reshape(expected.shape), expected)
    data = buffer.sample(64)
    with th.no_grad():
        _, sampled_sources = model.actor.net(*model.policy.split_obs(data.observations))
    assert th.equal(data.routes, model.actor.net.graph.encode(sampled_sources[0]))


def test_sampled_routes_are_stored_when_exploring():
    model = tiny_model(learning_starts=10_000)
    fill_buffer(model, 400)
    routes = model.replay_buffer.routes[:100]
    assert len({r.tobytes() for r in routes.reshape(-1, 8)}) > 1  # SampleK varies the route


def test_save_and_load_round_trip_model_and_buffer(tmp_path):
    env = make_point_reach(4)
    model = tiny_model(env, learning_starts=200)
    model.learn(400)
    obs = env.reset()
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model")
    model.save_replay_buffer(tmp_path / "buffer")
    loaded = D2RSAC.load(tmp_path / "model", env=env)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], actions)
    th.testing.assert_close(loaded.log_ent_coef, model.log_ent_coef)
    th.testing.assert_close(loaded.actor.net.route_temperature, model.actor.net.route_temperature)
    loaded.load_replay_buffer(tmp_path / "buffer")
    np.testing.assert_array_equal(loaded.replay_buffer.routes, model.replay_buffer.routes)
    loaded.learn(100, reset_num_timesteps=False)  # training continues after load
    three_of_four = DummyVecEnv([lambda i=i: Monitor(PointReach(i, 4)) for i in range(3)])
    with pytest.raises(ValueError, match="one sub-env per task"):
        D2RSAC.load(tmp_path / "model", env=three_of_four)


@pytest.mark.parametrize("offpolicy_routing", ["resrouting", "none", "target"])
def test_ablation_options_train(offpolicy_routing):
    model = tiny_model(offpolicy_routing=offpolicy_routing, sample_k=offpolicy_routing != "none")
    model.learn(300)
    assert model._n_updates > 0
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_plain_sac_is_one_configuration_away():
    model = tiny_model(
        per_task_ent_coef=False,
        task_loss_reweighting=False,
        extreme_task_loss_threshold=None,
        max_grad_norm=None,
        stratified_batches=False,
        policy_warmup=False,
        half_critic_loss=True,
        max_log_ent_coef=None,
    )
    model.learn(400)
    assert model.log_ent_coef.shape == (1,)
    assert not model.replay_buffer.stratified
    assert model.replay_buffer.routes is not None  # uniform warm-up still stores the policy's routes


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="both"):
        D2RSAC("D2RPolicy", make_point_reach(4), sample_k=False, policy_kwargs=dict(sample_k=True))
    with pytest.raises(ValueError, match="route_temperature_scale"):
        tiny_model(route_temperature_scale="tasks")
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_model(batch_size=30, learning_starts=50).learn(100)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_d2r_learns_every_task_of_a_cheap_multi_task_problem(precision):
    """Fails if the algorithm is broken: random actions never reach the goals, D2R reaches all four (also when
    its gradient steps compute in bfloat16)."""
    # Both precisions solve seeds 0 and 1 in 6k-8k env steps on the AMD EPYC VMs (seed 0 with ent_coef_lr 1e-4: 18k
    # and 22k). The trajectory depends on float32 rounding: on an Intel Xeon with AVX-512 and AMX float32 took 28k
    # (seed 0) and 30k (seed 1), with a task that stays unsolved for 20k steps; there, with the fused optimiser pass
    # (whose parameters differ from torch's fused Adam's by 1.2e-7 after 300 steps, less than torch's for-each Adam
    # does), seed 0 missed 40k here (38k in a run with a larger buffer) and seeds 1-4 took 6k-13k (torch's steps:
    # 6k-9k): chaos, not a worse update. With MKL held to AVX2 (an AVX2-only CPU's kernels) seed 0 took 7k alone and
    # on two threads about 50k, and missed 60k in one full-suite run ([1, 1, 0, 1]). Hence up to three seeds.
    budget = 40_000

    def build(seed: int) -> D2RSAC:
        return tiny_model(
            seed=seed,
            batch_size=128,
            buffer_size=budget,
            policy_kwargs=dict(TINY, train_precision=precision),
            **POINT_REACH_TRAINING,
        )

    model = build(0)
    # bfloat16 is used only where it is native (it is ~20x slower than float32 elsewhere): float32 otherwise.
    native = precision == "bfloat16" and bfloat16_is_native("cpu")
    expected = "bfloat16" if native else "float32"
    if precision == "bfloat16" and not native:
        with pytest.warns(UserWarning, match="not native on this cpu"):
            assert model.policy.effective_train_precision == expected
        # Its gradient steps would be the float32 case's, step for step (same seed, same computations).
        pytest.skip("bfloat16 is not native on this CPU: the model trains in float32, as the float32 case")
    assert model.policy.effective_train_precision == expected
    assert_a_seed_learns_point_reach(build, budget=budget)


def test_bfloat16_falls_back_to_float32_with_a_warning_where_it_is_not_native():
    """An AVX2-only CPU, emulated: oneDNN limited to AVX2 (torch then has no native bfloat16 products)."""
    code = (
        "import warnings, torch as th\n"
        "from d2r_sb3.common.precision import bfloat16_is_native\n"
        "from d2r_sb3.d2r.policies import D2RPolicy\n"
        "from gymnasium import spaces\n"
        "import numpy as np\n"
        "obs = spaces.Box(-1, 1, (8,), np.float32); act = spaces.Box(-1, 1, (2,), np.float32)\n"
        "policy = D2RPolicy(obs, act, lambda _: 3e-4, num_tasks=4, n_modules=4, module_dim=8,\n"
        "                   encoder_sizes=[8], gate_sizes=[8], train_precision='bfloat16')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    print(bfloat16_is_native('cpu'), policy.effective_train_precision, policy.train_precision)\n"
        "print(caught[0].message if caught else 'no warning')\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "False float32 bfloat16"  # requested bfloat16 is kept (saved), float32 is used here
    assert "not native on this cpu" in second and "gradient steps run in float32" in second
    # The warning names the actual reason: the limit on this machine where the CPU has the instructions.
    if {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
        assert "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below them" in second
    else:
        assert "neither avx512_bf16 nor amx_bf16" in second


def test_the_reason_bfloat16_is_not_native_names_what_is_missing(monkeypatch):
    from d2r_sb3.common import precision

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: ("avx2", "avx512f"))
    reason = precision.bfloat16_not_native_reason("cpu")
    assert reason == "the CPU has neither avx512_bf16 nor amx_bf16 (its flags: avx2, avx512f)"
    assert not precision.bfloat16_is_native("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: ("avx2", "avx512f", "avx512_bf16"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    assert "ONEDNN_MAX_CPU_ISA=avx512_core keeps oneDNN below them" in str(
        precision.bfloat16_not_native_reason()
    )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # a limit that still allows them
    supported = bool(th.ops.mkldnn._is_mkldnn_bf16_supported())
    assert (precision.bfloat16_not_native_reason() is None) == supported
    assert "not on 'meta'" in str(precision.bfloat16_not_native_reason("meta"))


def test_short_learn_on_real_mt10_logs_per_task_alpha_and_temperature(tmp_path):
    env = make_mt_env("MT10", goals="rand", preset="paper", seed=0, max_episode_steps=20)
    model = D2RSAC("D2RPolicy", env, batch_size=40, learning_starts=100, buffer_size=5000, seed=0)
    assert model.replay_buffer.handle_timeout_termination is False  # picked from the paper preset
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(300, log_interval=1)
    assert model._n_updates == 20
    with open(tmp_path / "progress.csv") as f:
        header = next(csv.reader(f))
    for key in (
        "train/alpha/peg-insert-side",
        "train/temp/drawer-close",
        "train/critic_loss",
        "rollout/success_rate",
    ):
        assert key in header, key
    model.save(tmp_path / "d2r_mt10")
    loaded = D2RSAC.load(tmp_path / "d2r_mt10", env=env, buffer_size=1)
    obs = env.reset()
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )
    path = loaded.policy.route(obs)
    assert path.edges.shape == (10, 17, 16) and (path.num_active >= 2).all()


def _fused_flags(model) -> list:
    optimizers = [model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer]
    return [group["fused"] for optimizer in optimizers for group in optimizer.param_groups]


def test_optimizers_are_fused_and_stay_fused_through_save_and_load(tmp_path):
    """Adam runs as torch's fused kernel by default, also after loading a model saved before that default (its
    policy kwargs say ``foreach=True``) and after a state-dict load (which resets the flag); ``fused=False`` keeps
    torch's own implementation; a fused step equals the per-parameter Adam step up to float rounding."""
    import copy

    model = tiny_d2r(learning_starts=100)
    assert _fused_flags(model) == [True, True, True]
    model.learn(200)
    model.save(tmp_path / "fused.zip")
    loaded = D2RSAC.load(tmp_path / "fused.zip")
    assert _fused_flags(loaded) == [True, True, True]

    legacy = tiny_d2r(policy_kwargs={**TINY_D2R, "optimizer_kwargs": {"foreach": True}})
    assert _fused_flags(legacy) == [True, True, True]
    plain = tiny_d2r(policy_kwargs={**TINY_D2R, "optimizer_kwargs": {"fused": False}})
    assert plain.actor.optimizer.param_groups[0]["fused"] is False

    # Same update as the default per-parameter Adam.
    params = [th.nn.Parameter(p.detach().clone()) for p in model.actor.parameters()]
    reference = [th.nn.Parameter(p.detach().clone()) for p in params]
    fused = th.optim.Adam(params, lr=1e-3, fused=True)
    loop = th.optim.Adam(reference, lr=1e-3, foreach=False)
    gen = th.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(params, reference, strict=True):
            a.grad = th.randn(a.shape, generator=gen)
            b.grad = copy.deepcopy(a.grad)
        fused.step()
        loop.step()
    for a, b in zip(params, reference, strict=True):
        th.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cached", [False, True, None])
def test_learn_says_when_the_compiled_loops_are_compiled_first(cached, monkeypatch, capsys):
    """With ``verbose=1`` on a CPU, ``learn`` says so when numba has not cached D2R's loops for this machine (the
    first gradient steps then take tens of seconds longer), and says nothing once they are cached, or where that
    cannot be told."""
    from d2r_sb3.d2r import compiled_block

    monkeypatch.setattr(
        compiled_block, "is_cached", lambda: None if cached is None else (cached, "/the/cache")
    )
    model = tiny_d2r(verbose=1, learning_starts=8, batch_size=8)
    capsys.readouterr()
    model.learn(16)
    out = capsys.readouterr().out
    assert ("not compiled for this machine yet" in out) == (cached is False)
    assert ("keeps them in /the/cache" in out) == (cached is False)
