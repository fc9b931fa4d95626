"""One daemon per queue folder: an exclusive flock on `queue/.podq.lock`, held for the daemon's life."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agent.errors import QueueBusy

LOCK_FILE = ".podq.lock"


class QueueLock:
    """Only one daemon serves a queue folder: an exclusive flock held for the daemon's life."""

    def __init__(self, queue_dir: Path) -> None:
        self.path = queue_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> QueueLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QueueBusy(
                f"another podq daemon (pid {holder}) already serves {self.path.parent}: stop it first, or "
                "point this one at another [queue] dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    @staticmethod
    def is_held(queue_dir: Path) -> bool:
        """Whether a daemon is serving `queue_dir` right now."""
        path = queue_dir / LOCK_FILE
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
