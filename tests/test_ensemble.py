"""The ensemble layers' own autograd node: values and gradients against plain autograd, in float64."""

from __future__ import annotations

import pytest
import torch as th

from d2r_sb3.common.ensemble import EnsembleMLP, ensemble_linear, ensemble_lookup


def _plain(x: th.Tensor, weight: th.Tensor, bias: th.Tensor, relu: bool) -> th.Tensor:
    out = th.stack([th.nn.functional.linear(x[e], weight[e], bias[e]) for e in range(x.shape[0])])
    return th.relu(out) if relu else out


@pytest.mark.parametrize("relu", [False, True])
def test_ensemble_linear_matches_plain_autograd(relu: bool) -> None:
    gen = th.Generator().manual_seed(0)
    x = th.randn(2, 7, 5, dtype=th.float64, generator=gen, requires_grad=True)
    weight = th.randn(2, 3, 5, dtype=th.float64, generator=gen, requires_grad=True)
    bias = th.randn(2, 3, dtype=th.float64, generator=gen, requires_grad=True)
    upstream = th.randn(2, 7, 3, dtype=th.float64, generator=gen)
    out = ensemble_linear(x, weight, bias, relu)
    grads = th.autograd.grad((out * upstream).sum(), (x, weight, bias))
    expected_out = _plain(x, weight, bias, relu)
    expected = th.autograd.grad((expected_out * upstream).sum(), (x, weight, bias))
    assert th.equal(out, expected_out)
    for got, want in zip(grads, expected, strict=True):
        assert got.shape == want.shape and got.is_contiguous()  # in the parameter's layout, no transpose left
        assert th.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert th.autograd.gradcheck(lambda *t: ensemble_linear(*t, relu), (x, weight, bias))


def test_ensemble_linear_computes_only_the_gradients_asked_for() -> None:
    x = th.randn(1, 4, 3, requires_grad=True)
    weight, bias = th.randn(1, 2, 3), th.randn(1, 2)  # detached parameters: the gradient reaches x only
    out = ensemble_linear(x, weight, bias, relu=True)
    (grad_x,) = th.autograd.grad(out.sum(), (x,))
    expected = th.autograd.grad(_plain(x, weight, bias, True).sum(), (x,))[0]
    assert th.allclose(grad_x, expected)
    with th.no_grad():  # no autograd node at all
        assert ensemble_linear(x, weight, bias, relu=True).grad_fn is None


def test_ensemble_mlp_relu_between_layers_only() -> None:
    th.manual_seed(0)
    mlp = EnsembleMLP(2, [4, 6, 3], final_relu=False).double()
    x = th.randn(2, 5, 4, dtype=th.float64)
    layers = list(mlp.layers)
    hidden = th.relu(_plain(x, layers[0].weight, layers[0].bias, False))
    expected = _plain(hidden, layers[1].weight, layers[1].bias, False)
    out = mlp(x)
    assert th.allclose(out, expected) and (out < 0).any()  # the last layer is not rectified
    params = list(mlp.parameters())
    for got, want in zip(
        th.autograd.grad(out.square().sum(), params),
        th.autograd.grad(expected.square().sum(), params),
        strict=True,
    ):
        assert th.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [th.float64, th.float32, th.bfloat16])
def test_lookup_is_the_layer_of_one_hot_inputs_bit_for_bit(dtype: th.dtype) -> None:
    gen = th.Generator().manual_seed(1)
    weight = th.randn(2, 6, 4, generator=gen).to(dtype).requires_grad_()
    bias = th.randn(2, 6, generator=gen).to(dtype).requires_grad_()
    index = th.tensor([3, 0, 3, 1, 2, 2, 0])
    upstream = th.randn(2, 7, 6, generator=gen).to(dtype)
    onehot = th.nn.functional.one_hot(index, 4).to(dtype).expand(2, -1, -1)
    looked_up = ensemble_lookup(index, weight, bias)
    product = ensemble_linear(onehot, weight, bias)
    assert looked_up.dtype == dtype and th.equal(looked_up, product)
    got = th.autograd.grad((looked_up * upstream).sum(), (weight, bias))
    want = th.autograd.grad((product * upstream).sum(), (weight, bias))
    for g, w in zip(got, want, strict=True):
        assert th.equal(g, w)
    with th.no_grad():
        assert th.equal(ensemble_lookup(index, weight, bias), product)
