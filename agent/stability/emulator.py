"""An EMULATOR of Stability AI's REST API on loopback, for tests and offline dry runs: not the real API.

It follows podq's contract, shared/docs/stability-api.md (v1 SDXL 1.0 and v2beta Stable Image: paths, multipart
fields, validation, both `Accept` modes, headers, both generations of error bodies), answers with real images
derived from the input, records every request, and can be told to fail or content-filter the next ones.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import secrets
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value
from enum import Enum
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Final
from urllib.parse import urlsplit

from PIL import Image, ImageDraw, ImageFilter, ImageOps

# --- the contract's numbers and enums --------------------------------------------------------------------------

# A request body above this is answered 413 (the contract's limit for v2beta; applied to v1 too).
MAX_REQUEST_BYTES: Final = 10 * 1024 * 1024
# An oversize body is still read (and dropped) up to this much, so the client sees the 413 instead of a reset
# connection; anything larger gets the 413 and the connection is closed.
MAX_DRAIN_BYTES: Final = 256 * 1024 * 1024
# What `GET /v1/user/balance` starts at; v1 generations spend from it.
INITIAL_CREDITS: Final = 1000.0
# v1 cost: this many credits per image at up to V1_COST_STEPS steps, proportionally more above.
V1_CREDITS_PER_IMAGE: Final = 0.9
V1_COST_STEPS: Final = 30
# The `Stability-Client-*` headers are optional but limited to this length.
CLIENT_HEADER_MAX: Final = 256

SDXL_ENGINE: Final = "stable-diffusion-xl-1024-v1-0"
SDXL_SIZES: Final = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
    (1344, 768), (768, 1344), (1536, 640), (640, 1536),
)  # fmt: skip
V1_PROMPT_MAX: Final = 2000
V1_SEED_MAX: Final = 4_294_967_295
V2_SEED_MAX: Final = 4_294_967_294
SAMPLERS: Final = (
    "DDIM", "DDPM", "K_DPMPP_2M", "K_DPMPP_2S_ANCESTRAL", "K_DPM_2", "K_DPM_2_ANCESTRAL",
    "K_EULER", "K_EULER_ANCESTRAL", "K_HEUN", "K_LMS",
)  # fmt: skip
CLIP_GUIDANCE_PRESETS: Final = ("FAST_BLUE", "FAST_GREEN", "NONE", "SIMPLE", "SLOW", "SLOWER", "SLOWEST")
INIT_IMAGE_MODES: Final = ("IMAGE_STRENGTH", "STEP_SCHEDULE")
STYLE_PRESETS: Final = (
    "enhance", "anime", "photographic", "digital-art", "comic-book", "fantasy-art", "line-art", "analog-film",
    "neon-punk", "isometric", "low-poly", "origami", "modeling-compound", "cinematic", "3d-model", "pixel-art",
    "tile-texture",
)  # fmt: skip
OUTPUT_FORMATS: Final = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SD3_MODES: Final = ("text-to-image", "image-to-image")
SD3_MODELS: Final = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash")
# Output size per aspect ratio for v2beta text-to-image: about one megapixel, sides multiples of 64.
ASPECT_RATIOS: Final = {
    "1:1": (1024, 1024), "16:9": (1344, 768), "9:16": (768, 1344), "21:9": (1536, 640), "9:21": (640, 1536),
    "3:2": (1216, 832), "2:3": (832, 1216), "5:4": (1088, 896), "4:5": (896, 1088),
}  # fmt: skip
# v2beta input images: each side at least this, total pixels within these bounds, aspect within 1:2.5 to 2.5:1.
V2_MIN_SIDE: Final = 64
V2_MIN_PIXELS: Final = 4_096
V2_MAX_PIXELS: Final = 9_437_184
V2_MAX_ASPECT: Final = 2.5

SUCCESS: Final = "SUCCESS"
CONTENT_FILTERED: Final = "CONTENT_FILTERED"
CONTROL_PREFIX: Final = "/_emulator/"


class _Generation(Enum):
    """Which API generation a path belongs to: it decides the error body shape and the response headers."""

    V1 = "v1"
    V2 = "v2beta"


def _generation_of(path: str) -> _Generation:
    return _Generation.V1 if path.startswith("/v1/") else _Generation.V2


# --- what the emulator records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    filename: str
    content_type: str | None
    size: int
    sha256: str
    width: int | None = None  # width/height/image_format: set when Pillow can read the file as an image
    height: int | None = None
    image_format: str | None = None  # Pillow's name: "PNG", "JPEG", "WEBP" ...


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; Authorization shown as "Bearer [redacted]"
    auth_ok: bool
    content_type: str | None
    fields: dict[str, str]
    files: dict[str, FileInfo]
    json_body: object | None
    status: int
    argv_with_secret: list[str]
    ts: str  # RFC 3339 UTC with milliseconds
    body_size: int = 0


# --- parsing a request -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class _Incoming:
    """One API request as read off the socket, before any contract check."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names, unredacted: the endpoints read Authorization and Accept
    media_type: str  # the Content-Type without parameters, lower-case ("" when absent)
    body_size: int
    too_large: bool
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, _Part] = field(default_factory=dict)
    json_body: object | None = None
    body_error: str | None = None  # why a multipart or JSON body could not be parsed


