"""The request contract: one JSON object per line of requests.jsonl, validated into typed requests.

The models here are public (`podq schema` prints them for AI assistants): fields are only ever added.
`parse_line` turns raw bytes into a request or a `RequestError` with the stable code a `rejected` line carries.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from agent import constants
from agent.config import HOST_NAME_PATTERN
from agent.errors import ErrorCode, NotAllowed, RequestError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# A script's file name in the scripts folder: no folders, so never a path out of it.
SCRIPT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.py$"

# Paths are quoted wherever they go, but a path is also a name a person reads and a shell may meet later:
# podq accepts the characters file names in a render pipeline use, and refuses the rest outright.
_PATH_CHARS = re.compile(r"^[A-Za-z0-9 ._,+=@/-]*$")


MAX_META_BYTES = 64 * 1024


def _check_meta(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        raise PydanticCustomError("meta_too_deep", "is nested too deeply: keep it a small, flat object") from None
    if size > MAX_META_BYTES:
        raise PydanticCustomError("meta_too_large", "is {size} bytes as JSON; at most {limit}",
                                  {"size": size, "limit": MAX_META_BYTES})
    return value


def check_workspace_path(value: str) -> str:
    """The lexical rules for a path under the workspace; raises a `not_allowed` validation error."""
    if len(value) > constants.MAX_PATH_LENGTH:
        raise PydanticCustomError("not_allowed", "is longer than {limit} characters",
                                  {"limit": constants.MAX_PATH_LENGTH})
    if not value:
        raise PydanticCustomError("not_allowed", "is empty: use '.' for the workspace itself")
    if not _PATH_CHARS.fullmatch(value):
        bad = "".join(sorted({c for c in value if not _PATH_CHARS.fullmatch(c)}))
        raise PydanticCustomError(
            "not_allowed",
            "contains characters podq does not allow ({bad}); allowed are letters, digits, "
            "space and . _ , + = @ / -",
            {"bad": repr(bad)},
        )
    if ".." in value.split("/"):
        raise PydanticCustomError(
            "not_allowed", "contains '..': paths must stay inside the host's workspace"
        )
    return value


WorkspacePath = Annotated[
    str,
    AfterValidator(check_workspace_path),
    Field(description="A path relative to the host's workspace (or absolute inside it); '..' is refused."),
]


class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Per-type default for `timeout_s`; every command is bounded.
    default_timeout_s: ClassVar[float] = 60.0

    id: str | None = Field(
        None,
        pattern=ID_PATTERN,
        description="Unique request id (letters, digits, . _ : -; at most 128). Assigned by podq when absent.",
    )
    host: str | None = Field(
        None, pattern=HOST_NAME_PATTERN, description="Host name from podq.toml; optional with one host."
    )
    timeout_s: float | None = Field(
        None, gt=0, le=24 * 3600, description="Seconds before the command is stopped (`timed_out`)."
    )
    meta: Annotated[dict[str, Any] | None, AfterValidator(_check_meta)] = Field(
        None, description="Any JSON object (at most 64 KiB); echoed back unchanged in every result line."
    )

    @property
    def effective_timeout_s(self) -> float:
        return self.timeout_s if self.timeout_s is not None else self.default_timeout_s


class PingRequest(_RequestBase):
    """Check the host: reports uname, free disk in the workspace, Blender's version and GPUs if any."""

    type: Literal["ping"]
    default_timeout_s: ClassVar[float] = 30.0


class LsRequest(_RequestBase):
    """List a folder (or describe one file) under the workspace."""

    type: Literal["ls"]
    path: WorkspacePath = "."
    default_timeout_s: ClassVar[float] = 30.0


class DfRequest(_RequestBase):
    """Disk usage of the filesystem holding `path` (default: the workspace)."""

    type: Literal["df"]
    path: WorkspacePath = "."
    default_timeout_s: ClassVar[float] = 30.0


class GpuRequest(_RequestBase):
    """GPUs on the host from nvidia-smi, as JSON; `available: false` where the host has none."""

    type: Literal["gpu"]
    default_timeout_s: ClassVar[float] = 30.0


class TailLogRequest(_RequestBase):
    """The last `lines` lines of a file under the workspace."""

    type: Literal["tail_log"]
    path: WorkspacePath
    lines: int = Field(50, ge=1, le=1000)
    default_timeout_s: ClassVar[float] = 30.0


class BlenderRenderRequest(_RequestBase):
    """Run a script from the scripts folder in headless Blender on the host; report the files it made.

    The scripts folder is synced to `<workspace>/blender_scripts/` first, so what runs is what the folder
    holds now. `args` are checked against the script's declared arguments before anything runs.
    """

    type: Literal["blender_render"]
    script: str = Field(pattern=SCRIPT_PATTERN,
                        description="A script file name from the scripts folder, e.g. make_base_scene.py")
    args: dict[str, Any] = Field(default_factory=dict, description="The script's arguments (see docs/blender.md)")
    download: bool = Field(False, description="Also download every output file to artifacts/<id>/")
    default_timeout_s: ClassVar[float] = 1800.0


