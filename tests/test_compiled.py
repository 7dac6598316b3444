"""The compiled host-side loops (:mod:`d2r_sb3.d2r.compiled`) against the versions they replaced.

* The routed block's bookkeeping against the numpy array versions, kept here as the reference: the same arrays,
  element for element, for random routes of every kind (one or two ensemble members, 1 to 3 slots, extra input
  modules, ResRouting masks or none, both shortcuts, trained rows, float and 16-bit weights).
* The route choice (sources, logit positions, ResRouting masks) and MaskSoftmax against the tensor operations that
  still run off the CPU: the same routes for every routing graph, top-k, SampleK and stored routes, ties included;
  the same weights and logit gradients up to rounding.
* Each on one thread and split among two (numba's parallel loops, where torch runs on two threads).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th

import d2r_sb3
from d2r_sb3.common.host_loops import CACHE_LOCK_NAME
from d2r_sb3.d2r import compiled
from d2r_sb3.d2r.block_edges import PullGraph, routed_rows
from d2r_sb3.d2r.network import RoutedNetwork, _GateInputsFunction, _MaskSoftmaxFunction
from d2r_sb3.d2r.routing import RoutingGraph
from d2r_sb3.d2r.row_layout import BlockPlan, RowLayout, build_row_layout, host_array, padded_share


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def torch_threads(request):
    """torch on one thread, then on two, where the compiled loops split their work among both."""
    threads = request.param
    before = th.get_num_threads()
    if compiled.loop_threads(threads) != threads:
        pytest.skip(f"numba's parallel loops cannot use {threads} threads here (threading layer or cores)")
    th.set_num_threads(threads)
    yield threads
    th.set_num_threads(before)


def reference_layout(
    sources: np.ndarray,
    weights: np.ndarray,
    keep: np.ndarray | None,
    is_input: tuple[bool, ...],
    share: float,
    trained_rows: int | None,
) -> dict:
    """The skipping layout's arrays as numpy array operations (the former implementation)."""
    ens, batch, nodes, slots = sources.shape
    n_samples = ens * batch
    grid_size = n_samples * nodes
    position = sources.reshape(n_samples, nodes, slots) * n_samples + np.arange(n_samples).reshape(-1, 1, 1)
    reached = np.zeros((nodes, n_samples), dtype=bool)
    reached[-1] = True
    flat = reached.reshape(-1)
    for node in range(nodes - 1, -1, -1):
        if node < nodes - 1 and is_input[node]:
            continue
        flat[position[reached[node], node].ravel()] = True
    counts = reached.reshape(nodes, ens, batch).sum(-1)
    largest = counts.max(1, keepdims=True)
    padded = ens * largest - counts.sum(1, keepdims=True) <= share * ens * largest
    slabs = np.where(padded, largest, counts)
    starts = [0, *np.cumsum(slabs.sum(1)).tolist()]
    member_start = (np.cumsum(slabs, 1) - slabs).reshape(nodes, ens, 1)
    rank = reached.reshape(nodes, ens, batch).cumsum(-1) - 1
    row_of = (np.asarray(starts[:-1]).reshape(nodes, 1, 1) + member_start + rank).reshape(-1)
    pairs = np.flatnonzero(reached)
    grid_of_row = np.full(starts[-1], grid_size, dtype=np.int64)
    grid_of_row[row_of[pairs]] = pairs % n_samples * nodes + pairs // n_samples

    def per_row(values: np.ndarray) -> np.ndarray:
        values = values.reshape(-1, slots)
        return np.concatenate([values, np.zeros((1, slots), dtype=values.dtype)])[grid_of_row]

    return {
        "member_sizes": slabs.tolist(),
        "complete": (counts.min(1) == batch).tolist(),
        "starts": starts,
        "entry_rows": per_row(row_of[position.reshape(grid_size, slots)]),
        "entry_weights": per_row(weights),
        "entry_keep": per_row(keep) if keep is not None else None,
        "grid_of_row": grid_of_row,
        "sample_of_row": grid_of_row // nodes % n_samples,
        "trained_sizes": None
        if trained_rows is None
        else reached.reshape(nodes, ens, batch)[..., :trained_rows].sum(-1).tolist(),
    }


