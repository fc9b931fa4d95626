"""Stability AI client for podq: turns base renders into stylized images, and records how.

Runs on the host (Python 3.9+, httpx and Pillow), is importable (`StabilityClient`, `generate_variants`) and is
a command line:

    python stability_client.py --params-json '{"endpoint": "control/structure", "prompt": "...", ...}' \\
        --input renders/base_0001.png --out-dir output --workspace /workspace [--base-url URL] [--api-key-stdin]

The API key comes from the first line of stdin (`--api-key-stdin`, how podq hands it over: never in argv) or
the STABILITY_API_KEY environment variable. It is sent only in the Authorization header and never printed.

Follows the contract in podq's docs (v1 SDXL 1.0 image-to-image/text-to-image and v2beta Stable Image):
parameters are checked before any credits are spent, an init image is resized/padded to an allowed size
(and the manifest says so), only what can succeed on retry is retried (429 after its wait, 5xx, connection
errors), and every failure maps to one stable code: auth, credits, moderation, invalid_request,
rate_limited, too_large, server_error, network.

Output: `<out-dir>/char_<base>_vNN.png` and a manifest `char_<base>_vNN.json` per variant. For podq, lines on
stdout: `PODQ_OUTPUT <path>` per file written and `PODQ_VARIANT <json>` per variant; failures print
`PODQ_ERROR <code>: <message>` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

CLIENT_ID = "podq"
CLIENT_VERSION = "0.1.0"
DEFAULT_BASE_URL = "https://api.stability.ai"
DEFAULT_ENDPOINT = "control/structure"

SDXL_SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640),
    (640, 1536),
)
STYLE_PRESETS = (
    "enhance", "anime", "photographic", "digital-art", "comic-book", "fantasy-art", "line-art", "analog-film",
    "neon-punk", "isometric", "low-poly", "origami", "modeling-compound", "cinematic", "3d-model", "pixel-art",
    "tile-texture",
)
SAMPLERS = ("DDIM", "DDPM", "K_DPMPP_2M", "K_DPMPP_2S_ANCESTRAL", "K_DPM_2", "K_DPM_2_ANCESTRAL", "K_EULER",
            "K_EULER_ANCESTRAL", "K_HEUN", "K_LMS")
ASPECT_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
SD3_MODELS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_V2_REQUEST_BYTES = 10 * 1024 * 1024
V1_PROMPT_CHARS = 2000
V2_PROMPT_CHARS = 10000  # the v2beta spec's maxLength for `prompt`
V2_MIN_PIXELS, V2_MAX_PIXELS = 4096, 9_437_184
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
ERROR_CODES = ("auth", "credits", "moderation", "invalid_request", "rate_limited", "too_large", "server_error",
               "network", "content_filtered")


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    generation: int  # 1: v1 SDXL, 2: v2beta Stable Image
    image: str  # "required", "optional" or "none"
    model: str
    json_body: bool = False
    # Parameters this endpoint takes besides those every endpoint takes (prompt, negative_prompt, style_preset,
    # seed, variants, accept): one it does not take is refused, never silently dropped.
    takes: tuple[str, ...] = ()


ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (
    Endpoint("sdxl/image-to-image", "/v1/generation/stable-diffusion-xl-1024-v1-0/image-to-image", 1, "required",
             "stable-diffusion-xl-1024-v1-0", takes=("strength", "cfg_scale", "steps", "sampler")),
    Endpoint("sdxl/text-to-image", "/v1/generation/stable-diffusion-xl-1024-v1-0/text-to-image", 1, "none",
             "stable-diffusion-xl-1024-v1-0", json_body=True,
             takes=("cfg_scale", "steps", "sampler", "width", "height")),
    Endpoint("control/structure", "/v2beta/stable-image/control/structure", 2, "required", "stable-image-control",
             takes=("control_strength", "output_format")),
    Endpoint("control/sketch", "/v2beta/stable-image/control/sketch", 2, "required", "stable-image-control",
             takes=("control_strength", "output_format")),
    Endpoint("control/style", "/v2beta/stable-image/control/style", 2, "required", "stable-image-control",
             takes=("fidelity", "aspect_ratio", "output_format")),
    Endpoint("generate/sd3", "/v2beta/stable-image/generate/sd3", 2, "optional", "sd3.5-large",
             takes=("strength", "model", "cfg_scale", "aspect_ratio", "output_format")),
    Endpoint("generate/core", "/v2beta/stable-image/generate/core", 2, "none", "stable-image-core",
             takes=("aspect_ratio", "output_format")),
    Endpoint("generate/ultra", "/v2beta/stable-image/generate/ultra", 2, "optional", "stable-image-ultra",
             takes=("strength", "aspect_ratio", "output_format")),
)}


class StabilityError(Exception):
    """A failure with one of the stable codes in ERROR_CODES."""

    def __init__(self, code: str, message: str, *, status: int | None = None, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id


@dataclass
class Params:
    """Everything a generation takes. Ranges are those of the contract; `check` enforces them."""

    endpoint: str = DEFAULT_ENDPOINT
    prompt: str = ""
    negative_prompt: str | None = None
    style_preset: str | None = None
    seed: int | None = None  # None or 0: random, reported back
    variants: int = 1
    strength: float | None = None  # image-to-image: how far from the input (v1 image_strength = 1 - this)
    control_strength: float | None = None  # control/structure, control/sketch
    fidelity: float | None = None  # control/style
    cfg_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None
    aspect_ratio: str | None = None
    model: str | None = None  # generate/sd3
    output_format: str = "png"
    accept: str = "image"  # response shape: "image" (bytes + headers) or "json" (base64); v1 with variants > 1: json
    width: int | None = None  # sdxl/text-to-image
    height: int | None = None
    emulated: bool = False  # recorded in manifests when podq points the client at its emulator

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Params:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StabilityError("invalid_request", f"unknown parameter(s): {', '.join(unknown)}")
        return cls(**data)

    @property
    def spec(self) -> Endpoint:
        return ENDPOINTS[self.endpoint]

    def check(self) -> None:
        """Reject, before any credits are spent, what the API would reject; messages name the parameter."""
        if self.endpoint not in ENDPOINTS:
            _bad(f"endpoint {self.endpoint!r} is not one of: {', '.join(ENDPOINTS)}")
        optional = ("strength", "control_strength", "fidelity", "cfg_scale", "steps", "sampler", "aspect_ratio",
                    "model", "width", "height")
        for name in optional:
            if getattr(self, name) is not None and name not in self.spec.takes:
                takes = ", ".join(self.spec.takes) or "none besides the common ones"
                _bad(f"{name} is not a parameter of {self.endpoint} (it takes: {takes}); remove it or pick "
                     "another endpoint")
        if self.output_format != "png" and "output_format" not in self.spec.takes:
            _bad(f"{self.endpoint} returns PNG only: remove output_format")
        v1 = self.spec.generation == 1
        if not self.prompt.strip():
            _bad("prompt is required")
        limit = V1_PROMPT_CHARS if v1 else V2_PROMPT_CHARS
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and len(value) > limit:
                _bad(f"{name} is {len(value)} characters; at most {limit}")
        if self.style_preset is not None and self.style_preset not in STYLE_PRESETS:
            _bad(f"style_preset {self.style_preset!r} is not one of: {', '.join(STYLE_PRESETS)}")
        _range("seed", self.seed, 0, 4294967295 if v1 else 4294967294)
        _range("variants", self.variants, 1, 10)
        _range("strength", self.strength, 0, 1)
        _range("control_strength", self.control_strength, 0, 1)
        _range("fidelity", self.fidelity, 0, 1)
        _range("cfg_scale", self.cfg_scale, 0 if v1 else 1, 35 if v1 else 10)
        _range("steps", self.steps, 10, 50)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            _bad(f"sampler {self.sampler!r} is not one of: {', '.join(SAMPLERS)}")
        if self.aspect_ratio is not None and self.aspect_ratio not in ASPECT_RATIOS:
            _bad(f"aspect_ratio {self.aspect_ratio!r} is not one of: {', '.join(ASPECT_RATIOS)}")
        if self.model is not None and self.model not in SD3_MODELS:
            _bad(f"model {self.model!r} is not one of: {', '.join(SD3_MODELS)}")
        if self.output_format not in OUTPUT_FORMATS:
            _bad(f"output_format {self.output_format!r} is not one of: {', '.join(OUTPUT_FORMATS)}")
        if self.accept not in ("image", "json"):
            _bad("accept must be 'image' or 'json'")
        if self.endpoint == "sdxl/text-to-image":
            size = (self.width or 1024, self.height or 1024)
            if size not in SDXL_SIZES:
                _bad(f"width x height {size[0]}x{size[1]} is not an SDXL size: use one of "
                     + ", ".join(f"{w}x{h}" for w, h in SDXL_SIZES))


def _bad(message: str) -> None:
    raise StabilityError("invalid_request", message)


def _range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not (low <= value <= high):
        _bad(f"{name} is {value}; it must be between {low} and {high}")


# -- input images ----------------------------------------------------------------------------------------------


@dataclass
class InitImage:
    data: bytes
    size: tuple[int, int]
    original_size: tuple[int, int]
    adjusted: str | None = None  # "resized", "padded", "resized+padded" when the client changed it


def nearest_sdxl_size(width: int, height: int) -> tuple[int, int]:
    # Ratios compared on a log scale, so a portrait image and its landscape twin pick mirrored sizes.
    aspect = math.log(width / height)
    return min(SDXL_SIZES, key=lambda s: abs(math.log(s[0] / s[1]) - aspect))


def prepare_image(path: Path, endpoint: Endpoint) -> InitImage:
    """The image as the endpoint accepts it: SDXL v1 needs one of its sizes (scaled to fit, then padded with the
    image's edge colour); v2beta needs 64 px per side and 4,096-9,437,184 pixels at an aspect of 1:2.5-2.5:1."""
    with Image.open(path) as opened:
        image = opened.convert("RGBA" if opened.mode in ("RGBA", "LA", "P") else "RGB")
    original = image.size
    adjusted: list[str] = []
    if endpoint.generation == 1:
        target = nearest_sdxl_size(*original)
        if original != target:
            scale = min(target[0] / original[0], target[1] / original[1])
            fitted = (max(1, round(original[0] * scale)), max(1, round(original[1] * scale)))
            if fitted != original:
                image = image.resize(fitted, Image.Resampling.LANCZOS)
                adjusted.append("resized")
            if fitted != target:
                canvas = Image.new(image.mode, target, image.getpixel((0, 0)))
                canvas.paste(image, ((target[0] - fitted[0]) // 2, (target[1] - fitted[1]) // 2))
                image = canvas
                adjusted.append("padded")
    else:
        w, h = original
        if not (1 / 2.5 <= w / h <= 2.5):
            _bad(f"{path} is {w}x{h}: the aspect ratio must be between 1:2.5 and 2.5:1")
        pixels = w * h
        scale = 1.0
        if pixels > V2_MAX_PIXELS:
            scale = (V2_MAX_PIXELS / pixels) ** 0.5
        elif pixels < V2_MIN_PIXELS or min(w, h) < 64:
            scale = max((V2_MIN_PIXELS / pixels) ** 0.5, 64 / min(w, h))
        if scale != 1.0:
            new_w, new_h = max(64, int(w * scale)), max(64, int(h * scale))
            # Rounding must not push a ratio at the limit past it (5000x2000 would become 4857x1942).
            new_w, new_h = min(new_w, math.floor(2.5 * new_h)), min(new_h, math.floor(2.5 * new_w))
            image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
            adjusted.append("resized")
    if image.mode == "RGBA" and endpoint.generation == 1:
        image = image.convert("RGB")  # SDXL v1 wants an opaque init image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return InitImage(buffer.getvalue(), image.size, original, "+".join(adjusted) or None)


# -- the HTTP client -------------------------------------------------------------------------------------------


@dataclass
class Variant:
    image: bytes
    seed: int | None
    finish_reason: str
    request_id: str | None
    content_type: str
    elapsed_s: float
    sent: dict[str, Any] = field(default_factory=dict)  # the parameters as sent (for the manifest)


@dataclass
class Retries:
    attempts: int = 4  # in all, for what may succeed on retry
    backoff_s: float = 1.0  # doubled each time, capped at 30 s
    rate_limit_wait_s: float = 60.0  # the API times a key out for 60 s after a 429
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)


class StabilityClient:
    def __init__(self, api_key: str, base_url: str = DEFAULT_BASE_URL, *, timeout_s: float = 180.0,
                 retries: Retries | None = None, transport: httpx.BaseTransport | None = None) -> None:
        if not api_key:
            raise StabilityError("auth", "no API key: set STABILITY_API_KEY or pass it on stdin (--api-key-stdin)")
        self.retries = retries or Retries()
        self.attempts_made = 0
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            transport=transport,
            headers={
                "Authorization": f"Bearer {api_key}",
                "Stability-Client-ID": CLIENT_ID,
                "Stability-Client-Version": CLIENT_VERSION,
            },
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StabilityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, params: Params, init: InitImage | None) -> list[Variant]:
        """All variants for one input. v1 asks for them in one request; v2beta makes one image per request."""
        params.check()
        spec = params.spec
        if spec.image == "required" and init is None:
            _bad(f"{spec.name} needs an input image")
        if spec.image == "none" and init is not None:
            _bad(f"{spec.name} takes no input image")
        if spec.image == "optional":
            if init is not None and params.aspect_ratio is not None:
                _bad(f"aspect_ratio applies to {spec.name} only without an input image (the input sets the shape)")
            if init is None and params.strength is not None:
                _bad(f"strength applies to {spec.name} only with an input image")
        if spec.generation == 1:
            return self._v1(params, init)
        variants = []
        for i in range(params.variants):
            seed = (params.seed + i) % 4294967295 if params.seed else None
            variants.append(self._v2(params, init, seed))
        return variants

    def _v1(self, params: Params, init: InitImage | None) -> list[Variant]:
        spec = params.spec
        as_json = params.accept == "json" or params.variants > 1  # several samples come only as JSON
        headers = {"Accept": "application/json" if as_json else "image/png"}
        prompts = [(params.prompt, 1.0)] + ([(params.negative_prompt, -1.0)] if params.negative_prompt else [])
        options: dict[str, Any] = {
            "cfg_scale": params.cfg_scale, "sampler": params.sampler, "samples": params.variants,
            "seed": params.seed, "steps": params.steps, "style_preset": params.style_preset,
        }
        if spec.json_body:
            body = {"text_prompts": [{"text": t, "weight": w} for t, w in prompts],
                    "width": params.width or 1024, "height": params.height or 1024,
                    **{k: v for k, v in options.items() if v is not None}}
            response = self._send(spec, headers, json_body=body)
        else:
            assert init is not None
            fields: list[tuple[str, Any]] = []
            for i, (text, weight) in enumerate(prompts):
                fields += [(f"text_prompts[{i}][text]", text), (f"text_prompts[{i}][weight]", str(weight))]
            if params.strength is not None:
                fields.append(("image_strength", str(round(1 - params.strength, 4))))
            fields += [(k, str(v)) for k, v in options.items() if v is not None]
            files = [("init_image", ("init.png", init.data, "image/png"))] + [(k, (None, v)) for k, v in fields]
            response = self._send(spec, headers, files=files)
        request_id = response.headers.get("x-request-id")
        sent = {k: v for k, v in options.items() if v is not None}
        if params.strength is not None and not spec.json_body:
            sent["strength"] = params.strength
            sent["image_strength"] = round(1 - params.strength, 4)  # what v1 calls it: similarity to the input
        if not as_json:
            return [Variant(response.content, _int(response.headers.get("seed")),
                            response.headers.get("finish-reason", "SUCCESS"), request_id,
                            response.headers.get("content-type", "image/png"), response.elapsed.total_seconds(),
                            sent)]
        artifacts = response.json().get("artifacts", [])
        return [Variant(base64.b64decode(a["base64"]), _int(a.get("seed")), a.get("finishReason", "SUCCESS"),
                        request_id, "image/png", response.elapsed.total_seconds(), sent) for a in artifacts]

    def _v2(self, params: Params, init: InitImage | None, seed: int | None) -> Variant:
        spec = params.spec
        as_json = params.accept == "json"
        headers = {"Accept": "application/json" if as_json else "image/*"}
        fields: dict[str, Any] = {
            "prompt": params.prompt, "negative_prompt": params.negative_prompt, "seed": seed,
            "output_format": params.output_format, "style_preset": params.style_preset,
        }
        if spec.name in ("control/structure", "control/sketch"):
            fields["control_strength"] = params.control_strength
        if spec.name == "control/style":
            fields["fidelity"] = params.fidelity
            fields["aspect_ratio"] = params.aspect_ratio
        if spec.name == "generate/sd3":
            fields["model"] = params.model
            fields["cfg_scale"] = params.cfg_scale
            fields["mode"] = "image-to-image" if init is not None else "text-to-image"
        if init is not None and spec.image == "optional":
            fields["strength"] = params.strength if params.strength is not None else 0.5
        if init is None and spec.name in ("generate/sd3", "generate/core", "generate/ultra"):
            fields["aspect_ratio"] = params.aspect_ratio
        # Every field goes as a multipart part (no file name): v2beta refuses urlencoded bodies, and httpx only
        # builds multipart (with its boundary in the Content-Type it sets itself) when there are files.
        files: list[tuple[str, Any]] = [(k, (None, str(v))) for k, v in fields.items() if v is not None]
        if init is not None:
            files.insert(0, ("image", ("image.png", init.data, "image/png")))
        # The body exactly as it will be sent (multipart framing included) must fit the API's 10 MiB.
        size = len(self._http.build_request("POST", spec.path, headers=headers, files=files).read())
        if size > MAX_V2_REQUEST_BYTES:
            raise StabilityError("too_large", f"the request would be {size} bytes; the API takes at most 10 MiB")
        response = self._send(spec, headers, files=files)
        request_id = response.headers.get("x-request-id")
        sent = {k: v for k, v in fields.items() if v is not None and k != "prompt" and k != "negative_prompt"}
        if as_json:
            body = response.json()
            return Variant(base64.b64decode(body["image"]), _int(body.get("seed")),
                           body.get("finish_reason", "SUCCESS"), request_id, f"image/{params.output_format}",
                           response.elapsed.total_seconds(), sent)
        return Variant(response.content, _int(response.headers.get("seed")),
                       response.headers.get("finish-reason", "SUCCESS"), request_id,
                       response.headers.get("content-type", "image/png"), response.elapsed.total_seconds(), sent)

    def _send(self, spec: Endpoint, headers: dict[str, str], *, files: Any = None,
              json_body: Any = None) -> httpx.Response:
        """POST with bounded retries for what can succeed on retry; anything else fails at once."""
        r = self.retries
        for attempt in range(1, r.attempts + 1):
            self.attempts_made += 1
            try:
                response = self._http.post(spec.path, headers=headers, files=files, json=json_body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # The request never reached the API: nothing was generated or billed, so try again.
                if attempt == r.attempts:
                    raise StabilityError("network", f"cannot reach the API: {exc!r}") from None
                r.sleep(min(r.backoff_s * 2 ** (attempt - 1), 30.0))
                continue
            except httpx.TransportError as exc:
                # Sent, but the answer was lost (read timeout, dropped connection): the API may have generated
                # and billed it, so it is not repeated.
                raise StabilityError("network", f"the request was sent but no answer came back: {exc!r}; it may "
                                     "have been generated (and billed) anyway") from None
            if response.status_code < 400:
                return response
            error = _error_for(response, spec)
            if response.status_code not in RETRYABLE_STATUS or attempt == r.attempts:
                raise error
            wait = r.rate_limit_wait_s if response.status_code == 429 else min(r.backoff_s * 2 ** (attempt - 1), 30.0)
            r.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _error_for(response: httpx.Response, spec: Endpoint) -> StabilityError:
    status = response.status_code
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except ValueError:
        body = {}
    name = str(body.get("name", "")) if isinstance(body, dict) else ""
    detail = ""
    if isinstance(body, dict):
        detail = body.get("message") or "; ".join(str(e) for e in body.get("errors", []) or [])
    detail = detail or response.text[:300] or response.reason_phrase
    if status == 401 or (status == 403 and spec.generation == 1):
        code = "auth"
        hint = "check STABILITY_API_KEY / [stability] api_key_file"
    elif status == 402 or "not have enough balance" in detail:
        code, hint = "credits", "the account is out of credits: top it up"
    elif status == 403 or name == "invalid_prompts" or "invalid_prompts" in detail:
        code, hint = "moderation", "the request was flagged by content moderation: change the prompt or image"
    elif status == 413:
        code, hint = "too_large", "the request is over 10 MiB: use a smaller input image"
    elif status == 429:
        code, hint = "rate_limited", "too many requests (over 150 in 10 s): wait a minute"
    elif status >= 500:
        code, hint = "server_error", "the API failed; it was retried; try again later"
    else:
        code, hint = "invalid_request", "a parameter was refused"
    return StabilityError(code, f"HTTP {status} {name}: {detail} ({hint})".replace(" : ", ": "), status=status,
                          request_id=request_id)


# -- files and manifests ---------------------------------------------------------------------------------------


def _reserve_version(out_dir: Path, base: str) -> str:
    """The next free `char_<base>_vNN`, reserved by creating its manifest exclusively, so that jobs stylizing
    the same render at the same time never write over each other."""
    while True:
        taken = [int(m.group(1)) for p in out_dir.glob(f"char_{base}_v*.*")
                 if (m := re.fullmatch(rf"char_{re.escape(base)}_v(\d+)\.\w+", p.name))]
        stem = f"char_{base}_v{max(taken, default=0) + 1:02d}"
        try:
            fd = os.open(out_dir / f"{stem}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.write(fd, b'{"status": "writing"}\n')  # what is left if the client dies before the manifest
        os.close(fd)
        return stem


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _extension(content_type: str) -> str:
    return {"image/jpeg": "jpg", "image/webp": "webp"}.get(content_type.split(";")[0].strip(), "png")


def generate_variants(client: StabilityClient, params: Params, inputs: list[Path], out_dir: Path,
                      *, workspace: Path | None = None, emit: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every variant for every input (or `variants` images from the prompt alone); writes images and manifests,
    returns the manifests. Raises StabilityError with a stable code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    params.check()
    manifests = []
    for source in inputs or [None]:  # type: ignore[list-item]
        started = time.monotonic()
        init = prepare_image(source, params.spec) if source is not None else None
        variants = client.generate(params, init)
        base = source.stem if source is not None else "prompt"
        for variant in variants:
            stem = _reserve_version(out_dir, base)
            image_path = out_dir / f"{stem}.{_extension(variant.content_type)}"
            image_path.write_bytes(variant.image)
            input_info: dict[str, Any] | None = None if source is None else {
                "path": _relative(source, workspace), "sha256": _sha256(source.read_bytes()),
                "size": list(init.original_size) if init else None,
                "sent_size": list(init.size) if init else None, "adjusted": init.adjusted if init else None,
            }
            manifest: dict[str, Any] = {
                "endpoint": params.endpoint, "model": params.model or params.spec.model,
                "prompt": params.prompt, "negative_prompt": params.negative_prompt,
                "style_preset": params.style_preset, "seed": variant.seed,
                "parameters": {"endpoint": params.endpoint, "variants": params.variants, **variant.sent},
                "finish_reason": variant.finish_reason, "content_filtered": variant.finish_reason == "CONTENT_FILTERED",
                "request_id": variant.request_id,
                "input": input_info,
                "output": {"path": _relative(image_path, workspace), "sha256": _sha256(variant.image),
                           "content_type": variant.content_type},
                "timings": {"request_s": round(variant.elapsed_s, 3),
                            "total_s": round(time.monotonic() - started, 3)},
                "emulated": params.emulated,
                "client": {"id": CLIENT_ID, "version": CLIENT_VERSION},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "manifest_id": str(uuid.uuid4()),
            }
            manifest_path = out_dir / f"{stem}.json"
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
            emit(f"PODQ_OUTPUT {image_path}")
            emit(f"PODQ_OUTPUT {manifest_path}")
            emit("PODQ_VARIANT " + json.dumps({
                "image": _relative(image_path, workspace), "manifest": _relative(manifest_path, workspace),
                "seed": variant.seed, "finish_reason": variant.finish_reason, "request_id": variant.request_id,
                "input": input_info["path"] if input_info else None,
                "adjusted": input_info["adjusted"] if input_info else None,
            }))
            manifests.append(manifest)
    return manifests


def _relative(path: Path, workspace: Path | None) -> str:
    if workspace is not None:
        try:
            return str(path.resolve().relative_to(workspace.resolve()))
        except ValueError:
            pass
    return str(path)


# -- command line ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stylize renders with Stability AI (podq's client).")
    parser.add_argument("--params-json", default="{}", help="generation parameters as a JSON object")
    parser.add_argument("--input", action="append", default=[], help="input image (repeatable)")
    parser.add_argument("--out-dir", default="output")
    parser.add_argument("--workspace", help="paths are relative to this; manifests record paths relative to it")
    parser.add_argument("--base-url", default=os.environ.get("STABILITY_BASE_URL", DEFAULT_BASE_URL))
    parser.add_argument("--api-key-stdin", action="store_true", help="read the API key from stdin's first line")
    parser.add_argument("--rate-limit-wait-s", type=float, default=60.0)
    parser.add_argument("--backoff-s", type=float, default=1.0)
    parser.add_argument("--attempts", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        key = sys.stdin.readline().strip() if args.api_key_stdin else os.environ.get("STABILITY_API_KEY", "")
        params = Params.from_dict(json.loads(args.params_json))
        workspace = Path(args.workspace) if args.workspace else None
        root = workspace or Path.cwd()
        inputs = [root / p for p in args.input]
        for p in inputs:
            if not p.is_file():
                raise StabilityError("invalid_request", f"input image {p} does not exist")
        if workspace is not None:  # nothing read or written through a link that leads out of the workspace
            for p in [*inputs, root / args.out_dir]:
                real, top = os.path.realpath(p), os.path.realpath(workspace)
                if os.path.commonpath([real, top]) != top:
                    print(f"PODQ_ERROR not_allowed: {p} resolves to {real}, outside the workspace {top}",
                          file=sys.stderr, flush=True)
                    return 2
        retries = Retries(attempts=args.attempts, backoff_s=args.backoff_s, rate_limit_wait_s=args.rate_limit_wait_s)
        with StabilityClient(key, args.base_url, retries=retries) as client:
            try:
                generate_variants(client, params, inputs, root / args.out_dir, workspace=workspace,
                                  emit=lambda line: print(line, flush=True))
            finally:
                print(f"PODQ_ATTEMPTS {client.attempts_made}", flush=True)
    except StabilityError as exc:
        print(f"PODQ_ERROR {exc.code}: {exc.message}", file=sys.stderr, flush=True)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"PODQ_ERROR invalid_request: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
