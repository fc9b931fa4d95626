"""kill -9 in the middle of a batch: after a restart every request has exactly one terminal line, none is lost,
none runs twice, and results.jsonl holds only whole lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from agent.config import Config
from agent.results import Event
from agent.submit import append_line
from tests.conftest import all_results, ssh_host_toml
from tests.sshd import SSHServer

BATCH = 200


def start_daemon(config: Config, *extra: str) -> subprocess.Popen[bytes]:
    assert config.source is not None
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(config.source), "run", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parent.parent,
    )


def terminal_count(config: Config) -> int:
    return sum(1 for line in all_results(config) if line.terminal)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_kill_9_mid_batch_loses_nothing_and_repeats_nothing(
    kind: str, make_config: Callable[..., Config], sshd: SSHServer
) -> None:
    config = make_config(ssh_host_toml(sshd)) if kind == "ssh" else make_config()
    config.queue.dir.mkdir(parents=True, exist_ok=True)
    Path(str(config.hosts[0].workspace)).mkdir(parents=True, exist_ok=True)
    ids = [f"k{i:03d}" for i in range(BATCH)]
    for i, rid in enumerate(ids):
        append_line(config.requests_path, {"id": rid, "type": ("ls", "df", "gpu")[i % 3]})

    kills = 0
    for threshold in (30, 110):  # two crashes, at different points of the batch
        daemon = start_daemon(config)
        try:
            wait_for(lambda t=threshold: terminal_count(config) >= t)
        finally:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            kills += 1
        assert terminal_count(config) < BATCH, "the batch finished before the kill: make it longer"

    final = start_daemon(config, "--until-idle")
    assert final.wait(timeout=120) == 0

    lines = all_results(config)
    raw = config.results_path.read_bytes()
    assert raw.endswith(b"\n")
    assert len(raw.splitlines()) == len(lines), "a torn or foreign line in results.jsonl"
    terminal = Counter(line.id for line in lines if line.terminal)
    started = Counter(line.id for line in lines if line.event == Event.STARTED)
    accepted = Counter(line.id for line in lines if line.event == Event.ACCEPTED)
    assert set(terminal) == set(ids) and set(terminal.values()) == {1}, "lost or doubled terminal lines"
    assert max(started.values()) == 1, "a request was started twice"
    assert max(accepted.values()) == 1, "a request was accepted twice"
    outcomes = Counter(line.event for line in lines if line.terminal)
    interrupted = [line for line in lines if line.error is not None and line.error.code == "interrupted"]
    assert outcomes[Event.SUCCEEDED] + len(interrupted) == BATCH
    # Only a request that was running when the daemon died is reported interrupted, and never rerun.
    assert all(started[line.id] == 1 for line in interrupted)
    assert len(interrupted) <= kills * 8
    for line in raw.splitlines():
        orjson.loads(line)


def test_sigterm_lets_running_commands_finish_within_the_grace_then_cancels(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(grace_s=0.5)
    ws = Path(str(config.hosts[0].workspace))
    ws.mkdir(parents=True)
    os.mkfifo(ws / "never.log")  # `tail` blocks forever opening a FIFO nobody writes
    daemon = start_daemon(config)
    append_line(config.requests_path, {"id": "quick", "type": "df"})
    append_line(config.requests_path, {"id": "stuck", "type": "tail_log", "path": "never.log", "timeout_s": 60})
    wait_for(lambda: any(line.id == "stuck" and line.event == Event.STARTED for line in all_results(config)))
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    final = {line.id: line for line in all_results(config) if line.terminal}
    assert final["quick"].event == Event.SUCCEEDED
    assert final["stuck"].event == Event.CANCELLED and final["stuck"].error.code == "cancelled"  # type: ignore[union-attr]
