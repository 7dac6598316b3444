"""A dense layer's bias and ReLU as one compiled pass after its product (CPU).

``relu(x W^T + b)`` as ``baddbmm(b, x, W^T).relu_()`` first copies the broadcast bias into the whole output, then
the product reads that output back to add to it, then the ReLU passes over it again. For the multi-task SAC's
wide layers (``[2, 2 B, 400]`` outputs for the twin critics at batch ``B``) the output does not stay in the cache
between these passes. :func:`add_bias_relu_` takes the product without bias (``bmm``) and then adds the bias and
applies the ReLU in one pass over each row while it is in cache, on torch's threads
(:func:`~d2r_sb3.common.host_loops.loop_threads`).

Values: the bias is added after the whole product instead of before it, so results can differ from ``baddbmm``'s
in the last bit; a NaN stays NaN through the ReLU, as with torch's ``relu``.
"""

from __future__ import annotations

import numba
import torch as th

from d2r_sb3.common.host_loops import PARALLEL_FROM, jit, loop_threads, part

__all__ = ["add_bias_relu_", "applies"]


def applies(out: th.Tensor) -> bool:
    """Whether :func:`add_bias_relu_` can take ``out``: a CPU float32 or float64 tensor."""
    return out.device.type == "cpu" and out.dtype in (th.float32, th.float64)


def add_bias_relu_(out: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """``out = relu(out + bias)`` in place, for every ensemble member: ``out [E, B, N]`` (contiguous),
    ``bias [E, N]`` (check :func:`applies` first). Returns ``out``."""
    members, rows, width = out.shape
    if bias.shape != (members, width) or not out.is_contiguous():
        raise ValueError(
            f"add_bias_relu_ takes a contiguous [E, B, N] output and an [E, N] bias, got {tuple(out.shape)} "
            f"(contiguous: {out.is_contiguous()}) and {tuple(bias.shape)}."
        )
    values = out.view(members * rows, width).numpy()
    bias_values = bias.detach().contiguous().numpy()
    threads = loop_threads(th.get_num_threads()) if out.numel() >= PARALLEL_FROM else 1
    if threads > 1:
        _in_parts(values, bias_values, rows, threads)
    else:
        _rows(values, bias_values, rows, 0, members * rows)
    return out


@jit(parallel=True, error_model="numpy")
def _in_parts(values, bias, rows_per_member, threads):  # pragma: no cover - compiled
    n = values.shape[0]
    for index in numba.prange(threads):
        _rows(values, bias, rows_per_member, part(index, threads, n), part(index + 1, threads, n))


@jit(error_model="numpy")
def _rows(values, bias, rows_per_member, first, end):  # pragma: no cover - compiled
    """Rows ``first ... end - 1`` of the flat ``[E * B, N]`` output; row ``g`` takes member ``g // B``'s bias."""
    width = values.shape[1]
    for g in range(first, end):
        row, member_bias = values[g], bias[g // rows_per_member]
        for c in range(width):
            v = row[c] + member_bias[c]
            row[c] = 0.0 if v < 0 else v  # (not max(v, 0): a NaN must stay NaN)
