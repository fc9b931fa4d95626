"""What every command type provides: an argv built from a validated request, and a reading of its output.

Building is separate from running (as in Flamenco), so tests assert the exact argv a request produces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Generic, TypeVar

from agent.blender.scripts import ScriptLibrary
from agent.config import StabilitySettings
from agent.errors import ErrorCode, NotAllowed
from agent.hosts.base import Completed, Host, Invocation
from agent.stability.access import StabilityAccess

R = TypeVar("R")

# Exit statuses the guard below uses for its own refusals (chosen clear of common tools' codes).
GUARD_NOT_ALLOWED = 97
GUARD_NO_WORKSPACE = 96
GUARD_MARK = "podq-guard:"

# Runs a command on a path only once the path, with every symlink resolved *on the host*, is still inside the
# workspace. Arguments: workspace, path relative to it, then the command, where the word @PATH@ stands for
# the resolved path. The script is a constant: request fields only ever arrive as its positional arguments.
PATH_GUARD = f"""\
ws=$1 rel=$2; shift 2
wsr=$(realpath -e -- "$ws" 2>/dev/null) || {{
  printf '%s workspace %s does not exist on this host\\n' '{GUARD_MARK}' "$ws" >&2; exit {GUARD_NO_WORKSPACE}; }}
target=$(realpath -m -- "$wsr/$rel") || exit {GUARD_NOT_ALLOWED}
case $target in
  "$wsr"|"$wsr"/*) ;;
  *) printf '%s %s resolves to %s, outside the workspace %s\\n' '{GUARD_MARK}' "$rel" "$target" "$wsr" >&2
     exit {GUARD_NOT_ALLOWED} ;;
esac
for arg; do
  shift
  if [ "$arg" = @PATH@ ]; then set -- "$@" "$target"; else set -- "$@" "$arg"; fi
done
exec "$@"
"""
PATH_PLACEHOLDER = "@PATH@"


def relative_to_workspace(path: str, workspace: str) -> str:
    """A request path as a path relative to the workspace; absolute paths must lie inside it."""
    p = PurePosixPath(path)
    if not p.is_absolute():
        return str(p)
    ws = PurePosixPath(workspace)
    if p != ws and ws not in p.parents:
        raise NotAllowed(
            f"path {path} is outside the host's workspace {workspace}: use a path relative to the workspace"
        )
    return str(p.relative_to(ws))


def guarded(workspace: str, path: str, *command: str) -> tuple[str, ...]:
    """argv that runs `command` with @PATH@ replaced by `path`, resolved and checked on the host."""
    return ("sh", "-c", PATH_GUARD, "podq-guard", workspace, relative_to_workspace(path, workspace), *command)


@dataclass(frozen=True)
class Outcome:
    """How a command type reads a Completed: structured output, or the error a non-zero exit means."""

    output: dict[str, Any] | None = None
    error_code: ErrorCode | None = None
    error_message: str | None = None
    keep_stdout: bool = True  # False when `output` already carries everything stdout had
    command_ran: bool = True  # False for types that run no command of their own (fetch): no exit_code/streams


@dataclass(frozen=True)
class Target:
    """What planning a command needs to know of the host it will run on."""

    workspace: str
    blender: str = "blender"
    scripts: ScriptLibrary | None = None
    python: str = "python3"  # runs podq's clients on the host


@dataclass
class ExecContext:
    """What running a command may use besides its host: progress reporting, the local artifacts folder,
    the scripts folder, and earlier jobs' outputs."""

    host: Host
    target: Target
    request_id: str
    progress: Callable[[dict[str, Any]], None]
    artifacts_dir: Path
    scripts: ScriptLibrary
    job_output: Callable[[str], dict[str, Any] | None]
    stability: StabilityAccess | None = None
    stability_settings: StabilitySettings | None = None


class CommandType(ABC, Generic[R]):
    """One request type's behaviour on a host."""

    name: ClassVar[str]

    @abstractmethod
    def plan(self, request: R, target: Target) -> Invocation:
        """The argv to run. Raises RequestError (e.g. NotAllowed) for what only the target can decide."""

    def interpret(self, request: R, completed: Completed) -> Outcome:
        """Read a finished command. The default: exit 0 succeeds with no structured output."""
        if completed.exit_code == 0:
            return Outcome()
        return nonzero(completed)

    async def execute(self, request: R, invocation: Invocation, ctx: ExecContext) -> tuple[Completed, Outcome]:
        """Run on the host and read the result. Types with more to do (sync, downloads) override this."""
        completed = await ctx.host.run(invocation)
        return completed, self.interpret(request, completed)


def text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def nonzero(completed: Completed) -> Outcome:
    """The failure a non-zero exit means, telling podq's guard refusals apart from the command's own."""
    stderr = text(completed.stderr).strip()
    if GUARD_MARK in stderr and completed.exit_code == GUARD_NOT_ALLOWED:
        return Outcome(error_code=ErrorCode.NOT_ALLOWED, error_message=_guard_message(stderr))
    if GUARD_MARK in stderr and completed.exit_code == GUARD_NO_WORKSPACE:
        return Outcome(
            error_code=ErrorCode.WORKSPACE_MISSING,
            error_message=_guard_message(stderr) + ": create it on the host, or fix `workspace` in podq.toml",
        )
    last = stderr.splitlines()[-1] if stderr else "no output on stderr"
    return Outcome(
        error_code=ErrorCode.NONZERO_EXIT,
        error_message=f"the command exited with status {completed.exit_code}: {last}",
    )


def _guard_message(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if GUARD_MARK in line)
    return line.split(GUARD_MARK, 1)[1].strip()
