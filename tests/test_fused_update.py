"""The optimiser side of a gradient step as one compiled pass (d2r_sb3.common.fused_update): the same values as
torch's Adam after the clipping's scaling, torch's Polyak lerp, and the parameter check; used by the multi-task
SAC where it applies."""

from __future__ import annotations

import math

import pytest
import torch as th
from helpers import collect_only
from test_d2rsac import tiny_model

from d2r_sb3.common.fused_update import adam_update, supports_adam_update
from d2r_sb3.common.host_loops import PARALLEL_FROM


def _params(dtype: th.dtype, members: int, seed: int) -> list[th.nn.Parameter]:
    gen = th.Generator().manual_seed(seed)
    # A weight large enough to be split among threads, a bias, and sizes that leave part-blocks.
    shapes = [(members, 300, 251), (members, 7), (members, 3, 5)]
    return [th.nn.Parameter(th.randn(shape, generator=gen, dtype=dtype)) for shape in shapes]


def _scale(params: list[th.nn.Parameter], scales: list[float]) -> None:
    """Multiply every gradient by its member's scale (one scale: the whole tensor), as the clipping does."""
    for param in params:
        for e, scale in enumerate(scales):
            param.grad[e if len(scales) > 1 else slice(None)] *= th.tensor(scale, dtype=param.dtype)


@pytest.mark.parametrize("polyak", [True, False], ids=["polyak", "no polyak"])
@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("dtype", [th.float64, th.float32])
def test_adam_update_equals_torchs_adam_on_scaled_gradients_and_lerp(dtype, members, polyak, threads):
    """Four steps with per-member gradient scales against torch's fused Adam on the multiplied gradients and
    torch's lerp of the targets: parameters, moments, step counts and targets agree to rounding; the gradients are
    left unscaled."""
    torch_params, params = _params(dtype, members, 0), _params(dtype, members, 0)
    assert params[0].numel() >= PARALLEL_FROM
    torch_targets = [p.detach() * 0.5 for p in torch_params]
    targets = [t.clone() for t in torch_targets]
    torch_opt = th.optim.Adam(torch_params, lr=1e-2, fused=True)
    opt = th.optim.Adam(params, lr=1e-2, fused=True)
    gen = th.Generator().manual_seed(1)
    for step in range(4):
        scales = [0.25, 1.0][:members] if step % 2 else [0.5, 0.75][:members]
        for a, b in zip(torch_params, params, strict=True):
            grad = th.randn(a.shape, generator=gen, dtype=dtype)
            a.grad, b.grad = grad.clone(), grad.clone()
        _scale(torch_params, scales)
        torch_opt.step()
        if polyak:
            th._foreach_lerp_(torch_targets, [p.detach() for p in torch_params], 0.005)
        if step == 0:  # no Adam state yet: torch's step, as the multi-task SAC does
            assert not supports_adam_update(opt)
            _scale(params, scales)
            opt.step()
            if polyak:
                th._foreach_lerp_(targets, [p.detach() for p in params], 0.005)
            continue
        assert supports_adam_update(opt)
        grads = [p.grad.clone() for p in params]
        assert adam_update(opt, scales, dict(zip(params, targets, strict=True)) if polyak else None, 0.005)
        assert all(th.equal(grad, b.grad) for grad, b in zip(grads, params, strict=True))
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == th.float64 else dict(rtol=2e-6, atol=1e-7)
    for a, b, ta, tb in zip(torch_params, params, torch_targets, targets, strict=True):
        th.testing.assert_close(b, a, **tol)
        th.testing.assert_close(tb, ta, **tol)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            th.testing.assert_close(opt.state[b][key], torch_opt.state[a][key], **tol)


@pytest.mark.parametrize("where", ["parameter", "learning rate"])
def test_adam_update_reports_a_nonfinite_parameter(where):
    params = _params(th.float32, 2, 3)
    opt = th.optim.Adam(params, lr=1e-3, fused=True)
    for p in params:
        p.grad = th.ones_like(p)
    opt.step()
    assert adam_update(opt, [1.0, 1.0])
    if where == "parameter":
        with th.no_grad():
            params[1][1, 4] = math.nan
    else:
        opt.param_groups[0]["lr"] = math.inf
    assert not adam_update(opt, [1.0, 1.0])


