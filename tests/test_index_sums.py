"""Sums grouped by an index: equal to the float64 sums, and the same bits on every run (also on a GPU)."""

from __future__ import annotations

import pytest
import torch as th
from helpers import DEVICES

from d2r_sb3.common.index_sums import sum_by_index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "leading, width", [((), None), ((2,), 400)], ids=["per-task-losses", "table-gradient"]
)
def test_sum_by_index_sums_each_group_in_the_same_order_every_time(device, leading, width):
    """Many rows per group, as the per-task loss means over a batch and the task encoder's weight gradient have:
    a GPU's index_add_ (atomics) gives other last bits on every run; these sums must not."""
    gen = th.Generator().manual_seed(0)
    batch, size = 4096, 10
    index = th.randint(0, size - 1, (batch,), generator=gen)  # the last group stays empty: its sum is 0
    values = th.randn(*leading, batch, *([width] if width else []), generator=gen)
    onehot = th.nn.functional.one_hot(index, size).double()
    want = (
        onehot.t() @ values.double() if width is None else th.einsum("bi,ebd->eid", onehot, values.double())
    )

    sums = [sum_by_index(values.to(device), index.to(device), size) for _ in range(3)]
    assert sums[0].shape == want.shape and sums[0].dtype == th.float32 and sums[0].device.type == device
    assert all(th.equal(s, sums[0]) for s in sums[1:])
    th.testing.assert_close(sums[0].cpu().double(), want, rtol=1e-5, atol=1e-4)
    assert (sums[0].cpu()[..., size - 1, :] if width else sums[0].cpu()[size - 1]).abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_value_stays_in_its_group(device):
    """A per-task loss that is inf or NaN makes its own task's sum non-finite, not the others' (the non-finite
    guard names the task)."""
    values = th.arange(8, dtype=th.float32)
    values[2], values[5] = float("inf"), float("nan")
    index = th.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    sums = sum_by_index(values.to(device), index.to(device), 5).cpu()
    assert sums[1] == float("inf") and sums[2].isnan()
    assert sums[[0, 3, 4]].tolist() == [1.0, 13.0, 0.0]
