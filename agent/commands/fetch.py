"""`fetch`: download files from the host's workspace, a finished job's artifacts or given paths."""

from __future__ import annotations

from typing import Any

from agent import artifacts
from agent.commands.base import CommandType, ExecContext, Outcome, Target, relative_to_workspace
from agent.errors import ErrorCode, PodqError
from agent.hosts.base import Completed, Invocation
from agent.requests import FetchRequest


class Fetch(CommandType[FetchRequest]):
    name = "fetch"

    def plan(self, request: FetchRequest, target: Target) -> Invocation:
        for path in request.paths or []:
            relative_to_workspace(path, target.workspace)  # absolute paths must be inside the workspace
        # fetch runs no command of its own (see execute); the invocation only carries its time limit.
        return Invocation(("true",), request.effective_timeout_s)

    async def execute(
        self, request: FetchRequest, invocation: Invocation, ctx: ExecContext
    ) -> tuple[Completed, Outcome]:
        done = Completed(exit_code=0, stdout=b"", stderr=b"", attempts=1)
        if request.from_job is not None:
            previous = ctx.job_output(request.from_job)
            listed = (previous or {}).get("artifacts")
            if not listed:
                raise PodqError(f"no finished job {request.from_job!r} with artifacts: fetch takes the id of a "
                                "succeeded job that made files (e.g. a blender_render), or `paths`",
                                code=ErrorCode.NOT_FOUND)
            paths = [a["path"] for a in listed]
        else:
            paths = [relative_to_workspace(p, ctx.host.workspace) for p in request.paths or []]
        fetched = await artifacts.deliver(ctx.host, paths, ctx.artifacts_dir / ctx.request_id, what="cannot fetch")
        output: dict[str, Any] = {"artifacts": fetched}
        if request.from_job is not None:
            output["from_job"] = request.from_job
        return done, Outcome(output=output, keep_stdout=False, command_ran=False)
