"""Multi-task Meta-World (MT10 / MT50 / custom task lists) as an SB3 VecEnv: one sub-env per task.

Env column ``i`` of the returned VecEnv is task ``i`` (the benchmark's task order); every observation is
the 39-d Meta-World state followed by a one-hot over the env's ``T`` tasks (49-d for MT10, 89-d for
MT50), in float32.

Goal modes (``goals=``):

* ``"fixed"``: one object/goal configuration per task, drawn once from the seed and frozen: every reset
  starts from the same state (D2R's "MT10-Fixed").
* ``"rand"``: a fresh continuous object/goal draw at every reset (D2R's "MT10-Rand"), reproducible from
  the seed (the paper's code used the unseeded global RNG).
* ``"mw3"``: Meta-World 3's convention: 50 configurations per task pre-sampled from the seed (exactly the
  ones ``gym.make_vec("Meta-World/MT10", seed=seed)`` uses), one drawn at every reset.

Presets (``preset=``), see :data:`PRESETS`:

* ``"paper"``: what produced the D2R paper: 200-step episodes whose time limit is a *true terminal*
  (no bootstrap), reward x 0.1, v2 reward function.
* ``"mw3"``: Meta-World 3 / Meta-World+: 500-step episodes truncated (bootstrapped) at the limit, raw
  reward, v2 reward function.

Randomness of sub-env ``i`` comes from one RNG seeded with ``SeedSequence([seed, crc32(task_name)])``, so
tasks get independent streams and a task's goal sequence does not depend on which other tasks are in the
env. Seeds passed to ``reset()`` (and therefore SB3's ``VecEnv.seed()``) are ignored, as in Meta-World
itself: the env is fully determined by ``make_mt_env(seed=...)``.

This module relies on Meta-World 3.1 internals (``_freeze_rand_vec``, ``seeded_rand_vec``,
``_last_rand_vec``, ``_N_GOALS``, ``env_dict``); the package pins ``metaworld>=3.1,<3.2``.
"""

from __future__ import annotations

import os

# MuJoCo picks its OpenGL backend when it is imported. Without a display the default (GLFW) fails on the
# first render, so default to headless EGL before mujoco/metaworld get imported (a user setting wins).
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ.setdefault("MUJOCO_GL", "egl")

import functools
import inspect
import pickle
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import metaworld
import metaworld.env_dict as _mw_env_dict
import numpy as np
from metaworld.types import Task
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from d2r_sb3.envs.workers import close_at_exit, ignore_stop_signals
from d2r_sb3.envs.wrappers import EpisodeLimit, EpisodeReplay, EpisodeSuccess

__all__ = [
    "GOAL_MODES",
    "MAX_EPISODE_STEPS_LIMIT",
    "PRESETS",
    "EnvPreset",
    "MetaWorldTaskEnv",
    "MultiTaskVecEnv",
    "benchmark_task_names",
    "make_mt_env",
    "normalize_task_name",
    "task_index",
]

GoalMode = Literal["fixed", "rand", "mw3"]
PresetName = Literal["paper", "mw3"]
VecEnvKind = Literal["dummy", "subproc"]

GOAL_MODES: tuple[str, ...] = ("fixed", "rand", "mw3")
"""Valid values of ``make_mt_env(goals=...)``."""

MAX_EPISODE_STEPS_LIMIT = 500
"""Meta-World's ``max_path_length``: its envs raise if stepped further without a reset."""

_MW3_NUM_GOALS = 50  # Meta-World 3's default number of pre-sampled goals per task.
_BENCHMARKS: dict[str, Any] = {"MT10": _mw_env_dict.MT10_V3, "MT50": _mw_env_dict.MT50_V3}
_ALL_TASKS: dict[str, Any] = dict(_mw_env_dict.ALL_V3_ENVIRONMENTS)
_RENDER_MODES = (None, "human", "rgb_array", "depth_array")
_REWARD_FUNCTION_VERSIONS = ("v1", "v2")


