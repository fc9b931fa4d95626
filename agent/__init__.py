"""podq: a safe, file-queue interface for driving a remote GPU box (over SSH, or this machine)."""

__version__ = "0.1.0"  # also in pyproject.toml

from agent.config import Config, load
from agent.daemon import BackgroundDaemon, Daemon
from agent.errors import ErrorCode, PodqError
from agent.results import Event, ResultLine
from agent.submit import follow, submit

__all__ = [
    "BackgroundDaemon",
    "Config",
    "Daemon",
    "ErrorCode",
    "Event",
    "PodqError",
    "ResultLine",
    "__version__",
    "follow",
    "load",
    "submit",
]
