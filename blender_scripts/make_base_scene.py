"""make_base_scene.py: render one base image of a subject, plus optional control passes, for podq.

podq runs it headless on a host:

    blender --background --factory-startup --python-exit-code 1 \\
        --python <workspace>/blender_scripts/make_base_scene.py -- --args-json '<json object>'

It builds a small studio scene (subject, camera, lights, world), renders `<workspace>/renders/<name>.png`
and writes a sidecar `<name>.json` recording what was rendered and how. Only the Python standard library,
bpy and mathutils are used, and features are detected rather than Blender versions compared, so the same
file runs on Blender 3.4 through 5.x.

Arguments (one JSON object; every key except `workspace` is optional and shown with its default):

    workspace     (required) absolute path of the podq workspace on this host
    subject       "cube" | "character" | a model file inside the workspace (relative to it, or absolute)
                  ending in .blend .glb .gltf .fbx .obj. A .blend has its objects appended.   default "cube"
    pose          "t_pose" | "a_pose" | "standing" | "walking" | "sitting"                default "a_pose"
                  (character only; "sitting" lowers the body onto a box seat)
    bones         {"<bone>": [x, y, z]} Euler XYZ degrees in the bone's own axes, added to the pose's
                  angles (character only). Bones: hips spine chest neck head upper_arm.L forearm.L hand.L
                  upper_arm.R forearm.R hand.R thigh.L shin.L foot.L thigh.R shin.R foot.R.
                  On this rig X swings a bone's tip forward (+) / back (-) for the spine, neck, head and
                  legs (knees bend with negative X on the shin), and up (+) / down (-) for arms, hands
                  and feet; Y twists along the bone; Z swings sideways for spine and legs and forward /
                  back for arms. As in any mirrored Blender rig, .R bones take the same X and negated Y
                  and Z to mirror a .L pose.                                               default {}
    camera        {"azimuth_deg": 30, "elevation_deg": 10, "distance": null, "focal_length_mm": 50}
                  Orbits the centre of the subject's bounds. Azimuth 0 looks at the subject's front
                  (camera on -Y, looking +Y); positive azimuth turns counter-clockwise seen from above.
                  distance null frames the subject automatically with a small margin.
    lighting      "three_point" | "studio" | "rim" | "flat"; lights follow the camera.  default "three_point"
    background    "#RRGGBB" (world colour, RGB PNG) | "transparent" (RGBA PNG)           default "#808080"
    resolution    [width, height] in pixels                                            default [1024, 1024]
    samples       render samples                                                               default 32
    seed          Cycles noise seed                                                             default 0
    engine        "CYCLES" | "EEVEE" | "WORKBENCH"                                        default "CYCLES"
    device        "auto" | "cpu" | "gpu" (Cycles). auto: the best GPU backend found (OptiX, CUDA, HIP,
                  Metal, oneAPI), else CPU; gpu: fail with no_gpu when there is none.      default "auto"
    passes        any of "depth", "normal", "mask": control images for diffusion models, rendered with
                  Cycles and an emission material override (no compositor):               default []
                    depth   distance from the camera, white at the subject's nearest point to black at
                            its farthest; background black
                    normal  camera-space normal as RGB = normal * 0.5 + 0.5 (+X right, +Y up, +Z toward
                            the camera); background (128, 128, 255), a normal facing the camera
                    mask    white subject on black
    output_name   base name of the files, e.g. "hero_front"; default base_NNNN, the next free number
                  in renders/

Writes `renders/<name>.png`, `renders/<name>_<pass>.png` per pass and `renders/<name>.json`. Colours are
written with the 'Standard' view transform and no dithering, so a background colour comes out exact.

The sidecar holds: "args" (the arguments after defaults), "script", "script_sha256", "blender_version",
"engine" (the engine id used), "device" ({"type": "CPU"|"GPU", "backend": "OPTIX"|"CUDA"|...|null,
"devices": [names]}), "denoise" (bool) and "denoiser" (name or null), "samples", "seed", "resolution",
"render_seconds" (the main image), "camera_resolved" (where the camera went), "passes_device" (only when
EEVEE or Workbench renders the image and Cycles the passes), "outputs" (files written, relative to the
workspace, this sidecar last) and "created" (UTC, ISO 8601).

Markers on stdout for podq, one per line: `PODQ_STEP i/n label` before each main render,
`PODQ_OUTPUT <absolute path>` after each file is written, `PODQ_DEVICE <json>` once.
Request errors go to stderr as `PODQ_ERROR <code>: <message>` with exit status 2 (codes invalid_request,
not_allowed, not_found, no_gpu); any other failure prints its traceback to stderr and exits with 1.

generate_pose_scene.py imports this module and reuses its functions for multi-view character sheets.
"""

import array
import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
import traceback

import bpy
from mathutils import Matrix, Vector

SCRIPT_PATH = os.path.abspath(__file__)

# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------

DEFAULTS = {
    "subject": "cube",
    "pose": "a_pose",
    "bones": {},
    "camera": {"azimuth_deg": 30.0, "elevation_deg": 10.0, "distance": None, "focal_length_mm": 50.0},
    "lighting": "three_point",
    "background": "#808080",
    "resolution": [1024, 1024],
    "samples": 32,
    "seed": 0,
    "engine": "CYCLES",
    "device": "auto",
    "passes": [],
    "output_name": None,
}

