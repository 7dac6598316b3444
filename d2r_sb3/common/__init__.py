"""Multi-task SAC core shared by D2R and the baselines."""

from d2r_sb3.common.buffers import MultiTaskReplayBuffer, MultiTaskReplayBufferSamples
from d2r_sb3.common.evaluation import TaskEvaluation, evaluate_per_task
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.policies import MultiTaskPolicy, squashed_gaussian

__all__ = [
    "MultiTaskPolicy",
    "MultiTaskReplayBuffer",
    "MultiTaskReplayBufferSamples",
    "MultiTaskSAC",
    "TaskEvaluation",
    "evaluate_per_task",
    "squashed_gaussian",
]
