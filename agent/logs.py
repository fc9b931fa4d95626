"""Logging: structlog events (dotted names, key/value fields) as JSON lines to a file, readable on the console.

Secrets never reach either: values under secret-looking keys are replaced before rendering.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

from agent import secrets

_SECRET_KEY = re.compile(r"(pass(word|phrase)?|secret|token|api[_-]?key|authorization|private[_-]?key)", re.I)
REDACTED = "[redacted]"


def redact(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for key, value in list(event_dict.items()):
        if _SECRET_KEY.search(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = secrets.scrub(value)  # a registered secret inside any message
    return event_dict


class _ScrubbingFormatter(structlog.stdlib.ProcessorFormatter):
    """The last word on every log line, tracebacks included: no registered secret gets through."""

    def format(self, record: logging.LogRecord) -> str:
        return secrets.scrub(super().format(record))


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record is emitted (test runners and daemons swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def configure(log_file: Path | None, *, console_level: int = logging.INFO, json_console: bool = False) -> None:
    """Route structlog through stdlib logging to the console (human) and `log_file` (JSON lines)."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)

    console = _CurrentStderr()
    console.setLevel(console_level)
    console_renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json_console
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    console.setFormatter(
        _ScrubbingFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, console_renderer],
        )
    )
    root.addHandler(console)

    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(
            _ScrubbingFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
        root.addHandler(file_handler)
    # asyncssh logs every channel at INFO; its connection-level news is ours to report. watchdog's debug
    # lines about the log file changing would, written to that same watched folder, feed themselves.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
