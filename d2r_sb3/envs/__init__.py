"""Multi-task environments for d2r_sb3 (Meta-World MT10 / MT50 / custom task lists as SB3 VecEnvs)."""

# `.metaworld` first: it sets MUJOCO_GL for headless rendering before MuJoCo gets imported.
from d2r_sb3.envs.metaworld import (
    GOAL_MODES,
    MAX_EPISODE_STEPS_LIMIT,
    PRESETS,
    EnvPreset,
    MetaWorldTaskEnv,
    MultiTaskVecEnv,
    benchmark_task_names,
    check_env_kwargs,
    make_mt_env,
    normalize_task_name,
    short_task_name,
    task_index,
)
from d2r_sb3.envs.wrappers import EpisodeLimit, EpisodeReplay, EpisodeSuccess

__all__ = [
    "GOAL_MODES",
    "MAX_EPISODE_STEPS_LIMIT",
    "PRESETS",
    "EnvPreset",
    "EpisodeLimit",
    "EpisodeReplay",
    "EpisodeSuccess",
    "MetaWorldTaskEnv",
    "MultiTaskVecEnv",
    "benchmark_task_names",
    "check_env_kwargs",
    "make_mt_env",
    "normalize_task_name",
    "short_task_name",
    "task_index",
]
