"""Stability jobs: `stability_generate`, `character` (render then stylize) and `ai_render` (the AI Render
addon's route, headless). All run podq's client (clients/stability_client.py) on the host; the API key reaches
it on stdin, never in argv, and is scrubbed from everything podq writes."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from agent import artifacts
from agent.blender.args import SCRIPT_ARGS
from agent.blender.scripts import REMOTE_FOLDER, ScriptLibrary
from agent.blender.sync import sync_folder, sync_scripts
from agent.commands.base import CommandType, ExecContext, Outcome, Target, relative_to_workspace
from agent.commands.blender import BlenderRender, ScriptRun, blender_argv
from agent.errors import ErrorCode, PodqError, RequestError
from agent.hosts.base import Completed, Invocation
from agent.requests import (
    AiRenderRequest,
    BlenderRenderRequest,
    CharacterRequest,
    StabilityGenerateRequest,
    StylizeParams,
)
from clients import stability_client

CLIENTS = ScriptLibrary(Path(stability_client.__file__).parent)
REMOTE_CLIENTS = "clients"
AI_SCRIPT = "generate_ai_characters.py"
OUTPUT_DIR = "output"
_IMAGES = (".png", ".jpg", ".jpeg", ".webp")
_PASSES = ("_depth", "_normal", "_mask")


def check_stylize(params: StylizeParams, *, needs_prompt: bool = True) -> None:
    """The client's own checks (cross-field and ranges), run at admission so nothing is spent on a bad request."""
    data = params.model_dump(exclude_none=True)
    if not needs_prompt and not data.get("prompt"):
        data["prompt"] = "(from the scene)"
    try:
        stability_client.Params.from_dict(data).check()
    except stability_client.StabilityError as exc:
        raise RequestError(f"`stylize`: {exc.message}", code=ErrorCode.INVALID_REQUEST) from None


def base_images(output: dict[str, Any] | None) -> list[str]:
    """The base renders among a job's artifacts: images under renders/, control passes left out."""
    paths = [a["path"] for a in (output or {}).get("artifacts", [])]
    return [p for p in paths if p.startswith("renders/") and PurePosixPath(p).suffix.lower() in _IMAGES
            and not PurePosixPath(p).stem.endswith(_PASSES)]


async def _access(ctx: ExecContext) -> tuple[str, str, bool]:
    """Base URL as the host must use it, the key, and whether it is podq's emulator."""
    access = ctx.stability
    if access is None:
        raise PodqError(
            "no Stability API key: set STABILITY_API_KEY in the daemon's environment or `[stability] "
            "api_key_file`, or allow the offline emulator (`[stability] emulator = \"auto\"`)",
            code=ErrorCode.AUTH,
        )
    if access.emulated and access.local_port is not None:
        port = await ctx.host.reach_local_port(access.local_port)
        return f"http://127.0.0.1:{port}", access.key, True
    return access.base_url, access.key, False


def _client_options(ctx: ExecContext) -> list[str]:
    s = ctx.stability_settings
    if s is None:
        return []
    return ["--attempts", str(s.attempts), "--backoff-s", f"{s.backoff_s:g}",
            "--rate-limit-wait-s", f"{s.rate_limit_wait_s:g}"]


async def _resolve_inputs(ctx: ExecContext, inputs: list[str]) -> list[str]:
    """Each input as the real file it is on the host, refused if it leads out of the workspace (symlinks too)."""
    return [a.path for a in await artifacts.describe(ctx.host, inputs, what="cannot stylize")]


