"""Replies: JSON bodies, and the error bodies of both API generations, including the real API's answer for
each status a queued failure can take."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

from agent.stability.emulator.contract import Generation, Rejected


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(value: object, status: int = 200, content_type: str = "application/json") -> Reply:
    return Reply(status, json.dumps(value).encode(), content_type)


def error_reply(generation: Generation, rejected: Rejected, request_id: str) -> Reply:
    body: dict[str, object] = {"id": request_id, "name": rejected.name}
    if generation is Generation.V1:
        body["message"] = rejected.v1_message()
    else:
        body["errors"] = rejected.v2_errors()
    return json_reply(body, rejected.status)


# What the real API answers for each status, per generation as (name, message), so a queued failure looks real.
_FAILURES: Final[dict[int, tuple[tuple[str, str], tuple[str, str]]]] = {
    400: (("bad_request", "bad request"), ("bad_request", "request: bad request")),
    401: (
        ("unauthorized", "Incorrect API key provided"),
        ("unauthorized", "authorization: invalid or missing header value"),
    ),
    402: (
        ("payment_required", "You do not have enough balance to make this request"),
        ("payment_required", "credits: you lack sufficient credits to make this request; buy more and try again"),
    ),
    403: (
        ("permission_denied", "You do not have permission to access this resource"),
        (
            "content_moderation",
            "Your request was flagged by our content moderation system, as a result your request was denied and "
            "you were not charged.",
        ),
    ),
    404: (("not_found", "not found"), ("not_found", "path: not found")),
    413: (
        ("payload_too_large", "payloads cannot be larger than 10MiB in size"),
        ("payload_too_large", "body: payloads cannot be larger than 10MiB in size"),
    ),
    422: (
        ("unprocessable_entity", "the request was well-formed but was rejected"),
        ("unprocessable_entity", "request: well-formed but rejected"),
    ),
    429: (
        (
            "rate_limit_exceeded",
            "You have exceeded the rate limit of 150 requests within a 10 second period, and have been timed out "
            "for 60 seconds.",
        ),
        (
            "rate_limit_exceeded",
            "rate_limit: more than 150 requests within a 10 second period; timed out for 60 seconds",
        ),
    ),
    500: (
        ("server_error", "An unexpected server error has occurred, please try again."),
        ("internal_error", "server: an unexpected error has occurred, please try again later"),
    ),
}


def failure(status: int, generation: Generation) -> Rejected:
    """The error a queued failure answers with: the contract's body for `status` in `generation`'s shape."""
    known = _FAILURES.get(status)
    if known is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = f"HTTP {status}"
        name = phrase.lower().replace(" ", "_").replace("-", "_")
        return Rejected(status, name, (None, f"{phrase} (emulated)"))
    name, text = known[0] if generation is Generation.V1 else known[1]
    return Rejected(status, name, (None, text))


def unauthorized(generation: Generation, header: str | None) -> Rejected:
    if generation is Generation.V2:
        return failure(401, generation)
    if not header:
        return Rejected(401, "unauthorized", (None, 'Request header "Authorization" is missing'))
    return Rejected(401, "unauthorized", (None, "Incorrect API key provided"))
