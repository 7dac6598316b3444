"""The NaN guard of training: non-finite values are never applied to the weights, stored or saved.

:class:`~d2r_sb3.common.mt_sac.MultiTaskSAC` checks, at little cost:

* every gradient step: the loss and the gradient norms of the actor, the critics and ``log alpha`` (one host
  sync). A non-finite step is skipped (no optimizer step, no target update, the gradients are zeroed) with a
  warning; ``max_nonfinite_steps`` consecutive ones raise :class:`NonFiniteTrainingError`;
* after every optimizer step: the parameters (a non-finite one raises at once);
* every env step: the actions about to be sent to the env, and the rewards and observations it returned
  (raised before the env is stepped, or before the transition is stored).

The helpers here are shared by the trainer, the evaluation callback and :func:`d2r_sb3.save_policy`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch as th

__all__ = [
    "NONFINITE_KINDS",
    "NonFiniteTrainingError",
    "all_finite",
    "first_nonfinite_tensor",
    "nonfinite_rows",
]

NONFINITE_KINDS: tuple[str, ...] = ("loss", "gradient", "parameter", "reward", "observation", "action")

_WEIGHTS_ADVICE = (
    "Lower the learning rate (learning_rate, ent_coef_lr), keep gradient clipping on (max_grad_norm=1.0, the "
    "default) and look for extreme rewards or observations in the env; then resume from the run's last "
    "checkpoint"
)
_ADVICE = {
    "loss": (
        "No optimizer step was applied: the weights in memory are the last finite ones, and the run's last "
        f"checkpoint is untouched. {_WEIGHTS_ADVICE}."
    ),
    "gradient": (
        "No optimizer step was applied: the weights in memory are the last finite ones, and the run's last "
        f"checkpoint is untouched. {_WEIGHTS_ADVICE}."
    ),
    "parameter": (
        "An optimizer step made a weight non-finite, so the model in memory is broken: do not save it (the run's "
        f"last checkpoint is untouched). {_WEIGHTS_ADVICE}."
    ),
    "reward": (
        "The env returned it, so the env is broken (e.g. an unstable simulation or a division by zero in its "
        "reward); the transition was not stored. Check that task's env (reset it, or its seed / goal), then "
        "resume from the run's last checkpoint (it is untouched)."
    ),
    "observation": (
        "The env returned it, so the env is broken (e.g. an unstable simulation); the transition was not "
        "stored. Check that task's env (reset it, or its seed / goal), then resume from the run's last checkpoint "
        "(it is untouched)."
    ),
    "action": (
        "The policy produced it and the env was not stepped. The policy's weights are broken (non-finite, or "
        "so large that its computation overflows, e.g. after a too-large learning rate): do not save this "
        "model. Resume from the run's last checkpoint (it is untouched) with a lower learning rate and "
        "max_grad_norm=1.0."
    ),
}


class NonFiniteTrainingError(RuntimeError):
    """Training met a NaN or an infinity and stopped before applying, storing or saving it.

    Raised by :class:`~d2r_sb3.common.mt_sac.MultiTaskSAC` when ``max_nonfinite_steps`` consecutive gradient
    steps had a non-finite loss or gradient (each one was skipped), when an optimizer step made a parameter
    non-finite, when the policy's actions are non-finite (before the env is stepped) or when the env returned a
    non-finite reward or observation (before it is stored in the replay buffer). The message says what was
    non-finite, when, for which tasks, and what to do.

    :param kind: what was non-finite: one of :data:`NONFINITE_KINDS` (``"loss"``, ``"gradient"``,
        ``"parameter"``, ``"reward"``, ``"observation"``, ``"action"``).
    :param num_timesteps: env steps (summed over tasks) done when it happened.
    :param n_updates: gradient steps applied so far.
    :param tasks: full names of the tasks involved (empty when no task can be singled out).
    :param detail: what exactly was non-finite (per-task loss values, tensor names, env columns, ...).

    :ivar kind: as above.
    :ivar num_timesteps: as above.
    :ivar n_updates: as above.
    :ivar tasks: as above.
    :ivar detail: as above.
    """

    def __init__(
        self, kind: str, num_timesteps: int, n_updates: int, tasks: Sequence[str], detail: str
    ) -> None:
        if kind not in NONFINITE_KINDS:
            raise ValueError(f"Unknown kind {kind!r}; choose one of {NONFINITE_KINDS}.")
        self.kind = kind
        self.num_timesteps = int(num_timesteps)
        self.n_updates = int(n_updates)
        self.tasks = list(tasks)
        self.detail = detail
        where = ", ".join(self.tasks) if self.tasks else "none singled out"
        super().__init__(
            f"Non-finite {kind} at env step {self.num_timesteps} (after {self.n_updates} applied gradient "
            f"update(s)); "
            f"task(s): {where}. {detail} {_ADVICE[kind]}"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable although __init__ takes several arguments
        return type(self), (self.kind, self.num_timesteps, self.n_updates, self.tasks, self.detail)


def all_finite(values: Any) -> bool:
    """Whether an array (or every array of a dict) holds only finite numbers (non-float arrays count as finite)."""
    if isinstance(values, dict):
        return all(all_finite(v) for v in values.values())
    array = np.asarray(values)
    return array.dtype.kind not in "fc" or bool(np.isfinite(array).all())


def nonfinite_rows(values: Any) -> np.ndarray:
    """Indices of the rows (env columns) of ``values`` that hold a NaN or an infinity.

    :param values: ``[n_envs, ...]`` array, or a dict of such arrays (dict observations).
    :return: sorted row indices (empty when every value is finite).
    """
    if isinstance(values, dict):
        rows = [nonfinite_rows(v) for v in values.values()]
        return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)
    array = np.asarray(values)
    if array.dtype.kind not in "fc":
        return np.zeros(0, dtype=np.int64)
    finite = np.isfinite(array)
    if finite.all():
        return np.zeros(0, dtype=np.int64)
    return (
        np.flatnonzero(~finite.reshape(len(array), -1).all(axis=1)) if array.ndim else np.zeros(1, np.int64)
    )


def first_nonfinite_tensor(named_tensors: Iterable[tuple[str, th.Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or an infinity (``None`` if all are finite)."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(th.isfinite(tensor).all()):
            return name
    return None
