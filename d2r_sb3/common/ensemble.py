"""Ensemble layers: ``E`` independent copies of a layer evaluated as one batched matmul.

The actor is an ensemble of one and the twin critics an ensemble of two, so both critics run in a single call.
Used by D2R's network and by the baselines' networks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, cast

import torch as th
from torch import nn
from torch.autograd.function import once_differentiable

from d2r_sb3.common import bias_relu, cpu_products
from d2r_sb3.common.index_sums import sum_by_index

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


def _linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor, relu: bool) -> th.Tensor:
    """``relu?(x W^T + b)`` for every member (no autograd node of its own)."""
    if cpu_products.uses_onednn(x, x.shape[1] * weight.shape[1] * weight.shape[2]):
        return _members([_member_linear(x[e], weight[e], bias[e], relu) for e in range(len(weight))])
    if relu and bias_relu.applies(x):
        # The product without its bias, then bias and relu in one pass (instead of a bias copy under the product
        # and a relu pass).
        return bias_relu.add_bias_relu_(th.bmm(x, weight.transpose(1, 2)), bias)
    out = th.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return out.relu_() if relu else out


def _member_linear(x: th.Tensor, weight: th.Tensor, bias: th.Tensor, relu: bool) -> th.Tensor:
    """``relu?(x W^T + b)`` of one member (``x [B, in]``, ``weight [out, in]``, ``bias [out]``)."""
    if cpu_products.uses_onednn(x, x.shape[0] * weight.shape[0] * weight.shape[1]):
        return cpu_products.linear(x, weight, bias, relu)
    out = th.addmm(bias, x, weight.t())
    return out.relu_() if relu else out


def _times(a: th.Tensor, b: th.Tensor) -> th.Tensor:
    """``a @ b`` for every member (``[E, m, k] x [E, k, n]``, any strides)."""
    if cpu_products.uses_onednn(a, a.shape[1] * a.shape[2] * b.shape[2]):
        return _members([_member_times(a[e], b[e]) for e in range(len(a))])
    return th.bmm(a, b)


def _member_times(a: th.Tensor, b: th.Tensor) -> th.Tensor:
    """``a @ b`` of one member (``[m, k] x [k, n]``, any strides)."""
    if cpu_products.uses_onednn(a, a.shape[0] * a.shape[1] * b.shape[1]):
        return cpu_products.linear(a, b.t(), None)
    return a @ b


def _members(results: list[th.Tensor]) -> th.Tensor:
    """The members' results as one ``[E, ...]`` tensor (no copy for one member)."""
    return results[0].unsqueeze(0) if len(results) == 1 else th.stack(results)


def _lookup(index: th.Tensor, weight: th.Tensor, bias: th.Tensor) -> th.Tensor:
    """``W[:, i] + b`` for every index ``i`` and member (no autograd node of its own)."""
    return (weight.transpose(1, 2) + bias.unsqueeze(1)).index_select(1, index)


def _input_gradient(
    grad: th.Tensor, weight: th.Tensor, shape: th.Size, region: tuple[int, int] | None
) -> th.Tensor:
    """The input gradient ``grad W`` of a linear layer (``grad [E, B, out]``, ``weight [E, out, in]``; or one
    member's ``[B, out]`` and ``[out, in]``) where it is needed: with ``region = (row, column)`` only in rows
    ``row:`` and columns ``column:`` of the input (zero elsewhere, where the input is a constant); ``None``:
    everywhere."""
    times = _times if grad.dim() == 3 else _member_times
    if region is None:
        return times(grad, weight)
    row, column = region
    grad_x = grad.new_zeros(shape)
    if row < shape[-2] and column < shape[-1]:
        grad_x[..., row:, column:] = times(grad[..., row:, :], weight[..., column:])
    return grad_x


def _trained(rows: th.Tensor, trained_rows: int | None) -> th.Tensor:
    """The rows ``[E, B, ...]`` that train the parameters: the first ``trained_rows`` of every member (all of them
    for ``None``)."""
    return rows if trained_rows is None else rows[:, :trained_rows]


