"""d2r_sb3: D2R (Dynamic Depth Routing) multi-task RL for Stable-Baselines3 and Meta-World.

Importing the package sets ``MUJOCO_GL=egl`` when no display is present (see :mod:`d2r_sb3.envs`), so that
headless rendering works without extra set-up.
"""

from d2r_sb3.envs import make_mt_env  # noqa: I001  (first: sets MUJOCO_GL before mujoco is imported)
from d2r_sb3.common import (
    MultiTaskPolicy,
    MultiTaskReplayBuffer,
    MultiTaskSAC,
    TaskEvaluation,
    evaluate_per_task,
)
from d2r_sb3.d2r import D2RSAC, D2RPolicy, RoutingPath
from d2r_sb3.baselines import MHSACPolicy, MTSACPolicy, SMPolicy, WideMHSACPolicy
from d2r_sb3 import registry  # noqa: F401  (fills the algorithms' policy_aliases before any use)
from d2r_sb3.serialization import LoadedPolicy, load_policy, save_policy
from d2r_sb3.hub import load_from_hub
from d2r_sb3.common.params import parameter_counts
from d2r_sb3.common.memory import keep_freed_memory
from d2r_sb3.common.cpu_products import set_cpu_products

__version__ = "0.1.0"

__all__ = [
    "D2RSAC",
    "D2RPolicy",
    "LoadedPolicy",
    "MHSACPolicy",
    "MTSACPolicy",
    "MultiTaskPolicy",
    "MultiTaskReplayBuffer",
    "MultiTaskSAC",
    "RoutingPath",
    "SMPolicy",
    "TaskEvaluation",
    "WideMHSACPolicy",
    "evaluate_per_task",
    "keep_freed_memory",
    "load_from_hub",
    "load_policy",
    "__version__",
    "make_mt_env",
    "parameter_counts",
    "save_policy",
    "set_cpu_products",
]
