"""The ensemble layers' own autograd node: values and gradients against plain autograd, in float64."""

from __future__ import annotations

import pytest
import torch as th

from d2r_sb3.common import bias_relu, cpu_products
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
    # Equal up to float64 rounding: the batched and the per-member products may sum in different orders (MKL's
    # batched dgemm on an AVX-512 Intel CPU differs in the last bits).
    th.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
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


def test_lookup_trained_rows_train_the_table_alone() -> None:
    """With ``trained_rows``, only the first samples reach the table's gradients, summed per index."""
    gen = th.Generator().manual_seed(2)
    weight = th.randn(2, 5, 4, generator=gen, dtype=th.float64).requires_grad_()
    bias = th.randn(2, 5, generator=gen, dtype=th.float64).requires_grad_()
    index = th.randint(0, 4, (40,), generator=gen)
    upstream = th.randn(2, 40, 5, generator=gen, dtype=th.float64)
    got = th.autograd.grad(
        (ensemble_lookup(index, weight, bias, trained_rows=25) * upstream).sum(), (weight, bias)
    )
    onehot = th.nn.functional.one_hot(index[:25], 4).to(th.float64)
    want_weight = th.einsum("ebo,bi->eoi", upstream[:, :25], onehot)
    th.testing.assert_close(got[0], want_weight, rtol=1e-12, atol=1e-12)
    th.testing.assert_close(got[1], upstream[:, :25].sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not cpu_products._onednn_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("trained_rows", [None, 150])
@pytest.mark.parametrize("members", [1, 2])
def test_onednn_products_equal_torchs_to_float32_precision(products, members, trained_rows):
    gen = th.Generator().manual_seed(0)
    # The input as the critics see it: the state part of a batch of observations (rows 49 apart, a stride oneDNN
    # would run through a slow reference kernel if it were passed on as it is). Its products are large enough for
    # oneDNN, also the weight gradient of 150 trained rows.
    rows, outputs = 300, 400
    assert 150 * 39 * outputs >= cpu_products.MIN_MULTIPLY_ADDS
    obs = th.randn(members, rows, 49, generator=gen)
    weight = (0.2 * th.randn(members, outputs, 39, generator=gen)).requires_grad_(True)
    bias = th.randn(members, outputs, generator=gen).requires_grad_(True)
    upstream = th.randn(members, rows, outputs, generator=gen)
    results = []
    for choice in ("default", "onednn"):
        products.set_cpu_products(choice)
        x = obs.clone().requires_grad_(True)
        state = x[..., :39]  # (a view: rows 49 apart)
        weight.grad = bias.grad = None
        out = ensemble_linear(state, weight, bias, relu=True, trained_rows=trained_rows)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, weight.grad, bias.grad))
        assert products.uses_onednn(x, 150 * 39 * outputs) == (choice == "onednn")
    # Sums of up to 400 terms of size ~10 in another order: float32 rounding reaches ~1e-5 (a wrong row or member
    # would be off by ~1).
    for got, want in zip(results[1], results[0], strict=True):
        th.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not cpu_products._onednn_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("trained_rows", [None, 200])
