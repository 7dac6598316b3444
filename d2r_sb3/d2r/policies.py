"""D2R actor, twin critics and :class:`D2RPolicy` (paper Fig. 3 and Eqs. 3-14).

The actor and the critics are the shared :class:`~d2r_sb3.common.actor_critic.TaskActor` and
:class:`~d2r_sb3.common.actor_critic.TaskCritic` on a :class:`~d2r_sb3.d2r.network.RoutedNetwork`; the policy
decides, for each of the five network calls of a gradient step, how they route.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import Schedule

from d2r_sb3.common.actor_critic import TaskActor, TaskCritic
from d2r_sb3.common.policies import MultiTaskPolicy, squashed_gaussian
from d2r_sb3.common.precision import bfloat16_not_native_reason
from d2r_sb3.d2r import skipping
from d2r_sb3.d2r.network import TOPK, RoutedNetwork, RoutedNetworkConfig, RouteRequest
from d2r_sb3.d2r.routing import RoutingPath

OFFPOLICY_ROUTING: tuple[str, ...] = ("resrouting", "none", "target")
TRAIN_PRECISIONS: dict[str, th.dtype] = {"float32": th.float32, "bfloat16": th.bfloat16}
_NETWORK_DEFAULTS = (
    RoutedNetworkConfig()
)  # D2RPolicy's network keyword arguments take their defaults from here


class D2RActor(TaskActor):
    """Tanh-Gaussian actor on a :class:`RoutedNetwork` whose head outputs ``mean || log_std``.

    Acting (``forward``) routes with SampleK when stochastic and TopK when deterministic, and remembers the
    route it used in :attr:`last_route` (``uint8 [B, routed nodes, k]``) so the algorithm can store it.
    Without gradients and for batches up to ``skip_max_batch`` observations, only the modules that the route
    reaches are computed (compute skipping, :mod:`~d2r_sb3.d2r.skipping`; the number computed is kept in
    :attr:`last_modules_computed`). In the update, :meth:`action_log_prob` takes a route request and a compute
    dtype, passed on to the network.

    :param obs_dim: observation size (state + task one-hot).
    :param action_dim: action size.
    :param num_tasks: number of tasks ``T``.
    :param skip_max_batch: compute only reachable modules when acting on at most this many observations.
    :param net_kwargs: network settings for :class:`RoutedNetwork`: ``config=`` a
        :class:`~d2r_sb3.d2r.network.RoutedNetworkConfig` and/or its individual fields.
    """

    net: RoutedNetwork

    def __init__(
        self, obs_dim: int, action_dim: int, num_tasks: int, skip_max_batch: int = 4, **net_kwargs: Any
    ):
        state_dim = obs_dim - num_tasks
        super().__init__(
            RoutedNetwork(state_dim, num_tasks, 2 * action_dim, n_nets=1, **net_kwargs), state_dim
        )
        self.num_tasks = num_tasks
        self.action_dim = action_dim
        self.skip_max_batch = skip_max_batch
        self.sample_k = True
        self.last_route: th.Tensor | None = None
        self.last_modules_computed: int | None = None

    # The base's **net_kwargs are, for a routed network, exactly route and compute_dtype (as in action_log_prob).
    def network_output(  # type: ignore[override]
        self,
        state: th.Tensor,
        task_ids: th.Tensor,
        route: RouteRequest = TOPK,
        compute_dtype: th.dtype | None = None,
    ) -> th.Tensor:
        """The network's output ``[1, B, 2 * action_dim]`` under the given routing (TopK by default)."""
        return self.net(state, task_ids, route, compute_dtype=compute_dtype)[0]

    def action_log_prob(  # type: ignore[override]
        self,
        obs: th.Tensor,
        task_ids: th.Tensor | None = None,
        route: RouteRequest = TOPK,
        compute_dtype: th.dtype | None = None,
    ) -> tuple[th.Tensor, th.Tensor]:
        """Sampled action and its log-probability under the given routing (TopK by default)."""
        return super().action_log_prob(obs, task_ids, route=route, compute_dtype=compute_dtype)

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> th.Tensor:
        state, task_ids = self.split_obs(obs)
        route = RouteRequest(explore=self.sample_k and not deterministic)
        if not th.is_grad_enabled() and obs.shape[0] <= self.skip_max_batch:
            out, sources, computed = skipping.forward_skipping(self.net, state, task_ids, route)
            self.last_modules_computed = computed
        else:
            out, sources = self.net(state, task_ids, route)
            self.last_modules_computed = self.net.n_modules
        self.last_route = self.net.graph.encode(sources[0])
        mean, log_std = out[0].chunk(2, dim=-1)
        return squashed_gaussian(mean, log_std, deterministic, with_log_prob=False)[0]