def reference_edge_bags(layout: RowLayout, plan: BlockPlan, reader: np.ndarray) -> tuple[np.ndarray, ...]:
    """The pull graph's entry rows, weights, bag starts ``[sources, bags]`` and the grid positions of the last
    bag's entries (-1 elsewhere) as numpy array operations (the former implementation: a stable sort of the edges by
    source row)."""
    n_sources = layout.starts[len(plan.is_input)]
    slots = layout.entry_rows.shape[-1]
    source = host_array(layout.entry_rows)[reader].reshape(-1)
    order = np.argsort(source, kind="stable")
    bag_key = source[order]
    counts = np.bincount(bag_key, minlength=n_sources)
    starts = np.cumsum(counts) - counts
    main_row = np.repeat(reader, slots)[order]
    p = host_array(layout.entry_weights)[reader].reshape(-1)
    grid = (host_array(layout.grid_of_row)[reader][:, None] * slots + np.arange(slots)).reshape(-1)[order]
    if layout.entry_keep is None:
        return main_row, p[order], starts.reshape(-1, 1), grid
    kept = host_array(layout.entry_keep)[reader].reshape(-1)
    if not plan.masked_shortcut:
        full_rows, full_weights = np.where(kept[order], main_row, main_row + layout.n_rows), p
    else:
        full_rows, full_weights = main_row, np.where(kept, p, 0)
    n_edges = len(order)
    at_f = np.arange(n_edges) + starts[bag_key]
    at_t = at_f + counts[bag_key]
    rows = np.empty(2 * n_edges, dtype=np.int64)
    rows[at_f], rows[at_t] = full_rows, main_row
    picked = np.empty(2 * n_edges, dtype=np.int64)
    picked[at_f], picked[at_t] = order, order + n_edges
    grid_slots = np.full(2 * n_edges, -1)
    grid_slots[at_t] = grid
    bag_starts = np.stack([2 * starts, 2 * starts + counts], -1)
    return rows, np.concatenate([full_weights, p])[picked], bag_starts, grid_slots


def random_routes(seed: int) -> tuple:
    """Routes of a random block: ``(sources, weights, keep, is_input, trained_rows)`` (``[E, B, n + 1, C]`` each).
    Node ``i`` reads earlier modules; input nodes read module 0 (their slots are not edges)."""
    rng = np.random.default_rng(seed)
    ens, batch = int(rng.integers(1, 3)), int(rng.integers(1, 50))
    n, slots = int(rng.integers(2, 18)), int(rng.integers(1, 4))
    is_input = tuple(i == 0 or (i < 3 and bool(rng.random() < 0.3)) for i in range(n))
    sources = np.zeros((ens, batch, n + 1, slots), dtype=np.int64)
    for node in range(1, n + 1):
        if node == n or not is_input[node]:
            sources[:, :, node] = rng.integers(0, node, (ens, batch, slots))
    weights = rng.random(sources.shape)
    keep = rng.random(sources.shape) < 0.5 if seed % 3 else None
    trained_rows = None if seed % 4 else int(rng.integers(0, batch + 1))
    return th.from_numpy(sources), th.from_numpy(weights), keep, is_input, trained_rows


@pytest.mark.parametrize("dtype", [th.float32, th.float64, th.bfloat16, th.float16])
@pytest.mark.parametrize("seed", range(40))
def test_the_compiled_layout_is_the_array_versions(seed, dtype):
    sources, weights, keep, is_input, trained_rows = random_routes(seed)
    weights = weights.to(dtype)
    keep_tensor = th.from_numpy(keep) if keep is not None else None
    layout = build_row_layout(sources, weights, keep_tensor, is_input, True, dtype, trained_rows)
    expected = reference_layout(
        sources.numpy(), host_array(weights), keep, is_input, padded_share(dtype), trained_rows
    )
    assert not layout.dense
    assert layout.entry_weights.dtype == dtype
    for name, value in expected.items():
        got = getattr(layout, name)
        if isinstance(got, th.Tensor):
            assert np.array_equal(host_array(got), value), name
        else:
            assert got == value, name


