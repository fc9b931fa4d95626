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
from agent.errors import ErrorCode, PodqError, RequestError
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
        run = ScriptRun(ctx)
        completed = await run.run(invocation)
        script_info: dict[str, Any] = {
            "script": request.script,
            "script_sha256": synced.hashes.get(request.script),
            "device": run.reader.device,
        }
        if completed.exit_code is None or completed.timed_out:
            return completed, Outcome(output=script_info)  # the daemon reports the timeout
        if completed.exit_code != 0:
            return completed, run.failure(completed, script_info)
        dest = ctx.artifacts_dir / ctx.request_id if request.download else None
        try:
            made = await artifacts.deliver(ctx.host, run.reader.outputs, dest,
                                           what="the script reported files podq cannot deliver")
        except PodqError as exc:
            return completed, Outcome(output=script_info, error_code=exc.code, error_message=exc.message)
        return completed, Outcome(output={**script_info, "artifacts": made}, keep_stdout=False)


class ScriptRun:
    """Runs a script on the host (Blender, or podq's client) and reads its output as it streams: Blender's
    lines and podq's markers become rate-limited progress, and a failure becomes the code the script named."""

    def __init__(self, ctx: ExecContext, stage: str | None = None, expected_variants: int | None = None) -> None:
        self.ctx = ctx
        self.stage = stage
        self.expected = expected_variants
        self.reader = BlenderOutput()
        self._last = 0.0

    async def run(self, invocation: Invocation) -> Completed:
        return await self.ctx.host.run(invocation, self._on_line)

    def _on_line(self, stream: str, line: str) -> None:
        update = self.reader.feed(line)
        if update is None:
            return
        if "variant" in update and self.expected:
            update["fraction"] = round(min(1.0, len(self.reader.variants) / self.expected), 4)
        now = time.monotonic()
        # A saved file or a finished variant is always reported; the rest at most PROGRESS_PER_S a second.
        if "saved" in update or "variant" in update or now - self._last >= 1 / PROGRESS_PER_S:
            self._last = now
            self.ctx.progress(update if self.stage is None else {**update, "stage": self.stage})

    def failure(self, completed: Completed, output: dict[str, Any], *, missing_module_hint: str = "") -> Outcome:
        """A non-zero exit: the code of the script's PODQ_ERROR, else `nonzero_exit` naming the exception."""
        if self.reader.error is not None:
            code, message = self.reader.error
            known = {c.value for c in ErrorCode}
            return Outcome(output=output, error_code=ErrorCode(code) if code in known else ErrorCode.NONZERO_EXIT,
                           error_message=message)
        outcome = nonzero(completed)
        if self.reader.last_exception:
            return Outcome(output=output, error_code=outcome.error_code, error_message=(
                f"the script failed: {self.reader.last_exception} (exit status {completed.exit_code}; the "
                "traceback is in `stderr`)"))
        if missing_module_hint and "No module named" in completed.stderr.decode(errors="replace"):
            return Outcome(output=output, error_code=outcome.error_code,
                           error_message=f"{outcome.error_message}: {missing_module_hint}")
        return Outcome(output=output, error_code=outcome.error_code, error_message=outcome.error_message)
