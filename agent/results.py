"""The result contract: the events podq appends to results.jsonl, one JSON object per line.

Per request, in order: accepted → started → (progress …) → exactly one terminal event. A request that cannot be
accepted gets only `rejected`. Fields are only ever added, never renamed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from agent.errors import ErrorCode


class Event(StrEnum):
    ACCEPTED = "accepted"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_EVENTS


TERMINAL_EVENTS = frozenset({Event.SUCCEEDED, Event.FAILED, Event.REJECTED, Event.TIMED_OUT, Event.CANCELLED})


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str


class Truncated(BaseModel):
    model_config = ConfigDict(frozen=True)

    stdout: bool = False
    stderr: bool = False


class ResultLine(BaseModel):
    """One line of results.jsonl. `id`, `event`, `ts`, `type` and `host` are on every line (null allowed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str | None
    event: Event
    ts: str
    type: str | None
    host: str | None
    meta: dict[str, Any] | None = None
    line_offset: int | None = None  # on `accepted` and `rejected`: the request line's byte offset
    auto_id: bool | None = None  # true when podq assigned the id
    # terminal events
    exit_code: int | None = None
    duration_s: float | None = None
    attempts: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    truncated: Truncated | None = None
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    # progress events
    progress: dict[str, Any] | None = None

    def to_json_line(self) -> bytes:
        data = self.model_dump(mode="json", exclude_none=True)
        # The five fields every line has come first, null included, in the same order on every line.
        head = {key: data.pop(key, None) for key in ("id", "event", "ts", "type", "host")}
        return orjson.dumps({**head, **data}) + b"\n"

    @property
    def terminal(self) -> bool:
        return self.event.terminal


def now() -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-26T00:41:02.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_result_line(line: bytes) -> ResultLine | None:
    """A results.jsonl line, or None for a torn or foreign line (readers skip those)."""
    try:
        return ResultLine.model_validate(orjson.loads(line))
    except (orjson.JSONDecodeError, ValueError):
        return None
