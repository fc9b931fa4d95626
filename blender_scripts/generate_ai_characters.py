"""generate_ai_characters.py: the AI Render addon's route, headless, for podq.

AI Render (benrugg/AI-Render) starts its generation from `bpy.app.timers`, which never fire under
`blender --background`, so it cannot call the API headless. This script does what the addon would, without
timers: it takes a .blend (or the last base render), reads the addon's scene settings when they are there,
switches them to their headless values, renders, and stylizes the render with podq's Stability client —
the same `clients/stability_client.py` the other Stability jobs use, run with the host's Python (Blender's
own Python has no httpx).

    blender --background --factory-startup --python-exit-code 1 \\
        --python <workspace>/blender_scripts/generate_ai_characters.py -- --args-json '<json>'

The API key arrives on stdin (first line) and is passed on to the client on its stdin: never in argv.

Arguments (JSON):
    workspace       absolute path of the workspace on this host (required)
    blend           a .blend inside the workspace to open and render; null: use the newest base render
    stylize         client parameters set by the request; they override the scene's AI Render settings
    python          the Python that runs the client (needs httpx and Pillow)
    client          path of stability_client.py on this host
    base_url        the Stability API (or podq's emulator)
    out_dir         where images land, relative to the workspace (default "output")
    emulated        whether base_url is podq's emulator (recorded in the manifests)
    client_options  extra client flags (retries)
    endpoint_takes  the parameters the chosen endpoint takes: scene settings outside them are left out

AI Render's settings (`scene.air_props`) are read from the addon when it is registered, else from the
scene's saved data (a .blend saved with the addon keeps them as plain properties): prompt_text,
negative_prompt_text, image_similarity, cfg_scale, steps, seed, use_random_seed, sampler, sd_model,
do_autosave_after_images, autosave_image_path. The headless settings (do_autosave_after_images = True,
autosave_image_path = <workspace>/<out_dir>/) are set on them, as the addon needs for a background run.

Markers on stdout: `PODQ_OUTPUT <path>` for the base render, then the client's own lines
(`PODQ_OUTPUT`, `PODQ_VARIANT`, `PODQ_ATTEMPTS`); `PODQ_INFO <json>` says where the settings came from.
"""

import json
import os
import re
import subprocess
import sys

import bpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_base_scene as base  # noqa: E402 - found through the path set just above

AIR_FIELDS = (
    "prompt_text", "negative_prompt_text", "image_similarity", "cfg_scale", "steps", "seed", "use_random_seed",
    "sampler", "sd_model", "do_autosave_after_images", "autosave_image_path",
)
_PASS = re.compile(r"_(depth|normal|mask)\.png$")


def read_args():
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    if "--args-json" not in argv:
        raise base.RequestError("invalid_request", "missing --args-json")
    args = json.loads(argv[argv.index("--args-json") + 1])
    if not args.get("workspace"):
        raise base.RequestError("invalid_request", "workspace is required")
    return args


def air_props(scene):
    """AI Render's settings on `scene` and where they came from: the addon, the saved scene data, or none."""
    props = getattr(scene, "air_props", None)
    if props is not None:
        return props, "addon"
    saved = scene.get("air_props")  # Blender up to 4.x keeps an unregistered addon's data as custom properties
    if saved is None and hasattr(scene, "bl_system_properties_get"):
        system = scene.bl_system_properties_get()  # Blender 5 keeps it apart from user custom properties
        saved = system.get("air_props") if system is not None else None
    if saved is not None:
        return saved, "scene data"
    return None, None


def read_settings(props):
    values = {}
    for name in AIR_FIELDS:
        try:
            value = props[name] if not hasattr(props, "bl_rna") else getattr(props, name)
        except (KeyError, AttributeError):
            continue
        values[name] = value.decode() if isinstance(value, bytes) else value
    return values


def set_headless(props, output_folder):
    """What the addon needs for a background run: save every image, into the workspace's output folder."""
    for name, value in (("do_autosave_after_images", True), ("autosave_image_path", output_folder + os.sep)):
        if hasattr(props, "bl_rna"):
            if hasattr(props, name):
                setattr(props, name, value)
        else:
            props[name] = value


