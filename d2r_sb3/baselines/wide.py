"""Width-matched MH-SAC: a multi-head MLP with as many parameters as D2R (alias ``"WideMHSACPolicy"``).

A fair comparison with a routing method needs an MLP of the same size: a plain multi-head SAC scaled to the same
parameter count matches or beats several routing methods. The hidden width is solved for the
actor and the critic separately, so that each matches D2R's actor / per-critic count for the same observation
size, action size and number of tasks, within ``tolerance``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import Schedule

from d2r_sb3.baselines.mlp import MHSACPolicy
from d2r_sb3.common.params import mlp_parameter_count, parameter_counts
from d2r_sb3.d2r.policies import D2RPolicy

_D2R_COUNTS: dict[tuple[int, int, int, str], dict[str, int]] = {}


def d2r_parameter_counts(
    obs_dim: int, action_dim: int, num_tasks: int, d2r_kwargs: dict[str, Any] | None = None
) -> dict[str, int]:
    """Actor and per-critic parameter counts of a D2R policy, by building it once (cached per configuration).

    :param obs_dim: observation size (state + one-hot), e.g. 49 for MT10, 89 for MT50.
    :param action_dim: action size (4 for Meta-World).
    :param num_tasks: number of tasks ``T``.
    :param d2r_kwargs: :class:`~d2r_sb3.D2RPolicy` keyword arguments (``None``: the paper's default network).
    :return: see :func:`~d2r_sb3.common.params.parameter_counts`.
    """
    kwargs = dict(d2r_kwargs or {})
    key = (obs_dim, action_dim, num_tasks, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _D2R_COUNTS:
        kwargs.setdefault("n_critics", 1)  # the per-critic count does not depend on how many there are
        obs_space = spaces.Box(-1.0, 1.0, (obs_dim,))
        action_space = spaces.Box(-1.0, 1.0, (action_dim,))
        # Building consumes random numbers: keep the caller's seeded stream as if nothing had been built.
        with th.random.fork_rng(devices=[]):
            policy = D2RPolicy(obs_space, action_space, lambda _: 3e-4, num_tasks=num_tasks, **kwargs)
        counts = parameter_counts(policy)
        counts["total"] = counts["actor"] + 2 * counts["critic"]  # report the usual twin-critic total
        counts["n_critics"] = 2
        _D2R_COUNTS[key] = counts
    return dict(_D2R_COUNTS[key])


def multi_head_mlp_parameter_count(in_dim: int, num_tasks: int, out_dim: int, hidden_sizes: list[int]) -> int:
    """Parameters of one :class:`~d2r_sb3.baselines.mlp.TaskMLP` with a head per task."""
    return mlp_parameter_count([in_dim + num_tasks, *hidden_sizes, num_tasks * out_dim])


def matched_width(
    target: int, in_dim: int, num_tasks: int, out_dim: int, n_hidden_layers: int, tolerance: float = 0.02
) -> int:
    """Hidden width whose multi-head MLP parameter count is closest to ``target``.

    :raises ValueError: when even the closest width misses ``target`` by more than ``tolerance`` (relative).
    """
    if n_hidden_layers < 1:
        raise ValueError(f"n_hidden_layers must be >= 1, got {n_hidden_layers}.")

    def count(width: int) -> int:
        return multi_head_mlp_parameter_count(in_dim, num_tasks, out_dim, [width] * n_hidden_layers)

    # The count grows with the width: bisect for the first width at or above the target.
    low, high = 1, 1
    while count(high) < target:
        high *= 2
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if count(mid) < target else (low, mid)
    width = min((w for w in (low - 1, low) if w >= 1), key=lambda w: abs(count(w) - target))
    error = abs(count(width) - target) / target
    if error > tolerance:
        raise ValueError(
            f"No width of a {n_hidden_layers}-hidden-layer multi-head MLP has {target:,} parameters within "
            f"{tolerance:.1%} (closest: width {width}, {count(width):,} parameters); change n_hidden_layers or "
            "raise tolerance."
        )
    return width


class WideMHSACPolicy(MHSACPolicy):
    """MH-SAC whose hidden width is chosen so that the actor and each critic have D2R's parameter count.

    The widths are recomputed from the spaces and ``d2r_kwargs`` when the policy is built or loaded, so the
    saved configuration stays the matching rule, not a number.

    :param num_tasks: number of tasks (set by the algorithm from the env).
    :param n_hidden_layers: hidden layers of the shared trunk (3, like MH-SAC's ``[400, 400, 400]``).
    :param d2r_kwargs: the D2R configuration to match (:class:`~d2r_sb3.D2RPolicy` kwargs; ``None``: default D2R).
    :param tolerance: largest allowed relative difference of each count from D2R's.
    :param n_critics: number of Q networks.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_tasks: int,
        n_hidden_layers: int = 3,
        d2r_kwargs: dict[str, Any] | None = None,
        tolerance: float = 0.02,
        n_critics: int = 2,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        self.n_hidden_layers = n_hidden_layers
        self.d2r_kwargs = dict(d2r_kwargs or {})
        self.tolerance = tolerance
        if not isinstance(observation_space, spaces.Box) or not isinstance(action_space, spaces.Box):
            raise ValueError(f"{type(self).__name__} needs Box observation and action spaces.")
        obs_dim = int(np.prod(observation_space.shape))
        action_dim = int(np.prod(action_space.shape))
        state_dim = obs_dim - num_tasks
        self.target_counts = d2r_parameter_counts(obs_dim, action_dim, num_tasks, self.d2r_kwargs)
        actor_width = matched_width(
            self.target_counts["actor"], state_dim, num_tasks, 2 * action_dim, n_hidden_layers, tolerance
        )
        critic_width = matched_width(
            self.target_counts["critic"], state_dim + action_dim, num_tasks, 1, n_hidden_layers, tolerance
        )
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            num_tasks,
            net_arch=dict(pi=[actor_width] * n_hidden_layers, qf=[critic_width] * n_hidden_layers),
            n_critics=n_critics,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        del data["net_arch"]  # derived from the rule below
        data.update(
            n_hidden_layers=self.n_hidden_layers, d2r_kwargs=self.d2r_kwargs, tolerance=self.tolerance
        )
        return data
