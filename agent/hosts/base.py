"""The host seam: what podq asks of a machine that runs commands, whatever carries them there.

Commands are built as argv tuples (`Invocation`) and come back as `Completed`; how a host runs them (a
local subprocess today, an SSH channel, later a detached job that survives a dropped link) stays behind
`Host.run`, so parsing, validation and the results journal never change with it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
    """One command to run on a host: an argv (never a shell string) and its time limit.

    `stdin` is how a secret reaches the command: written to its standard input, never in argv (which any
    user of the host can read with `ps`), and left out of repr so it is never logged."""

    argv: tuple[str, ...]
    timeout_s: float
    stdin: bytes | None = field(default=None, repr=False, compare=False)

    def host_argv(self) -> tuple[str, ...]:
        """The argv as the host runs it: C locale for parseable output, bounded by coreutils `timeout`."""
        return ("env", "LC_ALL=C", "timeout", f"--kill-after={KILL_AFTER_S}", f"{self.timeout_s:g}", *self.argv)


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


# Called with ("stdout" | "stderr", line) for each line a command prints, as it prints it.
LineHandler = Callable[[str, str], None]


class Capture:
    """Collects a stream: keeps the head of stdout (to parse), the tail of stderr (where errors are), and
    hands complete lines to a LineHandler as they arrive (progress)."""

    def __init__(self, limit: int, *, keep: str, name: str = "", on_line: LineHandler | None = None) -> None:
        self._limit = limit
        self._keep = keep
        self._buf = bytearray()
        self.dropped = 0
        self._name = name
        self._on_line = on_line
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        if self._on_line is not None:
            self._split(chunk)
        self._buf += chunk
        excess = len(self._buf) - self._limit
        if excess > 0:
            self.dropped += excess
            if self._keep == "head":
                del self._buf[self._limit :]
            else:
                del self._buf[:excess]

    def _split(self, chunk: bytes) -> None:
        assert self._on_line is not None
        # Blender ends some progress lines with a bare carriage return.
        lines = (self._partial + chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        # A line without end is cut at MAX_LINE_BYTES: one runaway writer must not stall the event loop.
        self._partial = lines.pop()[: constants.MAX_LINE_BYTES]
        for line in lines:
            self._on_line(self._name, line[: constants.MAX_LINE_BYTES].decode("utf-8", errors="replace"))

    def close(self) -> None:
        if self._on_line is not None and self._partial:
            self._on_line(self._name, self._partial.decode("utf-8", errors="replace"))
            self._partial = b""

    def value(self) -> bytes:
        return bytes(self._buf)


def captures(on_line: LineHandler | None = None) -> tuple[Capture, Capture]:
    return (
        Capture(MAX_CAPTURE_BYTES, keep="head", name="stdout", on_line=on_line),
        Capture(constants.MAX_OUTPUT_BYTES, keep="tail", name="stderr", on_line=on_line),
    )


class Host(ABC):
    """A machine podq runs commands on, with a bound on how many run at once."""

    kind: str

    def __init__(self, name: str, workspace: str, max_concurrency: int) -> None:
        self.name = name
        self.workspace = workspace
        self._slots = asyncio.Semaphore(max_concurrency)
        self._locks: dict[str, asyncio.Lock] = {}
        self.running = 0

    def lock(self, name: str) -> asyncio.Lock:
        """A named lock for work on this host that must not overlap (e.g. syncing one folder)."""
        return self._locks.setdefault(name, asyncio.Lock())

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
    async def run(self, invocation: Invocation, on_line: LineHandler | None = None) -> Completed:
        """Run to completion. Raises HostError subclasses for failures of the link, never for exit codes.
        `on_line` sees each line of output as it arrives."""

    @abstractmethod
    async def put_files(self, transfers: list[tuple[Path, str]]) -> None:
        """Copy local files to absolute host paths, each replacing its target atomically."""

    @abstractmethod
    async def get_files(self, transfers: list[tuple[str, Path]]) -> None:
        """Copy host files (absolute paths) to local paths, creating local folders as needed."""

    async def reach_local_port(self, port: int) -> int:
        """A port on the host's loopback that reaches `port` on this machine's loopback (e.g. podq's
        Stability emulator). The local host is this machine: the same port."""
        return port

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare the host (hosts that need nothing keep this)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} running={self.running}>"
