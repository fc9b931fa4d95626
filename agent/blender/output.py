"""Reading Blender's output as it streams: progress, the files it saved, and the markers podq's scripts print.

Blender's own lines (`Fra:1 … | Sample 16/32`, `Saved: '…'`) work for any script; podq's scripts add
`PODQ_STEP i/n label` (one per image of a multi-view run), `PODQ_OUTPUT <path>` (every file written),
`PODQ_DEVICE <json>` and `PODQ_ERROR <code>: <message>`; podq's Stability client (run directly, or from a
Blender script) adds `PODQ_VARIANT <json>` per image and `PODQ_ATTEMPTS n` (HTTP requests made).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

SAMPLE = re.compile(r"\bSample (\d+)/(\d+)")
TILES = re.compile(r"\bRendered (\d+)/(\d+) Tiles")
FRAME = re.compile(r"^Fra:(\d+)\b")
SAVED = re.compile(r"Saved: '(.+)'")
STEP = re.compile(r"^PODQ_STEP (\d+)/(\d+)\s*(.*)$")
OUTPUT = re.compile(r"^PODQ_OUTPUT (.+)$")
DEVICE = re.compile(r"^PODQ_DEVICE (\{.*\})\s*$")
ERROR = re.compile(r"PODQ_ERROR ([a-z_]+): (.*)$")
VARIANT = re.compile(r"^PODQ_VARIANT (\{.*\})\s*$")
ATTEMPTS = re.compile(r"^PODQ_ATTEMPTS (\d+)\s*$")
INFO = re.compile(r"^PODQ_INFO (\{.*\})\s*$")
TRACEBACK_LAST = re.compile(r"^(\w+(\.\w+)*(Error|Exception)\b.*)$")


@dataclass
class BlenderOutput:
    """State read from the lines so far. `feed` returns a progress update when a line moved it."""

    step: int = 1
    steps: int = 1
    label: str = ""
    fraction_in_step: float = 0.0
    frame: int | None = None
    outputs: list[str] = field(default_factory=list)
    device: dict[str, Any] | None = None
    error: tuple[str, str] | None = None
    last_exception: str | None = None
    variants: list[dict[str, Any]] = field(default_factory=list)
    api_attempts: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(1.0, ((self.step - 1) + self.fraction_in_step) / max(self.steps, 1))

    def feed(self, line: str) -> dict[str, Any] | None:
        if m := STEP.match(line):
            self.step, self.steps, self.label = int(m[1]), int(m[2]), m[3].strip()
            self.fraction_in_step = 0.0
            return self.snapshot()
        if m := OUTPUT.match(line):
            path = m[1].strip()
            if path not in self.outputs:
                self.outputs.append(path)
            return None
        if m := DEVICE.match(line):
            with contextlib.suppress(orjson.JSONDecodeError):
                self.device = orjson.loads(m[1])
            return None
        if m := ERROR.search(line):
            self.error = (m[1], m[2].strip())
            return None
        if m := VARIANT.match(line):
            with contextlib.suppress(orjson.JSONDecodeError):
                self.variants.append(orjson.loads(m[1]))
            return {**self.snapshot(), "variant": self.variants[-1]} if self.variants else None
        if m := INFO.match(line):
            with contextlib.suppress(orjson.JSONDecodeError):
                self.info.update(orjson.loads(m[1]))
            return None
        if m := ATTEMPTS.match(line):
            self.api_attempts += int(m[1])
            return None
        if m := TRACEBACK_LAST.match(line.strip()):
            self.last_exception = m[1]
        if m := SAVED.search(line):
            return {**self.snapshot(), "saved": m[1]}
        updated = False
        if m := FRAME.match(line):
            self.frame = int(m[1])
            updated = True
        if (m := SAMPLE.search(line)) or (m := TILES.search(line)):
            done, total = int(m[1]), int(m[2])
            self.fraction_in_step = done / total if total else 0.0
            updated = True
        return self.snapshot() if updated else None

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"fraction": round(self.fraction, 4), "step": self.step, "steps": self.steps}
        if self.label:
            snap["label"] = self.label
        if self.frame is not None:
            snap["frame"] = self.frame
        return snap
