"""Multi-task SAC core shared by D2R and the baselines."""

from d2r_sb3.common.buffers import MultiTaskReplayBuffer, MultiTaskReplayBufferSamples
from d2r_sb3.common.callbacks import MultiTaskCheckpointCallback, PerTaskEvalCallback
from d2r_sb3.common.evaluation import TaskEvaluation, evaluate_per_task
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.nonfinite import NonFiniteTrainingError
from d2r_sb3.common.policies import MultiTaskPolicy, squashed_gaussian

__all__ = [
    "MultiTaskCheckpointCallback",
    "MultiTaskPolicy",
    "MultiTaskReplayBuffer",
    "MultiTaskReplayBufferSamples",
    "MultiTaskSAC",
    "NonFiniteTrainingError",
    "PerTaskEvalCallback",
    "TaskEvaluation",
    "evaluate_per_task",
    "squashed_gaussian",
]