@dataclass(frozen=True)
class EnvPreset:
    """A named set of episode/reward settings (every field can be overridden in :func:`make_mt_env`).

    :param name: Preset name.
    :param max_episode_steps: Episode length.
    :param time_limit_terminal: Whether the time limit is reported as ``terminated`` (no bootstrap) rather
        than ``truncated``.
    :param reward_scale: Factor applied to Meta-World's reward.
    :param reward_function_version: Meta-World reward function, ``"v1"`` or ``"v2"``.
    :param description: One-line summary.
    """

    name: str
    max_episode_steps: int
    time_limit_terminal: bool
    reward_scale: float
    reward_function_version: str
    description: str

    @property
    def handle_timeout_termination(self) -> bool:
        """The SB3 replay-buffer setting this preset needs: bootstrap through truncations only."""
        return not self.time_limit_terminal


PRESETS: dict[str, EnvPreset] = {
    "paper": EnvPreset(
        name="paper",
        max_episode_steps=200,
        time_limit_terminal=True,
        reward_scale=0.1,
        reward_function_version="v2",
        description="D2R paper code: 200-step episodes ending in a true terminal, reward x 0.1, v2 reward",
    ),
    "mw3": EnvPreset(
        name="mw3",
        max_episode_steps=500,
        time_limit_terminal=False,
        reward_scale=1.0,
        reward_function_version="v2",
        description="Meta-World 3: 500-step episodes truncated (bootstrapped), raw v2 reward",
    ),
}
"""Named presets, see :class:`EnvPreset`."""


# --------------------------------------------------------------------------------------------------
# Task names
# --------------------------------------------------------------------------------------------------
def normalize_task_name(name: str) -> str:
    """Return the full Meta-World 3 name of a task (``"drawer-open"`` -> ``"drawer-open-v3"``).

    :raises ValueError: If ``name`` is not a Meta-World 3 task (the message lists the valid names).
    """
    if not isinstance(name, str):
        raise ValueError(f"Task names must be strings, got {name!r}")
    full = name if name.endswith("-v3") else f"{name}-v3"
    if full not in _ALL_TASKS:
        hint = " (Meta-World 3 only ships -v3 envs)" if name.endswith(("-v1", "-v2")) else ""
        raise ValueError(
            f"Unknown Meta-World task {name!r}{hint}. Valid task names (the '-v3' suffix is optional): "
            f"{', '.join(sorted(_ALL_TASKS))}"
        )
    return full


def check_env_kwargs(
    kwargs: Mapping[str, Any], *, own_flags: Mapping[str, str] | None = None, option: str = "--env-kwargs"
) -> None:
    """Check user-given :func:`make_mt_env` keyword arguments before an env is built.

    :param kwargs: the arguments, e.g. parsed from a command line's ``--env-kwargs key:value`` pairs.
    :param own_flags: arguments that have a flag of their own in the calling program (name -> flag); setting
        them through ``option`` as well is refused, so that one setting has one place.
    :param option: how the caller names ``kwargs`` in messages.
    :raises ValueError: on a name make_mt_env does not take, or one that belongs to ``own_flags`` (the message
        lists the valid names).
    """
    own_flags = own_flags or {}
    valid = sorted(name for name in inspect.signature(make_mt_env).parameters if name not in own_flags)
    for key in kwargs:
        if key in own_flags:
            raise ValueError(f"Set {key} with {own_flags[key]}, not with {option}.")
        if key not in valid:
            raise ValueError(f"Unknown {option} key {key!r}; make_mt_env accepts: {', '.join(valid)}.")


def short_task_name(name: str) -> str:
    """A task's name without the ``-v3`` suffix, for tables, plots and logger keys (``"drawer-open-v3"`` ->
    ``"drawer-open"``); other names are returned unchanged."""
    return name.removesuffix("-v3")


