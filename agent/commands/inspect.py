"""The safe inspection commands: ping, ls, df, gpu, tail_log. Read-only, bounded, paths guarded."""

from __future__ import annotations

from typing import Any

from agent.commands.base import PATH_PLACEHOLDER, CommandType, Outcome, Target, guarded, nonzero, text
from agent.hosts.base import Completed, Invocation
from agent.requests import DfRequest, GpuRequest, LsRequest, PingRequest, TailLogRequest

# ls reports at most this many entries (sorted by name); `truncated_entries` says when there were more.
MAX_LS_ENTRIES = 2000

GPU_FIELDS = (
    "index",
    "name",
    "uuid",
    "memory.total",
    "memory.used",
    "utilization.gpu",
    "temperature.gpu",
    "driver_version",
)
GPU_QUERY = ("nvidia-smi", f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader,nounits")
_GPU_KEYS = ("index", "name", "uuid", "memory_total_mib", "memory_used_mib", "utilization_percent",
             "temperature_c", "driver_version")
_GPU_INTS = {"index", "memory_total_mib", "memory_used_mib", "utilization_percent", "temperature_c"}

SECTION = "@@podq "

# One round trip for the whole health check; each section is optional on the host.
PING_SCRIPT = f"""\
ws=$1 blender=$2
echo '{SECTION}uname'; uname -snrm
echo '{SECTION}disk'; df -Pk -- "$ws" 2>/dev/null | tail -n 1
echo '{SECTION}blender'; command -v "$blender" >/dev/null 2>&1 &&
  "$blender" --version 2>/dev/null | grep -m 1 '^Blender'
echo '{SECTION}gpus'; command -v nvidia-smi >/dev/null 2>&1 && {" ".join(GPU_QUERY)} 2>/dev/null
exit 0
"""

GPU_SCRIPT = f"""\
command -v nvidia-smi >/dev/null 2>&1 || {{ echo '{SECTION}no-nvidia-smi'; exit 0; }}
out=$({" ".join(GPU_QUERY)} 2>&1) || {{ echo '{SECTION}nvidia-smi-failed'; printf '%s\\n' "$out"; exit 0; }}
printf '%s\\n' "$out"
"""


def _sections(stdout: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith(SECTION):
            current = sections.setdefault(line[len(SECTION) :].strip(), [])
        elif current is not None and line.strip():
            current.append(line)
    return sections


def parse_gpus(lines: list[str]) -> list[dict[str, Any]]:
    gpus = []
    for line in lines:
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(_GPU_KEYS):
            continue
        gpu: dict[str, Any] = {}
        for key, value in zip(_GPU_KEYS, values, strict=True):
            if value.startswith("[") or value == "":  # "[N/A]", "[Not Supported]"
                gpu[key] = None
            elif key in _GPU_INTS:
                try:
                    gpu[key] = int(float(value))
                except ValueError:
                    gpu[key] = None
            else:
                gpu[key] = value
        gpus.append(gpu)
    return gpus


def parse_df_line(line: str) -> dict[str, Any] | None:
    """One line of `df -Pk`: filesystem, 1K-blocks, used, available, capacity, mount point."""
    parts = line.split()
    if len(parts) < 6:
        return None
    try:
        total, used, available = (int(p) * 1024 for p in parts[1:4])
    except ValueError:
        return None
    return {
        "filesystem": parts[0],
        "mount": " ".join(parts[5:]),
        "total_bytes": total,
        "used_bytes": used,
        "available_bytes": available,
        "used_percent": round(100 * used / total, 1) if total else 0.0,
    }


class Ping(CommandType[PingRequest]):
    name = "ping"

    def plan(self, request: PingRequest, target: Target) -> Invocation:
        argv = ("sh", "-c", PING_SCRIPT, "podq-ping", target.workspace, target.blender)
        return Invocation(argv, request.effective_timeout_s)

    def interpret(self, request: PingRequest, completed: Completed) -> Outcome:
        if completed.exit_code != 0:
            return nonzero(completed)
        s = _sections(text(completed.stdout))
        uname = (s.get("uname") or [""])[0].split()
        blender = next(iter(s.get("blender", [])), None)
        gpus = parse_gpus(s.get("gpus", []))
        return Outcome(
            output={
                "uname": dict(zip(("system", "node", "release", "machine"), uname, strict=False)),
                "disk": parse_df_line((s.get("disk") or [""])[0]),
                "blender": blender.removeprefix("Blender ").strip() if blender else None,
                "gpus": gpus,
            },
            keep_stdout=False,
        )


class Ls(CommandType[LsRequest]):
    name = "ls"

    def plan(self, request: LsRequest, target: Target) -> Invocation:
        # find's -printf gives type, size, mtime and name without parsing ls; NUL ends each entry, so any
        # name (newlines included) survives.
        argv = guarded(
            target.workspace, request.path,
            "find", PATH_PLACEHOLDER, "-maxdepth", "1", "-printf", r"%d\t%y\t%s\t%T@\t%f\0",
        )
        return Invocation(argv, request.effective_timeout_s)

    def interpret(self, request: LsRequest, completed: Completed) -> Outcome:
        if completed.exit_code != 0:
            return nonzero(completed)
        root: dict[str, Any] | None = None
        children: list[dict[str, Any]] = []
        for record in text(completed.stdout).split("\0"):
            fields = record.split("\t", 4)
            if len(fields) != 5:
                continue
            depth, kind, size, mtime, name = fields
            entry = {"name": name, "kind": _KINDS.get(kind, "other"), "size": int(size),
                     "mtime": round(float(mtime), 3)}
            if depth == "0":
                root = entry
            else:
                children.append(entry)
        children.sort(key=lambda e: e["name"])
        is_dir = root is not None and root["kind"] == "dir"
        entries = children if is_dir else ([root] if root else [])
        return Outcome(
            output={
                "path": request.path,
                "kind": root["kind"] if root else None,
                "entries": entries[:MAX_LS_ENTRIES],
                "truncated_entries": len(entries) > MAX_LS_ENTRIES,
            },
            keep_stdout=False,
        )


_KINDS = {"f": "file", "d": "dir", "l": "symlink"}


class Df(CommandType[DfRequest]):
    name = "df"

    def plan(self, request: DfRequest, target: Target) -> Invocation:
        argv = guarded(target.workspace, request.path, "df", "-Pk", PATH_PLACEHOLDER)
        return Invocation(argv, request.effective_timeout_s)

    def interpret(self, request: DfRequest, completed: Completed) -> Outcome:
        if completed.exit_code != 0:
            return nonzero(completed)
        lines = text(completed.stdout).strip().splitlines()
        usage = parse_df_line(lines[-1]) if len(lines) >= 2 else None
        return Outcome(output={"path": request.path, **(usage or {})}, keep_stdout=usage is None)


class Gpu(CommandType[GpuRequest]):
    name = "gpu"

    def plan(self, request: GpuRequest, target: Target) -> Invocation:
        return Invocation(("sh", "-c", GPU_SCRIPT, "podq-gpu"), request.effective_timeout_s)

    def interpret(self, request: GpuRequest, completed: Completed) -> Outcome:
        if completed.exit_code != 0:
            return nonzero(completed)
        out = text(completed.stdout)
        if out.startswith(f"{SECTION}no-nvidia-smi"):
            return Outcome(
                output={"available": False, "gpus": [],
                        "reason": "no NVIDIA GPU: nvidia-smi is not installed on this host"},
                keep_stdout=False,
            )
        if out.startswith(f"{SECTION}nvidia-smi-failed"):
            detail = out.split("\n", 1)[1].strip() if "\n" in out else ""
            return Outcome(
                output={"available": False, "gpus": [],
                        "reason": f"no usable NVIDIA GPU: nvidia-smi failed: {detail}"},
                keep_stdout=False,
            )
        gpus = parse_gpus(out.splitlines())
        return Outcome(
            output={"available": bool(gpus), "gpus": gpus,
                    **({} if gpus else {"reason": "nvidia-smi listed no GPUs"})},
            keep_stdout=False,
        )


class TailLog(CommandType[TailLogRequest]):
    name = "tail_log"

    def plan(self, request: TailLogRequest, target: Target) -> Invocation:
        argv = guarded(target.workspace, request.path, "tail", "-n", str(request.lines), "--", PATH_PLACEHOLDER)
        return Invocation(argv, request.effective_timeout_s)

    def interpret(self, request: TailLogRequest, completed: Completed) -> Outcome:
        if completed.exit_code != 0:
            return nonzero(completed)
        lines = text(completed.stdout).splitlines()
        return Outcome(output={"path": request.path, "lines": lines}, keep_stdout=False)
