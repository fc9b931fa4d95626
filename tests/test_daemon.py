"""The daemon end to end on the `local` host: every command type, and every kind of bad input."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from agent.config import Config
from agent.daemon import BackgroundDaemon, Daemon
from agent.errors import QueueBusy
from agent.results import Event
from tests.conftest import all_results, events_of, put, wait_lines, wait_terminal, write_raw

BASE_FIELDS = {"id", "event", "ts", "type", "host"}


def _workspace(config: Config) -> Path:
    return Path(str(config.hosts[0].workspace))


def test_each_command_type_succeeds_on_local(running: Config) -> None:
    ws = _workspace(running)
    (ws / "renders").mkdir()
    (ws / "renders" / "base_0001.png").write_bytes(b"\x89PNG" + b"0" * 96)
    (ws / "logs").mkdir()
    (ws / "logs" / "run.log").write_text("".join(f"line {i}\n" for i in range(100)))
    put(running, id="p", type="ping", meta={"step": 1})
    put(running, id="l", type="ls", path="renders")
    put(running, id="d", type="df")
    put(running, id="g", type="gpu")
    put(running, id="t", type="tail_log", path="logs/run.log", lines=3)
    results = wait_terminal(running, {"p", "l", "d", "g", "t"})
    assert {r.event for r in results.values()} == {Event.SUCCEEDED}, results

    for rid in results:
        assert events_of(running, rid) == ["accepted", "started", "succeeded"]
    for line in all_results(running):
        raw = orjson.loads(line.to_json_line())
        assert raw.keys() >= BASE_FIELDS and raw["host"] == "local"
        assert raw["ts"].endswith("Z")
    ping = results["p"]
    assert ping.meta == {"step": 1} and ping.exit_code == 0 and ping.attempts == 1 and ping.duration_s is not None
    assert ping.output is not None and ping.output["uname"]["system"] == "Linux"
    assert ping.output["disk"]["available_bytes"] > 0 and ping.output["gpus"] == []
    assert ping.output["blender"] is None or ping.output["blender"][0].isdigit()
    assert all(line.meta == {"step": 1} for line in all_results(running) if line.id == "p")
    assert results["l"].output == {
        "path": "renders", "kind": "dir", "truncated_entries": False,
        "entries": [{"name": "base_0001.png", "kind": "file", "size": 100,
                     "mtime": results["l"].output["entries"][0]["mtime"]}],  # type: ignore[index]
    }
    assert results["d"].output["total_bytes"] > 0  # type: ignore[index]
    assert results["g"].output["available"] is False  # type: ignore[index]
    assert results["t"].output == {"path": "logs/run.log", "lines": ["line 97", "line 98", "line 99"]}


def test_failures_are_results_with_codes(running: Config) -> None:
    ws = _workspace(running)
    (ws / "escape").symlink_to("/etc")
    put(running, id="missing", type="tail_log", path="nope.log")
    put(running, id="symlink", type="ls", path="escape")
    put(running, id="abs", type="ls", path="/etc")
    results = wait_terminal(running, {"missing", "symlink", "abs"})
    assert results["missing"].event == Event.FAILED
    assert results["missing"].error.code == "nonzero_exit"  # type: ignore[union-attr]
    assert results["missing"].exit_code == 1 and "No such file" in (results["missing"].stderr or "")
    assert results["symlink"].event == Event.FAILED and results["symlink"].error.code == "not_allowed"  # type: ignore[union-attr]
    # A path that is refused before anything runs is rejected, with no accepted/started lines.
    assert events_of(running, "abs") == ["rejected"] and results["abs"].error.code == "not_allowed"  # type: ignore[union-attr]


def test_timeout_stops_the_command(running: Config) -> None:
    ws = _workspace(running)
    fifo = ws / "never.log"
    import os

    os.mkfifo(fifo)  # `tail` blocks forever opening a FIFO nobody writes
    put(running, id="slow", type="tail_log", path="never.log", timeout_s=0.5)
    result = wait_terminal(running, {"slow"})["slow"]
    assert result.event == Event.TIMED_OUT and result.error.code == "timeout"  # type: ignore[union-attr]
    assert 0.5 <= result.duration_s < 5  # type: ignore[operator]


BAD_LINES: list[tuple[bytes, str, str | None]] = [
    (b"{not json", "invalid_json", None),
    (b"[1, 2, 3]", "invalid_request", None),
    (b'{"id": "u1", "type": "format_disk"}', "unknown_type", "u1"),
    (b'{"id": "x1", "type": "ping", "shell": "rm -rf /"}', "invalid_request", "x1"),
    (b'{"id": "w1", "type": "tail_log", "path": "a.log", "lines": "ten"}', "invalid_request", "w1"),
    (b'{"id": "tr1", "type": "ls", "path": "../../etc"}', "not_allowed", "tr1"),
    (b'{"id": "m1", "type": "ls", "path": "x; touch /tmp/podq-pwned"}', "not_allowed", "m1"),
    (b'{"id": "m2", "type": "df", "path": "$(touch /tmp/podq-pwned)"}', "not_allowed", "m2"),
    (b'{"id": "m3", "type": "tail_log", "path": "`id`"}', "not_allowed", "m3"),
    (b'{"id": "m4;id", "type": "ping"}', "invalid_request", None),
    (b'{"id": "m5", "type": "ping", "host": "local;id"}', "invalid_request", "m5"),
    (b'{"id": "h1", "type": "ping", "host": "elsewhere"}', "host_unknown", "h1"),
    (b'{"id": "bad-utf8", "type": "ping", "meta": {"x": "\xff\xfe"}}', "invalid_json", None),
    (b'{"id": "big", "type": "ping", "meta": {"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}}', "line_too_long", None),
    (b'{"id": "deep", "type": "ping", "meta": ' + b'{"a": ' * 300 + b"1" + b"}" * 301, "invalid_request", "deep"),
]


def test_bad_input_gets_one_rejected_line_each_and_serving_goes_on(running: Config) -> None:
    offsets = []
    for line, _, _ in BAD_LINES:
        offsets.append(running.requests_path.stat().st_size if running.requests_path.exists() else 0)
        write_raw(running, line + b"\n")
        write_raw(running, b"\n   \n")  # blank lines are ignored, not rejected
    put(running, id="after", type="ping")
    wait_terminal(running, {"after"})
    rejected = [r for r in all_results(running) if r.event == Event.REJECTED]
    assert [(r.error.code.value, r.id) for r in rejected] == [(c, i) for _, c, i in BAD_LINES]  # type: ignore[union-attr]
    assert [r.line_offset for r in rejected] == offsets
    assert all(r.error.message for r in rejected)  # type: ignore[union-attr]
    assert not Path("/tmp/podq-pwned").exists()
    assert events_of(running, "after") == ["accepted", "started", "succeeded"]
    assert len(all_results(running)) == len(BAD_LINES) + 3  # nothing for the blank lines


def test_duplicate_id_is_rejected_and_the_first_is_untouched(running: Config) -> None:
    put(running, id="dup", type="ls", meta={"n": 1})
    wait_terminal(running, {"dup"})
    offset = running.requests_path.stat().st_size
    put(running, id="dup", type="df", meta={"n": 2})
    lines = wait_lines(running, 2)
    second = lines[1]
    assert second.event == Event.REJECTED and second.error.code == "duplicate_id"  # type: ignore[union-attr]
    assert second.id == "dup" and second.line_offset == offset and second.meta == {"n": 2}
    assert events_of(running, "dup") == ["accepted", "started", "succeeded", "rejected"]
    first = [r for r in all_results(running) if r.id == "dup" and r.event == Event.SUCCEEDED]
    assert first[0].type == "ls" and first[0].meta == {"n": 1}


def test_requests_without_id_get_a_stable_one(running: Config) -> None:
    write_raw(running, b'{"type": "ping"}\n')
    line = wait_lines(running, 1)[0]
    assert line.id == "auto-0-0" and line.event == Event.SUCCEEDED
    accepted = next(r for r in all_results(running) if r.event == Event.ACCEPTED)
    assert accepted.auto_id is True and accepted.line_offset == 0


def test_partial_line_waits_for_its_newline(running: Config) -> None:
    write_raw(running, b'{"id": "half", "type": ')
    time.sleep(0.5)
    assert events_of(running, "half") == []
    write_raw(running, b'"ping"}\n')
    assert wait_terminal(running, {"half"})["half"].event == Event.SUCCEEDED


def test_restart_catches_up_and_runs_nothing_twice(local_config: Config) -> None:
    with BackgroundDaemon(local_config):
        put(local_config, id="before", type="ping")
        wait_terminal(local_config, {"before"})
    put(local_config, id="while-down", type="df")  # appended while no daemon runs
    with BackgroundDaemon(local_config):
        wait_terminal(local_config, {"while-down"})
    assert events_of(local_config, "before") == ["accepted", "started", "succeeded"]
    assert events_of(local_config, "while-down") == ["accepted", "started", "succeeded"]


def test_one_daemon_per_queue(running: Config) -> None:
    import asyncio

    with pytest.raises(QueueBusy, match="already serves"):
        asyncio.run(Daemon(running).async_run())


def test_until_idle_exits_when_everything_finished(local_config: Config) -> None:
    import asyncio

    put(local_config, id="a", type="ping")
    put(local_config, id="b", type="ls")
    asyncio.run(asyncio.wait_for(Daemon(local_config, until_idle=True).async_run(), 30))
    assert events_of(local_config, "a")[-1] == "succeeded" and events_of(local_config, "b")[-1] == "succeeded"


def test_a_missing_local_workspace_is_reported_not_created(make_config: Callable[..., Config]) -> None:
    config = make_config()  # its workspace folder does not exist
    with BackgroundDaemon(config):
        put(config, id="nows", type="ls")
        result = wait_terminal(config, {"nows"})["nows"]
    assert result.event == Event.FAILED and result.error.code == "workspace_missing"  # type: ignore[union-attr]
    assert not _workspace(config).exists()