def test_adam_update_refuses_parameters_without_a_member_dimension():
    params = [th.nn.Parameter(th.randn(3, 4))]
    opt = th.optim.Adam(params, lr=1e-3, fused=True)
    params[0].grad = th.ones(3, 4)
    opt.step()
    assert adam_update(opt, [0.5])  # one scale: any shape
    with pytest.raises(ValueError, match="first dimension must be the member"):
        adam_update(opt, [0.5, 1.0])


@pytest.mark.parametrize(
    "setting",
    [
        "fused Adam",
        "before the first step",
        "AdamW",
        "amsgrad",
        "weight decay",
        "maximize",
        "not fused",
        "bfloat16",
        "tensor learning rate",
        "grad scaler",
    ],
)
def test_only_torchs_plain_fused_adam_with_state_qualifies(setting):
    dtype = th.bfloat16 if setting == "bfloat16" else th.float32
    params = [th.nn.Parameter(th.randn(2, 4, dtype=dtype))]
    kwargs = {
        "amsgrad": dict(amsgrad=True),
        "weight decay": dict(weight_decay=0.1),
        "maximize": dict(maximize=True),
        "not fused": dict(fused=False),
        "tensor learning rate": dict(lr=th.tensor(1e-3)),
    }.get(setting, {})
    cls = th.optim.AdamW if setting == "AdamW" else th.optim.Adam
    opt = cls(params, **{"lr": 1e-3, "fused": True, **kwargs})
    params[0].grad = th.ones_like(params[0])
    if setting != "before the first step":
        opt.step()
    if setting == "grad scaler":
        opt.grad_scale = th.ones(())
    assert supports_adam_update(opt) == (setting == "fused Adam")


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipped", "no clipping"])
def test_a_gradient_step_with_the_fused_update_equals_torchs_steps(max_grad_norm):
    """The multi-task SAC's gradient step (D2R's) with the fused update and with torch's optimizer steps, from the
    same state on the same batch: actor, critics, targets, log alpha and Adam's moments agree to float32 rounding,
    with and without clipping (whose factors differ per critic)."""
    model = tiny_model(learning_starts=10_000, max_grad_norm=max_grad_norm)
    collect_only(model, 300)
    data = model.replay_buffer.sample(64)
    model._gradient_step(data)  # Adam's state exists from here on
    start = _training_state(model)
    results = []
    for fused in (False, True):
        _restore(model, start)
        model.fused_update = fused
        assert model._uses_fused_update() == fused
        th.manual_seed(7)  # (SampleK's draws)
        model._gradient_step(data)
        results.append(_training_state(model))
    torch_steps, fused_steps = results
    assert torch_steps.keys() == fused_steps.keys()
    for key in torch_steps:
        th.testing.assert_close(fused_steps[key], torch_steps[key], rtol=1e-5, atol=1e-6, msg=key)
    moved = max(
        (torch_steps[k] - start[k]).abs().max().item() for k in start if k.startswith("critic_target.")
    )
    assert moved > 0  # (the targets took their Polyak step)
    if max_grad_norm is not None:
        norms = model._gradient_norms()
        assert (norms[1:3] > max_grad_norm).any(), "the test should clip at least one critic"


def _training_state(model) -> dict[str, th.Tensor]:
    state = {f"actor.{k}": v.detach().clone() for k, v in model.actor.state_dict().items()}
    state |= {f"critic.{k}": v.detach().clone() for k, v in model.critic.state_dict().items()}
    state |= {f"critic_target.{k}": v.detach().clone() for k, v in model.critic_target.state_dict().items()}
    state["log_ent_coef"] = model.log_ent_coef.detach().clone()
    for name, opt in (("actor", model.actor.optimizer), ("critic", model.critic.optimizer)):
        for i, p in enumerate(opt.param_groups[0]["params"]):
            for key, value in opt.state[p].items():
                state[f"{name}_opt.{i}.{key}"] = value.clone()
    return state


def _restore(model, state: dict[str, th.Tensor]) -> None:
    with th.no_grad():
        for prefix, module in (
            ("actor.", model.actor),
            ("critic.", model.critic),
            ("critic_target.", model.critic_target),
        ):
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        model.log_ent_coef.copy_(state["log_ent_coef"])
        for name, opt in (("actor", model.actor.optimizer), ("critic", model.critic.optimizer)):
            for i, p in enumerate(opt.param_groups[0]["params"]):
                for key in opt.state[p]:
                    opt.state[p][key].copy_(state[f"{name}_opt.{i}.{key}"])