def task_index(task_names: Sequence[str], task: str, owner: str = "this env") -> int:
    """Index of ``task`` (with or without ``-v3``) in ``task_names``: its env column and one-hot position.

    :param owner: what the tasks belong to, for the error message (``"this env"``, ``"the model"``).
    :raises ValueError: If ``task`` is not a Meta-World task or not one of ``task_names`` (the message lists them).
    """
    full = normalize_task_name(task)
    names = list(task_names)
    if full not in names:
        raise ValueError(f"Task {full!r} is not one of {owner}'s tasks: {', '.join(names)}.")
    return names.index(full)


def benchmark_task_names(benchmark: str | Sequence[str]) -> list[str]:
    """Return the task names of a benchmark, in env-column (one-hot) order.

    :param benchmark: ``"MT10"``, ``"MT50"`` (case-insensitive), a single task name, or a list of task
        names (with or without ``-v3``).
    :return: Full ``-v3`` task names.
    :raises ValueError: Unknown benchmark or task, empty list, or duplicate tasks.
    """
    if isinstance(benchmark, str):
        key = benchmark.upper()
        if key in _BENCHMARKS:
            return list(_BENCHMARKS[key])
        try:
            return [normalize_task_name(benchmark)]
        except ValueError:
            raise ValueError(
                f"Unknown benchmark {benchmark!r}. Valid benchmarks: {', '.join(_BENCHMARKS)}, or a list of "
                f"Meta-World task names from: {', '.join(sorted(_ALL_TASKS))}"
            ) from None
    names = [normalize_task_name(n) for n in benchmark]
    if not names:
        raise ValueError("The task list is empty; pass 'MT10', 'MT50' or a non-empty list of task names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Duplicate task names {duplicates}: each task must appear once (one env per task)")
    return names


def _benchmark_label(benchmark: str | Sequence[str]) -> str:
    if isinstance(benchmark, str) and benchmark.upper() in _BENCHMARKS:
        return benchmark.upper()
    return "custom"


