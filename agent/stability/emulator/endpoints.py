"""The endpoints: v1 and v2beta handlers, routing a request to one after the common checks, and the
`/_emulator/...` control endpoints."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Final

from PIL import Image

from agent.stability.emulator.backend import Backend
from agent.stability.emulator.contract import (
    ASPECT_RATIOS,
    CLIENT_HEADER_MAX,
    CLIP_GUIDANCE_PRESETS,
    INIT_IMAGE_MODES,
    OUTPUT_FORMATS,
    SAMPLERS,
    SD3_MODELS,
    SD3_MODES,
    SDXL_ENGINE,
    SDXL_SIZES,
    STYLE_PRESETS,
    V1_COST_STEPS,
    V1_CREDITS_PER_IMAGE,
    V1_PROMPT_MAX,
    V1_SEED_MAX,
    V2_MAX_ASPECT,
    V2_MAX_PIXELS,
    V2_MIN_PIXELS,
    V2_MIN_SIDE,
    V2_SEED_MAX,
    Generation,
    Params,
    Rejected,
    generation_of,
)
from agent.stability.emulator.images import Artifact
from agent.stability.emulator.incoming import Incoming, open_image, preferred
from agent.stability.emulator.replies import Reply, error_reply, failure, json_reply, unauthorized

# --- v1 endpoints ----------------------------------------------------------------------------------------------

_PROMPT_FIELD: Final = re.compile(r"text_prompts\[(\d+)\]\[(text|weight)\]")


def _v1_balance(backend: Backend, request: Incoming) -> Reply:
    return json_reply({"credits": backend.credits()})


def _v1_account(backend: Backend, request: Incoming) -> Reply:
    return json_reply(
        {
            "id": "user-podq-emulator",
            "email": "emulator@podq.invalid",
            "profile_picture": "",
            "organizations": [
                {"id": "org-podq-emulator", "name": "podq emulator", "role": "MEMBER", "is_default": True}
            ],
        }
    )


def _v1_engines(backend: Backend, request: Incoming) -> Reply:
    return json_reply(
        [
            {
                "id": SDXL_ENGINE,
                "name": "Stable Diffusion XL v1.0",
                "description": "Stability-AI Stable Diffusion XL v1.0 (emulated by podq)",
                "type": "PICTURE",
            }
        ]
    )


def _v1_values(request: Incoming, operation: str) -> tuple[dict[str, object], bool]:
    """The generation's parameters as one flat mapping (prompts as `text_prompts[i][text|weight]` in both
    encodings), and whether they came typed from JSON."""
    if operation == "text-to-image":
        if request.media_type != "application/json":
            raise Rejected(400, "bad_request", ("content-type", "must be application/json"))
        if request.body_error or not isinstance(request.json_body, dict):
            raise Rejected(400, "bad_request", ("body", request.body_error or "must be a JSON object"))
        values: dict[str, object] = {key: value for key, value in request.json_body.items() if key != "text_prompts"}
        prompts = request.json_body.get("text_prompts")
        if prompts is not None and not isinstance(prompts, list):
            raise Rejected(400, "bad_request", ("text_prompts", "must be a list of {text, weight}"))
        for index, prompt in enumerate(prompts or []):
            if not isinstance(prompt, dict):
                raise Rejected(400, "bad_request", (f"text_prompts[{index}]", "must be an object {text, weight}"))
            values[f"text_prompts[{index}][text]"] = prompt.get("text")
            values[f"text_prompts[{index}][weight]"] = prompt.get("weight")
        return values, True
    if request.media_type != "multipart/form-data":
        raise Rejected(400, "bad_request", ("content-type", "must be multipart/form-data"))
    if request.body_error:
        raise Rejected(400, "bad_request", ("body", request.body_error))
    return dict(request.fields), False


def _v1_prompts(params: Params, values: Mapping[str, object]) -> str:
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
        raise Rejected(
            400,
            "invalid_sdxl_v1_dimensions",
            (None, f"for SDXL v1.0 engines the dimensions must be one of {allowed}; received {size[0]}x{size[1]}"),
        )


def _v1_generation(backend: Backend, request: Incoming, engine: str, operation: str) -> Reply:
    if engine != SDXL_ENGINE:
        raise Rejected(404, "not_found", (None, f"engine {engine!r} not found (the emulator has only {SDXL_ENGINE})"))
    if operation not in ("text-to-image", "image-to-image"):
        raise Rejected(404, "not_found", (None, f"operation {operation!r} is not emulated"))
    wants_png = preferred(request.headers.get("accept", ""), "application/json", "image/png") == "image/png"
    values, typed = _v1_values(request, operation)
    params = Params(values, typed=typed)
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
            raise Rejected(
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
        source = open_image(init.data)
        if source is None or source.format not in ("PNG", "JPEG"):
            raise Rejected(400, "invalid_mime_type", ("init_image", "must be a PNG or JPEG image"))
        size = source.size
    _sdxl_size(size)
    if samples > 1 and wants_png:
        raise Rejected(400, "invalid_samples", (None, "samples > 1 requires the Accept header application/json"))

    artifacts = [
        backend.generate(source, size, (seed + index) % (V1_SEED_MAX + 1) if seed else 0, prompt, change, "png")
        for index in range(samples)
    ]
    backend.charge(V1_CREDITS_PER_IMAGE * samples * max(1.0, steps / V1_COST_STEPS))
    if wants_png:
        only = artifacts[0]
        return Reply(200, only.data, only.mime, {"Finish-Reason": only.finish_reason, "Seed": str(only.seed)})
    return json_reply(
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


# The v2beta OpenAPI documents' maxLength for prompt and negative_prompt.
V2_PROMPT_MAX = 10_000


def _v2_params(request: Incoming) -> tuple[Params, _Common]:
    if request.media_type != "multipart/form-data":
        raise Rejected(400, "bad_request", ("content-type", "must be multipart/form-data"))
    if request.body_error:
        raise Rejected(400, "bad_request", ("body", request.body_error))
    params = Params(request.fields, typed=False)
    common = _Common(
        prompt=params.text("prompt", required=True, max_len=V2_PROMPT_MAX),
        seed=params.integer("seed", 0, V2_SEED_MAX, 0),
        output_format=params.choice("output_format", OUTPUT_FORMATS) or "png",
    )
    params.text("negative_prompt", max_len=V2_PROMPT_MAX)
    params.choice("style_preset", STYLE_PRESETS)
    return params, common


def _v2_image(params: Params, request: Incoming, *, required: bool) -> Image.Image | None:
    """The `image` file, decoded and within the contract's bounds; problems are added to `params`."""
    part = request.files.get("image")
    if part is None:
        if required:
            params.problem("image", "is required")
        return None
    image = open_image(part.data)
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


