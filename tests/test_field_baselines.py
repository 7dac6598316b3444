"""Tests of the CARE, PaCo and MOORE baselines (d2r_sb3.baselines.care / paco / moore): shapes, parameter counts,
where gradients go, MOORE's orthogonality, PaCo's loss maskout and w-reset, CARE's task-embedding files, the safe
format, learning a cheap multi-task problem, and a short MT10 run."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from toy_envs import make_point_reach

from d2r_sb3 import MultiTaskSAC, evaluate_per_task, make_mt_env
from d2r_sb3.baselines import POLICY_ALIASES, CAREPolicy, PaCoPolicy, PaCoSAC
from d2r_sb3.baselines.care import care_parameter_count, load_task_embeddings
from d2r_sb3.baselines.moore import gram_schmidt, moore_parameter_count
from d2r_sb3.baselines.paco import paco_parameter_count
from d2r_sb3.common.buffers import MultiTaskReplayBufferSamples
from d2r_sb3.envs.metaworld import benchmark_task_names
from d2r_sb3.registry import ALGOS
from d2r_sb3.serialization import load_policy, save_policy

STATE_DIM, ACTION_DIM = 39, 4
LR = lambda _: 3e-4  # noqa: E731
ALIASES = ["CAREPolicy", "PaCoPolicy", "MOOREPolicy"]
SMALL = {  # small networks of each method, for the tests that train
    "CAREPolicy": dict(n_experts=3, encoder_sizes=[32, 32], hidden_sizes=[64, 64]),
    "PaCoPolicy": dict(n_param_sets=3, hidden_sizes=[64, 64]),
    "MOOREPolicy": dict(n_experts=3, expert_sizes=[64, 64]),
}


def mt_spaces(num_tasks: int) -> tuple[spaces.Box, spaces.Box]:
    """Meta-World-shaped spaces: a 39-d state then the one-hot (the policies only read the widths)."""
    low = np.concatenate([np.full(STATE_DIM, -np.inf, np.float32), np.zeros(num_tasks, np.float32)])
    high = np.concatenate([np.full(STATE_DIM, np.inf, np.float32), np.ones(num_tasks, np.float32)])
    return spaces.Box(low, high, dtype=np.float32), spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)


def random_obs(num_tasks: int, batch: int, seed: int = 0) -> tuple[th.Tensor, th.Tensor]:
    gen = th.Generator().manual_seed(seed)
    task_ids = th.arange(batch) % num_tasks
    obs = th.cat([th.randn(batch, STATE_DIM, generator=gen), th.eye(num_tasks)[task_ids]], dim=-1)
    return obs, task_ids


def build(alias: str, num_tasks: int = 10, **kwargs: Any) -> Any:
    return POLICY_ALIASES[alias](*mt_spaces(num_tasks), LR, num_tasks=num_tasks, **kwargs)


# --- registration and shapes --------------------------------------------------------------------------------
def test_registered_in_the_registry_and_the_aliases():
    assert ALGOS["care"] == (MultiTaskSAC, "CAREPolicy")
    assert ALGOS["paco"] == (PaCoSAC, "PaCoPolicy")
    assert ALGOS["moore"] == (MultiTaskSAC, "MOOREPolicy")
    for alias in ALIASES:
        assert MultiTaskSAC.policy_aliases[alias] is POLICY_ALIASES[alias]
    assert PaCoSAC.policy_aliases["PaCoPolicy"] is PaCoPolicy


@pytest.mark.parametrize("num_tasks", [10, 50])
@pytest.mark.parametrize("alias", ALIASES)
def test_sac_shapes(alias, num_tasks):
    policy = build(alias, num_tasks, **SMALL[alias])
    obs, task_ids = random_obs(num_tasks, 2 * num_tasks)
    actions, log_prob = policy.actor.action_log_prob(obs, task_ids)
    assert actions.shape == (2 * num_tasks, ACTION_DIM) and log_prob.shape == (2 * num_tasks,)
    assert actions.abs().max() <= 1 and th.isfinite(log_prob).all()
    q = policy.critic.q_values(obs, actions, task_ids)
    assert q.shape == (2, 2 * num_tasks) and th.isfinite(q).all()
    assert policy.q_values_for_actor(obs, actions, task_ids).shape == (2, 2 * num_tasks)
    # Another task gives another output for the same state; PaCo's identically initialised parameter sets and
    # compositional vectors on the simplex start every task from the same network (theta_tau = phi_1).
    other = obs.clone()
    other[:, STATE_DIM:] = th.eye(num_tasks)[(task_ids + 1) % num_tasks]
    mean = policy.actor.distribution(obs)[0]
    assert th.allclose(mean, policy.actor.distribution(other)[0]) is (alias == "PaCoPolicy")
    if alias == "PaCoPolicy":
        distinct = build(alias, num_tasks, identical_init=False, **SMALL[alias]).actor
        assert not th.allclose(distinct.distribution(obs)[0], distinct.distribution(other)[0])


# --- parameter counts ---------------------------------------------------------------------------------------
def test_parameter_counts_match_the_documented_formulas_and_the_papers():
    counts = {alias: build(alias).parameter_counts() for alias in ALIASES}
    # The formulas of the module docstrings, on MT10 (state 39, actor output 8, critic input 43, output 1).
    assert counts["CAREPolicy"]["actor"] == care_parameter_count(STATE_DIM, 10, 8) == 396_062
    assert counts["CAREPolicy"]["critic"] == care_parameter_count(
        STATE_DIM, 10, 1, passthrough_dim=ACTION_DIM
    )
    assert counts["PaCoPolicy"]["actor"] == paco_parameter_count(STATE_DIM, 10, 8, 5, [400] * 3) == 1_700_090
    assert counts["PaCoPolicy"]["critic"] == paco_parameter_count(STATE_DIM + ACTION_DIM, 10, 1, 5, [400] * 3)
    assert (
        counts["MOOREPolicy"]["actor"] == moore_parameter_count(STATE_DIM, 10, 8, 4, [400] * 3) == 1_379_320
    )
    assert counts["MOOREPolicy"]["critic"] == moore_parameter_count(
        STATE_DIM + ACTION_DIM, 10, 1, 4, [400] * 3
    )
    # A 2025 re-run reports MT10 actors of ~1.70M (PaCo) and ~1.38M (MOORE).
    assert round(counts["PaCoPolicy"]["actor"] / 1e6, 2) == 1.70
    assert round(counts["MOOREPolicy"]["actor"] / 1e6, 2) == 1.38
    # MOORE's MT50 configuration has 6 experts; CARE with 768-d description embeddings has a projection MLP.
    assert build("MOOREPolicy", 50).actor.net.n_experts == 6
    assert build("MOOREPolicy", 50).parameter_counts()["actor"] == moore_parameter_count(
        STATE_DIM, 50, 8, 6, [400] * 3
    )
    care = build("CAREPolicy", task_embeddings=np.ones((10, 768))).parameter_counts()
    assert care["actor"] == care_parameter_count(STATE_DIM, 10, 8, embedding_size=768) == 477_512
    for alias in ALIASES:
        print(f"{alias} MT10: {counts[alias]}")


# --- gradients ----------------------------------------------------------------------------------------------
def single_task_backward(policy: Any, task: int) -> None:
    """Actor and critic losses of a batch from ``task`` only, backpropagated."""
    obs, _ = random_obs(policy.num_tasks, 12)
    obs[:, STATE_DIM:] = th.eye(policy.num_tasks)[task]
    task_ids = th.full((12,), task)
    actions, log_prob = policy.actor_loss_sample(obs, task_ids, None)
    q = policy.q_values(obs, actions.detach(), task_ids)
    (log_prob.sum() + q.sum()).backward()


def rows_with_gradient(grad: th.Tensor) -> list[int]:
    """Task rows (dim 1 of an ``[E, T, ...]`` gradient) that received any gradient."""
    return th.nonzero(grad.abs().flatten(2).sum(dim=(0, 2))).flatten().tolist()


def test_paco_gradient_reaches_every_parameter_set_and_only_the_tasks_own_w():
    policy = build("PaCoPolicy", **SMALL["PaCoPolicy"])
    single_task_backward(policy, task=3)
    for net in (policy.actor.net, policy.critic.net):
        assert rows_with_gradient(net.task_weights.grad) == [3]
        for layer in net.layers:  # every one of the K sets of every layer learns
            per_set = layer.weight.grad.abs().sum(dim=(0, 2, 3))
            assert (per_set > 0).all(), per_set
    assert all(p.grad is None for p in policy.critic_target.parameters())


def test_moore_gradient_reaches_every_expert_and_only_the_tasks_head_and_weights():
    policy = build("MOOREPolicy", **SMALL["MOOREPolicy"])
    single_task_backward(policy, task=7)
    for net, out_dim in ((policy.actor.net, 2 * ACTION_DIM), (policy.critic.net, 1)):
        assert rows_with_gradient(net.task_weights.grad) == [7]
        heads = net.head.weight.grad.view(net.n_nets, 10, out_dim, -1).abs().sum(dim=(0, 2, 3))
        assert th.nonzero(heads).flatten().tolist() == [7]
        for layer in net.experts.layers:
            assert (layer.weight.grad.abs().sum(dim=(0, 2, 3)) > 0).all()


@pytest.mark.parametrize("pretrained", [False, True])
def test_care_gradient_reaches_encoders_attention_context_and_only_the_tasks_embedding(pretrained):
    kwargs = dict(SMALL["CAREPolicy"])
    if pretrained:
        kwargs["task_embeddings"] = np.random.default_rng(0).normal(size=(10, 16))
    policy = build("CAREPolicy", **kwargs)
    single_task_backward(policy, task=2)
    for net in (policy.actor.net, policy.critic.net):
        for layer in net.encoders.layers:  # every encoder of the mixture learns
            assert (layer.weight.grad.abs().sum(dim=(0, 2, 3)) > 0).all()
        for module in (net.attention, net.context, net.trunk):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        if pretrained:  # the description embeddings are frozen; their projection learns
            assert "description_embeddings" in dict(net.named_buffers())
            assert all(p.grad.abs().sum() > 0 for p in net.projection.parameters())
        else:
            assert rows_with_gradient(net.task_embedding.grad) == [2]


def test_care_attention_reads_a_detached_context_unless_asked():
    for detach, expect_gradient in ((True, False), (False, True)):
        net = build("CAREPolicy", detach_context_for_attention=detach, **SMALL["CAREPolicy"]).actor.net
        _, attention = net.task_contexts()
        attention[..., 0].sum().backward()
        assert (net.task_embedding.grad is not None) is expect_gradient
        assert all(p.grad is not None for p in net.attention.parameters())


# --- MOORE: orthogonal representations ----------------------------------------------------------------------
def test_moore_representations_are_orthonormal_per_sample():
    net = build("MOOREPolicy").actor.net
    obs, _ = random_obs(10, 64)
    basis = net.representations(obs[:, :STATE_DIM])  # [E, B, k, d]
    gram = basis @ basis.transpose(-1, -2)
    th.testing.assert_close(gram, th.eye(4).expand_as(gram), atol=1e-5, rtol=0)
    # Without Gram-Schmidt (the MOE baseline) the experts' outputs are not orthonormal.
    plain = build("MOOREPolicy", orthogonal=False).actor.net.representations(obs[:, :STATE_DIM])
    plain_gram = plain @ plain.transpose(-1, -2)
    assert (plain_gram - th.eye(4)).abs().max() > 0.1
    # Gram-Schmidt keeps the span: each input vector is a combination of the basis vectors up to its index.
    vectors = th.randn(5, 3, 8, dtype=th.float64)
    ortho = gram_schmidt(vectors)
    coefficients = vectors @ ortho.transpose(-1, -2)
    th.testing.assert_close(coefficients @ ortho, vectors)
    assert coefficients.triu(1).abs().max() < 1e-10  # no look-ahead: lower triangular


def test_moore_gram_schmidt_of_a_degenerate_sample_is_finite():
    vectors = th.zeros(2, 3, 6)
    vectors[:, 0, 0] = 1.0
    vectors[:, 1, 0] = 2.0  # parallel to the first
    ortho = gram_schmidt(vectors)
    assert th.isfinite(ortho).all() and ortho[:, 1].abs().max() < 1e-6


# --- PaCo: loss maskout and w-reset -------------------------------------------------------------------------
def paco_model(**kwargs: Any) -> PaCoSAC:
    kwargs.setdefault("policy_kwargs", SMALL["PaCoPolicy"])
    return PaCoSAC(
        "PaCoPolicy", make_point_reach(4), batch_size=16, learning_starts=0, buffer_size=100, seed=0, **kwargs
    )


def batch_with_an_exploding_task(
    model: PaCoSAC, task: int, reward: float = 1e4
) -> MultiTaskReplayBufferSamples:
    """Four transitions per task; ``task``'s rewards are so large that its critic loss passes the 3e3 threshold."""
    num_tasks, obs_dim = model.num_tasks, model.observation_space.shape[0]
    task_ids = th.arange(4 * num_tasks) % num_tasks
    obs = th.zeros(len(task_ids), obs_dim)
    obs[:, -num_tasks:] = th.eye(num_tasks)[task_ids]
    rewards = th.where(task_ids == task, th.tensor(reward), th.tensor(0.0)).unsqueeze(-1)
    return MultiTaskReplayBufferSamples(
        observations=obs,
        actions=th.zeros(len(task_ids), 2),
        next_observations=obs.clone(),
        dones=th.zeros(len(task_ids), 1),
        rewards=rewards,
        task_ids=task_ids,
        routes=None,
    )


