"""Periods counted in env steps per task, as multi-task RL papers count them, shared by the training callbacks."""

from __future__ import annotations

import numpy as np

__all__ = ["PerTaskPeriod", "check_freq_per_task"]


def check_freq_per_task(name: str, value: int) -> int:
    """``value`` as an int, or ``ValueError`` naming ``name`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer (env steps per task), got {value!r}.")
    return int(value)


class PerTaskPeriod:
    """Fires once each time the total step count crosses a multiple of ``freq_per_task * num_tasks``.

    It triggers on the algorithm's total step counter, so a resumed run keeps the same schedule.
    """

    def __init__(self, freq_per_task: int) -> None:
        self.freq_per_task = freq_per_task
        self.interval = freq_per_task
        self.last_period = 0

    def start(self, num_tasks: int, num_timesteps: int) -> None:
        self.interval = self.freq_per_task * num_tasks
        self.last_period = num_timesteps // self.interval

    def due(self, num_timesteps: int) -> bool:
        period = num_timesteps // self.interval
        if period > self.last_period:
            self.last_period = period
            return True
        return False
