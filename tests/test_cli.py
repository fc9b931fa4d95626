"""The `podq` command line: submit (and --wait exit codes), validate, schema, init, status, tail."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from agent import constants, logs
from agent.cli import main as podq
from agent.config import Config
from agent.results import Event

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[[Config], Run]:
    def bind(config: Config) -> Run:
        def run(*args: str) -> tuple[int, str, str]:
            code = podq(["--config", str(config.source), *args])
            out, err = capsys.readouterr()
            return code, out, err

        return run

    return bind


def test_submit_wait_exit_codes(running: Config, cli: Callable[[Config], Run]) -> None:
    run = cli(running)
    ws = Path(str(running.hosts[0].workspace))
    (ws / "a.log").write_text("one\ntwo\n")

    code, out, _ = run("submit", "tail_log", "--path", "a.log", "--lines", "1", "--wait")
    request_id, result = out.splitlines()
    assert code == 0 and orjson.loads(result)["id"] == request_id
    assert orjson.loads(result)["output"]["lines"] == ["two"]

    code, out, _ = run("submit", "tail_log", "--path", "missing.log", "--wait")
    assert code == 1 and orjson.loads(out.splitlines()[1])["error"]["code"] == "nonzero_exit"

    os.mkfifo(ws / "blocked")
    code, out, _ = run("submit", "--json", '{"type": "tail_log", "path": "blocked", "timeout_s": 0.3}', "--wait")
    assert code == 1 and orjson.loads(out.splitlines()[1])["event"] == "timed_out"

    code, out, err = run("submit", "ls", "--path", "../secrets", "--wait")
    assert code == 2 and out == "" and "not_allowed" in err  # rejected before reaching the file

    code, out, _ = run("submit", "--json", '{"id": "mine", "type": "ping", "meta": {"who": "cli"}}', "--wait")
    assert code == 0 and out.splitlines()[0] == "mine"
    code, _, err = run("submit", "--json", '{"id": "mine", "type": "ping"}')
    assert code == 2 and "duplicate_id" in err

    code, _, err = run("submit", "ping", "--colour", "red")
    assert code == 2 and "`colour` is not a field" in err


def test_submit_wait_times_out_and_hints_when_no_daemon_runs(
    local_config: Config, cli: Callable[[Config], Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "NO_DAEMON_HINT_AFTER_S", 0.2)
    code, out, err = cli(local_config)("submit", "ping", "--wait", "--wait-timeout", "1")
    assert code == 124 and out.strip().startswith("r-")
    assert "no daemon is serving" in err and "stays queued" in err


def test_submit_without_wait_prints_the_id_and_appends_one_line(
    local_config: Config, cli: Callable[[Config], Run]
) -> None:
    code, out, _ = cli(local_config)("submit", "ls", "--path", "renders", "--meta", '{"shot": 3}')
    assert code == 0
    line = orjson.loads(local_config.requests_path.read_bytes())
    assert line == {"type": "ls", "path": "renders", "meta": {"shot": 3}, "id": out.strip()}


def test_validate_reports_each_bad_line(local_config: Config, cli: Callable[[Config], Run], tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"type": "ping"}\n\n{"type": "ls", "path": "renders"}\n')
    assert cli(local_config)("validate", str(good))[0] == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "ping"}\n{"type": "ls", "path": "/etc"}\n{oops\n{"type": "ping", "host": "x"}\n')
    code, out, err = cli(local_config)("validate", str(bad))
    assert code == 1 and "1 valid, 3 invalid" in err
    assert [line.split(": ")[1] for line in out.splitlines()] == ["not_allowed", "invalid_json", "host_unknown"]
    assert out.splitlines()[0].startswith(f"{bad}:2:")


def test_schema_prints_the_request_schema(local_config: Config, cli: Callable[[Config], Run]) -> None:
    code, out, _ = cli(local_config)("schema")
    schema = orjson.loads(out)
    assert code == 0 and schema["discriminator"]["propertyName"] == "type" and len(schema["oneOf"]) == 10


def test_init_writes_a_starter_that_works_as_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert podq(["init"]) == 0
    assert (tmp_path / "podq.toml").exists() and (tmp_path / "workspace").is_dir()
    assert podq(["init"]) == 3  # never overwrites by accident
    assert podq(["init", "--force"]) == 0
    assert podq(["run", "--until-idle"]) == 0
    capsys.readouterr()
    assert podq(["submit", "gpu"]) == 0
    request_id = capsys.readouterr().out.strip()
    assert podq(["run", "--until-idle"]) == 0
    assert podq(["status"]) == 0
    out = capsys.readouterr().out
    assert "daemon NOT running" in out and request_id in out and "succeeded" in out
    assert podq(["tail", "--id", request_id]) == 0
    tail = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in tail] == ["accepted", "started", "succeeded"]
    assert podq(["status", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["requests"][-1]["state"] == Event.SUCCEEDED.value


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "podq.toml"
    path.write_text('[[hosts]]\nname = "x"\nkind = "ssh"\nworkspace = "relative"\n')
    assert podq(["--config", str(path), "status"]) == 3
    err = capsys.readouterr().err
    assert "hosts[0].hostname: required" in err and "absolute path" in err
    assert podq(["--config", str(tmp_path / "absent.toml"), "status"]) == 3
    assert "podq init" in capsys.readouterr().err


def test_config_may_follow_the_command(local_config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert podq(["status", "--config", str(local_config.source)]) == 0
    assert str(local_config.queue.dir) in capsys.readouterr().out
    assert podq(["submit", "gpu", "--config", str(local_config.source)]) == 0
    assert "config" not in orjson.loads(local_config.requests_path.read_bytes())


def test_wait_timeout_implies_wait_and_status_counts_unread_lines(
    local_config: Config, cli: Callable[[Config], Run]
) -> None:
    run = cli(local_config)
    code, _, err = run("submit", "gpu", "--wait-timeout", "0.5")
    assert code == 124 and "stays queued" in err
    code, _, err = run("submit", "gpu")
    assert code == 0 and "no daemon is serving" in err
    code, out, _ = run("status")
    assert "2 request line(s) in requests.jsonl not read yet" in out and "podq run" in out


def test_validate_knows_ids_already_used(
    local_config: Config, cli: Callable[[Config], Run], tmp_path: Path
) -> None:
    from agent.daemon import BackgroundDaemon
    from tests.conftest import put, wait_terminal

    with BackgroundDaemon(local_config):
        put(local_config, id="used", type="gpu")
        wait_terminal(local_config, {"used"})
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"id": "used", "type": "gpu"}\n{"id": "twice", "type": "gpu"}\n{"id": "twice", "type": "df"}\n')
    code, out, _ = cli(local_config)("validate", str(batch))
    assert code == 1
    assert [line.split(": ")[1] for line in out.splitlines()] == ["duplicate_id", "duplicate_id"]
    assert cli(local_config)("validate", str(tmp_path / "absent.jsonl"))[0] == 2


def test_an_idle_daemon_and_a_waiting_follower_use_no_cpu(local_config: Config) -> None:
    import subprocess
    import sys
    import time

    from agent.submit import follow

    daemon = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(local_config.source), "run"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # start-up
        before = _cpu_seconds(daemon.pid)
        started = time.process_time()
        with pytest.raises(TimeoutError):
            for _ in follow(local_config, 0, timeout_s=2):
                pass
        follower_cpu = time.process_time() - started
        daemon_cpu = _cpu_seconds(daemon.pid) - before
    finally:
        daemon.terminate()
        assert daemon.wait(10) == 0
    assert follower_cpu < 0.3, f"a follower with nothing to read burned {follower_cpu:.2f} s of CPU"
    assert daemon_cpu < 0.3, f"an idle daemon burned {daemon_cpu:.2f} s of CPU in 2 s"
    assert (local_config.queue.dir / "podq.log").stat().st_size < 10_000


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_key_file_others_can_read_stops_the_daemon_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STABILITY_API_KEY", raising=False)
    assert podq(["init"]) == 0
    key = tmp_path / "stability.key"
    key.write_text("sk-not-for-others\n")
    key.chmod(0o644)
    config = tmp_path / "podq.toml"
    config.write_text(config.read_text().replace('# api_key_file = "~/.config/podq/stability.key"',
                                                 'api_key_file = "stability.key"'))
    capsys.readouterr()
    assert podq(["run", "--until-idle"]) == 3
    assert "chmod 600" in capsys.readouterr().err
    key.chmod(0o600)
    assert podq(["run", "--until-idle"]) == 0


def test_the_readme_main_job_runs_on_the_embedded_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.chdir(tmp_path)  # no podq.toml here: the embedded default (a local host)
    monkeypatch.delenv("STABILITY_API_KEY", raising=False)
    try:
        assert podq(["demo"]) == 0
    finally:
        logs.configure(None)  # the demo logs to its queue folder; later tests log as before
    out = capsys.readouterr().out
    assert "the embedded default config" in out
    for kind in ("ping", "gpu", "df", "ls", "tail_log"):
        assert f"{kind}@local  succeeded" in out
    assert "ls@local  rejected  not_allowed" in out
    if shutil.which("blender"):
        assert "character@local  succeeded" in out and "emulator of the Stability API" in out
        manifests = list((tmp_path / "artifacts").rglob("character_*.json"))
        assert len(manifests) == 1 and orjson.loads(manifests[0].read_bytes())["emulated"] is True