@pytest.mark.parametrize("masked_shortcut", [False, True])
@pytest.mark.parametrize("dtype", [th.float32, th.bfloat16])
@pytest.mark.parametrize("seed", range(30))
def test_the_compiled_edge_bags_are_the_array_versions(seed, dtype, masked_shortcut):
    """Both layouts (skipping and dense), with and without ResRouting, both shortcuts; the entries, bags and the
    routing-weight grid positions the pulls write their dot products to."""
    sources, weights, keep, is_input, _ = random_routes(seed)
    n = len(is_input)
    plan = BlockPlan(is_input, tuple(range(n)), masked_shortcut)
    keep_tensor = th.from_numpy(keep) if keep is not None else None
    layout = build_row_layout(sources, weights.to(dtype), keep_tensor, is_input, bool(seed % 2), dtype)
    _, reader = routed_rows(layout, plan, th.device("cpu"))
    graph = PullGraph(layout, plan, reader)
    rows, entry_weights, starts, grid_slots = reference_edge_bags(layout, plan, reader)
    segment = np.append(starts[:, 0], len(rows))[layout.starts[: n + 1]]
    sizes = np.diff(segment).tolist()
    assert graph.pairs == starts.shape[1]
    assert [len(part) for part in graph.rows] == sizes
    assert np.array_equal(th.cat(graph.rows).numpy(), rows)
    assert np.array_equal(host_array(th.cat(graph.weights)), entry_weights)
    assert np.array_equal(graph.edge_grid_slots, grid_slots)
    offsets = starts - np.repeat(segment[:-1], layout.block_sizes()[:n])[:, None]
    assert np.array_equal(th.cat(graph.offsets).numpy(), offsets.reshape(-1))


def random_logits(graph: RoutingGraph, ens: int, batch: int, dtype: th.dtype, seed: int) -> th.Tensor:
    """Flat gate logits ``[E, B, L]``; every third seed rounds them to a few values, so that ties are common (not
    with more than two slots: there ``torch.topk`` breaks ties in no set order)."""
    gen = th.Generator().manual_seed(seed)
    logits = (th.randn(ens, batch, graph.num_logits, generator=gen) * 3).to(dtype)
    if seed % 3 == 0 and graph.slots <= 2:
        logits = logits.round().clamp(-2, 2)
    return logits


def both_choices(graph: RoutingGraph, logits: th.Tensor, *args, seed: int = 0) -> tuple[tuple, tuple]:
    """:meth:`RoutingGraph.top_routes` as the compiled loop and as tensor operations, with the same noise."""
    results = []
    for compiled_loop in (True, False):
        th.manual_seed(seed)
        results.append(graph.top_routes(logits, *args, compiled_loop=compiled_loop))
    return results[0], results[1]


GRAPHS = [
    ("module", 16, 2),
    ("module", 7, 1),
    ("module", 7, 3),
    ("layer", 8, 2),
    ("model", 8, 2),
    ("layer", 8, 3),
]


@pytest.mark.parametrize("level, n_modules, top_k", GRAPHS)
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_route_choice_is_the_tensor_version(seed, dtype, level, n_modules, top_k, torch_threads):
    """Sources, logit positions and ResRouting masks, for TopK, SampleK (the same Gumbel noise) and stored routes
    (one set for every member, or one per member), with and without masks."""
    graph = RoutingGraph(n_modules, top_k, "topk", level, n_layers=4 if n_modules % 4 == 0 else 1)
    ens = 1 + seed % 2
    logits = random_logits(
        graph, ens, 601, dtype, seed
    )  # (3 chunks per member: split unevenly on two threads)
    temperature = th.rand(601, generator=th.Generator().manual_seed(seed)) + 0.2
    for explore in (False, True):
        for resrouting in (False, True):
            fast, plain = both_choices(graph, logits, temperature, explore, None, resrouting, seed=seed)
            for got, want in zip(fast, plain, strict=True):
                assert (got is None) == (want is None)
                if got is not None:
                    assert got.shape == want.shape and th.equal(got, want)
    # Stored routes: those of other logits, as [1, B, ...] (shared) or [E, B, ...].
    stored, _, _ = graph.top_routes(random_logits(graph, ens, 601, dtype, seed + 100), None, False)
    for given in (stored[:1], stored):
        fast, plain = both_choices(graph, logits, None, False, given, True)
        for got, want in zip(fast, plain, strict=True):
            assert th.equal(got, want.expand_as(got))


