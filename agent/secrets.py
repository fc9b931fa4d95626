"""Secrets podq holds (the Stability API key): registered once, scrubbed from every result line and log."""

from __future__ import annotations

import orjson

REDACTED = "[redacted]"
_secrets: set[str] = set()


def register(secret: str) -> None:
    if secret:
        _secrets.add(secret)


def scrub(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, REDACTED)
    return text


def scrub_bytes(data: bytes) -> bytes:
    for secret in _secrets:
        data = data.replace(secret.encode(), REDACTED.encode())
        escaped = orjson.dumps(secret)[1:-1]  # as it would appear inside a JSON string
        if escaped != secret.encode():
            data = data.replace(escaped, REDACTED.encode())
    return data
