"""The optimised D2R code paths (issue 6) against the plain reference implementation and the dense forward.

Covers every routing function (topk / hard / soft), ResRouting off / "full" shortcut / "masked" shortcut, one
network and a twin-critic ensemble, float64 (equal to rounding) and float32 (equal to float32 precision), the
CPU (pulling) and the GPU (pushing, sync-free) backward strategies, and compute skipping at inference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from helpers import DEVICES, collect_only

from d2r_sb3.common import bias_relu
from d2r_sb3.d2r import (
    D2RCritic,
    D2RPolicy,
    RoutedNetwork,
    RouteRequest,
    block_operators,
    compiled,
    routed_block,
    skipping,
)
from d2r_sb3.d2r.reference import reference_forward

RESROUTING = {"off": (False, "full"), "full": (True, "full"), "masked": (True, "masked")}
# Backward strategy x row layout of the routed block: "pull-skip" is the CPU default, "push-dense" the GPU one.
BLOCK_STRATEGIES = ["pull-skip", "push-dense", "pull-dense", "push-skip"]


def use_block_strategy(net: RoutedNetwork, strategy: str) -> None:
    """Set the routed block's backward strategy and whether it skips unreached modules (``"pull-skip"``, ...);
    with the push (GPU) strategy, routes are chosen by tensor operations as on a GPU, else by compiled loops."""
    backward, layout = strategy.split("-")
    net.block_workspace.backward_strategy = backward
    net.block_workspace.skip_unreached = layout == "skip"
    net.host_loops = backward == "pull"


def small_net(routing: str = "topk", shortcut: str = "full", n_nets: int = 1, **kwargs) -> RoutedNetwork:
    th.manual_seed(0)
    net = RoutedNetwork(
        12,
        3,
        5,
        n_nets=n_nets,
        n_modules=kwargs.pop("n_modules", 7),
        module_dim=16,
        encoder_sizes=(24, 20),
        gate_sizes=(18,),
        routing=routing,
        resrouting_shortcut=shortcut,
        **kwargs,
    )
    # Far-from-uniform gates, so that routes differ between samples and ResRouting masks some edges.
    gen = th.Generator().manual_seed(1)
    last = net.gate.layers[-1]
    with th.no_grad():
        last.bias.copy_(0.7 * th.randn(last.bias.shape, generator=gen))
        last.weight.mul_(10.0)
    return net


def inputs(batch: int = 19, dtype=th.float64, seed: int = 2, device: str | th.device = "cpu"):
    gen = th.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    state, task_ids = th.randn(batch, 12, generator=gen).to(dtype), th.randint(0, 3, (batch,), generator=gen)
    return state.to(device), task_ids.to(device)


def fast_and_reference(
    net: RoutedNetwork, reference_net: RoutedNetwork, state, task_ids, request, shortcut, routing
):
    """Outputs and gradients (parameters and state) of the library and of the reference on the same routes."""
    state = state.clone().requires_grad_(True)
    th.manual_seed(3)  # SampleK draws
    out, sources = net(state, task_ids, request)
    upstream = th.randn(out.shape, generator=th.Generator().manual_seed(4), dtype=th.float64)
    upstream = upstream.to(out.device, out.dtype)
    (out * upstream).sum().backward()
    fast = {name: p.grad.double() for name, p in net.named_parameters()}
    fast["state"] = state.grad.double()

    ref_state = state.detach().double().requires_grad_(True)
    ref = th.stack(
        [
            reference_forward(
                reference_net,
                e,
                ref_state,
                task_ids,
                sources[e].expand(state.shape[0], -1, -1),
                request.resrouting,
                shortcut,
                routing,
            )
            for e in range(net.n_nets)
        ]
    )
    (ref * upstream.double()).sum().backward()
    slow = {name: p.grad for name, p in reference_net.named_parameters()}
    slow["state"] = ref_state.grad
    return out.double(), ref, fast, slow


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", BLOCK_STRATEGIES)
@pytest.mark.parametrize("n_nets", [1, 2])
@pytest.mark.parametrize("resrouting", list(RESROUTING))
@pytest.mark.parametrize("routing", ["topk", "hard", "soft"])
def test_values_and_gradients_equal_the_reference_in_float64(routing, resrouting, n_nets, strategy, device):
    use_rr, shortcut = RESROUTING[resrouting]
    net = small_net(routing, shortcut, n_nets).double().to(device)
    use_block_strategy(net, strategy)
    state, task_ids = inputs(device=device)
    requests = [RouteRequest(explore=True, resrouting=use_rr), RouteRequest(explore=False, resrouting=use_rr)]
    if routing != "soft":  # stored behaviour routes (the actor loss): both chosen sources may be masked
        with th.no_grad():
            _, padded = net.encode(state, task_ids)
            chosen = net.choose_sources(padded, task_ids, RouteRequest(explore=True))
        requests.append(RouteRequest(stored=net.graph.encode(chosen[0]).unsqueeze(0), resrouting=use_rr))
    for request in requests:
        net.zero_grad(set_to_none=True)
        reference_net = copy.deepcopy(net)
        out, ref, fast, slow = fast_and_reference(
            net, reference_net, state, task_ids, request, shortcut, routing
        )
        th.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        for name in slow:
            th.testing.assert_close(fast[name], slow[name], rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("loops", ["parallel loops", "serial loops"])
@pytest.mark.parametrize("strategy", ["pull-skip", "pull-dense"])
@pytest.mark.parametrize("n_nets", [1, 2])
@pytest.mark.parametrize("resrouting", list(RESROUTING))
def test_the_pulling_backward_on_two_threads_equals_the_reference(
    resrouting, n_nets, strategy, loops, monkeypatch
):
    """On two threads a hidden module's pull, relu mask and shortcut copy are one compiled pass split among both
    threads, as are the gate inputs; where numba's loops cannot run in parallel they are torch's kernels
    (what the other tests, on one thread, do not run)."""
    if loops == "serial loops":
        monkeypatch.setattr(compiled, "loop_threads", lambda threads: 1)
    elif compiled.loop_threads(2) != 2:
        pytest.skip("numba's parallel loops cannot use two threads here (threading layer or cores)")
    use_rr, shortcut = RESROUTING[resrouting]
    net = small_net("topk", shortcut, n_nets).double()
    use_block_strategy(net, strategy)
    state, task_ids = inputs()
    threads = th.get_num_threads()
    th.set_num_threads(2)
    try:
        out, ref, fast, slow = fast_and_reference(
            net,
            copy.deepcopy(net),
            state,
            task_ids,
            RouteRequest(explore=True, resrouting=use_rr),
            shortcut,
            "topk",
        )
    finally:
        th.set_num_threads(threads)
    th.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name in slow:
        th.testing.assert_close(fast[name], slow[name], rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resrouting", list(RESROUTING))
@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_float32_matches_the_float64_reference_to_float32_precision(routing, resrouting, device):
    use_rr, shortcut = RESROUTING[resrouting]
    reference_net = small_net(routing, shortcut, n_nets=2).double().to(device)
    net = copy.deepcopy(reference_net).float()
    state, task_ids = inputs(dtype=th.float32, device=device)
    with th.no_grad():  # routes from the float64 network, so both sides route identically
        _, padded = reference_net.encode(state.double(), task_ids)
        chosen = reference_net.choose_sources(padded, task_ids, RouteRequest(explore=True))
    request = RouteRequest(stored=reference_net.graph.encode(chosen[0]).unsqueeze(0), resrouting=use_rr)
    if routing == "soft":
        request = RouteRequest(resrouting=use_rr)
    out, ref, fast, slow = fast_and_reference(net, reference_net, state, task_ids, request, shortcut, routing)
    th.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    for name in slow:
        scale = slow[name].abs().max().clamp(min=1e-6)
        th.testing.assert_close(
            fast[name] / scale, slow[name] / scale, rtol=0, atol=1e-4, msg=f"gradient of {name}"
        )


def test_forward_without_gradient_equals_the_differentiable_forward():
    net = small_net(n_nets=2)
    state, task_ids = inputs(dtype=th.float32)
    request = RouteRequest(explore=True, resrouting=True)
    th.manual_seed(5)
    with_grad, sources = net(state, task_ids, request)
    th.manual_seed(5)
    with th.no_grad():
        without, same_sources = net(state, task_ids, request)
    assert th.equal(sources, same_sources)
    th.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def test_two_pending_graphs_backpropagate_independently():
    """The backward pass reuses scratch memory between calls: graphs alive at the same time must not mix."""
    net = small_net(n_nets=2)
    first, second = inputs(dtype=th.float32, seed=6), inputs(dtype=th.float32, seed=7)
    request = RouteRequest(resrouting=True)

    def grads(*batches) -> dict[str, th.Tensor]:
        net.zero_grad(set_to_none=True)
        outs = [net(state, task_ids, request)[0].square().sum() for state, task_ids in batches]
        for out in reversed(outs):
            out.backward()
        return {name: p.grad.clone() for name, p in net.named_parameters()}

    together = grads(first, second)
    alone = [grads(first), grads(second)]
    for name in together:
        th.testing.assert_close(together[name], alone[0][name] + alone[1][name], rtol=1e-5, atol=1e-6)


def test_scratch_memory_is_sized_once_for_the_most_rows_a_call_can_have():
    """The backward's scratch buffer is taken at the size of the dense layout (every node for every sample), so
    routes that reach more modules later reuse it instead of mapping a new one."""
    net = small_net(n_nets=2, n_modules=8, n_layers=4)
    request = RouteRequest(explore=True, resrouting=True)
    pointers = set()
    for seed in range(4):  # other samples, other routes, other row counts
        state, task_ids = inputs(batch=24, dtype=th.float32, seed=seed)
        th.manual_seed(seed)
        net(state, task_ids, request)[0].sum().backward()
        (buffer,) = net.block_workspace._scratch.values()
        pointers.add(buffer.data_ptr())
        assert buffer.shape[0] == 2 * 2 * 24 * 9  # [table halves x E x B x (n + 1), D]
    assert len(pointers) == 1


def _relative_error(value: th.Tensor, reference: th.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_precision", ["auto", "reduced"])
@pytest.mark.parametrize("strategy", BLOCK_STRATEGIES)
@pytest.mark.parametrize("n_nets", [1, 2])
@pytest.mark.parametrize("resrouting", list(RESROUTING))
def test_bfloat16_compute_only_rounds_the_float32_values_and_gradients(
    resrouting, n_nets, strategy, block_precision, device
):
    """Mixed precision (train_precision="bfloat16"): on the same stored routes, outputs and every gradient are
    the float32 ones up to bfloat16 rounding (8 bits of mantissa: ~0.4 % per operation), outputs and gradients
    come back in float32, and the float32 path is untouched (compute_dtype=float32 is the plain path). Both with
    the routed block's default precision (float32 on a CPU) and with the block in bfloat16 too."""
    enabled, shortcut = RESROUTING[resrouting]
    net = small_net(shortcut=shortcut, n_nets=n_nets, n_modules=8).to(device)
    use_block_strategy(net, strategy)
    net.block_workspace.reduced_precision = True if block_precision == "reduced" else None
    state, task_ids = inputs(batch=64, dtype=th.float32, device=device)
    with th.no_grad():
        stored = net.graph.encode(net(state, task_ids)[1])  # TopK routes in float32, replayed by both
    request = RouteRequest(stored=stored, resrouting=enabled)
    upstream = th.randn(n_nets, 64, 5, generator=th.Generator().manual_seed(4)).to(device)

    def run(dtype):
        net.zero_grad(set_to_none=True)
        x = state.clone().requires_grad_(True)
        out, sources = net(x, task_ids, request, compute_dtype=dtype)
        (out * upstream).sum().backward()
        grads = {name: p.grad.clone() for name, p in net.named_parameters()}
        grads["state"] = x.grad.clone()
        return out.detach(), sources, grads

    out32, sources32, grads32 = run(None)
    same_out, _, same_grads = run(th.float32)
    out16, sources16, grads16 = run(th.bfloat16)
    th.testing.assert_close(same_out, out32, rtol=0, atol=0)
    for name in grads32:
        th.testing.assert_close(same_grads[name], grads32[name], rtol=0, atol=0)
    assert th.equal(sources16, sources32)
    assert out16.dtype == th.float32 and all(g.dtype == th.float32 for g in grads16.values())
    assert _relative_error(out16, out32) < 0.02
    # Rounding errors add up backwards through the layers: ~4 % on the last ones, up to ~11 % on the first
    # layer's bias of this small net with sharpened gates; a wrong path (lost mask, cast or gradient) is ~100 %.
    for name, reference in grads32.items():
        if reference.abs().max() > 0:
            assert _relative_error(grads16[name], reference) < 0.15, name
            cosine = th.nn.functional.cosine_similarity(grads16[name].flatten(), reference.flatten(), dim=0)
            assert cosine > 0.99, name


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_routing_gradient_in_float32_where_the_device_lacks_the_bfloat16_kernel(monkeypatch, device):
    """CUDA has no bfloat16 kernel of embedding_bag's per-sample-weights gradient: there the routing weights'
    gradient is computed from float32 copies. With that fallback (forced on the CPU, which has the kernel), the
    gradients are the float32 ones up to bfloat16 rounding, and on the CPU those of the bfloat16 kernel."""
    net = small_net(shortcut="full", n_nets=2, n_modules=8).to(device)
    net.block_workspace.reduced_precision = True  # the block in bfloat16 (on a CPU it is float32 by default)
    state, task_ids = inputs(batch=64, dtype=th.float32, device=device)
    with th.no_grad():
        stored = net.graph.encode(net(state, task_ids)[1])
    request = RouteRequest(stored=stored, resrouting=True)
    upstream = th.randn(2, 64, 5, generator=th.Generator().manual_seed(4)).to(device)
    kernels_missing = dict(block_operators._NO_PER_SAMPLE_DOTS)  # before any patch below

    def grads(compute_dtype: th.dtype | None, fallback: bool) -> dict[str, th.Tensor]:
        missing = {device: (th.bfloat16,)} if fallback else kernels_missing
        monkeypatch.setattr(block_operators, "_NO_PER_SAMPLE_DOTS", missing)
        net.zero_grad(set_to_none=True)
        out, _ = net(state, task_ids, request, compute_dtype=compute_dtype)
        (out * upstream).sum().backward()
        return {name: p.grad.clone() for name, p in net.named_parameters()}

    float32, fallback = grads(None, False), grads(th.bfloat16, True)
    references = [float32] + ([grads(th.bfloat16, False)] if device == "cpu" else [])
    for reference in references:
        for name, want in reference.items():
            assert fallback[name].dtype == th.float32
            if want.abs().max() > 0:
                assert _relative_error(fallback[name], want) < 0.15, name


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_keeps_the_routed_block_in_float32_on_a_cpu(monkeypatch, device):
    """Under mixed precision the routed block computes in bfloat16 on a GPU and in float32 on a CPU (oneDNN builds
    a bfloat16 kernel for every row count the routes produce); ``reduced_precision`` forces either."""
    from d2r_sb3.d2r import network

    seen: list[tuple[th.dtype, th.dtype]] = []
    block = network.routed_block

    def recording_block(x0, w_in, *args, **kwargs):
        seen.append((x0.dtype, w_in.dtype))
        return block(x0, w_in, *args, **kwargs)

    monkeypatch.setattr(network, "routed_block", recording_block)
    net = small_net(n_nets=2, n_modules=8).to(device)
    state, task_ids = inputs(batch=16, dtype=th.float32, device=device)
    expected = {None: th.float32 if device == "cpu" else th.bfloat16, True: th.bfloat16, False: th.float32}
    for reduced, dtype in expected.items():
        net.block_workspace.reduced_precision = reduced
        seen.clear()
        out, _ = net(state, task_ids, compute_dtype=th.bfloat16)
        assert seen == [(dtype, dtype)], reduced
        assert out.dtype == th.float32
    assert copy.deepcopy(net.block_workspace).reduced_precision is False  # kept when copied or pickled


