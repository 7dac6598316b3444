"""CARE, PaCo and MOORE each learn a cheap multi-task problem on any CPU (a file of its own, so that the test
runner can run it beside the other baseline tests)."""

from __future__ import annotations

import pytest
from toy_envs import POINT_REACH_TRAINING, assert_learns_point_reach, make_point_reach

from d2r_sb3 import MultiTaskSAC
from d2r_sb3.baselines import PaCoSAC

TINY = {
    "CAREPolicy": dict(
        n_experts=2,
        encoder_sizes=[32, 32],
        embedding_dim=16,
        context_sizes=[16],
        context_dim=16,
        attention_sizes=[16],
        hidden_sizes=[64, 64],
    ),
    "PaCoPolicy": dict(n_param_sets=2, hidden_sizes=[64, 64]),
    "MOOREPolicy": dict(n_experts=2, expert_sizes=[64, 64]),
}
TINY_BATCH = {"CAREPolicy": 64, "PaCoPolicy": 128, "MOOREPolicy": 64}  # (seed 0 solves each in 3k-6k steps)


@pytest.mark.slow
@pytest.mark.parametrize("alias", list(TINY))
def test_learns_every_task_of_a_cheap_multi_task_problem(alias):
    """Random actions never reach the goals; each method reaches all four within 20k env steps."""
    algo = PaCoSAC if alias == "PaCoPolicy" else MultiTaskSAC  # PaCoSAC: with the reset of diverging tasks
    model = algo(
        alias,
        make_point_reach(4),
        policy_kwargs=TINY[alias],
        batch_size=TINY_BATCH[alias],
        buffer_size=30_000,
        seed=0,
        **POINT_REACH_TRAINING,
    )
    assert_learns_point_reach(model)
