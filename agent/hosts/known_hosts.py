"""Host keys: looking a host up in known_hosts, and recording a key the user chose to trust."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from agent.errors import HostUnreachable


def host_pattern(hostname: str, port: int) -> str:
    """How OpenSSH writes a host in known_hosts: bare for port 22, `[host]:port` otherwise."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def trusted_keys(known_hosts: Path, hostname: str, port: int) -> list[asyncssh.SSHKey]:
    """Keys known_hosts trusts for this host and port (empty when the file or the entry is missing)."""
    if not known_hosts.exists():
        return []
    # Same lookup asyncssh does when it verifies (a non-22 port falls back to a port-less entry).
    host_keys, *_ = asyncssh.read_known_hosts(str(known_hosts)).match(hostname, "", port)
    return list(host_keys)


@dataclass(frozen=True)
class ServerKey:
    key: asyncssh.SSHKey

    @property
    def fingerprint(self) -> str:
        return str(self.key.get_fingerprint("sha256"))

    @property
    def algorithm(self) -> str:
        return self.key.get_algorithm()

    def known_hosts_line(self, hostname: str, port: int) -> str:
        public = self.key.export_public_key("openssh").decode().split()
        return f"{host_pattern(hostname, port)} {public[0]} {public[1]}\n"


async def fetch_server_key(hostname: str, port: int, timeout_s: float) -> ServerKey:
    """The key the server presents in its handshake (no authentication is attempted)."""
    try:
        async with asyncio.timeout(timeout_s):
            key = await asyncssh.get_server_host_key(hostname, port, config=[])
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise HostUnreachable(f"cannot reach {hostname}:{port} to read its host key: {exc}") from exc
    if key is None:
        raise HostUnreachable(f"{hostname}:{port} presented no host key")
    return ServerKey(key)


def record(known_hosts: Path, line: str) -> None:
    """Append one entry, creating the file (0600) and its folder (0700) when missing."""
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
