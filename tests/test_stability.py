"""Stability jobs against podq's emulator of the API (no internet here): the client's requests follow the
contract, errors map to stable codes with retries only where allowed, the key never leaks, and the whole
pipeline (render -> stylize -> manifest) runs end to end on `local` and over SSH."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

from agent import config as config_mod
from agent import logs
from agent.config import SHIPPED_SCRIPTS, Config
from agent.daemon import BackgroundDaemon
from agent.results import Event, ResultLine
from agent.stability.emulator import StabilityEmulator
from clients.stability_client import ENDPOINTS, Params, Retries, StabilityClient, StabilityError, prepare_image
from tests.conftest import all_results, local_host_toml, put, ssh_host_toml, wait_terminal
from tests.sshd import SSHServer

KEY = "sk-podq-test-0123456789abcdefghijklmnop"
needs_blender = pytest.mark.skipif(shutil.which("blender") is None, reason="needs Blender (.ci/run installs it)")


@pytest.fixture
def emulator() -> Iterator[StabilityEmulator]:
    with StabilityEmulator(api_keys={KEY}, watch_argv_for=KEY) as emu:
        yield emu


@pytest.fixture
def render_png(tmp_path: Path) -> Path:
    path = tmp_path / "base_0001.png"
    image = Image.new("RGB", (96, 128), (40, 90, 160))
    for x in range(20, 70):
        for y in range(30, 110):
            image.putpixel((x, y), (230, 180, 140))
    image.save(path)
    return path


def no_sleep() -> Retries:
    waits: list[float] = []
    retries = Retries(attempts=3, backoff_s=0.5, rate_limit_wait_s=60, sleep=waits.append)
    retries.waits = waits  # type: ignore[attr-defined]
    return retries


# -- the client against the contract --------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_each_endpoint_sends_what_the_contract_says(
    endpoint: str, emulator: StabilityEmulator, render_png: Path
) -> None:
    spec = ENDPOINTS[endpoint]
    params = Params(endpoint=endpoint, prompt="a knight in armour", negative_prompt="blurry", seed=42,
                    style_preset="fantasy-art")
    init = prepare_image(render_png, spec) if spec.image != "none" else None
    with StabilityClient(KEY, emulator.base_url, retries=no_sleep()) as client:
        variants = client.generate(params, init)
    assert len(variants) == 1 and variants[0].finish_reason == "SUCCESS"
    got = Image.open(io.BytesIO(variants[0].image))
    if init is not None:
        assert got.size == init.size  # image-to-image and control keep the (adjusted) input's size
    (recorded,) = emulator.requests
    assert recorded.method == "POST" and recorded.path == spec.path and recorded.status == 200
    assert recorded.auth_ok and recorded.headers["authorization"] == "Bearer [redacted]"
    assert recorded.headers["stability-client-id"] == "podq" and recorded.headers["stability-client-version"]
    if spec.json_body:
        body: Any = recorded.json_body
        assert body["text_prompts"] == [{"text": "a knight in armour", "weight": 1.0},
                                        {"text": "blurry", "weight": -1.0}]
        assert (body["width"], body["height"]) == (1024, 1024) and body["seed"] == 42
        return
    # multipart, with the boundary the HTTP library chose (never a hand-set Content-Type)
    assert recorded.content_type.startswith("multipart/form-data; boundary=")
    if spec.generation == 1:
        assert recorded.fields["text_prompts[0][text]"] == "a knight in armour"
        assert recorded.fields["text_prompts[1][weight]"] == "-1.0"
        init_file = recorded.files["init_image"]
        assert (init_file.width, init_file.height) == (896, 1152)  # 96x128 scaled and padded to an SDXL size
    else:
        assert recorded.fields["prompt"] == "a knight in armour" and recorded.fields["seed"] == "42"
        assert recorded.fields["negative_prompt"] == "blurry" and recorded.fields["style_preset"] == "fantasy-art"
        assert ("image" in recorded.files) == (init is not None)


def test_sdxl_init_image_is_resized_and_padded_and_says_so(render_png: Path) -> None:
    init = prepare_image(render_png, ENDPOINTS["sdxl/image-to-image"])
    assert init.original_size == (96, 128) and init.size == (896, 1152) and init.adjusted == "resized+padded"
    same = prepare_image(render_png, ENDPOINTS["control/structure"])
    assert same.size == (96, 128) and same.adjusted is None


def test_both_response_shapes_and_several_samples(emulator: StabilityEmulator, render_png: Path) -> None:
    with StabilityClient(KEY, emulator.base_url, retries=no_sleep()) as client:
        structure = prepare_image(render_png, ENDPOINTS["control/structure"])
        v2_json = client.generate(Params(prompt="x", accept="json", seed=7), structure)
        v1 = client.generate(Params(endpoint="sdxl/image-to-image", prompt="x", variants=3),
                             prepare_image(render_png, ENDPOINTS["sdxl/image-to-image"]))
        v1_png = client.generate(Params(endpoint="sdxl/image-to-image", prompt="x", seed=5),
                                 prepare_image(render_png, ENDPOINTS["sdxl/image-to-image"]))
    assert v2_json[0].seed == 7 and Image.open(io.BytesIO(v2_json[0].image)).size == (96, 128)
    assert len(v1) == 3 and len({v.image for v in v1}) == 3
    assert emulator.requests[1].headers["accept"] == "application/json"  # samples > 1 only come as JSON
    assert v1_png[0].seed == 5 and emulator.requests[2].headers["accept"] == "image/png"


@pytest.mark.parametrize(
    ("status", "code", "requests"),
    [(401, "auth", 1), (402, "credits", 1), (403, "moderation", 1), (413, "too_large", 1),
     (422, "invalid_request", 1), (429, "rate_limited", 3), (500, "server_error", 3), (503, "server_error", 3)],
)
def test_errors_map_to_codes_and_only_retryable_ones_are_retried(
    status: int, code: str, requests: int, emulator: StabilityEmulator, render_png: Path
) -> None:
    emulator.fail_next(status, times=5)
    retries = no_sleep()
    with StabilityClient(KEY, emulator.base_url, retries=retries) as client, pytest.raises(StabilityError) as info:
        client.generate(Params(prompt="x"), prepare_image(render_png, ENDPOINTS["control/structure"]))
    assert info.value.code == code and info.value.status == status
    assert len(emulator.requests) == requests  # counted at the emulator
    if status == 429:
        assert retries.waits == [60, 60]  # type: ignore[attr-defined]  # the API's 60 s time-out window
    elif status >= 500:
        assert retries.waits == [0.5, 1.0]  # type: ignore[attr-defined]  # exponential back-off


def test_a_transient_failure_recovers_and_a_wrong_key_is_auth(emulator: StabilityEmulator, render_png: Path) -> None:
    emulator.fail_next(500, times=1)
    with StabilityClient(KEY, emulator.base_url, retries=no_sleep()) as client:
        assert client.generate(Params(prompt="x"), prepare_image(render_png, ENDPOINTS["control/structure"]))
    assert [r.status for r in emulator.requests] == [500, 200]
    with StabilityClient("sk-wrong", emulator.base_url, retries=no_sleep()) as client, \
            pytest.raises(StabilityError) as info:
        client.generate(Params(prompt="x"), prepare_image(render_png, ENDPOINTS["control/structure"]))
    assert info.value.code == "auth" and len(emulator.requests) == 3


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"prompt": ""}, "prompt is required"), ({"prompt": "x" * 2001, "endpoint": "sdxl/image-to-image"}, "2000"),
     ({"prompt": "x", "steps": 5, "endpoint": "sdxl/image-to-image"}, "steps"),
     ({"prompt": "x", "cfg_scale": 40, "endpoint": "sdxl/image-to-image"}, "cfg_scale"),
     ({"prompt": "x", "strength": 1.5}, "strength"), ({"prompt": "x", "seed": 2**32}, "seed"),
     ({"prompt": "x", "variants": 11}, "variants"), ({"prompt": "x", "style_preset": "ugly"}, "style_preset"),
     ({"prompt": "x", "endpoint": "sdxl/text-to-image", "width": 1000, "height": 1000}, "SDXL size")],
)
def test_bad_parameters_fail_before_any_request(params: dict[str, Any], needle: str, emulator: StabilityEmulator,
                                                render_png: Path) -> None:
    with StabilityClient(KEY, emulator.base_url, retries=no_sleep()) as client, pytest.raises(StabilityError) as info:
        spec = ENDPOINTS[params.get("endpoint", "control/structure")]
        client.generate(Params(**params), prepare_image(render_png, spec) if spec.image != "none" else None)
    assert info.value.code == "invalid_request" and needle in info.value.message
    assert emulator.requests == []


def test_a_parameter_the_endpoint_does_not_take_is_refused_not_dropped() -> None:
    from agent.commands.stability import check_stylize
    from agent.errors import RequestError
    from agent.requests import StylizeParams

    with pytest.raises(RequestError, match="steps is not a parameter of control/structure"):
        check_stylize(StylizeParams(prompt="x", steps=30))
    check_stylize(StylizeParams(prompt="x", steps=30, endpoint="sdxl/image-to-image"))
    with pytest.raises(StabilityError, match="control_strength is not a parameter of sdxl/image-to-image"):
        Params(endpoint="sdxl/image-to-image", prompt="x", control_strength=0.5).check()


# -- through the daemon ---------------------------------------------------------------------------------------


def stability_config(make_config: Callable[..., Config], host_block: str, tmp_path: Path, **stability: Any) -> Config:
    config = make_config(host_block)
    assert config.source is not None
    settings = {"python": sys.executable, "backoff_s": 0, "rate_limit_wait_s": 0, **stability}
    lines = "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in settings.items())
    scripts = tmp_path / "scripts"
    if not scripts.exists():
        shutil.copytree(SHIPPED_SCRIPTS, scripts, ignore=shutil.ignore_patterns("*.md", "__pycache__"))
    config.source.write_text(f'[stability]\n{lines}\n[blender]\nscripts_dir = "{scripts}"\n'
                             + config.source.read_text())
    return config_mod.load(config.source)


def local_config(make_config: Callable[..., Config], tmp_path: Path, **stability: Any) -> Config:
    (tmp_path / "workspace").mkdir(exist_ok=True)
    return stability_config(make_config, local_host_toml(tmp_path / "workspace"), tmp_path, **stability)


def variants_of(result: ResultLine) -> list[dict[str, Any]]:
    return list((result.output or {}).get("variants", []))


def test_stability_generate_with_a_real_key_leaks_it_nowhere(
    make_config: Callable[..., Config], tmp_path: Path, emulator: StabilityEmulator, render_png: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    config = local_config(make_config, tmp_path, base_url=emulator.base_url, emulator="never")
    ws = Path(str(config.hosts[0].workspace))
    (ws / "renders").mkdir()
    shutil.copy(render_png, ws / "renders" / "base_0001.png")
    logs.configure(config.queue.dir / "podq.log")  # the daemon's JSON log file, as `podq run` writes it
    with BackgroundDaemon(config):
        put(config, id="sg", type="stability_generate", inputs=["renders/base_0001.png"], download=True,
            stylize={"prompt": "a knight", "variants": 2, "seed": 11, "control_strength": 0.6})
        wait_terminal(config, {"sg"}, timeout_s=60)
        emulator.fail_next(500, times=8)
        put(config, id="down", type="stability_generate", inputs=["renders/base_0001.png"],
            stylize={"prompt": "a knight"})
        results = wait_terminal(config, {"sg", "down"}, timeout_s=60)
    ok = results["sg"]
    assert ok.event == Event.SUCCEEDED, ok
    assert ok.output is not None and ok.output["emulated"] is False and len(variants_of(ok)) == 2
    for a in ok.output["artifacts"]:
        assert hashlib.sha256(Path(a["local_path"]).read_bytes()).hexdigest() == a["sha256"]
    manifest = orjson.loads(Path(next(a["local_path"] for a in ok.output["artifacts"]
                                      if a["path"].endswith("_v01.json"))).read_bytes())
    assert manifest["prompt"] == "a knight" and manifest["seed"] == 11 and manifest["endpoint"] == "control/structure"
    assert manifest["input"]["path"] == "renders/base_0001.png"
    assert manifest["input"]["sha256"] == hashlib.sha256(render_png.read_bytes()).hexdigest()
    assert manifest["parameters"]["control_strength"] == 0.6 and manifest["finish_reason"] == "SUCCESS"
    assert manifest["request_id"] and manifest["timings"]["request_s"] >= 0
    failed = results["down"]
    assert failed.event == Event.FAILED and failed.error.code == "server_error"  # type: ignore[union-attr]
    assert failed.output["api_attempts"] == 4  # type: ignore[index]  # [stability] attempts, the default

    assert emulator.requests and all(r.auth_ok for r in emulator.requests)
    assert all(r.argv_with_secret == [] for r in emulator.requests), "the key was in a process's argv"
    logs.configure(None)
    assert "request.finished" in (config.queue.dir / "podq.log").read_text()
    for path in (config.results_path, config.queue.dir / "podq.log", config.requests_path):
        assert KEY not in path.read_text(errors="replace")
    for folder in (ws, config.artifacts.dir):
        for file in folder.rglob("*"):
            if file.is_file():
                assert KEY.encode() not in file.read_bytes(), file


def test_an_input_that_links_out_of_the_workspace_is_never_sent(
    make_config: Callable[..., Config], tmp_path: Path, render_png: Path
) -> None:
    config = local_config(make_config, tmp_path)
    ws = Path(str(config.hosts[0].workspace))
    (ws / "renders").mkdir()
    (ws / "renders" / "sneaky.png").symlink_to(render_png)  # render_png lies outside the workspace
    with BackgroundDaemon(config) as bg:
        put(config, id="sneak", type="stability_generate", inputs=["renders/sneaky.png"], stylize={"prompt": "x"})
        result = wait_terminal(config, {"sneak"}, timeout_s=60)["sneak"]
        emulator = bg.daemon._emulator
        assert emulator is not None and emulator.requests == []
    assert result.event == Event.FAILED and result.error.code == "not_allowed"  # type: ignore[union-attr]


def test_content_filtered_is_never_a_clean_success(
    make_config: Callable[..., Config], tmp_path: Path, render_png: Path
) -> None:
    config = local_config(make_config, tmp_path)  # no key: podq's own emulator
    ws = Path(str(config.hosts[0].workspace))
    (ws / "renders").mkdir()
    shutil.copy(render_png, ws / "renders" / "base_0001.png")
    with BackgroundDaemon(config) as bg:
        emulator = bg.daemon._emulator
        assert emulator is not None
        emulator.filter_next(times=1)
        put(config, id="cf", type="stability_generate", inputs=["renders/base_0001.png"],
            stylize={"prompt": "x", "variants": 2})
        result = wait_terminal(config, {"cf"}, timeout_s=60)["cf"]
    assert result.event == Event.FAILED and result.error.code == "content_filtered"  # type: ignore[union-attr]
    assert [v["finish_reason"] for v in variants_of(result)] == ["CONTENT_FILTERED", "SUCCESS"]
    assert result.output["emulated"] is True  # type: ignore[index]
    assert len(result.output["artifacts"]) == 4  # type: ignore[index]  # the good variant is still delivered


@needs_blender
@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_character_end_to_end(
    kind: str, make_config: Callable[..., Config], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "ssh":  # the emulator runs here; the pod reaches it through a port forwarded over SSH
        server: SSHServer = request.getfixturevalue("sshd")
        config = stability_config(make_config, ssh_host_toml(server), tmp_path)
    else:
        config = local_config(make_config, tmp_path)
    with BackgroundDaemon(config):
        put(config, id="hero", type="character", download=True,
            render={"args": {"subject": "character", "pose": "walking", "resolution": [96, 128], "samples": 4}},
            stylize={"prompt": "a paladin, comic book style", "variants": 2, "seed": 3})
        result = wait_terminal(config, {"hero"}, timeout_s=120)["hero"]
    assert result.event == Event.SUCCEEDED, result
    output = result.output or {}
    assert output["emulated"] is True
    by_path = {a["path"]: a for a in output["artifacts"]}
    for a in output["artifacts"]:
        assert hashlib.sha256(Path(a["local_path"]).read_bytes()).hexdigest() == a["sha256"]
    manifest = orjson.loads(Path(by_path[output["manifest"]]["local_path"]).read_bytes())
    assert manifest["scene"]["args"]["pose"] == "walking" and manifest["emulated"] is True
    (base,) = manifest["base_renders"]
    assert base["sha256"] == by_path[base["path"]]["sha256"]
    sidecar = orjson.loads(Path(by_path[base["sidecar"]]["local_path"]).read_bytes())
    assert sidecar["args"]["pose"] == "walking"
    assert len(base["variants"]) == 2
    for variant in base["variants"]:
        image = by_path[variant["image"]]
        assert Image.open(image["local_path"]).size == (96, 128)
        variant_manifest = orjson.loads(Path(by_path[variant["manifest"]]["local_path"]).read_bytes())
        assert variant_manifest["input"]["sha256"] == base["sha256"]
        assert variant_manifest["output"]["sha256"] == image["sha256"] and variant_manifest["emulated"] is True
    progress = [line.progress for line in all_results(config) if line.event == Event.PROGRESS and line.progress]
    assert {p.get("stage") for p in progress} >= {"scripts_synced", "stylize"}


AIR_STANDIN = """
import bpy, sys
class AIRProps(bpy.types.PropertyGroup):
    prompt_text: bpy.props.StringProperty()
    negative_prompt_text: bpy.props.StringProperty()
    image_similarity: bpy.props.FloatProperty(default=0.4)
    cfg_scale: bpy.props.FloatProperty(default=7.0)
    steps: bpy.props.IntProperty(default=30)
    seed: bpy.props.IntProperty(default=123)
    use_random_seed: bpy.props.BoolProperty(default=False)
    sampler: bpy.props.StringProperty(default="K_EULER")
    sd_model: bpy.props.StringProperty(default="sdxl")
    do_autosave_after_images: bpy.props.BoolProperty(default=False)
    autosave_image_path: bpy.props.StringProperty()
