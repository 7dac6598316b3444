"""Tests of d2r_sb3.baselines (MT-SAC, MH-SAC, Soft Modularization, width-matched MH-SAC) and of D2R's
routing-level ablations, on real Meta-World MT10 envs and the cheap point-reach problem."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.sac.policies import SACPolicy
from toy_envs import POINT_REACH_TRAINING, assert_learns_point_reach, make_point_reach

from d2r_sb3 import D2RSAC, D2RPolicy, MultiTaskSAC, make_mt_env
from d2r_sb3.baselines import (
    POLICY_ALIASES,
    MHSACPolicy,
    MTSACPolicy,
    SMPolicy,
    WideMHSACPolicy,
    d2r_parameter_counts,
    format_parameter_counts,
    matched_width,
    parameter_counts,
)
from d2r_sb3.d2r.routing import build_candidates
from d2r_sb3.registry import ALGOS

STATE_DIM, ACTION_DIM = 39, 4
LR = lambda _: 3e-4  # noqa: E731


@pytest.fixture(scope="module")
def mt10():
    env = make_mt_env("MT10", goals="rand", preset="paper", seed=0)
    yield env
    env.close()


def spaces_for(num_tasks: int, mt10_env: Any) -> tuple[spaces.Box, spaces.Box]:
    """Observation/action spaces of a benchmark with ``num_tasks`` tasks: MT10's state bounds + a one-hot.

    Building the MT50 env takes ~10 s; the policies only see its spaces, which differ from MT10's in the
    length of the one-hot alone.
    """
    low = np.concatenate([mt10_env.observation_space.low[:STATE_DIM], np.zeros(num_tasks, np.float32)])
    high = np.concatenate([mt10_env.observation_space.high[:STATE_DIM], np.ones(num_tasks, np.float32)])
    return spaces.Box(low, high, dtype=np.float32), mt10_env.action_space


def random_obs(num_tasks: int, batch: int, seed: int = 0) -> tuple[th.Tensor, th.Tensor]:
    gen = th.Generator().manual_seed(seed)
    task_ids = th.arange(batch) % num_tasks
    obs = th.cat([th.randn(batch, STATE_DIM, generator=gen), th.eye(num_tasks)[task_ids]], dim=-1)
    return obs, task_ids


@pytest.fixture
def single_thread():
    """One torch thread: faster for these small networks, and robust to a machine shared with other jobs."""
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def small_model(alias: str, env: Any, **kwargs: Any) -> MultiTaskSAC:
    kwargs.setdefault("batch_size", 40)
    kwargs.setdefault("learning_starts", 100)
    kwargs.setdefault("buffer_size", 2_000)
    kwargs.setdefault("seed", 0)
    return MultiTaskSAC(alias, env, **kwargs)


# --- construction ---------------------------------------------------------------------------------------
def test_aliases_are_registered_for_every_baseline_of_the_registry():
    for alias, cls in POLICY_ALIASES.items():
        assert MultiTaskSAC.policy_aliases[alias] is cls
    for name, (algo, alias) in ALGOS.items():
        assert alias in algo.policy_aliases, f"{name}: {alias} is not registered on {algo.__name__}"


@pytest.mark.parametrize("num_tasks", [10, 50])
@pytest.mark.parametrize("alias", list(POLICY_ALIASES))
def test_policies_build_on_mt10_and_mt50_and_give_sac_shapes(alias, num_tasks, mt10):
    obs_space, action_space = spaces_for(num_tasks, mt10)
    policy = POLICY_ALIASES[alias](obs_space, action_space, LR, num_tasks=num_tasks)
    obs, task_ids = random_obs(num_tasks, 2 * num_tasks)
    actions, log_prob = policy.actor.action_log_prob(obs, task_ids)
    assert actions.shape == (2 * num_tasks, ACTION_DIM) and log_prob.shape == (2 * num_tasks,)
    assert actions.abs().max() <= 1 and th.isfinite(log_prob).all()
    q = policy.critic.q_values(obs, actions, task_ids)
    assert q.shape == (2, 2 * num_tasks)
    assert [t.shape for t in policy.critic(obs, actions)] == [(2 * num_tasks, 1)] * 2
    th.testing.assert_close(th.stack([t[:, 0] for t in policy.critic(obs, actions)]), q)
    # Acting takes the task from the one-hot: the same as passing the ids explicitly.
    th.manual_seed(1)
    from_onehot = policy.actor.action_log_prob(obs)[0]
    th.manual_seed(1)
    th.testing.assert_close(from_onehot, policy.actor.action_log_prob(obs, task_ids)[0])
    counts = policy.parameter_counts()
    assert counts == parameter_counts(policy) and counts["n_critics"] == 2
    assert counts["total"] == counts["actor"] + 2 * counts["critic"]
    assert alias.removesuffix("Policy") in format_parameter_counts(counts, alias)


@pytest.mark.parametrize("num_tasks", [10, 50])
def test_mtsac_network_has_the_size_of_sb3s_mlp_policy(num_tasks, mt10):
    obs_space, action_space = spaces_for(num_tasks, mt10)
    ours = MTSACPolicy(obs_space, action_space, LR, num_tasks=num_tasks).parameter_counts()
    sb3 = SACPolicy(obs_space, action_space, LR, net_arch=[400, 400, 400])
    assert ours["actor"] == sum(p.numel() for p in sb3.actor.parameters())
    assert ours["critic"] == sum(p.numel() for p in sb3.critic.q_networks[0].parameters())


def test_mhsac_has_one_head_per_task(mt10):
    obs_space, action_space = spaces_for(10, mt10)
    mt = MTSACPolicy(obs_space, action_space, LR, num_tasks=10).parameter_counts()
    mh = MHSACPolicy(obs_space, action_space, LR, num_tasks=10).parameter_counts()
    assert mh["actor"] - mt["actor"] == 9 * (400 * 2 * ACTION_DIM + 2 * ACTION_DIM)
    assert mh["critic"] - mt["critic"] == 9 * (400 + 1)


def test_bad_arguments_raise_clear_errors(mt10):
    obs_space, action_space = spaces_for(10, mt10)
    with pytest.raises(ValueError, match="positive layer sizes"):
        MTSACPolicy(obs_space, action_space, LR, num_tasks=10, net_arch=[400, 0])
    with pytest.raises(ValueError, match="'pi'"):
        MHSACPolicy(obs_space, action_space, LR, num_tasks=10, net_arch=dict(pi=[64]))
    with pytest.raises(ValueError, match="n_layers must be >= 2"):
        SMPolicy(obs_space, action_space, LR, num_tasks=10, n_layers=1)
    with pytest.raises(ValueError, match="within"):
        WideMHSACPolicy(obs_space, action_space, LR, num_tasks=10, tolerance=0.0)
    with pytest.raises(ValueError, match="num_tasks=60"):
        MTSACPolicy(obs_space, action_space, LR, num_tasks=60)
    with pytest.raises(TypeError, match="MultiTaskPolicy"):
        parameter_counts(th.nn.Linear(2, 2))  # type: ignore[arg-type]


# --- training, save and load on MT10 --------------------------------------------------------------------
@pytest.mark.parametrize("alias", list(POLICY_ALIASES))
def test_policies_train_on_mt10_and_round_trip_save_load(alias, mt10, tmp_path):
    model = small_model(alias, mt10)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(300)
    assert model._n_updates > 0 and model.log_ent_coef.shape == (10,)
    changed = [k for k, v in model.policy.state_dict().items() if not th.equal(v, before[k])]
    assert any(k.startswith("actor.") for k in changed) and any(k.startswith("critic.") for k in changed)
    model.save(tmp_path / "model")
    loaded = MultiTaskSAC.load(tmp_path / "model", env=mt10, buffer_size=1)
    assert type(loaded.policy) is POLICY_ALIASES[alias]
    assert loaded.policy.parameter_counts() == model.policy.parameter_counts()
    obs = mt10.reset()
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )


@pytest.mark.parametrize("alias", list(POLICY_ALIASES))
def test_policies_round_trip_the_safe_policy_format(alias, mt10, tmp_path):
    from d2r_sb3.serialization import load_policy, save_policy

    policy = POLICY_ALIASES[alias](*spaces_for(10, mt10), LR, num_tasks=10)
    save_policy(policy, tmp_path / "policy", env_kwargs=mt10.env_kwargs())
    loaded = load_policy(tmp_path / "policy")
    assert type(loaded.policy) is type(policy)
    obs = mt10.reset()
    np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], loaded.predict(obs)[0])


# --- MH-SAC: heads ----------------------------------------------------------------------------------------
def test_mhsac_head_of_a_task_is_the_only_one_trained_by_its_samples(mt10):
    policy = MHSACPolicy(*spaces_for(10, mt10), LR, num_tasks=10, net_arch=[32, 32])
    obs, task_ids = random_obs(10, 40)
    task = 3
    mine = task_ids == task
    actions, log_prob = policy.actor_loss_sample(obs[mine], task_ids[mine], None)
    q = policy.q_values(obs[mine], actions.detach(), task_ids[mine])
    (log_prob.sum() + q.sum()).backward()
    for net, out_dim in ((policy.actor.net, 2 * ACTION_DIM), (policy.critic.net, 1)):
        grad = net.head.weight.grad.view(net.n_nets, 10, out_dim, -1)  # [E, head, rows, hidden]
        per_head = grad.abs().sum(dim=(0, 2, 3))
        assert per_head[task] > 0
        assert th.count_nonzero(per_head) == 1, f"other heads got gradient: {per_head}"
        assert net.trunk.layers[0].weight.grad.abs().sum() > 0  # the trunk is shared


@pytest.mark.parametrize("alias", list(POLICY_ALIASES))
def test_q_values_for_the_actor_do_not_train_the_critic(alias, mt10):
    policy = POLICY_ALIASES[alias](*spaces_for(10, mt10), LR, num_tasks=10)
    obs, task_ids = random_obs(10, 20)
    actions, _ = policy.actor_loss_sample(obs, task_ids, None)
    policy.q_values_for_actor(obs, actions, task_ids).min(0).values.sum().backward()
    assert all(p.grad is None for p in policy.critic.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.actor.parameters())


# --- Soft Modularization -----------------------------------------------------------------------------------
def test_sm_routing_weights_are_a_distribution_per_module(mt10):
    policy = SMPolicy(*spaces_for(10, mt10), LR, num_tasks=10)
    # Make routing far from uniform so that the checks below are not satisfied by the initial near-uniform weights.
    with th.no_grad():
        for layer in policy.actor.net.route_logits:
            layer.weight.normal_(0, 1.0)
    obs, _ = random_obs(10, 30)
    weights = policy.routing_weights(obs)
    assert weights.layers.shape == (30, 3, 4, 4) and weights.output.shape == (30, 4)
    for w in (weights.layers, weights.output):
        assert (w >= 0).all()
        th.testing.assert_close(w.sum(-1), th.ones(w.shape[:-1]))
    assert weights.layers.std(dim=0).mean() > 1e-3  # the weights depend on the state and the task
    # Same state, other task: other routing (the task embedding multiplies the state embedding).
    other_task = obs.clone()
    other_task[:, STATE_DIM:] = th.eye(10)[(th.arange(30) + 1) % 10]
    assert not th.allclose(policy.routing_weights(other_task).layers, weights.layers)


def test_sm_routing_recursion_feeds_each_layer_into_the_next(mt10):
    policy = SMPolicy(*spaces_for(10, mt10), LR, num_tasks=10)
    obs, _ = random_obs(10, 8)
    before = policy.routing_weights(obs)
    with th.no_grad():  # W_u of the second routing layer sees layer 1's probabilities only from layer 2 on
        policy.actor.net.route_cond[0].weight.normal_(0, 1.0)
    after = policy.routing_weights(obs)
    th.testing.assert_close(after.layers[:, 0], before.layers[:, 0])
    assert not th.allclose(after.layers[:, 1], before.layers[:, 1])
    # Every routing weight reaches the output: the output depends on the routing of every layer.
    net = policy.actor.net
    state, task_ids = policy.split_obs(obs)
    for layer in range(len(net.route_logits)):
        with th.no_grad():
            out_before = net(state, task_ids)
            net.route_logits[layer].bias.add_(th.linspace(-2, 2, net.route_logits[layer].bias.shape[-1]))
            assert not th.allclose(net(state, task_ids), out_before)


# --- width-matched MH-SAC -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tasks", [10, 50])
def test_width_matched_mhsac_has_d2rs_parameter_counts(num_tasks, mt10):
    obs_space, action_space = spaces_for(num_tasks, mt10)
    d2r = parameter_counts(D2RPolicy(obs_space, action_space, LR, num_tasks=num_tasks))
    assert d2r_parameter_counts(STATE_DIM + num_tasks, ACTION_DIM, num_tasks) == d2r
    if num_tasks == 10:  # the authors' MT10 network (684,250 with the 10-entry temperature, a buffer here)
        assert (d2r["actor"], d2r["critic"]) == (684_240, 684_937)
    wide = WideMHSACPolicy(obs_space, action_space, LR, num_tasks=num_tasks).parameter_counts()
    for role in ("actor", "critic"):
        assert abs(wide[role] - d2r[role]) / d2r[role] <= 0.02, (role, wide, d2r)


def test_width_matching_follows_the_d2r_configuration_and_leaves_the_seed_alone(mt10):
    obs_space, action_space = spaces_for(10, mt10)
    small_d2r = dict(n_modules=4, module_dim=32, encoder_sizes=[64, 64], gate_sizes=[32])
    th.manual_seed(0)
    first = WideMHSACPolicy(obs_space, action_space, LR, num_tasks=10, d2r_kwargs=small_d2r)
    th.manual_seed(0)  # the second build hits the cache: no D2R network is built, the weights must not change
    second = WideMHSACPolicy(obs_space, action_space, LR, num_tasks=10, d2r_kwargs=small_d2r)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert th.equal(a, b)
    target = parameter_counts(D2RPolicy(obs_space, action_space, LR, num_tasks=10, **small_d2r))
    counts = first.parameter_counts()
    assert counts["actor"] < 100_000 and abs(counts["actor"] - target["actor"]) / target["actor"] <= 0.02
    assert first.hidden_sizes["actor"] == [matched_width(target["actor"], STATE_DIM, 10, 8, 3)] * 3


# --- learning -----------------------------------------------------------------------------------------------
TINY_NETWORKS = {
    "MTSACPolicy": dict(net_arch=[64, 64]),
    "MHSACPolicy": dict(net_arch=[64, 64]),
    "SMPolicy": dict(n_layers=2, n_modules=2, module_dim=32, encoder_sizes=[64, 64], gate_sizes=[32]),
}


@pytest.mark.slow
@pytest.mark.parametrize("alias", list(TINY_NETWORKS))
def test_baselines_learn_every_task_of_a_cheap_multi_task_problem(alias, single_thread):
    """Fails if the baseline is broken: random actions never reach the goals, the baseline reaches all four."""
    model = MultiTaskSAC(
        alias,
        make_point_reach(4),
        policy_kwargs=TINY_NETWORKS[alias],
        batch_size=128,
        buffer_size=30_000,
        seed=0,
        **POINT_REACH_TRAINING,
    )
    assert_learns_point_reach(model)  # seed 0 solves it in 3k-6k steps


# --- D2R routing levels (paper Fig. 7(d)) --------------------------------------------------------------------
@pytest.mark.parametrize("level", ["layer", "model"])
def test_d2r_routing_levels_use_only_candidate_edges_train_and_round_trip(level, mt10, tmp_path):
    model = D2RSAC(
        "D2RPolicy",
        mt10,
        policy_kwargs=dict(routing_level=level),
        batch_size=40,
        learning_starts=100,
        buffer_size=2_000,
        seed=0,
    )
    policy = model.policy
    candidates = build_candidates(16, level, n_layers=4)
    assert th.equal(policy.actor.net.graph.candidates, candidates)
    model.learn(300)
    assert model._n_updates > 0
    obs = mt10.reset()
    for deterministic in (True, False):
        path = policy.route(obs, deterministic=deterministic)
        assert not (path.edges & ~candidates).any(), f"{level}: a route uses a non-candidate edge"
        assert path.edges[:, 16].any(-1).all()  # the output node always reads something
        assert (path.num_active >= 4).all()  # a layer / chain route crosses all 4 layers
        for critic_path in policy.critic_route(th.as_tensor(obs), th.zeros(10, ACTION_DIM), deterministic):
            assert not (critic_path.edges & ~candidates).any()
    # Routes stored with the transitions also stay on candidate edges.
    graph = policy.actor.net.graph
    stored = th.as_tensor(model.replay_buffer.routes[: model.replay_buffer.pos]).flatten(0, 1)
    sources = graph.decode(stored)  # [N, n + 1, slots]
    valid = graph.slot_valid.expand_as(sources)
    rows = th.arange(17).view(1, 17, 1).expand_as(sources)
    assert candidates[rows[valid], sources[valid]].all()

    model.save(tmp_path / "model")
    loaded = D2RSAC.load(tmp_path / "model", env=mt10, buffer_size=1)
    assert loaded.policy.net_kwargs["routing_level"] == level
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )
    assert th.equal(loaded.policy.route(obs).edges, policy.route(obs).edges)
