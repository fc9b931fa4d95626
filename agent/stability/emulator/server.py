"""The HTTP server that serves the emulator, `StabilityEmulator` to run it on a background thread, and
`main` to serve it in the foreground."""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import urlsplit

from agent.stability.emulator.backend import Backend
from agent.stability.emulator.contract import CONTROL_PREFIX, MAX_DRAIN_BYTES, MAX_REQUEST_BYTES
from agent.stability.emulator.endpoints import answer, control
from agent.stability.emulator.incoming import RecordedRequest, argv_containing, file_info, incoming
from agent.stability.emulator.replies import Reply

# --- the HTTP server -------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client that keeps a connection open must not block stop()

    def __init__(self, address: tuple[str, int], backend: Backend) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.backend = backend
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API and httpx's pool expect
    server_version = "podq-stability-emulator"
    sys_version = ""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the recordings are the log, and tests read them."""

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        body, size, too_large = self._read_body()
        backend = self.server.backend
        if path.startswith(CONTROL_PREFIX):
            self._send(control(backend, self.command, path, body))
            return
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        request = incoming(self.command, path, headers, body, size, too_large)
        reply = answer(backend, request)
        shown = {**headers, "authorization": "Bearer [redacted]"} if "authorization" in headers else dict(headers)
        backend.record(
            RecordedRequest(
                method=self.command,
                path=path,
                headers=shown,
                auth_ok=backend.auth_ok(headers.get("authorization")),
                content_type=headers.get("content-type"),
                fields=dict(request.fields),
                files={name: file_info(part) for name, part in request.files.items()},
                json_body=request.json_body,
                status=reply.status,
                argv_with_secret=argv_containing(backend.watch_argv_for) if backend.watch_argv_for else [],
                ts=_now(),
                body_size=size,
            )
        )
        self._send(reply)

    def _read_body(self) -> tuple[bytes, int, bool]:
        """(body, its size, whether it was over the limit); an oversize body is read and dropped, not kept."""
        chunks: list[bytes] = []
        size = 0

        def take(count: int) -> None:
            nonlocal size
            while count > 0:
                data = self.rfile.read(min(count, 1 << 20))
                if not data:
                    self.close_connection = True
                    return
                count -= len(data)
                size += len(data)
                if size <= MAX_REQUEST_BYTES:
                    chunks.append(data)

        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while size <= MAX_DRAIN_BYTES:
                line = self.rfile.readline(1024)
                try:
                    count = int(line.split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    self.close_connection = True
                    break
                if count == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    break
                take(count)
                self.rfile.readline(1024)  # the CRLF after each chunk
        else:
            try:
                length = int(self.headers.get("content-length") or 0)
            except ValueError:
                length, self.close_connection = 0, True
            if length > MAX_DRAIN_BYTES:
                self.close_connection = True
                return b"", length, True
            take(length)
        if size > MAX_DRAIN_BYTES:
            self.close_connection = True
        too_large = size > MAX_REQUEST_BYTES
        return (b"" if too_large else b"".join(chunks)), size, too_large

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)


# --- the public API --------------------------------------------------------------------------------------------


class StabilityEmulator:
    """Stability AI's REST API, emulated on a background thread: `with StabilityEmulator() as api: api.base_url`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_keys: set[str] | None = None,
        watch_argv_for: str | None = None,
    ) -> None:
        self._address = (host, port)
        self._backend = Backend(api_keys, watch_argv_for)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StabilityEmulator:
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        self._server = _Server(self._address, self._backend)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="stability-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> StabilityEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "stopped"
        return f"<StabilityEmulator {where} requests={len(self.requests)} credits={self._backend.credits():g}>"

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running: call start() first")
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._backend.records()

    @property
    def credits(self) -> float:
        return self._backend.credits()

    def fail_next(self, status: int, *, times: int = 1, path: str | None = None) -> None:
        """The next `times` API requests (to `path` only, when given) answer `status` with the contract's body."""
        self._backend.queue_failure(status, times, path)

    def filter_next(self, *, times: int = 1) -> None:
        """The next `times` generated images come back blurred with finish reason CONTENT_FILTERED."""
        self._backend.queue_filters(times)

    def reset(self) -> None:
        """Forget recordings, queued failures and filters; credits back to the start."""
        self._backend.reset()


def main(argv: list[str] | None = None) -> int:
    """`podq stability-emulator`: serve the emulator in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="podq stability-emulator", description="Serve an emulator of Stability AI's REST API (not the real API)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free port)")
    args = parser.parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with StabilityEmulator(args.host, args.port) as emulator:
            print(f"podq Stability API emulator (not the real API) serving at {emulator.base_url}", flush=True)
            stopping.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