def _header_params(value: str, header: str = "content-type") -> Message:
    """A Message holding one header, so its parameters parse with the stdlib's RFC 2045/2231 rules."""
    message = Message()
    message[header] = value
    return message


def _param(message: Message, name: str, header: str = "content-type") -> str | None:
    value = message.get_param(name, header=header)
    if value is None:
        return None
    text = collapse_rfc2231_value(value)
    # The header parser reads bytes as ASCII with surrogate escapes; clients send UTF-8 filenames raw.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, _Part]]:
    """The text fields and the files of a multipart/form-data body; ValueError when it is malformed."""
    boundary = _param(_header_params(content_type), "boundary")
    if not boundary:
        raise ValueError("multipart body without a boundary parameter")
    # Every delimiter is CRLF + "--" + boundary; the first one may start the body, hence the CRLF put in front.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise ValueError("multipart body without its closing boundary")
    fields: dict[str, str] = {}
    files: dict[str, _Part] = {}
    for chunk in chunks[1:-1]:
        head, separator, data = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("multipart part without a header block")
        headers = BytesHeaderParser().parsebytes(head.lstrip(b" \t").removeprefix(b"\r\n") + b"\r\n\r\n")
        disposition = _header_params(headers.get("content-disposition", ""), "content-disposition")
        name = _param(disposition, "name", "content-disposition")
        if not name:
            raise ValueError("multipart part without a Content-Disposition name")
        filename = _param(disposition, "filename", "content-disposition")
        if filename is not None:
            files[name] = _Part(filename, headers.get("content-type"), data)
        else:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"field {name!r} is not UTF-8 text") from exc
    return fields, files


def _incoming(method: str, path: str, headers: dict[str, str], body: bytes, size: int, too_large: bool) -> _Incoming:
    content_type = headers.get("content-type", "")
    media_type = _header_params(content_type).get_content_type() if content_type else ""
    request = _Incoming(method, path, headers, media_type, size, too_large)
    if too_large:
        return request
    if media_type == "multipart/form-data":
        try:
            request.fields, request.files = _parse_multipart(body, content_type)
        except ValueError as exc:
            request.body_error = str(exc)
    elif media_type == "application/json" and body:
        try:
            request.json_body = json.loads(body)
        except ValueError:
            request.body_error = "not valid JSON"
        if isinstance(request.json_body, dict):
            request.fields = {
                str(key): value if isinstance(value, str) else json.dumps(value)
                for key, value in request.json_body.items()
            }
    return request


def _open_image(data: bytes) -> Image.Image | None:
    """The decoded image, or None when Pillow cannot read the bytes as one."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return image


def _file_info(part: _Part) -> FileInfo:
    width = height = image_format = None
    try:
        with Image.open(io.BytesIO(part.data)) as image:  # reads the header only: cheap even for big files
            (width, height), image_format = image.size, image.format
    except (OSError, ValueError, Image.DecompressionBombError):
        pass
    return FileInfo(
        filename=part.filename or "",
        content_type=part.content_type,
        size=len(part.data),
        sha256=hashlib.sha256(part.data).hexdigest(),
        width=width,
        height=height,
        image_format=image_format,
    )


def _argv_containing(secret: str) -> list[str]:
    """Command lines of this machine's processes that contain `secret`, shown with it masked as "[secret]".

    Reads /proc/*/cmdline, which every local user can read: that is exactly why a key must never be in argv.
    """
    needle = secret.encode()
    found: list[str] = []
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:  # no procfs (not Linux): nothing can be watched
        return found
    for pid in pids:
        try:
            raw = Path("/proc", pid, "cmdline").read_bytes()
        except OSError:  # the process ended, or it is hidden from us
            continue
        if needle in raw:
            argv = raw.rstrip(b"\0").split(b"\0")
            line = " ".join(arg.decode("utf-8", "replace") for arg in argv)
            found.append(line.replace(secret, "[secret]"))
    return found


def _preferred(accept: str, default: str, other: str) -> str:
    """Which of two media types the Accept header prefers; wildcards match both and ties go to `default`."""

    def quality(media: str) -> float:
        best = 0.0
        kind = media.split("/")[0]
        for item in accept.split(","):
            entry, *params = (piece.strip() for piece in item.split(";"))
            if entry.lower() not in (media, f"{kind}/*", "*/*"):
                continue
            q = 1.0
            for param in params:
                key, _, value = param.partition("=")
                if key.strip().lower() == "q":
                    try:
                        q = float(value)
                    except ValueError:
                        q = 0.0
            best = max(best, q)
        return best

    if not accept.strip():
        return default
    return other if quality(other) > quality(default) else default


