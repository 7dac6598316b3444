"""One writer per run folder: a second training or resume into the same folder stops with a clear error.

The lock is an exclusive ``flock`` on ``<folder>/.lock``, held for the life of the process. The operating system
drops it when the process ends in any way (SIGKILL included), so a lock file left by a dead process is free
again: it is taken over, and the caller is told whose it was. The file holds the owner's PID, host and start
time for the error message. ``flock`` is reliable on local disks; on network file systems two hosts may not see
each other's locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["RunLock", "RunLockedError"]

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process is writing the run folder."""


class RunLock:
    """An exclusive lock on a run folder.

    :param folder: The run folder (it must exist).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @staticmethod
    def _read_owner(fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            owner = json.loads(raw.decode() or "{}")
        except ValueError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a lock left by a dead process was taken over.

        :raises RunLockedError: If a live process holds it (the message names its PID and host).
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read_owner(fd)
            os.close(fd)
            who = f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')}, since {owner.get('since', '?')}"
            raise RunLockedError(
                f"{self.folder} is being written by another training process ({who}). Wait for it to finish or "
                f"stop it (SIGINT or SIGTERM write a checkpoint first); two writers would mix their logs and "
                f"checkpoints."
            ) from None
        previous = self._read_owner(fd)
        os.ftruncate(fd, 0)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(owner).encode())
        os.fsync(fd)
        self._fd = fd
        if previous.get("pid") is not None:
            return (
                f"took over the lock of {self.folder} left by PID {previous['pid']} on host "
                f"{previous.get('host', '?')} (that process is gone)"
            )
        return None

    def release(self) -> None:
        """Release the lock and empty the lock file (a released lock names no owner)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