async def _stylize(ctx: ExecContext, params: StylizeParams, inputs: list[str], timeout_s: float) -> _Result:
    inputs = await _resolve_inputs(ctx, inputs)
    await sync_folder(ctx.host, CLIENTS, f"{ctx.host.workspace}/{REMOTE_CLIENTS}")
    base_url, key, emulated = await _access(ctx)
    ws = ctx.host.workspace
    data = {**params.model_dump(exclude_none=True), "emulated": emulated}
    argv = [ctx.target.python, f"{ws}/{REMOTE_CLIENTS}/stability_client.py", "--params-json", json.dumps(data)]
    for path in inputs:
        argv += ["--input", path]
    argv += ["--out-dir", OUTPUT_DIR, "--workspace", ws, "--base-url", base_url, "--api-key-stdin",
             *_client_options(ctx)]
    run = ScriptRun(ctx, "stylize", expected_variants=max(len(inputs), 1) * params.variants)
    completed = await run.run(Invocation(tuple(argv), timeout_s, stdin=f"{key}\n".encode()))
    return _Result(completed, run, emulated)


# What a client that cannot start on the host needs.
_CLIENT_NEEDS = ("the client needs httpx and Pillow on the host (`pip install httpx pillow` for the Python that "
                 "`[stability] python` names)")


class _Result:
    """A finished client (or AI Render script) run."""

    def __init__(self, completed: Completed, run: ScriptRun, emulated: bool) -> None:
        self.completed = completed
        self.reader = run.reader
        self.run = run
        self.emulated = emulated

    @property
    def ran(self) -> bool:
        return self.completed.exit_code is not None and not self.completed.timed_out

    def failure(self, output: dict[str, Any]) -> Outcome:
        return self.run.failure(self.completed, output, missing_module_hint=_CLIENT_NEEDS)


async def _deliver(ctx: ExecContext, paths: list[str], download: bool) -> list[dict[str, Any]]:
    dest = ctx.artifacts_dir / ctx.request_id if download else None
    return await artifacts.deliver(ctx.host, paths, dest, what="output files podq cannot deliver")