def test_bfloat16_training_leaves_acting_in_float32():
    """train_precision changes the five calls of a gradient step only: actions, routes and saved weights are
    those of the float32 policy; the update calls give float32 results."""
    obs_space = spaces.Box(-np.inf, np.inf, (49,), np.float32)
    act_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
    th.manual_seed(0)
    full = D2RPolicy(obs_space, act_space, lambda _: 3e-4, num_tasks=10)
    mixed = D2RPolicy(obs_space, act_space, lambda _: 3e-4, num_tasks=10, train_precision="bfloat16")
    mixed.load_state_dict(full.state_dict())
    assert mixed._get_constructor_parameters()["train_precision"] == "bfloat16"
    assert all(p.dtype == th.float32 for p in mixed.parameters())
    gen = th.Generator().manual_seed(9)
    obs = th.zeros(30, 49)
    obs[:, :39] = th.randn(30, 39, generator=gen)
    obs[th.arange(30), 39 + th.arange(30) % 10] = 1.0
    for batch in (obs[:1], obs):
        np.testing.assert_array_equal(
            mixed.predict(batch.numpy(), deterministic=True)[0],
            full.predict(batch.numpy(), deterministic=True)[0],
        )
    task_ids = obs[:, 39:].argmax(-1)
    actions, log_prob = mixed.target_sample(obs, task_ids)
    assert actions.dtype == log_prob.dtype == th.float32
    q = mixed.q_values(obs, actions, task_ids)
    assert q.dtype == th.float32 and q.shape == (2, 30)
    with pytest.raises(ValueError, match="train_precision"):
        D2RPolicy(obs_space, act_space, lambda _: 3e-4, num_tasks=10, train_precision="float16")


