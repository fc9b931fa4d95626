"""The Stability API emulator against its contract (shared/docs/stability-api.md), through real HTTP with httpx."""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageStat

from agent.stability.emulator import StabilityEmulator

KEY = "sk-test-emulator-key"
SDXL = "/v1/generation/stable-diffusion-xl-1024-v1-0"
V2 = "/v2beta/stable-image"
JSON = {"accept": "application/json"}


def image_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A small scene with shapes, so derived and blurred outputs can be told apart."""
    image = Image.new("RGB", (width, height), (30, 40, 50))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 8, width // 2, height * 3 // 4), fill=(230, 200, 170))
    draw.rectangle((width * 5 // 8, height // 2, width * 7 // 8, height * 7 // 8), fill=(60, 110, 220))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def sharpest_edge(image: Image.Image) -> int:
    """The strongest local contrast: high for crisp shapes, low once blurred."""
    edges = image.convert("L").filter(ImageFilter.FIND_EDGES).crop((2, 2, image.width - 2, image.height - 2))
    return int(ImageStat.Stat(edges).extrema[0][1])


# httpx sends `data` alone urlencoded; the API needs multipart even without a file (the contract's point).
FORCE_MULTIPART: dict[str, Any] = {"none": (None, b"")}


@pytest.fixture
def emulator() -> Iterator[StabilityEmulator]:
    with StabilityEmulator(api_keys={KEY}) as emu:
        yield emu


@pytest.fixture
def client(emulator: StabilityEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def v2_post(
    client: httpx.Client,
    endpoint: str,
    data: dict[str, str],
    image: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    files: dict[str, Any] = {"image": ("render.png", image, "image/png")} if image is not None else FORCE_MULTIPART
    return client.post(f"{V2}/{endpoint}", data=data, files=files, headers=headers)


def v1_image_to_image(
    client: httpx.Client, data: dict[str, str], init: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    files = {"init_image": ("init.png", init, "image/png")}
    return client.post(f"{SDXL}/image-to-image", data=data, files=files, headers=headers)


# --- v2beta: valid requests --------------------------------------------------------------------------------------

# (endpoint, form fields, input image size or None, expected output size)
V2_CASES = [
    ("control/structure", {"prompt": "a knight", "control_strength": "0.6"}, (320, 240), (320, 240)),
    ("control/sketch", {"prompt": "a knight", "style_preset": "line-art"}, (240, 320), (240, 320)),
    ("control/style", {"prompt": "a knight", "fidelity": "0.8"}, (320, 240), (320, 240)),
    ("control/style", {"prompt": "a knight", "aspect_ratio": "16:9"}, (320, 240), (1344, 768)),
    ("generate/sd3", {"prompt": "a castle", "aspect_ratio": "21:9", "model": "sd3.5-medium"}, None, (1536, 640)),
    ("generate/sd3", {"prompt": "a castle", "mode": "image-to-image", "strength": "0.5"}, (256, 384), (256, 384)),
    ("generate/core", {"prompt": "a castle"}, None, (1024, 1024)),
    ("generate/core", {"prompt": "a castle", "aspect_ratio": "9:16", "negative_prompt": "fog"}, None, (768, 1344)),
    ("generate/ultra", {"prompt": "a castle", "aspect_ratio": "4:5"}, None, (896, 1088)),
    ("generate/ultra", {"prompt": "a castle", "strength": "0.3"}, (384, 256), (384, 256)),
]


@pytest.mark.parametrize(("endpoint", "data", "input_size", "output_size"), V2_CASES)
def test_v2_endpoint_answers_an_image_in_both_accept_modes(
    client: httpx.Client,
    endpoint: str,
    data: dict[str, str],
    input_size: tuple[int, int] | None,
    output_size: tuple[int, int],
) -> None:
    image = image_bytes(*input_size) if input_size else None

    raw = v2_post(client, endpoint, {**data, "seed": "1234"}, image)
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-type"] == "image/png"
    assert raw.headers["finish-reason"] == "SUCCESS"
    assert raw.headers["seed"] == "1234"
    assert uuid.UUID(raw.headers["x-request-id"]).version == 4
    assert decode(raw.content).size == output_size
    assert decode(raw.content).format == "PNG"

    as_json = v2_post(client, endpoint, {**data, "seed": "1234"}, image, headers=JSON)
    assert as_json.status_code == 200, as_json.text
    assert as_json.headers["content-type"] == "application/json; type=image/png"
    assert "seed" not in as_json.headers and "finish-reason" not in as_json.headers
    assert uuid.UUID(as_json.headers["x-request-id"])
    body = as_json.json()
    assert set(body) == {"image", "finish_reason", "seed"}
    assert body["finish_reason"] == "SUCCESS"
    assert body["seed"] == 1234
    # Deterministic for (input, prompt, seed): both modes carry the same image.
    assert base64.b64decode(body["image"]) == raw.content


@pytest.mark.parametrize(
    ("fmt", "mime", "pil_format"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")]
)
def test_v2_output_format(client: httpx.Client, fmt: str, mime: str, pil_format: str) -> None:
    raw = v2_post(client, "control/structure", {"prompt": "p", "output_format": fmt}, image_bytes(200, 100))
    assert raw.headers["content-type"] == mime
    assert decode(raw.content).format == pil_format
    assert decode(raw.content).size == (200, 100)

    as_json = v2_post(client, "generate/core", {"prompt": "p", "output_format": fmt}, headers=JSON)
    assert as_json.headers["content-type"] == f"application/json; type={mime}"
    assert decode(base64.b64decode(as_json.json()["image"])).format == pil_format


def test_v2_output_derives_from_input_and_seed(client: httpx.Client) -> None:
    render = image_bytes(256, 256)
    first = v2_post(client, "control/structure", {"prompt": "a knight", "seed": "7"}, render).content
    again = v2_post(client, "control/structure", {"prompt": "a knight", "seed": "7"}, render).content
    other_seed = v2_post(client, "control/structure", {"prompt": "a knight", "seed": "8"}, render).content
    other_input = v2_post(
        client, "control/structure", {"prompt": "a knight", "seed": "7"}, image_bytes(256, 256, "JPEG")
    )
    assert first == again
    assert first != other_seed
    assert first != other_input.content
    # The structure of the input survives: far more edges than a flat image.
    assert sharpest_edge(decode(first)) > 100


def test_v2_seed_zero_or_absent_is_random_and_reported(client: httpx.Client) -> None:
    for data in ({"prompt": "p"}, {"prompt": "p", "seed": "0"}):
        raw = v2_post(client, "generate/core", data)
        assert 1 <= int(raw.headers["seed"]) <= 4_294_967_294
        as_json = v2_post(client, "generate/core", data, headers=JSON)
        assert 1 <= as_json.json()["seed"] <= 4_294_967_294


# --- v2beta: validation ------------------------------------------------------------------------------------------


def assert_v2_error(response: httpx.Response, status: int, name: str) -> list[str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert uuid.UUID(response.headers["x-request-id"]).version == 4
    body = response.json()
    assert set(body) == {"id", "name", "errors"}
    assert body["name"] == name
    assert body["id"]
    assert body["errors"] and all(isinstance(error, str) for error in body["errors"])
    errors: list[str] = body["errors"]
    return errors


def test_v2_rejects_a_body_that_is_not_multipart(client: httpx.Client) -> None:
    urlencoded = client.post(f"{V2}/generate/core", data={"prompt": "p"})
    assert assert_v2_error(urlencoded, 400, "bad_request") == ["content-type: must be multipart/form-data"]
    as_json = client.post(f"{V2}/control/structure", json={"prompt": "p"})
    assert assert_v2_error(as_json, 400, "bad_request") == ["content-type: must be multipart/form-data"]


def test_v2_reports_every_invalid_field(client: httpx.Client) -> None:
    response = v2_post(
        client,
        "control/structure",
        {"control_strength": "1.5", "seed": "4294967295", "output_format": "gif", "style_preset": "oil"},
    )
    errors = assert_v2_error(response, 400, "bad_request")
    fields = {error.split(":")[0] for error in errors}
    assert fields == {"prompt", "image", "control_strength", "seed", "output_format", "style_preset"}
    assert "prompt: is required" in errors
    assert "image: is required" in errors


@pytest.mark.parametrize(
    ("size", "fragment"),
    [((32, 200), "at least 64"), ((300, 100), "aspect ratio"), ((3100, 3100), "pixels")],
)
def test_v2_rejects_input_images_out_of_bounds(client: httpx.Client, size: tuple[int, int], fragment: str) -> None:
    response = v2_post(client, "control/sketch", {"prompt": "p"}, image_bytes(*size))
    errors = assert_v2_error(response, 400, "bad_request")
    assert errors[0].startswith("image: ") and fragment in errors[0]


def test_v2_rejects_an_image_that_is_not_one(client: httpx.Client) -> None:
    response = client.post(
        f"{V2}/control/structure", data={"prompt": "p"}, files={"image": ("x.png", b"not an image", "image/png")}
    )
    assert assert_v2_error(response, 400, "bad_request") == ["image: must be a png, jpeg or webp image"]


@pytest.mark.parametrize(
    ("endpoint", "data", "with_image", "bad_field"),
    [
        ("generate/sd3", {"prompt": "p", "mode": "image-to-image"}, True, "strength"),
        ("generate/sd3", {"prompt": "p", "mode": "image-to-image", "strength": "0.5"}, False, "image"),
        ("generate/sd3", {"prompt": "p", "mode": "sketch"}, False, "mode"),
        ("generate/sd3", {"prompt": "p", "model": "sd4"}, False, "model"),
        ("generate/sd3", {"prompt": "p", "strength": "0.5"}, False, "strength"),
        ("generate/ultra", {"prompt": "p"}, True, "strength"),
        ("generate/ultra", {"prompt": "p", "strength": "0.5"}, False, "image"),
        ("generate/ultra", {"prompt": "p", "strength": "1.5"}, True, "strength"),
        ("generate/core", {"prompt": "p", "aspect_ratio": "4:3"}, False, "aspect_ratio"),
        ("control/style", {"prompt": "p", "fidelity": "-0.1"}, True, "fidelity"),
    ],
)
def test_v2_mode_and_range_rules(
    client: httpx.Client, endpoint: str, data: dict[str, str], with_image: bool, bad_field: str
) -> None:
    response = v2_post(client, endpoint, data, image_bytes(256, 256) if with_image else None)
    errors = assert_v2_error(response, 400, "bad_request")
    assert [error.split(":")[0] for error in errors] == [bad_field]


def test_v2_body_over_10_mib_is_413(emulator: StabilityEmulator, client: httpx.Client) -> None:
    big = b"\0" * (10 * 1024 * 1024 + 1)
    response = client.post(f"{V2}/generate/sd3", data={"prompt": "p"}, files={"image": ("big.png", big, "image/png")})
    errors = assert_v2_error(response, 413, "payload_too_large")
    assert errors == ["body: payloads cannot be larger than 10MiB in size"]
    record = emulator.requests[-1]
    assert record.status == 413 and record.body_size > 10 * 1024 * 1024
    # The connection stays usable: the emulator read the oversize body before answering.
    assert v2_post(client, "generate/core", {"prompt": "p"}).status_code == 200


def test_v2_accepts_a_chunked_multipart_body(emulator: StabilityEmulator, client: httpx.Client) -> None:
    files = {"image": ("render.png", image_bytes(128, 96), "image/png")}
    encoded = httpx.Request("POST", "/", data={"prompt": "p"}, files=files)
    body = encoded.read()
    # An iterator has no length: httpx sends it with Transfer-Encoding: chunked.
    response = client.post(
        f"{V2}/control/structure",
        content=iter([body[:100], body[100:]]),
        headers={"content-type": encoded.headers["content-type"]},
    )
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (128, 96)
    record = emulator.requests[-1]
    assert record.headers["transfer-encoding"] == "chunked"
    assert record.body_size == len(body) and record.files["image"].width == 128


def test_unknown_v2_path_is_404(client: httpx.Client) -> None:
    assert_v2_error(v2_post(client, "generate/sd9", {"prompt": "p"}), 404, "not_found")


# --- v1 ----------------------------------------------------------------------------------------------------------


def assert_v1_error(response: httpx.Response, status: int, name: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"id", "name", "message"}
    assert body["name"] == name
    assert body["id"]
    message: str = body["message"]
    return message


def test_v1_image_to_image_json_with_samples(client: httpx.Client) -> None:
    data = {
        "text_prompts[0][text]": "a knight, oil painting",
        "text_prompts[0][weight]": "1",
        "text_prompts[1][text]": "blurry",
        "text_prompts[1][weight]": "-1.0",
        "init_image_mode": "IMAGE_STRENGTH",
        "image_strength": "0.35",
        "cfg_scale": "7",
        "clip_guidance_preset": "FAST_BLUE",
        "sampler": "K_DPMPP_2M",
        "samples": "2",
        "seed": "100",
        "steps": "30",
        "style_preset": "fantasy-art",
    }
    response = v1_image_to_image(client, data, image_bytes(1216, 832))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "seed" not in response.headers and "finish-reason" not in response.headers
    artifacts = response.json()["artifacts"]
    assert [a["seed"] for a in artifacts] == [100, 101]
    assert [a["finishReason"] for a in artifacts] == ["SUCCESS", "SUCCESS"]
    images = [decode(base64.b64decode(a["base64"])) for a in artifacts]
    assert [image.size for image in images] == [(1216, 832), (1216, 832)]
    assert images[0].tobytes() != images[1].tobytes()


def test_v1_image_to_image_png_mode(client: httpx.Client) -> None:
    data = {"text_prompts[0][text]": "a knight", "seed": "42", "init_image_mode": "STEP_SCHEDULE"}
    response = v1_image_to_image(client, data, image_bytes(832, 1216, "JPEG"), headers={"accept": "image/png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["finish-reason"] == "SUCCESS"
    assert response.headers["seed"] == "42"
    assert decode(response.content).size == (832, 1216)


def test_v1_text_to_image_both_modes(emulator: StabilityEmulator, client: httpx.Client) -> None:
    body = {
        "text_prompts": [{"text": "a castle", "weight": 1.0}],
        "width": 1344,
        "height": 768,
        "cfg_scale": 7,
        "sampler": "K_EULER",
        "samples": 1,
        "seed": 9,
        "steps": 30,
        "style_preset": "photographic",
    }
    as_json = client.post(f"{SDXL}/text-to-image", json=body)
    assert as_json.status_code == 200, as_json.text
    artifact = as_json.json()["artifacts"][0]
    assert artifact["seed"] == 9 and artifact["finishReason"] == "SUCCESS"
    assert decode(base64.b64decode(artifact["base64"])).size == (1344, 768)

    png = client.post(f"{SDXL}/text-to-image", json=body, headers={"accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and png.headers["seed"] == "9"
    assert png.content == base64.b64decode(artifact["base64"])
    record = emulator.requests[-1]
    assert record.json_body == body
    assert record.fields["width"] == "1344"
    assert record.fields["text_prompts"] == '[{"text": "a castle", "weight": 1.0}]'


def test_v1_rejects_non_sdxl_sizes(client: httpx.Client) -> None:
    t2i = client.post(f"{SDXL}/text-to-image", json={"text_prompts": [{"text": "p"}], "width": 512, "height": 512})
    assert "512x512" in assert_v1_error(t2i, 400, "invalid_sdxl_v1_dimensions")
    i2i = v1_image_to_image(client, {"text_prompts[0][text]": "p"}, image_bytes(1024, 768))
    assert "1024x768" in assert_v1_error(i2i, 400, "invalid_sdxl_v1_dimensions")
    odd = client.post(f"{SDXL}/text-to-image", json={"text_prompts": [{"text": "p"}], "width": 1000, "height": 1000})
    assert_v1_error(odd, 400, "invalid_height_or_width")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"text_prompts[0][text]": "p", "steps": "5"}, "body.steps must be between 10 and 50"),
        ({"text_prompts[0][text]": "p", "steps": "51"}, "body.steps must be between 10 and 50"),
        ({"text_prompts[0][text]": "p", "cfg_scale": "36"}, "body.cfg_scale must be between 0 and 35"),
        ({"text_prompts[0][text]": "p", "samples": "11"}, "body.samples must be between 1 and 10"),
        ({"text_prompts[0][text]": "p", "seed": "4294967296"}, "body.seed must be between"),
        ({"text_prompts[0][text]": "p", "image_strength": "1.2"}, "body.image_strength must be between 0 and 1"),
        ({"text_prompts[0][text]": "p", "sampler": "EULER"}, "body.sampler must be one of"),
        ({"text_prompts[0][text]": "p", "style_preset": "oil"}, "body.style_preset must be one of"),
        ({"text_prompts[0][text]": "p", "clip_guidance_preset": "X"}, "body.clip_guidance_preset must be one of"),
        ({"text_prompts[0][text]": "p", "init_image_mode": "X"}, "body.init_image_mode must be one of"),
        ({"text_prompts[0][text]": "p" * 2001}, "body.text_prompts[0][text] must be at most 2000 characters"),
        ({"seed": "1"}, "body.text_prompts must contain at least one prompt"),
        ({"text_prompts[0][weight]": "1"}, "body.text_prompts[0][text] is required"),
    ],
)
def test_v1_validation(client: httpx.Client, data: dict[str, str], fragment: str) -> None:
    response = v1_image_to_image(client, data, image_bytes(1024, 1024))
    assert fragment in assert_v1_error(response, 400, "bad_request")


def test_v1_json_body_needs_real_numbers(client: httpx.Client) -> None:
    response = client.post(f"{SDXL}/text-to-image", json={"text_prompts": [{"text": "p"}], "steps": "30"})
    assert "body.steps must be an integer" in assert_v1_error(response, 400, "bad_request")


def test_v1_missing_init_image_and_wrong_encodings(client: httpx.Client) -> None:
    missing = client.post(f"{SDXL}/image-to-image", data={"text_prompts[0][text]": "p"}, files=FORCE_MULTIPART)
    assert "body.init_image is required" in assert_v1_error(missing, 400, "bad_request")
    webp = v1_image_to_image(client, {"text_prompts[0][text]": "p"}, image_bytes(1024, 1024, "WEBP"))
    assert_v1_error(webp, 400, "invalid_mime_type")
    urlencoded = client.post(f"{SDXL}/image-to-image", data={"text_prompts[0][text]": "p"})
    assert "content-type" in assert_v1_error(urlencoded, 400, "bad_request")
    form_t2i = client.post(f"{SDXL}/text-to-image", data={"text_prompts[0][text]": "p"}, files=FORCE_MULTIPART)
    assert "application/json" in assert_v1_error(form_t2i, 400, "bad_request")


def test_v1_several_samples_need_json_accept(client: httpx.Client) -> None:
    data = {"text_prompts[0][text]": "p", "samples": "3"}
    response = v1_image_to_image(client, data, image_bytes(1024, 1024), headers={"accept": "image/png"})
    assert_v1_error(response, 400, "invalid_samples")
    t2i = client.post(
        f"{SDXL}/text-to-image", json={"text_prompts": [{"text": "p"}], "samples": 2}, headers={"accept": "image/png"}
    )
    assert_v1_error(t2i, 400, "invalid_samples")


def test_v1_unknown_engine_is_404(client: httpx.Client) -> None:
    response = client.post("/v1/generation/stable-diffusion-v9/text-to-image", json={"text_prompts": [{"text": "p"}]})
    assert "stable-diffusion-v9" in assert_v1_error(response, 404, "not_found")
    assert "x-request-id" not in response.headers


def test_v1_body_over_10_mib_is_413(client: httpx.Client) -> None:
    response = v1_image_to_image(client, {"text_prompts[0][text]": "p"}, b"\0" * (11 * 1024 * 1024))
    assert_v1_error(response, 413, "payload_too_large")


def test_v1_balance_spends_credits_and_engines_list(client: httpx.Client) -> None:
    assert client.get("/v1/user/balance").json() == {"credits": 1000.0}
    body = {"text_prompts": [{"text": "p"}], "samples": 2, "steps": 30}
    assert client.post(f"{SDXL}/text-to-image", json=body).status_code == 200
    assert client.get("/v1/user/balance").json()["credits"] == pytest.approx(1000 - 2 * 0.9)
    assert client.post(f"{SDXL}/text-to-image", json={**body, "samples": 1, "steps": 45}).status_code == 200
    assert client.get("/v1/user/balance").json()["credits"] == pytest.approx(1000 - 1.8 - 0.9 * 45 / 30)
    # A refused request costs nothing.
    client.post(f"{SDXL}/text-to-image", json={**body, "steps": 5})
    assert client.get("/v1/user/balance").json()["credits"] == pytest.approx(1000 - 1.8 - 1.35)

    engines = client.get("/v1/engines/list").json()
    assert {"id": "stable-diffusion-xl-1024-v1-0", "type": "PICTURE"}.items() <= engines[0].items()
    assert {"id", "name", "description", "type"} <= set(engines[0])
    assert "email" in client.get("/v1/user/account").json()


# --- auth --------------------------------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401(emulator: StabilityEmulator) -> None:
    body = {"text_prompts": [{"text": "p"}]}
    with httpx.Client(base_url=emulator.base_url) as anonymous:
        v1_missing = anonymous.post(f"{SDXL}/text-to-image", json=body)
        assert '"Authorization" is missing' in assert_v1_error(v1_missing, 401, "unauthorized")
        v1_wrong = anonymous.post(f"{SDXL}/text-to-image", json=body, headers={"Authorization": "Bearer nope"})
        assert "Incorrect API key" in assert_v1_error(v1_wrong, 401, "unauthorized")
        balance = anonymous.get("/v1/user/balance", headers={"Authorization": KEY})  # no "Bearer "
        assert_v1_error(balance, 401, "unauthorized")

        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer"}):
            v2 = anonymous.post(f"{V2}/generate/core", data={"prompt": "p"}, files=FORCE_MULTIPART, headers=headers)
            assert assert_v2_error(v2, 401, "unauthorized") == ["authorization: invalid or missing header value"]
    assert [record.auth_ok for record in emulator.requests] == [False] * 6


def test_without_api_keys_any_non_empty_key_is_accepted() -> None:
    with StabilityEmulator() as emu, httpx.Client(base_url=emu.base_url) as c:
        ok = c.post(
            f"{V2}/generate/core", data={"prompt": "p"}, files=FORCE_MULTIPART, headers={"Authorization": "Bearer x"}
        )
        assert ok.status_code == 200
        assert c.post(f"{V2}/generate/core", data={"prompt": "p"}, files=FORCE_MULTIPART).status_code == 401


# --- queued failures and content filtering -----------------------------------------------------------------------

V2_FAILURES = {
    401: ("unauthorized", "authorization: invalid or missing header value"),
    402: ("payment_required", "credits:"),
    403: ("content_moderation", "flagged by our content moderation system"),
    413: ("payload_too_large", "body: payloads cannot be larger than 10MiB"),
    422: ("unprocessable_entity", ""),
    429: ("rate_limit_exceeded", "150 requests within a 10 second period"),
    500: ("internal_error", ""),
    503: ("service_unavailable", ""),
}
V1_FAILURES = {
    401: ("unauthorized", "Incorrect API key"),
    402: ("payment_required", "not have enough balance"),
    403: ("permission_denied", ""),
    429: ("rate_limit_exceeded", "150 requests"),
    500: ("server_error", "please try again"),
    503: ("service_unavailable", ""),
}


@pytest.mark.parametrize("status", sorted(V2_FAILURES))
def test_fail_next_v2(emulator: StabilityEmulator, client: httpx.Client, status: int) -> None:
    name, fragment = V2_FAILURES[status]
    emulator.fail_next(status)
    errors = assert_v2_error(v2_post(client, "generate/core", {"prompt": "p"}), status, name)
    assert fragment in errors[0]
    assert v2_post(client, "generate/core", {"prompt": "p"}).status_code == 200
    assert [record.status for record in emulator.requests] == [status, 200]


@pytest.mark.parametrize("status", sorted(V1_FAILURES))
def test_fail_next_v1(emulator: StabilityEmulator, client: httpx.Client, status: int) -> None:
    name, fragment = V1_FAILURES[status]
    emulator.fail_next(status)
    response = client.post(f"{SDXL}/text-to-image", json={"text_prompts": [{"text": "p"}]})
    assert fragment in assert_v1_error(response, status, name)


def test_fail_next_times_and_path(emulator: StabilityEmulator, client: httpx.Client) -> None:
    structure = f"{V2}/control/structure"
    emulator.fail_next(429, times=2, path=structure)
    image = image_bytes(128, 128)
    # Another path is untouched by a failure queued for `structure`.
    assert v2_post(client, "generate/core", {"prompt": "p"}).status_code == 200
    assert v2_post(client, "control/structure", {"prompt": "p"}, image).status_code == 429
    assert v2_post(client, "control/structure", {"prompt": "p"}, image).status_code == 429
    assert v2_post(client, "control/structure", {"prompt": "p"}, image).status_code == 200
    # The failed requests were still recorded in full.
    failed = emulator.requests[1]
    assert failed.status == 429 and failed.fields == {"prompt": "p"} and failed.files["image"].width == 128


def test_fail_next_rejects_non_error_status(emulator: StabilityEmulator) -> None:
    with pytest.raises(ValueError):
        emulator.fail_next(200)
    with pytest.raises(ValueError):
        emulator.fail_next(500, times=0)


def test_filter_next_v2(emulator: StabilityEmulator, client: httpx.Client) -> None:
    render = image_bytes(512, 512)
    clean = v2_post(client, "control/structure", {"prompt": "p", "seed": "5"}, render)
    emulator.filter_next()
    filtered = v2_post(client, "control/structure", {"prompt": "p", "seed": "5"}, render)
    assert filtered.status_code == 200
    assert filtered.headers["finish-reason"] == "CONTENT_FILTERED"
    assert filtered.headers["seed"] == "5"
    blurred = decode(filtered.content)
    assert blurred.size == (512, 512)
    assert sharpest_edge(blurred) < sharpest_edge(decode(clean.content)) / 5
    emulator.filter_next()
    as_json = v2_post(client, "generate/core", {"prompt": "p"}, headers=JSON).json()
    assert as_json["finish_reason"] == "CONTENT_FILTERED"
    assert v2_post(client, "generate/core", {"prompt": "p"}).headers["finish-reason"] == "SUCCESS"


def test_filter_next_v1_counts_images(emulator: StabilityEmulator, client: httpx.Client) -> None:
    emulator.filter_next(times=1)
    body = {"text_prompts": [{"text": "p"}], "samples": 2}
    artifacts = client.post(f"{SDXL}/text-to-image", json=body).json()["artifacts"]
    assert [a["finishReason"] for a in artifacts] == ["CONTENT_FILTERED", "SUCCESS"]
    emulator.filter_next()
    png = client.post(f"{SDXL}/text-to-image", json={**body, "samples": 1}, headers={"accept": "image/png"})
    assert png.status_code == 200 and png.headers["finish-reason"] == "CONTENT_FILTERED"


# --- recordings --------------------------------------------------------------------------------------------------


def test_recordings_capture_fields_and_files_and_redact_the_key(
    emulator: StabilityEmulator, client: httpx.Client
) -> None:
    render = image_bytes(300, 200)
    response = v2_post(
        client,
        "control/structure",
        {"prompt": "a knight", "control_strength": "0.7"},
        render,
        headers={"Stability-Client-ID": "podq", "Stability-Client-Version": "0.1.0"},
    )
    assert response.status_code == 200
    (record,) = emulator.requests
    assert record.method == "POST" and record.path == f"{V2}/control/structure"
    assert record.status == 200 and record.auth_ok
    assert record.headers["authorization"] == "Bearer [redacted]"
    assert KEY not in repr(record)
    assert record.headers["stability-client-id"] == "podq"
    assert record.content_type is not None and record.content_type.startswith("multipart/form-data; boundary=")
    assert record.fields == {"prompt": "a knight", "control_strength": "0.7"}
    image = record.files["image"]
    assert (image.filename, image.content_type, image.size) == ("render.png", "image/png", len(render))
    assert (image.width, image.height, image.image_format) == (300, 200, "PNG")
    assert len(image.sha256) == 64
    assert record.json_body is None and record.argv_with_secret == []
    assert record.ts.endswith("Z")

    emulator.reset()
    assert emulator.requests == []


def test_stability_client_headers_are_limited(client: httpx.Client) -> None:
    response = v2_post(client, "generate/core", {"prompt": "p"}, headers={"Stability-Client-ID": "x" * 257})
    assert assert_v2_error(response, 400, "bad_request")[0].startswith("stability-client-id: ")


def test_watch_argv_finds_a_secret_in_another_process() -> None:
    secret = f"sk-{uuid.uuid4().hex}"
    with StabilityEmulator(watch_argv_for=secret) as emu, httpx.Client(base_url=emu.base_url) as c:
        headers = {"Authorization": f"Bearer {secret}"}
        c.get("/v1/user/balance", headers=headers)
        assert emu.requests[-1].argv_with_secret == []

        leaky = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)", secret])
        try:
            c.get("/v1/user/balance", headers=headers)
        finally:
            leaky.kill()
            leaky.wait()
        (line,) = emu.requests[-1].argv_with_secret
        assert line.endswith("import time; time.sleep(5) [secret]")
        assert secret not in line

        c.get("/v1/user/balance", headers=headers)
        assert emu.requests[-1].argv_with_secret == []


# --- control over HTTP -------------------------------------------------------------------------------------------


def test_http_control_endpoints(emulator: StabilityEmulator, client: httpx.Client) -> None:
    with httpx.Client(base_url=emulator.base_url) as control:  # no key: control needs none
        assert control.post("/_emulator/fail", json={"status": 429, "times": 2, "path": None}).json() == {"ok": True}
        assert control.post("/_emulator/filter", json={"times": 1}).status_code == 200

        assert v2_post(client, "generate/core", {"prompt": "p"}).status_code == 429
        assert v2_post(client, "generate/core", {"prompt": "p"}).status_code == 429
        filtered = v2_post(client, "generate/core", {"prompt": "p"})
        assert filtered.status_code == 200 and filtered.headers["finish-reason"] == "CONTENT_FILTERED"

        recorded = control.get("/_emulator/requests").json()
        assert [r["status"] for r in recorded] == [429, 429, 200]
        assert recorded[0]["headers"]["authorization"] == "Bearer [redacted]"
        assert recorded[0]["fields"] == {"prompt": "p", "none": ""}
        assert recorded[0]["path"] == f"{V2}/generate/core"

        assert control.post("/_emulator/fail", json={"status": 503, "path": f"{SDXL}/text-to-image"}).status_code == 200
        assert control.post("/_emulator/reset").json() == {"ok": True}
        assert control.get("/_emulator/requests").json() == []
        # reset dropped the queued failure too.
        assert client.post(f"{SDXL}/text-to-image", json={"text_prompts": [{"text": "p"}]}).status_code == 200

        assert control.post("/_emulator/fail", json={"status": "x"}).status_code == 400
        assert control.post("/_emulator/fail", json={"status": 200}).status_code == 400
        assert control.get("/_emulator/nothing").status_code == 404
    # Control calls are never recorded.
    assert [r.path for r in emulator.requests] == [f"{SDXL}/text-to-image"]


def test_main_serves_until_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.stability.emulator", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("podq Stability API emulator (not the real API) serving at http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[1].strip()
        assert httpx.get(f"{base_url}/_emulator/requests").json() == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