def w_tables(model: PaCoSAC) -> dict[str, th.Tensor]:
    policy = model.policy
    return {
        name: net.task_weights.detach().clone()
        for name, net in (
            ("actor", policy.actor.net),
            ("critic", policy.critic.net),
            ("target", policy.critic_target.net),
        )
    }


@pytest.mark.parametrize("method", ["interpolate", "copy", "random"])
def test_paco_masks_and_resets_a_diverging_task_only(method):
    # lr 0: every change of w or log alpha comes from the reset, not from the optimizer steps.
    model = paco_model(learning_rate=0.0, ent_coef_lr=0.0, reset_method=method, reset_log_alpha=True)
    with th.no_grad():
        model.log_ent_coef.fill_(-1.0)
    before = w_tables(model)
    stats = model._gradient_step(batch_with_an_exploding_task(model, task=2))
    assert stats["kept"].tolist() == [True, True, False, True]  # the maskout: task 2 is out of this update
    after = w_tables(model)
    for name in ("actor", "critic", "target"):
        changed = (after[name] != before[name]).any(-1).any(0)
        assert changed.tolist() == [False, False, True, False], name
        new_rows = after[name][:, 2]
        th.testing.assert_close(new_rows.sum(-1), th.ones(new_rows.shape[0]))  # still on the simplex's plane
        if method == "copy":
            others = after[name][:, [0, 1, 3]]
            assert all((others[e] == new_rows[e]).all(-1).any() for e in range(new_rows.shape[0]))
        if method == "random":
            assert (new_rows > 0).all()
    th.testing.assert_close(after["target"][:, 2], after["critic"][:, 2])
    assert model.log_ent_coef.tolist() == [-1.0, -1.0, 0.0, -1.0]  # back to log(1) for task 2 only
    assert model.task_reset_counts.tolist() == [0, 0, 1, 0]


