"""The filesystem-watcher seam: watchdog (inotify on Linux) tells podq when queue files change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer


class _StopRaceFilter(logging.Filter):
    """watchdog logs an error when an event races the observer's stop; nothing is lost, so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StopRaceFilter())


_CHANGES = frozenset({"modified", "created", "moved", "deleted", "closed"})


class _Handler(FileSystemEventHandler):
    def __init__(self, names: frozenset[str], callback: Callable[[], None]) -> None:
        self._names = names
        self._callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Appends are `modified`; rotation shows as `moved`/`created`/`deleted` on either path. Opening or
        # reading a file (`opened`, `closed_no_write`) changes nothing, and a follower that woke on those
        # would wake itself with every read.
        if event.event_type not in _CHANGES:
            return
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        if any(Path(str(p)).name in self._names for p in paths if p):
            self._callback()


class FileWatcher:
    """Calls `callback` (from watchdog's thread) whenever one of `names` in `directory` changes."""

    def __init__(self, directory: Path, names: set[str], callback: Callable[[], None]) -> None:
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(_Handler(frozenset(names), callback), str(directory), recursive=False)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        if self._observer.is_alive():  # start() may never have run (a failure earlier in start-up)
            self._observer.stop()
            self._observer.join(timeout=5)


class ChangeSignal:
    """A FileWatcher for synchronous callers (the CLI): `wait()` returns once the file changed."""

    def __init__(self, directory: Path, names: set[str]) -> None:
        self._event = threading.Event()
        self._watcher = FileWatcher(directory, names, self._event.set)

    def __enter__(self) -> ChangeSignal:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watcher.stop()

    def wait(self, timeout: float) -> bool:
        changed = self._event.wait(timeout)
        self._event.clear()
        return changed