@pytest.mark.parametrize("level", ["module", "layer", "model"])
@pytest.mark.parametrize("routing", ["topk", "hard", "soft"])
def test_compute_skipping_gives_the_dense_outputs(routing, level):
    net = small_net(routing, n_modules=8, routing_level=level, n_layers=4)
    state, task_ids = inputs(batch=6, dtype=th.float32)
    with th.no_grad():
        for batch in (state[:1], state[1:4]):
            ids = task_ids[: len(batch)] if len(batch) == 1 else task_ids[1:4]
            for explore in (False, True):
                request = RouteRequest(explore=explore)
                th.manual_seed(8)
                dense, dense_sources = net(batch, ids, request)
                th.manual_seed(8)
                skipped, sources, computed = skipping.forward_skipping(net, batch, ids, request)
                assert th.equal(sources, dense_sources), (routing, level, explore)
                th.testing.assert_close(skipped, dense, rtol=1e-5, atol=1e-6)
                th.manual_seed(8)
                active = net.routing_path(batch, ids, request).active.flatten(0, -2).any(0)
                assert computed == int(active.sum()) <= net.n_modules


def test_actor_skips_modules_and_acts_like_the_dense_actor():
    obs_space = spaces.Box(-np.inf, np.inf, (49,), np.float32)
    policy = D2RPolicy(obs_space, spaces.Box(-1.0, 1.0, (4,), np.float32), lambda _: 3e-4, num_tasks=10)
    policy.set_training_mode(False)
    gen = th.Generator().manual_seed(9)
    obs = th.zeros(30, 49)
    obs[:, :39] = th.randn(30, 39, generator=gen)
    obs[th.arange(30), 39 + th.arange(30) % 10] = 1.0
    actor = policy.actor
    computed = []
    with th.no_grad():
        for row in obs:
            actor.skip_max_batch = 0
            dense = actor(row[None], deterministic=True)
            dense_route = actor.last_route.clone()
            actor.skip_max_batch = 4
            skipped = actor(row[None], deterministic=True)
            computed.append(actor.last_modules_computed)
            th.testing.assert_close(skipped, dense, rtol=1e-5, atol=1e-6)
            assert th.equal(actor.last_route, dense_route)
    assert computed == policy.route(obs).num_active.tolist()
    assert max(computed) < 16