scene = bpy.context.scene
if sys.argv[-1] == "with-props":  # as if AI Render were installed: its settings saved with the scene
    bpy.utils.register_class(AIRProps)
    bpy.types.Scene.air_props = bpy.props.PointerProperty(type=AIRProps)
    p = scene.air_props
    p.prompt_text, p.negative_prompt_text, p.image_similarity = "a bronze statue of a cube", "text", 0.4
    p.cfg_scale, p.steps, p.seed, p.use_random_seed, p.sampler = 7.0, 30, 123, False, "K_EULER"
    p.sd_model, p.do_autosave_after_images, p.autosave_image_path = "sdxl", False, "/tmp/"
scene.render.engine = "CYCLES"
scene.cycles.samples = 2
scene.render.resolution_x = 64
scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-2])
"""


@needs_blender
def test_ai_render_with_and_without_ai_render_settings(make_config: Callable[..., Config], tmp_path: Path) -> None:
    import subprocess

    config = local_config(make_config, tmp_path)
    ws = Path(str(config.hosts[0].workspace))
    (ws / "scenes").mkdir()
    (tmp_path / "standin.py").write_text(AIR_STANDIN)
    for name, mode in (("with.blend", "with-props"), ("without.blend", "plain")):
        subprocess.run(["blender", "--background", "--factory-startup", "--python-exit-code", "1", "--python",
                        str(tmp_path / "standin.py"), "--", str(ws / "scenes" / name), mode],
                       check=True, capture_output=True)
    with BackgroundDaemon(config):
        put(config, id="air", type="ai_render", blend="scenes/with.blend", download=True)
        put(config, id="noprompt", type="ai_render", blend="scenes/without.blend")
        put(config, id="args", type="ai_render", blend="scenes/without.blend",
            stylize={"prompt": "a glass cube", "steps": 20})
        # Scene settings a control endpoint does not take (steps, strength...) stay with the scene.
        put(config, id="control", type="ai_render", blend="scenes/with.blend",
            stylize={"endpoint": "control/structure"})
        results = wait_terminal(config, {"air", "noprompt", "args", "control"}, timeout_s=120)
        put(config, id="last", type="ai_render", stylize={"prompt": "from the last render"})
        results |= wait_terminal(config, {"last"}, timeout_s=120)
    air = results["air"]
    assert air.event == Event.SUCCEEDED, air
    output = air.output or {}
    assert output["settings_from"] == "scene data" and output["emulated"] is True
    assert output["ai_render_settings"]["prompt_text"] == "a bronze statue of a cube"
    by_path = {a["path"]: a for a in output["artifacts"]}
    manifest = orjson.loads(Path(by_path[output["variants"][0]["manifest"]]["local_path"]).read_bytes())
    assert manifest["prompt"] == "a bronze statue of a cube" and manifest["negative_prompt"] == "text"
    assert manifest["endpoint"] == "sdxl/image-to-image" and manifest["seed"] == 123
    assert manifest["parameters"]["strength"] == 0.6 and manifest["parameters"]["steps"] == 30
    assert manifest["input"]["adjusted"] == "resized"  # 64x64 render -> 1024x1024 SDXL size
    assert results["noprompt"].event == Event.FAILED
    assert results["noprompt"].error.code == "invalid_request"  # type: ignore[union-attr]
    assert "no prompt" in results["noprompt"].error.message  # type: ignore[union-attr]
    args = results["args"]
    assert args.event == Event.SUCCEEDED and (args.output or {})["settings_from"] is None
    assert results["control"].event == Event.SUCCEEDED, results["control"]
    assert results["last"].event == Event.SUCCEEDED, results["last"]
    assert (results["last"].output or {})["input"].startswith("renders/ai_base_")
    assert os.environ.get("STABILITY_API_KEY") is None


def test_a_registered_key_is_scrubbed_from_tracebacks_logs_and_result_lines(tmp_path: Path) -> None:
    import structlog

    from agent import secrets
    from agent.journal import ResultsJournal
    from agent.results import ResultLine, now

    secret = "sk-scrub-me-0123456789abcdef"
    secrets.register(secret)
    logs.configure(tmp_path / "podq.log")
    try:
        raise RuntimeError(f"the client crashed holding {secret}")
    except RuntimeError:
        structlog.get_logger("test").exception("client.crashed", detail=f"key={secret}")
    logs.configure(None)
    logged = (tmp_path / "podq.log").read_text()
    assert "RuntimeError" in logged and "[redacted]" in logged and secret not in logged

    journal = ResultsJournal(tmp_path / "results.jsonl")
    journal.append(ResultLine(id="x", event=Event.FAILED, ts=now(), type="ping", host="h",
                              stderr=f"Traceback ...\nValueError: bad key {secret}\n"))
    journal.close()
    assert secret not in (tmp_path / "results.jsonl").read_text()


def test_client_edges_found_in_review(emulator: StabilityEmulator, tmp_path: Path) -> None:
    # Shrinking a wide input keeps it inside the 2.5:1 the API allows.
    wide = tmp_path / "wide.png"
    Image.new("RGB", (5000, 2000), (90, 90, 90)).save(wide)
    init = prepare_image(wide, ENDPOINTS["control/structure"])
    assert init.size[0] / init.size[1] <= 2.5 and init.size[0] * init.size[1] <= 9_437_184
    with StabilityClient(KEY, emulator.base_url, retries=no_sleep()) as client:
        assert client.generate(Params(prompt="x"), init)[0].finish_reason == "SUCCESS"
    # A portrait image and its landscape twin pick mirrored SDXL sizes.
    from clients.stability_client import nearest_sdxl_size

    for w, h in ((2060, 1000), (1300, 1000), (1024, 1000)):
        assert nearest_sdxl_size(h, w) == nearest_sdxl_size(w, h)[::-1]
    # A parameter that only applies without an input is refused with one, not dropped.
    with StabilityClient(KEY, emulator.base_url, retries=no_sleep()) as client, pytest.raises(StabilityError):
        client.generate(Params(endpoint="generate/sd3", prompt="x", aspect_ratio="16:9"),
                        prepare_image(wide, ENDPOINTS["generate/sd3"]))


def test_a_request_sent_but_unanswered_is_not_repeated(tmp_path: Path) -> None:
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    received: list[bytes] = []

    def swallow() -> None:  # reads requests, never answers: the API may be generating (and billing) them
        server.settimeout(3)
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                received.append(conn.recv(65536))

    threading.Thread(target=swallow, daemon=True).start()
    port = server.getsockname()[1]
    with StabilityClient(KEY, f"http://127.0.0.1:{port}", timeout_s=0.3, retries=no_sleep()) as client, \
            pytest.raises(StabilityError) as info:
        client.generate(Params(endpoint="generate/core", prompt="x"), None)
    server.close()
    assert info.value.code == "network" and "may have been generated" in info.value.message
    assert len(received) == 1


@needs_blender
def test_a_character_sheet_renders_the_character_by_default(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = local_config(make_config, tmp_path)
    with BackgroundDaemon(config):
        put(config, id="sheet", type="character", download=True,
            render={"script": "generate_pose_scene.py", "args": {"views": 2, "resolution": [64, 64], "samples": 2}},
            stylize={"prompt": "a knight"})
        result = wait_terminal(config, {"sheet"}, timeout_s=120)["sheet"]
    assert result.event == Event.SUCCEEDED, result
    sidecars = [orjson.loads(Path(a["local_path"]).read_bytes()) for a in (result.output or {})["artifacts"]
                if a["path"].startswith("renders/") and a["path"].endswith(".json")]
    assert len(sidecars) == 2 and {s["args"]["subject"] for s in sidecars} == {"character"}
    assert len(variants_of(result)) == 2  # one per view
