"""Test-suite settings and the fixtures that several test files share (plain helpers are in ``helpers.py``).

Tests use small networks and batches, for which one torch thread is as fast as two and far more robust when
several processes share the machine's cores (OpenMP threads spin while waiting). Set D2R_TEST_THREADS to
override.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch as th

th.set_num_threads(int(os.environ.get("D2R_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _settings_left_as_found() -> Iterator[None]:
    """Fail a test that leaves torch's thread count or the CPU-products choice changed (and put them back): the
    tests after it in the same worker would compute with other kernels, so a learning test's float32 trajectory
    would depend on the order the workers happen to run the tests in."""
    from d2r_sb3.common import cpu_products

    threads, choice, resolved = th.get_num_threads(), cpu_products._choice, cpu_products._resolved
    yield
    left = []
    if th.get_num_threads() != threads:
        left.append(f"torch's thread count {th.get_num_threads()} (was {threads})")
        th.set_num_threads(threads)
    # (the resolved choice is decided on first use: from None it may change)
    if cpu_products._choice != choice or (resolved is not None and cpu_products._resolved != resolved):
        left.append(
            f"the CPU products {cpu_products._choice!r}/{cpu_products._resolved} (were {choice!r}/{resolved})"
        )
        cpu_products._choice, cpu_products._resolved = choice, resolved
    if left:
        pytest.fail("the test left " + " and ".join(left) + " changed", pytrace=False)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """No network for the Hugging Face Hub and an empty cache: what a machine without the Hub sees."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty_hf_cache")))
    yield constants


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module whose tests run the zoo's commands in-process (``--num-threads`` sets the
    process-wide count); the count before is restored afterwards."""
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch (and so the compiled passes that follow its thread count) on one thread, then on two, where they split
    large tensors among threads; skipped where numba's parallel loops cannot use that many."""
    from d2r_sb3.common.host_loops import loop_threads

    before = th.get_num_threads()
    if loop_threads(request.param) != request.param:
        pytest.skip(f"numba's parallel loops cannot use {request.param} threads here")
    th.set_num_threads(request.param)
    yield request.param
    th.set_num_threads(before)


@pytest.fixture
def products(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The :mod:`~d2r_sb3.common.cpu_products` module, with a choice of this test only: unset at the start (no
    ``D2R_SB3_CPU_PRODUCTS``), restored afterwards."""
    from d2r_sb3.common import cpu_products

    monkeypatch.setattr(cpu_products, "_choice", None)
    monkeypatch.setattr(cpu_products, "_resolved", None)
    monkeypatch.delenv("D2R_SB3_CPU_PRODUCTS", raising=False)
    return cpu_products


# The files in order of their time, longest first (measured: 197, 124, 88, 64, 63, 57, 51, 32, 21, 19, 17, 14, 13
# and 11 s of one 2-core run): the parallel workers take files in collection order, and a long file started last
# would leave one worker running alone at the end. The files not named here take under 10 s each.
LONG_FILES_FIRST = (
    "test_durability.py",
    "test_sweep.py",
    "test_d2rsac.py",
    "test_zoo.py",
    "test_analysis.py",
    "test_envs.py",
    "test_baselines.py",
    "test_field_baselines_learning.py",
    "test_hub.py",
    "test_warm_start.py",
    "test_examples.py",
    "test_benchmarks.py",
    "test_validation.py",
    "test_memory.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order
