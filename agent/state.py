"""podq's durable state in the queue folder (SQLite, WAL): the read cursor and every request's state.

The protocol that makes a crash lose nothing and repeat nothing:
- a request line is *claimed* (row inserted, cursor advanced) in one transaction before anything is written;
- each result line is appended first, then its state is committed with the results file's new end offset
  (the checkpoint); on start, the few lines past the checkpoint are read back to learn what was written
  after the last commit.
So a row's `state` is the last event known to be in results.jsonl (`received` = claimed, nothing written).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.results import Event, ResultLine, now

RECEIVED = "received"
# Where each state sits in a request's life; results read back during recovery only move a row forward.
_ORDER = {RECEIVED: 0, Event.ACCEPTED.value: 1, Event.STARTED.value: 2}
_TERMINAL_RANK = 3
UNFINISHED = (RECEIVED, Event.ACCEPTED.value, Event.STARTED.value)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    generation INTEGER NOT NULL,        -- bumped each time requests.jsonl is replaced or truncated
    dev INTEGER, ino INTEGER,           -- identity of the file the offset belongs to
    offset INTEGER NOT NULL,            -- bytes of requests.jsonl already claimed
    results_checkpoint INTEGER NOT NULL, -- results.jsonl size at the last committed event
    tail BLOB,                          -- the last bytes before `offset` (to notice a rewrite)
    prefix_sha256 TEXT                  -- sha256 of requests.jsonl's first `offset` bytes, at a clean stop
);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT,
    auto_id INTEGER NOT NULL DEFAULT 0,
    duplicate INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL,
    line_offset INTEGER NOT NULL,
    type TEXT,
    host TEXT,
    state TEXT NOT NULL,
    request BLOB,                       -- the validated request (JSON), to resume after a restart
    meta BLOB,
    error_code TEXT,
    error_message TEXT,
    received_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    duration_s REAL,
    output BLOB                         -- the terminal line's structured output (e.g. artifacts), as JSON
);
CREATE UNIQUE INDEX IF NOT EXISTS requests_id ON requests(id) WHERE id IS NOT NULL AND duplicate = 0;
CREATE INDEX IF NOT EXISTS requests_state ON requests(state);
"""


@dataclass(frozen=True)
class Cursor:
    generation: int
    dev: int | None
    ino: int | None
    offset: int
    results_checkpoint: int
    tail: bytes = b""
    prefix_sha256: str | None = None


@dataclass(frozen=True)
class Row:
    seq: int
    id: str | None
    auto_id: bool
    duplicate: bool
    generation: int
    line_offset: int
    type: str | None
    host: str | None
    state: str
    request: bytes | None
    meta: bytes | None
    error_code: str | None
    error_message: str | None
    received_at: str
    updated_at: str
    duration_s: float | None


@dataclass(frozen=True)
class Claim:
    """A request line taken off requests.jsonl, with what intake decided about it."""

    id: str | None
    generation: int
    line_offset: int
    type: str | None
    host: str | None
    request: bytes | None = None
    meta: bytes | None = None
    auto_id: bool = False
    duplicate: bool = False
    error_code: str | None = None
    error_message: str | None = None