# --- contract checks -------------------------------------------------------------------------------------------

# Headers, not body fields: a v1 message names them as headers rather than `body.<field>`.
_HEADER_FIELDS: Final = frozenset(
    {"authorization", "content-type", "stability-client-id", "stability-client-user-id", "stability-client-version"}
)


class _Rejected(Exception):
    """A request the real API refuses: rendered as a v1 `{id,name,message}` or v2beta `{id,name,errors}` body."""

    def __init__(self, status: int, name: str, *problems: tuple[str | None, str]) -> None:
        super().__init__(f"{status} {name}: {problems}")
        self.status = status
        self.name = name
        self.problems = list(problems)  # (field or None, what is wrong with it)

    def v1_message(self) -> str:
        def one(field_name: str | None, text: str) -> str:
            if field_name is None:
                return text
            if field_name in _HEADER_FIELDS:
                return f"{field_name} header {text}"
            return f"body.{field_name} {text}"

        return "; ".join(one(*problem) for problem in self.problems)

    def v2_errors(self) -> list[str]:
        return [text if field_name is None else f"{field_name}: {text}" for field_name, text in self.problems]


class _Params:
    """Request parameters checked against the contract; problems are collected, as v2beta reports them all."""

    def __init__(self, values: Mapping[str, object], *, typed: bool) -> None:
        self._values = values
        # JSON bodies carry real numbers: a quoted number there is a client bug the real API rejects.
        self._typed = typed
        self.problems: list[tuple[str | None, str]] = []

    def has(self, name: str) -> bool:
        return self._values.get(name) not in (None, "")

    def problem(self, name: str | None, text: str) -> None:
        self.problems.append((name, text))

    def check(self) -> None:
        if self.problems:
            raise _Rejected(400, "bad_request", *self.problems)

    def text(self, name: str, *, required: bool = False, max_len: int | None = None) -> str:
        value = self._values.get(name)
        if value is None or value == "":
            if required:
                self.problem(name, "is required")
            return ""
        if not isinstance(value, str):
            self.problem(name, "must be a string")
            return ""
        if max_len is not None and len(value) > max_len:
            self.problem(name, f"must be at most {max_len} characters")
        return value

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        if not self.has(name):
            return default
        value = self._values[name]
        parsed: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            parsed = value
        elif isinstance(value, str) and not self._typed and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            parsed = int(value)
        if parsed is None:
            self.problem(name, "must be an integer")
            return default
        if not low <= parsed <= high:
            self.problem(name, f"must be between {low} and {high}")
        return parsed

    def number(self, name: str, low: float, high: float, default: float) -> float:
        if not self.has(name):
            return default
        value = self._values[name]
        parsed: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            parsed = float(value)
        elif isinstance(value, str) and not self._typed:
            try:
                parsed = float(value)
            except ValueError:
                parsed = None
        if parsed is None or not math.isfinite(parsed):
            self.problem(name, "must be a number")
            return default
        if not low <= parsed <= high:
            self.problem(name, f"must be between {low:g} and {high:g}")
        return parsed

    def choice(self, name: str, options: Collection[str]) -> str | None:
        if not self.has(name):
            return None
        value = self.text(name)
        if value not in options:
            self.problem(name, f"must be one of: {', '.join(options)}")
            return None
        return value


# --- images ----------------------------------------------------------------------------------------------------

Rgb = tuple[int, int, int]


@dataclass(frozen=True)
class _Artifact:
    data: bytes
    mime: str
    seed: int
    finish_reason: str


