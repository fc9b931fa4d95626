"""`blender_render`: run a script from the scripts folder in headless Blender on the host.

Before each run the scripts folder is synced to the host (changed files only), so what runs is what the folder
holds now. Blender's output becomes rate-limited `progress` events; the files the script wrote are described
(size, sha256) on the host and, with `download`, fetched into `artifacts/<id>/`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from agent import artifacts
from agent.blender.output import BlenderOutput
from agent.blender.scripts import REMOTE_FOLDER
from agent.blender.sync import sync_scripts
from agent.commands.base import CommandType, ExecContext, Outcome, Target, nonzero
from agent.errors import ErrorCode, RequestError
from agent.hosts.base import Completed, Invocation
from agent.requests import BlenderRenderRequest

# At most this many progress events per second (a `Saved:` file is always reported).
PROGRESS_PER_S = 4.0


def blender_argv(binary: str, script_path: str, args_json: str) -> tuple[str, ...]:
    # --factory-startup: the host's user prefs and addons must not change what a script does;
    # --python-exit-code: a script that raises must fail the run, not leave Blender exiting 0.
    return (binary, "--background", "--factory-startup", "--python-exit-code", "1",
            "--python", script_path, "--", "--args-json", args_json)


class BlenderRender(CommandType[BlenderRenderRequest]):
    name = "blender_render"

    def plan(self, request: BlenderRenderRequest, target: Target) -> Invocation:
        if target.scripts is None:
            raise RequestError("no scripts folder is configured: set `[blender] scripts_dir` in podq.toml")
        args = target.scripts.check(request.script, request.args)
        args_json = orjson.dumps({**args, "workspace": target.workspace}).decode()
        script = f"{target.workspace}/{REMOTE_FOLDER}/{request.script}"
        return Invocation(blender_argv(target.blender, script, args_json), request.effective_timeout_s)

    async def execute(
        self, request: BlenderRenderRequest, invocation: Invocation, ctx: ExecContext
    ) -> tuple[Completed, Outcome]:
        synced = await sync_scripts(ctx.host, ctx.scripts)
        ctx.progress({"fraction": 0.0, "stage": "scripts_synced", "uploaded": synced.uploaded})
        reader = BlenderOutput()
        last_emit = 0.0

        def on_line(stream: str, line: str) -> None:
            nonlocal last_emit
            update = reader.feed(line)
            now = time.monotonic()
            if update is not None and ("saved" in update or now - last_emit >= 1 / PROGRESS_PER_S):
                last_emit = now
                ctx.progress(update)

        completed = await ctx.host.run(invocation, on_line)
        script_info: dict[str, Any] = {
            "script": request.script,
            "script_sha256": synced.hashes.get(request.script),
            "device": reader.device,
        }
        if completed.exit_code is None or completed.timed_out:
            return completed, Outcome(output=script_info)  # the daemon reports the timeout
        if completed.exit_code != 0:
            return completed, self._failure(completed, reader, script_info)
        made, problems = await artifacts.describe(ctx.host, reader.outputs)
        if problems:
            listed = "; ".join(f"{path} {why}" for path, why in problems.items())
            return completed, Outcome(output=script_info, error_code=ErrorCode.NOT_ALLOWED
                                      if "outside" in listed else ErrorCode.NOT_FOUND,
                                      error_message=f"the script reported files podq cannot deliver: {listed}")
        if request.download:
            made = await artifacts.download(ctx.host, made, ctx.artifacts_dir / ctx.request_id)
        output = {**script_info, "artifacts": [a.model_dump(exclude_none=True) for a in made]}
        return completed, Outcome(output=output, keep_stdout=False)

    def _failure(self, completed: Completed, reader: BlenderOutput, info: dict[str, Any]) -> Outcome:
        if reader.error is not None:
            code, message = reader.error
            known = {c.value for c in ErrorCode}
            return Outcome(output=info, error_code=ErrorCode(code) if code in known else ErrorCode.NONZERO_EXIT,
                           error_message=message)
        outcome = nonzero(completed)
        if reader.last_exception:
            return Outcome(output=info, error_code=outcome.error_code, error_message=(
                f"the script failed: {reader.last_exception} (Blender exited {completed.exit_code}; "
                "the traceback is in `stderr`)"))
        return Outcome(output=info, error_code=outcome.error_code, error_message=outcome.error_message)