def test_the_compiled_route_choice_breaks_ties_and_nans_as_torch_max():
    """Equal logits: the lower module first; a NaN beats every number (what ``torch.max`` returns)."""
    graph = RoutingGraph(4, 2, "topk")
    logits = th.zeros(1, 3, graph.num_logits)
    node = 4  # the output node: logits 6 ... 9 for modules 0 ... 3
    logits[0, 0, 6:10] = th.tensor([1.0, 3.0, 3.0, 2.0])
    logits[0, 1, 6:10] = th.tensor([1.0, float("nan"), 5.0, float("nan")])
    logits[0, 2, 6:10] = th.tensor([2.0, 2.0, 2.0, 2.0])
    fast, plain = both_choices(graph, logits, None, False)
    assert fast[0][0, :, node].tolist() == [[1, 2], [1, 3], [0, 1]]
    assert th.equal(fast[0], plain[0])


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_the_compiled_mask_softmax_is_the_tensor_version(dtype, top_k, torch_threads):
    """Weights and logit gradients of the compiled MaskSoftmax equal :meth:`RoutedNetwork.mask_softmax`'s up to
    rounding (the compiled one computes in float64), unused slots 0, each routed node's weights summing to 1."""
    net = RoutedNetwork(6, 3, 2, n_nets=2, n_modules=7, top_k=top_k).to(dtype)
    logits = random_logits(net.graph, 2, 201, dtype, 1).requires_grad_()
    _, positions, _ = net.graph.top_routes(logits.detach(), None, False)
    used = net.graph.slots_used_host
    fast = _MaskSoftmaxFunction.apply(logits, positions, used)
    plain = net.mask_softmax(logits, positions)
    tolerance = {"rtol": 2e-7, "atol": 2e-7} if dtype == th.float32 else {"rtol": 1e-15, "atol": 1e-15}
    th.testing.assert_close(fast, plain, **tolerance)
    assert th.equal(fast == 0, plain == 0)
    th.testing.assert_close(fast.sum(-1)[..., 1:], th.ones_like(fast.sum(-1)[..., 1:]), **tolerance)
    grad = th.randn(fast.shape, generator=th.Generator().manual_seed(2), dtype=dtype)
    (fast_grad,) = th.autograd.grad(fast, logits, grad)
    (plain_grad,) = th.autograd.grad(plain, logits, grad)
    # (the float32 tensor version cancels in float32: a few gradients near 0 differ by 1e-7 absolute)
    grad_tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == th.float32 else tolerance
    th.testing.assert_close(fast_grad, plain_grad, **grad_tolerance)


