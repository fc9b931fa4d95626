"""The registry of command types: a request's `type` names exactly one of these; nothing else runs."""

from __future__ import annotations

from typing import Any

from agent.commands.base import CommandType, Outcome
from agent.commands.inspect import Df, Gpu, Ls, Ping, TailLog
from agent.hosts.base import Invocation
from agent.requests import REQUEST_TYPES, Request

COMMANDS: dict[str, CommandType[Any]] = {c.name: c for c in (Ping(), Ls(), Df(), Gpu(), TailLog())}
assert set(COMMANDS) == set(REQUEST_TYPES), "every request type needs a command, and only those"


def command_for(request: Request) -> CommandType[Any]:
    return COMMANDS[request.type]


def plan(request: Request, workspace: str) -> Invocation:
    return command_for(request).plan(request, workspace)


__all__ = ["COMMANDS", "CommandType", "Outcome", "command_for", "plan"]
