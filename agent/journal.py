"""The two files of the queue: requests.jsonl read line by line, results.jsonl appended line by line.

Reading tolerates what writers do to the requests file: a partial last line waits for its newline, an
over-long line is skipped without being held in memory, and a truncated or replaced (rotated) file is read
again from its start.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent import constants, secrets
from agent.results import ResultLine, parse_result_line

log = structlog.get_logger("podq.journal")

# How many bytes before the read offset are remembered to notice a truncate-and-rewrite.
_TAIL_BYTES = 64


@dataclass(frozen=True)
class RawLine:
    offset: int  # byte offset of the line's start in its file
    end: int  # offset just past its newline
    data: bytes | None  # without the newline; None when longer than MAX_LINE_BYTES


class RequestsReader:
    """Complete lines of requests.jsonl from a saved position, following truncation and rotation."""

    def __init__(
        self, path: Path, *, generation: int, dev: int | None, ino: int | None, offset: int, tail: bytes = b"",
        prefix_sha256: str | None = None,
    ) -> None:
        self.path = path
        self.generation = generation
        self.offset = offset
        self._fd: int | None = None
        self._identity = (dev, ino)
        # The last bytes before `offset` as they were read (kept in podq's state across restarts): if they
        # change, the same file was truncated and written again past our offset, which its size cannot tell.
        self.tail = tail
        # sha256 of the file's first `offset` bytes, as recorded when podq last stopped cleanly: a file that
        # replaced it while podq was down and starts with exactly those bytes is the same lines saved anew.
        self._prefix_sha256 = prefix_sha256

    @property
    def dev(self) -> int:
        return self._identity[0] or 0

    @property
    def ino(self) -> int:
        return self._identity[1] or 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def lines(self) -> Iterator[RawLine]:
        """Every complete line not read yet. `offset` advances as lines are yielded."""
        if self._fd is None:
            self._open(first=True)
        while True:
            yield from self._complete_lines()
            change = self._change()
            if change is None:
                return
            if change == "replaced":
                # Lines the old file got between our last read and the switch still count.
                yield from self._complete_lines()
                old, self._fd = self._fd, None
                try:
                    self._open(first=False, old=old)
                finally:
                    if old is not None:
                        os.close(old)

    def prefix_sha256(self) -> str | None:
        """sha256 of the first `offset` bytes of the current file (podq records it when it stops cleanly)."""
        return None if self._fd is None else _prefix_digest(self._fd, self.offset)

    def _open(self, *, first: bool, old: int | None = None) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        if self._identity != (None, None) and identity != self._identity:
            if self._resaved(fd, st.st_size, old):
                log.info("queue.resaved", path=str(self.path), offset=self.offset)  # same lines, new file
            else:
                why = "was replaced while podq was down" if first else "was rotated"
                log.warning("queue.rotated", path=str(self.path), why=why, generation=self.generation + 1)
                self._restart()
        elif st.st_size < self.offset or not self._holds_tail(fd, st.st_size):
            log.warning("queue.truncated", path=str(self.path), size=st.st_size, offset=self.offset,
                        generation=self.generation + 1)
            self._restart()
        self._fd = fd
        self._identity = identity

    def _restart(self) -> None:
        self.generation += 1
        self.offset = 0
        self.tail = b""

    def _change(self) -> str | None:
        """After reading to the end: "replaced" when the path names another file now; "truncated" (and the
        position reset) when ours shrank or was rewritten; None when nothing changed."""
        assert self._fd is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None  # moved away and not yet re-created: wait for the new file
        if (st.st_dev, st.st_ino) != self._identity:
            return "replaced"
        size = os.fstat(self._fd).st_size
        if size < self.offset or not self._holds_tail(self._fd, size):
            log.warning("queue.truncated", path=str(self.path), offset=self.offset, generation=self.generation + 1)
            self._restart()
            return "truncated"
        return None

    def _resaved(self, fd: int, size: int, old: int | None) -> bool:
        """Whether a new file begins with exactly the bytes podq already read (an editor's save of the same
        lines plus new ones): compared byte for byte with the old file, or with the digest from a clean stop."""
        if self.offset == 0 or size < self.offset:
            return False
        if old is not None:
            return _prefix_digest(old, self.offset) == _prefix_digest(fd, self.offset)
        return self._prefix_sha256 is not None and self._prefix_sha256 == _prefix_digest(fd, self.offset)

    def _holds_tail(self, fd: int, size: int) -> bool:
        if not self.tail:
            return True
        if size < self.offset:
            return False
        return os.pread(fd, len(self.tail), self.offset - len(self.tail)) == self.tail

    def _complete_lines(self) -> Iterator[RawLine]:
        assert self._fd is not None
        if not self._holds_tail(self._fd, os.fstat(self._fd).st_size):
            log.warning("queue.truncated", path=str(self.path), offset=self.offset, generation=self.generation + 1)
            self._restart()
        pending = bytearray()
        start = self.offset
        pos = self.offset
        skipping = False
        while True:
            chunk = os.pread(self._fd, constants.READ_CHUNK_BYTES, pos)
            if not chunk:
                return  # a partial line stays unread until its newline arrives
            pos += len(chunk)
            cut = 0
            while (nl := chunk.find(b"\n", cut)) != -1:
                if skipping:
                    data = None
                else:
                    pending += chunk[cut:nl]
                    data = bytes(pending) if len(pending) <= constants.MAX_LINE_BYTES else None
                end = pos - len(chunk) + nl + 1
                self.offset = end
                # Exactly the file's bytes before the new offset (a skipped over-long line included).
                self.tail = os.pread(self._fd, min(_TAIL_BYTES, end), end - min(_TAIL_BYTES, end))
                yield RawLine(start, end, data)
                pending.clear()
                skipping = False
                start = end
                cut = nl + 1
            if not skipping:
                pending += chunk[cut:]
                if len(pending) > constants.MAX_LINE_BYTES:
                    pending.clear()
                    skipping = True


class ResultsJournal:
    """The single writer of results.jsonl: one write() per line on an O_APPEND descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        os.close(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def repair_tail(self) -> None:
        """End a line torn by a crash mid-write (power loss), so the next line starts clean."""
        size = self.size()
        if size and read_range(self.path, size - 1, 1) != b"\n":
            os.write(self._fd, b"\n")
            log.warning("results.repaired_torn_line", path=str(self.path))

    def append(self, line: ResultLine) -> int:
        """Append one line; returns the file's end offset after it (the new checkpoint)."""
        data = secrets.scrub_bytes(line.to_json_line())  # the one place every result line passes
        written = os.write(self._fd, data)
        if written != len(data):  # only on a full disk; finish the line rather than leave it torn
            os.write(self._fd, data[written:])
        return os.lseek(self._fd, 0, os.SEEK_CUR)


def _prefix_digest(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(constants.READ_CHUNK_BYTES, size - pos), pos)
        if not chunk:
            break
        digest.update(chunk)
        pos += len(chunk)
    return digest.hexdigest()


def read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def result_lines(path: Path, offset: int = 0) -> Iterator[tuple[int, ResultLine]]:
    """Complete, well-formed result lines from `offset`, each with the offset just past it."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; a generator can't use `with` across yields cleanly
    except FileNotFoundError:
        return
    with f:
        f.seek(offset)
        pos = offset
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # still being written
            pos += len(raw)
            line = parse_result_line(raw)
            if line is not None:
                yield pos, line
