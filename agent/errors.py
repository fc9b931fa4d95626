"""podq's error codes and exception tree.

Every failure a result line reports carries one of the stable `ErrorCode` values below; AI assistants and
scripts branch on them, so a code once published is never renamed.

    PodqError
    ├── RequestError            a request cannot be accepted (terminal event `rejected`)
    │   └── NotAllowed          a path or value outside what podq permits
    ├── ConfigError             podq.toml is missing, unreadable or invalid
    ├── QueueBusy               another daemon already serves this queue folder
    └── HostError               the host could not run the command (terminal event `failed`)
        ├── HostUnreachable     connection-level: retried with back-off, then reported
        ├── AuthFailed          the server refused our key: never retried
        ├── HostKeyUnknown      no known_hosts entry for the host: run `podq trust HOST`
        ├── HostKeyMismatch     the server's key differs from known_hosts: never retried
        ├── ConnectionLost      the link dropped while a command ran: not retried (it may have run)
        └── TransferFailed      an SFTP upload or download failed (e.g. no such file, disk full)
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_TYPE = "unknown_type"
    NOT_ALLOWED = "not_allowed"
    DUPLICATE_ID = "duplicate_id"
    LINE_TOO_LONG = "line_too_long"
    HOST_UNKNOWN = "host_unknown"
    HOST_UNREACHABLE = "host_unreachable"
    AUTH_FAILED = "auth_failed"
    HOST_KEY_UNKNOWN = "host_key_unknown"
    HOST_KEY_MISMATCH = "host_key_mismatch"
    CONNECTION_LOST = "connection_lost"
    WORKSPACE_MISSING = "workspace_missing"
    TRANSFER_FAILED = "transfer_failed"
    NOT_FOUND = "not_found"
    NO_GPU = "no_gpu"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    # Stability AI, as podq's client reports them
    AUTH = "auth"
    CREDITS = "credits"
    MODERATION = "moderation"
    CONTENT_FILTERED = "content_filtered"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    SERVER_ERROR = "server_error"
    NETWORK = "network"
    TIMEOUT = "timeout"
    NONZERO_EXIT = "nonzero_exit"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class PodqError(Exception):
    """Base of every error podq raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RequestError(PodqError):
    code = ErrorCode.INVALID_REQUEST


class NotAllowed(RequestError):
    code = ErrorCode.NOT_ALLOWED


class ConfigError(PodqError):
    pass


class QueueBusy(PodqError):
    """Another daemon already serves this queue folder."""


class HostError(PodqError):
    attempts: int = 1  # connection attempts made before giving up


class HostUnreachable(HostError):
    code = ErrorCode.HOST_UNREACHABLE


class AuthFailed(HostError):
    code = ErrorCode.AUTH_FAILED


class HostKeyUnknown(HostError):
    code = ErrorCode.HOST_KEY_UNKNOWN


class HostKeyMismatch(HostError):
    code = ErrorCode.HOST_KEY_MISMATCH


class ConnectionLost(HostError):
    code = ErrorCode.CONNECTION_LOST


class TransferFailed(HostError):
    code = ErrorCode.TRANSFER_FAILED