def _palette(seed: int, prompt: str) -> tuple[Rgb, Rgb]:
    """A dark and a light colour that stand for (seed, prompt): the same pair always gives the same image."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    dark = (digest[0] // 3, digest[1] // 3, digest[2] // 3)
    light = (128 + digest[3] // 2, 128 + digest[4] // 2, 128 + digest[5] // 2)
    return dark, light


def _render(source: Image.Image | None, size: tuple[int, int], seed: int, prompt: str, change: float) -> Image.Image:
    """A stand-in for a generated image: the input posterized, edge-enhanced and tinted (more so the larger
    `change` is, 0 to 1), or without an input a gradient with rings; both coloured by (seed, prompt)."""
    dark, light = _palette(seed, prompt)
    if source is None:
        gradient = Image.linear_gradient("L")
        if seed % 2:
            gradient = gradient.transpose(Image.Transpose.ROTATE_90)
        band = 8 + seed % 24
        rings = Image.radial_gradient("L").point([255 if (v // band) % 2 else 0 for v in range(256)])
        pattern = Image.blend(gradient, rings, 0.35).resize(size, Image.Resampling.BILINEAR)
        image = ImageOps.colorize(pattern, black=dark, white=light)
    else:
        work = ImageOps.fit(source.convert("RGB"), size)
        poster = ImageOps.posterize(work, 3).filter(ImageFilter.EDGE_ENHANCE_MORE)
        tinted = ImageOps.colorize(ImageOps.grayscale(work), black=dark, white=light)
        image = Image.blend(poster, tinted, 0.25 + 0.5 * max(0.0, min(1.0, change)))
    # A visible label, so nobody takes an emulator image for a real generation.
    draw = ImageDraw.Draw(image)
    label = f"podq emulator - seed {seed}"
    draw.text((9, 9), label, fill=(0, 0, 0))
    draw.text((8, 8), label, fill=(255, 255, 255))
    return image


def _blur(image: Image.Image) -> Image.Image:
    """What CONTENT_FILTERED returns: the image blurred beyond recognition (down-sampling makes it cheap)."""
    small = image.resize((max(1, image.width // 48), max(1, image.height // 48)), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4))


def _encode(image: Image.Image, output_format: str) -> bytes:
    out = io.BytesIO()
    if output_format == "png":
        image.save(out, format="PNG", compress_level=1)  # fast: tests make many of these
    elif output_format == "jpeg":
        image.convert("RGB").save(out, format="JPEG", quality=90)
    else:
        image.save(out, format="WEBP", quality=80, method=0)
    return out.getvalue()


# --- the emulator's state --------------------------------------------------------------------------------------


@dataclass
class _QueuedFailure:
    status: int
    remaining: int
    path: str | None


class _Backend:
    """Everything the endpoints share: accepted keys, credits, queued failures and filters, the recordings."""

    def __init__(self, api_keys: set[str] | None, watch_argv_for: str | None) -> None:
        self.api_keys = frozenset(api_keys) if api_keys is not None else None
        self.watch_argv_for = watch_argv_for or None  # an empty secret would match every command line
        self._lock = threading.Lock()
        self._records: list[RecordedRequest] = []
        self._failures: list[_QueuedFailure] = []
        self._filters = 0
        self._credits = INITIAL_CREDITS

    def auth_ok(self, header: str | None) -> bool:
        scheme, _, key = (header or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return False
        return self.api_keys is None or key in self.api_keys

    def record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    def queue_failure(self, status: int, times: int, path: str | None) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), not {status}")
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        with self._lock:
            self._failures.append(_QueuedFailure(status, times, path))

    def take_failure(self, path: str) -> int | None:
        """The status of the first queued failure that applies to `path`, used up by one; None when none does."""
        with self._lock:
            for queued in self._failures:
                if queued.path is None or queued.path == path:
                    queued.remaining -= 1
                    if queued.remaining == 0:
                        self._failures.remove(queued)
                    return queued.status
        return None

    def queue_filters(self, times: int) -> None:
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        with self._lock:
            self._filters += times

    def take_filter(self) -> bool:
        with self._lock:
            if self._filters == 0:
                return False
            self._filters -= 1
            return True

    def charge(self, credits: float) -> None:
        with self._lock:
            self._credits -= credits

    def credits(self) -> float:
        with self._lock:
            return self._credits

    def reset(self) -> None:
        with self._lock:
            self._records.clear()
            self._failures.clear()
            self._filters = 0
            self._credits = INITIAL_CREDITS

    def generate(
        self, source: Image.Image | None, size: tuple[int, int], seed: int, prompt: str, change: float, fmt: str
    ) -> _Artifact:
        """One image; seed 0 means random (as the API does), a queued filter makes it CONTENT_FILTERED."""
        seed = seed or secrets.randbelow(V2_SEED_MAX) + 1
        image = _render(source, size, seed, prompt, change)
        finish_reason = SUCCESS
        if self.take_filter():
            image, finish_reason = _blur(image), CONTENT_FILTERED
        return _Artifact(_encode(image, fmt), OUTPUT_FORMATS[fmt], seed, finish_reason)


# --- replies ---------------------------------------------------------------------------------------------------


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json_reply(value: object, status: int = 200, content_type: str = "application/json") -> _Reply:
    return _Reply(status, json.dumps(value).encode(), content_type)


def _error_reply(generation: _Generation, rejected: _Rejected, request_id: str) -> _Reply:
    body: dict[str, object] = {"id": request_id, "name": rejected.name}
    if generation is _Generation.V1:
        body["message"] = rejected.v1_message()
    else:
        body["errors"] = rejected.v2_errors()
    return _json_reply(body, rejected.status)


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


def _failure(status: int, generation: _Generation) -> _Rejected:
    """The error a queued failure answers with: the contract's body for `status` in `generation`'s shape."""
    known = _FAILURES.get(status)
    if known is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = f"HTTP {status}"
        name = phrase.lower().replace(" ", "_").replace("-", "_")
        return _Rejected(status, name, (None, f"{phrase} (emulated)"))
    name, text = known[0] if generation is _Generation.V1 else known[1]
    return _Rejected(status, name, (None, text))


def _unauthorized(generation: _Generation, header: str | None) -> _Rejected:
    if generation is _Generation.V2:
        return _failure(401, generation)
    if not header:
        return _Rejected(401, "unauthorized", (None, 'Request header "Authorization" is missing'))
    return _Rejected(401, "unauthorized", (None, "Incorrect API key provided"))


# --- v1 endpoints ----------------------------------------------------------------------------------------------

_PROMPT_FIELD: Final = re.compile(r"text_prompts\[(\d+)\]\[(text|weight)\]")


def _v1_balance(backend: _Backend, request: _Incoming) -> _Reply:
    return _json_reply({"credits": backend.credits()})


def _v1_account(backend: _Backend, request: _Incoming) -> _Reply:
    return _json_reply(
        {
            "id": "user-podq-emulator",
            "email": "emulator@podq.invalid",
            "profile_picture": "",
            "organizations": [
                {"id": "org-podq-emulator", "name": "podq emulator", "role": "MEMBER", "is_default": True}
            ],
        }
    )


def _v1_engines(backend: _Backend, request: _Incoming) -> _Reply:
    return _json_reply(
        [
            {
                "id": SDXL_ENGINE,
                "name": "Stable Diffusion XL v1.0",
                "description": "Stability-AI Stable Diffusion XL v1.0 (emulated by podq)",
                "type": "PICTURE",
            }
        ]
    )


def _v1_values(request: _Incoming, operation: str) -> tuple[dict[str, object], bool]:
    """The generation's parameters as one flat mapping (prompts as `text_prompts[i][text|weight]` in both
    encodings), and whether they came typed from JSON."""
    if operation == "text-to-image":
        if request.media_type != "application/json":
            raise _Rejected(400, "bad_request", ("content-type", "must be application/json"))
        if request.body_error or not isinstance(request.json_body, dict):
            raise _Rejected(400, "bad_request", ("body", request.body_error or "must be a JSON object"))
        values: dict[str, object] = {key: value for key, value in request.json_body.items() if key != "text_prompts"}
        prompts = request.json_body.get("text_prompts")
        if prompts is not None and not isinstance(prompts, list):
            raise _Rejected(400, "bad_request", ("text_prompts", "must be a list of {text, weight}"))
        for index, prompt in enumerate(prompts or []):
            if not isinstance(prompt, dict):
                raise _Rejected(400, "bad_request", (f"text_prompts[{index}]", "must be an object {text, weight}"))
            values[f"text_prompts[{index}][text]"] = prompt.get("text")
            values[f"text_prompts[{index}][weight]"] = prompt.get("weight")
        return values, True
    if request.media_type != "multipart/form-data":
        raise _Rejected(400, "bad_request", ("content-type", "must be multipart/form-data"))
    if request.body_error:
        raise _Rejected(400, "bad_request", ("body", request.body_error))
    return dict(request.fields), False


def _v1_prompts(params: _Params, values: Mapping[str, object]) -> str:
    indices = sorted({int(match[1]) for key in values if (match := _PROMPT_FIELD.fullmatch(key))})
    if not indices:
        params.problem("text_prompts", "must contain at least one prompt")
    texts = []
    for index in indices:
        texts.append(params.text(f"text_prompts[{index}][text]", required=True, max_len=V1_PROMPT_MAX))
        params.number(f"text_prompts[{index}][weight]", -math.inf, math.inf, 1.0)
    return " | ".join(texts)


def _sdxl_size(size: tuple[int, int]) -> None:
    if size not in SDXL_SIZES:
        allowed = ", ".join(f"{w}x{h}" for w, h in SDXL_SIZES)
        raise _Rejected(
            400,
            "invalid_sdxl_v1_dimensions",
            (None, f"for SDXL v1.0 engines the dimensions must be one of {allowed}; received {size[0]}x{size[1]}"),
        )


def _v1_generation(backend: _Backend, request: _Incoming, engine: str, operation: str) -> _Reply:
    if engine != SDXL_ENGINE:
        raise _Rejected(404, "not_found", (None, f"engine {engine!r} not found (the emulator has only {SDXL_ENGINE})"))
    if operation not in ("text-to-image", "image-to-image"):
        raise _Rejected(404, "not_found", (None, f"operation {operation!r} is not emulated"))
    wants_png = _preferred(request.headers.get("accept", ""), "application/json", "image/png") == "image/png"
    values, typed = _v1_values(request, operation)
    params = _Params(values, typed=typed)
    prompt = _v1_prompts(params, values)
    params.number("cfg_scale", 0, 35, 7.0)
    params.choice("clip_guidance_preset", CLIP_GUIDANCE_PRESETS)
    params.choice("sampler", SAMPLERS)
    params.choice("style_preset", STYLE_PRESETS)
    samples = params.integer("samples", 1, 10, 1)
    seed = params.integer("seed", 0, V1_SEED_MAX, 0)
    steps = params.integer("steps", 10, 50, 30)
    source: Image.Image | None = None
    if operation == "text-to-image":
        size = (params.integer("width", 1, 1 << 16, 1024), params.integer("height", 1, 1 << 16, 1024))
        change = 1.0
        params.check()
        if any(side < 128 or side % 64 for side in size):
            raise _Rejected(
                400, "invalid_height_or_width", (None, "height and width must be multiples of 64, at least 128")
            )
    else:
        mode = params.choice("init_image_mode", INIT_IMAGE_MODES) or "IMAGE_STRENGTH"
        strength = params.number("image_strength", 0, 1, 0.35)
        start = params.number("step_schedule_start", 0, 1, 0.65)
        params.number("step_schedule_end", 0, 1, 1.0)
        # image_strength is how much the init image is kept; a step schedule starting late keeps less of it.
        change = start if mode == "STEP_SCHEDULE" else 1 - strength
        init = request.files.get("init_image")
        if init is None:
            params.problem("init_image", "is required")
        params.check()
        assert init is not None  # check() raised otherwise
        source = _open_image(init.data)
        if source is None or source.format not in ("PNG", "JPEG"):
            raise _Rejected(400, "invalid_mime_type", ("init_image", "must be a PNG or JPEG image"))
        size = source.size
    _sdxl_size(size)
    if samples > 1 and wants_png:
        raise _Rejected(400, "invalid_samples", (None, "samples > 1 requires the Accept header application/json"))

    artifacts = [
        backend.generate(source, size, (seed + index) % (V1_SEED_MAX + 1) if seed else 0, prompt, change, "png")
        for index in range(samples)
    ]
    backend.charge(V1_CREDITS_PER_IMAGE * samples * max(1.0, steps / V1_COST_STEPS))
    if wants_png:
        only = artifacts[0]
        return _Reply(200, only.data, only.mime, {"Finish-Reason": only.finish_reason, "Seed": str(only.seed)})
    return _json_reply(
        {
            "artifacts": [
                {"base64": base64.b64encode(a.data).decode(), "finishReason": a.finish_reason, "seed": a.seed}
                for a in artifacts
            ]
        }
    )


# --- v2beta endpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Common:
    """The parameters every v2beta Stable Image endpoint takes."""

    prompt: str
    seed: int
    output_format: str


def _v2_params(request: _Incoming) -> tuple[_Params, _Common]:
    if request.media_type != "multipart/form-data":
        raise _Rejected(400, "bad_request", ("content-type", "must be multipart/form-data"))
    if request.body_error:
        raise _Rejected(400, "bad_request", ("body", request.body_error))
    params = _Params(request.fields, typed=False)
    common = _Common(
        prompt=params.text("prompt", required=True),
        seed=params.integer("seed", 0, V2_SEED_MAX, 0),
        output_format=params.choice("output_format", OUTPUT_FORMATS) or "png",
    )
    params.text("negative_prompt")
    params.choice("style_preset", STYLE_PRESETS)
    return params, common


def _v2_image(params: _Params, request: _Incoming, *, required: bool) -> Image.Image | None:
    """The `image` file, decoded and within the contract's bounds; problems are added to `params`."""
    part = request.files.get("image")
    if part is None:
        if required:
            params.problem("image", "is required")
        return None
    image = _open_image(part.data)
    if image is None or image.format not in ("PNG", "JPEG", "WEBP"):
        params.problem("image", "must be a png, jpeg or webp image")
        return None
    width, height = image.size
    if min(width, height) < V2_MIN_SIDE:
        params.problem("image", f"each side must be at least {V2_MIN_SIDE} pixels, got {width}x{height}")
    elif not V2_MIN_PIXELS <= width * height <= V2_MAX_PIXELS:
        params.problem("image", f"must have between {V2_MIN_PIXELS} and {V2_MAX_PIXELS} pixels, got {width * height}")
    elif max(width / height, height / width) > V2_MAX_ASPECT:
        params.problem("image", f"aspect ratio must be between 1:{V2_MAX_ASPECT} and {V2_MAX_ASPECT}:1")
    return image


