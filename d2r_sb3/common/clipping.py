"""Gradient-norm clipping for ensembles: every member (e.g. each of the twin critics) on its own.

The critics of every policy here are one ensemble module whose parameters all carry a leading member
dimension (``[n_critics, ...]``), so that both critics run in one batched call. Clipping ``critic.parameters()``
as one group would scale both critics by their *joint* norm; the authors clip each critic to ``max_norm``
separately, which is what :func:`clip_grad_norm_per_member_` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch as th

__all__ = ["clip_grad_norm_per_member_", "clip_scales", "member_grad_norms", "scale_members_"]

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; kept equal so that a one-member
# ensemble is clipped exactly as torch would clip it.
_EPS = 1e-6


def member_grad_norms(parameters: Iterable[th.Tensor], n_members: int) -> tuple[th.Tensor, list[th.Tensor]]:
    """``(norms [n_members], gradients)``: the L2 norm of each ensemble member's gradient, taken over the slices
    ``[e]`` of every parameter's gradient together (as ``torch.nn.utils.clip_grad_norm_`` does for one network),
    and the gradients it read (parameters without one are left out).

    :raises ValueError: If a parameter's first dimension is not ``n_members``.
    """
    grads: list[th.Tensor] = []
    for param in parameters:
        if param.dim() == 0 or param.shape[0] != n_members:
            raise ValueError(
                f"Per-member clipping needs parameters of shape [{n_members}, ...]; got {tuple(param.shape)}."
            )
        if param.grad is not None:
            grads.append(param.grad)
    if not grads:
        return th.zeros(n_members), grads
    # Member e's gradients are the views g[e]: a few fused (foreach) kernels, as torch's own clipping uses.
    norms = th.stack(
        [
            th.linalg.vector_norm(th.stack(th._foreach_norm([grad[e] for grad in grads])))
            for e in range(n_members)
        ]
    )
    return norms, grads


def clip_scales(norms: th.Tensor, max_norm: float) -> th.Tensor:
    """The factor that clips a gradient of norm ``norms`` to at most ``max_norm``: ``min(1, max_norm / (norm +
    1e-6))``, elementwise."""
    return (max_norm / (norms + _EPS)).clamp(max=1.0)


def scale_members_(grads: list[th.Tensor], scales: th.Tensor) -> None:
    """Multiply member ``e``'s slice ``[e]`` of every gradient in ``grads`` by ``scales[e]``, in place."""
    for member, scale in enumerate(scales.to(grads[0].dtype)):
        th._foreach_mul_([grad[member] for grad in grads], scale)


def clip_grad_norm_per_member_(parameters: Iterable[th.Tensor], max_norm: float, n_members: int) -> th.Tensor:
    """Clip the gradients of each ensemble member to an L2 norm of at most ``max_norm``, in place.

    Member ``e``'s gradient is the slice ``[e]`` of every parameter's gradient; its norm is taken over all of
    them together (:func:`member_grad_norms`) and scaled by ``min(1, max_norm / (norm + 1e-6))``.

    :param parameters: Parameters whose first dimension is the member index (size ``n_members``).
    :param max_norm: Largest allowed gradient norm of one member.
    :param n_members: Ensemble size.
    :return: The members' gradient norms before clipping, ``[n_members]``.
    :raises ValueError: If a parameter's first dimension is not ``n_members``.
    """
    norms, grads = member_grad_norms(parameters, n_members)
    if grads:
        scale_members_(grads, clip_scales(norms, max_norm))
    return norms
