"""Multi-task SAC: the training core shared by D2R and every baseline (SAC as in the D2R paper's Eqs. 1-2).

On top of SB3's :class:`~stable_baselines3.SAC` it adds, each switchable so that plain SAC is one
configuration away:

* one entropy coefficient per task (``log alpha`` vector, its own Adam lr 1e-4, clamp ``log alpha <= 0``);
* per-task loss reweighting ``w = T * softmax(-log alpha)`` on the actor and critic losses;
* extreme-task masking: a task whose loss exceeds a threshold (3e3) is dropped for that gradient step;
* gradient-norm clipping per network (1.0): the actor, each critic of the twin pair, and ``log alpha``;
* stratified batches (``B / T`` samples from every task);
* warm-up with the current policy instead of uniform random actions;
* the replay-buffer timeout setting that matches the env preset.

A NaN guard (:mod:`d2r_sb3.common.nonfinite`) is always on: a gradient step with a non-finite loss or gradient
is skipped, ``max_nonfinite_steps`` such steps in a row, a non-finite parameter, action, reward or observation
raise :class:`~d2r_sb3.common.nonfinite.NonFiniteTrainingError`.

One gradient step evaluates every loss with the parameters from before the step, averages each loss inside
every task, sums the per-task losses, and does **one** backward pass followed by one optimizer step per
network (the authors' order; SB3 updates alpha, then the critic, then the actor).
The task id of a transition is its env column: build the env with one env per task
(:func:`d2r_sb3.make_mt_env`).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, TypeVar, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import polyak_update
from torch.nn import functional as F

from d2r_sb3.common.buffers import MultiTaskReplayBuffer, MultiTaskReplayBufferSamples
from d2r_sb3.common.clipping import clip_scales, member_grad_norms, scale_members_
from d2r_sb3.common.devices import device_unavailable_reason
from d2r_sb3.common.fused_update import adam_update, supports_adam_update
from d2r_sb3.common.index_sums import sum_by_index
from d2r_sb3.common.nonfinite import (
    NonFiniteTrainingError,
    all_finite,
    first_nonfinite_tensor,
    nonfinite_rows,
)
from d2r_sb3.common.optimizers import fused_kwargs, restore_fused
from d2r_sb3.common.params import format_parameter_counts, parameter_counts
from d2r_sb3.common.policies import InvalidObservationError, MultiTaskPolicy
from d2r_sb3.envs import short_task_name

SelfMultiTaskSAC = TypeVar("SelfMultiTaskSAC", bound="MultiTaskSAC")

# The authors' per-task defaults: batches of 128 samples per task (1280 on MT10, 6400 on MT50) and a warm-up of
# 20 epochs of 200 steps per task with the untrained policy.
BATCH_PER_TASK = 128
WARMUP_STEPS_PER_TASK = 4000


def default_buffer_size(num_tasks: int) -> int:
    """The paper's replay size: 1e6 on MT10 (100k per task), 1e7 on MT50 (200k per task)."""
    return (100_000 if num_tasks <= 10 else 200_000) * num_tasks


_SIZE_ARGUMENTS = {  # name: (minimum, what None gives)
    "buffer_size": (1, "100k transitions per task, 200k above 10 tasks"),
    "learning_starts": (0, f"{WARMUP_STEPS_PER_TASK:,} steps per task"),
    "batch_size": (1, f"{BATCH_PER_TASK} per task"),
}


def _check_size_argument(name: str, value: Any, allow_none: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= the argument's minimum (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    minimum, default = _SIZE_ARGUMENTS[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(
            f"{name} must be {kind} (or None for the paper's default: {default}), got {value!r}."
        )


def _check_task_layout(observation_space: spaces.Space, num_tasks: int) -> None:
    """Raise ``ValueError`` unless observations can be ``[state, one-hot over num_tasks]`` (one-hot last)."""
    fix = (
        f"MultiTaskSAC trains one sub-env per task on observations [state, task one-hot], the one-hot last "
        f"with one entry per env ({num_tasks} here): build the env with d2r_sb3.make_mt_env(...), or as a VecEnv "
        "whose column i appends the one-hot of task i (bounds [0, 1]) to the state."
    )
    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(f"The observation space must be a flat Box, got {observation_space}. {fix}")
    width = observation_space.shape[0]
    if width < num_tasks + 1:
        raise ValueError(
            f"Observations of width {width} cannot hold a state and a one-hot over the {num_tasks} envs "
            f"(at least {num_tasks + 1} entries). {fix}"
        )
    low, high = observation_space.low[-num_tasks:], observation_space.high[-num_tasks:]
    # A one-hot entry is declared in [0, 1] (make_mt_env), or left unbounded by envs that declare no bounds.
    one_hot_like = ((low == 0) | (low == -np.inf)) & ((high == 1) | (high == np.inf))
    if not one_hot_like.all():
        bad = np.flatnonzero(~one_hot_like)
        entry = width - num_tasks + int(bad[0])
        raise ValueError(
            f"The last {num_tasks} observation entr{'y' if num_tasks == 1 else 'ies'} must be the task one-hot, "
            f"but entry {entry} has bounds "
            f"[{low[bad[0]]:g}, {high[bad[0]]:g}], not [0, 1]: this env's observations do not end with a one-hot "
            f"over its {num_tasks} env(s) (e.g. a single-task env such as Pendulum-v1). {fix}"
        )


