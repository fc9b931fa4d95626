"""How podq reaches Stability AI: the base URL and key, or podq's offline emulator when no key is configured."""

from __future__ import annotations

import os
import secrets as token
import stat
from dataclasses import dataclass, field

import structlog

from agent import secrets
from agent.config import StabilitySettings
from agent.errors import ConfigError

log = structlog.get_logger("podq.stability")

KEY_ENV = "STABILITY_API_KEY"


@dataclass(frozen=True)
class StabilityAccess:
    base_url: str
    key: str = field(repr=False)
    emulated: bool = False
    # When emulated: the emulator's port on this machine (hosts reach it through `Host.reach_local_port`).
    local_port: int | None = None


def load_key(settings: StabilitySettings) -> str | None:
    """The API key from the daemon's environment, else from `api_key_file` (which must be mode 0600)."""
    key = os.environ.get(KEY_ENV, "").strip()
    if not key and settings.api_key_file is not None:
        path = settings.api_key_file
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ConfigError(f"[stability] api_key_file {path} does not exist") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"[stability] api_key_file {path} is readable by others (mode {stat.S_IMODE(mode):o}): "
                f"run `chmod 600 {path}`"
            )
        key = path.read_text(encoding="utf-8").strip()
    if key:
        secrets.register(key)
    return key or None


def emulator_key() -> str:
    """A throwaway key for podq's own emulator (registered like a real one, so tests of redaction hold)."""
    key = f"emulator-{token.token_hex(16)}"
    secrets.register(key)
    return key
