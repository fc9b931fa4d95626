"""The request contract: each kind of bad input maps to its stable error code, with a message that helps."""

from __future__ import annotations

import orjson
import pytest

from agent.errors import ErrorCode, RequestError
from agent.requests import parse_line, request_schema


def code_of(line: bytes) -> ErrorCode:
    with pytest.raises(RequestError) as info:
        parse_line(line)
    return info.value.code


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", ErrorCode.INVALID_JSON),
        (b'{"type": "ping"', ErrorCode.INVALID_JSON),
        (b'\xff\xfe{"type": "ping"}', ErrorCode.INVALID_JSON),
        (b"[1, 2]", ErrorCode.INVALID_REQUEST),
        (b'"ping"', ErrorCode.INVALID_REQUEST),
        (b"42", ErrorCode.INVALID_REQUEST),
        (b"null", ErrorCode.INVALID_REQUEST),
        (b"{}", ErrorCode.INVALID_REQUEST),
        (b'{"type": "rm"}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type": 7}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type": "ping", "cmd": "rm -rf /"}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "tail_log"}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "tail_log", "path": "a.log", "lines": "50"}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "tail_log", "path": "a.log", "lines": 0}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "tail_log", "path": "a.log", "lines": 1001}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "ls", "path": 5}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "ping", "timeout_s": "10"}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "ping", "timeout_s": -1}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "ping", "meta": [1]}', ErrorCode.INVALID_REQUEST),
        (b'{"type": "ls", "path": "../etc"}', ErrorCode.NOT_ALLOWED),
        (b'{"type": "ls", "path": "renders/../../etc"}', ErrorCode.NOT_ALLOWED),
        (b'{"type": "tail_log", "path": ".."}', ErrorCode.NOT_ALLOWED),
        (b'{"type": "ls", "path": ""}', ErrorCode.NOT_ALLOWED),
    ],
)
def test_bad_requests_have_stable_codes(line: bytes, code: ErrorCode) -> None:
    assert code_of(line) == code


SHELL_METACHARACTERS = ["; touch pwned", "$(touch pwned)", "`touch pwned`", "a|b", "a&b", "a>b", "a<b",
                        "a\nb", "a'b", 'a"b', "a\\b", "*", "~root", "a\x00b", "$HOME"]


@pytest.mark.parametrize("evil", SHELL_METACHARACTERS)
@pytest.mark.parametrize(
    ("template", "code"),
    [
        ({"type": "ls", "path": "{}"}, ErrorCode.NOT_ALLOWED),
        ({"type": "df", "path": "{}"}, ErrorCode.NOT_ALLOWED),
        ({"type": "tail_log", "path": "logs/{}"}, ErrorCode.NOT_ALLOWED),
        ({"type": "ping", "id": "r{}"}, ErrorCode.INVALID_REQUEST),
        ({"type": "ping", "host": "pod{}"}, ErrorCode.INVALID_REQUEST),
        ({"type": "ping{}"}, ErrorCode.UNKNOWN_TYPE),
    ],
)
def test_shell_metacharacters_are_refused_in_every_string_field(
    evil: str, template: dict[str, str], code: ErrorCode
) -> None:
    request = {k: v.replace("{}", evil) for k, v in template.items()}
    assert code_of(orjson.dumps(request)) == code


def test_messages_name_the_field_and_the_fix() -> None:
    with pytest.raises(RequestError) as info:
        parse_line(b'{"type": "ping", "colour": "red"}')
    assert "`colour` is not a field of `ping`" in info.value.message
    with pytest.raises(RequestError) as info:
        parse_line(b'{"type": "teleport"}')
    assert "ping, ls, df, gpu, tail_log, blender_render, fetch, stability_generate" in info.value.message
    with pytest.raises(RequestError) as info:
        parse_line(b'{"type": "tail_log", "path": "x", "lines": 5000}')
    assert "`lines`" in info.value.message and "1000" in info.value.message


def test_valid_requests_parse_with_defaults() -> None:
    ls = parse_line(b'{"type": "ls"}')
    assert ls.type == "ls" and ls.path == "." and ls.effective_timeout_s == 30  # type: ignore[union-attr]
    tail = parse_line(b'{"id": "r-1", "type": "tail_log", "path": "/workspace/logs/a b.log", "meta": {"k": [1]}}')
    assert tail.lines == 50 and tail.meta == {"k": [1]} and tail.id == "r-1"  # type: ignore[union-attr]


def test_schema_is_a_discriminated_union_of_every_type() -> None:
    schema = request_schema()
    types = {d["properties"]["type"]["const"] for d in schema["$defs"].values()
             if "const" in d.get("properties", {}).get("type", {})}
    assert types == {"ping", "ls", "df", "gpu", "tail_log", "blender_render", "fetch", "stability_generate",
                     "character", "ai_render"}
    assert schema["discriminator"]["propertyName"] == "type"
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values() if "properties" in d)
