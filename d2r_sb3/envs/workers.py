"""The env processes of a ``SubprocVecEnv``: who stops them.

Ctrl-C in a terminal, ``timeout -s INT``, Slurm (``scancel``, a job's time limit) and systemd (``KillMode=
control-group``) signal every process of the job, not only the training process. A training run stops on SIGINT
or SIGTERM by first writing a checkpoint, which steps and queries its envs; env workers that died of the same
signal would break that checkpoint (a broken pipe). So only the process that created the workers stops them:

* in a worker, SIGINT and SIGTERM are ignored (:func:`ignore_stop_signals`). A worker ends when it is closed, or
  when its pipe to the creating process closes (that process died, even of SIGKILL);
* in the creating process, every such env still open at interpreter exit is closed then (:func:`close_at_exit`),
  before :mod:`multiprocessing` would terminate its daemon workers with SIGTERM, which they now ignore; a worker
  that does not end within 10 s of being closed is killed, and so is one in the middle of a step.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (registers its exit hook first: ours, registered later, runs before it)
import signal
import weakref

from stable_baselines3.common.vec_env import SubprocVecEnv

__all__ = ["close_at_exit", "ignore_stop_signals"]

_CLOSE_TIMEOUT_S = 10.0
_open_envs: weakref.WeakSet[SubprocVecEnv] = weakref.WeakSet()


def ignore_stop_signals() -> None:
    """Call in an env worker process (the env factory runs there): SIGINT and SIGTERM no longer stop it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def close_at_exit(venv: SubprocVecEnv) -> SubprocVecEnv:
    """Close ``venv`` at interpreter exit if it is still open then (it is not kept alive for that)."""
    _open_envs.add(venv)
    return venv


@atexit.register
def _close_open_envs() -> None:
    for venv in list(_open_envs):
        # Not while a step is in flight (the exit interrupted step_wait): closing would first wait for its result,
        # forever if a worker is stuck; such workers are killed at once.
        closing = not venv.closed and not venv.waiting
        if closing:
            try:
                venv.close()
            except Exception:  # a worker already gone or broken: it is killed below
                pass
        for process in venv.processes:
            if closing:
                process.join(timeout=_CLOSE_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
