"""The `local` host: the same commands, run on this machine inside the configured workspace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from pathlib import Path

from agent.errors import ErrorCode, HostError
from agent.hosts.base import BACKSTOP_S, Capture, Completed, Host, Invocation, LineHandler, captures


class LocalHost(Host):
    kind = "local"

    def __init__(self, name: str, workspace: Path, max_concurrency: int) -> None:
        super().__init__(name, str(workspace), max_concurrency)
        self._workspace_path = workspace

    async def run(self, invocation: Invocation, on_line: LineHandler | None = None) -> Completed:
        if not self._workspace_path.is_dir():
            raise HostError(
                f"the local workspace {self.workspace} does not exist: create it, or fix `workspace` in podq.toml",
                code=ErrorCode.WORKSPACE_MISSING,
            )
        stdout, stderr = captures(on_line)
        proc = await asyncio.create_subprocess_exec(
            *invocation.host_argv(),
            stdin=asyncio.subprocess.PIPE if invocation.stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.workspace,
            # Its own process group, so a timeout or shutdown can stop the whole tree.
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        if invocation.stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(invocation.stdin)
            proc.stdin.close()

        async def pump(stream: asyncio.StreamReader, capture: Capture) -> None:
            while chunk := await stream.read(65536):
                capture.feed(chunk)

        try:
            async with asyncio.timeout(invocation.timeout_s + BACKSTOP_S):
                await asyncio.gather(pump(proc.stdout, stdout), pump(proc.stderr, stderr))
                exit_code: int | None = await proc.wait()
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            exit_code = None
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise
        stdout.close()
        stderr.close()
        if exit_code is not None and exit_code < 0:
            exit_code = 128 - exit_code  # killed by a signal: report it the way a shell would
        return Completed(
            exit_code=exit_code,
            stdout=stdout.value(),
            stderr=stderr.value(),
            attempts=1,
            stdout_dropped=stdout.dropped,
            stderr_dropped=stderr.dropped,
        )


    async def put_files(self, transfers: list[tuple[Path, str]]) -> None:
        await asyncio.to_thread(_copy_all, [(src, Path(dst)) for src, dst in transfers])

    async def get_files(self, transfers: list[tuple[str, Path]]) -> None:
        await asyncio.to_thread(_copy_all, [(Path(src), dst) for src, dst in transfers])


def _copy_all(transfers: list[tuple[Path, Path]]) -> None:
    for src, dst in transfers:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.podq-tmp")  # unique: transfers may overlap
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # readers never see a half-written file


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