POSE_NAMES = ("t_pose", "a_pose", "standing", "walking", "sitting")
LIGHTING_NAMES = ("three_point", "studio", "rim", "flat")
ENGINE_NAMES = ("CYCLES", "EEVEE", "WORKBENCH")
DEVICE_NAMES = ("auto", "cpu", "gpu")
PASS_NAMES = ("depth", "normal", "mask")
MODEL_EXTENSIONS = (".blend", ".glb", ".gltf", ".fbx", ".obj")
OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class RequestError(Exception):
    """A problem with the request itself: reported as `PODQ_ERROR <code>: <message>`, exit status 2."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def parse_args(argv=None, extra_defaults=None):
    """The `--args-json` object from the part of argv after `--`, with defaults filled in."""
    argv = sys.argv if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    raw = None
    for i, arg in enumerate(rest):
        if arg == "--args-json" and i + 1 < len(rest):
            raw = rest[i + 1]
        elif arg.startswith("--args-json="):
            raw = arg.split("=", 1)[1]
    if raw is None:
        raise RequestError("invalid_request", "pass the arguments as: -- --args-json '{\"workspace\": \"...\"}'")
    try:
        given = json.loads(raw)
    except ValueError as exc:
        raise RequestError("invalid_request", f"--args-json is not valid JSON: {exc}") from None
    if not isinstance(given, dict):
        raise RequestError("invalid_request", "--args-json must be a JSON object")
    return with_defaults(given, extra_defaults)


def with_defaults(given, extra_defaults=None):
    """Defaults, overlaid with the given arguments (camera merged key by key), then checked.

    podq has validated types and ranges already; the checks here are for runs by hand."""
    defaults = copy.deepcopy(DEFAULTS)
    defaults.update(copy.deepcopy(extra_defaults or {}))
    unknown = sorted(set(given) - set(defaults) - {"workspace"})
    if unknown:
        raise RequestError("invalid_request", f"unknown argument(s): {', '.join(unknown)}")
    args = dict(defaults)
    for key, value in given.items():
        if key == "camera":
            value = {} if value is None else value
            if not isinstance(value, dict):
                raise RequestError("invalid_request", "camera must be an object")
            bad = sorted(set(value) - set(DEFAULTS["camera"]))
            if bad:
                raise RequestError("invalid_request", f"unknown camera field(s): {', '.join(bad)}")
            args["camera"] = {**defaults["camera"], **value}
        elif value is not None or key == "output_name":
            args[key] = value
    check_args(args)
    return args


def check_args(args):
    workspace = args.get("workspace")
    if not isinstance(workspace, str) or not os.path.isabs(workspace):
        raise RequestError("invalid_request", "workspace must be an absolute path")
    if not os.path.isdir(workspace):
        raise RequestError("not_found", f"workspace {workspace} is not a folder on this host")
    require_choice("pose", args["pose"], POSE_NAMES)
    require_choice("lighting", args["lighting"], LIGHTING_NAMES)
    require_choice("engine", args["engine"], ENGINE_NAMES)
    require_choice("device", args["device"], DEVICE_NAMES)
    if not isinstance(args["passes"], list) or len(set(args["passes"])) != len(args["passes"]):
        raise RequestError("invalid_request", "passes must be a list without repeats")
    for name in args["passes"]:
        require_choice("passes", name, PASS_NAMES)
    if args["background"] != "transparent" and not re.fullmatch(r"#[0-9A-Fa-f]{6}", str(args["background"])):
        raise RequestError("invalid_request", "background must be 'transparent' or '#RRGGBB'")
    res = args["resolution"]
    if not (isinstance(res, list) and len(res) == 2 and all(isinstance(v, int) and v >= 1 for v in res)):
        raise RequestError("invalid_request", "resolution must be [width, height] in pixels")
    if not isinstance(args["bones"], dict):
        raise RequestError("invalid_request", "bones must be an object of bone name -> [x, y, z] degrees")
    for bone, xyz in args["bones"].items():
        if not (isinstance(xyz, list) and len(xyz) == 3 and all(isinstance(v, (int, float)) for v in xyz)):
            raise RequestError("invalid_request", f"bones[{bone!r}] must be [x, y, z] in degrees")
    if args["subject"] == "character":
        check_bone_names(args["bones"])
    name = args["output_name"]
    if name is not None and not (isinstance(name, str) and OUTPUT_NAME.fullmatch(name)):
        raise RequestError("invalid_request", "output_name: 1-64 letters, digits, _ or -, no extension")


def require_choice(field, value, choices):
    if value not in choices:
        raise RequestError("invalid_request", f"{field}: {value!r} is not one of {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------------
# Process exit and markers
# ---------------------------------------------------------------------------------------------------

def run_main(main):
    """Run `main`, turning failures into podq's exit contract (see the module docstring).

    Left alone, Blender prints a script's traceback to stdout and its exit status depends on
    --python-exit-code; here the traceback goes to stderr and the status is set explicitly."""
    try:
        main()
    except RequestError as exc:
        print(f"PODQ_ERROR {exc.code}: {exc.message}", file=sys.stderr, flush=True)
        exit_now(2)
    except Exception:  # anything else: a bug or a broken input file
        traceback.print_exc(file=sys.stderr)
        exit_now(1)


def exit_now(status):
    """Exit with `status` without Blender's handling of SystemExit (which differs between versions).

    os._exit skips C-level stdio flushing, so flush Python's streams and the C library's too
    (Blender's own lines such as `Saved: '...'` are printed through C stdio)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None).fflush(None)
    os._exit(status)


def emit(marker, value):
    print(f"PODQ_{marker} {value}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def renders_dir(workspace):
    folder = os.path.join(workspace, "renders")
    os.makedirs(folder, exist_ok=True)
    return folder


def next_free_names(folder, count, prefix="base_"):
    """`count` consecutive names base_NNNN after the highest number used in `folder` (by an image, a pass
    image, a sidecar or a reservation), each reserved so that renders running at the same time on this host
    never pick the same number: a `<name>.json` is created exclusively, and the sidecar later replaces it."""
    used = re.compile(r"^" + re.escape(prefix) + r"(\d{4,})(?:_[A-Za-z0-9_-]+)?\.(?:png|json)$")
    while True:
        highest = 0
        for entry in os.listdir(folder):
            match = used.match(entry)
            if match:
                highest = max(highest, int(match.group(1)))
        names = [f"{prefix}{number:04d}" for number in range(highest + 1, highest + 1 + count)]
        reserved = []
        try:
            for name in names:
                fd = os.open(os.path.join(folder, name + ".json"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, b'{"status": "rendering"}\n')  # what is left if the render fails
                os.close(fd)
                reserved.append(name)
            return names
        except FileExistsError:  # another render took one of them first: release ours and look again
            for name in reserved:
                os.remove(os.path.join(folder, name + ".json"))


def write_sidecar(path, record):
    """Write the JSON sidecar atomically, so a reader never sees half a file."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    os.replace(partial, path)


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def resolve_model_path(workspace, subject):
    """The real path of a model file named by `subject`, refused unless it lies inside the workspace.
    (The file type is the extension of the name given: a link `hero.glb -> hero_v3.glb` works.)"""
    if os.path.splitext(subject)[1].lower() not in MODEL_EXTENSIONS:
        raise RequestError("invalid_request",
                           f"subject {subject!r}: a model must end in {', '.join(MODEL_EXTENSIONS)}")
    root = os.path.realpath(workspace)
    candidate = subject if os.path.isabs(subject) else os.path.join(root, subject)
    real = os.path.realpath(candidate)
    if os.path.commonpath([root, real]) != root:
        raise RequestError("not_allowed", f"subject {subject!r} resolves to {real}, outside the workspace {root}")
    if not os.path.isfile(real):
        raise RequestError("not_found", f"subject {subject!r}: no such file {real}")
    return real


# ---------------------------------------------------------------------------------------------------
# Materials (Principled BSDF inputs are looked up by name: several were renamed in 4.0)
# ---------------------------------------------------------------------------------------------------

def node_input(node, *names):
    """The first of `names` that `node` has as an input (names change between Blender versions)."""
    for name in names:
        if name in node.inputs:
            return node.inputs[name]
    return None


def set_input(node, names, value):
    socket = node_input(node, *names)
    if socket is not None:
        socket.default_value = value


def fresh_node_tree(owner):
    """owner's node tree, emptied. `use_nodes` is deprecated in 5.0 (always on) but needed before."""
    if hasattr(owner, "use_nodes") and not owner.use_nodes:
        owner.use_nodes = True
    tree = owner.node_tree
    tree.nodes.clear()
    return tree


def surface_material(name, rgb, roughness=0.55, specular=0.35):
    """A plain Principled BSDF material; its viewport colour is what Workbench shows."""
    mat = bpy.data.materials.new(name)
    tree = fresh_node_tree(mat)
    out = tree.nodes.new("ShaderNodeOutputMaterial")
    bsdf = tree.nodes.new("ShaderNodeBsdfPrincipled")
    bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
    set_input(bsdf, ("Roughness",), roughness)
    set_input(bsdf, ("Specular IOR Level", "Specular"), specular)
    tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    mat.diffuse_color = (*rgb, 1.0)
    mat.roughness = roughness
    return mat


def srgb_to_linear(channel):
    return channel / 12.92 if channel <= 0.04045 else ((channel + 0.055) / 1.055) ** 2.4


def hex_to_linear(colour):
    """'#RRGGBB' (sRGB, as people pick colours) to the scene-linear RGB Blender shades with."""
    return tuple(srgb_to_linear(int(colour[i:i + 2], 16) / 255.0) for i in (1, 3, 5))


# ---------------------------------------------------------------------------------------------------
# Scene
# ---------------------------------------------------------------------------------------------------

GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "META", "FONT", "CURVES", "POINTCLOUD", "VOLUME"}


def clear_scene():
    """Remove the factory startup's cube, camera and light (and their data)."""
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj, do_unlink=True)
    for collection in (bpy.data.meshes, bpy.data.cameras, bpy.data.lights, bpy.data.materials):
        for block in list(collection):
            if block.users == 0:
                collection.remove(block)


def link(obj):
    bpy.context.scene.collection.objects.link(obj)
    return obj


def mesh_object(name, verts, faces, smooth=None, material=None):
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata([tuple(v) for v in verts], [], faces)
    if smooth is not None:
        # MeshPolygon.use_smooth is backed by the sharp_face attribute since 4.1; keep flat if it is gone.
        with contextlib.suppress(AttributeError, TypeError, RuntimeError):
            mesh.polygons.foreach_set("use_smooth", smooth)
    mesh.validate()
    mesh.update()
    if material is not None:
        mesh.materials.append(material)
    return link(bpy.data.objects.new(name, mesh))


def box_geometry(lo, hi):
    """The 8 corners and 6 outward-facing quads of the axis-aligned box lo..hi."""
    (x0, y0, z0), (x1, y1, z1) = lo, hi
    verts = [(x0, y0, z0), (x1, y0, z0), (x1, y1, z0), (x0, y1, z0),
             (x0, y0, z1), (x1, y0, z1), (x1, y1, z1), (x0, y1, z1)]
    faces = [(0, 3, 2, 1), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)]
    return verts, faces


