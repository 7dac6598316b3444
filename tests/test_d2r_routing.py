"""D2R network and routing: parameter counts, routes, SampleK statistics, ResRouting gradients, equivalence."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from d2r_sb3.d2r import D2RPolicy, RoutedNetwork, RouteRequest, reference
from d2r_sb3.d2r.reference import reference_forward
from d2r_sb3.d2r.routed_block import BlockPlan, BlockWorkspace, routed_block
from d2r_sb3.d2r.routing import RoutingGraph


def make_policy(num_tasks: int = 10, **kwargs) -> D2RPolicy:
    obs = spaces.Box(-np.inf, np.inf, (39 + num_tasks,), np.float32)
    act = spaces.Box(-1.0, 1.0, (4,), np.float32)
    return D2RPolicy(obs, act, lambda _: 3e-4, num_tasks=num_tasks, **kwargs)


def count(module: th.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(("num_tasks", "actor", "critic"), [(10, 684_240, 684_937), (50, 700_240, 700_937)])
def test_parameter_counts_match_the_authors_network(num_tasks, actor, critic):
    policy = make_policy(num_tasks)
    assert count(policy.actor) == actor
    assert count(policy.critic) == 2 * critic  # twin critics stored as one ensemble of 2
    # The temperature is a buffer, not a parameter.
    assert "net.route_temperature" in dict(policy.actor.named_buffers())


def random_inputs(net: RoutedNetwork, batch: int, seed: int = 0):
    gen = th.Generator().manual_seed(seed)
    state = th.randn(batch, net.state_encoder.layers[0].weight.shape[-1], generator=gen)
    task_ids = th.randint(0, net.num_tasks, (batch,), generator=gen)
    return state, task_ids


def spread_gate(net: RoutedNetwork, scale: float = 3.0, seed: int = 0) -> None:
    """Make gate logits far from uniform so that routes and masks are informative."""
    gen = th.Generator().manual_seed(seed)
    last = net.gate.layers[-1]
    with th.no_grad():
        last.bias.copy_(scale * th.randn(last.bias.shape, generator=gen))
        last.weight.mul_(10.0)


@pytest.mark.parametrize("routing", ["topk", "hard", "soft"])
def test_routes_pick_earlier_modules_only(routing):
    net = RoutedNetwork(39, 10, 8, routing=routing)
    spread_gate(net)
    state, task_ids = random_inputs(net, 64)
    for explore in (False, True):
        path = net.routing_path(state, task_ids, RouteRequest(explore=explore))
        edges = path.edges[0]  # [B, 17, 16]
        n = net.n_modules
        for node in range(n + 1):
            expected = {"topk": min(2, node), "hard": min(1, node), "soft": node}[routing]
            assert (edges[:, node].sum(-1) == expected).all(), (routing, node)
            assert not edges[:, node, node:].any(), "a module may only read earlier modules"


def test_deterministic_routes_are_the_top_k_logits():
    net = RoutedNetwork(39, 10, 8)
    spread_gate(net)
    state, task_ids = random_inputs(net, 32)
    path = net.routing_path(state, task_ids)
    logits = path.logits[0]
    for node in range(2, net.n_modules + 1):
        top2 = logits[:, node, :node].topk(2, dim=-1).indices
        expected = th.zeros(logits.shape[0], net.n_modules, dtype=th.bool).scatter_(1, top2, True)
        assert th.equal(path.edges[0][:, node], expected)
    assert th.isinf(logits[:, 0]).all() and th.isinf(logits[:, 3, 3:]).all()


def reachable_backward(edges: th.Tensor) -> th.Tensor:
    """Independent breadth-first search from the output node over chosen edges."""
    n = edges.shape[-1]
    active = th.zeros(edges.shape[0], n, dtype=th.bool)
    for b in range(edges.shape[0]):
        frontier = [j for j in range(n) if edges[b, n, j]]
        while frontier:
            j = frontier.pop()
            if not active[b, j]:
                active[b, j] = True
                frontier.extend(int(s) for s in th.nonzero(edges[b, j]).flatten())
    return active


@pytest.mark.parametrize("level", ["module", "layer", "model"])
def test_active_modules_are_the_backward_reachable_ones(level):
    net = RoutedNetwork(39, 10, 8, routing_level=level)
    spread_gate(net)
    state, task_ids = random_inputs(net, 48)
    path = net.routing_path(state, task_ids, RouteRequest(explore=True))
    edges = path.edges[0]
    assert not (edges & ~net.graph.candidates).any(), "routes must follow the level's candidate edges"
    assert th.equal(path.active[0], reachable_backward(edges))
    assert th.equal(path.num_active[0], path.active[0].sum(-1))


def inclusion_probabilities(q: np.ndarray) -> np.ndarray:
    """P(j is among 2 draws without replacement from categorical q)."""
    p = q.copy()
    for i, j in itertools.permutations(range(len(q)), 2):
        p[j] += q[i] * q[j] / (1.0 - q[i])
    return p


def test_sample_k_draws_k_without_replacement_from_tempered_softmax():
    graph = RoutingGraph(n_modules=6, top_k=2, routing="topk")
    draws = 40_000
    logits = th.tensor([1.5, -0.5, 0.3, 0.0, -1.0, 0.8])  # the output node's 6 candidates
    flat = th.zeros(graph.num_logits)
    flat[graph.flat_index[6]] = logits
    padded = graph.padded_logits(flat).expand(draws, -1, -1)
    for tau in (0.5, 1.0, 3.0):
        sources = graph.select(padded, th.full((draws,), tau), explore=True)[:, 6]
        assert (sources[:, 0] != sources[:, 1]).all(), "no source is drawn twice"
        freq = np.bincount(sources.flatten().numpy(), minlength=6) / draws
        expected = inclusion_probabilities(th.softmax(logits / tau, 0).double().numpy())
        # 5 standard errors of a binomial frequency: a broken sampler (e.g. with replacement, or no tau)
        # is off by far more.
        tolerance = 5 * np.sqrt(expected * (1 - expected) / draws)
        assert np.all(np.abs(freq - expected) < tolerance), (tau, freq, expected)
        # The plain statement of SampleK (a multinomial draw without replacement) has the same distribution.
        path = reference.sample_k(
            logits.expand(draws, -1), 2, th.full((draws,), tau), th.Generator().manual_seed(0)
        )
        assert (path.sum(-1) == 2).all()
        reference_freq = path.double().mean(0).numpy()
        assert np.all(np.abs(reference_freq - expected) < tolerance), (tau, reference_freq, expected)
    # A lower temperature concentrates the draws on the largest logits.
    cold = graph.select(padded, th.full((draws,), 0.2), explore=True)[:, 6]
    hot = graph.select(padded, th.full((draws,), 5.0), explore=True)[:, 6]
    top2 = {0, 5}
    share = lambda s: np.isin(s.numpy(), list(top2)).mean()  # noqa: E731
    assert share(cold) > 0.9 > share(hot)


def test_sample_k_uses_each_samples_task_temperature():
    net = RoutedNetwork(39, 2, 8)
    spread_gate(net, scale=1.0)
    net.route_temperature.copy_(th.tensor([0.05, 20.0]))
    state = th.randn(1, 39).expand(4000, -1)
    top_share = {}
    for task in (0, 1):
        task_ids = th.full((4000,), task)
        greedy = net.routing_path(state[:1], task_ids[:1]).edges[0][0, -1]
        sampled = net.routing_path(state, task_ids, RouteRequest(explore=True)).edges[0][:, -1]
        top_share[task] = (sampled == greedy).all(-1).float().mean().item()
    # The output node picks 2 of 16: at tau = 0.05 the draw is almost always the TopK pair, at tau = 20 it
    # is close to uniform over the 120 pairs.
    assert top_share[0] > 0.5 and top_share[1] < 0.1, top_share


# --- routes, values and gradients against the plain statement (d2r_sb3.d2r.reference) ----------------------
@pytest.mark.parametrize("routing", ["topk", "hard", "soft"])
def test_encodings_routes_weights_and_masks_equal_the_reference(routing):
    """Gate logits (Eq. 4), TopK paths (Eq. 6), routing weights (Eqs. 5 and 8) and ResRouting masks (Eq. 10)."""
    net = RoutedNetwork(39, 10, 8, routing=routing).double()
    spread_gate(net)
    state, task_ids = random_inputs(net, 32)
    state = state.double()
    with th.no_grad():
        x0, logits = net.encode_flat(state, task_ids)
        reference_x0, reference_logits = reference.encode(net, 0, state, task_ids)
    th.testing.assert_close(x0[0], reference_x0, rtol=1e-12, atol=1e-12)
    th.testing.assert_close(logits[0], reference_logits, rtol=1e-12, atol=1e-12)
    chunks = reference.gate_logit_chunks(reference_logits, net.n_modules)
    k = {"topk": 2, "hard": 1, "soft": net.n_modules}[routing]
    for request in (RouteRequest(resrouting=True), RouteRequest(explore=True, resrouting=True)):
        sources, weights, keep = net.choose_routes(logits, task_ids, request)
        for node, z in enumerate(chunks, start=1):
            chosen = sources[0, :, node, : min(k, node)]
            path = th.zeros_like(z, dtype=th.bool).scatter(1, chosen, True)
            if not request.explore:
                assert th.equal(path, reference.top_k(z, k)), (routing, node)
            dense_weights = th.zeros_like(z).scatter(1, chosen, weights[0, :, node, : min(k, node)])
            expected = reference.routing_probabilities(z, path, routing)
            th.testing.assert_close(dense_weights, expected, rtol=1e-12, atol=1e-12)
            assert th.equal(keep[0, :, node, : min(k, node)], reference.resrouting_keep(z).gather(1, chosen))


def stored_routes(net: RoutedNetwork, state, task_ids, explore: bool) -> th.Tensor:
    with th.no_grad():
        _, padded = net.encode(state, task_ids)
        return net.graph.encode(net.graph.select(padded, net.route_temperature[task_ids], explore)[0])


@pytest.mark.parametrize(
    ("resrouting", "shortcut", "n_nets"),
    [(True, "full", 1), (True, "masked", 1), (False, "full", 1), (True, "full", 2)],
)
def test_values_and_gradients_equal_the_reference(resrouting, shortcut, n_nets):
    th.manual_seed(0)
    net = RoutedNetwork(
        12,
        3,
        5,
        n_nets=n_nets,
        module_dim=16,
        encoder_sizes=(24, 20),
        gate_sizes=(18,),
        resrouting_shortcut=shortcut,
    ).double()
    spread_gate(net, scale=0.7)
    state, task_ids = random_inputs(net, 17)
    state = state.double().requires_grad_(True)
    routes = stored_routes(net, state, task_ids, explore=True)  # sampled routes: both sources may be masked
    request = RouteRequest(stored=routes.unsqueeze(0), resrouting=resrouting)
    out, sources = net(state, task_ids, request)
    weights = th.randn_like(out)
    (out * weights).sum().backward()
    fast = {name: p.grad.clone() for name, p in net.named_parameters()}
    fast_state = state.grad.clone()
    net.zero_grad()
    state.grad = None
    ref = th.stack(
        [reference_forward(net, e, state, task_ids, sources[e], resrouting, shortcut) for e in range(n_nets)]
    )
    th.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    (ref * weights).sum().backward()
    for name, p in net.named_parameters():
        th.testing.assert_close(fast[name], p.grad, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")
    th.testing.assert_close(fast_state, state.grad, rtol=1e-9, atol=1e-12)
    # ResRouting really masked something in these routes (otherwise the test proves little).
    if resrouting:
        _, padded = net.encode(state, task_ids)
        assert not net.graph.keep_mask(padded, sources)[..., 1:, :][
            net.graph.slot_valid[1:].expand_as(sources[..., 1:, :])
        ].all()


# --- ResRouting gradient semantics on a hand-built route ------------------------------------------------
def handcrafted_block(shortcut: str, keep_j_at_i: bool | None):
    """4 modules; module j = 2 feeds only node i = 3, module a = 1 feeds only j; output reads {3, 0}.

    Returns the gradients of the module weights after a backward pass from the output.
    """
    th.manual_seed(0)
    n, dim = 4, 8
    x0 = th.randn(1, 5, 6, dtype=th.float64)
    w_in = th.randn(1, 1, dim, 6, dtype=th.float64, requires_grad=True)
    b_in = th.randn(1, 1, dim, dtype=th.float64, requires_grad=True)
    w_hid = th.randn(1, n - 1, dim, dim, dtype=th.float64, requires_grad=True)
    b_hid = th.rand(1, n - 1, dim, dtype=th.float64).add(0.5).requires_grad_(True)  # keep relus active
    src = th.tensor(
        [[0, 0], [0, 0], [1, 0], [2, 0], [3, 0]]
    )  # node -> its two sources (slot 1 unused at node 1)
    p = th.tensor([[0.0, 0.0], [1.0, 0.0], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]], dtype=th.float64)
    sources = src.expand(1, 5, 5, 2).clone()
    weights = p.expand(1, 5, 5, 2).clone().requires_grad_(True)
    keep = None
    if keep_j_at_i is not None:
        keep = th.ones(1, 5, 5, 2, dtype=th.bool)
        keep[:, :, 3, 0] = keep_j_at_i  # source j = module 2 of node i = module 3
    plan = BlockPlan(
        is_input=(True, False, False, False), param_index=(0, 0, 1, 2), masked_shortcut=shortcut == "masked"
    )
    y = routed_block(x0, w_in, b_in, w_hid, b_hid, weights, sources, keep, BlockWorkspace(plan))
    y.sum().backward()
    return {"module_j": w_hid.grad[0, 1], "module_a": w_hid.grad[0, 0], "module_i": w_hid.grad[0, 2]}


def test_resrouting_masked_shortcut_stops_all_gradient_to_an_unsuitable_module():
    grads = handcrafted_block("masked", keep_j_at_i=False)
    assert th.count_nonzero(grads["module_j"]) == 0  # Eq. 11: nothing from node i reaches module j
    assert th.count_nonzero(grads["module_a"]) > 0  # Eq. 12: the rsg shortcut still feeds module j's sources
    assert th.count_nonzero(grads["module_i"]) > 0


def test_resrouting_full_shortcut_still_trains_the_module_through_the_residual():
    grads = handcrafted_block("full", keep_j_at_i=False)
    assert th.count_nonzero(grads["module_j"]) > 0  # authors' code: node i's shortcut uses the full output
    masked_input_only = handcrafted_block("full", keep_j_at_i=True)["module_j"]
    assert not th.allclose(grads["module_j"], masked_input_only)  # the input path is cut


def test_without_resrouting_every_path_carries_gradient():
    none = handcrafted_block("full", keep_j_at_i=None)
    kept = handcrafted_block("full", keep_j_at_i=True)
    for name in none:
        assert th.count_nonzero(none[name]) > 0
        th.testing.assert_close(none[name], kept[name])  # an all-kept mask equals no mask


def test_resrouting_mask_threshold_is_strictly_one_over_candidates_plus_one():
    graph = RoutingGraph(n_modules=3, top_k=2, routing="topk")
    # Node 2 has 2 candidates: threshold 1/3. Shares exactly 1/3 and 2/3 -> the 1/3 source is masked.
    flat = th.zeros(graph.num_logits)
    flat[graph.flat_index[2, :2]] = th.log(th.tensor([2.0, 1.0]))
    padded = graph.padded_logits(flat)
    sources = graph.select(padded.unsqueeze(0), None, explore=False)[0]
    keep = graph.keep_mask(padded, sources)
    assert keep[2].tolist() == [True, False]
    assert abs(1.0 / 3.0 - th.softmax(padded[2, :2], 0)[1].item()) < 1e-6


# --- compute skipping ---------------------------------------------------------------------------------
def test_compute_skipping_gives_the_dense_actions_with_fewer_modules():
    policy = make_policy(10)
    spread_gate(policy.actor.net, scale=1.0)
    obs = th.zeros(20, 49)
    obs[:, :39] = th.randn(20, 39)
    obs[th.arange(20), 39 + th.arange(20) % 10] = 1.0
    computed = []
    for row in obs:
        with th.no_grad():
            fast = policy.actor(row[None], deterministic=True)
            computed.append(policy.actor.last_modules_computed)
            dense_out, _ = policy.actor.net(row[None, :39], row[None, 39:].argmax(-1))
        th.testing.assert_close(fast, th.tanh(dense_out[0].chunk(2, -1)[0]))
    assert max(computed) <= 16 and min(computed) < 16
    assert computed == policy.route(obs).num_active.tolist()


def test_route_of_the_critic_and_bad_options():
    policy = make_policy(3)
    obs = th.zeros(4, 42)
    obs[:, 39] = 1.0
    paths = policy.critic_route(obs, th.zeros(4, 4))
    assert len(paths) == 2 and paths[0].edges.shape == (4, 17, 16)
    with pytest.raises(ValueError, match="routing"):
        make_policy(3, routing="gumbel")
    with pytest.raises(ValueError, match="resrouting_shortcut"):
        make_policy(3, resrouting_shortcut="half")
    with pytest.raises(ValueError, match="offpolicy_routing"):
        make_policy(3, offpolicy_routing="behaviour")
    with pytest.raises(ValueError, match="divisible"):
        make_policy(3, routing_level="layer", n_layers=5)


def test_default_init_matches_the_authors_scheme():
    net = RoutedNetwork(39, 10, 8)
    first = net.state_encoder.layers[0]
    assert first.weight.abs().max() <= 1 / math.sqrt(400) and th.all(first.bias == 0.1)
    assert net.w_hid.abs().max() <= 1 / math.sqrt(128) and th.all(net.b_hid == 0.1)
    assert net.head.weight.abs().max() <= 3e-3 and net.head.bias.abs().max() <= 3e-3
    assert th.all(net.route_temperature == 1.0)