class D2RCritic(TaskCritic):
    """``n_critics`` routed Q networks evaluated together (ensemble dimension of :class:`RoutedNetwork`).

    Each Q network routes independently: with SampleK every critic draws its own route.

    :param obs_dim: observation size (state + task one-hot).
    :param action_dim: action size.
    :param num_tasks: number of tasks ``T``.
    :param n_critics: number of Q networks.
    :param net_kwargs: network settings for :class:`RoutedNetwork`, as for :class:`D2RActor`.
    """

    net: RoutedNetwork

    def __init__(self, obs_dim: int, action_dim: int, num_tasks: int, n_critics: int = 2, **net_kwargs: Any):
        state_dim = obs_dim - num_tasks
        net = RoutedNetwork(state_dim + action_dim, num_tasks, 1, n_nets=n_critics, **net_kwargs)
        super().__init__(net, state_dim, n_critics)

    # The base's **net_kwargs are, for a routed network, exactly route and compute_dtype (as in q_values).
    def network_output(  # type: ignore[override]
        self,
        state_action: th.Tensor,
        task_ids: th.Tensor,
        detach_params: bool,
        route: RouteRequest = TOPK,
        compute_dtype: th.dtype | None = None,
    ) -> th.Tensor:
        """The networks' output ``[n_critics, B, 1]`` under the given routing (TopK by default)."""
        return self.net(state_action, task_ids, route, detach_params, compute_dtype)[0]

    def q_values(  # type: ignore[override]
        self,
        obs: th.Tensor,
        actions: th.Tensor,
        task_ids: th.Tensor | None = None,
        route: RouteRequest = TOPK,
        detach_params: bool = False,
        compute_dtype: th.dtype | None = None,
    ) -> th.Tensor:
        """``[n_critics, B]`` Q values. The critic's input is ``[s, a]`` plus the task (paper: "an additional input
        parameter (action a_t)").

        :param route: how the critics route (TopK by default).
        :param detach_params: use detached parameters, so gradients reach the actions only (actor loss).
        :param compute_dtype: reduced precision for the products (see :meth:`RoutedNetwork.forward`).
        """
        return super().q_values(
            obs, actions, task_ids, detach_params, route=route, compute_dtype=compute_dtype
        )

    def q_values_pair(
        self,
        obs: th.Tensor,
        actions: th.Tensor,
        frozen_actions: th.Tensor,
        task_ids: th.Tensor,
        route: RouteRequest,
        frozen_route: RouteRequest,
        compute_dtype: th.dtype | None = None,
    ) -> tuple[th.Tensor, th.Tensor]:
        """``(q_values(obs, actions, route=route), q_values(obs, frozen_actions, route=frozen_route,
        detach_params=True))`` in one pass over the networks (:meth:`RoutedNetwork.forward_pair`), each
        ``[n_critics, B]``."""
        state = obs[..., : self.state_dim]
        out, frozen_out = self.net.forward_pair(
            th.cat([state, actions], dim=-1),
            task_ids,
            route,
            th.cat([state, frozen_actions], dim=-1),
            task_ids,
            frozen_route,
            compute_dtype,
            constant_columns=0 if state.requires_grad else self.state_dim,
        )
        return out[..., 0], frozen_out[..., 0]