def test_paco_defaults_follow_the_official_code():
    model = paco_model(learning_rate=0.0, ent_coef_lr=0.0)
    assert (model.reset_method, model.reset_log_alpha, model.task_loss_reweighting) == (
        "interpolate",
        False,
        False,
    )
    assert model.extreme_task_loss_threshold == 3e3
    with th.no_grad():
        model.log_ent_coef.fill_(-1.0)
    before = w_tables(model)
    model._gradient_step(batch_with_an_exploding_task(model, task=1, reward=0.0))  # nothing explodes
    assert model.task_reset_counts.sum() == 0
    assert all(th.equal(before[k], v) for k, v in w_tables(model).items())
    model._gradient_step(batch_with_an_exploding_task(model, task=1))
    assert model.task_reset_counts.tolist() == [0, 1, 0, 0]
    assert model.log_ent_coef.tolist() == [-1.0] * 4  # the code resets w only
    # Interpolation: task 1's new vector is a convex combination of the others' (here, all on the simplex).
    actor = w_tables(model)["actor"][0]
    others = actor[[0, 2, 3]]
    mix = th.linalg.lstsq(others.T, actor[1]).solution
    th.testing.assert_close(others.T @ mix, actor[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="reset_method"):
        paco_model(reset_method="bogus")


# --- CARE: task-description embeddings ----------------------------------------------------------------------
def test_care_loads_embeddings_from_json_npz_and_npy_and_checks_them(tmp_path):
    names = benchmark_task_names("MT10")
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 6)).astype(np.float32)
    # The authors' file names tasks by their old "-v2"/"-v1" names, in its own order: matched by short name.
    keyed = {name.replace("-v3", "-v2"): table[i].tolist() for i, name in reversed(list(enumerate(names)))}
    (tmp_path / "emb.json").write_text(json.dumps(keyed))
    np.savez(tmp_path / "emb.npz", **{k: np.asarray(v) for k, v in keyed.items()})
    np.save(tmp_path / "emb.npy", table)
    for file in ("emb.json", "emb.npz", "emb.npy"):
        np.testing.assert_array_equal(load_task_embeddings(tmp_path / file, 10), table)
    # An explicit task order (env.task_names) for a custom task list.
    custom = load_task_embeddings(keyed, 2, task_names=[names[3], names[0]])
    np.testing.assert_array_equal(custom, table[[3, 0]])

    bad = {
        "no embedding for task": {k: v for k, v in list(keyed.items())[1:]},
        "different lengths": {**keyed, next(iter(keyed)): [1.0, 2.0]},
        "NaN or infinite": {**keyed, next(iter(keyed)): [float("nan")] * 6},
        "not a list of numbers": {**keyed, next(iter(keyed)): "reach"},
    }
    for message, mapping in bad.items():
        with pytest.raises(ValueError, match=message):
            load_task_embeddings(mapping, 10)
    with pytest.raises(ValueError, match="pass task_names"):
        load_task_embeddings(keyed, 3)
    with pytest.raises(ValueError, match="unknown suffix"):
        (tmp_path / "emb.txt").write_text("0")
        load_task_embeddings(tmp_path / "emb.txt", 10)
    with pytest.raises(ValueError, match="does not exist"):
        load_task_embeddings(tmp_path / "missing.json", 10)
    with pytest.raises(ValueError, match=r"\[num_tasks, dim\]"):
        load_task_embeddings(table[:5], 10)
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("{")
        load_task_embeddings(tmp_path / "broken.json", 10)
    with pytest.raises(ValueError, match="no embedding"):
        CAREPolicy(*mt_spaces(10), LR, num_tasks=10, task_embeddings={"reach": [1.0]})