def build_cube():
    """A 1 m cube resting on the ground, slightly bevelled so its edges catch the light."""
    verts, faces = box_geometry((-0.5, -0.5, 0.0), (0.5, 0.5, 1.0))
    cube = mesh_object("Cube", verts, faces, material=surface_material("CubeMaterial", (0.8, 0.33, 0.12)))
    bevel = cube.modifiers.new("Bevel", "BEVEL")
    bevel.width = 0.03
    bevel.segments = 3
    return cube


def import_model(path, ext):
    """Import (or for .blend, append) a model file of type `ext`; returns the new objects, less any
    cameras and lights it brought (the scene has its own)."""
    before = set(bpy.data.objects)
    if ext == ".blend":
        with bpy.data.libraries.load(path, link=False) as (source, target):
            target.objects = list(source.objects)
        for obj in target.objects:
            if obj is not None and obj.name not in bpy.context.scene.collection.objects:
                link(obj)
    elif ext in (".glb", ".gltf"):
        bpy.ops.import_scene.gltf(filepath=path)
    elif ext == ".fbx":
        bpy.ops.import_scene.fbx(filepath=path)
    elif "obj_import" in dir(bpy.ops.wm):  # `hasattr` is always true on bpy.ops; dir() lists real ones
        bpy.ops.wm.obj_import(filepath=path)
    else:
        bpy.ops.import_scene.obj(filepath=path)
    new = [obj for obj in bpy.data.objects if obj not in before]
    for obj in [o for o in new if o.type in ("CAMERA", "LIGHT")]:
        new.remove(obj)
        bpy.data.objects.remove(obj, do_unlink=True)
    if not any(obj.type in GEOMETRY_TYPES for obj in new):
        raise RequestError("invalid_request", f"{os.path.basename(path)} holds no mesh or other geometry to render")
    return new


# ---------------------------------------------------------------------------------------------------
# The character: a rigged low-poly mannequin, 1.8 m tall, facing -Y, its left side on +X, feet at z=0
# ---------------------------------------------------------------------------------------------------

FORWARD = (0.0, -1.0, 0.0)
UP = (0.0, 0.0, 1.0)

# name: (head, tail, parent, roll reference). The roll makes each bone's local Z axis point along the
# reference, fixing what its X/Y/Z rotations mean on every Blender version: vertical bones face forward,
# arms, hands and feet face up. The .R side is built by mirroring the .L bones.
CENTRE_BONES = [
    ("hips", (0, 0, 0.93), (0, 0, 1.07), None, FORWARD),
    ("spine", (0, 0, 1.07), (0, 0, 1.25), "hips", FORWARD),
    ("chest", (0, 0, 1.25), (0, 0, 1.45), "spine", FORWARD),
    ("neck", (0, 0, 1.45), (0, 0, 1.56), "chest", FORWARD),
    ("head", (0, 0, 1.56), (0, 0, 1.80), "neck", FORWARD),
]
LEFT_BONES = [
    ("upper_arm.L", (0.19, 0, 1.41), (0.46, 0, 1.41), "chest", UP),
    ("forearm.L", (0.46, 0, 1.41), (0.71, 0, 1.41), "upper_arm.L", UP),
    ("hand.L", (0.71, 0, 1.41), (0.88, 0, 1.41), "forearm.L", UP),
    ("thigh.L", (0.1, 0, 0.93), (0.1, 0, 0.50), "hips", FORWARD),
    ("shin.L", (0.1, 0, 0.50), (0.1, 0, 0.09), "thigh.L", FORWARD),
    ("foot.L", (0.1, 0, 0.09), (0.1, -0.17, 0.03), "shin.L", UP),
]


def mirror_name(name):
    return name[:-2] + ".R" if name.endswith(".L") else name


def mirror_x(point):
    return (-point[0], point[1], point[2])


def skeleton():
    right = [(mirror_name(n), mirror_x(h), mirror_x(t), p and mirror_name(p), r) for n, h, t, p, r in LEFT_BONES]
    return CENTRE_BONES + LEFT_BONES + right


BONE_NAMES = tuple(bone[0] for bone in skeleton())


def build_armature():
    data = bpy.data.armatures.new("CharacterRig")
    rig = link(bpy.data.objects.new("CharacterRig", data))
    bpy.context.view_layer.objects.active = rig
    bpy.ops.object.mode_set(mode="EDIT")
    for name, head, tail, parent, roll_reference in skeleton():
        bone = data.edit_bones.new(name)
        bone.head, bone.tail = head, tail
        bone.align_roll(Vector(roll_reference))
        if parent:
            bone.parent = data.edit_bones[parent]
            bone.use_connect = False
    bpy.ops.object.mode_set(mode="OBJECT")
    return rig