class D2RPolicy(MultiTaskPolicy):
    """D2R actor-critic policy (alias ``"D2RPolicy"``); defaults are the paper's MT10 network.

    The network settings ``n_modules``, ``module_dim``, ``top_k``, ``routing``, ``routing_level``, ``n_layers``,
    ``encoder_sizes``, ``gate_sizes`` and ``resrouting_shortcut`` are the fields of
    :class:`~d2r_sb3.d2r.network.RoutedNetworkConfig`, documented there with their defaults; the policy keeps
    them in :attr:`network_config` and builds its actor and critics from it.

    :param num_tasks: number of tasks (set by the algorithm from the env).
    :param offpolicy_routing: routes of the actor loss: ``"resrouting"`` (stored behaviour routes with
        ResRouting, default), ``"none"`` (stored routes, every path carries gradient: "w/o ResRouting"),
        ``"target"`` (ignore stored routes, sample fresh ones: "w/ Target Routing") -- paper Fig. 7(b).
    :param sample_k: SampleK when exploring (collection and critic TD routes); ``False`` uses TopK
        ("w/o SampleK", Fig. 7(c)).
    :param skip_max_batch: compute only reachable modules when acting on at most this many observations.
    :param train_precision: ``"float32"`` (default) or ``"bfloat16"``: precision of the encoders' and gates'
        matrix products and, on a GPU, of the routed block in the five network calls of a gradient step (mixed
        precision: parameters, optimiser, routing decisions, heads and losses stay float32; on a CPU the routed
        block does too, see :class:`~d2r_sb3.d2r.routed_block.BlockWorkspace`). Acting, evaluation and the saved
        policy are always float32. bfloat16 is only used where it is native
        (:func:`~d2r_sb3.common.precision.bfloat16_is_native`: a CPU with ``avx512_bf16`` / ``amx_bf16``, or a
        GPU); elsewhere it would be slower than float32, so the gradient steps run in float32 with a warning
        (:attr:`effective_train_precision`). Not in the paper; see the README's Performance section for its
        measured speed and learning effect.
    """

    actor: D2RActor
    critic: D2RCritic
    critic_target: D2RCritic

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_tasks: int,
        n_modules: int = _NETWORK_DEFAULTS.n_modules,
        module_dim: int = _NETWORK_DEFAULTS.module_dim,
        top_k: int = _NETWORK_DEFAULTS.top_k,
        routing: str = _NETWORK_DEFAULTS.routing,
        routing_level: str = _NETWORK_DEFAULTS.routing_level,
        n_layers: int = _NETWORK_DEFAULTS.n_layers,
        encoder_sizes: Sequence[int] = _NETWORK_DEFAULTS.encoder_sizes,
        gate_sizes: Sequence[int] = _NETWORK_DEFAULTS.gate_sizes,
        resrouting_shortcut: str = _NETWORK_DEFAULTS.resrouting_shortcut,
        offpolicy_routing: str = "resrouting",
        sample_k: bool = True,
        skip_max_batch: int = 4,
        train_precision: str = "float32",
        n_critics: int = 2,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        if offpolicy_routing not in OFFPOLICY_ROUTING:
            raise ValueError(
                f"Unknown offpolicy_routing {offpolicy_routing!r}; choose one of {OFFPOLICY_ROUTING}."
            )
        if train_precision not in TRAIN_PRECISIONS:
            raise ValueError(
                f"Unknown train_precision {train_precision!r}; choose one of {tuple(TRAIN_PRECISIONS)}."
            )
        self.network_config = RoutedNetworkConfig(
            n_modules=n_modules,
            module_dim=module_dim,
            top_k=top_k,
            routing=routing,
            routing_level=routing_level,
            n_layers=n_layers,
            encoder_sizes=encoder_sizes,
            gate_sizes=gate_sizes,
            resrouting_shortcut=resrouting_shortcut,
        )
        self.offpolicy_routing = offpolicy_routing
        self.sample_k = sample_k
        self.skip_max_batch = skip_max_batch
        self.train_precision = train_precision
        self._train_dtype_for: dict[str, th.dtype] = {}  # device type -> the dtype actually used there
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            num_tasks,
            n_critics,
            optimizer_class,
            optimizer_kwargs,
        )

    @property
    def net_kwargs(self) -> dict[str, Any]:
        """The network settings as keyword arguments (see :class:`~d2r_sb3.d2r.network.RoutedNetworkConfig`)."""
        return self.network_config.as_kwargs()

    def make_actor(self) -> D2RActor:
        actor = D2RActor(
            self.obs_dim, self.action_dim, self.num_tasks, self.skip_max_batch, config=self.network_config
        )
        actor.sample_k = self.sample_k
        return actor

    def make_critic(self) -> D2RCritic:
        return D2RCritic(
            self.obs_dim, self.action_dim, self.num_tasks, self.n_critics, config=self.network_config
        )

    @property
    def _train_dtype(self) -> th.dtype:
        """The dtype of the gradient steps' products on this policy's device (float32: the plain path, no casts)."""
        kind = self.device.type
        if kind not in self._train_dtype_for:
            dtype = TRAIN_PRECISIONS[self.train_precision]
            reason = bfloat16_not_native_reason(self.device) if dtype == th.bfloat16 else None
            if reason is not None:
                warnings.warn(
                    f"train_precision='bfloat16' is not native on this {kind} ({reason}; it needs avx512_bf16 or "
                    f"amx_bf16 that oneDNN may use, or a GPU), where it would be slower than float32: the gradient "
                    f"steps run in float32 instead.",
                    stacklevel=2,
                )
                dtype = th.float32
            self._train_dtype_for[kind] = dtype
        return self._train_dtype_for[kind]

    @property
    def effective_train_precision(self) -> str:
        """``"float32"`` or ``"bfloat16"``: what the gradient steps use on this device (see ``train_precision``)."""
        return "bfloat16" if self._train_dtype == th.bfloat16 else "float32"

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            self.net_kwargs,
            offpolicy_routing=self.offpolicy_routing,
            sample_k=self.sample_k,
            skip_max_batch=self.skip_max_batch,
            train_precision=self.train_precision,
        )
        return data

    # --- routing --------------------------------------------------------------------------------------
    @property
    def resrouting(self) -> bool:
        return self.offpolicy_routing == "resrouting"

    def set_route_temperature(self, temperature: th.Tensor) -> None:
        for net in (self.actor.net, self.critic.net, self.critic_target.net):
            net.route_temperature.copy_(temperature)

    def _checked_obs(self, obs: Any) -> tuple[th.Tensor, bool]:
        """``obs`` checked (:meth:`check_observations`) as a float32 ``[n, obs_dim]`` tensor, and ``single``."""
        batch, single = self.check_observations(obs)
        return th.as_tensor(batch, device=self.device), single

    @th.no_grad()
    def route(self, obs: Any, deterministic: bool = True) -> RoutingPath:
        """Routing path of the actor (TopK if deterministic, else SampleK).

        :param obs: one observation ``[obs_dim]`` (a path without the batch dimension) or a batch ``[n, obs_dim]``
            (``n`` may be 0); an array of any real dtype, a list or a tensor, checked as ``predict`` checks it.
        :raises InvalidObservationError: (a ``ValueError``) wrong width, non-finite rows or a task part that is
            not exactly a one-hot.
        """
        obs_t, single = self._checked_obs(obs)
        state, task_ids = self.split_obs(obs_t)
        request = RouteRequest(explore=self.sample_k and not deterministic)
        path = self.actor.net.routing_path(state, task_ids, request)
        tensors = (path.edges[0], path.logits[0], path.active[0], path.num_active[0])
        return RoutingPath(*(t[0] if single else t for t in tensors))

    @th.no_grad()
    def critic_route(self, obs: Any, actions: Any, deterministic: bool = True) -> list[RoutingPath]:
        """Routing paths of each critic for ``(obs, actions)`` (TopK if deterministic, else SampleK).

        :param obs: as in :meth:`route`: one observation or a batch, checked as ``predict`` checks it.
        :param actions: the matching action(s) ``[action_dim]`` / ``[n, action_dim]`` (policy scale, in [-1, 1]).
        """
        obs_t, single = self._checked_obs(obs)
        if isinstance(actions, th.Tensor):
            actions = actions.detach().cpu().numpy()
        try:
            actions_np = np.asarray(actions, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"actions must be a numeric array, got {type(actions).__name__}: {err}"
            ) from None
        expected = (self.action_dim,) if single else (len(obs_t), self.action_dim)
        if actions_np.shape != expected and not (len(obs_t) == 0 and actions_np.size == 0):
            what = "one observation" if single else f"{len(obs_t)} observations"
            raise ValueError(f"actions must have shape {expected} for {what}, got {actions_np.shape}.")
        if not np.isfinite(actions_np).all():
            raise ValueError("actions hold NaN or infinite values.")
        actions_t = th.as_tensor(actions_np.reshape(-1, self.action_dim), device=self.device)
        state, task_ids = self.split_obs(obs_t)
        request = RouteRequest(explore=self.sample_k and not deterministic)
        path = self.critic.net.routing_path(th.cat([state, actions_t], -1), task_ids, request)
        paths = [
            RoutingPath(path.edges[i], path.logits[i], path.active[i], path.num_active[i])
            for i in range(self.n_critics)
        ]
        return (
            [RoutingPath(p.edges[0], p.logits[0], p.active[0], p.num_active[0]) for p in paths]
            if single
            else paths
        )

    def routes_for_buffer(self, obs: np.ndarray, acted: bool) -> np.ndarray:
        if acted and self.actor.last_route is not None:
            return self.actor.last_route.cpu().numpy()
        # Uniform warm-up actions (policy_warmup=False): store the route the policy would have sampled.
        with th.no_grad():
            obs_t = th.as_tensor(obs, device=self.device).float()
            state, task_ids = self.split_obs(obs_t)
            _, padded = self.actor.net.encode(state, task_ids)
            sources = self.actor.net.choose_sources(padded, task_ids, RouteRequest(explore=self.sample_k))
            return self.actor.net.graph.encode(sources[0]).cpu().numpy()

    # --- the five calls of the multi-task SAC update (see d2r_sb3.common.policies for the routes of each) -----
    def actor_loss_sample(
        self, obs: th.Tensor, task_ids: th.Tensor, routes: th.Tensor | None
    ) -> tuple[th.Tensor, th.Tensor]:
        if self.offpolicy_routing == "target" or routes is None:
            request = RouteRequest(explore=self.sample_k)
        else:
            request = RouteRequest(stored=routes.unsqueeze(0), resrouting=self.resrouting)
        return self.actor.action_log_prob(obs, task_ids, request, self._train_dtype)

    def target_sample(self, obs: th.Tensor, task_ids: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.actor.action_log_prob(obs, task_ids, TOPK, self._train_dtype)

    def q_values(self, obs: th.Tensor, actions: th.Tensor, task_ids: th.Tensor) -> th.Tensor:
        return self.critic.q_values(obs, actions, task_ids, self._td_route, compute_dtype=self._train_dtype)

    def q_values_for_actor(self, obs: th.Tensor, actions: th.Tensor, task_ids: th.Tensor) -> th.Tensor:
        return self.critic.q_values(
            obs,
            actions,
            task_ids,
            self._actor_loss_route,
            detach_params=True,
            compute_dtype=self._train_dtype,
        )

    def q_values_pair(
        self, obs: th.Tensor, actions: th.Tensor, actions_pi: th.Tensor, task_ids: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor]:
        return self.critic.q_values_pair(
            obs,
            actions,
            actions_pi,
            task_ids,
            self._td_route,
            self._actor_loss_route,
            self._train_dtype,
        )

    @property
    def _td_route(self) -> RouteRequest:
        """The critics' routes in the TD regression: fresh SampleK draws (TopK without SampleK)."""
        return RouteRequest(explore=self.sample_k, resrouting=self.resrouting)

    @property
    def _actor_loss_route(self) -> RouteRequest:
        """The critics' routes in the actor loss: TopK."""
        return RouteRequest(resrouting=self.resrouting)

    def target_q_values(self, obs: th.Tensor, actions: th.Tensor, task_ids: th.Tensor) -> th.Tensor:
        return self.critic_target.q_values(obs, actions, task_ids, TOPK, compute_dtype=self._train_dtype)
