"""The daemon: takes request lines off requests.jsonl, runs accepted ones on their hosts, appends results.

`run()` is for people (signals, exit code); `async_run()` is for tests and embedding. The crash-safety
protocol lives in `state.py`; this module follows it: claim a line, then write; write a result, then commit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from agent import constants
from agent.admission import admit, resolve_host, target_for
from agent.blender.scripts import ScriptLibrary
from agent.commands import ExecContext, Outcome, command_for, plan
from agent.commands.base import nonzero, text
from agent.config import Config
from agent.errors import ErrorCode, PodqError, RequestError
from agent.hosts import Host, Invocation, make_host
from agent.hosts.base import BACKSTOP_S, Completed
from agent.journal import RawLine, RequestsReader, ResultsJournal, result_lines
from agent.lock import QueueLock
from agent.requests import REQUEST_ADAPTER, Request, auto_id, decode_line, readable_id
from agent.results import ErrorInfo, Event, ResultLine, Truncated, now
from agent.stability.access import StabilityAccess, emulator_key, load_key
from agent.stability.emulator import StabilityEmulator
from agent.state import RECEIVED, Claim, Row, StateStore
from agent.watch import FileWatcher

log = structlog.get_logger("podq.daemon")

STATE_FILE = "podq.sqlite3"
LOG_FILE = "podq.log"

# Intake yields to running jobs after this many lines, so a burst of appends never starves them.
_INTAKE_BATCH = 100


@dataclass(frozen=True)
class Job:
    """An accepted request, bound to its host and the argv it will run."""

    seq: int
    request: Request
    host: Host
    invocation: Invocation
    meta: dict[str, Any] | None

    @property
    def id(self) -> str:
        assert self.request.id is not None
        return self.request.id

    def line(self, event: Event, **fields: Any) -> ResultLine:
        return ResultLine(id=self.id, event=event, ts=now(), type=self.request.type, host=self.host.name,
                          meta=self.meta, **fields)


class Daemon:
    def __init__(self, config: Config, *, until_idle: bool = False) -> None:
        self.config = config
        self.until_idle = until_idle
        self.queue_dir = config.queue.dir
        self.hosts: dict[str, Host] = {h.name: make_host(h) for h in config.hosts}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._wake = asyncio.Event()
        # Set once the queue is locked and recovery is done: from here on, appended lines are served.
        self.ready = threading.Event()
        self.accepted = 0
        self.rejected = 0
        self.finished = 0
        self.stability: StabilityAccess | None = None
        self._emulator: StabilityEmulator | None = None

    def __repr__(self) -> str:
        return (
            f"<Daemon {self.queue_dir} accepted={self.accepted} rejected={self.rejected} "
            f"finished={self.finished} running={len(self._tasks)}>"
        )

    # -- entry points ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM (or, with until_idle, until nothing is left), then exit 0."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.async_run(stop)

        asyncio.run(main())
        return 0

    async def async_run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        with QueueLock(self.queue_dir):
            self.state = StateStore(self.queue_dir / STATE_FILE)
            self.journal = ResultsJournal(self.config.results_path)

            def wake() -> None:  # called from watchdog's thread
                loop.call_soon_threadsafe(self._wake.set)

            watcher = FileWatcher(self.queue_dir, {self.config.requests_path.name}, wake)
            try:
                for host in self.hosts.values():
                    await host.start()
                self.stability = self._start_stability()
                watcher.start()
                cursor = self.state.cursor()
                self.reader = RequestsReader(
                    self.config.requests_path, generation=cursor.generation, dev=cursor.dev, ino=cursor.ino,
                    offset=cursor.offset, tail=cursor.tail, prefix_sha256=cursor.prefix_sha256,
                )
                log.info("daemon.started", queue=str(self.queue_dir), hosts=list(self.hosts), pid=os.getpid())
                self._recover()
                self.ready.set()
                try:
                    await self._serve(stop)
                finally:
                    await self._drain()  # running jobs finish (or are cancelled) before the journal closes
                self.state.set_prefix_sha256(self.reader.prefix_sha256())  # a clean stop
            finally:
                watcher.stop()
                if self._emulator is not None:
                    self._emulator.stop()
                for host in self.hosts.values():
                    await host.close()
                if hasattr(self, "reader"):
                    self.reader.close()
                self.journal.close()
                self.state.close()
                log.info("daemon.stopped", accepted=self.accepted, rejected=self.rejected, finished=self.finished)

    def _start_stability(self) -> StabilityAccess | None:
        """The real API when a key is configured; podq's emulator when allowed and there is none."""
        settings = self.config.stability
        key = load_key(settings)
        if settings.emulator == "always" or (settings.emulator == "auto" and key is None):
            emulator_secret = emulator_key()
            self._emulator = StabilityEmulator(api_keys={emulator_secret}).start()
            port = int(self._emulator.base_url.rsplit(":", 1)[1])
            log.warning("stability.emulated", base_url=self._emulator.base_url,
                        why="no API key configured" if key is None else "[stability] emulator = always")
            return StabilityAccess(self._emulator.base_url, emulator_secret, emulated=True, local_port=port)
        if key is None:
            return None
        return StabilityAccess(settings.base_url, key)

    async def _serve(self, stop: asyncio.Event) -> None:
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self._wake.clear()
                await self._intake()
                if self.until_idle and not self._tasks:
                    return
                waker = asyncio.create_task(self._wake.wait())
                await asyncio.wait({waker, stopper}, timeout=constants.SAFETY_RECHECK_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
        finally:
            stopper.cancel()
            log.info("daemon.stopping", running=len(self._tasks))

    async def _drain(self) -> None:
        """Stop taking work; let running commands finish within the grace period, then cancel them."""
        self._stopping = True
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=self.config.daemon.shutdown_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- intake ---------------------------------------------------------------------------------------------

    async def _intake(self) -> None:
        for taken, raw in enumerate(self.reader.lines(), start=1):
            try:
                self._take(raw)
            except Exception as exc:  # a line podq cannot handle must not stop it handling the next
                log.exception("request.unprocessable", line_offset=raw.offset)
                self._reject(raw, None, None, RequestError(
                    f"podq could not process this line ({type(exc).__name__}: {exc}); check that it is a small, "
                    "plain JSON object (meta nested at most a few levels)", code=ErrorCode.INVALID_REQUEST))
            if taken % _INTAKE_BATCH == 0:
                await asyncio.sleep(0)
        cursor = self.state.cursor()
        position = (self.reader.generation, self.reader.dev, self.reader.ino, self.reader.offset, self.reader.tail)
        if position != (cursor.generation, cursor.dev, cursor.ino, cursor.offset, cursor.tail):
            self.state.set_position(*position)  # blank lines and rotations claim nothing, but move the cursor

    def _take(self, raw: RawLine) -> None:
        if raw.data is None:
            self._reject(raw, None, None, RequestError(
                f"the line is longer than {constants.MAX_LINE_BYTES} bytes: requests are small JSON objects; "
                "put large data in a file under the workspace and pass its path",
                code=ErrorCode.LINE_TOO_LONG,
            ))
            return
        if not raw.data.strip():
            return  # blank lines are ignored, not rejected
        try:
            data = decode_line(raw.data)
        except RequestError as exc:
            self._reject(raw, None, None, exc)
            return
        given_id = readable_id(data)
        if given_id is not None and self.state.id_taken(given_id):
            self._reject(raw, given_id, data, _duplicate(given_id), duplicate=True)
            return
        try:
            admitted = admit(self.config, data)
        except RequestError as exc:
            self._reject(raw, given_id, data, exc)
            return
        request_id = admitted.request.id or auto_id(self.reader.generation, raw.offset)
        if given_id is None and self.state.id_taken(request_id):
            self._reject(raw, request_id, data, _duplicate(request_id), duplicate=True)
            return
        request = admitted.request.model_copy(update={"id": request_id})
        host = self.hosts[admitted.host.name]
        meta = request.meta
        seq = self.state.claim(
            Claim(id=request_id, generation=self.reader.generation, line_offset=raw.offset, type=request.type,
                  host=host.name, request=_request_json(request), meta=_meta_json(meta),
                  auto_id=given_id is None),
            next_offset=raw.end, dev=self.reader.dev, ino=self.reader.ino, tail=self.reader.tail,
        )
        job = Job(seq, request, host, admitted.invocation, meta)
        self._accept(job, raw.offset, auto=given_id is None)

    def _accept(self, job: Job, line_offset: int, *, auto: bool) -> None:
        self._write(job.seq, job.line(Event.ACCEPTED, line_offset=line_offset, auto_id=auto or None))
        self.accepted += 1
        log.info("request.accepted", id=job.id, type=job.request.type, host=job.host.name)
        self._schedule(job)

    def _reject(
        self, raw: RawLine, request_id: str | None, data: dict[str, Any] | None, error: RequestError,
        *, duplicate: bool = False,
    ) -> None:
        data = data or {}
        kind = _short_str(data.get("type"))
        host = _short_str(data.get("host"))
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else None
        try:
            meta_json = _meta_json(meta)
        except (TypeError, orjson.JSONEncodeError):
            meta, meta_json = None, None  # too deep to echo back
        seq = self.state.claim(
            Claim(id=request_id, generation=self.reader.generation, line_offset=raw.offset, type=kind, host=host,
                  meta=meta_json, duplicate=duplicate, error_code=error.code.value,
                  error_message=error.message),
            next_offset=raw.end, dev=self.reader.dev, ino=self.reader.ino, tail=self.reader.tail,
        )
        self._write_rejection(seq, request_id, kind, host, meta, raw.offset, error.code, error.message)

    def _write_rejection(
        self, seq: int, request_id: str | None, kind: str | None, host: str | None, meta: dict[str, Any] | None,
        line_offset: int, code: ErrorCode, message: str,
    ) -> None:
        line = ResultLine(id=request_id, event=Event.REJECTED, ts=now(), type=kind, host=host, meta=meta,
                          line_offset=line_offset, error=ErrorInfo(code=code, message=message))
        self._write(seq, line)
        self.rejected += 1
        log.info("request.rejected", id=request_id, line_offset=line_offset, code=code.value)

    # -- execution ------------------------------------------------------------------------------------------

    def _schedule(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(job), name=f"podq-{job.id}")
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._wake.set()

        task.add_done_callback(done)

    async def _execute(self, job: Job) -> None:
        command = command_for(job.request)
        ctx = ExecContext(
            host=job.host, target=target_for(self.config, resolve_host(self.config, job.host.name)),
            request_id=job.id, progress=lambda data: self._progress(job, data),
            artifacts_dir=self.config.artifacts.dir, scripts=ScriptLibrary(self.config.scripts_dir),
            job_output=self.state.output_of, stability=self.stability,
            stability_settings=self.config.stability,
        )
        async with job.host.slot():
            if self._stopping:
                return  # never started: it stays `accepted` and runs on the next start
            self._write(job.seq, job.line(Event.STARTED))
            started = time.monotonic()
            limit = job.invocation.timeout_s + BACKSTOP_S
            try:
                # The whole job (sync, run, downloads, every stage) is bounded, not only its main command.
                async with asyncio.timeout(limit):
                    completed, outcome = await command.execute(job.request, job.invocation, ctx)
            except TimeoutError:
                self._finish(job, Event.TIMED_OUT, started, error=ErrorInfo(code=ErrorCode.TIMEOUT, message=(
                    f"the job took longer than its timeout_s of {job.invocation.timeout_s:g} s and was stopped: "
                    "raise `timeout_s` in the request if it needs longer")))
                return
            except PodqError as exc:
                self._finish(job, Event.FAILED, started, attempts=getattr(exc, "attempts", 1),
                             error=ErrorInfo(code=exc.code, message=exc.message))
                return
            except asyncio.CancelledError:
                self._finish(job, Event.CANCELLED, started, error=ErrorInfo(
                    code=ErrorCode.CANCELLED,
                    message=f"podq was stopped and this command did not finish within the "
                    f"{self.config.daemon.shutdown_grace_s:g} s shutdown grace; resubmit it under a new id",
                ))
                raise
            except Exception as exc:
                self._internal_error(job, started, exc)
                return
            try:
                self._finish_completed(job, completed, outcome, started)
            except Exception as exc:
                self._internal_error(job, started, exc)

    def _internal_error(self, job: Job, started: float, exc: Exception) -> None:
        """A bug in podq: report it on the request and keep serving the others."""
        log.exception("request.internal_error", id=job.id)
        self._finish(job, Event.FAILED, started, error=ErrorInfo(
            code=ErrorCode.INTERNAL, message=f"podq failed internally ({exc!r}); see {LOG_FILE}",
        ))

    def _progress(self, job: Job, data: dict[str, Any]) -> None:
        # Progress lines are informational: not committed to state, never replayed after a crash.
        self.journal.append(job.line(Event.PROGRESS, progress=data))

    def _finish_completed(self, job: Job, completed: Completed, outcome: Outcome, started: float) -> None:
        duration = time.monotonic() - started
        timeout_s = job.invocation.timeout_s
        common: dict[str, Any] = {"exit_code": completed.exit_code, "attempts": completed.attempts}
        if (completed.exit_code is None and duration >= timeout_s) or (
            completed.timed_out and duration >= timeout_s * 0.98
        ):
            self._finish(job, Event.TIMED_OUT, started, **common, **_streams(completed, keep_stdout=True),
                         output=outcome.output, error=ErrorInfo(code=ErrorCode.TIMEOUT, message=(
                             f"the command ran longer than its timeout_s of {timeout_s:g} s and was stopped: "
                             "raise `timeout_s` in the request if it needs longer")))
            return
        if completed.exit_code is None:
            self._finish(job, Event.FAILED, started, **common, **_streams(completed, keep_stdout=True),
                         error=ErrorInfo(code=ErrorCode.NONZERO_EXIT,
                                         message="the command was killed by a signal before it exited"))
            return
        if outcome.error_code is not None:
            self._finish(job, Event.FAILED, started, **common, **_streams(completed, keep_stdout=True),
                         output=outcome.output,
                         error=ErrorInfo(code=outcome.error_code, message=outcome.error_message or ""))
            return
        if not outcome.command_ran:
            self._finish(job, Event.SUCCEEDED, started, attempts=completed.attempts, output=outcome.output)
            return
        if completed.exit_code != 0:  # e.g. killed (137) well before its timeout: never a success
            failure = nonzero(completed)
            self._finish(job, Event.FAILED, started, **common, **_streams(completed, keep_stdout=True),
                         output=outcome.output,
                         error=ErrorInfo(code=ErrorCode.NONZERO_EXIT, message=failure.error_message or ""))
            return
        self._finish(job, Event.SUCCEEDED, started, **common,
                     **_streams(completed, keep_stdout=outcome.keep_stdout), output=outcome.output)

    def _finish(self, job: Job, event: Event, started: float, **fields: Any) -> None:
        duration = round(time.monotonic() - started, 3)
        fields.setdefault("attempts", 1)
        output = fields.get("output")
        error = fields.get("error")
        self._write(job.seq, job.line(event, duration_s=duration, **fields), duration_s=duration,
                    output=orjson.dumps(output) if output is not None else None,
                    error_code=error.code.value if error else None)
        self.finished += 1
        log.info("request.finished", id=job.id, type=job.request.type, host=job.host.name, outcome=event.value,
                 duration_s=duration, code=error.code.value if error else None)

    # -- the journal ----------------------------------------------------------------------------------------

    def _write(
        self, seq: int, line: ResultLine, *, duration_s: float | None = None, output: bytes | None = None,
        error_code: str | None = None,
    ) -> None:
        """Append the line, then commit that it is there (the order recovery relies on)."""
        end = self.journal.append(line)
        self.state.mark(seq, line.event.value, results_offset=end, duration_s=duration_s, output=output,
                        error_code=error_code or (line.error.code.value if line.error else None))

    def _recover(self) -> None:
        """Bring state up to what results.jsonl shows, then finish what a crash or stop left open."""
        self.journal.repair_tail()
        checkpoint = self.state.cursor().results_checkpoint
        if self.journal.size() < checkpoint:
            checkpoint = 0  # results.jsonl was truncated or replaced: read it all back
        for _, line in result_lines(self.config.results_path, checkpoint):
            self.state.apply(line)
        self.state.set_checkpoint(self.journal.size())
        resumed = interrupted = 0
        for row in self.state.unfinished():
            if row.state == RECEIVED and row.error_code is not None:
                self._write_rejection(row.seq, row.id, row.type, row.host, _meta(row), row.line_offset,
                                      ErrorCode(row.error_code), row.error_message or "")
            elif row.state == Event.STARTED.value:
                interrupted += 1
                self._write(row.seq, _row_line(row, Event.FAILED, error=ErrorInfo(
                    code=ErrorCode.INTERRUPTED,
                    message="podq stopped (crash or kill) while this command ran, so its outcome is unknown; "
                    "it is not run again: resubmit it under a new id if it should run",
                )))
                self.finished += 1
            else:
                resumed += 1
                self._resume(row)
        if resumed or interrupted:
            log.info("daemon.recovered", resumed=resumed, interrupted=interrupted)

    def _resume(self, row: Row) -> None:
        """A request claimed (and maybe accepted) before a restart, never started: run it now."""
        assert row.request is not None
        try:
            request = REQUEST_ADAPTER.validate_json(row.request)
            host_config = resolve_host(self.config, request.host)
            host = self.hosts[host_config.name]
            job = Job(row.seq, request, host, plan(request, target_for(self.config, host_config)), _meta(row))
        except RequestError as exc:
            # The config changed under it (e.g. its host is gone): it can no longer run.
            if row.state == RECEIVED:
                self._write_rejection(row.seq, row.id, row.type, row.host, _meta(row), row.line_offset,
                                      exc.code, exc.message)
            else:
                self._write(row.seq, _row_line(row, Event.FAILED, error=ErrorInfo(code=exc.code,
                                                                                  message=exc.message)))
            return
        if row.state == RECEIVED:
            self._accept(job, row.line_offset, auto=row.auto_id)
        else:
            self.accepted += 1
            self._schedule(job)


def _duplicate(request_id: str) -> RequestError:
    return RequestError(
        f"id {request_id!r} was already used by an earlier request, which is unaffected: give every request "
        "a new id (or leave `id` out and podq assigns one)",
        code=ErrorCode.DUPLICATE_ID,
    )


def _streams(completed: Completed, *, keep_stdout: bool) -> dict[str, Any]:
    cap = constants.MAX_OUTPUT_BYTES
    fields: dict[str, Any] = {"stderr": text(completed.stderr[-cap:])}
    truncated = Truncated(stdout=False, stderr=completed.stderr_dropped > 0 or len(completed.stderr) > cap)
    if keep_stdout:
        fields["stdout"] = text(completed.stdout[-cap:])
        truncated = truncated.model_copy(
            update={"stdout": completed.stdout_dropped > 0 or len(completed.stdout) > cap}
        )
    fields["truncated"] = truncated
    return fields


def _request_json(request: Request) -> bytes:
    # Only what the request set (with the id and host podq filled in): a resumed request must mean the same,
    # and some types tell "left out" from "set to the default" (ai_render's scene settings).
    return orjson.dumps(request.model_dump(mode="json", exclude_unset=True))


def _meta_json(meta: dict[str, Any] | None) -> bytes | None:
    return orjson.dumps(meta) if meta is not None else None


def _meta(row: Row) -> dict[str, Any] | None:
    return orjson.loads(row.meta) if row.meta else None


def _row_line(row: Row, event: Event, **fields: Any) -> ResultLine:
    return ResultLine(id=row.id, event=event, ts=now(), type=row.type, host=row.host, meta=_meta(row),
                      attempts=1, **fields)


def _short_str(value: object) -> str | None:
    return value if isinstance(value, str) and len(value) <= 64 else None


class BackgroundDaemon:
    """A daemon on its own thread and event loop: for `podq demo` and tests that need one alongside."""

    def __init__(self, config: Config) -> None:
        self.daemon = Daemon(config)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="podq-daemon", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await self.daemon.async_run(self._stop)

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by __enter__ or stop()
            self._error = exc
        finally:
            self._loop.close()
            self._finished.set()

    def __enter__(self) -> BackgroundDaemon:
        self._thread.start()
        while not self.daemon.ready.wait(0.01):
            if self._finished.is_set():
                self._thread.join()
                assert self._error is not None
                raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        if self._error is not None:
            raise self._error