class PartBuilder:
    """Collects body-part geometry into one mesh; each part's vertices go in its bone's vertex group."""

    def __init__(self):
        self.verts, self.faces, self.smooth, self.groups = [], [], [], {}

    def add(self, bone, verts, faces, smooth):
        base = len(self.verts)
        self.verts.extend(Vector(v) for v in verts)
        self.faces.extend(tuple(base + i for i in face) for face in faces)
        self.smooth.extend([smooth] * len(faces))
        self.groups.setdefault(bone, []).extend(range(base, base + len(verts)))

    def box(self, bone, lo, hi):
        self.add(bone, *box_geometry(lo, hi), smooth=False)

    def limb(self, bone, start, end, radii_start, radii_end, facing=FORWARD, segments=10):
        """A capped, tapered elliptical tube from start to end; radii are (along `facing`, across)."""
        start, end = Vector(start), Vector(end)
        axis = (end - start).normalized()
        u = Vector(facing) - axis * axis.dot(Vector(facing))
        u = u.normalized() if u.length > 1e-6 else axis.orthogonal().normalized()
        v = axis.cross(u)  # (u, v, axis) is right-handed, so increasing angle runs counter-clockwise
        rings = []
        for centre, (ru, rv) in ((start, radii_start), (end, radii_end)):
            rings.append([centre + u * (ru * math.cos(a)) + v * (rv * math.sin(a))
                          for a in (2 * math.pi * i / segments for i in range(segments))])
        n = segments
        sides = [(i, (i + 1) % n, n + (i + 1) % n, n + i) for i in range(n)]
        self.add(bone, rings[0] + rings[1], sides, smooth=True)
        # Caps get their own vertices so the smooth-shaded sides keep radial normals.
        self.add(bone, rings[0], [tuple(reversed(range(n)))], smooth=False)
        self.add(bone, rings[1], [tuple(range(n))], smooth=False)

    def ball(self, bone, centre, radii, rings=6, segments=10):
        """A low-poly ellipsoid (UV sphere) around `centre`."""
        centre = Vector(centre)
        verts = [centre + Vector((0, 0, -radii[2]))]
        for j in range(1, rings):
            polar = math.pi * j / rings
            for i in range(segments):
                a = 2 * math.pi * i / segments
                verts.append(centre + Vector((radii[0] * math.sin(polar) * math.cos(a),
                                              radii[1] * math.sin(polar) * math.sin(a),
                                              -radii[2] * math.cos(polar))))
        verts.append(centre + Vector((0, 0, radii[2])))
        top, n = len(verts) - 1, segments

        def ring(j, i):
            return 1 + (j - 1) * n + i % n

        faces = [(0, ring(1, i + 1), ring(1, i)) for i in range(n)]
        faces += [(ring(j, i), ring(j, i + 1), ring(j + 1, i + 1), ring(j + 1, i))
                  for j in range(1, rings - 1) for i in range(n)]
        faces += [(ring(rings - 1, i), ring(rings - 1, i + 1), top) for i in range(n)]
        self.add(bone, verts, faces, smooth=True)

    def to_object(self, name, material):
        obj = mesh_object(name, self.verts, self.faces, self.smooth, material)
        for bone, indices in self.groups.items():
            obj.vertex_groups.new(name=bone).add(indices, 1.0, "REPLACE")
        return obj


def add_torso_and_head(parts):
    parts.limb("hips", (0, 0, 0.84), (0, 0, 1.08), (0.105, 0.16), (0.095, 0.15))
    parts.limb("spine", (0, 0, 1.06), (0, 0, 1.27), (0.09, 0.145), (0.10, 0.16))
    parts.limb("chest", (0, 0, 1.25), (0, 0, 1.43), (0.105, 0.165), (0.11, 0.19))
    parts.limb("chest", (0, 0, 1.43), (0, 0, 1.49), (0.11, 0.19), (0.07, 0.10))
    parts.limb("neck", (0, 0, 1.45), (0, 0, 1.59), (0.05, 0.05), (0.048, 0.048), segments=8)
    parts.ball("head", (0, 0, 1.68), (0.095, 0.11, 0.125))
    parts.box("head", (-0.014, -0.125, 1.64), (0.014, -0.095, 1.69))  # a nose: shows which way it faces


def add_limbs(parts, side):
    """Arm and leg of one side (+1 = left, on +X); joint balls hide the seams when limbs bend."""
    s, tag = side, ".L" if side > 0 else ".R"
    shoulder, elbow, wrist = (0.19 * s, 0, 1.41), (0.46 * s, 0, 1.41), (0.71 * s, 0, 1.41)
    parts.ball("upper_arm" + tag, shoulder, (0.066, 0.066, 0.066))
    parts.limb("upper_arm" + tag, shoulder, elbow, (0.056, 0.058), (0.046, 0.048), facing=UP, segments=8)
    parts.ball("forearm" + tag, elbow, (0.049, 0.049, 0.049))
    parts.limb("forearm" + tag, elbow, wrist, (0.045, 0.047), (0.034, 0.038), facing=UP, segments=8)
    parts.ball("hand" + tag, wrist, (0.037, 0.037, 0.037))
    x0, x1 = sorted((0.71 * s, 0.87 * s))
    parts.box("hand" + tag, (x0, -0.045, 1.393), (x1, 0.045, 1.427))
    hip, knee, ankle = (0.1 * s, 0, 0.93), (0.1 * s, 0, 0.50), (0.1 * s, 0, 0.09)
    parts.ball("thigh" + tag, hip, (0.086, 0.086, 0.086))
    parts.limb("thigh" + tag, hip, knee, (0.088, 0.085), (0.062, 0.06))
    parts.ball("shin" + tag, knee, (0.062, 0.062, 0.062))
    parts.limb("shin" + tag, knee, ankle, (0.06, 0.058), (0.043, 0.042))
    parts.ball("foot" + tag, ankle, (0.046, 0.046, 0.046))
    parts.box("foot" + tag, (0.1 * s - 0.048, -0.2, 0.0), (0.1 * s + 0.048, 0.055, 0.085))


# Sitting lowers the rig so the hip joints (z=0.93 at rest) are at the seat top plus a thigh radius, with
# the feet on the ground below the knees.
SIT_DROP = 0.43
SEAT_TOP = 0.93 - SIT_DROP - 0.085


def build_seat():
    """A box stool under the thighs, shown only in the sitting pose (a prop, left out of the mask)."""
    verts, faces = box_geometry((-0.26, -0.36, 0.0), (0.26, 0.16, SEAT_TOP))
    seat = mesh_object("Seat", verts, faces, material=surface_material("SeatMaterial", (0.32, 0.3, 0.28), 0.7))
    seat["podq_prop"] = True
    return seat


def build_character():
    """The rigged mannequin: returns (armature object, body mesh object, seat object)."""
    rig = build_armature()
    parts = PartBuilder()
    add_torso_and_head(parts)
    add_limbs(parts, +1)
    add_limbs(parts, -1)
    skin = surface_material("Skin", (0.72, 0.49, 0.37), roughness=0.6, specular=0.3)
    body = parts.to_object("Character", skin)
    body.parent = rig
    body.modifiers.new("Armature", "ARMATURE").object = rig
    return rig, body, build_seat()


# ---------------------------------------------------------------------------------------------------
# Poses: Euler XYZ degrees per bone (see `bones` in the module docstring for the axes)
# ---------------------------------------------------------------------------------------------------