class _EnsembleLinearFunction(th.autograd.Function):
    """``relu?(x W^T + b)`` for every member, with a backward pass that writes each gradient in its final layout.

    Left to autograd, ``baddbmm(b, x, W^T)`` computes the weight gradient as ``x^T g`` (``[E, in, out]``) and then
    copies its transpose into ``W.grad``: a strided copy per layer and step that cost more than the layer's
    bias gradient. Here ``dW = g^T x`` is one batched product straight into ``[E, out, in]``, and a following
    ReLU is part of the same node (one autograd node per layer instead of several).

    With ``trained_rows`` set, only the first ``trained_rows`` samples of every member contribute to the weight
    and bias gradients; the later ones see the parameters as constants (their gradient reaches ``x`` only, as
    with detached parameters). Two batches that need the same parameters, one to train them and one only for
    its inputs' gradient, then run as one call (the critics' TD regression and the actor loss). With
    ``input_region = (row, column)`` the input gradient is computed only in that corner of ``x`` (the rest of
    ``x`` is constant: the critics' observations, and the replayed actions of the TD regression).
    """

    @staticmethod
    def forward(
        ctx,
        x: th.Tensor,
        weight: th.Tensor,
        bias: th.Tensor,
        relu: bool,
        trained_rows: int | None,
        input_region: tuple[int, int] | None,
    ) -> th.Tensor:
        out = _linear(x, weight, bias, relu)
        ctx.save_for_backward(x, weight, out if relu else None)
        ctx.trained_rows, ctx.input_region = trained_rows, input_region
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: th.Tensor):
        x, weight, out = ctx.saved_tensors
        if out is not None:
            grad = th.ops.aten.threshold_backward(grad, out, 0)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = _input_gradient(grad, weight, x.shape, ctx.input_region) if need_x else None
        grad, x = _trained(grad, ctx.trained_rows), _trained(x, ctx.trained_rows)
        grad_weight = _times(grad.transpose(1, 2), x) if need_weight else None
        grad_bias = grad.sum(1) if need_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None


class _MemberLinearFunction(th.autograd.Function):
    """:class:`_EnsembleLinearFunction` for members whose products run one by one (oneDNN's, see
    :mod:`~d2r_sb3.common.cpu_products`), with each member's input and output a tensor of its own.

    A chain of these layers (:class:`EnsembleMLP`) passes each member's activations on as its product wrote them;
    the stacked layer copies every layer's outputs, and in the backward pass its input gradients, into one
    ``[E, B, out]`` tensor (8 MB a layer for the twin critics at batch 2560 and 400 units). Inputs: ``weight``,
    ``bias``, ``relu``, ``trained_rows``, ``input_region`` (as there), then the members' inputs ``[B, in]``;
    outputs ``[B, out]`` per member.
    """

    @staticmethod
    def forward(
        ctx,
        weight: th.Tensor,
        bias: th.Tensor,
        relu: bool,
        trained_rows: int | None,
        input_region: tuple[int, int] | None,
        *inputs: th.Tensor,
    ) -> tuple[th.Tensor, ...]:
        outputs = tuple(_member_linear(x, weight[e], bias[e], relu) for e, x in enumerate(inputs))
        ctx.save_for_backward(weight, *inputs, *(outputs if relu else ()))
        ctx.relu, ctx.trained_rows, ctx.members = relu, trained_rows, len(inputs)
        ctx.input_region = input_region
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: th.Tensor):
        weight, *saved = ctx.saved_tensors
        inputs, outputs = saved[: ctx.members], saved[ctx.members :]
        if ctx.relu:
            grads = tuple(
                th.ops.aten.threshold_backward(g, y, 0) for g, y in zip(grads, outputs, strict=True)
            )
        need_weight, need_bias = ctx.needs_input_grad[:2]
        need_inputs = ctx.needs_input_grad[5:]
        grad_inputs = [
            _input_gradient(g, weight[e], x.shape, ctx.input_region) if need_inputs[e] else None
            for e, (g, x) in enumerate(zip(grads, inputs, strict=True))
        ]
        trained = slice(ctx.trained_rows)  # (slice(None): every row)
        grad_weight = grad_bias = None
        if need_weight:
            grad_weight = th.stack(
                [_member_times(g[trained].t(), x[trained]) for g, x in zip(grads, inputs, strict=True)]
            )
        if need_bias:
            grad_bias = th.stack([g[trained].sum(0) for g in grads])
        return grad_weight, grad_bias, None, None, None, *grad_inputs


