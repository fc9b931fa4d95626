"""requests.jsonl as writers really treat it: rotated, truncated, and appended to by many processes at once."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from collections import Counter
from pathlib import Path

import orjson

from agent import config as config_mod
from agent.config import Config
from agent.daemon import BackgroundDaemon
from agent.journal import RequestsReader
from agent.results import Event
from agent.submit import submit
from tests.conftest import all_results, put, wait_lines, wait_terminal, write_raw


def test_rotation_by_rename_reads_the_new_file_from_its_start(running: Config) -> None:
    put(running, id="old-1", type="gpu")
    wait_terminal(running, {"old-1"})
    os.rename(running.requests_path, running.requests_path.with_suffix(".jsonl.1"))
    put(running, id="new-1", type="gpu")  # creates a fresh requests.jsonl
    write_raw(running, b'{"type": "gpu"}\n')
    results = wait_terminal(running, {"new-1", "auto-1-" + str(_size_of_first_line(running))})
    assert all(r.event == Event.SUCCEEDED for r in results.values())


def _size_of_first_line(config: Config) -> int:
    return len(config.requests_path.read_bytes().split(b"\n")[0]) + 1


def test_truncation_starts_over_at_the_beginning(running: Config) -> None:
    put(running, id="t-1", type="gpu")
    put(running, id="t-2", type="gpu")
    wait_terminal(running, {"t-1", "t-2"})
    os.truncate(running.requests_path, 0)
    put(running, id="t-3", type="gpu")
    assert wait_terminal(running, {"t-3"})["t-3"].event == Event.SUCCEEDED
    # Lines without ids after the truncation get ids of the new generation: no clash with the old ones.
    write_raw(running, b'{"type": "gpu"}\n')
    wait_lines(running, 4)
    os.truncate(running.requests_path, 0)
    write_raw(running, b'{"type": "gpu", "meta": {"after": "truncation"}}\n')
    ids = {line.id for line in wait_lines(running, 5)}
    assert {"t-1", "t-2", "t-3"} < ids and len(ids) == 5


def test_truncate_and_rewrite_past_the_offset_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"id": "a", "type": "gpu"}\n')
    reader = RequestsReader(path, generation=0, dev=None, ino=None, offset=0)
    assert [line.data for line in reader.lines()] == [b'{"id": "a", "type": "gpu"}']
    # Truncated and written again, longer than before, all between two reads.
    path.write_bytes(b'{"id": "b", "type": "gpu"}\n{"id": "c", "type": "gpu"}\n')
    assert [line.data for line in reader.lines()] == [b'{"id": "b", "type": "gpu"}', b'{"id": "c", "type": "gpu"}']
    assert reader.generation == 1


def test_file_replaced_while_down_is_read_from_its_start(local_config: Config) -> None:
    with BackgroundDaemon(local_config):
        put(local_config, id="a", type="gpu")
        put(local_config, id="b", type="gpu")
        wait_terminal(local_config, {"a", "b"})
    replacement = local_config.requests_path.with_name("incoming.jsonl")
    replacement.write_bytes(b'{"id": "c", "type": "gpu"}\n')
    os.replace(replacement, local_config.requests_path)
    with BackgroundDaemon(local_config):
        assert wait_terminal(local_config, {"c"})["c"].event == Event.SUCCEEDED


def test_reader_yields_complete_lines_only_and_skips_long_ones_unbuffered(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"a\n" + b"x" * (3 * 1024 * 1024) + b"\nb\npartial")
    reader = RequestsReader(path, generation=0, dev=None, ino=None, offset=0)
    lines = list(reader.lines())
    assert [(line.offset, line.data) for line in lines] == [(0, b"a"), (2, None), (2 + 3 * 1024 * 1024 + 1, b"b")]
    assert reader.offset == lines[-1].end
    with open(path, "ab") as f:
        f.write(b"-done\n")
    assert [line.data for line in reader.lines()] == [b"partial-done"]


PROCESSES = 8
PER_PROCESS = 250
RAW_LINES = 250


def _submitter(config_path: str, worker: int) -> None:
    config = config_mod.load(Path(config_path))
    for i in range(PER_PROCESS):
        submit(config, {"id": f"w{worker}-{i}", "type": "gpu", "meta": {"pad": "x" * (i % 97)}})


def test_concurrent_submitters_and_raw_appends_never_tear_a_line(local_config: Config) -> None:
    assert local_config.source is not None
    raw_writer = (
        f'for i in $(seq 1 {RAW_LINES}); do echo "{{\\"id\\": \\"raw-$i\\", \\"type\\": \\"gpu\\"}}" '
        f">> {local_config.requests_path}; done"
    )
    with BackgroundDaemon(local_config):
        ctx = multiprocessing.get_context("spawn")
        workers = [ctx.Process(target=_submitter, args=(str(local_config.source), w)) for w in range(PROCESSES)]
        for w in workers:
            w.start()
        shell = subprocess.Popen(["bash", "-c", raw_writer])
        for w in workers:
            w.join(120)
            assert w.exitcode == 0
        assert shell.wait(120) == 0
        expected = {f"w{w}-{i}" for w in range(PROCESSES) for i in range(PER_PROCESS)}
        expected |= {f"raw-{i}" for i in range(1, RAW_LINES + 1)}
        results = wait_terminal(local_config, expected, timeout_s=240)
    assert {r.event for r in results.values()} == {Event.SUCCEEDED}
    request_lines = local_config.requests_path.read_bytes().splitlines()
    assert len(request_lines) == len(expected)
    assert {orjson.loads(line)["id"] for line in request_lines} == expected  # every line whole
    terminal = Counter(line.id for line in all_results(local_config) if line.terminal)
    assert set(terminal.values()) == {1}


def test_a_line_written_just_before_a_rename_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    reader = RequestsReader(path, generation=0, dev=None, ino=None, offset=0)
    assert [line.data for line in reader.lines()] == [b'{"n": 1}']
    with open(path, "ab") as old:  # appended after our last read, then the file is rotated away
        old.write(b'{"n": 2}\n')
    os.rename(path, tmp_path / "requests.jsonl.1")
    path.write_bytes(b'{"n": 3}\n')
    assert [line.data for line in reader.lines()] == [b'{"n": 2}', b'{"n": 3}']
    assert reader.generation == 1


def test_saving_the_same_lines_as_a_new_file_does_not_rerun_them(running: Config) -> None:
    write_raw(running, b'{"type": "gpu", "meta": {"n": 1}}\n')
    wait_lines(running, 1)
    # An editor's save: the old content plus a new line, written to a temporary file and renamed over.
    saved = running.requests_path.read_bytes() + b'{"type": "gpu", "meta": {"n": 2}}\n'
    tmp = running.requests_path.with_name(".requests.jsonl.swp")
    tmp.write_bytes(saved)
    os.replace(tmp, running.requests_path)
    lines = wait_lines(running, 2)
    assert [line.meta for line in lines] == [{"n": 1}, {"n": 2}]
    assert [line.id for line in lines] == ["auto-0-0", f"auto-0-{len(saved) - 34}"]


def test_a_file_rewritten_while_podq_was_down_is_read_again_from_its_start(local_config: Config) -> None:
    with BackgroundDaemon(local_config):
        put(local_config, id="a1", type="gpu")
        put(local_config, id="a2", type="gpu")
        wait_terminal(local_config, {"a1", "a2"})
    ino = local_config.requests_path.stat().st_ino
    with open(local_config.requests_path, "wb") as f:  # same file (inode), new and longer content
        for i in range(1, 5):
            f.write(orjson.dumps({"id": f"b{i}", "type": "gpu"}) + b"\n")
    assert local_config.requests_path.stat().st_ino == ino
    with BackgroundDaemon(local_config):
        results = wait_terminal(local_config, {"b1", "b2", "b3", "b4"})
    assert {r.event for r in results.values()} == {Event.SUCCEEDED}


def test_a_new_file_that_only_ends_like_the_old_one_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    suffix = ', "type": "gpu", "meta": {"note": "the same long suffix on every line, past sixty-four bytes"}}\n'
    path.write_bytes(b"".join(b'{"id": "job-%04d"' % i + suffix.encode() for i in range(1, 4)))
    reader = RequestsReader(path, generation=0, dev=None, ino=None, offset=0)
    assert len(list(reader.lines())) == 3
    rotated = tmp_path / "incoming.jsonl"
    rotated.write_bytes(b"".join(b'{"id": "job-%04d"' % i + suffix.encode() for i in range(101, 106)))
    os.replace(rotated, path)
    assert [orjson.loads(line.data or b"")["id"] for line in reader.lines()] == [
        "job-0101", "job-0102", "job-0103", "job-0104", "job-0105"]


def test_an_editor_save_while_podq_was_stopped_does_not_rerun_lines(local_config: Config) -> None:
    with BackgroundDaemon(local_config):
        write_raw(local_config, b'{"type": "gpu", "meta": {"n": 1}}\n')
        wait_lines(local_config, 1)
    saved = local_config.requests_path.read_bytes() + b'{"type": "gpu", "meta": {"n": 2}}\n'
    tmp = local_config.requests_path.with_name(".requests.jsonl.swp")
    tmp.write_bytes(saved)
    os.replace(tmp, local_config.requests_path)  # a new file (inode) with the same first line
    with BackgroundDaemon(local_config):
        lines = wait_lines(local_config, 2)
    assert [line.meta for line in lines] == [{"n": 1}, {"n": 2}]


def test_status_reads_a_state_file_from_an_older_podq(local_config: Config) -> None:
    from agent.state import StateStore

    path = local_config.queue.dir / "podq.sqlite3"
    local_config.queue.dir.mkdir(parents=True, exist_ok=True)
    store = StateStore(path)
    store._db.execute("ALTER TABLE cursor DROP COLUMN tail")  # as an older podq created it
    store._db.execute("ALTER TABLE cursor DROP COLUMN prefix_sha256")
    store.close()
    cursor = StateStore(path, readonly=True).cursor()
    assert cursor.tail == b"" and cursor.prefix_sha256 is None
    with BackgroundDaemon(local_config):  # the daemon migrates it
        put(local_config, id="after-upgrade", type="gpu")
        assert wait_terminal(local_config, {"after-upgrade"})["after-upgrade"].event == Event.SUCCEEDED