@pytest.mark.parametrize("final_relu", [False, True])
def test_mlp_member_by_member_equals_the_stacked_layers(products, final_relu, trained_rows):
    """With oneDNN's products an MLP keeps each twin's activations apart (no stacked copy per layer); values and
    every gradient (input, weights, biases, with trained rows) equal the stacked layers' with torch's products."""
    gen = th.Generator().manual_seed(3)
    rows = 320
    mlp = EnsembleMLP(2, [43, 400, 256, 136], final_relu=final_relu)
    x_value = th.randn(2, rows, 43, generator=gen)
    upstream = th.randn(2, rows, 136, generator=gen)
    results = []
    for choice in ("default", "onednn"):
        products.set_cpu_products(choice)
        assert mlp._member_by_member(x_value) == (choice == "onednn")
        x = x_value.clone().requires_grad_(True)
        mlp.zero_grad(set_to_none=True)
        out = mlp(x, trained_rows=trained_rows)
        (out * upstream).sum().backward()
        with th.no_grad():
            th.testing.assert_close(mlp(x_value), out.detach(), rtol=0, atol=0)  # no-grad path: same values
        results.append((out.detach(), x.grad, *(p.grad for p in mlp.parameters())))
    for got, want in zip(results[1], results[0], strict=True):
        th.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # Detached parameters: the gradient reaches the input only.
    x = x_value.clone().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    (mlp(x, detach=True) * upstream).sum().backward()
    assert all(p.grad is None for p in mlp.parameters())
    th.testing.assert_close(x.grad, results[0][1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("choice", ["default", "onednn"])
@pytest.mark.parametrize("region", [(0, 0), (150, 39), (0, 39), (150, 0), (320, 0), (0, 43)])
def test_input_region_computes_the_inputs_gradient_there_only(products, choice, region):
    """With ``input_region = (row, column)`` the first layer's input gradient is the full one in ``x[:, row:,
    column:]`` and zero elsewhere (an empty corner: all zeros); the parameters' gradients are unchanged. Both
    product paths (batched, and member by member with oneDNN)."""
    if choice == "onednn" and not cpu_products._onednn_available():
        pytest.skip("this torch has no oneDNN")
    gen = th.Generator().manual_seed(4)
    rows = 320
    mlp = EnsembleMLP(2, [43, 400, 136], final_relu=True)
    x_value = th.randn(2, rows, 43, generator=gen)
    upstream = th.randn(2, rows, 136, generator=gen)
    products.set_cpu_products(choice)
    assert mlp._member_by_member(x_value) == (choice == "onednn")
    results = []
    for corner in (None, region):
        x = x_value.clone().requires_grad_(True)
        mlp.zero_grad(set_to_none=True)
        (mlp(x, trained_rows=200, input_region=corner) * upstream).sum().backward()
        results.append((x.grad, *(p.grad for p in mlp.parameters())))
    (full_x, *full_params), (got_x, *got_params) = results
    row, column = region
    expected = th.zeros_like(full_x)
    expected[:, row:, column:] = full_x[:, row:, column:]
    th.testing.assert_close(got_x, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(got_params, full_params, strict=True):
        th.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_products_are_chosen_by_name_and_refuse_unknown_names(products, monkeypatch):
    x32, x64 = th.zeros(2, 3), th.zeros(2, 3, dtype=th.float64)
    products.set_cpu_products("default")
    assert products.cpu_products() == "default" and not products.uses_onednn(x32)
    products.set_cpu_products("onednn")
    assert products.uses_onednn(x32) == products._onednn_available()
    # float64 (the reference tests) and bfloat16 always keep torch's products, and so do small products (acting,
    # small networks).
    assert not products.uses_onednn(x64) and not products.uses_onednn(x32.bfloat16())
    assert not products.uses_onednn(x32, products.MIN_MULTIPLY_ADDS - 1)
    with pytest.raises(ValueError, match="choose one of"):
        products.set_cpu_products("mkl")
    products._choice = None
    monkeypatch.setenv("D2R_SB3_CPU_PRODUCTS", "fast")
    with pytest.raises(ValueError, match="D2R_SB3_CPU_PRODUCTS"):
        products.cpu_products()
    monkeypatch.setenv("D2R_SB3_CPU_PRODUCTS", "default")
    products._resolved = None
    assert not products.uses_onednn(x32)
    # "auto": oneDNN on AMD CPUs only.
    monkeypatch.delenv("D2R_SB3_CPU_PRODUCTS")
    for amd in (False, True):
        monkeypatch.setattr(products, "_amd_cpu", lambda amd=amd: amd)
        products._resolved = None
        assert products.uses_onednn(x32) == (amd and products._onednn_available())


@pytest.mark.parametrize("dtype", [th.float32, th.float64])
@pytest.mark.parametrize("shape", [(1, 5, 3), (2, 7, 19), (2, 300, 400)], ids=["small", "odd", "parallel"])
def test_bias_relu_pass_equals_bias_add_and_relu(dtype, shape, threads):
    """``add_bias_relu_`` (one compiled pass after a product without bias) gives ``relu(out + bias)`` member by
    member, on one thread and split among two (the last shape is beyond the pass's parallel threshold)."""
    gen = th.Generator().manual_seed(0)
    members, rows, width = shape
    out = th.randn(shape, generator=gen, dtype=dtype)
    bias = th.randn(members, width, generator=gen, dtype=dtype)
    expected = (out + bias.unsqueeze(1)).relu()
    result = bias_relu.add_bias_relu_(out, bias)
    assert result is out
    assert th.equal(result, expected)


def test_bias_relu_pass_keeps_nan_and_infinities_as_relu_does():
    """A NaN stays NaN (a ``max(v, 0)`` would hide a diverging run from the NaN guard); -inf becomes 0."""
    out = th.tensor([[[float("nan"), float("-inf"), float("inf"), -1.0, 2.0]]])
    expected = out.relu()
    bias_relu.add_bias_relu_(out, th.zeros(1, 5))
    th.testing.assert_close(out, expected, equal_nan=True)
    assert out[0, 0, 0].isnan()


def test_bias_relu_pass_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match=r"\[E, N\] bias"):
        bias_relu.add_bias_relu_(th.zeros(2, 3, 4), th.zeros(2, 5))
    with pytest.raises(ValueError, match="contiguous"):
        bias_relu.add_bias_relu_(th.zeros(2, 4, 3).transpose(1, 2), th.zeros(2, 4))
    assert bias_relu.applies(th.zeros(1)) and bias_relu.applies(th.zeros(1, dtype=th.float64))
    assert not bias_relu.applies(th.zeros(1, dtype=th.bfloat16))


@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_ensemble_linear_relu_takes_the_bias_relu_pass_on_a_cpu(dtype, monkeypatch):
    """On a CPU, a float32 / float64 layer with a relu adds bias and relu in the compiled pass (same values as
    ``baddbmm`` + ``relu`` to rounding, forward and backward)."""
    gen = th.Generator().manual_seed(1)
    x = th.randn(2, 33, 20, generator=gen, dtype=dtype, requires_grad=True)
    weight = th.randn(2, 40, 20, generator=gen, dtype=dtype, requires_grad=True)
    bias = th.randn(2, 40, generator=gen, dtype=dtype, requires_grad=True)
    upstream = th.randn(2, 33, 40, generator=gen, dtype=dtype)
    calls = []
    monkeypatch.setattr(bias_relu, "_rows", _counting(bias_relu._rows, calls))
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(bias_relu, "applies", (lambda out: True) if compiled else (lambda out: False))
        for leaf in (x, weight, bias):
            leaf.grad = None
        out = ensemble_linear(x, weight, bias, relu=True)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, weight.grad, bias.grad))
    assert calls, "the compiled pass was not taken"
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == th.float32 else dict(rtol=1e-12, atol=1e-12)
    for compiled_value, plain_value in zip(*results, strict=True):
        th.testing.assert_close(compiled_value, plain_value, **tolerance)


def _counting(function, calls):
    def counted(*args):
        calls.append(1)
        return function(*args)

    return counted