def _check_first_observations(obs: np.ndarray, task_names: list[str]) -> None:
    """Raise ``ValueError`` unless env column ``i``'s observation ends with the one-hot of task ``i``."""
    num_tasks = len(task_names)
    task_part = np.asarray(obs)[:, -num_tasks:]
    if task_part.shape == (num_tasks, num_tasks) and np.array_equal(task_part, np.eye(num_tasks)):
        return
    if task_part.shape[0] != num_tasks:
        raise ValueError(
            f"The env returned {task_part.shape[0]} observations for {num_tasks} tasks (one per env)."
        )
    columns = [
        i
        for i in range(min(num_tasks, len(task_part)))
        if not np.array_equal(task_part[i], np.eye(num_tasks)[i])
    ]
    shown = np.array2string(task_part[columns[0]], precision=3, separator=", ", threshold=20)
    raise ValueError(
        f"The env's observations do not end with the one-hot of their env column: env column {columns[0]} "
        f"({task_names[columns[0]]}) ends with {shown} instead of the one-hot of task {columns[0]} over "
        f"{num_tasks} tasks (columns {columns} differ). The task id of a transition is its env column: pass a "
        "VecEnv with one sub-env per task, in one-hot order (d2r_sb3.make_mt_env builds one), not a subset or "
        "a reordering of the tasks."
    )


class _CheckFirstObservations(BaseCallback):
    """Checks the observations ``learn()`` starts from (no extra ``env.reset()``: the env's RNG is untouched)."""

    def _on_training_start(self) -> None:
        model = cast(MultiTaskSAC, self.model)  # (added by MultiTaskSAC.learn only)
        obs = model._last_original_obs if model._vec_normalize_env is not None else model._last_obs
        if isinstance(obs, np.ndarray) and obs.ndim == 2:
            _check_first_observations(obs, model.task_names)

    def _on_step(self) -> bool:
        return True