class FetchRequest(_RequestBase):
    """Download files from the host's workspace: a previous job's artifacts, or the given paths."""

    type: Literal["fetch"]
    from_job: str | None = Field(None, pattern=ID_PATTERN, description="Id of a finished job whose artifacts to fetch")
    paths: list[WorkspacePath] | None = Field(None, min_length=1, max_length=100)
    default_timeout_s: ClassVar[float] = 600.0

    @model_validator(mode="after")
    def _one_source(self) -> FetchRequest:
        if (self.from_job is None) == (self.paths is None):
            raise ValueError("give exactly one of `from_job` (a job id) or `paths` (a list of workspace paths)")
        return self


Endpoint = Literal["control/structure", "control/sketch", "control/style", "generate/sd3", "generate/core",
                   "generate/ultra", "sdxl/image-to-image", "sdxl/text-to-image"]
StylePreset = Literal["enhance", "anime", "photographic", "digital-art", "comic-book", "fantasy-art", "line-art",
                      "analog-film", "neon-punk", "isometric", "low-poly", "origami", "modeling-compound",
                      "cinematic", "3d-model", "pixel-art", "tile-texture"]


class StylizeParams(BaseModel):
    """How to stylize: the Stability parameters shared by stability_generate, character and ai_render.
    Ranges are checked again by the client on the host (and by the API)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    endpoint: Endpoint = "control/structure"
    prompt: str = Field("", max_length=10000)
    negative_prompt: str | None = Field(None, max_length=10000)
    style_preset: StylePreset | None = None
    seed: int | None = Field(None, ge=0, le=4294967294, description="0 or absent: random (reported back)")
    variants: int = Field(1, ge=1, le=10, description="images per input")
    strength: float | None = Field(None, ge=0, le=1, description="image-to-image: how far from the input")
    control_strength: float | None = Field(None, ge=0, le=1, description="control/structure and control/sketch")
    fidelity: float | None = Field(None, ge=0, le=1, description="control/style")
    cfg_scale: float | None = Field(None, ge=0, le=35)
    steps: int | None = Field(None, ge=10, le=50, description="sdxl endpoints")
    sampler: str | None = Field(None, pattern=r"^[A-Z0-9_]{1,32}$", description="sdxl endpoints, e.g. K_EULER")
    aspect_ratio: str | None = Field(None, pattern=r"^\d{1,2}:\d{1,2}$")
    model: str | None = Field(None, pattern=r"^[a-z0-9.-]{1,32}$", description="generate/sd3, e.g. sd3.5-large")
    output_format: Literal["png", "jpeg", "webp"] = "png"


class StabilityGenerateRequest(_RequestBase):
    """Stylize images with Stability AI (through podq's client on the host): renders under the workspace
    (`inputs`), or a previous job's renders (`from_job`), or the prompt alone (text-to-image endpoints)."""

    type: Literal["stability_generate"]
    inputs: list[WorkspacePath] | None = Field(None, min_length=1, max_length=20)
    from_job: str | None = Field(None, pattern=ID_PATTERN, description="take a previous render job's images")
    stylize: StylizeParams
    download: bool = False
    default_timeout_s: ClassVar[float] = 900.0

    @model_validator(mode="after")
    def _one_source(self) -> StabilityGenerateRequest:
        if self.inputs is not None and self.from_job is not None:
            raise ValueError("give `inputs` or `from_job`, not both")
        return self


class RenderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    script: str = Field("make_base_scene.py", pattern=SCRIPT_PATTERN)
    args: dict[str, Any] = Field(default_factory=dict)


class CharacterRequest(_RequestBase):
    """The whole pipeline in one request: render base images with Blender, then stylize each, with one
    manifest linking scene arguments -> base render -> every variant."""

    type: Literal["character"]
    render: RenderSpec = RenderSpec()
    stylize: StylizeParams
    download: bool = False
    default_timeout_s: ClassVar[float] = 2400.0


class AiRenderStylize(StylizeParams):
    """As StylizeParams, but AI Render's endpoint (SDXL 1.0 image-to-image) by default."""

    endpoint: Endpoint = "sdxl/image-to-image"


class AiRenderRequest(_RequestBase):
    """The AI Render addon route, headless: a .blend (or the last render) through
    blender_scripts/generate_ai_characters.py, which reads the addon's scene settings when present and calls
    the same Stability client. `stylize` fields given here override the scene's settings."""

    type: Literal["ai_render"]
    blend: WorkspacePath | None = Field(None, description="a .blend under the workspace; absent: the last render")
    stylize: AiRenderStylize = Field(default_factory=AiRenderStylize)
    download: bool = False
    default_timeout_s: ClassVar[float] = 1800.0


Request = Annotated[
    PingRequest | LsRequest | DfRequest | GpuRequest | TailLogRequest | BlenderRenderRequest | FetchRequest
    | StabilityGenerateRequest | CharacterRequest | AiRenderRequest,
    Field(discriminator="type"),
]
REQUEST_ADAPTER: TypeAdapter[Request] = TypeAdapter(Request)
REQUEST_TYPES: tuple[str, ...] = (
    "ping", "ls", "df", "gpu", "tail_log", "blender_render", "fetch", "stability_generate", "character", "ai_render",
)


def request_schema() -> dict[str, Any]:
    schema = REQUEST_ADAPTER.json_schema()
    schema["title"] = "podq request"
    schema["description"] = (
        "One JSON object per line of queue/requests.jsonl. `type` selects the command; unknown fields are "
        "rejected. Results are appended to queue/results.jsonl."
    )
    return schema


def new_request_id() -> str:
    """A fresh id for `podq submit`: sortable by time, unique without coordination."""
    return f"r-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def auto_id(generation: int, line_offset: int) -> str:
    """The id podq gives a line without one: stable across restarts because the line's place is."""
    return f"auto-{generation}-{line_offset}"


def readable_id(data: object) -> str | None:
    """The line's id when it has a well-formed one, for the `rejected` line of a request that failed."""
    if isinstance(data, dict):
        value = data.get("id")
        if isinstance(value, str) and re.fullmatch(ID_PATTERN, value):
            return value
    return None


def decode_line(line: bytes) -> dict[str, Any]:
    """Bytes of one line to a JSON object, or RequestError (invalid_json / invalid_request)."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(
                "the line is not valid UTF-8: write requests as UTF-8 JSON", code=ErrorCode.INVALID_JSON
            ) from None
        raise RequestError(
            f"the line is not valid JSON ({exc.msg} at character {exc.pos}): write one JSON object per line",
            code=ErrorCode.INVALID_JSON,
        ) from None
    if not isinstance(data, dict):
        raise RequestError(
            f"a request must be a JSON object, not a JSON {_json_kind(data)}: e.g. "
            '{"type": "ping"}',
            code=ErrorCode.INVALID_REQUEST,
        )
    return data


def validate(data: dict[str, Any]) -> Request:
    """A decoded object to a typed request, or RequestError with the code and a how-to-fix message."""
    kind = data.get("type")
    if kind is None:
        raise RequestError(
            f"the request has no `type`: add one of {', '.join(REQUEST_TYPES)}", code=ErrorCode.INVALID_REQUEST
        )
    if not isinstance(kind, str) or kind not in REQUEST_TYPES:
        raise RequestError(
            f"unknown request type {kind!r}: use one of {', '.join(REQUEST_TYPES)} (`podq schema` lists "
            "their fields)",
            code=ErrorCode.UNKNOWN_TYPE,
        )
    try:
        return REQUEST_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise _from_validation_error(kind, exc) from None


def parse_line(line: bytes) -> Request:
    return validate(decode_line(line))


_PATTERN_HINTS = {
    "id": "use 1-128 letters, digits or . _ : - (starting with a letter or digit)",
    "host": "use a host name from podq.toml (letters, digits, . _ -)",
    "script": "use a file name from the scripts folder, e.g. make_base_scene.py (no folders, no `..`)",
    "render.script": "use a file name from the scripts folder, e.g. make_base_scene.py (no folders, no `..`)",
}


def validation_error(exc: ValidationError, *, prefix: str, what: str) -> RequestError:
    """A RequestError for a nested model (e.g. a script's `args`), fields named from `prefix`."""
    return _from_validation_error("", exc, prefix=prefix, what=what)


def _from_validation_error(kind: str, exc: ValidationError, *, prefix: str = "", what: str = "") -> RequestError:
    """One RequestError naming every bad field; `not_allowed` when any of them is a refused path."""
    what = what or f"`{kind}` requests"
    problems = []
    not_allowed = False
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] == kind:  # the discriminated union puts the tag first
            loc = loc[1:]
        field = prefix + ".".join(loc) if loc else (prefix.rstrip(".") or "(request)")
        if err["type"] == "not_allowed":
            not_allowed = True
        if err["type"] == "extra_forbidden":
            problems.append(f"`{field}` is not a field of {what}: remove it (`podq schema` lists fields)")
        elif err["type"] == "string_pattern_mismatch" and field in _PATTERN_HINTS:
            problems.append(f"`{field}`: {_PATTERN_HINTS[field]}")
        elif err["type"] == "missing":
            problems.append(f"`{field}` is required for {what}")
        else:
            problems.append(f"`{field}`: {err['msg']}")
    message = "; ".join(problems)
    if not_allowed:
        return NotAllowed(message)
    return RequestError(message, code=ErrorCode.INVALID_REQUEST)


def _json_kind(value: object) -> str:
    match value:
        case list():
            return "array"
        case str():
            return "string"
        case bool():
            return "boolean"
        case int() | float():
            return "number"
        case None:
            return "null"
    return type(value).__name__
