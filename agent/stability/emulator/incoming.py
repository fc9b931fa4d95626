"""Reading a request: multipart and JSON bodies, the `Accept` preference, uploaded files, and what the
emulator records of each request (including the /proc scan for a leaked key)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value
from pathlib import Path

from PIL import Image

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
class Incoming:
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


def incoming(method: str, path: str, headers: dict[str, str], body: bytes, size: int, too_large: bool) -> Incoming:
    content_type = headers.get("content-type", "")
    media_type = _header_params(content_type).get_content_type() if content_type else ""
    request = Incoming(method, path, headers, media_type, size, too_large)
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


def open_image(data: bytes) -> Image.Image | None:
    """The decoded image, or None when Pillow cannot read the bytes as one."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return image


def file_info(part: _Part) -> FileInfo:
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


def argv_containing(secret: str) -> list[str]:
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


def preferred(accept: str, default: str, other: str) -> str:
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
