"""The scripts folder: which Blender scripts may run (the allowlist is the folder, nothing else), their
hashes, and their arguments checked against the models in `args.py`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.blender.args import SCRIPT_ARGS, SCRIPT_NAME
from agent.errors import NotAllowed, RequestError
from agent.requests import validation_error

# Scripts that only their own request type may run.
ROUTED_SCRIPTS = {"generate_ai_characters.py": "ai_render"}

# Where the folder is mirrored under each host's workspace.
REMOTE_FOLDER = "blender_scripts"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ScriptLibrary:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def files(self) -> dict[str, Path]:
        """Every script in the folder, by file name (all are synced: scripts may import each other)."""
        if not self.folder.is_dir():
            return {}
        return {p.name: p for p in sorted(self.folder.glob("*.py")) if SCRIPT_NAME.fullmatch(p.name)}

    def check(self, script: str, args: dict[str, Any]) -> dict[str, Any]:
        """The script's validated arguments (defaults filled in), or RequestError naming what is wrong."""
        available = self.files()
        if script not in available:
            names = ", ".join(available) or f"none: {self.folder} has no scripts"
            raise NotAllowed(f"script {script!r} is not in the scripts folder {self.folder}; available: {names}")
        if script in ROUTED_SCRIPTS:
            raise NotAllowed(f"{script} runs through the `{ROUTED_SCRIPTS[script]}` request type (it needs the API "
                             "key podq hands it), not blender_render")
        model = SCRIPT_ARGS.get(script)
        if model is None:
            if args:
                raise RequestError(f"{script} declares no arguments, so `args` must be empty")
            return {}
        try:
            validated = model.model_validate(args)
        except ValidationError as exc:
            raise validation_error(exc, prefix="args.", what=f"{script}'s arguments") from None
        return validated.model_dump(mode="json", exclude_none=True)
