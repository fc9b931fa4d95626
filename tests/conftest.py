from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent import config as config_mod
from agent import logs
from agent.config import Config
from agent.daemon import BackgroundDaemon
from agent.journal import result_lines
from agent.results import ResultLine
from agent.submit import append_line, follow
from tests.sshd import SSHServer, start_sshd

# Connection retries in tests: real back-off, but short.
FAST_RETRY = "{ attempts = 3, initial_s = 0.05, max_s = 0.2 }"


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    """Daemon logs go to stderr through stdlib logging (pytest shows them on failure), never to stdout."""
    logs.configure(None, console_level=logging.INFO)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def ssh_host_toml(server: SSHServer, *, name: str = "pod1", **overrides: Any) -> str:
    fields: dict[str, Any] = {
        "name": name,
        "kind": "ssh",
        "hostname": "127.0.0.1",
        "port": server.port,
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "identity_file": str(server.client_key),
        "known_hosts": str(server.known_hosts),
        "workspace": str(server.workspace),
        "connect_timeout_s": 5,
    }
    fields.update(overrides)
    body = "\n".join(f"{k} = {_toml(v)}" for k, v in fields.items())
    return f"[[hosts]]\n{body}\nretry = {FAST_RETRY}\n"


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    return str(value)


def local_host_toml(workspace: Path, name: str = "local") -> str:
    return f'[[hosts]]\nname = "{name}"\nkind = "local"\nworkspace = "{workspace}"\n'


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Write a podq.toml with the given [[hosts]] blocks (default: one local host) and load it."""

    def make(*hosts: str, grace_s: float = 5) -> Config:
        if not hosts:
            hosts = (local_host_toml(tmp_path / "workspace"),)
        text = f'[queue]\ndir = "queue"\n[daemon]\nshutdown_grace_s = {grace_s}\n' + "\n".join(hosts)
        path = tmp_path / "podq.toml"
        path.write_text(text)
        return config_mod.load(path)

    return make


@pytest.fixture
def local_config(make_config: Callable[..., Config]) -> Config:
    config = make_config()
    for host in config.hosts:
        Path(str(host.workspace)).mkdir(parents=True, exist_ok=True)
    return config


@pytest.fixture
def running(local_config: Config) -> Iterator[Config]:
    """A daemon serving the local config on a background thread."""
    with BackgroundDaemon(local_config):
        yield local_config


def write_raw(config: Config, data: bytes) -> None:
    """Append bytes to requests.jsonl as a careless writer would (no lock, no validation)."""
    config.queue.dir.mkdir(parents=True, exist_ok=True)
    with open(config.requests_path, "ab") as f:
        f.write(data)


def put(config: Config, **request: Any) -> str:
    append_line(config.requests_path, request)
    return str(request.get("id"))


def wait_terminal(config: Config, ids: set[str], timeout_s: float = 30) -> dict[str, ResultLine]:
    """Follow results until every id in `ids` has a terminal line; returns them by id."""
    found: dict[str, ResultLine] = {}
    for line in follow(config, 0, timeout_s=timeout_s):
        if line.id in ids and line.terminal:
            found[line.id] = line
            if len(found) == len(ids):
                break
    return found


def wait_lines(config: Config, count: int, timeout_s: float = 30) -> list[ResultLine]:
    """The first `count` terminal result lines (for requests without readable ids)."""
    terminal: list[ResultLine] = []
    for line in follow(config, 0, timeout_s=timeout_s):
        if line.terminal:
            terminal.append(line)
            if len(terminal) == count:
                break
    return terminal


def all_results(config: Config) -> list[ResultLine]:
    return [line for _, line in result_lines(config.results_path)]


def events_of(config: Config, request_id: str) -> list[str]:
    return [line.event.value for line in all_results(config) if line.id == request_id]