# --- the safe format ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", [*ALIASES, "CARE+embeddings"])
def test_safe_format_round_trip(alias, tmp_path):
    kwargs = dict(SMALL["CAREPolicy" if alias.startswith("CARE") else alias])
    if alias == "CARE+embeddings":
        alias = "CAREPolicy"
        file = tmp_path / "embeddings.json"
        names = benchmark_task_names("MT10")
        file.write_text(
            json.dumps({n: np.random.default_rng(i).normal(size=5).tolist() for i, n in enumerate(names)})
        )
        kwargs["task_embeddings"] = str(file)
    policy = build(alias, **kwargs)
    with th.no_grad():  # move the PaCo / MOORE task tables away from their init so that they must be saved
        for name, param in policy.actor.named_parameters():
            if "task" in name:
                param.add_(0.1 * th.randn_like(param))
    save_policy(policy, tmp_path / "policy", env_kwargs={})
    config = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert config["policy_class"] == alias
    if "task_embeddings" in kwargs:
        file.unlink()  # the safe format holds the vectors themselves
        assert len(config["policy_kwargs"]["task_embeddings"]) == 10
    loaded = load_policy(tmp_path / "policy")
    assert type(loaded.policy) is type(policy)
    obs, _ = random_obs(10, 20)
    np.testing.assert_array_equal(
        policy.predict(obs.numpy(), deterministic=True)[0], loaded.predict(obs.numpy(), deterministic=True)[0]
    )


