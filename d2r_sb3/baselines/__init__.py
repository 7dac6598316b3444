"""Baselines on the multi-task SAC core (MT-SAC, MH-SAC, Soft Modularization, width-matched MH-SAC, CARE, PaCo,
MOORE).

Importing this package registers the policy aliases in
:attr:`MultiTaskSAC.policy_aliases <d2r_sb3.common.mt_sac.MultiTaskSAC.policy_aliases>`, so that
``MultiTaskSAC("MTSACPolicy", env)`` (or ``"MHSACPolicy"``, ``"SMPolicy"``, ``"WideMHSACPolicy"``, ``"CAREPolicy"``,
``"PaCoPolicy"``, ``"MOOREPolicy"``) works; PaCo's w-reset needs ``PaCoSAC("PaCoPolicy", env)``.
"""

from d2r_sb3.baselines.actor_critic import TaskActor, TaskCritic, TaskNetworkPolicy
from d2r_sb3.baselines.care import CAREPolicy
from d2r_sb3.baselines.mlp import MHSACPolicy, MTSACPolicy, TaskMLP
from d2r_sb3.baselines.moore import MOOREPolicy
from d2r_sb3.baselines.paco import PaCoPolicy, PaCoSAC
from d2r_sb3.baselines.soft_modularization import SMPolicy, SoftModularNetwork, SoftRoutingWeights
from d2r_sb3.baselines.wide import WideMHSACPolicy, d2r_parameter_counts, matched_width
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.params import count_parameters, format_parameter_counts, parameter_counts

POLICY_ALIASES = {
    "MTSACPolicy": MTSACPolicy,
    "MHSACPolicy": MHSACPolicy,
    "SMPolicy": SMPolicy,
    "WideMHSACPolicy": WideMHSACPolicy,
    "CAREPolicy": CAREPolicy,
    "PaCoPolicy": PaCoPolicy,
    "MOOREPolicy": MOOREPolicy,
}
"""Aliases registered in ``MultiTaskSAC.policy_aliases`` (the names ``d2r_sb3.registry.ALGOS`` refers to)."""

MultiTaskSAC.policy_aliases.update(POLICY_ALIASES)

__all__ = [
    "POLICY_ALIASES",
    "CAREPolicy",
    "MOOREPolicy",
    "PaCoPolicy",
    "PaCoSAC",
    "MHSACPolicy",
    "MTSACPolicy",
    "SMPolicy",
    "SoftModularNetwork",
    "SoftRoutingWeights",
    "TaskActor",
    "TaskCritic",
    "TaskMLP",
    "TaskNetworkPolicy",
    "WideMHSACPolicy",
    "count_parameters",
    "d2r_parameter_counts",
    "format_parameter_counts",
    "matched_width",
    "parameter_counts",
]
