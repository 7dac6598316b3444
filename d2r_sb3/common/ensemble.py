"""Ensemble layers: ``E`` independent copies of a layer evaluated as one batched matmul.

The actor is an ensemble of one and the twin critics an ensemble of two, so both critics run in a single call.
Used by D2R's network and by the baselines' networks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch as th
from torch import nn

OUTPUT_INIT_BOUND = 3e-3
"""The authors' ``uniform_init`` of a network's last layer: ``U(-3e-3, 3e-3)`` for its weight and bias."""


class WeightAndBias(Protocol):
    """A layer with a ``weight`` and a ``bias`` (ensemble, grouped or plain)."""

    @property
    def weight(self) -> th.Tensor: ...

    @property
    def bias(self) -> th.Tensor: ...


def uniform_(tensor: th.Tensor, bound: float) -> None:
    """Fill ``tensor`` in place from ``U(-bound, bound)`` (outside autograd)."""
    with th.no_grad():
        tensor.uniform_(-bound, bound)


def output_init_(layer: WeightAndBias) -> None:
    """Initialise an output layer as the authors do: weight, then bias, from ``U(-3e-3, 3e-3)``."""
    uniform_(layer.weight, OUTPUT_INIT_BOUND)
    uniform_(layer.bias, OUTPUT_INIT_BOUND)


def ensemble_linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """Ensemble linear layer: ``x [E, B, in]``, ``weight [E, out, in]``, ``bias [E, out]`` -> ``[E, B, out]``."""
    return th.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied as one batched matmul (``x [E, B, in] -> [E, B, out]``).

    Initialised as in the torchrl code behind the D2R and Soft-Modularization papers: weights from
    ``U(-b, b)`` with ``b = 1 / sqrt(out_features)`` (that code reads the fan-in from the wrong axis) and
    biases 0.1.
    """

    def __init__(self, n_nets: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(th.empty(n_nets, out_features, in_features))
        self.bias = nn.Parameter(th.empty(n_nets, out_features))
        self.basic_init_()

    def basic_init_(self) -> None:
        """Re-initialise: ``U(-1/sqrt(out_features), 1/sqrt(out_features))`` weights, biases 0.1."""
        uniform_(self.weight, 1.0 / math.sqrt(self.weight.shape[1]))
        nn.init.constant_(self.bias, 0.1)

    def forward(self, x: th.Tensor, detach: bool = False, dtype: th.dtype | None = None) -> th.Tensor:
        """``x [E, B, in] -> [E, B, out]``.

        :param detach: use detached parameters (gradient reaches ``x`` only).
        :param dtype: compute in this (reduced) precision; the parameters themselves stay as they are.
        """
        weight, bias = (self.weight.detach(), self.bias.detach()) if detach else (self.weight, self.bias)
        if dtype is not None:
            weight, bias = weight.to(dtype), bias.to(dtype)
        return ensemble_linear(x, weight, bias)


class EnsembleMLP(nn.Module):
    """Stack of :class:`EnsembleLinear` with ReLU between layers (and after the last if ``final_relu``).

    :param n_nets: ensemble size ``E``.
    :param sizes: layer sizes, input first (``[in, hidden..., out]``).
    :param final_relu: apply a ReLU after the last layer too.
    """

    def __init__(self, n_nets: int, sizes: Sequence[int], final_relu: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            EnsembleLinear(n_nets, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.final_relu = final_relu

    def forward(self, x: th.Tensor, detach: bool = False, dtype: th.dtype | None = None) -> th.Tensor:
        """``x [E, B, sizes[0]] -> [E, B, sizes[-1]]``; ``detach`` and ``dtype`` as in :class:`EnsembleLinear`."""
        for i, layer in enumerate(self.layers):
            x = layer(x, detach, dtype)
            if i < len(self.layers) - 1 or self.final_relu:
                x = x.relu_()  # in place on the fresh layer output (its backward does not read it)
        return x