class StateStore:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        else:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode loses nothing when the process dies (only on power loss), at a fraction
            # of FULL's cost per commit.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._db.execute(
                "INSERT OR IGNORE INTO cursor (one, generation, offset, results_checkpoint) VALUES (1, 0, 0, 0)"
            )
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Columns added since a queue folder was first created."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(requests)")}
        if "output" not in columns:
            self._db.execute("ALTER TABLE requests ADD COLUMN output BLOB")
        cursor_columns = {r[1] for r in self._db.execute("PRAGMA table_info(cursor)")}
        if "tail" not in cursor_columns:
            self._db.execute("ALTER TABLE cursor ADD COLUMN tail BLOB")
        if "prefix_sha256" not in cursor_columns:
            self._db.execute("ALTER TABLE cursor ADD COLUMN prefix_sha256 TEXT")

    # -- cursor --------------------------------------------------------------------------------------------

    def cursor(self) -> Cursor:
        # A state file from an older podq, opened read-only (`podq status`), may lack the newer columns.
        columns = {c[1] for c in self._db.execute("PRAGMA table_info(cursor)")}
        tail = "tail" if "tail" in columns else "NULL AS tail"
        prefix = "prefix_sha256" if "prefix_sha256" in columns else "NULL AS prefix_sha256"
        r = self._db.execute(
            f"SELECT generation, dev, ino, offset, results_checkpoint, {tail}, {prefix} FROM cursor"
        ).fetchone()
        return Cursor(r["generation"], r["dev"], r["ino"], r["offset"], r["results_checkpoint"], r["tail"] or b"",
                      r["prefix_sha256"])

    def set_position(self, generation: int, dev: int, ino: int, offset: int, tail: bytes) -> None:
        self._db.execute(
            "UPDATE cursor SET generation = ?, dev = ?, ino = ?, offset = ?, tail = ?, prefix_sha256 = NULL",
            (generation, dev, ino, offset, tail),
        )

    def set_prefix_sha256(self, digest: str | None) -> None:
        """Recorded at a clean stop; any later move of the cursor clears it (see RequestsReader)."""
        self._db.execute("UPDATE cursor SET prefix_sha256 = ?", (digest,))

    def set_checkpoint(self, results_offset: int) -> None:
        self._db.execute("UPDATE cursor SET results_checkpoint = ?", (results_offset,))

    # -- requests ------------------------------------------------------------------------------------------

    def id_taken(self, request_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM requests WHERE id = ? AND duplicate = 0", (request_id,)
        ).fetchone()
        return row is not None

    def claim(self, claim: Claim, *, next_offset: int, dev: int, ino: int, tail: bytes) -> int:
        """Insert the request and move the cursor past its line, atomically. Returns the row's seq."""
        ts = now()
        with self._transaction():
            cur = self._db.execute(
                "INSERT INTO requests (id, auto_id, duplicate, generation, line_offset, type, host, state, request,"
                " meta, error_code, error_message, received_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (claim.id, claim.auto_id, claim.duplicate, claim.generation, claim.line_offset, claim.type,
                 claim.host, RECEIVED, claim.request, claim.meta, claim.error_code, claim.error_message, ts, ts),
            )
            self._db.execute(
                "UPDATE cursor SET generation = ?, dev = ?, ino = ?, offset = ?, tail = ?, prefix_sha256 = NULL",
                (claim.generation, dev, ino, next_offset, tail),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def mark(
        self, seq: int, state: str, *, results_offset: int, duration_s: float | None = None,
        output: bytes | None = None, error_code: str | None = None,
    ) -> None:
        """Record that `state`'s line is in results.jsonl, which now ends at `results_offset`."""
        with self._transaction():
            self._set_state(seq, state, now(), duration_s, output, error_code)
            self._db.execute("UPDATE cursor SET results_checkpoint = ?", (results_offset,))

    def apply(self, line: ResultLine) -> None:
        """Recovery: a result line found past the checkpoint moves its request's state forward."""
        if line.event == Event.PROGRESS:
            return
        if line.event == Event.REJECTED:
            row = self._db.execute(
                "SELECT seq, state FROM requests WHERE state = ? AND line_offset = ? AND id IS ?"
                " ORDER BY seq DESC LIMIT 1",
                (RECEIVED, line.line_offset, line.id),
            ).fetchone()
        else:
            row = self._db.execute(
                "SELECT seq, state FROM requests WHERE id = ? AND duplicate = 0", (line.id,)
            ).fetchone()
        if row is None or _rank(line.event.value) <= _rank(row["state"]):
            return
        output = orjson.dumps(line.output) if line.output is not None else None
        error_code = line.error.code.value if line.error else None
        self._set_state(row["seq"], line.event.value, line.ts, line.duration_s, output, error_code)

    def _set_state(
        self, seq: int, state: str, ts: str, duration_s: float | None, output: bytes | None, error_code: str | None
    ) -> None:
        """A request's new state; what a later event does not say (duration, output, code) is kept."""
        self._db.execute(
            "UPDATE requests SET state = ?, updated_at = ?, duration_s = COALESCE(?, duration_s),"
            " output = COALESCE(?, output), error_code = COALESCE(?, error_code) WHERE seq = ?",
            (state, ts, duration_s, output, error_code, seq),
        )

    def unfinished(self) -> list[Row]:
        rows = self._db.execute(
            f"SELECT * FROM requests WHERE state IN ({','.join('?' * len(UNFINISHED))}) ORDER BY seq", UNFINISHED
        ).fetchall()
        return [_row(r) for r in rows]

    def output_of(self, request_id: str) -> dict[str, Any] | None:
        """The structured output of a request that succeeded, or None."""
        r = self._db.execute(
            "SELECT output FROM requests WHERE id = ? AND duplicate = 0 AND state = 'succeeded'", (request_id,)
        ).fetchone()
        return orjson.loads(r["output"]) if r and r["output"] else None

    def recent(self, limit: int = 20) -> list[Row]:
        rows = self._db.execute("SELECT * FROM requests ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in reversed(rows)]

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state")}

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _rank(state: str) -> int:
    return _ORDER.get(state, _TERMINAL_RANK)


def _row(r: sqlite3.Row) -> Row:
    return Row(
        seq=r["seq"], id=r["id"], auto_id=bool(r["auto_id"]), duplicate=bool(r["duplicate"]),
        generation=r["generation"], line_offset=r["line_offset"], type=r["type"], host=r["host"],
        state=r["state"], request=r["request"], meta=r["meta"], error_code=r["error_code"],
        error_message=r["error_message"], received_at=r["received_at"], updated_at=r["updated_at"],
        duration_s=r["duration_s"],
    )
