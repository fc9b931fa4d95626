"""The host seam: what podq asks of a machine that runs commands, whatever carries them there.

Commands are built as argv tuples (`Invocation`) and come back as `Completed`; how a host runs them (a
local subprocess today, an SSH channel, later a detached job that survives a dropped link) stays behind
`Host.run`, so parsing, validation and the results journal never change with it.
"""

from __future__ import annotations

import asyncio
import shlex
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from agent import constants

# The host-side `timeout` gets this long after SIGTERM before it sends SIGKILL.
KILL_AFTER_S = 5
# podq's own backstop waits this long past the host-side timeout before it gives up on the command.
BACKSTOP_S = KILL_AFTER_S + 5
# Exit statuses of coreutils `timeout`: the command was stopped (124), or had to be killed (137).
TIMEOUT_EXIT_CODES = frozenset({124, 137})
# stdout is kept whole up to this size for parsing (a result line carries at most MAX_OUTPUT_BYTES of it).
MAX_CAPTURE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Invocation:
    """One command to run on a host: an argv (never a shell string) and its time limit."""

    argv: tuple[str, ...]
    timeout_s: float

    def host_argv(self) -> tuple[str, ...]:
        """The argv as the host runs it: C locale for parseable output, bounded by coreutils `timeout`."""
        return ("env", "LC_ALL=C", "timeout", f"--kill-after={KILL_AFTER_S}", f"{self.timeout_s:g}", *self.argv)

    def command_line(self) -> str:
        """The quoted command line an SSH server's shell receives: no field ever reaches it unquoted."""
        return shlex.join(self.host_argv())


@dataclass(frozen=True)
class Completed:
    """What came back from running an Invocation."""

    exit_code: int | None  # None when the command never reported one (killed, link dropped)
    stdout: bytes
    stderr: bytes
    attempts: int  # connection attempts it took (1 when an open connection was reused)
    stdout_dropped: int = 0  # bytes past MAX_CAPTURE_BYTES that were not kept
    stderr_dropped: int = 0

    @property
    def timed_out(self) -> bool:
        return self.exit_code in TIMEOUT_EXIT_CODES


class Capture:
    """Collects a stream: keeps the head of stdout (to parse), the tail of stderr (where errors are)."""

    def __init__(self, limit: int, *, keep: str) -> None:
        self._limit = limit
        self._keep = keep
        self._buf = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        excess = len(self._buf) - self._limit
        if excess > 0:
            self.dropped += excess
            if self._keep == "head":
                del self._buf[self._limit :]
            else:
                del self._buf[:excess]

    def value(self) -> bytes:
        return bytes(self._buf)


def captures() -> tuple[Capture, Capture]:
    return Capture(MAX_CAPTURE_BYTES, keep="head"), Capture(constants.MAX_OUTPUT_BYTES, keep="tail")


class Host(ABC):
    """A machine podq runs commands on, with a bound on how many run at once."""

    kind: str

    def __init__(self, name: str, workspace: str, max_concurrency: int) -> None:
        self.name = name
        self.workspace = workspace
        self._slots = asyncio.Semaphore(max_concurrency)
        self.running = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the host's concurrency slots for the duration of a command."""
        async with self._slots:
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1

    @abstractmethod
    async def run(self, invocation: Invocation) -> Completed:
        """Run to completion. Raises HostError subclasses for failures of the link, never for exit codes."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare the host (hosts that need nothing keep this)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} running={self.running}>"
