"""The contract's numbers and enums (shared/docs/stability-api.md), the API generations, the parameter
checks and `Rejected`, the refusal every check raises."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from enum import Enum
from typing import Final

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


class Generation(Enum):
    """Which API generation a path belongs to: it decides the error body shape and the response headers."""

    V1 = "v1"
    V2 = "v2beta"


def generation_of(path: str) -> Generation:
    return Generation.V1 if path.startswith("/v1/") else Generation.V2


# --- contract checks -------------------------------------------------------------------------------------------

# Headers, not body fields: a v1 message names them as headers rather than `body.<field>`.
_HEADER_FIELDS: Final = frozenset(
    {"authorization", "content-type", "stability-client-id", "stability-client-user-id", "stability-client-version"}
)


class Rejected(Exception):
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


class Params:
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
            raise Rejected(400, "bad_request", *self.problems)

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