@pytest.mark.parametrize("trained_rows", [None, 50])
@pytest.mark.parametrize("n_nets", [1, 2])
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_the_compiled_gate_inputs_are_the_tensor_version(dtype, n_nets, trained_rows, torch_threads):
    """``relu(f_pre)`` and ``H(task) * f_pre`` bit for bit, and the gradients of ``f_pre`` and of the task
    encoder (only the trained rows train it) to rounding."""
    net = RoutedNetwork(6, 5, 2, n_nets=n_nets, n_modules=5).to(dtype)
    gen = th.Generator().manual_seed(3)
    f_pre = th.randn(n_nets, 81, net.task_encoder.weight.shape[1], generator=gen, dtype=dtype)
    f_pre[0, 0, :3] = 0.0  # the relu's edge
    task_ids = th.randint(0, 5, (81,), generator=gen)
    grads = [th.randn(f_pre.shape, generator=gen, dtype=dtype) for _ in range(2)]
    results = []
    for fast in (True, False):
        net.zero_grad(set_to_none=True)
        leaf = f_pre.clone().requires_grad_()
        weight, bias = net.task_encoder.weight, net.task_encoder.bias
        if fast:
            x0, gated = _GateInputsFunction.apply(leaf, task_ids, weight, bias, trained_rows, torch_threads)
        else:
            x0, gated = th.relu(leaf), net.task_encoder.lookup(task_ids, trained_rows=trained_rows) * leaf
        ((x0 * grads[0]).sum() + (gated * grads[1]).sum()).backward()
        results.append((x0.detach(), gated.detach(), leaf.grad, weight.grad, bias.grad))
    (x0, gated, *fast_grads), (x0_ref, gated_ref, *plain_grads) = results
    assert th.equal(x0, x0_ref) and th.equal(gated, gated_ref)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == th.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for got, want, name in zip(fast_grads, plain_grads, ["f_pre", "weight", "bias"], strict=True):
        th.testing.assert_close(got, want, **tolerance, msg=f"gradient of {name}")


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_the_compiled_weighted_rows_are_embedding_bag_bit_for_bit(dtype, slots, torch_threads):
    """The forward pass's mixed inputs: the sums of ``embedding_bag`` with per-sample weights, on one thread and
    split among two (1,300 rows: enough to be split), bit for bit in float32 (torch's float64 kernel does not fuse
    the multiply-adds: to rounding there); a weight of 0 on a NaN row still gives NaN."""
    gen = th.Generator().manual_seed(5)
    table = th.randn(3000, 24, generator=gen, dtype=dtype)
    table[7, 3] = float("nan")
    rows = th.randint(0, 3000, (1300, slots), generator=gen)
    weights = th.rand(1300, slots, generator=gen, dtype=dtype)
    rows[0, -1], weights[0, -1] = 7, 0.0  # a padding-like entry on the NaN row
    weights[1] = 0.0
    out = th.empty(1300, 24, dtype=dtype)
    compiled.weighted_rows(table.numpy(), rows.numpy(), weights.numpy(), out.numpy(), torch_threads)
    offsets = th.arange(0, 1300 * slots, slots)
    want = th.embedding_bag(table, rows.view(-1), offsets, False, 0, False, weights.view(-1), False, None)[0]
    assert th.equal(out.isnan(), want.isnan()) and out[0, 3].isnan()
    if dtype == th.float32:
        assert th.equal(out.nan_to_num(), want.nan_to_num())
    else:
        th.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=1e-15, atol=1e-15)