def _filtered(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [v for v in variants if v.get("finish_reason") == "CONTENT_FILTERED"]


def _finish(output: dict[str, Any], variants: list[dict[str, Any]]) -> Outcome:
    """CONTENT_FILTERED images come back as HTTP 200 with a blurred picture, ERROR ones as HTTP 200 too:
    neither is ever a clean success."""
    errors = [v for v in variants if v.get("finish_reason") not in ("SUCCESS", "CONTENT_FILTERED")]
    if errors:
        names = ", ".join(f"{v['image']} ({v.get('finish_reason')})" for v in errors)
        return Outcome(output=output, error_code=ErrorCode.SERVER_ERROR, keep_stdout=False, error_message=(
            f"{len(errors)} of {len(variants)} image(s) came back without finish reason SUCCESS: {names}; "
            "try again"))
    filtered = _filtered(variants)
    if filtered:
        names = ", ".join(v["image"] for v in filtered)
        return Outcome(output=output, error_code=ErrorCode.CONTENT_FILTERED, keep_stdout=False, error_message=(
            f"{len(filtered)} of {len(variants)} image(s) came back CONTENT_FILTERED (blurred by the API's "
            f"moderation): {names}; change the prompt or input"))
    return Outcome(output=output, keep_stdout=False)


class StabilityGenerate(CommandType[StabilityGenerateRequest]):
    name = "stability_generate"

    def plan(self, request: StabilityGenerateRequest, target: Target) -> Invocation:
        check_stylize(request.stylize)
        for path in request.inputs or []:
            relative_to_workspace(path, target.workspace)
        spec = stability_client.ENDPOINTS[request.stylize.endpoint]
        has_images = request.inputs is not None or request.from_job is not None
        if spec.image == "required" and not has_images:
            raise RequestError(f"endpoint {spec.name} needs input images: give `inputs` or `from_job`")
        if spec.image == "none" and has_images:
            raise RequestError(f"endpoint {spec.name} takes no input image: leave out `inputs` and `from_job`")
        if spec.image == "optional" and has_images and request.stylize.aspect_ratio is not None:
            raise RequestError(f"`stylize.aspect_ratio` applies to {spec.name} only without input images")
        if spec.image == "optional" and not has_images and request.stylize.strength is not None:
            raise RequestError(f"`stylize.strength` applies to {spec.name} only with input images")
        # The argv is built when it runs: inputs may come from another job, and the emulator's address too.
        return Invocation(("true",), request.effective_timeout_s)

    async def execute(
        self, request: StabilityGenerateRequest, invocation: Invocation, ctx: ExecContext
    ) -> tuple[Completed, Outcome]:
        if request.from_job is not None:
            inputs = base_images(ctx.job_output(request.from_job))
            if not inputs:
                raise PodqError(f"job {request.from_job!r} has no succeeded base renders to stylize (images under "
                                "renders/): give the id of a succeeded blender_render or character job, or `inputs`",
                                code=ErrorCode.NOT_FOUND)
        else:
            inputs = [relative_to_workspace(p, ctx.host.workspace) for p in request.inputs or []]
        result = await _stylize(ctx, request.stylize, inputs, invocation.timeout_s)
        output: dict[str, Any] = {"endpoint": request.stylize.endpoint, "emulated": result.emulated,
                                  "api_attempts": result.reader.api_attempts, "variants": result.reader.variants}
        if not result.ran:
            return result.completed, Outcome(output=output)
        if result.completed.exit_code != 0:
            return result.completed, result.failure(output)
        output["artifacts"] = await _deliver(ctx, result.reader.outputs, request.download)
        return result.completed, _finish(output, result.reader.variants)


class Character(CommandType[CharacterRequest]):
    """Render, then stylize every base render, then one manifest linking it all."""

    name = "character"

    def _render_request(self, request: CharacterRequest) -> BlenderRenderRequest:
        # A `character` request renders the procedural character unless it names another subject.
        model = SCRIPT_ARGS.get(request.render.script)
        takes_subject = model is not None and "subject" in model.model_fields
        args = {"subject": "character", **request.render.args} if takes_subject else request.render.args
        return BlenderRenderRequest(type="blender_render", id=request.id, host=request.host,
                                    script=request.render.script, args=args, timeout_s=request.timeout_s)

    def plan(self, request: CharacterRequest, target: Target) -> Invocation:
        check_stylize(request.stylize)
        invocation = BlenderRender().plan(self._render_request(request), target)
        return Invocation(invocation.argv, request.effective_timeout_s)

    async def execute(
        self, request: CharacterRequest, invocation: Invocation, ctx: ExecContext
    ) -> tuple[Completed, Outcome]:
        completed, rendered = await BlenderRender().execute(self._render_request(request), invocation, ctx)
        if completed.exit_code != 0 or rendered.error_code is not None or completed.timed_out:
            return completed, Outcome(output={"stage": "render", **(rendered.output or {})},
                                      error_code=rendered.error_code, error_message=rendered.error_message)
        render_artifacts = (rendered.output or {}).get("artifacts", [])
        bases = base_images(rendered.output)
        result = await _stylize(ctx, request.stylize, bases, invocation.timeout_s)
        output: dict[str, Any] = {"emulated": result.emulated, "api_attempts": result.reader.api_attempts,
                                  "script": request.render.script,
                                  "script_sha256": (rendered.output or {}).get("script_sha256"),
                                  "variants": result.reader.variants}
        if not result.ran:
            return result.completed, Outcome(output=output)
        if result.completed.exit_code != 0:
            return result.completed, result.failure({"stage": "stylize", **output})
        manifest = self._manifest(request, ctx, render_artifacts, bases, result)
        manifest_path = await self._upload_manifest(ctx, manifest)
        paths = [a["path"] for a in render_artifacts] + result.reader.outputs + [manifest_path]
        output["manifest"] = manifest_path
        output["artifacts"] = await _deliver(ctx, paths, request.download)
        return result.completed, _finish(output, result.reader.variants)

    def _manifest(self, request: CharacterRequest, ctx: ExecContext, render_artifacts: list[dict[str, Any]],
                  bases: list[str], result: _Result) -> dict[str, Any]:
        by_path = {a["path"]: a for a in render_artifacts}
        linked = []
        for base in bases:
            stem = PurePosixPath(base).with_suffix("")
            sidecar = f"{stem}.json"
            linked.append({
                "path": base, "sha256": by_path[base]["sha256"],
                "sidecar": sidecar if sidecar in by_path else None,
                "sidecar_sha256": by_path.get(sidecar, {}).get("sha256"),
                "passes": [p for p in by_path if p.startswith(f"{stem}_") and p.endswith(_IMAGES)],
                "variants": [v for v in result.reader.variants if v.get("input") == base],
            })
        return {
            "id": ctx.request_id, "kind": "podq.character", "emulated": result.emulated,
            "scene": {"script": request.render.script, "args": self._render_request(request).args},
            "stylize": request.stylize.model_dump(exclude_none=True),
            "base_renders": linked,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    async def _upload_manifest(self, ctx: ExecContext, manifest: dict[str, Any]) -> str:
        relative = f"{OUTPUT_DIR}/character_{ctx.request_id}.json"
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "manifest.json"
            local.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
            await ctx.host.put_files([(local, f"{ctx.host.workspace}/{relative}")])
        return relative


class AiRender(CommandType[AiRenderRequest]):
    """blender_scripts/generate_ai_characters.py in headless Blender, which calls the same client."""

    name = "ai_render"

    def plan(self, request: AiRenderRequest, target: Target) -> Invocation:
        check_stylize(request.stylize, needs_prompt=False)
        if request.blend is not None:
            relative_to_workspace(request.blend, target.workspace)
            if not request.blend.endswith(".blend"):
                raise RequestError("`blend` must be a .blend file under the workspace")
        if target.scripts is None or AI_SCRIPT not in target.scripts.files():
            raise RequestError(f"{AI_SCRIPT} is not in the scripts folder", code=ErrorCode.NOT_ALLOWED)
        return Invocation(("true",), request.effective_timeout_s)

    async def execute(
        self, request: AiRenderRequest, invocation: Invocation, ctx: ExecContext
    ) -> tuple[Completed, Outcome]:
        synced = await sync_scripts(ctx.host, ctx.scripts)
        await sync_folder(ctx.host, CLIENTS, f"{ctx.host.workspace}/{REMOTE_CLIENTS}")
        base_url, key, emulated = await _access(ctx)
        ws = ctx.host.workspace
        args = {
            "workspace": ws, "blend": relative_to_workspace(request.blend, ws) if request.blend else None,
            # Only what the request set: the rest comes from the scene's AI Render settings, when it has them.
            "stylize": request.stylize.model_dump(exclude_unset=True, exclude_none=True),
            # Scene settings the chosen endpoint does not take are left out rather than refused by the client.
            "endpoint_takes": list(stability_client.ENDPOINTS[request.stylize.endpoint].takes),
            "python": ctx.target.python, "client": f"{ws}/{REMOTE_CLIENTS}/stability_client.py",
            "base_url": base_url, "out_dir": OUTPUT_DIR, "emulated": emulated,
            "client_options": _client_options(ctx),
        }
        argv = blender_argv(ctx.target.blender, f"{ws}/{REMOTE_FOLDER}/{AI_SCRIPT}", json.dumps(args))
        run = ScriptRun(ctx, "ai_render", expected_variants=request.stylize.variants)
        completed = await run.run(Invocation(argv, invocation.timeout_s, stdin=f"{key}\n".encode()))
        result = _Result(completed, run, emulated)
        output: dict[str, Any] = {"emulated": emulated, "script": AI_SCRIPT,
                                  "script_sha256": synced.hashes.get(AI_SCRIPT), **run.reader.info,
                                  "api_attempts": run.reader.api_attempts, "variants": run.reader.variants}
        if not result.ran:
            return completed, Outcome(output=output)
        if completed.exit_code != 0:
            return completed, result.failure(output)
        output["artifacts"] = await _deliver(ctx, run.reader.outputs, request.download)
        return completed, _finish(output, run.reader.variants)
