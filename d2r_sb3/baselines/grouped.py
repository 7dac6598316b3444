"""Grouped linear layers: ``G`` independent layers per ensemble member, in one batched matmul.

CARE's and MOORE's experts and PaCo's parameter sets are groups of same-shaped layers. Their parameters keep
the ensemble member first (``[E, G, ...]``), like every other network of the core, so that the twin critics'
gradients can be clipped member by member (:func:`~d2r_sb3.common.clipping.clip_grad_norm_per_member_`).
Initialisation is the comparison's common scheme (:mod:`d2r_sb3.baselines.mlp`): ``U(-1/sqrt(out), 1/sqrt(out))``
with bias 0.1, and ``U(-3e-3, 3e-3)`` for output layers (:func:`~d2r_sb3.common.ensemble.output_init_`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch as th
from torch import nn

__all__ = ["GroupedLinear", "GroupedMLP"]


class GroupedLinear(nn.Module):
    """``n_groups`` linear layers for each of ``n_nets`` ensemble members.

    :param n_nets: ensemble size ``E``.
    :param n_groups: layers per member ``G`` (experts, parameter sets).
    :param in_features: input size.
    :param out_features: output size.
    """

    def __init__(self, n_nets: int, n_groups: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(out_features)  # the authors' fan-in quirk: 1/sqrt(out_features)
        self.weight = nn.Parameter(
            th.empty(n_nets, n_groups, out_features, in_features).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(th.full((n_nets, n_groups, out_features), 0.1))

    def forward(self, x: th.Tensor, detach: bool = False) -> th.Tensor:
        """``x [E, G, B, in] -> [E, G, B, out]`` (``detach``: gradient reaches ``x`` only)."""
        weight, bias = (self.weight.detach(), self.bias.detach()) if detach else (self.weight, self.bias)
        ens, groups, out_features, in_features = weight.shape
        batch = x.shape[2]
        flat = th.baddbmm(
            bias.reshape(ens * groups, 1, out_features),
            x.reshape(ens * groups, batch, in_features),
            weight.reshape(ens * groups, out_features, in_features).transpose(1, 2),
        )
        return flat.view(ens, groups, batch, out_features)


class GroupedMLP(nn.Module):
    """Stack of :class:`GroupedLinear` with ReLU between layers (and after the last if ``final_relu``).

    :param sizes: ``[in, hidden..., out]``.
    """

    def __init__(self, n_nets: int, n_groups: int, sizes: Sequence[int], final_relu: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            GroupedLinear(n_nets, n_groups, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.final_relu = final_relu

    def forward(self, x: th.Tensor, detach: bool = False) -> th.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, detach)
            if i < len(self.layers) - 1 or self.final_relu:
                x = th.relu(x)
        return x