# --------------------------------------------------------------------------------------------------
# Goals and seeds
# --------------------------------------------------------------------------------------------------
def _task_seed(seed: int, task_name: str) -> int:
    """Seed of one task's RNG: independent across tasks, stable across benchmarks (keyed by name)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(task_name.encode())]).generate_state(1)[0])


def _sample_mw3_goals(benchmark: str, task_names: list[str], seed: int) -> dict[str, list[Task]]:
    """Meta-World 3's pre-sampled goals (50 per task) for ``seed``.

    For MT10/MT50 they come from the benchmark object, so they equal what ``gym.make_vec`` builds; a
    custom list uses ``metaworld.MT1(name, seed)`` per task. ``metaworld._N_GOALS`` is pinned to 50
    while sampling and restored afterwards: a ``num_goals=`` passed to ``gym.make_vec`` elsewhere in the
    process overwrites that module global, and we neither want to inherit nor leave such a change.
    """
    saved = metaworld._N_GOALS
    metaworld._N_GOALS = _MW3_NUM_GOALS
    try:
        if benchmark in _BENCHMARKS:
            bench = metaworld.MT10(seed=seed) if benchmark == "MT10" else metaworld.MT50(seed=seed)
            tasks = list(bench.train_tasks)
        else:
            tasks = [t for name in task_names for t in metaworld.MT1(name, seed=seed).train_tasks]
    finally:
        metaworld._N_GOALS = saved
    pools: dict[str, list[Task]] = {name: [] for name in task_names}
    for task in tasks:
        pools[task.env_name].append(task)
    return pools


def _placeholder_task(task_name: str, env: Any) -> Task:
    """A Meta-World ``Task`` that only configures the env (fully observable goal, task kwargs).

    Used by the "fixed"/"rand" modes, which draw their own object/goal vectors, so that they skip the
    50-goal pre-sampling (seconds per benchmark). Same fields as the tasks of ``metaworld._make_tasks``.
    """
    kwargs = dict(_mw_env_dict.MT50_V3_ARGS_KWARGS[task_name]["kwargs"])  # MT50 holds every task
    kwargs.pop("task_id", None)
    space = env._random_reset_space
    kwargs.update(
        rand_vec=(space.low + space.high) / 2.0,  # overwritten by the first seeded draw
        env_cls=type(env),
        partially_observable=False,  # Meta-World's MT setting: the goal is part of the observation
    )
    return Task(env_name=task_name, data=pickle.dumps(kwargs))


# --------------------------------------------------------------------------------------------------
# Per-task env
# --------------------------------------------------------------------------------------------------
class MetaWorldTaskEnv(gym.Wrapper):
    """One Meta-World task of a multi-task env: goal mode, task one-hot, reward scale, float32 obs.

    Seeds passed to :meth:`reset` are ignored (Meta-World ignores them too); all randomness comes from
    ``seed`` given here.

    :param env: A raw Meta-World env (``SawyerXYZEnv``) of task ``task_name``.
    :param task_name: Full task name (``"reach-v3"``).
    :param task_index: Position of the task in the multi-task env (index of the one-hot).
    :param num_tasks: Length of the one-hot.
    :param goals: Goal mode, one of :data:`GOAL_MODES`.
    :param seed: Seed of this task's RNG.
    :param goal_pool: The pre-sampled Meta-World tasks (goal mode ``"mw3"`` only).
    :param reward_scale: Factor applied to the reward (``info["unscaled_reward"]`` keeps the raw value).
    """

    def __init__(
        self,
        env: gym.Env,
        *,
        task_name: str,
        task_index: int,
        num_tasks: int,
        goals: str,
        seed: int,
        goal_pool: Sequence[Task] | None = None,
        reward_scale: float = 1.0,
    ) -> None:
        super().__init__(env)
        if goals not in GOAL_MODES:
            raise ValueError(f"Unknown goal mode {goals!r}; valid: {', '.join(GOAL_MODES)}")
        if goals == "mw3" and not goal_pool:
            raise ValueError("Goal mode 'mw3' needs a non-empty goal_pool")
        self.task_name = task_name
        self.task_index = task_index
        self.num_tasks = num_tasks
        self.goal_mode = goals
        self.reward_scale = float(reward_scale)
        self.goal_pool: list[Task] = list(goal_pool) if goal_pool is not None else []

        mw_env: Any = self.env.unwrapped
        self._mw_env = mw_env
        mw_env.seed(seed)  # seeds the env's np_random, which drives every draw below
        if goals == "mw3":
            mw_env.set_task(self.goal_pool[0])  # configures the env; a random one is set at each reset
        else:
            mw_env.set_task(_placeholder_task(task_name, mw_env))
            # Draw the object/goal vector from the seeded env RNG instead of a frozen Task.
            mw_env._freeze_rand_vec = False
            mw_env.seeded_rand_vec = True
            if goals == "fixed":
                mw_env.reset()  # one draw (env-specific rejection loops included) ...
                mw_env._freeze_rand_vec = True  # ... reused at every later reset

        self._one_hot = np.zeros(num_tasks, dtype=np.float32)
        self._one_hot[task_index] = 1.0
        # Meta-World's own `observation_space` keeps zero bounds for the goal even when it is observed;
        # `sawyer_observation_space` is recomputed by set_task.
        base = mw_env.sawyer_observation_space
        self.observation_space = gym.spaces.Box(
            low=np.concatenate([base.low, np.zeros(num_tasks)]).astype(np.float32),
            high=np.concatenate([base.high, np.ones(num_tasks)]).astype(np.float32),
            dtype=np.float32,
        )

    @property
    def rand_vec(self) -> np.ndarray:
        """The object/goal configuration vector of the current episode (Meta-World's ``rand_vec``)."""
        return np.array(self._mw_env._last_rand_vec, copy=True)

    def _observation(self, obs: np.ndarray) -> np.ndarray:
        return np.concatenate([obs.astype(np.float32, copy=False), self._one_hot])

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        del seed  # see class docstring
        if self.goal_mode == "mw3":
            index = int(self._mw_env.np_random.integers(len(self.goal_pool)))
            self._mw_env.set_task(self.goal_pool[index])
        obs, info = self.env.reset(options=options)
        return self._observation(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._observation(obs), float(reward) * self.reward_scale, terminated, truncated, info


@dataclass(frozen=True)
class _SubEnvSpec:
    """Everything needed to build one sub-env; picklable, so SubprocVecEnv workers can build it."""

    task_name: str
    task_index: int
    num_tasks: int
    goals: str
    seed: int
    goal_pool: tuple[Task, ...] | None
    max_episode_steps: int
    time_limit_terminal: bool
    reward_scale: float
    reward_function_version: str
    render_mode: str | None
    camera_name: str | None
    width: int
    height: int


def _build_sub_env(spec: _SubEnvSpec) -> gym.Env:
    """Thunk body of one sub-env.

    It is module-level, so cloudpickle stores it by reference: a SubprocVecEnv worker unpickling it
    imports this module, and with it (after the MUJOCO_GL default) Meta-World.
    """
    env_cls = _ALL_TASKS[spec.task_name]
    env: gym.Env = env_cls(
        reward_function_version=spec.reward_function_version,
        render_mode=spec.render_mode,
        camera_name=spec.camera_name,
        width=spec.width,
        height=spec.height,
    )
    env = MetaWorldTaskEnv(
        env,
        task_name=spec.task_name,
        task_index=spec.task_index,
        num_tasks=spec.num_tasks,
        goals=spec.goals,
        seed=spec.seed,
        goal_pool=spec.goal_pool,
        reward_scale=spec.reward_scale,
    )
    env = EpisodeLimit(env, spec.max_episode_steps, terminal=spec.time_limit_terminal)
    env = EpisodeSuccess(env)
    # SB3 logs rollout/ep_rew_mean (scaled reward) and is_success per episode from the Monitor.
    env = Monitor(env, info_keywords=("is_success",))
    # Outermost, so that a training checkpoint can rebuild the current episode through every wrapper.
    return EpisodeReplay(env)


def _build_sub_env_in_worker(spec: _SubEnvSpec) -> gym.Env:
    """Thunk body of one sub-env in a SubprocVecEnv worker, which ignores SIGINT and SIGTERM sent to the whole job:
    the training process stops it after its last checkpoint (see :mod:`d2r_sb3.envs.workers`).
    """
    ignore_stop_signals()
    return _build_sub_env(spec)


# --------------------------------------------------------------------------------------------------
# VecEnv
# --------------------------------------------------------------------------------------------------
class MultiTaskVecEnv(VecEnvWrapper):
    """A VecEnv with one Meta-World sub-env per task; env column ``i`` is task ``i``.

    Build it with :func:`make_mt_env`. Besides the VecEnv API it carries the env's configuration:

    :ivar task_names: Full task names in column / one-hot order.
    :ivar num_tasks: Number of tasks (== ``num_envs``).
    :ivar benchmark: ``"MT10"``, ``"MT50"`` or ``"custom"``.
    :ivar goals: Goal mode (``"fixed"``, ``"rand"`` or ``"mw3"``).
    :ivar preset: Preset name (``"paper"`` or ``"mw3"``).
    :ivar env_seed: The seed the env was built with (named so to keep SB3's ``seed()`` method).
    :ivar max_episode_steps: Episode length.
    :ivar time_limit_terminal: Whether the time limit ends an episode as ``terminated``.
    :ivar reward_scale: Factor applied to Meta-World's reward.
    :ivar reward_function_version: Meta-World reward function version.
    :ivar handle_timeout_termination: The SB3 ``ReplayBuffer(handle_timeout_termination=...)`` value this
        env needs (False for the "paper" preset: its time limit is a true terminal).

    Per-sub-env attributes are available through ``get_attr``: ``task_name``, ``task_index``,
    ``goal_mode``, ``rand_vec`` (current object/goal vector), ``episode_success``.
    Seeds passed to :meth:`seed` / ``reset`` are ignored by the sub-envs (as in Meta-World): the env's
    randomness is fixed by ``env_seed``.
    """

    def __init__(
        self,
        venv: VecEnv,
        *,
        task_names: Sequence[str],
        benchmark: str,
        goals: str,
        preset: str,
        seed: int,
        max_episode_steps: int,
        time_limit_terminal: bool,
        reward_scale: float,
        reward_function_version: str,
        vec_env: str = "dummy",
        render_mode: str | None = None,
        camera_name: str | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        if len(task_names) != venv.num_envs:
            raise ValueError(f"{len(task_names)} task names for {venv.num_envs} envs")
        super().__init__(venv, observation_space=_union_box(venv.get_attr("observation_space")))
        self.task_names: list[str] = list(task_names)
        self.num_tasks: int = len(self.task_names)
        self.benchmark = benchmark
        self.goals = goals
        self.preset = preset
        self.env_seed = seed
        self.max_episode_steps = max_episode_steps
        self.time_limit_terminal = time_limit_terminal
        self.reward_scale = reward_scale
        self.reward_function_version = reward_function_version
        self.vec_env = vec_env
        self.camera_name = camera_name
        self.width = width
        self.height = height
        self._render_mode_arg = render_mode

    @property
    def handle_timeout_termination(self) -> bool:
        """Replay-buffer ``handle_timeout_termination`` matching this env's time-limit semantics."""
        return not self.time_limit_terminal

    def task_index(self, task_name: str) -> int:
        """Env column / one-hot index of a task (name with or without ``-v3``)."""
        return task_index(self.task_names, task_name)

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this env with :func:`make_mt_env` (plain JSON/YAML types)."""
        return {
            "benchmark": self.benchmark if self.benchmark in _BENCHMARKS else list(self.task_names),
            "goals": self.goals,
            "preset": self.preset,
            "seed": self.env_seed,
            "vec_env": self.vec_env,
            "max_episode_steps": self.max_episode_steps,
            "time_limit_terminal": self.time_limit_terminal,
            "reward_scale": self.reward_scale,
            "reward_function_version": self.reward_function_version,
            "render_mode": self._render_mode_arg,
            "camera_name": self.camera_name,
            "width": self.width,
            "height": self.height,
        }

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """SB3 API compatibility only: the sub-envs ignore reset seeds, see the class docstring."""
        return self.venv.seed(seed)

    def reset(self) -> Any:
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        return self.venv.step_wait()

    def __repr__(self) -> str:
        return (
            f"MultiTaskVecEnv(benchmark={self.benchmark!r}, num_tasks={self.num_tasks}, goals={self.goals!r}, "
            f"preset={self.preset!r}, seed={self.env_seed}, max_episode_steps={self.max_episode_steps})"
        )


def _union_box(spaces: Sequence[gym.Space]) -> gym.spaces.Box:
    """The smallest Box holding every sub-env's observation space.

    The goal bounds differ between tasks, while an SB3 VecEnv only has one observation space (by default
    sub-env 0's, which other tasks' goals would fall outside of).
    """
    boxes = [s for s in spaces if isinstance(s, gym.spaces.Box)]
    if len(boxes) != len(spaces) or len({b.shape for b in boxes}) != 1:
        raise ValueError("All sub-envs must have Box observation spaces of the same shape")
    low = np.min([b.low for b in boxes], axis=0)
    high = np.max([b.high for b in boxes], axis=0)
    return gym.spaces.Box(low=low, high=high, dtype=boxes[0].dtype)


def _check_benchmark_argument(benchmark: object) -> None:
    """A benchmark is a name or an ordered collection of task names (the order is the env-column order)."""
    if isinstance(benchmark, str):
        return
    if not isinstance(benchmark, (Sequence, np.ndarray)) or isinstance(benchmark, (bytes, bytearray)):
        raise ValueError(
            f"benchmark must be 'MT10', 'MT50', a task name or a list of task names, got "
            f"{type(benchmark).__name__} {benchmark!r}"
        )
    not_names = [name for name in benchmark if not isinstance(name, str)]
    if not_names:
        raise ValueError(f"benchmark must list task names (strings), got {not_names[0]!r} in {benchmark!r}")


def _check_choices(goals: object, preset: object, vec_env: object, seed: object) -> None:
    """The arguments of :func:`make_mt_env` that take one of a few values, and the seed's range."""
    if not isinstance(goals, str) or goals not in GOAL_MODES:
        raise ValueError(f"Unknown goal mode {goals!r}; valid goal modes: {', '.join(GOAL_MODES)}")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if not isinstance(vec_env, str) or vec_env not in ("dummy", "subproc"):
        raise ValueError(f"Unknown vec_env {vec_env!r}; valid: dummy, subproc")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def _episode_settings(
    spec: EnvPreset,
    max_episode_steps: object,
    reward_scale: object,
    reward_function_version: object,
    time_limit_terminal: object,
) -> tuple[int, float, str, bool]:
    """Episode length, reward scale, reward version and time-limit handling: the given values, checked, or
    the preset's where None."""
    steps = spec.max_episode_steps if max_episode_steps is None else max_episode_steps
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, np.integer))
        or not 1 <= steps <= MAX_EPISODE_STEPS_LIMIT
    ):
        raise ValueError(
            f"max_episode_steps must be an integer in [1, {MAX_EPISODE_STEPS_LIMIT}] (Meta-World's "
            f"max_path_length), got {max_episode_steps!r}"
        )
    steps = int(steps)
    if reward_scale is not None and (
        isinstance(reward_scale, bool) or not isinstance(reward_scale, (int, float, np.integer, np.floating))
    ):
        raise ValueError(f"reward_scale must be a positive finite number, got {reward_scale!r}")
    scale = float(spec.reward_scale if reward_scale is None else reward_scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"reward_scale must be a positive finite number, got {reward_scale!r}")
    reward_version = (
        spec.reward_function_version if reward_function_version is None else reward_function_version
    )
    if reward_version not in _REWARD_FUNCTION_VERSIONS:
        raise ValueError(
            f"Unknown reward_function_version {reward_version!r}; valid: {', '.join(_REWARD_FUNCTION_VERSIONS)}"
        )
    if time_limit_terminal is not None and not isinstance(time_limit_terminal, (bool, np.bool_)):
        raise ValueError(f"time_limit_terminal must be True, False or None, got {time_limit_terminal!r}")
    terminal = spec.time_limit_terminal if time_limit_terminal is None else bool(time_limit_terminal)
    return steps, scale, reward_version, terminal


