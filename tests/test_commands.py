"""argv builders and output parsers, tested pure: the exact argv a request produces, and what output means."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import orjson
import pytest

from agent.commands import COMMANDS, plan
from agent.commands.base import GUARD_NOT_ALLOWED, PATH_GUARD, Target
from agent.commands.inspect import GPU_QUERY, parse_df_line, parse_gpus
from agent.errors import ErrorCode, NotAllowed
from agent.hosts.base import Completed, Invocation
from agent.hosts.ssh import remote_command_line
from agent.requests import LsRequest, parse_line

WS = Target("/workspace")


def test_tail_log_argv_is_exact() -> None:
    request = parse_line(b'{"type": "tail_log", "path": "logs/run.log", "lines": 20}')
    invocation = plan(request, WS)
    assert invocation.argv == (
        "sh", "-c", PATH_GUARD, "podq-guard", "/workspace", "logs/run.log", "tail", "-n", "20", "--", "@PATH@",
    )
    assert invocation.timeout_s == 30
    assert invocation.host_argv()[:5] == ("env", "LC_ALL=C", "timeout", "--kill-after=5", "30")


def test_absolute_paths_must_be_inside_the_workspace() -> None:
    inside = parse_line(b'{"type": "ls", "path": "/workspace/renders"}')
    assert plan(inside, WS).argv[5] == "renders"
    outside = parse_line(b'{"type": "ls", "path": "/etc"}')
    with pytest.raises(NotAllowed):
        plan(outside, WS)
    sibling = parse_line(b'{"type": "ls", "path": "/workspace2/x"}')
    with pytest.raises(NotAllowed):
        plan(sibling, WS)


def test_the_ssh_command_line_quotes_every_argument(tmp_path: Path) -> None:
    # Past validation nothing this hostile gets in; the quoting must hold anyway (defence in depth).
    evil = "x'; touch " + str(tmp_path / "pwned") + "; echo '$(id)`id`"
    request = LsRequest.model_construct(type="ls", path=evil, timeout_s=None, id=None, host=None, meta=None)
    invocation = COMMANDS["ls"].plan(request, Target(str(tmp_path)))
    line = remote_command_line(invocation)  # what an SSH server hands to the login shell
    assert shlex.split(line)[4:] == list(invocation.host_argv())
    done = subprocess.run(["sh", "-c", line], capture_output=True, check=False)
    assert not (tmp_path / "pwned").exists()
    assert done.stderr.startswith(b"@@podq-pid ")


def test_guard_refuses_symlink_escape(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "out").symlink_to("/etc")
    argv = ("sh", "-c", PATH_GUARD, "g", str(tmp_path / "ws"), "out", "ls", "@PATH@")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == GUARD_NOT_ALLOWED
    assert "outside the workspace" in done.stderr


def test_nonzero_exit_and_guard_refusals_are_told_apart() -> None:
    ls = COMMANDS["ls"]
    request = parse_line(b'{"type": "ls", "path": "x"}')
    refused = Completed(GUARD_NOT_ALLOWED, b"", b"podq-guard: x resolves to /etc, outside the workspace /w\n", 1)
    assert ls.interpret(request, refused).error_code == ErrorCode.NOT_ALLOWED
    missing = Completed(1, b"", b"find: 'x': No such file or directory\n", 1)
    outcome = ls.interpret(request, missing)
    assert outcome.error_code == ErrorCode.NONZERO_EXIT and "No such file" in (outcome.error_message or "")
    no_ws = Completed(96, b"", b"podq-guard: workspace /w does not exist on this host\n", 1)
    assert ls.interpret(request, no_ws).error_code == ErrorCode.WORKSPACE_MISSING


def test_parse_gpus_from_nvidia_smi_csv() -> None:
    out = [
        "0, NVIDIA H100 80GB HBM3, GPU-1234, 81559, 1, 0, 31, 550.54.15",
        "1, NVIDIA RTX A6000, GPU-5678, 49140, [N/A], 12, [Not Supported], 550.54.15",
    ]
    gpus = parse_gpus(out)
    assert gpus[0] == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1234", "memory_total_mib": 81559,
                       "memory_used_mib": 1, "utilization_percent": 0, "temperature_c": 31,
                       "driver_version": "550.54.15"}
    assert gpus[1]["memory_used_mib"] is None and gpus[1]["temperature_c"] is None
    assert GPU_QUERY[0] == "nvidia-smi"


def test_gpu_reports_no_gpu_clearly() -> None:
    request = parse_line(b'{"type": "gpu"}')
    outcome = COMMANDS["gpu"].interpret(request, Completed(0, b"@@podq no-nvidia-smi\n", b"", 1))
    assert outcome.output == {"available": False, "gpus": [],
                              "reason": "no NVIDIA GPU: nvidia-smi is not installed on this host"}
    failed = Completed(0, b"@@podq nvidia-smi-failed\nNo devices were found\n", b"", 1)
    assert "No devices were found" in COMMANDS["gpu"].interpret(request, failed).output["reason"]  # type: ignore[index]


def test_parse_df_line() -> None:
    usage = parse_df_line("/dev/vda1 1000 250 750 25% /mnt/my volume")
    assert usage == {"filesystem": "/dev/vda1", "mount": "/mnt/my volume", "total_bytes": 1024000,
                     "used_bytes": 256000, "available_bytes": 768000, "used_percent": 25.0}


def test_every_invocation_is_bounded() -> None:
    for kind in ("ping", "ls", "df", "gpu", "tail_log"):
        line = {"type": kind, "path": "x"} if kind in ("ls", "df", "tail_log") else {"type": kind}
        invocation = plan(parse_line(orjson.dumps(line)), WS)
        assert isinstance(invocation, Invocation) and 0 < invocation.timeout_s <= 60
