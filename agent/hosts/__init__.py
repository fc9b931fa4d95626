"""Hosts: where commands run. `make_host` picks the implementation a host's config names."""

from agent.config import LocalHostConfig, SSHHostConfig
from agent.hosts.base import Completed, Host, Invocation
from agent.hosts.local import LocalHost
from agent.hosts.ssh import SSHHost


def make_host(config: SSHHostConfig | LocalHostConfig) -> Host:
    if isinstance(config, SSHHostConfig):
        return SSHHost(config)
    return LocalHost(config.name, config.workspace, config.max_concurrency)


__all__ = ["Completed", "Host", "Invocation", "LocalHost", "SSHHost", "make_host"]