class _EnsembleLookupFunction(th.autograd.Function):
    """The ensemble linear layer of one-hot inputs given by their indices: ``W[:, i] + b`` for index ``i``.

    The same values as the product with the one-hot matrix, bit for bit (one product by 1, the rest by 0), read
    from a ``[E, in, out]`` table in one pass instead of a matmul over a ``K = in`` one-hot and a bias copy. The
    backward pass gives the product's gradients (``dW = g^T onehot``, ``db = sum g``): column ``i`` of ``dW`` is
    the sum of the gradient rows of the samples with index ``i`` (:func:`~d2r_sb3.common.index_sums.sum_by_index`:
    on a CPU one ``index_add_`` over the ``B`` rows, 4 to 9 times faster than the product with a ``[B, in]``
    one-hot, which multiplies mostly zeros). ``trained_rows`` as in :class:`_EnsembleLinearFunction`.
    """

    @staticmethod
    def forward(
        ctx, index: th.Tensor, weight: th.Tensor, bias: th.Tensor, trained_rows: int | None
    ) -> th.Tensor:
        ctx.save_for_backward(index)
        ctx.n_inputs, ctx.trained_rows = weight.shape[2], trained_rows
        return _lookup(index, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: th.Tensor):
        (index,) = ctx.saved_tensors
        need_weight, need_bias = ctx.needs_input_grad[1:3]
        grad, index = _trained(grad, ctx.trained_rows), index[: ctx.trained_rows]
        grad_weight = grad_bias = None
        if need_weight:
            grad_weight = sum_by_index(grad, index, ctx.n_inputs).transpose(1, 2)  # [E, out, in]
        if need_bias:
            grad_bias = grad.sum(1)
        return None, grad_weight, grad_bias, None


def ensemble_lookup(
    index: th.Tensor, weight: th.Tensor, bias: th.Tensor, trained_rows: int | None = None
) -> th.Tensor:
    """:func:`ensemble_linear` of the one-hot inputs ``one_hot(index, in)`` (``index [B]`` long): ``[E, B, out]``.

    :param trained_rows: as in :func:`ensemble_linear`.
    """
    if th.is_grad_enabled() and (weight.requires_grad or bias.requires_grad):
        return _EnsembleLookupFunction.apply(index, weight, bias, trained_rows)
    return _lookup(index, weight, bias)