def _v2_reply(request: _Incoming, artifact: _Artifact) -> _Reply:
    if _preferred(request.headers.get("accept", ""), artifact.mime, "application/json") == "application/json":
        body = {
            "image": base64.b64encode(artifact.data).decode(),
            "finish_reason": artifact.finish_reason,
            "seed": artifact.seed,
        }
        return _json_reply(body, content_type=f"application/json; type={artifact.mime}")
    return _Reply(
        200, artifact.data, artifact.mime, {"finish-reason": artifact.finish_reason, "seed": str(artifact.seed)}
    )


def _v2_control(backend: _Backend, request: _Incoming, kind: str) -> _Reply:
    """structure / sketch / style: the output keeps the input's size (style: unless aspect_ratio is given)."""
    params, common = _v2_params(request)
    source = _v2_image(params, request, required=True)
    ratio: str | None = None
    if kind == "style":
        change = 1 - params.number("fidelity", 0, 1, 0.5)
        ratio = params.choice("aspect_ratio", ASPECT_RATIOS)
    else:
        change = 1 - params.number("control_strength", 0, 1, 0.7)
    params.check()
    assert source is not None  # check() raised otherwise
    size = ASPECT_RATIOS[ratio] if ratio else source.size
    return _v2_reply(request, backend.generate(source, size, common.seed, common.prompt, change, common.output_format))