def _v2_reply(request: Incoming, artifact: Artifact) -> Reply:
    if preferred(request.headers.get("accept", ""), artifact.mime, "application/json") == "application/json":
        body = {
            "image": base64.b64encode(artifact.data).decode(),
            "finish_reason": artifact.finish_reason,
            "seed": artifact.seed,
        }
        return json_reply(body, content_type=f"application/json; type={artifact.mime}")
    return Reply(
        200, artifact.data, artifact.mime, {"finish-reason": artifact.finish_reason, "seed": str(artifact.seed)}
    )


def _v2_control(backend: Backend, request: Incoming, kind: str) -> Reply:
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


def _v2_generate(backend: Backend, request: Incoming, model: str) -> Reply:
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

_Endpoint = Callable[[Backend, Incoming], Reply]

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


def _dispatch(backend: Backend, request: Incoming, generation: Generation) -> Reply:
    """A queued failure first, then the checks: body size, key, client headers, path, then the endpoint's own."""
    queued = backend.take_failure(request.path)
    if queued is not None:
        raise failure(queued, generation)
    if request.too_large:
        raise failure(413, generation)
    authorization = request.headers.get("authorization")
    if not backend.auth_ok(authorization):
        raise unauthorized(generation, authorization)
    for name in ("stability-client-id", "stability-client-user-id", "stability-client-version"):
        if len(request.headers.get(name, "")) > CLIENT_HEADER_MAX:
            raise Rejected(400, "bad_request", (name, f"must be at most {CLIENT_HEADER_MAX} characters"))

    if match := _V1_GENERATION.fullmatch(request.path):
        if request.method != "POST":
            raise Rejected(405, "method_not_allowed", (None, f"{request.method} is not allowed here; use POST"))
        return _v1_generation(backend, request, match[1], match[2])
    route = _ROUTES.get(request.path)
    if route is None:
        raise Rejected(404, "not_found", ("path", f"{request.path} is not an endpoint of the API (or not emulated)"))
    method, endpoint = route
    if request.method != method:
        raise Rejected(405, "method_not_allowed", (None, f"{request.method} is not allowed here; use {method}"))
    return endpoint(backend, request)


def answer(backend: Backend, request: Incoming) -> Reply:
    generation = generation_of(request.path)
    request_id = uuid.uuid4()
    try:
        reply = _dispatch(backend, request, generation)
    except Rejected as rejected:
        reply = error_reply(generation, rejected, request_id.hex)
    if generation is Generation.V2:
        reply.headers["x-request-id"] = str(request_id)
    return reply


# --- control over HTTP -------------------------------------------------------------------------------------------


def control(backend: Backend, method: str, path: str, body: bytes) -> Reply:
    """`/_emulator/...`: the Python API for a separate process (no auth, never recorded)."""
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError:
        return json_reply({"error": "body must be JSON"}, 400)
    if not isinstance(data, dict):
        return json_reply({"error": "body must be a JSON object"}, 400)
    try:
        if (method, path) == ("GET", "/_emulator/requests"):
            return json_reply([dataclasses.asdict(record) for record in backend.records()])
        if (method, path) == ("POST", "/_emulator/fail"):
            status, times, only = data.get("status"), data.get("times", 1), data.get("path")
            if not isinstance(status, int) or not isinstance(times, int) or not isinstance(only, str | None):
                return json_reply({"error": "expected {status: int, times: int, path: str | null}"}, 400)
            backend.queue_failure(status, times, only)
        elif (method, path) == ("POST", "/_emulator/filter"):
            times = data.get("times", 1)
            if not isinstance(times, int):
                return json_reply({"error": "expected {times: int}"}, 400)
            backend.queue_filters(times)
        elif (method, path) == ("POST", "/_emulator/reset"):
            backend.reset()
        else:
            return json_reply({"error": f"no control endpoint {method} {path}"}, 404)
    except ValueError as exc:
        return json_reply({"error": str(exc)}, 400)
    return json_reply({"ok": True})