# --- MT10: train, save, load, evaluate ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mt10():
    env = make_mt_env("MT10", goals="rand", preset="paper", seed=0, max_episode_steps=20)
    yield env
    env.close()


@pytest.mark.parametrize("algo", ["care", "paco", "moore"])
def test_trains_on_mt10_saves_loads_and_evaluates(algo, mt10, tmp_path):
    cls, alias = ALGOS[algo]
    model = cls(
        alias, mt10, policy_kwargs=SMALL[alias], batch_size=40, learning_starts=100, buffer_size=2_000, seed=0
    )
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(300)
    assert model._n_updates > 0 and model.log_ent_coef.shape == (10,)
    changed = [k for k, v in model.policy.state_dict().items() if not th.equal(v, before[k])]
    assert any(k.startswith("actor.") for k in changed) and any(k.startswith("critic.") for k in changed)
    model.save(tmp_path / "model")
    loaded = cls.load(tmp_path / "model", env=mt10, buffer_size=1)
    assert type(loaded) is cls and type(loaded.policy) is POLICY_ALIASES[alias]
    obs = mt10.reset()
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )
    safe = load_policy(save_policy(model, tmp_path / "policy"))
    assert safe.algo == algo
    np.testing.assert_array_equal(safe.predict(obs)[0], loaded.predict(obs, deterministic=True)[0])
    evaluation = evaluate_per_task(loaded, mt10, n_episodes=1)
    assert evaluation.success.shape == (10,) and np.isfinite(evaluation.mean_return).all()
