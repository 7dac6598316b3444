"""Sums of rows grouped by an integer index (per task, per one-hot input), in a fixed order on every device.

``index_add_`` is the fast way on a CPU, where it adds the rows one after another. On a GPU it adds with atomics in
whatever order the threads arrive, so two identical training steps would differ in the last bits of every sum that
collects many rows (a per-task loss mean over a batch, the task encoder's weight gradient). There a vector is summed
by a masked reduction and rows of a matrix by the product with the one-hot matrix of the index, both in a fixed
order. A non-finite value stays in its group, as with ``index_add_`` (a per-task loss names its task), except in the
product, where ``0 * inf`` spreads it to every group of its columns: the callers of that case (weight gradients) only
ask whether the whole result is finite.
"""

from __future__ import annotations

import torch as th

__all__ = ["sum_by_index"]


def sum_by_index(values: th.Tensor, index: th.Tensor, size: int) -> th.Tensor:
    """Sum the rows of ``values`` that share an index: entry ``i`` is the sum over ``b`` with ``index[b] == i``.

    :param values: ``[B]`` or ``[..., B, D]`` (the rows along the second-last dimension, as ``matmul`` takes them).
    :param index: ``[B]`` long, each in ``[0, size)``.
    :param size: number of groups.
    :return: ``[size]`` or ``[..., size, D]``, in ``values``' dtype and device.
    """
    if values.device.type == "cpu":
        dim = 0 if values.dim() == 1 else values.dim() - 2
        shape = list(values.shape)
        shape[dim] = size
        return values.new_zeros(shape).index_add_(dim, index, values)
    # [size, B]; th.nn.functional.one_hot would check the index range, a host sync on a GPU
    in_group = th.arange(size, device=index.device)[:, None] == index
    if values.dim() == 1:
        return th.where(in_group, values, 0).sum(-1)
    return th.matmul(in_group.to(values.dtype), values)