def _v2_generate(backend: _Backend, request: _Incoming, model: str) -> _Reply:
    """sd3 / core / ultra: text-to-image at an aspect ratio, or (sd3, ultra) image-to-image at the input's size."""
    params, common = _v2_params(request)
    source: Image.Image | None = None
    change = 1.0
    with_image = False
    if model == "sd3":
        mode = params.choice("mode", SD3_MODES) or "text-to-image"
        params.choice("model", SD3_MODELS)
        params.number("cfg_scale", 1, 10, 4.0)
        with_image = mode == "image-to-image"
        if with_image and params.has("aspect_ratio"):
            params.problem("aspect_ratio", "is only allowed in text-to-image mode")
        if not with_image:
            for name in ("image", "strength"):
                if params.has(name) or name in request.files:
                    params.problem(name, "is only allowed in image-to-image mode")
    elif model == "ultra":
        with_image = "image" in request.files or params.has("strength")
    if with_image:
        source = _v2_image(params, request, required=True)
        if not params.has("strength"):
            params.problem("strength", "is required with an image")
        change = params.number("strength", 0, 1, 1.0)
    ratio = params.choice("aspect_ratio", ASPECT_RATIOS) or "1:1"
    params.check()
    size = source.size if source is not None else ASPECT_RATIOS[ratio]
    return _v2_reply(request, backend.generate(source, size, common.seed, common.prompt, change, common.output_format))


