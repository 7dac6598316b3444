"""Multi-task SAC: the training core shared by D2R and every baseline (D2R_SPEC.md section 3).

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
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from stable_baselines3 import SAC
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import polyak_update
from torch.nn import functional as F

from d2r_sb3.common.buffers import MultiTaskReplayBuffer, MultiTaskReplayBufferSamples
from d2r_sb3.common.clipping import clip_grad_norm_per_member_
from d2r_sb3.common.nonfinite import (
    NonFiniteTrainingError,
    all_finite,
    first_nonfinite_tensor,
    nonfinite_rows,
)
from d2r_sb3.common.params import format_parameter_counts, parameter_counts
from d2r_sb3.common.policies import MultiTaskPolicy

SelfMultiTaskSAC = TypeVar("SelfMultiTaskSAC", bound="MultiTaskSAC")

# The authors' per-task defaults (D2R_SPEC.md sections 0 and 4).
BATCH_PER_TASK = 128
WARMUP_STEPS_PER_TASK = 4000


def default_buffer_size(num_tasks: int) -> int:
    """The paper's replay size: 1e6 on MT10 (100k per task), 1e7 on MT50 (200k per task)."""
    return (100_000 if num_tasks <= 10 else 200_000) * num_tasks


def short_task_name(name: str) -> str:
    """``"peg-insert-side-v3" -> "peg-insert-side"`` (logger keys are truncated at 36 characters)."""
    return name[:-3] if name.endswith("-v3") else name


