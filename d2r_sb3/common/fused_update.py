"""The optimiser side of a multi-task SAC gradient step as one compiled pass per parameter tensor (CPU).

After the backward pass the update reads and writes every parameter several times: the gradient clipping scales
the gradients (a pass over them), torch's fused Adam updates the parameters and their moments (a pass over all
four), the NaN guard checks the new parameters (a pass), and the Polyak update moves the target critics towards
the critics (a pass over both). On a CPU these passes are memory-bound, and D2R has twice the parameters of an MLP
SAC with three 400-unit layers. :func:`adam_update` does them in one pass over each parameter tensor, in blocks of
:data:`_BLOCK` values that stay in the L1 cache from one step to the next: each gradient is scaled by its ensemble
member's clipping factor, Adam updates the moments and the parameter (on the optimizer's own state, which stays
a plain :class:`torch.optim.Adam`'s: saving, loading and ``optimizer.step()`` are unchanged), the new parameter is
checked for being finite, and a target copy, when given, takes its Polyak step. With torch on more than one thread
the values are split among them (:func:`~d2r_sb3.common.host_loops.loop_threads`).

Measured on a 2-core Intel Xeon VM (AVX-512) with one thread, for 1.4M float32 values (a critic's worth, beyond the
L2 cache): 1.23 ms against 1.75 for torch's fused Adam (0.93), Polyak ``lerp`` (0.41), parameter sums (0.20) and
clipping multiply (0.20).

The values are Adam's update rule as torch's fused CPU kernel computes it, up to the last bit (the compiler may
contract a multiply-add, and the second moment's bias correction multiplies by its inverse instead of dividing):
the same to float rounding, not bit for bit. Only torch's
:class:`~torch.optim.Adam` with its defaults' features (no AMSGrad, weight decay, ``maximize``, ``capturable``,
``differentiable``; a float learning rate) and ``fused=True`` (the multi-task SAC's own choice,
:mod:`~d2r_sb3.common.optimizers`), on CPU float32 or float64 tensors whose Adam state exists (after the first step),
qualifies (:func:`supports_adam_update`); anything else keeps torch's ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numba
import numpy as np
import torch as th

from d2r_sb3.common.host_loops import PARALLEL_FROM, jit, loop_threads, part

__all__ = ["adam_update", "supports_adam_update"]

# Values per block: the block's gradient, moments, parameter and target (5 x 1 KiB in float32) stay in L1 while the
# block's short loops run over them; each loop touches at most three arrays, so it vectorises (with more, the
# compiler's checks for overlapping arrays stop it).
_BLOCK = 256
_ADAM = th.optim.Adam


def supports_adam_update(optimizer: th.optim.Optimizer) -> bool:
    """Whether :func:`adam_update` can take ``optimizer``'s step: a :class:`torch.optim.Adam` with ``fused=True``,
    no AMSGrad, weight decay, ``maximize``, ``capturable`` or ``differentiable``, a float learning rate, no AMP
    gradient scaler attached, and every parameter with a gradient a contiguous float32 / float64 CPU tensor with
    its Adam state in place (so not before the first step)."""
    if type(optimizer) is not _ADAM or getattr(optimizer, "grad_scale", None) is not None:
        return False
    for group in optimizer.param_groups:
        if (
            not group.get("fused")
            or group["amsgrad"]
            or group["weight_decay"] != 0
            or group["maximize"]
            or group["capturable"]
            or group["differentiable"]
            or group.get("decoupled_weight_decay", False)
            or not isinstance(group["lr"], float)
        ):
            return False
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            state = optimizer.state.get(param)
            if (
                not state
                or param.device.type != "cpu"
                or param.dtype not in (th.float32, th.float64)
                or grad.dtype != param.dtype
                or grad.is_sparse
                or not (param.is_contiguous() and grad.is_contiguous())
            ):
                return False
    return True


def adam_update(
    optimizer: th.optim.Optimizer,
    member_scales: Sequence[float] | np.ndarray,
    targets: Mapping[th.Tensor, th.Tensor] | None = None,
    tau: float = 0.0,
) -> bool:
    """``optimizer.step()`` on gradients scaled per ensemble member, with the new parameters' finiteness check and
    the targets' Polyak step in the same pass (see the module docstring; check :func:`supports_adam_update` first).

    :param optimizer: a :class:`torch.optim.Adam` that :func:`supports_adam_update`.
    :param member_scales: the gradient factor of each ensemble member (the clipping's ``min(1, max_norm /
        (norm + 1e-6))``; ones for none): with more than one, every parameter's first dimension is the member and
        member ``e``'s slice is multiplied by ``member_scales[e]``; one scales every parameter whatever its shape.
        The gradients themselves are left as they are.
    :param tau: the Polyak step's weight.
    :param targets: parameter -> its target copy (same shape and dtype), moved as ``target += tau * (new - target)``
        (``torch.lerp``); ``None``: no Polyak step.
    :return: whether every updated parameter is finite.
    :raises ValueError: with several members, for a parameter whose first dimension is not the member count.
    """
    threads = loop_threads(th.get_num_threads())
    finite = True
    members = len(member_scales)
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        steps = [optimizer.state[p]["step"] for p in params]
        th._foreach_add_(steps, 1)  # (as torch's Adam: one step count per parameter)
        constants: dict[tuple[float, th.dtype], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for param, step in zip(params, steps, strict=True):
            if members > 1 and (param.dim() == 0 or param.shape[0] != members):
                raise ValueError(
                    f"adam_update scales {members} ensemble members, but a parameter has shape "
                    f"{tuple(param.shape)} (its first dimension must be the member)."
                )
            key = (float(step), param.dtype)
            if key not in constants:  # (the parameters of a group share their step count)
                count, dtype = key[0], _NUMPY_DTYPES[param.dtype]
                rule = [
                    group["lr"] / (1.0 - beta1**count),  # step size
                    1.0 - beta1,
                    beta2,
                    1.0 - beta2,
                    (1.0 - beta2**count) ** -0.5,  # 1 / square root of the second moment's bias correction
                    group["eps"],
                    tau,
                ]
                no_target = np.zeros(0, dtype=dtype)
                constants[key] = (
                    np.array(rule, dtype=dtype),
                    np.asarray(member_scales, dtype=dtype),
                    no_target,
                )
            rule_array, scales, no_target = constants[key]
            state = optimizer.state[param]
            arrays = (
                param.detach().numpy().reshape(-1),
                param.grad.numpy().reshape(-1),
                state["exp_avg"].numpy().reshape(-1),
                state["exp_avg_sq"].numpy().reshape(-1),
                targets[param].detach().numpy().reshape(-1) if targets is not None else no_target,
                scales,
                rule_array,
            )
            if threads > 1 and param.numel() >= PARALLEL_FROM:
                bad = _update_in_parts(threads, *arrays)
            else:
                bad = _update_members(*arrays)
            finite &= not bad
    return finite


_NUMPY_DTYPES = {th.float32: np.float32, th.float64: np.float64}


@jit
def _update_members(p, g, m, v, target, scales, constants):  # pragma: no cover - compiled
    """:func:`adam_update` of one flat tensor, member after member; returns 1 if a new value is not finite."""
    per = p.size // scales.size
    bad = 0
    for e in range(scales.size):
        bad |= _update_range(p, g, m, v, target, scales[e], constants, e * per, (e + 1) * per)
    return bad


@jit(parallel=True)
def _update_in_parts(threads, p, g, m, v, target, scales, constants):  # pragma: no cover - compiled
    """:func:`_update_members` with every member's values split among ``threads`` threads."""
    per = p.size // scales.size
    bad = np.zeros(threads, dtype=np.int64)
    for index in numba.prange(threads):
        lo, hi = part(index, threads, per), part(index + 1, threads, per)
        for e in range(scales.size):
            bad[index] |= _update_range(p, g, m, v, target, scales[e], constants, e * per + lo, e * per + hi)
    return bad.max()


