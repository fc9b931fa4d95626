"""The `ssh` host: commands over asyncssh, on a small pool of persistent connections.

Each connection carries at most MAX_CHANNELS_PER_CONNECTION channels at once (OpenSSH refuses sessions before
its MaxSessions=10 under load); more concurrency opens another connection, up to the host's budget.
asyncssh's exceptions are translated here and nowhere else. Only failures before the command started are
retried: once a channel runs a command, whatever happens next is that request's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import asyncssh
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from agent import constants
from agent.config import SSHHostConfig
from agent.errors import (
    AuthFailed,
    ConnectionLost,
    ErrorCode,
    HostError,
    HostKeyMismatch,
    HostKeyUnknown,
    HostUnreachable,
    TransferFailed,
)
from agent.hosts.base import BACKSTOP_S, Capture, Completed, Host, Invocation, LineHandler, captures
from agent.hosts.known_hosts import trusted_keys

log = structlog.get_logger("podq.ssh")

# The command reports its pid (which `timeout`, exec'd in its place, keeps and makes its process group's id)
# on stderr before anything else, so an abandoned command can be stopped; podq strips the line.
PID_MARK = b"@@podq-pid "
_PID_REPORT = 'printf "@@podq-pid %s\\n" "$$" >&2; exec "$@"'


_PID_SEARCH_BYTES = 64 * 1024


def _take_pid_line(head: bytes) -> tuple[int, bytes] | None:
    """(pid, stderr without the pid line) once the pid line is complete in `head`; None until then."""
    start = 0 if head.startswith(PID_MARK) else head.find(b"\n" + PID_MARK) + 1
    if start == 0 and not head.startswith(PID_MARK):
        return None
    end = head.find(b"\n", start)
    if end == -1:
        return None
    try:
        pid = int(head[start + len(PID_MARK):end])
    except ValueError:
        return None
    return pid, head[:start] + head[end + 1:]


def remote_command_line(invocation: Invocation) -> str:
    """The quoted command line the SSH server's shell receives: no request field ever reaches it unquoted."""
    return shlex.join(("sh", "-c", _PID_REPORT, "podq-run", *invocation.host_argv()))


@dataclass(eq=False)
class _Link:
    """One SSH connection and how many of its channels are in use."""

    conn: asyncssh.SSHClientConnection
    busy: int = 0
    broken: bool = False
    opened_at: float = field(default_factory=time.monotonic)

    @property
    def usable(self) -> bool:
        return not self.broken and not self.conn.is_closed()


@dataclass(frozen=True)
class _Failure:
    at: float
    error: HostError


