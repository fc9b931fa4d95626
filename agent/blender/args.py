"""The arguments each shipped Blender script takes, as pydantic models: bad args are rejected before
Blender starts, with a message naming the field. A script without a model here takes no arguments.

The scripts themselves (stdlib + bpy only) apply the same defaults, so they can also be run by hand.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from agent.requests import SCRIPT_PATTERN, check_workspace_path

Pose = Literal["t_pose", "a_pose", "standing", "walking", "sitting"]
POSES: tuple[str, ...] = ("t_pose", "a_pose", "standing", "walking", "sitting")
BONES: tuple[str, ...] = (
    "hips", "spine", "chest", "neck", "head",
    "upper_arm.L", "forearm.L", "hand.L", "upper_arm.R", "forearm.R", "hand.R",
    "thigh.L", "shin.L", "foot.L", "thigh.R", "shin.R", "foot.R",
)
Bone = Literal[
    "hips", "spine", "chest", "neck", "head",
    "upper_arm.L", "forearm.L", "hand.L", "upper_arm.R", "forearm.R", "hand.R",
    "thigh.L", "shin.L", "foot.L", "thigh.R", "shin.R", "foot.R",
]
MODEL_EXTENSIONS = (".blend", ".glb", ".gltf", ".fbx", ".obj")
BUILTIN_SUBJECTS = ("cube", "character")

Degrees = Annotated[float, Field(ge=-360, le=360)]
Dimension = Annotated[int, Field(ge=16, le=8192)]


def _subject(value: str) -> str:
    if value in BUILTIN_SUBJECTS:
        return value
    check_workspace_path(value)
    if PurePosixPath(value).suffix.lower() not in MODEL_EXTENSIONS:
        raise PydanticCustomError(
            "invalid_subject",
            "must be 'cube', 'character' or a model file under the workspace ending in {exts}",
            {"exts": ", ".join(MODEL_EXTENSIONS)},
        )
    return value


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CameraArgs(_Args):
    azimuth_deg: Degrees = 30.0
    elevation_deg: float = Field(10.0, ge=-89, le=89)
    distance: float | None = Field(None, gt=0, le=10_000, description="None: frame the subject automatically")
    focal_length_mm: float = Field(50.0, ge=1, le=1000)


class MakeBaseSceneArgs(_Args):
    """Arguments of make_base_scene.py: one base image (and optional control passes) of a subject."""

    subject: Annotated[str, AfterValidator(_subject)] = Field(
        "cube", description="'cube', 'character', or a model file under the workspace (.blend .glb .gltf .fbx .obj)"
    )
    pose: Pose = "a_pose"
    bones: dict[Bone, Annotated[list[Degrees], Field(min_length=3, max_length=3)]] = Field(
        default_factory=dict, description="per-bone [x, y, z] rotations in degrees, on top of the pose"
    )
    camera: CameraArgs = CameraArgs()
    lighting: Literal["three_point", "studio", "rim", "flat"] = "three_point"
    background: str = Field("#808080", pattern=r"^(transparent|#[0-9A-Fa-f]{6})$",
                            description="'transparent' (RGBA PNG) or a colour '#RRGGBB'")
    resolution: Annotated[list[Dimension], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [1024, 1024], description="[width, height] in pixels, 16-8192"
    )
    samples: int = Field(32, ge=1, le=4096)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    engine: Literal["CYCLES", "EEVEE", "WORKBENCH"] = "CYCLES"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    passes: list[Literal["depth", "normal", "mask"]] = Field(default_factory=list, max_length=3)
    output_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

    @model_validator(mode="after")
    def _unique_passes(self) -> MakeBaseSceneArgs:
        if len(set(self.passes)) != len(self.passes):
            raise ValueError("`passes` lists a pass twice")
        return self


class GeneratePoseSceneArgs(MakeBaseSceneArgs):
    """Arguments of generate_pose_scene.py: a turnaround of `views` azimuths for each pose in `poses`."""

    views: int = Field(4, ge=1, le=72)
    poses: list[Pose] | None = Field(None, min_length=1, max_length=10)


SCRIPT_ARGS: dict[str, type[_Args]] = {
    "make_base_scene.py": MakeBaseSceneArgs,
    "generate_pose_scene.py": GeneratePoseSceneArgs,
}

SCRIPT_NAME = re.compile(SCRIPT_PATTERN)