def test_without_a_writable_cache_the_loops_still_compile_with_a_warning(tmp_path):
    """A read-only install with no writable home: numba finds nowhere to cache, and the import must not fail."""
    script = """
import warnings
import numba.core.dispatcher as dispatcher

def no_place(self):
    raise RuntimeError("cannot cache function: no locator available")

dispatcher.Dispatcher.enable_caching = no_place
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from d2r_sb3.d2r import compiled
assert any("NUMBA_CACHE_DIR" in str(w.message) for w in caught), [str(w.message) for w in caught]
import numpy as np
sources = np.zeros((2, 3, 2), dtype=np.int64)
out = compiled.skipping_layout(sources, np.ones((2, 3, 2)), np.zeros((0, 0, 0), dtype=bool),
                               np.array([True, False, False]), 0.02, 1, -1)
assert out[2].tolist() == [0, 2, 2, 4], out[2]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


class _CompiledModulesCopy:
    """A package ``d2r_sb3`` in ``folder`` made of the real package's compiled modules only (empty package
    ``__init__`` files, so an import loads numba and, for some, torch, not the whole package), with probe functions
    appended to them; :meth:`run` runs Python code against it in a new process (numba caching in its
    ``__pycache__`` folders)."""

    def __init__(self, folder: Path):
        from d2r_sb3.common.host_loops import COMPILED_MODULES

        self.folder, package = folder, Path(d2r_sb3.__file__).parent
        for name in ("", "common", "d2r"):
            (folder / "d2r_sb3" / name).mkdir(parents=True, exist_ok=True)
            (folder / "d2r_sb3" / name / "__init__.py").write_text("")
        for name in COMPILED_MODULES:
            shutil.copy(package / name, folder / "d2r_sb3" / name)
        self.env = {**os.environ, "PYTHONPATH": str(folder)}
        self.env.pop("NUMBA_CACHE_DIR", None)

    def append(self, module: str, code: str) -> None:
        path = self.folder / "d2r_sb3" / module
        path.write_text(path.read_text() + "\n\n" + code)

    def replace(self, module: str, old: str, new: str) -> None:
        path = self.folder / "d2r_sb3" / module
        path.write_text(path.read_text().replace(old, new))

    def start(self, script: str, *args: str) -> subprocess.Popen:
        command = [sys.executable, "-c", script, *args]
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.folder
        )

    @staticmethod
    def result(process: subprocess.Popen) -> list[str]:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        return out.split()

    def run(self, script: str) -> list[str]:
        return self.result(self.start(script))


def test_a_cached_function_is_compiled_again_when_a_function_it_calls_changes_in_another_module(tmp_path):
    """numba alone re-compiles a cached function only when its own file changes: a caller in another module kept
    running the old code of a changed callee (an edit, a ``git pull`` into an editable install). Here the caller
    sits in bias_relu.py and its callee in host_loops.py."""
    copy = _CompiledModulesCopy(tmp_path)
    copy.append(
        "common/host_loops.py", "@jit\ndef _probe_callee():  # pragma: no cover - compiled\n    return 1\n"
    )
    copy.append(
        "common/bias_relu.py",
        "from d2r_sb3.common.host_loops import _probe_callee  # noqa: E402\n\n\n"
        "@jit\ndef _probe():  # pragma: no cover - compiled\n    return 10 * _probe_callee()\n",
    )
    script = (
        "from d2r_sb3.common.bias_relu import _probe\nprint(_probe(), sum(_probe.stats.cache_hits.values()))"
    )
    assert copy.run(script) == ["10", "0"]  # compiled, cached
    assert copy.run(script) == ["10", "1"]  # loaded from the cache
    copy.replace("common/host_loops.py", "    return 1\n", "    return 2\n")
    # The caller's file did not change: its cached code is renewed all the same.
    assert copy.run(script) == ["20", "0"]


def test_two_processes_caching_two_versions_of_a_function_at_once_leave_each_version_its_own_code(tmp_path):
    """numba saves a cache entry as "read the index, write the index, write the data file". Two processes compiling
    a float and an integer version of one function at the same time (their writes slowed down here to make them
    overlap) left the index naming the first data file for the integer version while that file held the float
    version's code, which a third process then ran for integers. The package's caches take a lock."""
    copy = _CompiledModulesCopy(tmp_path)
    copy.append(
        "common/host_loops.py", "@jit\ndef _probe(x):  # pragma: no cover - compiled\n    return x * 2 + 1\n"
    )
    slowed = """
import sys, time
import numpy as np
import numba.core.caching as caching

