"""PaCo (Sun, Zhang, Xu, Tomizuka, "PaCo: Parameter-Compositional Multi-Task Reinforcement Learning",
NeurIPS 2022) on the multi-task SAC core (alias ``"PaCoPolicy"``, algorithm :class:`PaCoSAC`, ``--algo paco``).

Every network (the actor, each critic) keeps a shared **parameter set** ``Phi = [phi_1, ..., phi_K]``, ``K``
copies of all of its weights and biases, and one **compositional vector** ``w_tau`` (``K`` numbers) per task. The
parameters task ``tau`` uses are their linear combination::

    theta_tau = Phi w_tau = sum_k w_tau[k] * phi_k

so a layer computes ``sum_k w_tau[k] (W_k h + b_k)``, the same thing computed from the K copies' outputs. ``Phi``
is trained by every task's loss, ``w_tau`` by task ``tau``'s only (its row is selected by the task id).

Training stability (the paper's loss maskout and w-reset), in :class:`PaCoSAC`:

* **Loss maskout**: a task whose loss exceeds ``extreme_task_loss_threshold`` (3e3, PaCo's ``task_loss_threshold``)
  is dropped from that gradient step. This is the core's extreme-task masking
  (:class:`~d2r_sb3.common.mt_sac.MultiTaskSAC`), shared with the other methods.
* **w-reset**: after such a step, the masked tasks' compositional vectors are reset. ``reset_method=
  "interpolate"`` (the official code's default) sets ``w_tau`` to a random convex combination of the other tasks'
  vectors; ``"copy"`` copies one other task's vector; ``"random"`` re-initialises it as at construction (a fresh
  start, the reset as the paper describes it). The official code leaves the task's entropy coefficient alone;
  ``reset_log_alpha=True`` also re-initialises ``log alpha_tau`` to its initial value.

Defaults follow the official code's MT10 configuration (``TToTMooN/paco-mtrl``, ``metaworld_mt10_paco_conf.py``):
``K = 5`` parameter sets, MLPs ``[400, 400, 400]`` for the actor and the critics on the state alone (no task
one-hot input), a compositional output layer, all ``K`` sets initialised identically, no loss reweighting by
``softmax(-log alpha)`` (the code's ``temp_reweight=False``; :class:`PaCoSAC` turns the core's
``task_loss_reweighting`` off unless asked). The code publishes no MT50 configuration; we keep ``K = 5`` there.
Parameters of one network::

    K * mlp([in, 400, 400, 400, out]) + T * K

which is 1,700,090 for the MT10 actor (``in`` 39, ``out`` 8), the 1.70M a 2025 re-run reports.

Choices we made:

* **One compositional vector table per network.** The official code shares one task-encoding table ``w`` between
  the actor and the critics, trained by its own optimizer. Here the actor and each critic hold their own
  ``T x K`` table, trained with the network it belongs to (the core's actor and critic optimizers); a reset resets
  every table (and copies the critics' new rows into the target critics, so the TD target uses them at once).
* **Initialisation of w.** Each ``w_tau`` starts at a random point of the simplex (positive, summing to 1), so that
  with identically initialised sets every task starts from a properly scaled network; the code draws ``w`` from
  its default layer initialiser. Afterwards ``w`` is unconstrained (the code's identity ``last_activation``).
* **Initialisation of Phi** is the comparison's common scheme (:mod:`d2r_sb3.baselines.mlp`), copied to the ``K``
  sets when ``identical_init`` (the code's ``use_identical_init=True``).
* **Optimizer state** is not reset with ``w`` (nor in the code).
* ``MultiTaskSAC("PaCoPolicy", env)`` trains the PaCo network with loss maskout but **without** the w-reset, which
  needs :class:`PaCoSAC` (what ``--algo paco`` builds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from d2r_sb3.baselines.actor_critic import TaskNetworkPolicy
from d2r_sb3.baselines.grouped import GroupedLinear
from d2r_sb3.common.buffers import MultiTaskReplayBufferSamples
from d2r_sb3.common.ensemble import output_init_
from d2r_sb3.common.mt_sac import MultiTaskSAC

__all__ = ["PaCoNetwork", "PaCoPolicy", "PaCoSAC", "paco_parameter_count"]

RESET_METHODS = ("interpolate", "copy", "random")


def random_simplex_(weights: th.Tensor) -> th.Tensor:
    """Fill ``weights [..., K]`` with random points of the simplex (positive, each row summing to 1), in place."""
    with th.no_grad():
        weights.uniform_(0.0, 1.0)
        weights.div_(weights.sum(-1, keepdim=True))
    return weights


class PaCoNetwork(nn.Module):
    """``n_nets`` parameter-compositional MLPs (an ensemble, for the twin critics).

    :param in_dim: input size (the task one-hot is not an input: the task picks ``w_tau``).
    :param num_tasks: number of tasks ``T``.
    :param out_dim: output size.
    :param n_nets: ensemble size (1 actor, ``n_critics`` critics).
    :param n_param_sets: size ``K`` of the shared parameter set.
    :param hidden_sizes: hidden layer sizes (ReLU after each); the output layer is compositional too.
    :param identical_init: start the ``K`` parameter sets from the same values (the official code's default).
    """

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        out_dim: int,
        n_nets: int = 1,
        n_param_sets: int = 5,
        hidden_sizes: tuple[int, ...] | list[int] = (400, 400, 400),
        identical_init: bool = True,
    ):
        super().__init__()
        if not isinstance(n_param_sets, int) or n_param_sets < 1:
            raise ValueError(f"n_param_sets must be a positive int, got {n_param_sets!r}.")
        if not hidden_sizes or not all(isinstance(s, int) and s > 0 for s in hidden_sizes):
            raise ValueError(f"hidden_sizes must be a non-empty list of positive sizes, got {hidden_sizes}.")
        self.num_tasks = num_tasks
        self.n_nets = n_nets
        self.n_param_sets = n_param_sets
        sizes = [in_dim, *hidden_sizes, out_dim]
        self.layers = nn.ModuleList(
            GroupedLinear(n_nets, n_param_sets, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        layers = cast("Sequence[GroupedLinear]", self.layers)
        output_init_(layers[-1])
        if identical_init:
            with th.no_grad():
                for layer in layers:
                    layer.weight.copy_(layer.weight[:, :1].expand_as(layer.weight))
                    layer.bias.copy_(layer.bias[:, :1].expand_as(layer.bias))
        self.task_weights = nn.Parameter(random_simplex_(th.empty(n_nets, num_tasks, n_param_sets)))

    def forward(self, x: th.Tensor, task_ids: th.Tensor, detach: bool = False) -> th.Tensor:
        """``x [B, in_dim]``, ``task_ids [B]`` -> ``[n_nets, B, out_dim]``.

        :param detach: use detached parameters (gradient reaches the inputs only).
        """
        task_weights = self.task_weights.detach() if detach else self.task_weights
        w = task_weights[:, task_ids]  # [E, B, K]: w_tau of each sample
        ens, sets = self.n_nets, self.n_param_sets
        hidden = x.expand(ens, sets, *x.shape)
        out = x
        for i, layer in enumerate(self.layers):
            per_set = layer(hidden, detach)  # [E, K, B, out]: W_k h + b_k for every set k
            # theta_tau = Phi w_tau: the composed layer's output is the w_tau-weighted sum of the sets' outputs.
            out = th.einsum("ebk,ekbo->ebo", w, per_set)
            if i < len(self.layers) - 1:
                out = th.relu(out)
                hidden = out.unsqueeze(1).expand(ens, sets, *out.shape[1:])
        return out

    @th.no_grad()
    def reset_tasks(self, tasks: th.Tensor, method: str = "interpolate") -> None:
        """Reset the compositional vectors of the tasks in the boolean mask ``tasks [T]`` (every member).

        ``"interpolate"``: a random convex combination of the other tasks' vectors; ``"copy"``: one other task's
        vector, picked at random; ``"random"``: a fresh draw, as at construction. With no other task left,
        every method falls back to ``"random"``.
        """
        if method not in RESET_METHODS:
            raise ValueError(f"Unknown reset method {method!r}; choose one of {RESET_METHODS}.")
        tasks = tasks.to(self.task_weights.device)
        n_reset, n_kept = int(tasks.sum()), int((~tasks).sum())
        if n_reset == 0:
            return
        table = self.task_weights
        if method == "random" or n_kept == 0:
            table[:, tasks] = random_simplex_(th.empty_like(table[:, tasks]))
            return
        for member in range(self.n_nets):
            mix = th.rand(n_reset, n_kept, device=table.device, dtype=table.dtype)
            if method == "interpolate":
                mix = mix / mix.sum(-1, keepdim=True)
            else:  # copy: a one-hot row picks one healthy task
                mix = nn.functional.one_hot(mix.argmax(-1), n_kept).to(table.dtype)
            table[member, tasks] = mix @ table[member, ~tasks]


def paco_parameter_count(
    in_dim: int, num_tasks: int, out_dim: int, n_param_sets: int, hidden_sizes: list[int]
) -> int:
    """Parameters of one :class:`PaCoNetwork` (the formula of the module docstring)."""
    sizes = [in_dim, *hidden_sizes, out_dim]
    mlp = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=False))
    return n_param_sets * mlp + num_tasks * n_param_sets


class PaCoPolicy(TaskNetworkPolicy):
    """PaCo actor and twin critics (alias ``"PaCoPolicy"``); defaults are the official code's MT10 settings.

    :param num_tasks: number of tasks (set by the algorithm from the env).
    :param n_param_sets: parameter-set size ``K`` (5).
    :param hidden_sizes: hidden sizes of the actor and the critics (``[400, 400, 400]``).
    :param identical_init: initialise the ``K`` parameter sets identically (``True``, the code's default).
    :param n_critics: number of Q networks.
    """

    network_class = PaCoNetwork

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_tasks: int,
        n_param_sets: int = 5,
        hidden_sizes: tuple[int, ...] | list[int] = (400, 400, 400),
        identical_init: bool = True,
        n_critics: int = 2,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        self.net_kwargs: dict[str, Any] = dict(
            n_param_sets=n_param_sets, hidden_sizes=list(hidden_sizes), identical_init=identical_init
        )
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            num_tasks,
            n_critics,
            optimizer_class,
            optimizer_kwargs,
        )

    @th.no_grad()
    def reset_tasks(self, tasks: th.Tensor, method: str = "interpolate") -> None:
        """w-reset of the tasks in the boolean mask ``tasks [T]``: the actor's and the critics' tables, and the
        target critics' copy of the critics' new rows (see :meth:`PaCoNetwork.reset_tasks`)."""
        # (make_network builds PaCoNetworks)
        actor_net, critic_net = cast(PaCoNetwork, self.actor.net), cast(PaCoNetwork, self.critic.net)
        actor_net.reset_tasks(tasks, method)
        critic_net.reset_tasks(tasks, method)
        mask = tasks.to(critic_net.task_weights.device)
        cast(PaCoNetwork, self.critic_target.net).task_weights[:, mask] = critic_net.task_weights[:, mask]


class PaCoSAC(MultiTaskSAC):
    """Multi-task SAC with PaCo's w-reset of the tasks whose loss exceeds the threshold.

    The loss maskout is the core's (``extreme_task_loss_threshold``, 3e3); after every gradient step in which a
    task was masked, its compositional vectors are reset (:meth:`PaCoPolicy.reset_tasks`) and, with
    ``reset_log_alpha``, its ``log alpha`` goes back to its initial value. ``task_loss_reweighting`` defaults to
    ``False`` here (the official code's ``temp_reweight=False``). Arguments not listed are those of
    :class:`~d2r_sb3.common.mt_sac.MultiTaskSAC`.

    :param reset_extreme_tasks: reset masked tasks (``False``: maskout only).
    :param reset_method: ``"interpolate"`` (code), ``"copy"`` or ``"random"`` (see :mod:`d2r_sb3.baselines.paco`).
    :param reset_log_alpha: also re-initialise the masked tasks' entropy coefficients (the code does not).
    """

    policy: PaCoPolicy  # (policy_aliases: MultiTaskSAC's, where d2r_sb3.baselines registers "PaCoPolicy")

    def __init__(
        self,
        policy: str | type[PaCoPolicy] = "PaCoPolicy",
        env: Any = None,
        *args: Any,
        reset_extreme_tasks: bool = True,
        reset_method: str = "interpolate",
        reset_log_alpha: bool = False,
        task_loss_reweighting: bool = False,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ):
        if reset_method not in RESET_METHODS:
            raise ValueError(f"Unknown reset_method {reset_method!r}; choose one of {RESET_METHODS}.")
        self.reset_extreme_tasks = reset_extreme_tasks
        self.reset_method = reset_method
        self.reset_log_alpha = reset_log_alpha
        # (by keyword, through kwargs: mypy cannot tell that *args stops before these)
        kwargs.update(task_loss_reweighting=task_loss_reweighting, _init_setup_model=_init_setup_model)
        super().__init__(policy, env, *args, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.reset_extreme_tasks and not hasattr(self.policy, "reset_tasks"):
            raise ValueError(
                f"PaCoSAC resets tasks' compositional vectors, which {type(self.policy).__name__} does not have: use "
                "PaCoPolicy, or pass reset_extreme_tasks=False."
            )
        self.task_reset_counts = np.zeros(self.num_tasks, dtype=np.int64)

    def _initial_log_ent_coef(self) -> float:
        """``log alpha`` at construction (``ent_coef="auto_<init>"``, 1.0 for ``"auto"``)."""
        text = str(self.ent_coef)
        return float(np.log(float(text.split("_")[1]) if "_" in text else 1.0))

    def _gradient_step(self, data: MultiTaskReplayBufferSamples) -> dict[str, th.Tensor]:
        stats = super()._gradient_step(data)
        if self.reset_extreme_tasks and self.extreme_task_loss_threshold is not None:
            extreme = ~stats["kept"]
            if bool(extreme.any()):  # (one host sync; the core's NaN guard already makes one per step)
                self.reset_tasks(extreme)
        return stats

    def reset_tasks(self, tasks: th.Tensor) -> None:
        """Reset the tasks in the boolean mask ``tasks [T]``: compositional vectors, and ``log alpha`` when
        ``reset_log_alpha`` (only with per-task entropy coefficients learned)."""
        self.policy.reset_tasks(tasks, self.reset_method)
        if self.reset_log_alpha and self.ent_coef_optimizer is not None:
            log_ent_coef = self._learned_log_ent_coef()
            if log_ent_coef.numel() == self.num_tasks:
                with th.no_grad():
                    log_ent_coef[tasks.to(log_ent_coef.device)] = self._initial_log_ent_coef()
        self.task_reset_counts += tasks.cpu().numpy().astype(np.int64)

    def _log_train_stats(self, stats: dict[str, th.Tensor]) -> None:
        super()._log_train_stats(stats)
        self.logger.record("train/paco_resets", int(self.task_reset_counts.sum()))