class SSHHost(Host):
    kind = "ssh"

    def __init__(self, config: SSHHostConfig) -> None:
        super().__init__(config.name, str(config.workspace), config.max_concurrency)
        self.config = config
        self._links: list[_Link] = []
        self._lock = asyncio.Lock()
        self._last_failure: _Failure | None = None
        self.connects = 0  # connections opened so far (visible in tests and `repr`)
        self.peak_channels = 0  # most channels seen open at once on one connection
        self._forwards: dict[int, tuple[_Link, int]] = {}  # local port -> (link, port on the host)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<SSHHost {self.name} {c.user}@{c.hostname}:{c.port} links={len(self._links)} "
            f"running={self.running} connects={self.connects}>"
        )

    def _retrying(self) -> AsyncRetrying:
        """Back-off for failures before anything ran on the host (connect, channel open): never after."""
        retry = self.config.retry
        return AsyncRetrying(
            stop=stop_after_attempt(retry.attempts),
            wait=wait_exponential_jitter(multiplier=retry.initial_s, max=retry.max_s, jitter=retry.initial_s),
            retry=retry_if_exception_type(HostUnreachable),
            reraise=True,
            before_sleep=self._log_retry,
        )

    async def run(self, invocation: Invocation, on_line: LineHandler | None = None) -> Completed:
        attempts = 0
        try:
            async for attempt in self._retrying():
                with attempt:
                    attempts += 1
                    link, process = await self._open_channel(invocation)
        except HostError as exc:
            exc.attempts = attempts
            raise
        try:
            return await self._collect(link, process, invocation, attempts, on_line)
        finally:
            link.busy -= 1

    def _log_retry(self, state: object) -> None:
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        log.warning("ssh.retry", host=self.name, attempt=getattr(state, "attempt_number", None), error=str(error))

    async def reach_local_port(self, port: int) -> int:
        """Forward a port on the host's loopback back over the SSH connection (like `ssh -R 0:localhost:port`)."""
        forward = self._forwards.get(port)
        if forward is not None and forward[0].usable:
            return forward[1]
        link = await self._checkout()
        try:
            listener = await link.conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", port)
        except (asyncssh.Error, OSError) as exc:
            raise HostError(f"{self.name} refused to forward a port back to podq: {exc}",
                            code=ErrorCode.HOST_UNREACHABLE) from exc
        finally:
            link.busy -= 1  # the forward lives on the connection, not on a channel
        self._forwards[port] = (link, listener.get_port())
        return listener.get_port()

    async def put_files(self, transfers: list[tuple[Path, str]]) -> None:
        async def put(sftp: asyncssh.SFTPClient) -> None:
            for src, dst in transfers:
                parent = str(PurePosixPath(dst).parent)
                await sftp.makedirs(parent, exist_ok=True)
                tmp = f"{parent}/.{PurePosixPath(dst).name}.{uuid.uuid4().hex[:8]}.podq-tmp"
                await sftp.put(str(src), tmp)
                await sftp.posix_rename(tmp, dst)  # readers never see a half-written file

        await self._with_sftp(put, "upload")

    async def get_files(self, transfers: list[tuple[str, Path]]) -> None:
        async def get(sftp: asyncssh.SFTPClient) -> None:
            for src, dst in transfers:
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.podq-tmp")
                await sftp.get(src, str(tmp))
                tmp.replace(dst)

        await self._with_sftp(get, "download")

    async def _with_sftp(self, work: Callable[[asyncssh.SFTPClient], Awaitable[None]], what: str) -> None:
        """Run `work` in one SFTP session, which takes a channel of the connection like a command does."""
        async for attempt in self._retrying():
            with attempt:
                link = await self._checkout()
                try:
                    sftp_cm = link.conn.start_sftp_client()
                    sftp = await sftp_cm.__aenter__()
                except (asyncssh.Error, OSError) as exc:
                    link.busy -= 1
                    raise HostUnreachable(f"cannot open an SFTP session on {self.name}: {exc}") from exc
        try:
            await work(sftp)
        except asyncssh.SFTPError as exc:
            raise TransferFailed(f"{what} on {self.name} failed: {exc.reason}") from exc
        except (asyncssh.Error, OSError) as exc:
            raise ConnectionLost(f"the SSH connection to {self.name} dropped during an {what}: {exc}") from exc
        finally:
            link.busy -= 1
            with contextlib.suppress(Exception):
                await sftp_cm.__aexit__(None, None, None)

    async def _open_channel(
        self, invocation: Invocation
    ) -> tuple[_Link, asyncssh.SSHClientProcess[bytes]]:
        link = await self._checkout()
        try:
            process = await link.conn.create_process(remote_command_line(invocation), encoding=None)
        except asyncssh.ChannelOpenError as exc:
            # The server refused a session (e.g. MaxSessions under load): the command never started.
            link.busy -= 1
            raise HostUnreachable(f"{self.name} refused a new SSH channel: {exc.reason}") from exc
        except (asyncssh.Error, OSError) as exc:
            link.busy -= 1
            link.broken = True
            raise HostUnreachable(
                f"the SSH connection to {self.name} dropped before the command started: {exc}"
            ) from exc
        if invocation.stdin is not None:
            process.stdin.write(invocation.stdin)
        process.stdin.write_eof()
        return link, process

    async def _collect(
        self, link: _Link, process: asyncssh.SSHClientProcess[bytes], invocation: Invocation, attempts: int,
        on_line: LineHandler | None,
    ) -> Completed:
        stdout, stderr = captures(on_line)
        pid: int | None = None

        async def pump(stream: asyncssh.SSHReader[bytes], capture: Capture) -> None:
            while chunk := await stream.read(65536):
                capture.feed(chunk)

        async def pump_stderr() -> None:
            # The pid line comes before anything the command prints, but a login shell may print first
            # (a chatty ~/.bashrc): look for it in the first lines, and pass everything else on.
            nonlocal pid
            head = b""
            while (chunk := await process.stderr.read(65536)):
                head += chunk
                found = _take_pid_line(head)
                if found is not None:
                    pid, head = found
                    break
                if len(head) > _PID_SEARCH_BYTES:
                    break
            if head:
                stderr.feed(head)
            await pump(process.stderr, stderr)

        try:
            async with asyncio.timeout(invocation.timeout_s + BACKSTOP_S):
                await asyncio.gather(pump(process.stdout, stdout), pump_stderr())
                result = await process.wait()
            exit_code: int | None = result.exit_status
            if exit_code is not None and exit_code < 0:
                exit_code = None  # killed by a signal, or the server sent no status
        except TimeoutError:
            await self._stop_remote(link, pid)
            process.close()
            exit_code = None
        except asyncio.CancelledError:
            await self._stop_remote(link, pid)
            process.close()
            raise
        except (asyncssh.Error, OSError) as exc:
            process.close()
            raise ConnectionLost(
                f"the SSH connection to {self.name} dropped while the command ran; it may or may not have "
                f"completed: {exc}"
            ) from exc
        stdout.close()
        stderr.close()
        return Completed(
            exit_code=exit_code,
            stdout=stdout.value(),
            stderr=stderr.value(),
            attempts=attempts,
            stdout_dropped=stdout.dropped,
            stderr_dropped=stderr.dropped,
        )

    async def _stop_remote(self, link: _Link, pid: int | None) -> None:
        """Stop a command that is being abandoned. Closing its channel would not: OpenSSH sends no signal to a
        command without a terminal (nor does it act on the protocol's signal request), so the job would run
        on, holding the GPU. The command's process group is led by coreutils `timeout` (its pid reported
        first thing): TERM it now, KILL it 5 s later. (`kill -SIG -PGID`, without `--`: dash refuses that.)"""
        if pid is None:
            return
        stop = f"kill -TERM -{pid} 2>/dev/null; (sleep 5; kill -KILL -{pid}) >/dev/null 2>&1 </dev/null &"
        try:
            async with asyncio.timeout(10):
                if link.usable:
                    try:
                        done = await link.conn.run(stop, check=False)
                    except asyncssh.ChannelOpenError:
                        done = None  # the server's session limit: go through a connection of its own
                else:
                    done = None
                if done is None:
                    spare = await self._connect()
                    try:
                        done = await spare.conn.run(stop, check=False)
                    finally:
                        self._links.remove(spare)
                        spare.conn.close()
        except (asyncssh.Error, OSError, TimeoutError, HostError) as exc:
            log.warning("ssh.stop_failed", host=self.name, pid=pid, error=str(exc))
            return
        log.info("ssh.stopped_remote", host=self.name, pid=pid, exit_status=done.exit_status)

    async def _checkout(self) -> _Link:
        """A connection with a free channel: the least busy open one, else a new one."""
        waited_since = time.monotonic()
        async with self._lock:
            self._links = [link for link in self._links if link.usable or link.busy]
            free = [link for link in self._links if link.usable and link.busy < constants.MAX_CHANNELS_PER_CONNECTION]
            if free:
                link = min(free, key=lambda k: k.busy)
            else:
                # Requests that queued behind a connect attempt that just failed share its failure,
                # instead of each trying a dead host in turn.
                failure = self._last_failure
                if failure is not None and failure.at >= waited_since:
                    raise type(failure.error)(failure.error.message)
                link = await self._connect()
            link.busy += 1
            self.peak_channels = max(self.peak_channels, link.busy)
            return link

    async def _connect(self) -> _Link:
        c = self.config
        target = f"{c.user}@{c.hostname}:{c.port}"
        try:
            self._preflight()
            conn = await asyncssh.connect(
                c.hostname,
                c.port,
                username=c.user,
                client_keys=[str(c.identity_file)],
                known_hosts=str(c.known_hosts),
                agent_path=None,
                config=[],
                connect_timeout=c.connect_timeout_s,
                login_timeout=c.connect_timeout_s,
                keepalive_interval=constants.KEEPALIVE_INTERVAL_S,
                keepalive_count_max=constants.KEEPALIVE_COUNT_MAX,
            )
        except HostError as exc:
            self._last_failure = _Failure(time.monotonic(), exc)
            raise
        except asyncssh.PermissionDenied as exc:
            error: HostError = AuthFailed(
                f"{target} refused the key {c.identity_file}: add its public key to the host's "
                "~/.ssh/authorized_keys, or fix `identity_file`/`user` in podq.toml"
            )
            self._last_failure = _Failure(time.monotonic(), error)
            raise error from exc
        except asyncssh.HostKeyNotVerifiable as exc:
            error = HostKeyMismatch(
                f"{target} presented a host key that does not match {c.known_hosts}: the pod was replaced, "
                f"or someone is in the middle. If the change is expected, remove the old entry and run "
                f"`podq trust {self.name}`"
            )
            self._last_failure = _Failure(time.monotonic(), error)
            raise error from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            detail = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            error = HostUnreachable(f"cannot connect to {target}: {detail}")
            self._last_failure = _Failure(time.monotonic(), error)
            raise error from exc
        self.connects += 1
        link = _Link(conn)
        self._links.append(link)
        log.info("ssh.connected", host=self.name, target=target, links=len(self._links))
        return link

    def _preflight(self) -> None:
        """Fail clearly, before any network traffic, on what no retry can fix."""
        c = self.config
        if not trusted_keys(c.known_hosts, c.hostname, c.port):
            raise HostKeyUnknown(
                f"{c.known_hosts} has no host key for {c.hostname}:{c.port}: run `podq trust {self.name}` to "
                "see its fingerprint and record it"
            )
        if not c.identity_file.exists():
            raise AuthFailed(f"identity_file {c.identity_file} does not exist: fix `identity_file` in podq.toml")

    async def close(self) -> None:
        links, self._links = self._links, []
        for link in links:
            link.conn.close()
        for link in links:
            await link.conn.wait_closed()