def ensemble_linear(
    x: th.Tensor,
    weight: th.Tensor,
    bias: th.Tensor,
    relu: bool = False,
    trained_rows: int | None = None,
    input_region: tuple[int, int] | None = None,
) -> th.Tensor:
    """Ensemble linear layer: ``x [E, B, in]``, ``weight [E, out, in]``, ``bias [E, out]`` -> ``[E, B, out]``,
    followed by a ReLU when ``relu``.

    :param trained_rows: only the first ``trained_rows`` samples of every member train ``weight`` and ``bias``;
        for the later ones the parameters are constants, as if detached (``None``: every sample trains them).
    :param input_region: ``(row, column)``: only ``x[:, row:, column:]`` needs a gradient, the rest of ``x`` is
        constant (its gradient is returned as zeros, not computed); ``None``: all of ``x``.
    """
    if th.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _EnsembleLinearFunction.apply(x, weight, bias, relu, trained_rows, input_region)
    return _linear(x, weight, bias, relu)


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

    def forward(
        self,
        x: th.Tensor,
        detach: bool = False,
        dtype: th.dtype | None = None,
        relu: bool = False,
        trained_rows: int | None = None,
        input_region: tuple[int, int] | None = None,
    ) -> th.Tensor:
        """``x [E, B, in] -> [E, B, out]``.

        :param detach: use detached parameters (gradient reaches ``x`` only).
        :param dtype: compute in this (reduced) precision; the parameters themselves stay as they are.
        :param relu: apply a ReLU to the output (in the same autograd node).
        :param trained_rows: only the first ``trained_rows`` samples train the parameters; the later ones see
            them detached (see :func:`ensemble_linear`).
        :param input_region: the corner of ``x`` that needs a gradient (see :func:`ensemble_linear`).
        """
        return ensemble_linear(x, *self._weight_and_bias(detach, dtype), relu, trained_rows, input_region)

    def lookup(
        self,
        index: th.Tensor,
        detach: bool = False,
        dtype: th.dtype | None = None,
        trained_rows: int | None = None,
    ) -> th.Tensor:
        """The layer of one-hot inputs given by their indices (``index [B]`` long, each below ``in_features``):
        ``[E, B, out]``, equal to ``self(one_hot(index))`` bit for bit (see :func:`ensemble_lookup`)."""
        return ensemble_lookup(index, *self._weight_and_bias(detach, dtype), trained_rows)

    def _weight_and_bias(self, detach: bool, dtype: th.dtype | None) -> tuple[th.Tensor, th.Tensor]:
        """``(weight, bias)``, detached and cast as :meth:`forward` describes."""
        weight, bias = (self.weight.detach(), self.bias.detach()) if detach else (self.weight, self.bias)
        if dtype is not None:
            weight, bias = weight.to(dtype), bias.to(dtype)
        return weight, bias


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

    def forward(
        self,
        x: th.Tensor,
        detach: bool = False,
        dtype: th.dtype | None = None,
        trained_rows: int | None = None,
        input_region: tuple[int, int] | None = None,
    ) -> th.Tensor:
        """``x [E, B, sizes[0]] -> [E, B, sizes[-1]]``; ``detach``, ``dtype`` and ``trained_rows`` as in
        :class:`EnsembleLinear`, ``input_region`` (the corner of ``x`` that needs a gradient) as there for the
        first layer."""
        last = len(self.layers) - 1
        if x.shape[0] > 1 and last > 0 and self._member_by_member(x):
            return self._forward_members(x, detach, dtype, trained_rows, input_region)
        for i, layer in enumerate(self.layers):
            relu = i < last or self.final_relu
            x = layer(x, detach, dtype, relu, trained_rows, input_region if i == 0 else None)
        return x

    def _member_by_member(self, x: th.Tensor) -> bool:
        """Whether the first layer's products run member by member (then every layer's do, layer sizes alike)."""
        first = cast(EnsembleLinear, self.layers[0])
        return cpu_products.uses_onednn(x, x.shape[1] * first.weight.shape[1] * first.weight.shape[2])

    def _forward_members(
        self,
        x: th.Tensor,
        detach: bool,
        dtype: th.dtype | None,
        trained_rows: int | None,
        input_region: tuple[int, int] | None,
    ) -> th.Tensor:
        """:meth:`forward` with each member's activations kept apart until the last layer's output
        (:class:`_MemberLinearFunction`)."""
        last = len(self.layers) - 1
        members = x.unbind(0)
        for i, layer in enumerate(cast(Sequence[EnsembleLinear], self.layers)):
            weight, bias = layer._weight_and_bias(detach, dtype)
            relu = i < last or self.final_relu
            if th.is_grad_enabled() and any(t.requires_grad for t in (weight, bias, *members)):
                region = input_region if i == 0 else None
                members = _MemberLinearFunction.apply(weight, bias, relu, trained_rows, region, *members)
            else:
                members = tuple(_member_linear(m, weight[e], bias[e], relu) for e, m in enumerate(members))
        return th.stack(members)