# --- routing ---------------------------------------------------------------------------------------------------

_Endpoint = Callable[[_Backend, _Incoming], _Reply]

_ROUTES: Final[dict[str, tuple[str, _Endpoint]]] = {
    "/v1/user/balance": ("GET", _v1_balance),
    "/v1/user/account": ("GET", _v1_account),
    "/v1/engines/list": ("GET", _v1_engines),
    **{
        f"/v2beta/stable-image/control/{kind}": ("POST", partial(_v2_control, kind=kind))
        for kind in ("structure", "sketch", "style")
    },
    **{
        f"/v2beta/stable-image/generate/{model}": ("POST", partial(_v2_generate, model=model))
        for model in ("sd3", "core", "ultra")
    },
}
_V1_GENERATION: Final = re.compile(r"/v1/generation/([^/]+)/(.+)")


def _dispatch(backend: _Backend, request: _Incoming, generation: _Generation) -> _Reply:
    """A queued failure first, then the checks: body size, key, client headers, path, then the endpoint's own."""
    queued = backend.take_failure(request.path)
    if queued is not None:
        raise _failure(queued, generation)
    if request.too_large:
        raise _failure(413, generation)
    authorization = request.headers.get("authorization")
    if not backend.auth_ok(authorization):
        raise _unauthorized(generation, authorization)
    for name in ("stability-client-id", "stability-client-user-id", "stability-client-version"):
        if len(request.headers.get(name, "")) > CLIENT_HEADER_MAX:
            raise _Rejected(400, "bad_request", (name, f"must be at most {CLIENT_HEADER_MAX} characters"))

    if match := _V1_GENERATION.fullmatch(request.path):
        if request.method != "POST":
            raise _Rejected(405, "method_not_allowed", (None, f"{request.method} is not allowed here; use POST"))
        return _v1_generation(backend, request, match[1], match[2])
    route = _ROUTES.get(request.path)
    if route is None:
        raise _Rejected(404, "not_found", ("path", f"{request.path} is not an endpoint of the API (or not emulated)"))
    method, endpoint = route
    if request.method != method:
        raise _Rejected(405, "method_not_allowed", (None, f"{request.method} is not allowed here; use {method}"))
    return endpoint(backend, request)


def _answer(backend: _Backend, request: _Incoming) -> _Reply:
    generation = _generation_of(request.path)
    request_id = uuid.uuid4()
    try:
        reply = _dispatch(backend, request, generation)
    except _Rejected as rejected:
        reply = _error_reply(generation, rejected, request_id.hex)
    if generation is _Generation.V2:
        reply.headers["x-request-id"] = str(request_id)
    return reply


# --- control over HTTP -------------------------------------------------------------------------------------------


