"""Blender render jobs end to end: real Blender (Debian's 3.4), through the daemon, on `local` and over a real
sshd. Small resolutions and few samples keep each render around a second or two."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image, ImageChops, ImageStat

from agent.config import SHIPPED_SCRIPTS, Config
from agent.daemon import BackgroundDaemon
from agent.results import Event, ResultLine
from tests.conftest import all_results, events_of, local_host_toml, put, ssh_host_toml, wait_terminal
from tests.sshd import SSHServer

pytestmark = pytest.mark.skipif(shutil.which("blender") is None, reason="needs Blender (bash .ci/run installs it)")

SMALL = {"resolution": [96, 96], "samples": 4}


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    """A private copy of the shipped scripts (tests edit them)."""
    folder = tmp_path / "scripts"
    shutil.copytree(SHIPPED_SCRIPTS, folder, ignore=shutil.ignore_patterns("*.md", "__pycache__"))
    return folder


def _config(make_config: Callable[..., Config], scripts: Path, host_block: str) -> Config:
    config = make_config(host_block)
    text = config.source.read_text()  # type: ignore[union-attr]
    config.source.write_text(f'[blender]\nscripts_dir = "{scripts}"\n' + text)  # type: ignore[union-attr]
    from agent import config as config_mod

    return config_mod.load(config.source)


@pytest.fixture(params=["local", "ssh"])
def render_config(
    request: pytest.FixtureRequest, make_config: Callable[..., Config], scripts: Path, tmp_path: Path
) -> Config:
    if request.param == "ssh":
        server: SSHServer = request.getfixturevalue("sshd")
        return _config(make_config, scripts, ssh_host_toml(server))
    (tmp_path / "workspace").mkdir()
    return _config(make_config, scripts, local_host_toml(tmp_path / "workspace"))


@pytest.fixture
def local_render(make_config: Callable[..., Config], scripts: Path, tmp_path: Path) -> Iterator[Config]:
    (tmp_path / "workspace").mkdir()
    config = _config(make_config, scripts, local_host_toml(tmp_path / "workspace"))
    with BackgroundDaemon(config):
        yield config


def render(config: Config, rid: str, timeout_s: float = 120, **fields: Any) -> ResultLine:
    put(config, id=rid, type="blender_render", script=fields.pop("script", "make_base_scene.py"), **fields)
    return wait_terminal(config, {rid}, timeout_s=timeout_s)[rid]


def artifact(result: ResultLine, suffix: str) -> dict[str, Any]:
    made = (result.output or {}).get("artifacts", [])
    return next(a for a in made if a["path"].endswith(suffix))


def image(result: ResultLine, suffix: str = ".png") -> Image.Image:
    a = artifact(result, suffix)
    return Image.open(a["local_path"])


def not_blank(img: Image.Image) -> bool:
    """Some pixels differ clearly from the corner (background) pixel."""
    rgb = img.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((0, 0)))
    diff = ImageChops.difference(rgb, background).convert("L")
    return sum(1 for v in diff.tobytes() if v > 24) > rgb.width * rgb.height * 0.02


def test_cube_and_character_render_with_sidecar_and_downloads(render_config: Config) -> None:
    with BackgroundDaemon(render_config):
        cube = render(render_config, "cube", args={"subject": "cube", **SMALL}, download=True)
        hero = render(render_config, "hero", args={"subject": "character", "pose": "t_pose", **SMALL,
                                                   "resolution": [80, 112]}, download=True)
    for result in (cube, hero):
        assert result.event == Event.SUCCEEDED, result
        assert events_of(render_config, result.id or "")[:2] == ["accepted", "started"]
        assert result.output is not None and result.output["script"] == "make_base_scene.py"
        for a in result.output["artifacts"]:  # downloaded, and the bytes are what the host hashed
            local = Path(a["local_path"])
            assert local.is_relative_to(render_config.artifacts.dir / (result.id or ""))
            assert hashlib.sha256(local.read_bytes()).hexdigest() == a["sha256"] and local.stat().st_size == a["size"]
    saved = [line.progress for line in all_results(render_config)
             if line.id == "hero" and line.event == Event.PROGRESS and (line.progress or {}).get("saved")]
    assert saved, "Blender's output streams back as progress, over SSH too"
    assert image(cube).size == (96, 96) and not_blank(image(cube))
    assert image(hero).size == (80, 112) and not_blank(image(hero))

    sidecar = orjson.loads(Path(artifact(hero, ".json")["local_path"]).read_bytes())
    assert sidecar["args"]["subject"] == "character" and sidecar["args"]["pose"] == "t_pose"
    assert sidecar["resolution"] == [80, 112] and sidecar["samples"] == 4
    assert sidecar["script_sha256"] == hero.output["script_sha256"]  # type: ignore[index]
    assert sidecar["script_sha256"] == hashlib.sha256(
        (Path(str(render_config.scripts_dir)) / "make_base_scene.py").read_bytes()).hexdigest()
    assert sidecar["blender_version"].startswith(("3.", "4.", "5."))
    assert sidecar["device"]["type"] in ("CPU", "GPU") and sidecar["engine"] == "CYCLES"
    assert sorted(sidecar["outputs"]) == sorted(a["path"] for a in hero.output["artifacts"])  # type: ignore[index]
    assert isinstance(sidecar["render_seconds"], float | int)


def test_views_alpha_passes_and_turnaround(local_render: Config) -> None:
    config = local_render
    front = render(config, "az0", args={"subject": "character", **SMALL, "camera": {"azimuth_deg": 0}},
                   download=True)
    side = render(config, "az90", args={"subject": "character", **SMALL, "camera": {"azimuth_deg": 90}},
                  download=True)
    difference = ImageChops.difference(image(front).convert("RGB"), image(side).convert("RGB"))
    assert max(ImageStat.Stat(difference).mean) > 1
    assert artifact(front, ".png")["sha256"] != artifact(side, ".png")["sha256"]

    clear = render(config, "alpha", args={"subject": "cube", **SMALL, "background": "transparent",
                                          "passes": ["depth", "normal", "mask"]}, download=True)
    rgba = image(clear, "base_0003.png")
    assert rgba.mode == "RGBA"
    alpha = rgba.getchannel("A")
    assert alpha.getpixel((0, 0)) == 0 and alpha.getpixel((48, 48)) == 255
    for name in ("depth", "normal", "mask"):
        assert image(clear, f"_{name}.png").size == (96, 96) and not_blank(image(clear, f"_{name}.png"))

    sheet = render(config, "sheet", script="generate_pose_scene.py", download=True,
                   args={"subject": "character", **SMALL, "views": 4, "pose": "a_pose"})
    assert sheet.event == Event.SUCCEEDED, sheet
    pngs = [a for a in sheet.output["artifacts"] if a["path"].endswith(".png")]  # type: ignore[index]
    assert len(pngs) == 4 and len({a["sha256"] for a in pngs}) == 4
    sidecars = [orjson.loads(Path(a["local_path"]).read_bytes())
                for a in sheet.output["artifacts"] if a["path"].endswith(".json")]  # type: ignore[index]
    assert sorted(s["azimuth_deg"] % 360 for s in sidecars) == [30, 120, 210, 300]


def test_editing_a_script_changes_what_runs_next(local_render: Config, scripts: Path) -> None:
    first = render(local_render, "v1", args={"subject": "cube", **SMALL})
    script = scripts / "make_base_scene.py"
    script.write_text(script.read_text() + "\n# edited by the assistant\n")
    second = render(local_render, "v2", args={"subject": "cube", **SMALL})
    assert first.event == second.event == Event.SUCCEEDED
    assert second.output["script_sha256"] == hashlib.sha256(script.read_bytes()).hexdigest()  # type: ignore[index]
    assert second.output["script_sha256"] != first.output["script_sha256"]  # type: ignore[index]
    synced = [line.progress for line in all_results(local_render)
              if line.id == "v2" and line.event == Event.PROGRESS and (line.progress or {}).get("stage")]
    assert synced[0]["uploaded"] == ["make_base_scene.py"]  # type: ignore[index]


def test_bad_args_never_start_blender(local_render: Config) -> None:
    for rid, fields in {
        "nosuch": {"script": "nope.py"},
        "zero": {"args": {"resolution": [0, 64]}},
        "huge": {"args": {"resolution": [100000, 64]}},
        "pose": {"args": {"subject": "character", "pose": "moonwalk"}},
        "escape": {"args": {"subject": "../../etc/model.obj"}},
    }.items():
        put(local_render, id=rid, type="blender_render", **{"script": "make_base_scene.py", **fields})
    results = wait_terminal(local_render, {"nosuch", "zero", "huge", "pose", "escape"})
    codes = {rid: r.error.code.value for rid, r in results.items()}  # type: ignore[union-attr]
    assert codes == {"nosuch": "not_allowed", "zero": "invalid_request", "huge": "invalid_request",
                     "pose": "invalid_request", "escape": "not_allowed"}
    assert all(events_of(local_render, rid) == ["rejected"] for rid in results)


def test_model_files_load_and_escapes_are_refused_on_the_host(local_render: Config) -> None:
    ws = Path(str(local_render.hosts[0].workspace))
    (ws / "models").mkdir()
    (ws / "models" / "wedge.obj").write_text(
        "v -1 -1 0\nv 1 -1 0\nv 1 1 0\nv -1 1 0\nv 0 0 1.5\n"
        "f 1 2 5\nf 2 3 5\nf 3 4 5\nf 4 1 5\nf 1 4 3 2\n"
    )
    (ws / "models" / "sneaky.obj").symlink_to(ws.parent / "outside.obj")
    (ws.parent / "outside.obj").write_text("v 0 0 0\n")
    wedge = render(local_render, "wedge", args={"subject": "models/wedge.obj", **SMALL}, download=True)
    assert wedge.event == Event.SUCCEEDED and not_blank(image(wedge))
    sneaky = render(local_render, "sneaky", args={"subject": "models/sneaky.obj", **SMALL})
    assert sneaky.event == Event.FAILED and sneaky.error.code == "not_allowed"  # type: ignore[union-attr]
    missing = render(local_render, "missing", args={"subject": "models/nope.glb", **SMALL})
    assert missing.event == Event.FAILED and missing.error.code == "not_found"  # type: ignore[union-attr]


def test_a_script_that_raises_fails_with_its_traceback(local_render: Config, scripts: Path) -> None:
    (scripts / "broken.py").write_text("import bpy\n\ndef main():\n    1 / 0\n\nmain()\n")
    result = render(local_render, "boom", script="broken.py")
    assert result.event == Event.FAILED and result.error.code == "nonzero_exit"  # type: ignore[union-attr]
    assert result.exit_code != 0
    assert "ZeroDivisionError" in result.error.message  # type: ignore[union-attr]
    assert "Traceback" in (result.stderr or "") + (result.stdout or "")


def test_a_render_killed_before_its_timeout_is_a_failure(local_render: Config, scripts: Path) -> None:
    (scripts / "oom.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer\n")
    result = render(local_render, "oom", script="oom.py")
    assert result.event == Event.FAILED and result.error.code == "nonzero_exit"  # type: ignore[union-attr]
    assert result.exit_code == 137


def test_progress_arrives_during_a_longer_render_then_fetch(local_render: Config) -> None:
    result = render(local_render, "long", args={"subject": "character", "resolution": [160, 160], "samples": 256})
    assert result.event == Event.SUCCEEDED, result
    progress = [line.progress for line in all_results(local_render)
                if line.id == "long" and line.event == Event.PROGRESS and line.progress]
    fractions = [p["fraction"] for p in progress if "stage" not in p and "saved" not in p]
    assert len(fractions) >= 2 and fractions == sorted(fractions) and 0 < fractions[-1] <= 1
    assert any("saved" in p for p in progress)
    assert all("local_path" not in a for a in result.output["artifacts"])  # type: ignore[index]

    put(local_render, id="get", type="fetch", from_job="long")
    put(local_render, id="get2", type="fetch", paths=[artifact(result, ".json")["path"]])
    put(local_render, id="get3", type="fetch", from_job="nope")
    put(local_render, id="get4", type="fetch", paths=["renders/outside_view.png"])  # missing, despite its name
    fetched = wait_terminal(local_render, {"get", "get2", "get3", "get4"})
    assert fetched["get4"].error.code == "not_found"  # type: ignore[union-attr]
    assert fetched["get"].event == Event.SUCCEEDED
    for a in fetched["get"].output["artifacts"]:  # type: ignore[index]
        assert hashlib.sha256(Path(a["local_path"]).read_bytes()).hexdigest() == a["sha256"]
    assert {a["sha256"] for a in fetched["get"].output["artifacts"]} == {  # type: ignore[index]
        a["sha256"] for a in result.output["artifacts"]}  # type: ignore[index]
    assert fetched["get2"].output["artifacts"][0]["path"].endswith(".json")  # type: ignore[index]
    assert fetched["get3"].error.code == "not_found"  # type: ignore[union-attr]
    assert fetched["get3"].exit_code is None and fetched["get"].exit_code is None  # fetch runs no command


def test_renders_running_at_once_never_share_a_name(local_render: Config) -> None:
    for i in range(3):
        put(local_render, id=f"same{i}", type="blender_render", script="make_base_scene.py",
            args={"subject": "cube", **SMALL})
    results = wait_terminal(local_render, {"same0", "same1", "same2"})
    pngs = {artifact(r, ".png")["path"] for r in results.values()}
    assert len(pngs) == 3, pngs
