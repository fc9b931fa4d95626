"""Over a real OpenSSH server on loopback: every command type, connection reuse and limits, and each way
a connection can fail, reported with its code rather than a hang."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli import main as podq
from agent.config import Config
from agent.daemon import BackgroundDaemon
from agent.hosts.ssh import SSHHost
from agent.results import Event
from tests.conftest import events_of, put, ssh_host_toml, wait_terminal
from tests.sshd import SSHServer, free_port, keygen, start_sshd


@pytest.fixture
def ssh_config(sshd: SSHServer, make_config: Callable[..., Config]) -> Config:
    return make_config(ssh_host_toml(sshd, max_concurrency=8))


def test_each_command_type_succeeds_over_ssh(sshd: SSHServer, ssh_config: Config) -> None:
    (sshd.workspace / "logs").mkdir(exist_ok=True)
    (sshd.workspace / "logs" / "pod.log").write_text("alpha\nbeta\ngamma\n")
    with BackgroundDaemon(ssh_config):
        for rid, request in {
            "p": {"type": "ping"},
            "l": {"type": "ls", "path": "logs"},
            "d": {"type": "df", "path": "."},
            "g": {"type": "gpu"},
            "t": {"type": "tail_log", "path": f"{sshd.workspace}/logs/pod.log", "lines": 2},
        }.items():
            put(ssh_config, id=rid, **request)
        results = wait_terminal(ssh_config, {"p", "l", "d", "g", "t"})
    for rid, result in results.items():
        assert result.event == Event.SUCCEEDED, result
        assert result.host == "pod1" and result.attempts == 1
        assert events_of(ssh_config, rid) == ["accepted", "started", "succeeded"]
    assert results["p"].output["uname"]["system"] == "Linux"  # type: ignore[index]
    assert [e["name"] for e in results["l"].output["entries"]] == ["pod.log"]  # type: ignore[index]
    assert results["d"].output["available_bytes"] > 0  # type: ignore[index]
    assert results["g"].output["available"] is False  # type: ignore[index]
    assert results["t"].output["lines"] == ["beta", "gamma"]  # type: ignore[index]


def test_one_persistent_connection_is_reused(ssh_config: Config) -> None:
    with BackgroundDaemon(ssh_config) as bg:
        for i in range(5):
            put(ssh_config, id=f"seq{i}", type="df")
            assert wait_terminal(ssh_config, {f"seq{i}"})[f"seq{i}"].event == Event.SUCCEEDED
        host = bg.daemon.hosts["pod1"]
        assert isinstance(host, SSHHost) and host.connects == 1


def test_symlink_escape_is_refused_on_the_host(sshd: SSHServer, ssh_config: Config) -> None:
    link = sshd.workspace / "etc-link"
    if not link.is_symlink():
        link.symlink_to("/etc")
    with BackgroundDaemon(ssh_config):
        put(ssh_config, id="esc", type="tail_log", path="etc-link/passwd")
        result = wait_terminal(ssh_config, {"esc"})["esc"]
    assert result.event == Event.FAILED and result.error.code == "not_allowed"  # type: ignore[union-attr]
    assert "root:" not in (result.stdout or "")


def test_concurrency_is_spread_over_connections_of_at_most_four_channels(
    sshd: SSHServer, ssh_config: Config
) -> None:
    fifo_dir = sshd.workspace / "fifos"
    fifo_dir.mkdir(exist_ok=True)
    ids = {f"c{i}" for i in range(12)}
    with BackgroundDaemon(ssh_config) as bg:
        for rid in sorted(ids):
            # Each command holds its channel for ~1 s, so up to 8 (the host's limit) overlap.
            put(ssh_config, id=rid, type="tail_log", path="fifos/none", timeout_s=1)
        results = wait_terminal(ssh_config, ids, timeout_s=60)
        host = bg.daemon.hosts["pod1"]
        assert isinstance(host, SSHHost)
        assert host.peak_channels == 4  # never more than 4 on one connection
        assert host.connects == 2  # 8 at once needs a second connection, and no more
    # A missing file fails fast; what matters is that every request got through the pool.
    assert all(r.event in (Event.FAILED, Event.TIMED_OUT) for r in results.values())
    assert all(r.attempts == 1 for r in results.values())


def _trusted_on(port: int, sshd: SSHServer, tmp_path: Path) -> str:
    """A known_hosts file that trusts the test server's key on another port."""
    path = tmp_path / f"known_hosts_{port}"
    path.write_text(sshd.host_entry().replace(f":{sshd.port} ", f":{port} "))
    return str(path)


