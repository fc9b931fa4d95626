"""Whether a decoded request can run here: its schema, its host, and its paths against that host's workspace.

The daemon, `podq submit` and `podq validate` all decide with this one function, so a request `submit`
accepts is one the daemon accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.blender.scripts import ScriptLibrary
from agent.commands import Target, plan
from agent.config import Config, LocalHostConfig, SSHHostConfig
from agent.errors import ErrorCode, RequestError
from agent.hosts.base import Invocation
from agent.requests import Request, validate


@dataclass(frozen=True)
class Admitted:
    request: Request  # `host` filled in with the resolved host's name
    host: SSHHostConfig | LocalHostConfig
    invocation: Invocation


def resolve_host(config: Config, name: str | None) -> SSHHostConfig | LocalHostConfig:
    host = config.host(name)
    if host is not None:
        return host
    known = ", ".join(config.host_names)
    if name is None:
        raise RequestError(
            f'the request names no host and podq.toml has several: add "host": one of {known}',
            code=ErrorCode.HOST_UNKNOWN,
        )
    raise RequestError(f"host {name!r} is not in podq.toml: use one of {known}", code=ErrorCode.HOST_UNKNOWN)


def target_for(config: Config, host: SSHHostConfig | LocalHostConfig) -> Target:
    return Target(workspace=str(host.workspace), blender=config.blender_binary(host),
                  scripts=ScriptLibrary(config.scripts_dir), python=config.python_binary(host))


def admit(config: Config, data: dict[str, Any]) -> Admitted:
    """Validate, resolve the host and build the argv; raises RequestError with the rejection's code."""
    request = validate(data)
    host = resolve_host(config, request.host)
    request = request.model_copy(update={"host": host.name})
    return Admitted(request, host, plan(request, target_for(config, host)))
