"""Putting requests on the queue and following their results: what `podq submit` and `podq tail` are made of."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from agent.admission import admit
from agent.config import Config
from agent.errors import ErrorCode, RequestError
from agent.journal import result_lines
from agent.requests import new_request_id
from agent.results import ResultLine
from agent.state import StateStore
from agent.watch import ChangeSignal

# Followers re-read the file at least this often even without a change notice (inotify can overflow).
_FOLLOW_BACKSTOP_S = 0.5


def append_line(path: Path, data: dict[str, Any]) -> None:
    """Append one request line under an exclusive lock, in a single write, so concurrent submitters never
    interleave. A partial line left by some other writer is ended first, so it cannot swallow ours."""
    line = orjson.dumps(data) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)  # releases the lock


def submit(config: Config, data: dict[str, Any]) -> str:
    """Validate exactly as the daemon will, give the request an id, append it. Returns the id.

    Raises RequestError (with the code the daemon would reject it with) and appends nothing then.
    """
    data = dict(data)
    data.setdefault("id", new_request_id())
    admit(config, data)
    if id_taken(config, data["id"]):
            raise RequestError(
                f"id {data['id']!r} was already used by an earlier request: choose a new id, or leave it out",
                code=ErrorCode.DUPLICATE_ID,
            )
    append_line(config.requests_path, data)
    return str(data["id"])


def id_taken(config: Config, request_id: object) -> bool:
    """Best effort: the daemon has the last word (it rejects a duplicate that slips through here)."""
    state_path = config.queue.dir / "podq.sqlite3"
    if not isinstance(request_id, str) or not state_path.exists():
        return False
    try:
        store = StateStore(state_path, readonly=True)
        try:
            return store.id_taken(request_id)
        finally:
            store.close()
    except sqlite3.Error:
        return False  # the daemon is creating it right now


def results_size(config: Config) -> int:
    try:
        return config.results_path.stat().st_size
    except FileNotFoundError:
        return 0


def follow(
    config: Config,
    offset: int = 0,
    *,
    until: Callable[[ResultLine], bool] = lambda _: False,
    timeout_s: float | None = None,
    on_idle: Callable[[float], None] | None = None,
) -> Iterator[ResultLine]:
    """Result lines from `offset` on, as they are appended, until `until(line)` or `timeout_s` passes.

    `on_idle(waited_s)` is called while nothing arrives (e.g. to say the daemon is not running).
    """
    started = time.monotonic()
    config.queue.dir.mkdir(parents=True, exist_ok=True)
    with ChangeSignal(config.queue.dir, {config.results_path.name}) as changed:
        while True:
            for end, line in result_lines(config.results_path, offset):
                offset = end
                yield line
                if until(line):
                    return
            waited = time.monotonic() - started
            if on_idle is not None:
                on_idle(waited)
            if timeout_s is not None and waited >= timeout_s:
                raise TimeoutError(f"no terminal result within {timeout_s:g} s")
            remaining = _FOLLOW_BACKSTOP_S if timeout_s is None else min(_FOLLOW_BACKSTOP_S, timeout_s - waited)
            changed.wait(max(remaining, 0.0))