def test_unreachable_host_fails_fast_with_retries(
    sshd: SSHServer, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    config = make_config(ssh_host_toml(sshd, port=port, known_hosts=_trusted_on(port, sshd, tmp_path)))
    with BackgroundDaemon(config):
        put(config, id="down", type="ping")
        result = wait_terminal(config, {"down"}, timeout_s=30)["down"]
    assert result.event == Event.FAILED and result.error.code == "host_unreachable"  # type: ignore[union-attr]
    assert result.attempts == 3  # retried per `retry.attempts`
    assert "cannot connect" in result.error.message  # type: ignore[union-attr]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung pod)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for s in accepted:
        s.close()
    server.close()


def test_silent_host_times_out_instead_of_hanging(
    sshd: SSHServer, silent_server: int, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(ssh_host_toml(sshd, port=silent_server, connect_timeout_s=0.5,
                                       known_hosts=_trusted_on(silent_server, sshd, tmp_path)))
    started = time.monotonic()
    with BackgroundDaemon(config):
        put(config, id="hung", type="ping")
        result = wait_terminal(config, {"hung"}, timeout_s=30)["hung"]
    assert result.event == Event.FAILED and result.error.code == "host_unreachable"  # type: ignore[union-attr]
    assert time.monotonic() - started < 15


def test_wrong_key_is_auth_failed_and_not_retried(
    sshd: SSHServer, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    keygen(tmp_path / "stranger")
    config = make_config(ssh_host_toml(sshd, identity_file=str(tmp_path / "stranger")))
    with BackgroundDaemon(config):
        put(config, id="nokey", type="ping")
        result = wait_terminal(config, {"nokey"})["nokey"]
    assert result.event == Event.FAILED and result.error.code == "auth_failed"  # type: ignore[union-attr]
    assert result.attempts == 1 and "authorized_keys" in result.error.message  # type: ignore[union-attr]


def test_changed_host_key_is_refused_and_not_retried(
    sshd: SSHServer, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    keygen(tmp_path / "impostor")
    pub = (tmp_path / "impostor.pub").read_text().split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    config = make_config(ssh_host_toml(sshd, known_hosts=str(tmp_path / "known_hosts")))
    with BackgroundDaemon(config):
        put(config, id="mitm", type="ping")
        result = wait_terminal(config, {"mitm"})["mitm"]
    assert result.event == Event.FAILED and result.error.code == "host_key_mismatch"  # type: ignore[union-attr]
    assert result.attempts == 1 and "podq trust" in result.error.message  # type: ignore[union-attr]


def test_unknown_host_key_then_trust(
    sshd: SSHServer, make_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    known = tmp_path / "fresh_known_hosts"
    config = make_config(ssh_host_toml(sshd, known_hosts=str(known)))
    with BackgroundDaemon(config):
        put(config, id="new", type="ping")
        result = wait_terminal(config, {"new"})["new"]
    assert result.error is not None and result.error.code == "host_key_unknown"
    assert "podq trust pod1" in result.error.message

    assert config.source is not None
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(sshd.host_key) + ".pub"], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    assert podq(["--config", str(config.source), "trust", "pod1"]) == 1  # no tty, no --yes: not recorded
    assert not known.exists()
    assert podq(["--config", str(config.source), "trust", "pod1", "--yes"]) == 0
    out = capsys.readouterr().out
    assert fingerprint in out and known.read_text() == sshd.host_entry()
    assert podq(["--config", str(config.source), "trust", "pod1", "--yes"]) == 0
    assert "already trusted" in capsys.readouterr().out

    with BackgroundDaemon(config):
        put(config, id="trusted", type="ping")
        assert wait_terminal(config, {"trusted"})["trusted"].event == Event.SUCCEEDED

    keygen(tmp_path / "other")
    pub = (tmp_path / "other.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    assert podq(["--config", str(config.source), "trust", "pod1", "--yes"]) == 1  # never replaces silently
    assert "DIFFERENT key" in capsys.readouterr().err


def test_a_cancelled_command_is_stopped_on_the_host(sshd: SSHServer, make_config: Callable[..., Config]) -> None:
    config = make_config(ssh_host_toml(sshd), grace_s=0.3)
    fifo = sshd.workspace / f"blocked-{os.getpid()}.log"
    os.mkfifo(fifo)  # `tail` blocks forever opening a FIFO nobody writes
    with BackgroundDaemon(config):
        put(config, id="stuck", type="tail_log", path=fifo.name, timeout_s=120)
        _wait_until(fifo, running=True)
    assert events_of(config, "stuck")[-1] == "cancelled"
    _wait_until(fifo, running=False)  # closing the channel alone would not stop it


def _wait_until(fifo: Path, *, running: bool) -> None:
    """Until `tail` on `fifo` runs on the host (or, running=False, no longer does)."""
    deadline = time.monotonic() + (10 if running else 5)
    while _running(fifo) != running:
        assert time.monotonic() < deadline, "never started on the host" if running else "still runs on the host"
        time.sleep(0.02)


def _running(fifo: Path) -> bool:
    return subprocess.run(["pgrep", "-f", f"tail -n 50 -- {fifo}"], capture_output=True).returncode == 0


def _drop_connections(server: SSHServer) -> None:
    """Kill the server's per-connection processes: every open connection breaks, the listener stays."""
    children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def test_a_dropped_connection_fails_the_running_command_and_the_next_one_reconnects(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    server = start_sshd(tmp_path / "own-sshd")  # its own server: this test breaks its connections
    try:
        config = make_config(ssh_host_toml(server))
        fifo = server.workspace / "blocked.log"
        os.mkfifo(fifo)
        with BackgroundDaemon(config) as bg:
            put(config, id="first", type="df")
            assert wait_terminal(config, {"first"})["first"].event == Event.SUCCEEDED
            put(config, id="inflight", type="tail_log", path="blocked.log", timeout_s=60)
            _wait_until(fifo, running=True)
            _drop_connections(server)
            lost = wait_terminal(config, {"inflight"}, timeout_s=30)["inflight"]
            put(config, id="after", type="df")
            after = wait_terminal(config, {"after"}, timeout_s=30)["after"]
            host = bg.daemon.hosts["pod1"]
            assert isinstance(host, SSHHost) and host.connects == 2
        assert lost.event == Event.FAILED and lost.error.code == "connection_lost"  # type: ignore[union-attr]
        assert "may or may not have completed" in lost.error.message  # type: ignore[union-attr]
        assert after.event == Event.SUCCEEDED
    finally:
        server.stop()


def test_a_chatty_login_shell_does_not_hide_the_pid_line(make_config: Callable[..., Config], tmp_path: Path) -> None:
    noise = tmp_path / "noise.sh"
    noise.write_text("echo 'bash: warning: setlocale: LC_ALL: cannot change locale' >&2\n")
    server = start_sshd(tmp_path / "chatty-sshd", skip_bashrc=False,  # one SetEnv line: sshd takes only the first
                        extra_config=(f"SetEnv SHLVL=1 BASH_ENV={noise}",))
    try:
        config = make_config(ssh_host_toml(server), grace_s=0.3)
        fifo = server.workspace / "blocked.log"
        os.mkfifo(fifo)
        with BackgroundDaemon(config):
            put(config, id="df", type="df")
            done = wait_terminal(config, {"df"})["df"]
            put(config, id="stuck", type="tail_log", path="blocked.log", timeout_s=120)
            _wait_until(fifo, running=True)
        assert done.event == Event.SUCCEEDED
        assert "cannot change locale" in (done.stderr or "") and "@@podq-pid" not in (done.stderr or "")
        _wait_until(fifo, running=False)  # closing the channel alone would not stop it
    finally:
        server.stop()
