"""D2RSAC: multi-task SAC with a D2R policy and automatic route balancing (paper Eqs. 1, 2, 13 and 14)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch as th
from stable_baselines3.common.policies import BasePolicy
from torch.nn import functional as F

from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.d2r import compiled_block
from d2r_sb3.d2r.policies import D2RPolicy
from d2r_sb3.envs import short_task_name

TEMPERATURE_SCALES: tuple[str, ...] = ("num_tasks", "paper")


class D2RSAC(MultiTaskSAC):
    """D2R (Dynamic Depth Routing) on the multi-task SAC core.

    ``D2RSAC("D2RPolicy", make_mt_env("MT10"))`` reproduces the authors' MT10 configuration: batch 1280
    (128 per task), 1e6 replay (100k per task), 40,000 warm-up steps with the untrained policy, one gradient
    step per vector step, per-task alpha with lr 1e-4 and loss reweighting. Arguments not listed are those of
    :class:`~d2r_sb3.common.mt_sac.MultiTaskSAC`.

    :param offpolicy_routing: ``"resrouting"`` | ``"none"`` | ``"target"`` (see :class:`D2RPolicy`).
    :param sample_k: SampleK when exploring (``False``: TopK everywhere, "w/o SampleK").
    :param route_balancing: refresh the per-task routing temperature after every step (Eq. 14);
        ``False`` keeps it at 1 ("w/o Route-Balancing").
    :param route_temperature_scale: ``"num_tasks"`` gives ``tau = T * softmax(-log alpha)`` (authors' code, mean
        1); ``"paper"`` drops the factor ``T`` as Eq. 14 is written (mean ``1 / T``).
    :param min_route_temperature: floor on ``tau``, so that SampleK never degenerates: a task whose alpha is much
        larger than the other tasks' gets a tiny ``tau`` from Eq. 14, which would overflow ``z / tau`` and leave
        fewer than ``k`` sources with a non-zero probability.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"D2RPolicy": D2RPolicy}
    policy: D2RPolicy

    def __init__(
        self,
        policy: str | type[D2RPolicy] = "D2RPolicy",
        env: Any = None,
        *args: Any,
        offpolicy_routing: str = "resrouting",
        sample_k: bool = True,
        route_balancing: bool = True,
        route_temperature_scale: str = "num_tasks",
        min_route_temperature: float = 1e-2,
        policy_kwargs: dict[str, Any] | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ):
        if route_temperature_scale not in TEMPERATURE_SCALES:
            raise ValueError(
                f"Unknown route_temperature_scale {route_temperature_scale!r}; choose one of {TEMPERATURE_SCALES}."
            )
        policy_kwargs = dict(policy_kwargs or {})
        # The routing choices live in the policy (they decide the routes of its calls); reject contradictions.
        for key, value in (("offpolicy_routing", offpolicy_routing), ("sample_k", sample_k)):
            if policy_kwargs.setdefault(key, value) != value:
                raise ValueError(
                    f"{key} is given both as a D2RSAC argument and in policy_kwargs with other values."
                )
        self.route_balancing = route_balancing
        self.route_temperature_scale = route_temperature_scale
        self.min_route_temperature = min_route_temperature
        # (by keyword, through kwargs: mypy cannot tell that *args stops before policy_kwargs)
        kwargs.update(policy_kwargs=policy_kwargs, _init_setup_model=_init_setup_model)
        super().__init__(policy, env, *args, **kwargs)

    def route_temperature(self) -> th.Tensor:
        """Per-task routing temperature ``tau`` from the current entropy coefficients (Eq. 14)."""
        if not self.route_balancing:
            return th.ones(self.num_tasks, device=self.device)
        tau = F.softmax(-self._entropy_coefficients().detach(), dim=0)
        if self.route_temperature_scale == "num_tasks":
            tau = tau * self.num_tasks
        return tau.clamp(min=self.min_route_temperature)

    def _after_gradient_step(self) -> None:
        self.policy.set_route_temperature(self.route_temperature())

    def _first_use_notice(self) -> str | None:
        """On a CPU, where numba has not cached D2R's compiled loops for this machine yet: that they are compiled
        during the first gradient steps (about 20 s on one thread, half a minute on two on a 2-core Xeon), once."""
        if self.device.type != "cpu":
            return None
        cached = compiled_block.is_cached()
        if cached is None or cached[0]:
            return None
        return (
            "D2R's CPU loops are not compiled for this machine yet: numba compiles them during the first gradient "
            f"steps (about 20 s on one thread, more on several) and keeps them in {cached[1]} for later runs."
        )

    def _log_train_stats(self, stats: dict[str, th.Tensor]) -> None:
        super()._log_train_stats(stats)
        for name, tau in zip(self.task_names, self.route_temperature().cpu().tolist(), strict=True):
            self.logger.record(f"train/temp/{short_task_name(name)}", tau)
