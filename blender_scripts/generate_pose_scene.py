"""generate_pose_scene.py: character sheets for podq, i.e. every pose seen from several angles in one run.

podq runs it headless on a host:

    blender --background --factory-startup --python-exit-code 1 \\
        --python <workspace>/blender_scripts/generate_pose_scene.py -- --args-json '<json object>'

It takes every argument of make_base_scene.py (see that file's docstring: workspace, subject, pose, bones,
camera, lighting, background, resolution, samples, seed, engine, device, passes, output_name) plus:

    views   number of views (default 4): a turnaround of azimuths camera.azimuth_deg + i * 360 / views,
            for view index i = 0 .. views - 1
    poses   list of pose names to render (default: [pose]); `bones` is added to each of them. Poses only
            move the built-in character: other subjects render the same for every pose name.

The scene is built once; for each pose the character is re-posed, and for each view the camera and the
lights (which follow the camera) move. With `camera.distance` null, one distance per pose frames the
subject from all of its views, so a turnaround keeps the same scale from view to view.

Every (pose, view) gets its own image, pass images and sidecar in `<workspace>/renders/`, named
`base_NNNN` (consecutive free numbers) or `<output_name>_<pose>_<view index>`. Each sidecar has
make_base_scene.py's fields plus "view_index", "views", "azimuth_deg", "pose_name", "sheet" (an id shared by
all images of the run), "library" and "library_sha256" (make_base_scene.py, whose code this reuses).

Markers and errors as for make_base_scene.py; `PODQ_STEP i/n` counts images, n = len(poses) * views.
"""

import datetime
import json
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_base_scene as base  # noqa: E402 - found through the path set just above

SCRIPT_PATH = os.path.abspath(__file__)
EXTRA_DEFAULTS = {"views": 4, "poses": None}


def parse_sheet_args():
    args = base.parse_args(extra_defaults=EXTRA_DEFAULTS)
    views = args["views"]
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise base.RequestError("invalid_request", "views must be a whole number, at least 1")
    if args["poses"] is None:
        args["poses"] = [args["pose"]]
    if not isinstance(args["poses"], list) or not args["poses"]:
        raise base.RequestError("invalid_request", "poses must be a non-empty list of pose names")
    for pose in args["poses"]:
        base.require_choice("poses", pose, base.POSE_NAMES)
    return args


def turnaround(start_deg, views):
    """`views` azimuths evenly spaced over 360 degrees, starting at `start_deg`."""
    return [round(start_deg + index * 360.0 / views, 6) for index in range(views)]


def image_names(args, folder):
    """One name per (pose, view), in render order."""
    poses, views = args["poses"], args["views"]
    if args["output_name"]:
        return [f"{args['output_name']}_{pose}_{index}" for pose in poses for index in range(views)]
    return base.next_free_names(folder, len(poses) * views)


def sheet_id():
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"sheet-{stamp}-{uuid.uuid4().hex[:8]}"


def main():
    args = parse_sheet_args()
    stage = base.build_stage(args)
    base.emit("DEVICE", json.dumps(stage.device))
    azimuths = turnaround(args["camera"]["azimuth_deg"], args["views"])
    names = iter(image_names(args, base.renders_dir(args["workspace"])))
    steps = len(args["poses"]) * len(azimuths)
    sheet = sheet_id()
    library_sha256 = base.file_sha256(base.SCRIPT_PATH)
    step = 0
    for pose in args["poses"]:
        base.pose_stage(stage, pose)
        extent = base.subject_extent(stage.scene)
        distance = base.camera_distance(stage, extent, azimuths)
        for index, azimuth in enumerate(azimuths):
            step += 1
            name = next(names)
            camera_record = base.frame_stage(stage, extent, azimuth, distance)
            label = f"{pose} view {index + 1}/{len(azimuths)} azimuth {azimuth:g} -> {name}"
            written, seconds = base.shoot(stage, name, step, steps, label, extent)
            record = base.sidecar_record(stage, SCRIPT_PATH, written, seconds, camera_record, extra={
                "library": os.path.basename(base.SCRIPT_PATH),
                "library_sha256": library_sha256,
                "sheet": sheet,
                "pose_name": pose,
                "view_index": index,
                "views": len(azimuths),
                "azimuth_deg": azimuth,
            })
            base.save_sidecar(stage, name, record)


if __name__ == "__main__":
    base.run_main(main)