def with_mirror(left):
    """A pose given for the .L bones (and centre bones), completed with the mirrored .R bones."""
    pose = dict(left)
    for name, (x, y, z) in left.items():
        if name.endswith(".L"):
            pose[mirror_name(name)] = (x, -y, -z)
    return pose


POSES = {
    "t_pose": {},
    "a_pose": with_mirror({"upper_arm.L": (-45, 0, 0)}),
    "standing": with_mirror({
        "upper_arm.L": (-78, -4, 0), "forearm.L": (0, 0, -12), "hand.L": (0, 0, -5),
        "thigh.L": (0, 0, 2), "foot.L": (0, 0, -4),
    }),
    "walking": {  # mid-stride: left leg forward, right arm forward (the arms swing against the legs)
        "thigh.L": (26, 0, 0), "shin.L": (-8, 0, 0), "foot.L": (6, 0, 0),
        "thigh.R": (-18, 0, 0), "shin.R": (-30, 0, 0), "foot.R": (-8, 0, 0),
        "upper_arm.L": (-76, 20, 0), "forearm.L": (0, 0, -10),
        "upper_arm.R": (-76, 22, 0), "forearm.R": (0, 0, 30),
        "chest": (0, -6, 0), "hips": (0, 5, 0),
    },
    "sitting": with_mirror({
        "thigh.L": (90, 0, 4), "shin.L": (-90, 0, -4), "foot.L": (0, 0, 0),
        "upper_arm.L": (-85, 0, -20), "forearm.L": (0, 0, -70), "hand.L": (20, -30, -30),  # hands on thighs
        "spine": (4, 0, 0),
    }),
}


def check_bone_names(bones):
    unknown = sorted(set(bones) - set(BONE_NAMES))
    if unknown:
        raise RequestError("invalid_request",
                           f"bones: unknown bone(s) {', '.join(unknown)}; the rig has {', '.join(BONE_NAMES)}")


def apply_pose(rig, seat, pose_name, bones):
    """Pose the rig: the preset's angles plus `bones` (added per axis); sitting lowers it onto the seat."""
    check_bone_names(bones)
    angles = {name: list(xyz) for name, xyz in POSES[pose_name].items()}
    for name, xyz in bones.items():
        angles[name] = [a + b for a, b in zip(angles.get(name, (0, 0, 0)), xyz, strict=True)]
    for pose_bone in rig.pose.bones:
        pose_bone.rotation_mode = "XYZ"
        pose_bone.location = (0, 0, 0)
        pose_bone.rotation_euler = [math.radians(a) for a in angles.get(pose_bone.name, (0, 0, 0))]
    sitting = pose_name == "sitting"
    rig.location = (0, 0, -SIT_DROP if sitting else 0.0)
    seat.hide_render = not sitting
    seat.hide_viewport = not sitting
    bpy.context.view_layer.update()


# ---------------------------------------------------------------------------------------------------
# Subject bounds and camera
# ---------------------------------------------------------------------------------------------------

def visible_geometry(scene):
    return [obj for obj in scene.objects if obj.type in GEOMETRY_TYPES and not obj.hide_render]


class Extent:
    """Where the subject is, as rendered now (posed, with modifiers): its world bounding box lo..hi,
    and world-space points on it (its vertices, thinned out on big models) for framing and depth."""

    def __init__(self, lo, hi, points):
        self.lo, self.hi, self.points = lo, hi, points

    @property
    def centre(self):
        return (self.lo + self.hi) / 2

    @property
    def radius(self):
        return max((self.hi - self.lo).length / 2, 1e-3)


