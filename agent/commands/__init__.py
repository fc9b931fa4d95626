"""The registry of command types: a request's `type` names exactly one of these; nothing else runs."""

from __future__ import annotations

from typing import Any

from agent.commands.base import CommandType, ExecContext, Outcome, Target
from agent.commands.blender import BlenderRender
from agent.commands.fetch import Fetch
from agent.commands.inspect import Df, Gpu, Ls, Ping, TailLog
from agent.commands.stability import AiRender, Character, StabilityGenerate
from agent.hosts.base import Invocation
from agent.requests import REQUEST_TYPES, Request

COMMANDS: dict[str, CommandType[Any]] = {
    c.name: c for c in (
        Ping(), Ls(), Df(), Gpu(), TailLog(), BlenderRender(), Fetch(), StabilityGenerate(), Character(), AiRender(),
    )
}
assert set(COMMANDS) == set(REQUEST_TYPES), "every request type needs a command, and only those"


def command_for(request: Request) -> CommandType[Any]:
    return COMMANDS[request.type]


def plan(request: Request, target: Target) -> Invocation:
    return command_for(request).plan(request, target)


__all__ = ["COMMANDS", "CommandType", "ExecContext", "Outcome", "Target", "command_for", "plan"]