class MultiTaskSAC(SAC):
    """SAC for one-env-per-task multi-task training (MT-SAC when used with an MLP policy).

    Arguments not listed are SB3 SAC's. ``None`` for ``buffer_size``, ``learning_starts`` and ``batch_size``
    picks the paper's per-task values for the env's number of tasks ``T``.

    The constructor raises ``ValueError`` for sizes that are not ints (``buffer_size``, ``batch_size`` >= 1,
    ``learning_starts`` >= 0), a ``batch_size`` that is not a multiple of ``T`` with stratified batches, an env whose
    observation space cannot end with a one-hot over its envs (not a flat Box of at least ``T + 1`` entries, or
    last entries bounded other than by ``[0, 1]``), ``task_names`` or ``policy_kwargs["num_tasks"]`` that do not
    match the number of envs. ``learn()`` checks, before the first env step, that env column ``i`` observes the
    one-hot of task ``i`` (the observations SB3's own reset returned: no extra reset), and warns when it will make no
    gradient step (``num_timesteps + total_timesteps <= learning_starts``).

    :param buffer_size: total transitions (``None``: 100k per task, 200k per task above 10 tasks).
    :param learning_starts: env steps (summed over tasks) of warm-up before the first update
        (``None``: 4,000 per task).
    :param batch_size: transitions per gradient step (``None``: 128 per task).
    :param ent_coef: ``"auto"`` / ``"auto_<init>"`` (learned) or a fixed float.
    :param ent_coef_lr: Adam learning rate of ``log alpha`` (1e-4 in the authors' code).
    :param max_log_ent_coef: upper clamp of ``log alpha`` after each step (0.0 so alpha <= 1; ``None``: off).
    :param per_task_ent_coef: one entropy coefficient per task (``False``: one shared coefficient).
    :param task_loss_reweighting: weight task ``t``'s actor and critic losses by ``T * softmax(-log alpha)_t``.
    :param extreme_task_loss_threshold: drop a task's loss for a step when it exceeds this (``None``: off).
    :param max_grad_norm: gradient-norm clip of the actor, of each critic separately and of ``log alpha``
        (``None``: off).
    :param stratified_batches: the same number of samples from each task per batch.
    :param policy_warmup: collect the warm-up steps with the current policy instead of uniform actions.
    :param half_critic_loss: SB3's ``0.5 * MSE`` critic loss (the authors use the plain squared error).
    :param max_nonfinite_steps: a gradient step whose loss or gradients (actor, critics, ``log alpha``) are not
        finite is skipped (no optimizer step, no target update) with a warning; this many such steps in a row
        raise :class:`~d2r_sb3.common.nonfinite.NonFiniteTrainingError` (an int >= 1; 1: raise at the first).
        A non-finite parameter after an optimizer step, a non-finite action from the policy and a non-finite
        reward or observation from the env always raise at once.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {}
    fused_update: bool = True
    """Take the actor's and the critics' optimizer steps, with the gradient clipping, the parameter check and the
    critics' Polyak update, as one compiled pass over each parameter tensor where that applies (torch's fused Adam
    on CPU tensors, the default; :mod:`d2r_sb3.common.fused_update`), the same values to float rounding; ``False``
    (settable on a model): ``optimizer.step()`` and torch's passes."""
    # A BasePolicy with SACPolicy's actor / critic / critic_target, not an SACPolicy subclass (SAC's train, which
    # needs more, is overridden).
    policy: MultiTaskPolicy  # type: ignore[assignment]
    replay_buffer: MultiTaskReplayBuffer

    def __init__(
        self,
        policy: str | type[MultiTaskPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 3e-4,
        buffer_size: int | None = None,
        learning_starts: int | None = None,
        batch_size: int | None = None,
        tau: float = 0.005,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 1,
        action_noise: ActionNoise | None = None,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        ent_coef: str | float = "auto",
        ent_coef_lr: float = 1e-4,
        max_log_ent_coef: float | None = 0.0,
        target_entropy: str | float = "auto",
        per_task_ent_coef: bool = True,
        task_loss_reweighting: bool = True,
        extreme_task_loss_threshold: float | None = 3e3,
        max_grad_norm: float | None = 1.0,
        stratified_batches: bool = True,
        policy_warmup: bool = True,
        half_critic_loss: bool = False,
        max_nonfinite_steps: int = 3,
        target_update_interval: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        if (
            isinstance(max_nonfinite_steps, bool)
            or not isinstance(max_nonfinite_steps, (int, np.integer))
            or max_nonfinite_steps < 1
        ):
            raise ValueError(
                "max_nonfinite_steps must be an int >= 1 (consecutive skipped non-finite gradient steps before "
                f"training stops), got {max_nonfinite_steps!r}."
            )
        for name, value in (
            ("buffer_size", buffer_size),
            ("learning_starts", learning_starts),
            ("batch_size", batch_size),
        ):
            _check_size_argument(name, value, allow_none=True)
        super().__init__(
            policy,  # type: ignore[arg-type]  # a MultiTaskPolicy, not an SACPolicy (see ``policy`` above)
            env,  # type: ignore[arg-type]  # SAC's stub omits None, which SB3's load passes
            learning_rate=learning_rate,
            buffer_size=buffer_size or 1,
            learning_starts=learning_starts or 0,
            batch_size=batch_size or 1,
            tau=tau,
            gamma=gamma,
            train_freq=train_freq,
            gradient_steps=gradient_steps,
            action_noise=action_noise,
            replay_buffer_class=replay_buffer_class or MultiTaskReplayBuffer,
            replay_buffer_kwargs=dict(replay_buffer_kwargs or {}),
            ent_coef=ent_coef,
            target_update_interval=target_update_interval,
            target_entropy=target_entropy,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=dict(policy_kwargs or {}),
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        unavailable = device_unavailable_reason(device)
        if unavailable is not None and self.device.type != th.device(device).type:  # SB3's silent fallback
            warnings.warn(
                f"device={str(device)!r} was asked for, but {unavailable}: {type(self).__name__} runs on "
                f"{self.device} instead.",
                UserWarning,
                stacklevel=2,
            )
        self.policy_kwargs.pop("use_sde", None)  # SB3 adds it; gSDE is not supported by multi-task policies
        self.ent_coef_lr = ent_coef_lr
        self.max_log_ent_coef = max_log_ent_coef
        self.per_task_ent_coef = per_task_ent_coef
        self.task_loss_reweighting = task_loss_reweighting
        self.extreme_task_loss_threshold = extreme_task_loss_threshold
        self.max_grad_norm = max_grad_norm
        self.policy_warmup = policy_warmup
        self.half_critic_loss = half_critic_loss
        # (a model saved before this option existed loads with these constructor values)
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self._nonfinite_steps = 0  # consecutive skipped gradient steps; not saved
        self._last_routes: np.ndarray | None = None
        if self.env is not None:  # (when loading, these come back from the saved data)
            self.num_tasks = self.n_envs
            names = getattr(self.env, "task_names", None)
            self.task_names = list(names) if names is not None else [f"task{i}" for i in range(self.n_envs)]
            self.buffer_size = (
                default_buffer_size(self.num_tasks) if buffer_size is None else int(buffer_size)
            )
            self.learning_starts = (
                WARMUP_STEPS_PER_TASK * self.num_tasks if learning_starts is None else int(learning_starts)
            )
            self.batch_size = BATCH_PER_TASK * self.num_tasks if batch_size is None else int(batch_size)
            self.replay_buffer_kwargs.setdefault("stratified", stratified_batches)
            # The env preset knows whether its time limit is a true terminal (paper) or a truncation (mw3).
            timeout = getattr(self.env, "handle_timeout_termination", None)
            if timeout is not None:
                self.replay_buffer_kwargs.setdefault("handle_timeout_termination", bool(timeout))
            self.policy_kwargs.setdefault("num_tasks", self.num_tasks)
        if _init_setup_model:
            self._setup_model()

    # --- set-up -----------------------------------------------------------------------------------------
    def _setup_model(self) -> None:
        if getattr(self, "num_tasks", None) is None:
            raise ValueError(f"{type(self).__name__} needs an env: pass one with one sub-env per task.")
        if self.n_envs != self.num_tasks:
            raise ValueError(
                f"This model was built for {self.num_tasks} tasks (one env per task) but the env has "
                f"{self.n_envs} envs: pass an env with one sub-env per task in the same task order."
            )
        self._check_configuration()
        super()._setup_model()
        n_coefs = self.num_tasks if self.per_task_ent_coef else 1
        if isinstance(self.ent_coef, str) and self.ent_coef.startswith("auto"):
            init = float(self.ent_coef.split("_")[1]) if "_" in self.ent_coef else 1.0
            if init <= 0:
                raise ValueError(f"The initial entropy coefficient must be > 0, got {init}.")
            self.log_ent_coef = th.full((n_coefs,), float(np.log(init)), device=self.device).requires_grad_(
                True
            )
            self.ent_coef_optimizer = th.optim.Adam(
                [self.log_ent_coef],
                lr=self.ent_coef_lr,
                **fused_kwargs(th.optim.Adam, {}, [self.log_ent_coef]),
            )
        else:
            self.ent_coef_tensor = th.full((n_coefs,), float(self.ent_coef), device=self.device)
        self._after_gradient_step()
        if self.verbose >= 1:
            print(format_parameter_counts(parameter_counts(self.policy), type(self.policy).__name__))

    def set_parameters(
        self,
        load_path_or_dict: str | dict[str, Any],
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """SB3's ``set_parameters``; the optimizers stay fused (loading a state dict resets the flag)."""
        super().set_parameters(load_path_or_dict, exact_match, device)
        for optimizer in (self.actor.optimizer, self.critic.optimizer):
            restore_fused(optimizer, self.policy.optimizer_kwargs)
        if self.ent_coef_optimizer is not None:
            restore_fused(self.ent_coef_optimizer, {})

    def _check_configuration(self) -> None:
        """Construction-time checks of the sizes, the env's task layout and the policy's number of tasks.

        Only what is known without stepping or resetting the env (a reset would consume its RNG and change
        training): the observation space and ``task_names``. ``learn()`` checks that the first observations
        end with the one-hot of their env column.
        """
        num_tasks = self.num_tasks
        for name in _SIZE_ARGUMENTS:
            _check_size_argument(name, getattr(self, name), allow_none=False)
        stratified = (
            self.replay_buffer_kwargs.get("stratified", False)
            and self.replay_buffer_class is not None  # (never: the constructor defaults it)
            and issubclass(self.replay_buffer_class, MultiTaskReplayBuffer)
        )
        if stratified and self.batch_size % num_tasks != 0:
            lower = max(self.batch_size // num_tasks, 1) * num_tasks
            raise ValueError(
                f"batch_size={self.batch_size} is not a multiple of the number of tasks T={num_tasks}: stratified "
                f"batches (stratified_batches=True, the default) take batch_size / T transitions from every task, so "
                f"batch_size must be a multiple of {num_tasks}, e.g. {BATCH_PER_TASK * num_tasks} (the paper's "
                f"{BATCH_PER_TASK} per task) or {lower}; or pass stratified_batches=False."
            )
        _check_task_layout(self.observation_space, num_tasks)
        if self.env is not None:
            names = getattr(self.env, "task_names", None)
            if names is not None and len(names) != self.n_envs:
                raise ValueError(
                    f"The env names {len(names)} tasks (task_names) but has {self.n_envs} envs: the task id of a "
                    "transition is its env column, so it needs exactly one sub-env per task."
                )
        policy_tasks = self.policy_kwargs.get("num_tasks", num_tasks)
        if policy_tasks != num_tasks:
            raise ValueError(
                f"policy_kwargs num_tasks={policy_tasks!r} does not match the env's {num_tasks} tasks (one sub-env "
                "per task): leave num_tasks out of policy_kwargs, the algorithm sets it from the env."
            )

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_routes", "_nonfinite_steps"]

    # --- collection -------------------------------------------------------------------------------------
    def _sample_action(
        self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.policy_warmup:
            learning_starts = 0  # never uniform: warm up with the (untrained) policy, as the authors do
        uniform = self.num_timesteps < learning_starts and not (self.use_sde and self.use_sde_at_warmup)
        actions, buffer_actions = super()._sample_action(learning_starts, action_noise, n_envs)
        if not np.isfinite(actions).all():  # raise before the env sees it (Meta-World's error is obscure)
            self._raise_nonfinite_actions(actions)
        last_obs = cast(np.ndarray, self._last_obs)  # (flat Box observations, set by the first reset)
        self._last_routes = self.policy.routes_for_buffer(last_obs, acted=not uniform)
        return actions, buffer_actions

    def _raise_nonfinite_actions(self, actions: np.ndarray) -> None:
        rows = nonfinite_rows(actions)
        obs_rows = set(nonfinite_rows(self._last_obs).tolist()) if self._last_obs is not None else set()
        if obs_rows & set(rows.tolist()):  # only the first obs after env.reset() is not checked on arrival
            bad = sorted(obs_rows & set(rows.tolist()))
            raise NonFiniteTrainingError(
                "observation",
                self.num_timesteps,
                self._n_updates,
                [self.task_names[i] for i in bad],
                f"The observation of env column(s) {bad} (from env.reset()) is not finite, so the policy's action "
                "is not either; the env was not stepped.",
            )
        bad_param = first_nonfinite_tensor(self.policy.actor.named_parameters())
        cause = (
            f"the actor's parameter {bad_param!r} is not finite"
            if bad_param is not None
            else "the actor's parameters and the observations are finite, so its computation overflowed"
        )
        raise NonFiniteTrainingError(
            "action",
            self.num_timesteps,
            self._n_updates,
            [self.task_names[i] for i in rows],
            f"The actions the policy chose for env column(s) {rows.tolist()} are not finite ({cause}).",
        )

    def _store_transition(
        self,
        replay_buffer: ReplayBuffer,
        buffer_action: np.ndarray,
        new_obs: np.ndarray | dict[str, np.ndarray],
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        self._check_env_output(new_obs, reward, dones, infos)  # before anything is written to the buffer
        if self._last_routes is not None:
            # (only routing policies return routes; their buffer is this algorithm's MultiTaskReplayBuffer)
            cast(MultiTaskReplayBuffer, replay_buffer).add_routes(
                self._last_routes
            )  # written at buffer.pos, which add() then advances
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)

    def _check_env_output(
        self,
        new_obs: np.ndarray | dict[str, np.ndarray],
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """Raise :class:`NonFiniteTrainingError` if the env returned a non-finite reward or observation."""
        bad_reward = nonfinite_rows(reward)
        bad_obs = set(nonfinite_rows(new_obs).tolist())
        for i in np.flatnonzero(dones):  # the true last observation of an episode that just ended
            terminal = infos[i].get("terminal_observation")
            if terminal is not None and not all_finite(terminal):
                bad_obs.add(int(i))
        if not len(bad_reward) and not bad_obs:
            return
        kind, rows = ("reward", bad_reward.tolist()) if len(bad_reward) else ("observation", sorted(bad_obs))
        values = f" (rewards: {[float(np.asarray(reward)[i]) for i in rows]})" if kind == "reward" else ""
        also = " Its observation was not finite either." if kind == "reward" and bad_obs else ""
        raise NonFiniteTrainingError(
            kind,
            self.num_timesteps,
            self._n_updates,
            [self.task_names[i] for i in rows],
            f"The env returned a non-finite {kind} in env column(s) {rows}{values}.{also}",
        )

    # --- update -----------------------------------------------------------------------------------------
    def _learned_log_ent_coef(self) -> th.Tensor:
        """The learned ``log alpha``; only when ``ent_coef_optimizer`` is set (``_setup_model`` makes both)."""
        assert self.log_ent_coef is not None
        return self.log_ent_coef

    def _entropy_coefficients(self) -> th.Tensor:
        """``log alpha`` per task, ``[T]`` (a shared coefficient is broadcast)."""
        log_alpha = (
            self._learned_log_ent_coef()
            if self.ent_coef_optimizer is not None
            else self.ent_coef_tensor.log()
        )
        return log_alpha.expand(self.num_tasks)

    def task_weights(self) -> th.Tensor:
        """``w_t = T * softmax(-log alpha)_t`` (detached); all ones when reweighting is off."""
        if not self.task_loss_reweighting:
            return th.ones(self.num_tasks, device=self.device)
        return self.num_tasks * F.softmax(-self._entropy_coefficients().detach(), dim=0)

    def _task_losses(self, data: MultiTaskReplayBufferSamples) -> dict[str, th.Tensor]:
        """Per-task losses ``[T]`` of one batch, all from the current (pre-update) parameters."""
        policy = self.policy
        task_ids = data.task_ids
        log_alpha = self._entropy_coefficients()[task_ids]
        alpha = log_alpha.detach().exp()

        actions_pi, log_prob = policy.actor_loss_sample(data.observations, task_ids, data.routes)
        if self.ent_coef_optimizer is not None:
            target_entropy = cast(float, self.target_entropy)  # (a float once _setup_model resolved "auto")
            ent_coef_loss = -(log_alpha * (log_prob + target_entropy).detach())
        else:
            ent_coef_loss = th.zeros_like(log_prob)

        with th.no_grad():
            next_actions, next_log_prob = policy.target_sample(data.next_observations, task_ids)
            next_q = policy.target_q_values(data.next_observations, next_actions, task_ids).min(0).values
            target_q = data.rewards.flatten() + (1 - data.dones.flatten()) * self.gamma * (
                next_q - alpha * next_log_prob
            )

        # [n_critics, B] each: the TD regression's Q values and the actor loss's (critics frozen)
        current_q, q_pi_all = policy.q_values_pair(data.observations, data.actions, actions_pi, task_ids)
        critic_loss = (current_q - target_q).square().sum(0)
        if self.half_critic_loss:
            critic_loss = 0.5 * critic_loss
        q_pi = q_pi_all.min(0).values
        actor_loss = alpha * log_prob - q_pi
        # Means inside each task (0 for a task absent from the batch), with the task counts computed once and
        # without th.bincount (which sizes its output from the data: a host sync on a GPU).
        counts = sum_by_index(log_prob.new_ones(task_ids.shape), task_ids, self.num_tasks).clamp_(min=1)

        def per_task_mean(values: th.Tensor) -> th.Tensor:
            return sum_by_index(values, task_ids, self.num_tasks) / counts

        return {
            "ent_coef_loss": per_task_mean(ent_coef_loss),
            "actor_loss": per_task_mean(actor_loss),
            "critic_loss": per_task_mean(critic_loss),
        }

    def _combine_task_losses(self, losses: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
        """Total loss and the mask of tasks kept this step.

        ``l_t = L_alpha[t] + w_t (L_pi[t] + L_Q[t])``; tasks with ``l_t`` above the threshold are zeroed, and the
        total divides by ``T`` even for masked tasks (authors' code).
        """
        weights = self.task_weights()
        per_task = losses["ent_coef_loss"] + weights * (losses["actor_loss"] + losses["critic_loss"])
        if self.extreme_task_loss_threshold is None:
            kept = th.ones_like(per_task, dtype=th.bool)
        else:
            kept = per_task.detach() <= self.extreme_task_loss_threshold
            per_task = th.where(kept, per_task, th.zeros_like(per_task))
        return per_task.sum() / self.num_tasks, kept

    def _gradient_step(self, data: MultiTaskReplayBufferSamples) -> dict[str, th.Tensor]:
        losses = self._task_losses(data)
        loss, kept = self._combine_task_losses(losses)
        optimizers = [self.actor.optimizer, self.critic.optimizer]
        if self.ent_coef_optimizer is not None:
            optimizers.append(self.ent_coef_optimizer)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fused = self._uses_fused_update()
        if self.max_grad_norm is None:
            grad_stats = self._gradient_sums(optimizers)
        elif fused:
            grad_stats = self._gradient_norms()  # (the fused update applies the clipping)
        else:
            grad_stats = self._clip_gradients(self.max_grad_norm)  # the norms before clipping
        # NaN guard: one host sync decides whether the loss and every gradient are finite.
        if not bool(th.isfinite(th.cat([loss.detach().reshape(1).float(), grad_stats.float()])).all()):
            self._skip_nonfinite_step(optimizers, losses, loss, grad_stats)
            return {**losses, "kept": kept}
        self._nonfinite_steps = 0
        polyak_step = (self._n_updates + 1) % self.target_update_interval == 0
        if fused:
            updated_finite = self._fused_update(grad_stats, polyak_step)
            checked = optimizers[2:]  # log alpha (the fused pass checked the actor and the critics)
        else:
            for optimizer in optimizers:
                optimizer.step()
            updated_finite, checked = True, optimizers
        if self.ent_coef_optimizer is not None and self.max_log_ent_coef is not None:
            with th.no_grad():
                self._learned_log_ent_coef().clamp_(max=self.max_log_ent_coef)
        self._check_parameters(checked, updated_finite)
        self._n_updates += 1
        if polyak_step:
            if not fused:
                # One fused lerp over every tensor (SB3's polyak_update runs two operators per tensor).
                with th.no_grad():
                    th._foreach_lerp_(
                        list(self.critic_target.parameters()), list(self.critic.parameters()), self.tau
                    )
            polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)
        self._after_gradient_step()
        return {**losses, "kept": kept}

    def _clip_gradients(self, max_norm: float) -> th.Tensor:
        """Clip the actor, each critic and ``log alpha`` to ``max_norm`` separately (the authors' clipping), as
        ``torch.nn.utils.clip_grad_norm_`` clips one network.

        The twin critics are one ensemble module; each critic is clipped on its own norm, not on their joint one.

        :return: the gradient norms before clipping, in the order of :meth:`_gradient_norm_names`.
        """
        norms = self._gradient_norms()
        scales = clip_scales(norms, max_norm)
        th._foreach_mul_([p.grad for p in self.actor.parameters() if p.grad is not None], scales[0])
        critic_grads = [p.grad for p in self.critic.parameters() if p.grad is not None]
        if critic_grads:
            scale_members_(critic_grads, scales[1 : 1 + self.policy.n_critics])
        if self.ent_coef_optimizer is not None:
            self._log_alpha_gradient().mul_(scales[-1])
        return norms

    def _gradient_norms(self) -> th.Tensor:
        """The gradient norms of the actor, of each critic and of ``log alpha``, in the order of
        :meth:`_gradient_norm_names` (what :meth:`_clip_gradients` and :meth:`_fused_update` clip with)."""
        actor_grads = [p.grad for p in self.actor.parameters() if p.grad is not None]
        norms = [
            th.linalg.vector_norm(th.stack(th._foreach_norm(actor_grads))).reshape(1),
            member_grad_norms(self.critic.parameters(), self.policy.n_critics)[0],
        ]
        if self.ent_coef_optimizer is not None:
            norms.append(th.linalg.vector_norm(self._log_alpha_gradient()).reshape(1))
        return th.cat([norm.to(norms[0].device) for norm in norms])

    def _log_alpha_gradient(self) -> th.Tensor:
        """The gradient of the learned ``log alpha``."""
        grad = self._learned_log_ent_coef().grad
        assert grad is not None  # (the entropy loss always reaches log alpha)
        return grad

    def _uses_fused_update(self) -> bool:
        """Whether this step's optimizer side is one compiled pass per tensor (:attr:`fused_update`): the actor's and
        the critics' optimizers qualify (:func:`~d2r_sb3.common.fused_update.supports_adam_update`), every actor
        parameter has a gradient, and the critics' optimizer holds exactly the critics' parameters (their targets
        follow them), each with a gradient."""
        if not self.fused_update:
            return False
        actor_opt, critic_opt = self.actor.optimizer, self.critic.optimizer
        if not (supports_adam_update(actor_opt) and supports_adam_update(critic_opt)):
            return False
        critic_params = list(self.critic.parameters())
        stepped = [p for group in critic_opt.param_groups for p in group["params"]]
        return (
            len(stepped) == len(critic_params)
            and all(a is b for a, b in zip(stepped, critic_params, strict=True))
            and all(p.grad is not None for p in critic_params)
            and all(p.grad is not None for group in actor_opt.param_groups for p in group["params"])
        )

    def _fused_update(self, grad_stats: th.Tensor, polyak_step: bool) -> bool:
        """The optimizer steps of a gradient step whose norms (or sums, without clipping) are ``grad_stats``: the
        actor and the critics in one compiled pass per tensor (clipping, Adam, parameter check and, when
        ``polyak_step``, the targets' Polyak step), ``log alpha`` by torch. Returns whether the actor's and the
        critics' new parameters are all finite (if not, :meth:`_check_parameters` stops training with the targets
        already moved, where torch's steps stop before the Polyak update)."""
        n_critics = self.policy.n_critics
        if self.max_grad_norm is not None:
            scales = clip_scales(grad_stats, self.max_grad_norm).tolist()  # actor, each critic, log alpha
        else:
            scales = [1.0] * (1 + n_critics + 1)
        finite = adam_update(self.actor.optimizer, scales[:1])
        targets: dict[th.Tensor, th.Tensor] | None = None
        if polyak_step:
            targets = dict(zip(self.critic.parameters(), self.critic_target.parameters(), strict=True))
        finite &= adam_update(self.critic.optimizer, scales[1 : 1 + n_critics], targets, self.tau)
        if self.ent_coef_optimizer is not None:
            if self.max_grad_norm is not None:
                self._log_alpha_gradient().mul_(scales[-1])
            self.ent_coef_optimizer.step()
        return finite

    def _gradient_sums(self, optimizers: list[th.optim.Optimizer]) -> th.Tensor:
        """Sum of the gradients of each optimizer's parameters (no clipping): finite iff every gradient is.

        Cheaper than norms on a CPU (a sum only reads each gradient once); a sum of finite gradients overflows only
        when they are near float32's limit, which a stable run never reaches.
        """
        sums = []
        for optimizer in optimizers:
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            sums.append(
                th.stack([g.sum() for g in grads]).sum() if grads else th.zeros((), device=self.device)
            )
        return th.stack(sums)

    def _gradient_norm_names(self) -> list[str]:
        """The networks of :meth:`_clip_gradients`' norms (or of :meth:`_gradient_sums` without clipping)."""
        critics = (
            [f"critic {i}" for i in range(self.policy.n_critics)]
            if self.max_grad_norm is not None
            else ["critics"]
        )
        return ["actor", *critics, *(["log alpha"] if self.ent_coef_optimizer is not None else [])]

    # --- NaN guard --------------------------------------------------------------------------------------
    def _skip_nonfinite_step(
        self,
        optimizers: list[th.optim.Optimizer],
        losses: dict[str, th.Tensor],
        loss: th.Tensor,
        grad_stats: th.Tensor,
    ) -> None:
        """Drop a gradient step whose loss or gradients are not finite; raise after too many in a row."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self._nonfinite_steps += 1
        per_task = {
            key: losses[key].detach().float().cpu() for key in ("actor_loss", "critic_loss", "ent_coef_loss")
        }
        bad = th.zeros(self.num_tasks, dtype=th.bool)
        for values in per_task.values():
            bad |= ~th.isfinite(values)
        bad_tasks = th.nonzero(bad).flatten().tolist()
        total = float(loss.detach())
        kind = "loss" if bad_tasks or not np.isfinite(total) else "gradient"
        if bad_tasks:
            shown = bad_tasks
        else:  # no task's loss is non-finite: show the tasks with the largest critic losses
            shown = th.argsort(per_task["critic_loss"].abs(), descending=True)[:3].tolist()

        def task_losses(i: int) -> str:
            return ", ".join(f"{key}={float(values[i]):.4g}" for key, values in per_task.items())

        shown_losses = "; ".join(f"{self.task_names[i]}: {task_losses(i)}" for i in shown)
        bad_grads = [
            name
            for name, value in zip(
                self._gradient_norm_names(), grad_stats.detach().float().cpu(), strict=True
            )
            if not th.isfinite(value)
        ]
        detail = (
            f"Total loss {total:.4g}; non-finite gradients in: {', '.join(bad_grads) or 'none'}. "
            f"Per-task losses ({'non-finite tasks' if bad_tasks else 'largest critic losses'}): {shown_losses}."
        )
        tasks = [self.task_names[i] for i in bad_tasks]
        if self._nonfinite_steps >= self.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                kind,
                self.num_timesteps,
                self._n_updates,
                tasks,
                f"{detail} That is {self._nonfinite_steps} non-finite gradient steps in a row "
                f"(max_nonfinite_steps={self.max_nonfinite_steps}); each was skipped.",
            )
        warnings.warn(
            f"Skipped a gradient step with a non-finite {kind} at env step {self.num_timesteps} (after "
            f"{self._n_updates} updates), task(s): {', '.join(tasks) or 'none singled out'}. {detail} "
            f"({self._nonfinite_steps} in a row; training stops at max_nonfinite_steps={self.max_nonfinite_steps}.)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _guarded_parameters(self) -> list[tuple[str, th.Tensor]]:
        """Every tensor the optimizers update: actor and critic parameters and ``log alpha``."""
        named: list[tuple[str, th.Tensor]] = [(f"actor.{n}", p) for n, p in self.actor.named_parameters()]
        named += [(f"critic.{n}", p) for n, p in self.critic.named_parameters()]
        if self.ent_coef_optimizer is not None:
            named.append(("log_ent_coef", self._learned_log_ent_coef()))
        return named

    def _check_parameters(self, optimizers: list[th.optim.Optimizer], others_finite: bool = True) -> None:
        """Raise :class:`NonFiniteTrainingError` at once if an optimizer step left a non-finite parameter
        (``others_finite``: what the fused update found for the parameters it updated)."""
        params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        # The sum of the per-parameter sums is finite iff every value is (barring an overflow, checked below).
        with th.no_grad():
            if others_finite and (not params or bool(th.isfinite(th.stack([p.sum() for p in params]).sum()))):
                return
        name = first_nonfinite_tensor((n, p.detach()) for n, p in self._guarded_parameters())
        if name is None:
            return  # finite values whose sum overflowed
        raise NonFiniteTrainingError(
            "parameter",
            self.num_timesteps,
            self._n_updates,
            [],
            f"The optimizer step of update {self._n_updates + 1} (its loss and gradients were finite) made {name} "
            "non-finite; the shared weights of every task are affected.",
        )

    def _after_gradient_step(self) -> None:
        """Hook run after every gradient step (D2R refreshes its routing temperatures here)."""

    def _first_use_notice(self) -> str | None:
        """A line :meth:`learn` prints (with ``verbose >= 1``) before it starts when this model's first gradient
        steps will take noticeably longer than the rest (D2R: its loops are compiled); ``None``: nothing to say."""
        return None

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate([self.actor.optimizer, self.critic.optimizer])
        stats: dict[str, th.Tensor] = {}
        for _ in range(gradient_steps):
            stats = self._gradient_step(self.replay_buffer.sample(batch_size, env=self._vec_normalize_env))
        self._log_train_stats(stats)

    def _log_train_stats(self, stats: dict[str, th.Tensor]) -> None:
        """Log the last step's losses and the per-task coefficients (one host sync per ``train()`` call)."""
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        alphas = self._entropy_coefficients().detach().exp().cpu().numpy()
        self.logger.record("train/ent_coef", float(alphas.mean()))
        for key in ("actor_loss", "critic_loss", "ent_coef_loss"):
            if key in stats:
                self.logger.record(f"train/{key}", float(stats[key].detach().mean()))
        if "kept" in stats:
            self.logger.record("train/masked_tasks", int((~stats["kept"]).sum()))
        for name, alpha in zip(self.task_names, alphas, strict=True):
            self.logger.record(f"train/alpha/{short_task_name(name)}", float(alpha))

    # --- helpers ----------------------------------------------------------------------------------------
    def predict(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """SB3's ``predict`` (:meth:`MultiTaskPolicy.predict <d2r_sb3.common.policies.MultiTaskPolicy.predict>`):
        the observations are checked (width, finite, exact task one-hot), any real dtype or a list is accepted,
        one observation gives one action and an empty batch an empty one.

        :raises InvalidObservationError: (a ``ValueError``) for observations that are not
            ``[state, task one-hot]`` of this model; during ``learn()``, a non-finite observation from the env
            raises :class:`~d2r_sb3.common.nonfinite.NonFiniteTrainingError` instead (the NaN guard).
        """
        try:
            return self.policy.predict(observation, state, episode_start, deterministic)
        except InvalidObservationError as err:
            if err.kind != "nonfinite" or observation is not self._last_obs:
                raise
            # Collection acts on the observations of the last env.reset() (every later one is checked on arrival).
            raise NonFiniteTrainingError(
                "observation",
                self.num_timesteps,
                self._n_updates,
                [self.task_names[i] for i in err.rows],
                f"The observation of env column(s) {err.rows} (from env.reset()) is not finite; the policy did not "
                "act on it and the env was not stepped.",
            ) from None

    def learn(
        self: SelfMultiTaskSAC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "SAC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfMultiTaskSAC:
        """SB3's ``learn``; it warns when the call ends inside the warm-up (no gradient step) and, before the first
        env step, checks that env column ``i``'s observation ends with the one-hot of task ``i``."""
        start = 0 if reset_num_timesteps else self.num_timesteps
        if start + total_timesteps <= self.learning_starts:
            warnings.warn(
                f"learn(total_timesteps={total_timesteps}) makes no gradient step: the warm-up lasts "
                f"learning_starts={self.learning_starts:,} env steps (summed over the {self.num_tasks} tasks) and "
                f"{self.learning_starts - start:,} of them remain (num_timesteps={start:,}), so this call only "
                f"collects; {self.learning_starts - start - total_timesteps:,} warm-up steps will remain after it. "
                "Pass a larger total_timesteps or a smaller learning_starts to train.",
                UserWarning,
                stacklevel=2,
            )
        if progress_bar:
            try:
                import rich  # noqa: F401
                import tqdm  # noqa: F401
            except ImportError:
                # SB3 raises for a missing optional dependency; a bar is not worth failing a run for.
                progress_bar = False
                if self.verbose:
                    print(
                        "progress_bar needs `pip install rich tqdm` (the [zoo] extra); continuing without it."
                    )
        if self.verbose >= 1 and (notice := self._first_use_notice()):
            print(notice)
        callbacks: list[BaseCallback] = [_CheckFirstObservations()]
        if isinstance(callback, list):
            callbacks.append(CallbackList(callback))
        elif isinstance(callback, BaseCallback):
            callbacks.append(callback)
        elif callback is not None:
            callbacks.append(ConvertCallback(callback))
        return super().learn(
            total_timesteps,
            callback=CallbackList(callbacks),
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
