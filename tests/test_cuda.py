"""D2R on a CUDA GPU: a gradient step without host syncs, learn() and the zoo on the GPU, models that move
between the GPU and the CPU.

Skipped where torch sees no CUDA device (CI has none). The routed network's values and gradients on CUDA are
checked against the float64 reference in ``test_speed_equivalence.py`` (its ``device`` cases).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th
from helpers import NEEDS_CUDA, TINY_D2R, TINY_D2R_FLAG, collect_only, tiny_d2r

from d2r_sb3 import D2RSAC
from d2r_sb3.d2r import RoutedNetwork

pytestmark = NEEDS_CUDA
ROOT = Path(__file__).resolve().parents[1]


def routed_networks(model: D2RSAC) -> list[RoutedNetwork]:
    return [net for net in model.policy.modules() if isinstance(net, RoutedNetwork)]


def test_a_gradient_step_on_cuda_syncs_with_the_host_only_at_the_nan_guard():
    """Losses, backward pass and gradient clipping queue GPU work without waiting for it: torch's sync debug
    mode turns the synchronising calls it knows (read-backs, nonzero, data-sized outputs) into errors."""
    model = tiny_d2r(device="cuda", learning_starts=10_000)
    collect_only(model, 300)
    data = model.replay_buffer.sample(64)
    assert {net.block_workspace.backward_strategy for net in routed_networks(model)} == {"auto"}
    th.cuda.synchronize()
    th.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = model._combine_task_losses(model._task_losses(data))
        loss.backward()
        norms = model._clip_gradients(model.max_grad_norm or 1.0)
    finally:
        th.cuda.set_sync_debug_mode("default")
    assert norms.is_cuda and bool(th.isfinite(norms).all())
    grads = [p.grad for p in (*model.actor.parameters(), *model.critic.parameters())]
    assert all(g is not None and g.is_cuda and bool(th.isfinite(g).all()) for g in grads)


def test_a_gradient_step_on_cuda_gives_the_same_bits_every_time():
    """Every sum in which many samples meet (per-task loss means, the task encoder's weight gradient) runs in a
    fixed order: the same batch and seed give the same gradients, bit for bit (a GPU's index_add_ would not)."""
    model = tiny_d2r(device="cuda", learning_starts=10_000)
    collect_only(model, 300)
    data = model.replay_buffer.sample(256)
    params = [*model.actor.parameters(), *model.critic.parameters()]

    def gradients() -> list[th.Tensor]:
        for p in params:
            p.grad = None
        th.manual_seed(0)  # the same SampleK routes and actions
        loss, _ = model._combine_task_losses(model._task_losses(data))
        loss.backward()
        return [p.grad.clone() for p in params if p.grad is not None]

    first, second = gradients(), gradients()
    assert len(first) == len(second) > 0
    assert all(th.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("train_precision", ["float32", "bfloat16"])
def test_learn_on_cuda_gives_a_model_that_acts_the_same_on_the_cpu(tmp_path, train_precision):
    model = tiny_d2r(
        device="cuda",
        learning_starts=200,
        policy_kwargs={**TINY_D2R, "train_precision": train_precision},
    )
    assert model.policy.device.type == "cuda"
    # bfloat16 is native on every GPU that torch supports it on: no fallback to float32 there
    assert model.policy._train_dtype == (th.bfloat16 if train_precision == "bfloat16" else th.float32)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(1_000)
    assert model._n_updates > 0
    state = model.policy.state_dict()
    assert all(bool(th.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    assert any(not th.equal(state[k], before[k]) for k in before if k.startswith("actor."))
    obs = model.env.reset()
    on_gpu = model.predict(obs, deterministic=True)[0]
    model.save(tmp_path / "model.zip")
    on_cpu = D2RSAC.load(tmp_path / "model.zip", device="cpu")
    assert on_cpu.policy.device.type == "cpu"
    np.testing.assert_allclose(on_cpu.predict(obs, deterministic=True)[0], on_gpu, rtol=1e-4, atol=1e-5)


def test_zoo_trains_meta_world_on_cuda_and_resumes_the_run_on_the_cpu(tmp_path):
    """`d2r-train --device cuda` on real Meta-World tasks: checkpoints written on the GPU continue on the CPU."""
    new_run = [
        *"--algo d2r --env reach,drawer-close --seed 0 -n 400 --device cuda".split(),
        *("--hyperparams", "batch_size:64", "learning_starts:200", "buffer_size:2000", TINY_D2R_FLAG),
        *"--env-kwargs max_episode_steps:50 --eval-freq 100 --eval-episodes 2 --final-eval-episodes 2".split(),
        *"--save-freq 50 --num-threads 1 -f".split(),
        str(tmp_path),
    ]

    def train(*argv: str) -> str:
        result = subprocess.run(
            [sys.executable, "zoo/train.py", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    train(*new_run)
    run = tmp_path / "d2r" / "custom-rand_1"
    assert D2RSAC.load(run / "custom-rand.zip", device="cpu").num_timesteps == 400
    train("--resume", str(run), "-n", "800", "--device", "cpu")
    results = json.loads((run / "results.json").read_text())
    assert results["total_timesteps"] == 800
    assert D2RSAC.load(run / "custom-rand.zip", device="cpu")._n_updates > 0
