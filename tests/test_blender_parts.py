"""The Blender seam without Blender: script arguments, the argv, the scripts allowlist, reading the output,
and syncing the scripts folder (changed files only) to a host."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from agent.blender.output import BlenderOutput
from agent.blender.scripts import ScriptLibrary
from agent.blender.sync import sync_scripts
from agent.commands import plan
from agent.commands.base import Target
from agent.config import SHIPPED_SCRIPTS
from agent.errors import ErrorCode, RequestError
from agent.hosts import LocalHost
from agent.requests import parse_line


def render_request(**fields: object) -> bytes:
    return orjson.dumps({"type": "blender_render", "script": "make_base_scene.py", **fields})


TARGET = Target("/workspace", blender="/opt/blender/blender", scripts=ScriptLibrary(SHIPPED_SCRIPTS))


def test_argv_is_exact_and_carries_validated_args() -> None:
    request = parse_line(render_request(args={"subject": "character", "pose": "t_pose", "resolution": [512, 768]}))
    invocation = plan(request, TARGET)
    assert invocation.argv[:9] == (
        "/opt/blender/blender", "--background", "--factory-startup", "--python-exit-code", "1",
        "--python", "/workspace/blender_scripts/make_base_scene.py", "--", "--args-json",
    )
    args = orjson.loads(invocation.argv[9])
    assert args["subject"] == "character" and args["pose"] == "t_pose" and args["resolution"] == [512, 768]
    assert args["workspace"] == "/workspace"
    assert args["samples"] == 32 and args["camera"]["azimuth_deg"] == 30  # defaults filled in
    assert invocation.timeout_s == 1800


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"script": "rm_rf.py"}, ErrorCode.NOT_ALLOWED, "not in the scripts folder"),
        ({"script": "../make_base_scene.py"}, ErrorCode.INVALID_REQUEST, "`script`"),
        ({"args": {"resolution": [0, 512]}}, ErrorCode.INVALID_REQUEST, "`args.resolution.0`"),
        ({"args": {"resolution": [100000, 100000]}}, ErrorCode.INVALID_REQUEST, "`args.resolution.0`"),
        ({"args": {"resolution": [512]}}, ErrorCode.INVALID_REQUEST, "`args.resolution`"),
        ({"args": {"pose": "moonwalk"}}, ErrorCode.INVALID_REQUEST, "`args.pose`"),
        ({"args": {"bones": {"tail": [0, 0, 1]}}}, ErrorCode.INVALID_REQUEST, "`args.bones.tail.[key]`"),
        ({"args": {"subject": "../outside/model.glb"}}, ErrorCode.NOT_ALLOWED, "`args.subject`"),
        ({"args": {"subject": "models/x.exe"}}, ErrorCode.INVALID_REQUEST, "`args.subject`"),
        ({"args": {"background": "red"}}, ErrorCode.INVALID_REQUEST, "`args.background`"),
        ({"args": {"engine": "OCTANE"}}, ErrorCode.INVALID_REQUEST, "`args.engine`"),
        ({"args": {"camera": {"elevation_deg": 95}}}, ErrorCode.INVALID_REQUEST, "`args.camera.elevation_deg`"),
        ({"args": {"samples": "many"}}, ErrorCode.INVALID_REQUEST, "`args.samples`"),
        ({"args": {"colour": "red"}}, ErrorCode.INVALID_REQUEST, "`args.colour` is not a field"),
        ({"args": {"passes": ["depth", "depth"]}}, ErrorCode.INVALID_REQUEST, "twice"),
        ({"args": {"output_name": "a/b"}}, ErrorCode.INVALID_REQUEST, "`args.output_name`"),
    ],
)
def test_bad_args_are_rejected_before_blender_starts(fields: dict[str, object], code: ErrorCode, needle: str) -> None:
    with pytest.raises(RequestError) as info:
        plan(parse_line(render_request(**fields)), TARGET)
    assert info.value.code == code
    assert needle in info.value.message, info.value.message


def test_a_script_without_declared_args_takes_none(tmp_path: Path) -> None:
    (tmp_path / "hello.py").write_text("print('hi')\n")
    target = Target("/ws", scripts=ScriptLibrary(tmp_path))
    plan(parse_line(orjson.dumps({"type": "blender_render", "script": "hello.py"})), target)
    with pytest.raises(RequestError, match="declares no arguments"):
        plan(parse_line(orjson.dumps({"type": "blender_render", "script": "hello.py", "args": {"a": 1}})), target)


def test_output_reader_turns_blender_lines_into_progress() -> None:
    reader = BlenderOutput()
    assert reader.feed("Blender 3.4.1 (hash 55485cb379f7 built 2023-01-15)") is None
    assert reader.feed("PODQ_STEP 2/4 view 2 azimuth 90") == {"fraction": 0.25, "step": 2, "steps": 4,
                                                               "label": "view 2 azimuth 90"}
    update = reader.feed("Fra:1 Mem:25.48M (Peak 25.63M) | Time:00:00.52 | Remaining:00:00.31 | Mem:6.72M, "
                         "Peak:6.79M | Scene, ViewLayer | Sample 8/16")
    assert update == {"fraction": 0.375, "step": 2, "steps": 4, "label": "view 2 azimuth 90", "frame": 1}
    assert reader.feed("Saved: '/workspace/renders/base_0002.png'")["saved"] == "/workspace/renders/base_0002.png"  # type: ignore[index]
    reader.feed("PODQ_OUTPUT /workspace/renders/base_0002.png")
    reader.feed('PODQ_DEVICE {"type": "GPU", "backend": "OPTIX", "devices": ["NVIDIA H100"]}')
    reader.feed("PODQ_ERROR not_found: model file models/x.glb does not exist")
    assert reader.outputs == ["/workspace/renders/base_0002.png"]
    assert reader.device == {"type": "GPU", "backend": "OPTIX", "devices": ["NVIDIA H100"]}
    assert reader.error == ("not_found", "model file models/x.glb does not exist")
    reader.feed("ZeroDivisionError: division by zero")
    assert reader.last_exception == "ZeroDivisionError: division by zero"


def test_sync_uploads_only_what_changed(tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "a.py").write_text("A = 1\n")
    (scripts / "b.py").write_text("B = 1\n")
    (tmp_path / "ws").mkdir()
    host = LocalHost("local", tmp_path / "ws", 2)
    library = ScriptLibrary(scripts)

    first = asyncio.run(sync_scripts(host, library))
    assert first.uploaded == ["a.py", "b.py"]
    assert (tmp_path / "ws" / "blender_scripts" / "a.py").read_text() == "A = 1\n"
    assert asyncio.run(sync_scripts(host, library)).uploaded == []
    (scripts / "b.py").write_text("B = 2\n")
    third = asyncio.run(sync_scripts(host, library))
    assert third.uploaded == ["b.py"] and third.hashes["b.py"] != first.hashes["b.py"]
    assert (tmp_path / "ws" / "blender_scripts" / "b.py").read_text() == "B = 2\n"