def to_client_params(settings):
    """AI Render's names for the client's. image_similarity is how close to stay to the render (SDXL v1's
    image_strength); the client's `strength` is how far to move from it."""
    params = {}
    if settings.get("prompt_text"):
        params["prompt"] = settings["prompt_text"]
    if settings.get("negative_prompt_text"):
        params["negative_prompt"] = settings["negative_prompt_text"]
    if settings.get("image_similarity") is not None:
        params["strength"] = round(1.0 - float(settings["image_similarity"]), 4)
    if settings.get("cfg_scale") is not None:
        params["cfg_scale"] = float(settings["cfg_scale"])
    if settings.get("steps"):
        params["steps"] = int(settings["steps"])
    if settings.get("seed") is not None and not settings.get("use_random_seed", False):
        params["seed"] = int(settings["seed"])
    if settings.get("sampler"):
        params["sampler"] = str(settings["sampler"])
    return params


def open_blend(workspace, relative):
    root = os.path.realpath(workspace)
    real = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, real]) != root:
        raise base.RequestError("not_allowed", f"blend {relative!r} resolves to {real}, outside the workspace")
    if not os.path.isfile(real):
        raise base.RequestError("not_found", f"blend {relative!r}: no such file {real}")
    bpy.ops.wm.open_mainfile(filepath=real)
    return bpy.context.scene


def render_scene(scene, workspace):
    if scene.camera is None:
        raise base.RequestError("invalid_request", "the .blend's scene has no camera to render from")
    folder = base.renders_dir(workspace)
    name = base.next_free_names(folder, 1, prefix="ai_base_")[0]
    path = os.path.join(folder, f"{name}.png")
    scene.render.image_settings.file_format = "PNG"
    if scene.render.engine == "CYCLES":
        # The .blend was saved elsewhere: use this host's best device, and denoise only where a denoiser exists.
        device = base.select_device(scene, "auto")
        if scene.cycles.use_denoising:
            base.configure_denoise(scene, device)
        base.emit("DEVICE", json.dumps(device))
    base.render_still(scene, path)
    os.remove(os.path.join(folder, f"{name}.json"))  # the name's reservation: this route writes no sidecar
    base.emit("OUTPUT", path)
    return path


def newest_render(workspace):
    folder = os.path.join(workspace, "renders")
    candidates = [os.path.join(folder, f) for f in os.listdir(folder)] if os.path.isdir(folder) else []
    root = os.path.realpath(workspace)
    images = [p for p in candidates if p.endswith(".png") and not _PASS.search(p)
              and os.path.commonpath([root, os.path.realpath(p)]) == root]  # no link out of the workspace
    if not images:
        raise base.RequestError("not_found", "no .blend given and no base render in renders/ to start from")
    return max(images, key=os.path.getmtime)


def call_client(args, key, image_path, params):
    workspace = args["workspace"]
    argv = [
        args.get("python") or "python3", args["client"], "--params-json", json.dumps(params),
        "--input", os.path.relpath(image_path, workspace), "--out-dir", args.get("out_dir") or "output",
        "--workspace", workspace, "--base-url", args["base_url"], "--api-key-stdin",
        *args.get("client_options", []),
    ]
    done = subprocess.run(argv, input=key + "\n", capture_output=True, text=True, check=False)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


def main():
    key = sys.stdin.readline().strip()  # first, before anything else could read stdin
    args = read_args()
    workspace = args["workspace"]
    output_folder = os.path.join(workspace, args.get("out_dir") or "output")
    source = None
    settings = {}
    if args.get("blend"):
        scene = open_blend(workspace, args["blend"])
        props, source = air_props(scene)
        if props is not None:
            settings = read_settings(props)
            set_headless(props, output_folder)
        image_path = render_scene(scene, workspace)
    else:
        image_path = newest_render(workspace)
    scene_params = to_client_params(settings)
    takes = args.get("endpoint_takes")
    if takes is not None:  # only what the chosen endpoint takes (podq names it): the rest stays with the scene
        common = {"prompt", "negative_prompt", "style_preset", "seed", "variants"}
        scene_params = {k: v for k, v in scene_params.items() if k in common or k in takes}
    params = {"endpoint": "sdxl/image-to-image", **scene_params, **args.get("stylize", {})}
    params["emulated"] = bool(args.get("emulated"))
    info = {"settings_from": source, "ai_render_settings": settings, "input": os.path.relpath(image_path, workspace)}
    base.emit("INFO", json.dumps(info, default=str))
    if not params.get("prompt"):
        raise base.RequestError(
            "invalid_request", "no prompt: the scene has no AI Render prompt_text and the request gives no "
            "stylize.prompt")
    status = call_client(args, key, image_path, params)
    base.exit_now(status)


if __name__ == "__main__":
    base.run_main(main)