@jit
def _update_range(p, g, m, v, target, scale, constants, first, end):  # pragma: no cover - compiled
    """Values ``first ... end - 1`` of one tensor, block by block: moments, parameter, check, Polyak step."""
    step_size, keep_first, beta2, keep_second, correction, eps, tau = (
        constants[0],
        constants[1],
        constants[2],
        constants[3],
        constants[4],
        constants[5],
        constants[6],
    )
    bad = 0
    for start in range(first, end, _BLOCK):
        stop = min(start + _BLOCK, end)
        _moments(g[start:stop], m[start:stop], v[start:stop], scale, keep_first, beta2, keep_second)
        _parameters(p[start:stop], m[start:stop], v[start:stop], step_size, correction, eps)
        bad |= _not_finite(p[start:stop])
        if target.size > 0:
            _polyak(target[start:stop], p[start:stop], tau)
    return bad


@jit(error_model="numpy", fastmath={"contract"})
def _moments(g, m, v, scale, keep_first, beta2, keep_second):  # pragma: no cover - compiled
    """Adam's moments of the scaled gradient: ``m`` lerps towards it by ``1 - beta1``, ``v = beta2 v + (1 - beta2)
    g^2`` (two loops of two arrays each, so both vectorise)."""
    for i in range(g.size):
        grad = g[i] * scale
        m[i] = m[i] + keep_first * (grad - m[i])
    for i in range(g.size):
        grad = g[i] * scale
        v[i] = v[i] * beta2 + keep_second * grad * grad


@jit(error_model="numpy", fastmath={"contract"})
def _parameters(p, m, v, step_size, correction, eps):  # pragma: no cover - compiled
    """Adam's parameter step ``p -= step_size * m / (sqrt(v) * correction + eps)``, ``correction`` the inverse of
    torch's divisor (one division a value instead of two: 12-16 % faster for 1.4M values; the denominator may differ
    from torch's in its last bit). numpy's error model: no division-by-zero check, which would keep the loop from
    vectorising."""
    for i in range(p.size):
        p[i] = p[i] - step_size * m[i] / (np.sqrt(v[i]) * correction + eps)


@jit(error_model="numpy")
def _not_finite(p):  # pragma: no cover - compiled
    """1 if a value of ``p`` is NaN or infinite (an integer OR over the values, so the loop vectorises)."""
    bad = 0
    for i in range(p.size):
        bad |= np.int64(not (abs(p[i]) < np.inf))
    return bad


@jit(error_model="numpy", fastmath={"contract"})
def _polyak(target, p, tau):  # pragma: no cover - compiled
    """``target += tau * (p - target)`` (``torch.lerp`` with a weight below 0.5)."""
    for i in range(p.size):
        target[i] = target[i] + tau * (p[i] - target[i])
