"""Human views of results and state: one line per result event, a table of recent requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from agent.results import Event, ResultLine
from agent.state import Row

_SUMMARY_CHARS = 110


def event_line(line: ResultLine) -> str:
    """e.g. `00:41:02.123  r-0001  ping@local  succeeded  0.12s  blender 3.4.1, 0 GPUs`."""
    clock = line.ts[11:23] if len(line.ts) >= 23 else line.ts
    where = f"{line.type or '?'}@{line.host or '?'}"
    parts = [clock, line.id or "(no id)", where, line.event.value]
    if line.duration_s is not None:
        parts.append(f"{line.duration_s:.2f}s")
    detail = _detail(line)
    if detail:
        parts.append(detail)
    return "  ".join(parts)


def _detail(line: ResultLine) -> str:
    if line.error is not None:
        return _clip(f"{line.error.code.value}: {line.error.message}")
    if line.event == Event.PROGRESS and line.progress:
        p = line.progress
        text = f"{100 * float(p.get('fraction', 0)):.0f}%"
        if p.get("steps", 1) > 1:
            text += f" (image {p.get('step')}/{p.get('steps')})"
        if p.get("saved"):
            text += f" saved {p['saved']}"
        elif p.get("variant"):
            text += f" {p.get('stage', '')} {p['variant'].get('image')} ({p['variant'].get('finish_reason')})"
        elif p.get("stage"):
            text += f" {p['stage']}" + (f": {', '.join(p['uploaded'])}" if p.get("uploaded") else "")
        return _clip(text)
    if line.output is not None:
        return _clip(_summary(line.type, line.output))
    if line.event == Event.SUCCEEDED and line.stdout:
        return _clip(line.stdout.strip().replace("\n", " | "))
    return ""


def _summary(kind: str | None, output: dict[str, Any]) -> str:
    match kind:
        case "ping":
            uname = output.get("uname") or {}
            disk = output.get("disk") or {}
            free = disk.get("available_bytes")
            gpus = output.get("gpus") or []
            return (f"{uname.get('node', '?')} {uname.get('system', '')} {uname.get('release', '')}, "
                    f"blender {output.get('blender') or 'not found'}, {len(gpus)} GPU(s), "
                    f"{_size(free)} free")
        case "ls":
            entries = output.get("entries") or []
            if not entries:
                return "empty"
            names = ", ".join(e["name"] + ("/" if e.get("kind") == "dir" else "") for e in entries[:8])
            more = f" (+{len(entries) - 8})" if len(entries) > 8 else ""
            return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}: {names}{more}"
        case "df":
            return (f"{output.get('mount')}: {_size(output.get('available_bytes'))} free of "
                    f"{_size(output.get('total_bytes'))} ({output.get('used_percent')}% used)")
        case "gpu":
            if not output.get("available"):
                return str(output.get("reason", "no GPU"))
            return ", ".join(f"{g.get('name')} {g.get('memory_used_mib')}/{g.get('memory_total_mib')} MiB"
                             for g in output.get("gpus", []))
        case "tail_log":
            lines = output.get("lines") or []
            return " | ".join(lines[-3:])
        case "blender_render" | "fetch":
            made = output.get("artifacts") or []
            device = output.get("device") or {}
            on = f" on {device.get('type')}" if device.get("type") else ""
            return f"{len(made)} file(s){on}: " + ", ".join(a["path"] for a in made[:4])
        case "stability_generate" | "character" | "ai_render":
            variants = output.get("variants") or []
            emulated = " (emulated)" if output.get("emulated") else ""
            return f"{len(variants)} variant(s){emulated}: " + ", ".join(v.get("image", "?") for v in variants[:4])
    return _compact(output)


def _compact(data: object) -> str:
    return orjson.dumps(data).decode()


def _clip(text: str) -> str:
    return text if len(text) <= _SUMMARY_CHARS else text[: _SUMMARY_CHARS - 1] + "…"


def _size(n: object) -> str:
    if not isinstance(n, int | float):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def status_table(rows: list[Row], counts: dict[str, int], *, daemon_running: bool, queue_dir: Path) -> str:
    header = (f"queue {queue_dir}: daemon {'running' if daemon_running else 'NOT running'}; "
              + (", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no requests yet"))
    columns = ("ID", "TYPE", "HOST", "STATE", "RECEIVED", "DURATION", "ERROR")
    table = [columns]
    for r in rows:
        table.append((
            r.id or "(no id)", r.type or "?", r.host or "-", r.state, r.received_at[:19].replace("T", " "),
            f"{r.duration_s:.2f}s" if r.duration_s is not None else "-", r.error_code or "",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join([header, *lines])