class MultiTaskSAC(SAC):
    """SAC for one-env-per-task multi-task training (MT-SAC when used with an MLP policy).

    Arguments not listed are SB3 SAC's. ``None`` for ``buffer_size``, ``learning_starts`` and ``batch_size``
    picks the paper's per-task values for the env's number of tasks ``T``.

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
    policy: MultiTaskPolicy
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
        super().__init__(
            policy,
            env,
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
            self.buffer_size = buffer_size or default_buffer_size(self.num_tasks)
            self.learning_starts = (
                WARMUP_STEPS_PER_TASK * self.num_tasks if learning_starts is None else learning_starts
            )
            self.batch_size = batch_size or BATCH_PER_TASK * self.num_tasks
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
        if self.n_envs != self.num_tasks:
            raise ValueError(
                f"This model was built for {self.num_tasks} tasks (one env per task) but the env has "
                f"{self.n_envs} envs: pass an env with one sub-env per task in the same task order."
            )
        super()._setup_model()
        n_coefs = self.num_tasks if self.per_task_ent_coef else 1
        if isinstance(self.ent_coef, str) and self.ent_coef.startswith("auto"):
            init = float(self.ent_coef.split("_")[1]) if "_" in self.ent_coef else 1.0
            if init <= 0:
                raise ValueError(f"The initial entropy coefficient must be > 0, got {init}.")
            self.log_ent_coef = th.full((n_coefs,), float(np.log(init)), device=self.device).requires_grad_(
                True
            )
            self.ent_coef_optimizer = th.optim.Adam([self.log_ent_coef], lr=self.ent_coef_lr)
        else:
            self.ent_coef_tensor = th.full((n_coefs,), float(self.ent_coef), device=self.device)
        self._after_gradient_step()
        if self.verbose >= 1:
            print(format_parameter_counts(parameter_counts(self.policy), type(self.policy).__name__))

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
        self._last_routes = self.policy.routes_for_buffer(self._last_obs, acted=not uniform)
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
            replay_buffer.add_routes(self._last_routes)  # written at buffer.pos, which add() then advances
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
    def _entropy_coefficients(self) -> th.Tensor:
        """``log alpha`` per task, ``[T]`` (a shared coefficient is broadcast)."""
        log_alpha = self.log_ent_coef if self.ent_coef_optimizer is not None else self.ent_coef_tensor.log()
        return log_alpha.expand(self.num_tasks)

    def task_weights(self) -> th.Tensor:
        """``w_t = T * softmax(-log alpha)_t`` (detached); all ones when reweighting is off."""
        if not self.task_loss_reweighting:
            return th.ones(self.num_tasks, device=self.device)
        return self.num_tasks * F.softmax(-self._entropy_coefficients().detach(), dim=0)

    def _per_task_mean(self, values: th.Tensor, task_ids: th.Tensor) -> th.Tensor:
        """Mean of per-sample ``values [B]`` inside each task, ``[T]`` (0 for tasks absent from the batch)."""
        sums = values.new_zeros(self.num_tasks).index_add_(0, task_ids, values)
        counts = th.bincount(task_ids, minlength=self.num_tasks).clamp_(min=1)
        return sums / counts

    def _task_losses(self, data: MultiTaskReplayBufferSamples) -> dict[str, th.Tensor]:
        """Per-task losses ``[T]`` of one batch, all from the current (pre-update) parameters."""
        policy = self.policy
        task_ids = data.task_ids
        log_alpha = self._entropy_coefficients()[task_ids]
        alpha = log_alpha.detach().exp()

        actions_pi, log_prob = policy.actor_loss_sample(data.observations, task_ids, data.routes)
        if self.ent_coef_optimizer is not None:
            ent_coef_loss = -(log_alpha * (log_prob + self.target_entropy).detach())
        else:
            ent_coef_loss = th.zeros_like(log_prob)

        with th.no_grad():
            next_actions, next_log_prob = policy.target_sample(data.next_observations, task_ids)
            next_q = policy.target_q_values(data.next_observations, next_actions, task_ids).min(0).values
            gamma = self.gamma if data.discounts is None else data.discounts.flatten()
            target_q = data.rewards.flatten() + (1 - data.dones.flatten()) * gamma * (
                next_q - alpha * next_log_prob
            )

        current_q = policy.q_values(data.observations, data.actions, task_ids)  # [n_critics, B]
        critic_loss = (current_q - target_q).square().sum(0)
        if self.half_critic_loss:
            critic_loss = 0.5 * critic_loss
        q_pi = policy.q_values_for_actor(data.observations, actions_pi, task_ids).min(0).values
        actor_loss = alpha * log_prob - q_pi
        # The values of _per_task_mean, with the task counts computed once and without th.bincount (which sizes
        # its output from the data: a host sync on a GPU).
        counts = log_prob.new_zeros(self.num_tasks).index_add_(0, task_ids, log_prob.new_ones(task_ids.shape))
        counts = counts.clamp_(min=1)

        def per_task_mean(values: th.Tensor) -> th.Tensor:
            return values.new_zeros(self.num_tasks).index_add_(0, task_ids, values) / counts

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
        if self.max_grad_norm is not None:
            grad_stats = self._clip_gradients(self.max_grad_norm)  # the norms before clipping
        else:
            grad_stats = self._gradient_sums(optimizers)
        # NaN guard: one host sync decides whether the loss and every gradient are finite.
        if not bool(th.isfinite(th.cat([loss.detach().reshape(1).float(), grad_stats.float()])).all()):
            self._skip_nonfinite_step(optimizers, losses, loss, grad_stats)
            return {**losses, "kept": kept}
        self._nonfinite_steps = 0
        for optimizer in optimizers:
            optimizer.step()
        if self.ent_coef_optimizer is not None and self.max_log_ent_coef is not None:
            with th.no_grad():
                self.log_ent_coef.clamp_(max=self.max_log_ent_coef)
        self._check_parameters(optimizers)
        self._n_updates += 1
        if self._n_updates % self.target_update_interval == 0:
            polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
            polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)
        self._after_gradient_step()
        return {**losses, "kept": kept}

    def _clip_gradients(self, max_norm: float) -> th.Tensor:
        """Clip the actor, each critic and ``log alpha`` to ``max_norm`` separately (the authors' clipping).

        The twin critics are one ensemble module; each critic is clipped on its own norm, not on their joint one.

        :return: the gradient norms before clipping, in the order of :meth:`_gradient_norm_names`.
        """
        actor_norm = th.nn.utils.clip_grad_norm_(self.actor.parameters(), max_norm).reshape(1)
        norms = [
            actor_norm,
            clip_grad_norm_per_member_(self.critic.parameters(), max_norm, self.policy.n_critics),
        ]
        if self.ent_coef_optimizer is not None:
            norms.append(th.nn.utils.clip_grad_norm_([self.log_ent_coef], max_norm).reshape(1))
        return th.cat([norm.to(actor_norm.device) for norm in norms])

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

        values = "; ".join(f"{self.task_names[i]}: {task_losses(i)}" for i in shown)
        bad_grads = [
            name
            for name, value in zip(
                self._gradient_norm_names(), grad_stats.detach().float().cpu(), strict=True
            )
            if not th.isfinite(value)
        ]
        detail = (
            f"Total loss {total:.4g}; non-finite gradients in: {', '.join(bad_grads) or 'none'}. "
            f"Per-task losses ({'non-finite tasks' if bad_tasks else 'largest critic losses'}): {values}."
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
        named = [(f"actor.{n}", p) for n, p in self.actor.named_parameters()]
        named += [(f"critic.{n}", p) for n, p in self.critic.named_parameters()]
        if self.ent_coef_optimizer is not None:
            named.append(("log_ent_coef", self.log_ent_coef))
        return named

    def _check_parameters(self, optimizers: list[th.optim.Optimizer]) -> None:
        """Raise :class:`NonFiniteTrainingError` at once if an optimizer step left a non-finite parameter."""
        params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        # The sum of the per-parameter sums is finite iff every value is (barring an overflow, checked below).
        with th.no_grad():
            if bool(th.isfinite(th.stack([p.sum() for p in params]).sum())):
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
    def learn(self: SelfMultiTaskSAC, *args: Any, **kwargs: Any) -> SelfMultiTaskSAC:
        if kwargs.get("progress_bar"):
            try:
                import rich  # noqa: F401
                import tqdm  # noqa: F401
            except ImportError:
                # SB3 raises for a missing optional dependency; a bar is not worth failing a run for.
                kwargs["progress_bar"] = False
                if self.verbose:
                    print(
                        "progress_bar needs `pip install rich tqdm` (the [zoo] extra); continuing without it."
                    )
        return super().learn(*args, **kwargs)