def test_gpu_strategy_reads_nothing_back_to_the_host(monkeypatch):
    """The losses and backward pass of a D2R step with the GPU (push) strategy never read a tensor on the host.

    Proxy on the CPU for "no device syncs in the training step" (a CUDA graph / torch.compile prerequisite):
    every Python-level read-back is made to fail while the step runs.
    """
    from toy_envs import make_point_reach

    from d2r_sb3 import D2RSAC

    model = D2RSAC(
        "D2RPolicy",
        make_point_reach(4),
        learning_starts=10_000,
        batch_size=64,
        buffer_size=2_000,
        seed=0,
        policy_kwargs=dict(n_modules=6, module_dim=16, encoder_sizes=[32, 32], gate_sizes=[16]),
    )
    collect_only(model, 100)
    data = model.replay_buffer.sample(64)
    for net in model.policy.modules():
        if isinstance(net, RoutedNetwork):  # actor, critics and target critics
            use_block_strategy(net, "push-dense")

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host during the training step")

    # (The dense layers' compiled bias-and-relu pass and the block's compiled passes are for CPU tensors only: a
    # GPU never takes them.)
    monkeypatch.setattr(bias_relu, "applies", lambda out: False)
    monkeypatch.setattr(routed_block, "compiled_pass_threads", lambda like: 0)
    for name in ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(th.Tensor, name, host_read)
    loss, _ = model._combine_task_losses(model._task_losses(data))
    loss.backward()
    monkeypatch.undo()
    grads = [p.grad for p in (*model.actor.parameters(), *model.critic.parameters())]
    assert all(g is not None and th.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("level", ["module", "layer", "model"])
@pytest.mark.parametrize("n_nets", [1, 2])
def test_training_block_computes_each_module_only_for_the_samples_that_reach_it(level, n_nets):
    """The skipping layout holds one row per reached (module, sample) pair, member by member, the reached pairs
    being those of the routing path's ``active`` set, plus padding where a node's members are padded to equal
    slabs; the dense layout holds every pair."""
    from d2r_sb3.d2r.row_layout import build_row_layout, padded_share

    net = small_net("topk", n_nets=n_nets, n_modules=8, routing_level=level, n_layers=4)
    state, task_ids = inputs(batch=40, dtype=th.float32)
    request = RouteRequest(explore=True, resrouting=True)
    with th.no_grad():
        th.manual_seed(5)
        _, logits = net.encode_flat(state, task_ids)
        th.manual_seed(6)
        sources, weights, keep = net.choose_routes(logits, task_ids, request)
        th.manual_seed(6)
        active = net.routing_path(state, task_ids, request).active  # [E, B, n]
    sources = sources.expand(weights.shape)
    layout = build_row_layout(sources, weights, keep, net.plan.is_input, skip=True)
    reached = active.sum(1)  # [E, n]: samples of each member reaching each module
    for node, counts in enumerate(reached.t().tolist()):
        slabs = layout.member_sizes[node]
        waste = n_nets * max(counts) - sum(counts)
        assert slabs == (
            counts if waste > padded_share(th.float32) * n_nets * max(counts) else [max(counts)] * n_nets
        )
    assert layout.member_sizes[-1] == [40] * n_nets and layout.complete[-1]
    if level == "module":  # (with 2 of 2 sources per node, the layer and model levels reach every module)
        assert layout.starts[8] < n_nets * 8 * 40, "some module must be skipped for some sample"
    for node in range(8):
        rows = layout.node_rows(node)
        real = layout.grid_of_row[rows] < n_nets * 40 * 9  # padding rows point one past the grid
        grid = layout.grid_of_row[rows][real]
        samples, nodes = grid // 9, grid % 9
        assert th.all(nodes == node)
        expected = th.nonzero(active[:, :, node].reshape(-1)).flatten()
        assert th.equal(samples, expected), node  # member by member, in sample order
    dense = build_row_layout(sources, weights, keep, net.plan.is_input, skip=False)
    assert dense.member_sizes == [[40] * n_nets] * 9 and dense.dense and all(dense.complete)
    # Each real row of the skipping layout carries what the dense layout's row of the same (node, sample) carries:
    # sources (as the same pairs), routing weights (bit for bit, also as bfloat16, which the host-side gathers
    # move as raw bits) and masks; padding rows read row 0 with weight 0.
    for dtype in (th.float32, th.bfloat16):
        skipping = build_row_layout(sources, weights.to(dtype), keep, net.plan.is_input, True, dtype)
        full = build_row_layout(sources, weights.to(dtype), keep, net.plan.is_input, False, dtype)
        dense_row = th.empty_like(full.grid_of_row)
        dense_row[full.grid_of_row] = th.arange(len(dense_row))
        real = skipping.grid_of_row < n_nets * 40 * 9
        same = dense_row[skipping.grid_of_row[real]]
        assert skipping.entry_weights.dtype == dtype
        assert th.equal(skipping.entry_weights[real], full.entry_weights[same])
        assert th.equal(skipping.entry_keep[real], full.entry_keep[same])
        assert th.equal(
            skipping.grid_of_row[skipping.entry_rows[real]], full.grid_of_row[full.entry_rows[same]]
        )
        assert th.equal(skipping.sample_of_row[real], full.sample_of_row[same])
        assert not skipping.entry_weights[~real].any() and not skipping.entry_rows[~real].any()
    # One forward on each layout gives the same output.
    x0 = th.relu(th.randn(n_nets, 40, 20))
    params = (net.w_in.detach(), net.b_in.detach(), net.w_hid.detach(), net.b_hid.detach())
    from d2r_sb3.d2r.routed_block import run_nodes

    y_skip, _ = run_nodes(x0, *params, layout, net.plan)
    y_dense, _ = run_nodes(x0, *params, dense, net.plan)
    th.testing.assert_close(y_skip, y_dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", ["module", "model"])
@pytest.mark.parametrize("skip", [True, False], ids=["skipping", "dense"])
@pytest.mark.parametrize("n_nets", [1, 2])
def test_the_compiled_forward_is_the_operators_bit_for_bit(n_nets, skip, level, threads, monkeypatch):
    """The routed block's forward as one compiled call (torch's BLAS from numba) gives the outputs, module outputs
    and the saved relu outputs and inputs of the operator version, bit for bit in float32 on one thread: member slabs
    of equal and unequal sizes, input modules some samples do not reach (model-level routing), slabs large enough to
    be split between two threads; and the same output when nothing is saved (the no-gradient path).

    On two threads the two agree to float32 rounding: there MKL's AVX2 kernels (an AVX2-only CPU, or
    MKL_ENABLE_INSTRUCTIONS=AVX2) sum some rows of a product in another order depending on how it is called (torch's
    batched product, weights given transposed, the compiled loop's one call per member): a few rows 1-4 units in the
    last place apart. Its AVX-512 kernels happen to agree bit for bit."""

    def same(got: th.Tensor, want: th.Tensor) -> None:
        if threads == 1:
            assert th.equal(got, want)
        else:
            th.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    from d2r_sb3.d2r.block_operators import slot_views
    from d2r_sb3.d2r.routed_block import SavedActivations, run_nodes
    from d2r_sb3.d2r.row_layout import build_row_layout

    kwargs = {"routing_level": "model", "n_layers": 2} if level == "model" else {}
    th.manual_seed(0)
    net = RoutedNetwork(
        12, 3, 5, n_nets=n_nets, n_modules=8, module_dim=128, encoder_sizes=(24, 20), **kwargs
    )
    state, task_ids = inputs(batch=300, dtype=th.float32)
    with th.no_grad():
        th.manual_seed(5)
        _, logits = net.encode_flat(state, task_ids)
        sources, weights, keep = net.choose_routes(
            logits, task_ids, RouteRequest(explore=True, resrouting=True)
        )
    layout = build_row_layout(sources.expand(weights.shape), weights, keep, net.plan.is_input, skip=skip)
    if skip and n_nets == 2:
        assert any(len(set(sizes)) > 1 for sizes in layout.member_sizes), "some node must have unequal slabs"
    if level == "model" and skip:
        assert not all(layout.complete[: len(net.plan.is_input)]), "some input module must be partly reached"
    x0 = th.relu(th.randn(n_nets, 300, 20, generator=th.Generator().manual_seed(7)))
    params = (net.w_in.detach(), net.b_in.detach(), net.w_hid.detach(), net.b_hid.detach())
    results = []
    for compiled_loop in (True, False):
        if not compiled_loop:
            monkeypatch.setattr(routed_block, "gemm_for", lambda like: 0)
        saved = SavedActivations()
        y, outputs = run_nodes(x0, *params, layout, net.plan, saved=saved)
        y_no_grad, _ = run_nodes(x0, *params, layout, net.plan)
        results.append((y, outputs, saved, y_no_grad))
        # weight matrices given as views with other strides: the same values
        strided = [p.transpose(-1, -2).contiguous().transpose(-1, -2) if p.dim() == 4 else p for p in params]
        same(run_nodes(x0, *strided, layout, net.plan)[0], y_no_grad)
    (y, outputs, saved, y_no_grad), (y_ops, outputs_ops, saved_ops, y_no_grad_ops) = results
    same(y, y_ops)
    same(outputs, outputs_ops)
    same(y_no_grad, y_no_grad_ops)
    assert th.equal(y_no_grad, y)
    assert saved.rows is not None and saved_ops.rows is None
    hidden_by_slot, inputs_by_slot = slot_views(*saved.rows, layout, net.plan)
    for got, want in zip(
        [*hidden_by_slot, *inputs_by_slot], [*saved_ops.hidden, *saved_ops.inputs], strict=True
    ):
        same(got, want)
    assert len(hidden_by_slot) == net.w_hid.shape[1]


@pytest.mark.parametrize("resrouting", list(RESROUTING))
@pytest.mark.parametrize("level", ["module", "model"])
@pytest.mark.parametrize("skip", [True, False], ids=["skipping", "dense"])
@pytest.mark.parametrize("n_nets", [1, 2])
def test_the_compiled_backward_gives_the_operators_gradients(
    n_nets, skip, level, resrouting, threads, monkeypatch
):
    """The routed block's backward loop as one compiled call gives the gradients of the operator loop (which the
    reference tests hold to the paper's equations): every parameter, the state and the routing weights (through
    the gate), in float64 to rounding. Model-level routing has four input modules, reached by some samples only
    when skipping (their ``dL/dx0`` shares added row by row) and by all in the dense layout (added by products)."""
    use_rr, shortcut = RESROUTING[resrouting]
    kwargs = {"routing_level": "model", "n_layers": 2} if level == "model" else {}
    results = []
    for compiled_loop in (True, False):
        if not compiled_loop:
            monkeypatch.setattr(routed_block, "gemm_for", lambda like: 0)
        net = small_net("topk", shortcut, n_nets, n_modules=8, **kwargs).double()
        use_block_strategy(net, f"pull-{'skip' if skip else 'dense'}")
        state, task_ids = inputs(batch=150)
        state.requires_grad_(True)
        th.manual_seed(3)
        out, _ = net(state, task_ids, RouteRequest(explore=True, resrouting=use_rr))
        upstream = th.randn(out.shape, generator=th.Generator().manual_seed(4), dtype=out.dtype)
        (out * upstream).sum().backward()
        results.append({"state": state.grad, **{name: p.grad for name, p in net.named_parameters()}})
    compiled_grads, operator_grads = results
    for name, grad in operator_grads.items():
        th.testing.assert_close(compiled_grads[name], grad, rtol=1e-12, atol=1e-14, msg=f"gradient of {name}")


@pytest.mark.parametrize("backward", ["pull", "push"])
@pytest.mark.parametrize("n_nets", [1, 2])
def test_input_modules_some_samples_do_not_reach_get_the_dense_gradients(backward, n_nets):
    """Model-level routing with four chains of two, of which the output reads two: each chain's input module is
    reached by some samples only, so skipping gathers ``x0`` for it and scatters its gradient back. Outputs and
    gradients equal those of the dense layout, where every input module runs on every sample. (The reference
    implementation states module-level routing only.)"""
    results = []
    for skip in (True, False):
        net = small_net("topk", "full", n_nets, n_modules=8, routing_level="model", n_layers=2).double()
        use_block_strategy(net, f"{backward}-{'skip' if skip else 'dense'}")
        state, task_ids = inputs(batch=23)
        state.requires_grad_(True)
        request = RouteRequest(explore=True, resrouting=True)
        if skip:
            with th.no_grad():
                th.manual_seed(3)
                active = net.routing_path(state, task_ids, request).active  # [E, B, n]
            chain_starts = active[..., ::2].reshape(-1, 4)
            assert (~chain_starts).any() and chain_starts.any(0).all(), "every input module partly reached"
        th.manual_seed(3)
        out, _ = net(state, task_ids, request)
        upstream = th.randn(out.shape, generator=th.Generator().manual_seed(4), dtype=out.dtype)
        (out * upstream).sum().backward()
        grads = {name: p.grad for name, p in net.named_parameters()}
        results.append((out.detach(), state.grad, grads))
    (out_skip, state_skip, grads_skip), (out_dense, state_dense, grads_dense) = results
    th.testing.assert_close(out_skip, out_dense, rtol=1e-12, atol=1e-13)
    th.testing.assert_close(state_skip, state_dense, rtol=1e-10, atol=1e-12)
    for name, grad in grads_dense.items():
        th.testing.assert_close(grads_skip[name], grad, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_twin_members_with_far_apart_counts_get_exact_slabs_and_close_ones_padded_slabs():
    """Hand-made routes of two members (module 0 reads the state, 1 reads 0, 2 reads 0 and 1; the output node reads
    two slots): member 0 reaches every module with all 64 samples; member 1 reaches module 1 with 63 and module 2
    with 2. Module 1's slabs are padded to 64 + 64 (one padding row), module 2's are exact (64 + 2): one product
    per member. Values and every gradient equal those of the dense layout, in float64."""
    from d2r_sb3.d2r.routed_block import BlockPlan, BlockWorkspace, routed_block
    from d2r_sb3.d2r.row_layout import build_row_layout

    ens, batch, din, dim = 2, 64, 5, 6
    sources = th.zeros(ens, batch, 4, 2, dtype=th.long)
    weights = th.zeros(ens, batch, 4, 2, dtype=th.float64)
    sources[:, :, 2] = th.tensor([0, 1])  # module 2 reads modules 0 and 1
    weights[:, :, 1, 0], weights[:, :, 2] = 1.0, th.tensor([0.3, 0.7], dtype=th.float64)
    sources[0, :, 3], weights[0, :, 3] = th.tensor([2, 1]), th.tensor([0.6, 0.4], dtype=th.float64)
    sources[1, 0, 3], weights[1, 0, 3, 0] = 0, 1.0  # sample 0 reads module 0 only
    sources[1, 1:3, 3, 0], weights[1, 1:3, 3, 0] = 2, 1.0  # samples 1-2: module 2 (and through it module 1)
    sources[1, 3:, 3, 0], weights[1, 3:, 3, 0] = 1, 1.0  # samples 3-63: module 1
    plan = BlockPlan(is_input=(True, False, False), param_index=(0, 0, 1), masked_shortcut=False)
    keep = th.rand(ens, batch, 4, 2, generator=th.Generator().manual_seed(0)) < 0.7

    layout = build_row_layout(sources, weights, keep, plan.is_input, skip=True, compute_dtype=th.float64)
    assert layout.member_sizes == [[64, 64], [64, 64], [64, 2], [64, 64]]
    assert (layout.grid_of_row[layout.node_rows(1)] == ens * batch * 4).sum() == 1  # module 1's padding row
    # With 6 of 64 samples fewer (5 % padding) module 1 is padded for bfloat16 products, not for float32 ones.
    fewer = sources.clone()
    fewer[1, 59:, 3, 0] = 0
    assert build_row_layout(fewer, weights, keep, plan.is_input, True, th.float32).member_sizes[1] == [64, 58]
    assert build_row_layout(fewer, weights, keep, plan.is_input, True, th.bfloat16).member_sizes[1] == [
        64,
        64,
    ]

    gen = th.Generator().manual_seed(1)
    params = [
        th.randn(shape, generator=gen, dtype=th.float64)
        for shape in ((ens, batch, din), (ens, 1, dim, din), (ens, 1, dim), (ens, 2, dim, dim), (ens, 2, dim))
    ]
    upstream = th.randn(ens, batch, dim, generator=gen, dtype=th.float64)
    results = []
    for skip in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (*params, weights)]
        workspace = BlockWorkspace(plan, skip_unreached=skip)
        y = routed_block(*leaves, sources, keep, workspace)
        (y * upstream).sum().backward()
        results.append([y.detach(), *(t.grad for t in leaves)])
    for skipped, dense in zip(*results, strict=True):
        th.testing.assert_close(skipped, dense, rtol=1e-12, atol=1e-13)


def _two_calls_and_pair(net: RoutedNetwork, routes, dtype, compute_dtype=None):
    """Outputs and gradients (parameters, both states) of ``forward`` twice (the second with detached parameters)
    and of one ``forward_pair``, from the same SampleK draws and upstream gradients."""
    (route, frozen_route), results = routes, []
    device = next(net.parameters()).device
    state, task_ids = inputs(dtype=dtype, device=device)
    frozen_state, frozen_task_ids = inputs(batch=13, dtype=dtype, seed=5, device=device)
    for paired in (False, True):
        net.zero_grad(set_to_none=True)
        a, b = state.clone().requires_grad_(True), frozen_state.clone().requires_grad_(True)
        th.manual_seed(3)
        if paired:
            out, frozen_out = net.forward_pair(
                a, task_ids, route, b, frozen_task_ids, frozen_route, compute_dtype
            )
        else:
            out = net(a, task_ids, route, compute_dtype=compute_dtype)[0]
            frozen_out = net(
                b, frozen_task_ids, frozen_route, detach_params=True, compute_dtype=compute_dtype
            )[0]
        gen = th.Generator().manual_seed(4)
        upstream = th.randn(out.shape, generator=gen, dtype=th.float64).to(device, out.dtype)
        frozen_upstream = th.randn(frozen_out.shape, generator=gen, dtype=th.float64).to(device, out.dtype)
        loss = (out * upstream).sum() + (frozen_out * frozen_upstream).sum()
        loss.backward()
        grads = {name: p.grad.double() for name, p in net.named_parameters() if p.grad is not None}
        results.append((out.double(), frozen_out.double(), a.grad.double(), b.grad.double(), grads))
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("explores", ["trained", "frozen", "trained, frozen without ResRouting"])
@pytest.mark.parametrize("strategy", BLOCK_STRATEGIES)
@pytest.mark.parametrize("resrouting", list(RESROUTING))
@pytest.mark.parametrize("routing", ["topk", "hard", "soft"])
def test_one_pass_over_two_batches_equals_a_trained_and_a_frozen_call(
    routing, resrouting, strategy, explores, device
):
    """The critics' TD-regression call (SampleK routes, trains the critics) and actor-loss call (TopK routes,
    critics frozen: gradient reaches the actions only) as one pass: the same values and gradients, whichever batch
    explores, and with ResRouting in one batch only."""
    use_rr, shortcut = RESROUTING[resrouting]
    net = small_net(routing, shortcut, n_nets=2).double().to(device)
    use_block_strategy(net, strategy)
    sample, top = RouteRequest(explore=True, resrouting=use_rr), RouteRequest(resrouting=use_rr)
    routes = {
        "trained": (sample, top),
        "frozen": (top, sample),
        "trained, frozen without ResRouting": (sample, RouteRequest()),
    }[explores]
    (out, frozen, ga, gb, grads), (p_out, p_frozen, p_ga, p_gb, p_grads) = _two_calls_and_pair(
        net, routes, th.float64
    )
    close = dict(rtol=1e-10, atol=1e-12)
    th.testing.assert_close(p_out, out, **close)
    th.testing.assert_close(p_frozen, frozen, **close)
    th.testing.assert_close(p_ga, ga, **close)
    th.testing.assert_close(p_gb, gb, **close)
    assert p_grads.keys() == grads.keys()
    for name in grads:
        th.testing.assert_close(p_grads[name], grads[name], **close, msg=f"gradient of {name}")
    # (The frozen batch's loss does move its inputs: a pass that let it train the parameters would differ above.)
    assert gb.abs().sum() > 0


@pytest.mark.parametrize("needs_grad", ["actor-loss actions", "both actions", "observations too"])
def test_critics_pair_gives_exactly_the_inputs_that_need_one_their_gradient(needs_grad):
    """``D2RCritic.q_values_pair`` computes the first layer's input gradient only where an input needs one (the
    actor loss's actions, not the observations or the replayed actions): values and the gradients of the
    parameters, actions and observations equal the two separate critic calls'."""
    th.manual_seed(0)
    critic = D2RCritic(
        11, 4, 3, n_critics=2, n_modules=7, module_dim=16, encoder_sizes=(24, 20), gate_sizes=(18,)
    ).double()
    gen = th.Generator().manual_seed(6)
    obs_value, actions_value, frozen_value = (
        th.randn(19, d, generator=gen, dtype=th.float64) for d in (11, 4, 4)
    )
    task_ids = th.randint(0, 3, (19,), generator=gen)
    upstream = th.randn(2, 2, 19, generator=gen, dtype=th.float64)
    sample, top = RouteRequest(explore=True, resrouting=True), RouteRequest(resrouting=True)
    results = []
    for paired in (False, True):
        critic.zero_grad(set_to_none=True)
        obs = obs_value.clone().requires_grad_(needs_grad == "observations too")
        actions = actions_value.clone().requires_grad_(needs_grad != "actor-loss actions")
        frozen = frozen_value.clone().requires_grad_(True)
        th.manual_seed(3)
        if paired:
            q, frozen_q = critic.q_values_pair(obs, actions, frozen, task_ids, sample, top)
        else:
            q = critic.q_values(obs, actions, task_ids, sample)
            frozen_q = critic.q_values(obs, frozen, task_ids, top, detach_params=True)
        ((q * upstream[0]).sum() + (frozen_q * upstream[1]).sum()).backward()
        inputs = [t.grad for t in (obs, actions) if t.requires_grad]
        results.append((q, frozen_q, frozen.grad, *inputs, *(p.grad for p in critic.parameters())))
    for got, want in zip(results[1], results[0], strict=True):
        th.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert results[1][2].abs().min() > 0  # (every action of the actor loss moves its Q values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute_dtype", [None, th.bfloat16])
def test_one_pass_over_two_batches_in_float32_and_bfloat16_matches_the_two_calls(compute_dtype, device):
    net = small_net("topk", "full", n_nets=2).to(device)
    routes = (RouteRequest(explore=True, resrouting=True), RouteRequest(resrouting=True))
    first, paired = _two_calls_and_pair(net, routes, th.float32, compute_dtype)
    # bfloat16 products of 32 instead of 19 rows may round differently; float32 agrees to its precision.
    tol = dict(rtol=2e-2, atol=2e-2) if compute_dtype is not None else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(paired[:4], first[:4], strict=True):
        th.testing.assert_close(got, want, **tol)
    for name in first[4]:
        th.testing.assert_close(paired[4][name], first[4][name], **tol, msg=f"gradient of {name}")
