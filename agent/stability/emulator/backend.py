"""The emulator's state, shared by every endpoint: accepted keys, credits, queued failures and filters,
the recordings."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass

from PIL import Image

from agent.stability.emulator.contract import CONTENT_FILTERED, INITIAL_CREDITS, OUTPUT_FORMATS, SUCCESS, V2_SEED_MAX
from agent.stability.emulator.images import Artifact, blur, encode, render
from agent.stability.emulator.incoming import RecordedRequest


@dataclass
class _QueuedFailure:
    status: int
    remaining: int
    path: str | None


class Backend:
    """Everything the endpoints share: accepted keys, credits, queued failures and filters, the recordings."""

    def __init__(self, api_keys: set[str] | None, watch_argv_for: str | None) -> None:
        self.api_keys = frozenset(api_keys) if api_keys is not None else None
        self.watch_argv_for = watch_argv_for or None  # an empty secret would match every command line
        self._lock = threading.Lock()
        self._records: list[RecordedRequest] = []
        self._failures: list[_QueuedFailure] = []
        self._filters = 0
        self._credits = INITIAL_CREDITS

    def auth_ok(self, header: str | None) -> bool:
        scheme, _, key = (header or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return False
        return self.api_keys is None or key in self.api_keys

    def record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    def queue_failure(self, status: int, times: int, path: str | None) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), not {status}")
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        with self._lock:
            self._failures.append(_QueuedFailure(status, times, path))

    def take_failure(self, path: str) -> int | None:
        """The status of the first queued failure that applies to `path`, used up by one; None when none does."""
        with self._lock:
            for queued in self._failures:
                if queued.path is None or queued.path == path:
                    queued.remaining -= 1
                    if queued.remaining == 0:
                        self._failures.remove(queued)
                    return queued.status
        return None

    def queue_filters(self, times: int) -> None:
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        with self._lock:
            self._filters += times

    def take_filter(self) -> bool:
        with self._lock:
            if self._filters == 0:
                return False
            self._filters -= 1
            return True

    def charge(self, credits: float) -> None:
        with self._lock:
            self._credits -= credits

    def credits(self) -> float:
        with self._lock:
            return self._credits

    def reset(self) -> None:
        with self._lock:
            self._records.clear()
            self._failures.clear()
            self._filters = 0
            self._credits = INITIAL_CREDITS

    def generate(
        self, source: Image.Image | None, size: tuple[int, int], seed: int, prompt: str, change: float, fmt: str
    ) -> Artifact:
        """One image; seed 0 means random (as the API does), a queued filter makes it CONTENT_FILTERED."""
        seed = seed or secrets.randbelow(V2_SEED_MAX) + 1
        image = render(source, size, seed, prompt, change)
        finish_reason = SUCCESS
        if self.take_filter():
            image, finish_reason = blur(image), CONTENT_FILTERED
        return Artifact(encode(image, fmt), OUTPUT_FORMATS[fmt], seed, finish_reason)