index_delay, data_delay = float(sys.argv[1]), float(sys.argv[2])
save_index, save_data = caching.IndexDataCacheFile._save_index, caching.IndexDataCacheFile._save_data
caching.IndexDataCacheFile._save_index = lambda self, *args: (time.sleep(index_delay), save_index(self, *args))
caching.IndexDataCacheFile._save_data = lambda self, *args: (time.sleep(data_delay), save_data(self, *args))
from d2r_sb3.common.host_loops import _probe
print(repr(_probe(np.float32(1.5) if sys.argv[3] == "float" else np.int64(3))))
"""
    # The float process writes its index at 0.5 s and its data at 2 s; unguarded, the integer one read the same
    # empty index and wrote its own (the same data file number) at 1 s: its index, the float version's data.
    processes = [copy.start(slowed, "0.5", "1.5", "float"), copy.start(slowed, "1.0", "0", "int")]
    assert [copy.result(process) for process in processes] == [["4.0"], ["7"]]
    check = (
        "import numpy as np\nfrom d2r_sb3.common.host_loops import _probe\n"
        "print(repr(_probe(np.int64(3))), repr(_probe(np.float32(1.5))), sum(_probe.stats.cache_hits.values()))"
    )
    assert copy.run(check) == ["7", "4.0", "2"]  # both from the cache, each its own code
    assert (tmp_path / "d2r_sb3/common/__pycache__" / CACHE_LOCK_NAME).exists()


def test_whether_a_function_is_in_the_disk_cache_for_this_machine_and_these_sources(tmp_path):
    """cached_on_disk: no before the first compile, yes in the next process, no again after a source change."""
    copy = _CompiledModulesCopy(tmp_path)
    copy.append(
        "common/host_loops.py", "@jit\ndef _probe(x):  # pragma: no cover - compiled\n    return x + 1\n"
    )
    script = (
        "from d2r_sb3.common.host_loops import _probe, cached_on_disk\n"
        "before = cached_on_disk(_probe)\n_probe(1)\nafter = cached_on_disk(_probe)\n"
        "print(before[0], after[0], before[1] == after[1] and after[1].endswith('__pycache__'))"
    )
    assert copy.run(script) == ["False", "True", "True"]
    assert copy.run(script) == ["True", "True", "True"]
    copy.append("d2r/compiled.py", "# edited\n")
    assert copy.run(script) == ["False", "True", "True"]


@pytest.mark.skipif(sys.platform == "win32", reason="file locks with fcntl")
def test_the_cache_lock_is_held_while_numba_writes_and_never_stops_a_read_or_write(tmp_path, monkeypatch):
    """The lock is held (exclusively for writes) while the wrapped method runs; where the lock file cannot be
    opened or the file system has no locks, the method runs all the same."""
    import errno
    import fcntl

    from d2r_sb3.common import host_loops

    lock = tmp_path / CACHE_LOCK_NAME

    def held_elsewhere() -> bool:
        with open(lock, "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    seen = []
    write = host_loops._locked(
        lambda *args: seen.append((args, held_elsewhere())) or "saved", str(lock), True
    )
    assert write(1) == "saved" and seen == [((1,), True)] and not held_elsewhere()
    unopenable = host_loops._locked(lambda: "loaded", str(tmp_path / "absent" / CACHE_LOCK_NAME), False)
    assert unopenable() == "loaded"

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(host_loops.fcntl, "flock", no_locks)
    assert host_loops._locked(lambda: "loaded", str(lock), False)() == "loaded"


def test_a_compiled_function_of_an_unlisted_module_is_refused():
    """A module of the package that compiles functions must be in COMPILED_MODULES (their contents stamp the
    caches); one that is not is named, with the fix."""
    from d2r_sb3.common.host_loops import COMPILED_MODULES, jit

    def probe():  # pragma: no cover - never compiled
        return 1

    probe.__module__ = "d2r_sb3.common.somewhere_new"
    with pytest.raises(ValueError, match="common/somewhere_new.py is not in .*COMPILED_MODULES"):
        jit(probe)
    package = Path(d2r_sb3.__file__).parent
    assert all((package / name).is_file() for name in COMPILED_MODULES)


def test_starting_the_thread_pool_leaves_torchs_thread_count_alone():
    """numba's OpenMP pool sets the calling thread's OpenMP thread count when it starts, where torch reads its own:
    a process on one torch thread must stay on one (a fresh process: the pool starts once)."""
    script = """
import torch
from d2r_sb3.d2r import compiled
torch.set_num_threads(1)
threads = compiled.loop_threads(2)
print(threads, torch.get_num_threads())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loops, torch_threads = map(int, result.stdout.split())
    assert torch_threads == 1, (
        f"torch runs on {torch_threads} threads after the pool started ({loops} for the loops)"
    )


def test_the_loops_stay_serial_in_a_process_forked_after_the_thread_pool_started():
    """GNU OpenMP cannot run in a child forked after its pool started (numba ends such a child): there
    ``loop_threads`` answers 1, so the compiled passes run serially and the child trains on."""
    script = """
import os, sys
import numpy as np
from d2r_sb3.d2r import compiled
threads = compiled.loop_threads(2)
if threads != 2:
    print("no parallel loops here:", threads)
    sys.exit(0)
f_pre = np.random.default_rng(0).random((2, 50, 8)).astype(np.float32)
args = (f_pre, np.zeros(50, dtype=np.int64), np.ones((2, 8, 3), dtype=np.float32), np.ones((2, 8), dtype=np.float32))
parent = compiled.gate_inputs(*args, 2)
pid = os.fork()
if pid == 0:
    child_threads = compiled.loop_threads(2)
    child = compiled.gate_inputs(*args, child_threads)
    os._exit(0 if child_threads == 1 and all(np.array_equal(a, b) for a, b in zip(child, parent)) else 3)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if result.stdout.startswith("no parallel loops"):
        pytest.skip(result.stdout.strip())
    assert result.stdout.strip().endswith("child exit 0"), result.stdout + result.stderr[-2000:]