def _control(backend: _Backend, method: str, path: str, body: bytes) -> _Reply:
    """`/_emulator/...`: the Python API for a separate process (no auth, never recorded)."""
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError:
        return _json_reply({"error": "body must be JSON"}, 400)
    if not isinstance(data, dict):
        return _json_reply({"error": "body must be a JSON object"}, 400)
    try:
        if (method, path) == ("GET", "/_emulator/requests"):
            return _json_reply([dataclasses.asdict(record) for record in backend.records()])
        if (method, path) == ("POST", "/_emulator/fail"):
            status, times, only = data.get("status"), data.get("times", 1), data.get("path")
            if not isinstance(status, int) or not isinstance(times, int) or not isinstance(only, str | None):
                return _json_reply({"error": "expected {status: int, times: int, path: str | null}"}, 400)
            backend.queue_failure(status, times, only)
        elif (method, path) == ("POST", "/_emulator/filter"):
            times = data.get("times", 1)
            if not isinstance(times, int):
                return _json_reply({"error": "expected {times: int}"}, 400)
            backend.queue_filters(times)
        elif (method, path) == ("POST", "/_emulator/reset"):
            backend.reset()
        else:
            return _json_reply({"error": f"no control endpoint {method} {path}"}, 404)
    except ValueError as exc:
        return _json_reply({"error": str(exc)}, 400)
    return _json_reply({"ok": True})


# --- the HTTP server -------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a client that keeps a connection open must not block stop()

    def __init__(self, address: tuple[str, int], backend: _Backend) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.backend = backend
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API and httpx's pool expect
    server_version = "podq-stability-emulator"
    sys_version = ""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the recordings are the log, and tests read them."""

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        body, size, too_large = self._read_body()
        backend = self.server.backend
        if path.startswith(CONTROL_PREFIX):
            self._send(_control(backend, self.command, path, body))
            return
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        request = _incoming(self.command, path, headers, body, size, too_large)
        reply = _answer(backend, request)
        shown = {**headers, "authorization": "Bearer [redacted]"} if "authorization" in headers else dict(headers)
        backend.record(
            RecordedRequest(
                method=self.command,
                path=path,
                headers=shown,
                auth_ok=backend.auth_ok(headers.get("authorization")),
                content_type=headers.get("content-type"),
                fields=dict(request.fields),
                files={name: _file_info(part) for name, part in request.files.items()},
                json_body=request.json_body,
                status=reply.status,
                argv_with_secret=_argv_containing(backend.watch_argv_for) if backend.watch_argv_for else [],
                ts=_now(),
                body_size=size,
            )
        )
        self._send(reply)

    def _read_body(self) -> tuple[bytes, int, bool]:
        """(body, its size, whether it was over the limit); an oversize body is read and dropped, not kept."""
        chunks: list[bytes] = []
        size = 0

        def take(count: int) -> None:
            nonlocal size
            while count > 0:
                data = self.rfile.read(min(count, 1 << 20))
                if not data:
                    self.close_connection = True
                    return
                count -= len(data)
                size += len(data)
                if size <= MAX_REQUEST_BYTES:
                    chunks.append(data)

        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while size <= MAX_DRAIN_BYTES:
                line = self.rfile.readline(1024)
                try:
                    count = int(line.split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    self.close_connection = True
                    break
                if count == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    break
                take(count)
                self.rfile.readline(1024)  # the CRLF after each chunk
        else:
            try:
                length = int(self.headers.get("content-length") or 0)
            except ValueError:
                length, self.close_connection = 0, True
            if length > MAX_DRAIN_BYTES:
                self.close_connection = True
                return b"", length, True
            take(length)
        if size > MAX_DRAIN_BYTES:
            self.close_connection = True
        too_large = size > MAX_REQUEST_BYTES
        return (b"" if too_large else b"".join(chunks)), size, too_large

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)


# --- the public API --------------------------------------------------------------------------------------------


class StabilityEmulator:
    """Stability AI's REST API, emulated on a background thread: `with StabilityEmulator() as api: api.base_url`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_keys: set[str] | None = None,
        watch_argv_for: str | None = None,
    ) -> None:
        self._address = (host, port)
        self._backend = _Backend(api_keys, watch_argv_for)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StabilityEmulator:
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        self._server = _Server(self._address, self._backend)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="stability-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> StabilityEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "stopped"
        return f"<StabilityEmulator {where} requests={len(self.requests)} credits={self._backend.credits():g}>"

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running: call start() first")
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._backend.records()

    @property
    def credits(self) -> float:
        return self._backend.credits()

    def fail_next(self, status: int, *, times: int = 1, path: str | None = None) -> None:
        """The next `times` API requests (to `path` only, when given) answer `status` with the contract's body."""
        self._backend.queue_failure(status, times, path)

    def filter_next(self, *, times: int = 1) -> None:
        """The next `times` generated images come back blurred with finish reason CONTENT_FILTERED."""
        self._backend.queue_filters(times)

    def reset(self) -> None:
        """Forget recordings, queued failures and filters; credits back to the start."""
        self._backend.reset()


def main(argv: list[str] | None = None) -> int:
    """`podq stability-emulator`: serve the emulator in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="podq stability-emulator", description="Serve an emulator of Stability AI's REST API (not the real API)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free port)")
    args = parser.parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with StabilityEmulator(args.host, args.port) as emulator:
            print(f"podq Stability API emulator (not the real API) serving at {emulator.base_url}", flush=True)
            stopping.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