def _check_render_settings(render_mode: object, camera_name: object, width: object, height: object) -> None:
    """Render settings are optional; when given, they must be usable by Meta-World's renderer."""
    if render_mode is not None and (not isinstance(render_mode, str) or render_mode not in _RENDER_MODES):
        raise ValueError(f"Unknown render_mode {render_mode!r}; valid: {', '.join(map(str, _RENDER_MODES))}")
    if camera_name is not None and not isinstance(camera_name, str):
        raise ValueError(
            f"camera_name must be a Meta-World camera name (a string) or None, got {camera_name!r}"
        )
    for size_name, size in (("width", width), ("height", height)):
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1
        ):
            raise ValueError(f"{size_name} must be a positive integer, got {size!r}")


def make_mt_env(
    benchmark: str | Sequence[str],
    goals: GoalMode = "rand",
    preset: PresetName = "paper",
    seed: int = 0,
    *,
    vec_env: VecEnvKind = "dummy",
    max_episode_steps: int | None = None,
    reward_scale: float | None = None,
    reward_function_version: str | None = None,
    time_limit_terminal: bool | None = None,
    render_mode: str | None = None,
    camera_name: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> MultiTaskVecEnv:
    """Build a multi-task Meta-World VecEnv with one sub-env per task (env column ``i`` == task ``i``).

    :param benchmark: ``"MT10"``, ``"MT50"``, a task name, or a list of task names (``"reach"`` or
        ``"reach-v3"``); the list order is the column / one-hot order.
    :param goals: Goal mode: ``"fixed"``, ``"rand"`` (default, D2R's Rand) or ``"mw3"`` (see module doc).
    :param preset: ``"paper"`` (default) or ``"mw3"``, see :data:`PRESETS`.
    :param seed: Seed of the env (goals, goal sequence); ``0 <= seed < 2**32``.
    :param vec_env: ``"dummy"`` (DummyVecEnv, default) or ``"subproc"`` (SubprocVecEnv).
    :param max_episode_steps: Episode length in ``[1, 500]``; None = the preset's.
    :param reward_scale: Reward factor; None = the preset's.
    :param reward_function_version: ``"v1"`` or ``"v2"``; None = the preset's.
    :param time_limit_terminal: Report the time limit as ``terminated`` (True) or ``truncated`` (False);
        None = the preset's.
    :param render_mode: Meta-World render mode, e.g. ``"rgb_array"`` (headless via EGL by default).
    :param camera_name: Meta-World camera (``"corner"``, ``"topview"``, ``"behindGripper"``, ...).
    :param width: Render width in pixels (Meta-World's default 480).
    :param height: Render height in pixels (Meta-World's default 480).
    :return: The :class:`MultiTaskVecEnv`.
    :raises ValueError: On an unknown benchmark / task / goal mode / preset / vec_env, duplicate tasks, or
        out-of-range values; the message lists the valid choices.
    """
    _check_benchmark_argument(benchmark)
    task_names = benchmark_task_names(benchmark)
    label = _benchmark_label(benchmark)
    _check_choices(goals, preset, vec_env, seed)
    seed = int(seed)
    steps, scale, reward_version, terminal = _episode_settings(
        PRESETS[preset], max_episode_steps, reward_scale, reward_function_version, time_limit_terminal
    )
    _check_render_settings(render_mode, camera_name, width, height)

    pools = _sample_mw3_goals(label, task_names, seed) if goals == "mw3" else None
    specs = [
        _SubEnvSpec(
            task_name=name,
            task_index=i,
            num_tasks=len(task_names),
            goals=goals,
            seed=_task_seed(seed, name),
            goal_pool=tuple(pools[name]) if pools is not None else None,
            max_episode_steps=steps,
            time_limit_terminal=terminal,
            reward_scale=scale,
            reward_function_version=reward_version,
            render_mode=render_mode,
            camera_name=camera_name,
            width=480 if width is None else int(width),
            height=480 if height is None else int(height),
        )
        for i, name in enumerate(task_names)
    ]
    build = _build_sub_env if vec_env == "dummy" else _build_sub_env_in_worker
    thunks: list[Callable[[], gym.Env]] = [functools.partial(build, s) for s in specs]
    venv: VecEnv = DummyVecEnv(thunks) if vec_env == "dummy" else close_at_exit(SubprocVecEnv(thunks))
    return MultiTaskVecEnv(
        venv,
        task_names=task_names,
        benchmark=label,
        goals=goals,
        preset=preset,
        seed=seed,
        max_episode_steps=steps,
        time_limit_terminal=terminal,
        reward_scale=scale,
        reward_function_version=reward_version,
        vec_env=vec_env,
        render_mode=render_mode,
        camera_name=camera_name,
        width=width,
        height=height,
    )