def object_points(evaluated, budget):
    """World-space vertex positions of an evaluated object, every k-th one past `budget`; its
    bounding box corners when it has no mesh form (volumes, point clouds on older versions)."""
    world = evaluated.matrix_world
    try:
        mesh = evaluated.to_mesh()
    except RuntimeError:
        mesh = None
    if mesh is None:
        return [world @ Vector(corner) for corner in evaluated.bound_box]
    try:
        coords = array.array("f", bytes(12 * len(mesh.vertices)))
        mesh.vertices.foreach_get("co", coords)
    finally:
        evaluated.to_mesh_clear()
    step = max(1, (len(coords) // 3) // budget)
    return [world @ Vector(coords[i:i + 3]) for i in range(0, len(coords), 3 * step)]


def subject_extent(scene, budget=60000):
    depsgraph = bpy.context.evaluated_depsgraph_get()
    objects = visible_geometry(scene)
    corners, points = [], []
    for obj in objects:
        evaluated = obj.evaluated_get(depsgraph)
        corners.extend(evaluated.matrix_world @ Vector(corner) for corner in evaluated.bound_box)
        points.extend(object_points(evaluated, max(2000, budget // len(objects))))
    if not corners:
        raise RequestError("invalid_request", "the subject has nothing to render")
    lo = Vector(tuple(min(c[i] for c in corners) for i in range(3)))
    hi = Vector(tuple(max(c[i] for c in corners) for i in range(3)))
    return Extent(lo, hi, points or corners)


def orbit_direction(azimuth_deg, elevation_deg):
    """Unit vector from the target to the camera: azimuth 0 is the -Y (front) side, counter-clockwise
    seen from above."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return Vector((math.sin(az) * math.cos(el), -math.cos(az) * math.cos(el), math.sin(el)))


def half_field_tangents(focal_length_mm, resolution):
    """tan(half field of view) horizontally and vertically; sensor fit AUTO puts the 36 mm sensor width
    on the longer image side."""
    width, height = resolution
    wide = 18.0 / focal_length_mm
    return (wide, wide * height / width) if width >= height else (wide * width / height, wide)


def fit_distance(extent, azimuths, elevation_deg, focal_length_mm, resolution, fill=0.9):
    """The smallest camera distance at which the subject stays inside `fill` of the frame on both axes
    for every one of `azimuths`, the camera aimed at the centre of its bounds.

    A point at offset (x right, y up, z towards the camera) from the centre projects inside the frame
    when |x| <= (d - z) tan(half angle), i.e. d >= z + |x| / tan; likewise for y."""
    tan_x, tan_y = (t * fill for t in half_field_tangents(focal_length_mm, resolution))
    centre = extent.centre
    offsets = [point - centre for point in extent.points]
    needed = 0.0
    for azimuth in azimuths:
        back = orbit_direction(azimuth, elevation_deg)
        rotation = (-back).to_track_quat("-Z", "Y")
        right, up = rotation @ Vector((1, 0, 0)), rotation @ Vector((0, 1, 0))
        for offset in offsets:
            toward = offset.dot(back)
            needed = max(needed, toward + abs(offset.dot(right)) / tan_x, toward + abs(offset.dot(up)) / tan_y)
    # never inside the subject's bounds, even for a flat subject seen edge-on
    return max(needed, extent.radius * 1.05)


def build_camera():
    cam = link(bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera")))
    cam.data.sensor_fit = "AUTO"
    cam.data.sensor_width = 36.0
    bpy.context.scene.camera = cam
    return cam


def place_camera(cam, extent, azimuth_deg, elevation_deg, distance, focal_length_mm):
    """Put the camera on its orbit around the bounds centre, looking at it."""
    centre, radius = extent.centre, extent.radius
    back = orbit_direction(azimuth_deg, elevation_deg)
    cam.location = centre + back * distance
    cam.rotation_mode = "QUATERNION"
    cam.rotation_quaternion = (-back).to_track_quat("-Z", "Y")
    cam.data.lens = focal_length_mm
    cam.data.clip_start = max(1e-3, min(0.1, (distance - radius) * 0.1))
    cam.data.clip_end = distance + radius * 4 + 100.0
    cam.data.shift_x, cam.data.shift_y = centring_shift(cam, extent)
    return {"location": [round(c, 4) for c in cam.location], "target": [round(c, 4) for c in centre],
            "distance": round(distance, 4), "azimuth_deg": azimuth_deg, "elevation_deg": elevation_deg,
            "focal_length_mm": focal_length_mm,
            "shift": [round(cam.data.shift_x, 4), round(cam.data.shift_y, 4)]}


def centring_shift(cam, extent):
    """Lens shift that puts the middle of the subject's image at the frame centre.

    The camera aims at the centre of the bounds, but perspective draws the near side bigger, so a box
    seen from above sits low in the frame. Shifting the lens (not turning the camera) recentres it
    without changing the perspective. Shift is in units of the larger image side, as is x / -z * lens /
    sensor_width for a point (x, y, z) in camera space. No shift when part of the subject is behind the
    camera (a `distance` inside it)."""
    to_camera = (Matrix.Translation(cam.location) @ cam.rotation_quaternion.to_matrix().to_4x4()).inverted()
    scale = cam.data.lens / cam.data.sensor_width
    xs, ys = [], []
    for point in extent.points:
        local = to_camera @ point
        if local.z > -1e-6:
            return 0.0, 0.0
        xs.append(local.x / -local.z * scale)
        ys.append(local.y / -local.z * scale)
    return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2


# ---------------------------------------------------------------------------------------------------
# Lights and world
# ---------------------------------------------------------------------------------------------------

# Per rig: ambient world light strength, and area lights as (name, azimuth relative to the camera,
# elevation, irradiance on the subject in W/m², size relative to the subject's radius).
LIGHT_RIGS = {
    "three_point": {"ambient": 0.12, "lights": [
        ("key", 45, 35, 2.5, 0.8), ("fill", -60, 10, 0.55, 1.6), ("rim", 160, 40, 2.2, 0.6)]},
    "studio": {"ambient": 0.35, "lights": [
        ("front", 0, 30, 1.2, 3.0), ("left", 80, 20, 0.7, 2.5), ("right", -80, 20, 0.7, 2.5),
        ("top", 0, 80, 0.7, 2.5)]},
    "rim": {"ambient": 0.05, "lights": [
        ("rim_left", 130, 25, 3.1, 0.6), ("rim_right", -130, 25, 3.1, 0.6), ("fill", 0, 10, 0.25, 2.0)]},
    "flat": {"ambient": 1.0, "lights": []},
}


def light_rig(name):
    """The rig's lights, created once; `aim_lights` places them for each view."""
    lights = []
    for light_name, az, el, irradiance, size in LIGHT_RIGS[name]["lights"]:
        data = bpy.data.lights.new(light_name, "AREA")
        data.shape = "DISK"
        lights.append((link(bpy.data.objects.new(light_name, data)), az, el, irradiance, size))
    return lights


def aim_lights(lights, extent, camera_azimuth_deg):
    """Place the lights around the subject relative to the camera, so every view is lit the same way.

    Power grows with the square of the distance so the light reaching the subject stays the same
    whatever its size (measured in Cycles: a small area light of power P gives P / (4 d^2) W/m^2 head-on at
    distance d)."""
    centre, radius = extent.centre, max(extent.radius, 0.05)
    distance = radius * 3.0
    for obj, az, el, irradiance, size in lights:
        direction = orbit_direction(camera_azimuth_deg + az, el)
        obj.location = centre + direction * distance
        obj.rotation_mode = "QUATERNION"
        obj.rotation_quaternion = (-direction).to_track_quat("-Z", "Y")
        obj.data.size = radius * size
        obj.data.energy = irradiance * 4.0 * distance ** 2


def setup_world(scene, background, ambient):
    """Camera rays see the background colour; everything else is lit by a neutral ambient of the rig's
    strength, so the background colour does not tint the subject."""
    world = scene.world or bpy.data.worlds.new("World")
    scene.world = world
    transparent = background == "transparent"
    colour = (0.5, 0.5, 0.5) if transparent else hex_to_linear(background)
    world.color = colour  # what Workbench shows behind the subject
    tree = fresh_node_tree(world)
    out = tree.nodes.new("ShaderNodeOutputWorld")
    seen = tree.nodes.new("ShaderNodeBackground")
    seen.inputs["Color"].default_value = (*colour, 1.0)
    lighting = tree.nodes.new("ShaderNodeBackground")
    lighting.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    lighting.inputs["Strength"].default_value = ambient
    path = tree.nodes.new("ShaderNodeLightPath")
    mix = tree.nodes.new("ShaderNodeMixShader")
    tree.links.new(path.outputs["Is Camera Ray"], mix.inputs["Fac"])
    tree.links.new(lighting.outputs["Background"], mix.inputs[1])
    tree.links.new(seen.outputs["Background"], mix.inputs[2])
    tree.links.new(mix.outputs["Shader"], out.inputs["Surface"])
    scene.render.film_transparent = transparent
    return world


def flat_world(name, rgb):
    """A world that is just a colour, for the control passes."""
    world = bpy.data.worlds.new(name)
    world.color = rgb
    tree = fresh_node_tree(world)
    out = tree.nodes.new("ShaderNodeOutputWorld")
    bg = tree.nodes.new("ShaderNodeBackground")
    bg.inputs["Color"].default_value = (*rgb, 1.0)
    tree.links.new(bg.outputs["Background"], out.inputs["Surface"])
    return world


# ---------------------------------------------------------------------------------------------------
# Engine, device, denoiser, output settings
# ---------------------------------------------------------------------------------------------------

# Tried in order: 4.2-4.x call EEVEE 'BLENDER_EEVEE_NEXT'; 3.x and 5.x call it 'BLENDER_EEVEE'.
ENGINE_IDS = {"CYCLES": ("CYCLES",), "EEVEE": ("BLENDER_EEVEE_NEXT", "BLENDER_EEVEE"),
              "WORKBENCH": ("BLENDER_WORKBENCH",)}
GPU_BACKENDS = ("OPTIX", "CUDA", "HIP", "METAL", "ONEAPI")
WORKBENCH_AA = (("32", 32), ("16", 16), ("11", 11), ("8", 8), ("5", 5), ("FXAA", 1))


def select_engine(scene, name):
    """Set the render engine; engine ids are a dynamic enum, so try each known id for `name`."""
    for engine_id in ENGINE_IDS[name]:
        try:
            scene.render.engine = engine_id
        except TypeError:
            continue
        return scene.render.engine
    raise RuntimeError(f"this Blender has no {name} render engine (tried {', '.join(ENGINE_IDS[name])})")


def cycles_preferences():
    return bpy.context.preferences.addons["cycles"].preferences


def refresh_devices(prefs):
    if hasattr(prefs, "refresh_devices"):
        prefs.refresh_devices()
    else:  # older Blender without refresh_devices()
        prefs.get_devices()


def compiled_backends(prefs):
    try:
        return {item[0] for item in prefs.get_device_types(bpy.context)}
    except Exception:  # an API this code does not know: try every backend
        return set(GPU_BACKENDS)


def find_gpu(prefs):
    """(backend, devices) of the first GPU backend in GPU_BACKENDS order with a device, or (None, [])."""
    compiled = compiled_backends(prefs)
    for backend in GPU_BACKENDS:
        if backend not in compiled:
            continue
        try:
            prefs.compute_device_type = backend
        except TypeError:
            continue
        refresh_devices(prefs)
        devices = [d for d in prefs.devices if d.type == backend]
        if devices:
            return backend, devices
    return None, []


def select_device(scene, wanted):
    """Configure Cycles for `wanted` ('auto', 'cpu', 'gpu'); returns the device record."""
    prefs = cycles_preferences()
    backend, gpus = (None, []) if wanted == "cpu" else find_gpu(prefs)
    if backend is None:
        if wanted == "gpu":
            raise RequestError("no_gpu", "device 'gpu' asked for, but Cycles found no OptiX, CUDA, HIP, "
                                         "Metal or oneAPI device on this host; use device 'auto' or 'cpu'")
        with contextlib.suppress(TypeError):
            prefs.compute_device_type = "NONE"
        refresh_devices(prefs)
        scene.cycles.device = "CPU"
        cpus = [d.name for d in prefs.devices if d.type == "CPU"]
        return {"type": "CPU", "backend": None, "devices": cpus[:1]}
    for device in prefs.devices:
        device.use = device.type == backend  # all GPUs of the backend; the CPU would only slow them
    scene.cycles.device = "GPU"
    return {"type": "GPU", "backend": backend, "devices": [d.name for d in gpus]}


def oidn_built_in():
    try:
        import _cycles
        return bool(getattr(_cycles, "with_openimagedenoise", False))
    except ImportError:
        return False


def configure_denoise(scene, device):
    """Denoise only where a denoiser exists: OptiX on an OptiX GPU, else OpenImageDenoise if built in."""
    candidates = (["OPTIX"] if device["backend"] == "OPTIX" else []) + (["OPENIMAGEDENOISE"] if oidn_built_in() else [])
    for denoiser in candidates:
        try:
            scene.cycles.denoiser = denoiser
        except TypeError:
            continue
        scene.cycles.use_denoising = True
        return denoiser
    scene.cycles.use_denoising = False
    return None


def configure_engine(scene, args, device):
    """Samples, seed and denoising for the chosen engine; returns the denoiser used (or None)."""
    engine = scene.render.engine
    if engine == "CYCLES":
        scene.cycles.samples = args["samples"]
        scene.cycles.seed = args["seed"]
        return configure_denoise(scene, device)
    if engine == "BLENDER_WORKBENCH":
        scene.display.shading.light = "STUDIO"
        scene.display.shading.color_type = "MATERIAL"
        scene.display.render_aa = next((key for key, n in WORKBENCH_AA if args["samples"] >= n), "FXAA")
        return None
    scene.eevee.taa_render_samples = args["samples"]
    with contextlib.suppress(AttributeError):
        scene.eevee.use_gtao = True  # EEVEE before 4.2: ambient occlusion grounds the subject
    return None


def configure_output(scene, resolution, transparent):
    render = scene.render
    render.resolution_x, render.resolution_y = resolution
    render.resolution_percentage = 100
    settings = render.image_settings
    settings.file_format = "PNG"
    settings.color_mode = "RGBA" if transparent else "RGB"
    settings.color_depth = "8"
    # 'Standard' keeps colours as given: a #808080 background is 128 grey in the PNG (the default
    # Filmic / AgX view transforms would shift it).
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    render.dither_intensity = 0.0  # no noise added to 8-bit output: flat colours come out exact


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def temporarily(*changes):
    """Set (owner, attribute, value) triples for the duration of a block, then restore them."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in changes]
    try:
        for owner, attr, value in changes:
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


def render_still(scene, path):
    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise RuntimeError(f"Blender reported no error but wrote no image at {path}")


def check_not_blank(path, transparent):
    """Fail loudly rather than deliver an empty image: the subject must show against the background."""
    image = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = image.size
        scale = min(1.0, 256.0 / max(width, height))
        if scale < 1.0:
            image.scale(max(1, int(width * scale)), max(1, int(height * scale)))
        pixels = array.array("f", bytes(4 * len(image.pixels)))
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    if transparent:
        blank = max(pixels[3::4]) < 0.01
    else:
        blank = all(max(pixels[c::4]) - min(pixels[c::4]) < 2.0 / 255 for c in range(3))
    if blank:
        raise RuntimeError(f"the render {path} is blank: the subject is not in view (camera or subject problem)")


def pass_material(kind, near, far):
    """Emission material for a control pass; its colour is the value written to the PNG."""
    mat = bpy.data.materials.new(f"podq_{kind}_pass")
    tree = fresh_node_tree(mat)
    nodes, links = tree.nodes, tree.links
    out = nodes.new("ShaderNodeOutputMaterial")
    emission = nodes.new("ShaderNodeEmission")
    emission.inputs["Strength"].default_value = 1.0
    links.new(emission.outputs["Emission"], out.inputs["Surface"])
    if kind == "mask":
        emission.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    elif kind == "depth":
        camera = nodes.new("ShaderNodeCameraData")
        remap = nodes.new("ShaderNodeMapRange")
        remap.clamp = True
        remap.inputs["From Min"].default_value = near
        remap.inputs["From Max"].default_value = far
        remap.inputs["To Min"].default_value = 1.0  # near is white
        remap.inputs["To Max"].default_value = 0.0
        links.new(camera.outputs["View Distance"], remap.inputs["Value"])
        links.new(remap.outputs["Result"], emission.inputs["Color"])
    else:  # normal
        geometry = nodes.new("ShaderNodeNewGeometry")
        to_camera = nodes.new("ShaderNodeVectorTransform")
        to_camera.vector_type, to_camera.convert_from, to_camera.convert_to = "NORMAL", "WORLD", "CAMERA"
        encode = nodes.new("ShaderNodeVectorMath")
        encode.operation = "MULTIPLY_ADD"
        # Cycles' camera space looks down +Z; flip Z so a normal facing the camera is blue (+Z).
        encode.inputs[1].default_value = (0.5, 0.5, -0.5)
        encode.inputs[2].default_value = (0.5, 0.5, 0.5)
        links.new(geometry.outputs["Normal"], to_camera.inputs["Vector"])
        links.new(to_camera.outputs["Vector"], encode.inputs[0])
        links.new(encode.outputs["Vector"], emission.inputs["Color"])
    return mat


PASS_BACKGROUNDS = {"depth": (0.0, 0.0, 0.0), "normal": (0.5, 0.5, 1.0), "mask": (0.0, 0.0, 0.0)}
PASS_SAMPLES = 8  # enough to anti-alias edges; passes are flat emission, so there is no noise to clean


def depth_range(camera_location, extent):
    """Nearest and farthest camera distance of the subject's points."""
    distances = [(point - camera_location).length for point in extent.points]
    near, far = min(distances), max(distances)
    return near, max(far, near + 1e-4)


def render_passes(scene, passes, base_path, extent, seed):
    """Render the control passes with Cycles and a material override, restoring every setting after.

    Passes are data, not pictures: the 'Raw' view transform writes the emission values unchanged,
    with few samples and no denoising (a denoiser would blur edges and values)."""
    written = []
    view_layer = bpy.context.view_layer
    props = [obj for obj in scene.objects if obj.get("podq_prop") and not obj.hide_render]
    near, far = depth_range(scene.camera.matrix_world.translation, extent)
    with temporarily(
        (scene.render, "engine", "CYCLES"),
        (scene.cycles, "samples", PASS_SAMPLES), (scene.cycles, "seed", seed),
        (scene.cycles, "use_denoising", False), (scene.cycles, "use_adaptive_sampling", False),
        (scene.render, "film_transparent", False), (scene.render.image_settings, "color_mode", "RGB"),
        (scene.view_settings, "view_transform", "Raw"), (scene.view_settings, "look", "None"),
    ):
        for kind in passes:
            material = pass_material(kind, near, far)
            world = flat_world(f"podq_{kind}_world", PASS_BACKGROUNDS[kind])
            hidden = props if kind == "mask" else []  # the mask shows the subject, not its props
            path = f"{base_path}_{kind}.png"
            try:
                with temporarily((view_layer, "material_override", material), (scene, "world", world),
                                 *[(obj, "hide_render", True) for obj in hidden]):
                    render_still(scene, path)
            finally:
                bpy.data.materials.remove(material)
                bpy.data.worlds.remove(world)
            emit("OUTPUT", path)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------
# The stage: everything built once, then posed, framed and rendered per image
# ---------------------------------------------------------------------------------------------------

class Stage:
    """The built scene and what it was built with."""

    def __init__(self, args):
        self.args = args
        self.scene = bpy.context.scene
        self.rig = self.seat = None  # the character's armature and its seat prop
        self.camera = None
        self.lights = []
        self.engine = None
        self.device = None
        self.passes_device = None
        self.denoiser = None

    @property
    def is_character(self):
        return self.rig is not None


def build_stage(args):
    """Subject, camera, lights, world, engine and device: the parts that do not change per view."""
    stage = Stage(args)
    scene = stage.scene
    clear_scene()
    subject = args["subject"]
    if subject == "cube":
        build_cube()
    elif subject == "character":
        stage.rig, _, stage.seat = build_character()
    else:
        import_model(resolve_model_path(args["workspace"], subject), os.path.splitext(subject)[1].lower())
    stage.camera = build_camera()
    stage.lights = light_rig(args["lighting"])
    transparent = args["background"] == "transparent"
    setup_world(scene, args["background"], LIGHT_RIGS[args["lighting"]]["ambient"])
    configure_output(scene, args["resolution"], transparent)
    scene.frame_set(1)
    uses_cycles = args["engine"] == "CYCLES" or bool(args["passes"])
    cycles_device = select_device(scene, args["device"]) if uses_cycles else None
    stage.engine = select_engine(scene, args["engine"])
    if stage.engine == "CYCLES":
        stage.device = cycles_device
    else:
        # EEVEE and Workbench draw through Blender's GPU backend (OpenGL / Vulkan / Metal): no choice.
        stage.device = {"type": "GPU", "backend": None, "devices": [],
                        "note": f"{stage.engine} renders through Blender's GPU drawing backend; "
                                "`device` applies to Cycles only"}
        stage.passes_device = cycles_device
    stage.denoiser = configure_engine(scene, args, stage.device)
    return stage


def pose_stage(stage, pose_name):
    if stage.is_character:
        apply_pose(stage.rig, stage.seat, pose_name, stage.args["bones"])


def camera_distance(stage, extent, azimuths):
    """The `distance` argument, or (null) the distance that frames the subject from all `azimuths`."""
    camera = stage.args["camera"]
    if camera["distance"] is not None:
        return camera["distance"]
    return fit_distance(extent, azimuths, camera["elevation_deg"], camera["focal_length_mm"],
                        stage.args["resolution"])


def frame_stage(stage, extent, azimuth_deg, distance):
    """Camera and lights for one view; returns the camera record."""
    camera = stage.args["camera"]
    record = place_camera(stage.camera, extent, azimuth_deg, camera["elevation_deg"], distance,
                          camera["focal_length_mm"])
    aim_lights(stage.lights, extent, azimuth_deg)
    bpy.context.view_layer.update()
    return record


def shoot(stage, name, step, steps, label, extent):
    """Render the main image and its passes as `name`; returns (files written, render seconds)."""
    scene, args = stage.scene, stage.args
    folder = renders_dir(args["workspace"])
    image_path = os.path.join(folder, name + ".png")
    emit("STEP", f"{step}/{steps} {label}")
    started = time.monotonic()
    render_still(scene, image_path)
    seconds = round(time.monotonic() - started, 3)
    check_not_blank(image_path, scene.render.film_transparent)
    emit("OUTPUT", image_path)
    written = [image_path]
    if args["passes"]:
        written += render_passes(scene, args["passes"], os.path.join(folder, name), extent, args["seed"])
    return written, seconds


def sidecar_record(stage, script_path, written, seconds, camera_record, extra=None):
    args = stage.args
    record = {
        "args": args,
        "script": os.path.basename(script_path),
        "script_sha256": file_sha256(script_path),
        "blender_version": bpy.app.version_string,
        "engine": stage.engine,
        "device": stage.device,
        "denoise": stage.denoiser is not None,
        "denoiser": stage.denoiser,
        "samples": args["samples"],
        "seed": args["seed"],
        "resolution": list(args["resolution"]),
        "render_seconds": seconds,
        "camera_resolved": camera_record,
    }
    if stage.passes_device is not None:
        record["passes_device"] = stage.passes_device
    record.update(extra or {})
    record["outputs"] = [os.path.relpath(path, args["workspace"]) for path in written]
    record["created"] = utc_now()
    return record


def save_sidecar(stage, name, record):
    path = os.path.join(renders_dir(stage.args["workspace"]), name + ".json")
    record["outputs"].append(os.path.relpath(path, stage.args["workspace"]))
    write_sidecar(path, record)
    emit("OUTPUT", path)
    return path


def main():
    args = parse_args()
    stage = build_stage(args)
    emit("DEVICE", json.dumps(stage.device))
    pose_stage(stage, args["pose"])
    name = args["output_name"] or next_free_names(renders_dir(args["workspace"]), 1)[0]
    azimuth = args["camera"]["azimuth_deg"]
    extent = subject_extent(stage.scene)
    camera_record = frame_stage(stage, extent, azimuth, camera_distance(stage, extent, [azimuth]))
    written, seconds = shoot(stage, name, 1, 1, f"render {name}", extent)
    save_sidecar(stage, name, sidecar_record(stage, SCRIPT_PATH, written, seconds, camera_record))


if __name__ == "__main__":
    run_main(main)
