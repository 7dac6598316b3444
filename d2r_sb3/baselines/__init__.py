"""Baselines on the multi-task SAC core (MT-SAC, MH-SAC, Soft Modularization, width-matched MH-SAC, CARE, PaCo,
MOORE).

Importing this package changes nothing else: the method names and the policy aliases that make
``MultiTaskSAC("MTSACPolicy", env)`` work are in :mod:`d2r_sb3.registry`. PaCo's reset of a diverging task's
compositional vector needs its own algorithm, ``PaCoSAC("PaCoPolicy", env)``.
"""

from d2r_sb3.baselines.actor_critic import TaskActor, TaskCritic, TaskNetworkPolicy
from d2r_sb3.baselines.care import CAREPolicy
from d2r_sb3.baselines.mlp import MHSACPolicy, MTSACPolicy, TaskMLP
from d2r_sb3.baselines.moore import MOOREPolicy
from d2r_sb3.baselines.paco import PaCoPolicy, PaCoSAC
from d2r_sb3.baselines.soft_modularization import SMPolicy, SoftModularNetwork, SoftRoutingWeights
from d2r_sb3.baselines.wide import WideMHSACPolicy, d2r_parameter_counts, matched_width
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
"""The baseline policies by alias (their class names), as :mod:`d2r_sb3.registry` registers them."""

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
