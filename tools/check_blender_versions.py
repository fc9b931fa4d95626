"""Run podq's Blender scripts on other Blender versions, through PyPI's `bpy` (Blender as a Python module),
and print a table: the Debian Blender the tests use is 3.4, while pods run 4.x/5.x.

    python tools/check_blender_versions.py [--versions 4.5.15 5.0.1] [--keep DIR]

Each version is installed once into its own venv under DIR (default ~/.cache/podq-bpy; about 1 GB each,
Python 3.11). A script runs as `blender --background --factory-startup --python SCRIPT -- --args-json J`
would: factory settings, then the script as __main__. The ai_render route runs against podq's emulator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.stability.emulator import StabilityEmulator  # noqa: E402

RUN = """
import runpy, sys
script, args_json = sys.argv[1], sys.argv[2]
import bpy
bpy.ops.wm.read_factory_settings(use_empty=False)
sys.argv = ["blender", "--background", "--factory-startup", "--python", script, "--", "--args-json", args_json]
runpy.run_path(script, run_name="__main__")
"""

# A scene saved as if AI Render were installed: its settings stay in the .blend without the addon.
AIR_BLEND = """
import sys, bpy
bpy.ops.wm.read_factory_settings(use_empty=False)
class AIRProps(bpy.types.PropertyGroup):
    prompt_text: bpy.props.StringProperty()
    image_similarity: bpy.props.FloatProperty()
bpy.utils.register_class(AIRProps)
bpy.types.Scene.air_props = bpy.props.PointerProperty(type=AIRProps)
scene = bpy.context.scene
scene.air_props.prompt_text, scene.air_props.image_similarity = "a bronze statue", 0.3
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.engine = "CYCLES"
scene.cycles.samples = 2
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[1])
"""

CASES = [
    ("cube, Cycles", "make_base_scene.py", {"subject": "cube"}),
    ("character walking + passes, transparent", "make_base_scene.py",
     {"subject": "character", "pose": "walking", "passes": ["depth", "normal", "mask"], "background": "transparent"}),
    ("character sitting, EEVEE", "make_base_scene.py", {"subject": "character", "pose": "sitting", "engine": "EEVEE"}),
    ("character t_pose, Workbench", "make_base_scene.py",
     {"subject": "character", "pose": "t_pose", "engine": "WORKBENCH"}),
    ("turnaround of 4", "generate_pose_scene.py", {"subject": "character", "views": 4}),
]
SMALL = {"resolution": [64, 64], "samples": 2}


def python_for(version: str, cache: Path) -> Path:
    env = cache / version
    python = env / "bin" / "python"
    if not python.exists():
        print(f"installing bpy=={version} into {env} ...", file=sys.stderr, flush=True)
        venv.create(env, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"bpy=={version}"], check=True)
    return python


def run(python: Path, script: str, args: dict[str, object], stdin: str = "") -> tuple[int, str, str]:
    done = subprocess.run([str(python), "-c", RUN, str(REPO / "blender_scripts" / script), json.dumps(args)],
                          input=stdin, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def check(version: str, python: Path, emulator: StabilityEmulator) -> list[tuple[str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        for name, script, args in CASES:
            code, out, err = run(python, script, {"workspace": str(ws), **SMALL, **args})
            outputs = out.count("PODQ_OUTPUT ")
            verdict = f"ok ({outputs} files)" if code == 0 and outputs else f"FAILED (exit {code}): {err[-200:]}"
            rows.append((name, verdict))
        (ws / "scenes").mkdir()
        subprocess.run([str(python), "-c", AIR_BLEND, str(ws / "scenes" / "air.blend")], check=True,
                       capture_output=True, timeout=300)
        args = {"workspace": str(ws), "blend": "scenes/air.blend", "stylize": {}, "python": sys.executable,
                "client": str(REPO / "clients" / "stability_client.py"), "base_url": emulator.base_url,
                "out_dir": "output", "emulated": True, "client_options": []}
        code, out, err = run(python, "generate_ai_characters.py", args, stdin="sk-emulated-key\n")
        info = next((json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("PODQ_INFO")),
                    {})
        good = code == 0 and "PODQ_VARIANT" in out and info.get("settings_from") == "scene data"
        rows.append(("ai_render: AI Render settings from a .blend",
                     "ok" if good else f"FAILED (exit {code}, {info.get('settings_from')}): {err[-200:]}"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--versions", nargs="+", default=["4.5.15", "5.0.1"])
    parser.add_argument("--keep", type=Path, default=Path(os.path.expanduser("~/.cache/podq-bpy")))
    args = parser.parse_args()
    failed = False
    with StabilityEmulator() as emulator:
        results = {v: check(v, python_for(v, args.keep), emulator) for v in args.versions}
    print("| case | " + " | ".join(f"Blender {v}" for v in args.versions) + " |")
    print("|---|" + "---|" * len(args.versions))
    for i, (name, _) in enumerate(next(iter(results.values()))):
        cells = [results[v][i][1] for v in args.versions]
        failed |= any(not c.startswith("ok") for c in cells)
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
