"""Parameter counts of multi-task policies, reported next to every success rate, as published results give them.

The counts follow the convention of the D2R paper's comparison: the actor, and **one** critic (the twin critics
are identical in size, so the per-critic count is the critic total divided by ``n_critics``). Target critics and
buffers (e.g. D2R's routing temperature) are not parameters and are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from d2r_sb3.common.policies import MultiTaskPolicy


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (every parameter, trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(policy: MultiTaskPolicy) -> dict[str, int]:
    """Parameter counts of any :class:`~d2r_sb3.common.policies.MultiTaskPolicy` (D2R and every baseline).

    :param policy: the policy, e.g. ``model.policy``.
    :return: ``{"actor": actor parameters, "critic": parameters of ONE critic, "n_critics": number of critics,
        "total": actor + all critics}`` (target critics excluded).
    """
    if not isinstance(policy, MultiTaskPolicy):
        raise TypeError(
            f"parameter_counts needs a MultiTaskPolicy (e.g. model.policy), got {type(policy).__name__}."
        )
    actor = count_parameters(policy.actor)
    critics = count_parameters(policy.critic)
    if critics % policy.n_critics != 0:
        raise ValueError(
            f"The critic of {type(policy).__name__} has {critics} parameters, not a multiple of "
            f"n_critics={policy.n_critics}: its critics differ in size, so no per-critic count exists."
        )
    return {
        "actor": actor,
        "critic": critics // policy.n_critics,
        "n_critics": policy.n_critics,
        "total": actor + critics,
    }


def format_parameter_counts(counts: dict[str, int], name: str = "") -> str:
    """One line for logs, e.g. ``"MTSACPolicy: actor 333,608 / critic 335,201 (x2), total 1,004,010"``."""
    prefix = f"{name}: " if name else ""
    return (
        f"{prefix}actor {counts['actor']:,} / critic {counts['critic']:,} (x{counts['n_critics']}), "
        f"total {counts['total']:,}"
    )


def mlp_parameter_count(sizes: Sequence[int]) -> int:
    """Parameters of a stack of linear layers ``sizes[0] -> sizes[1] -> ...`` (weights and biases)."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=False))
