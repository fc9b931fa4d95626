"""Files a job made on the host: described (size, sha256, measured on the host) and downloaded into
`artifacts/<request id>/`, each download checked against the host's sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict

from agent.errors import ErrorCode, HostError, PodqError
from agent.hosts.base import Host, Invocation

# Hashes each path given, after resolving it on the host; anything resolving outside the workspace, or missing,
# is reported rather than read. Output: one tab-separated line per path.
DESCRIBE_SCRIPT = """\
ws=$1; shift
wsr=$(realpath -e -- "$ws") || exit 96
for p; do
  case $p in /*) abs=$p ;; *) abs=$wsr/$p ;; esac
  t=$(realpath -e -- "$abs" 2>/dev/null) || { printf 'missing\\t%s\\n' "$p"; continue; }
  case $t in "$wsr"/*) ;; *) printf 'outside\\t%s\\n' "$p"; continue ;; esac
  [ -f "$t" ] || { printf 'notfile\\t%s\\n' "$p"; continue; }
  printf 'ok\\t%s\\t%s\\t%s\\n' "$(sha256sum < "$t" | cut -d' ' -f1)" "$(wc -c < "$t" | tr -d ' ')" "${t#"$wsr"/}"
done
"""


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the host's workspace
    size: int
    sha256: str
    local_path: str | None = None  # where it was downloaded, when it was


class ArtifactError(HostError):
    pass


_WHY = {"missing": "does not exist", "outside": "is outside the workspace", "notfile": "is not a regular file"}


async def describe(host: Host, paths: list[str], *, what: str, timeout_s: float = 120) -> list[Artifact]:
    """Size and sha256 of each file, measured on the host after resolving it there. Any path that is missing,
    not a file, or leads out of the workspace fails them all: PodqError `not_allowed` when one leads out,
    else `not_found`, its message starting with `what`."""
    if not paths:
        return []
    invocation = Invocation(("sh", "-c", DESCRIBE_SCRIPT, "podq-describe", host.workspace, *paths), timeout_s)
    done = await host.run(invocation)
    if done.exit_code != 0:
        raise ArtifactError(
            f"could not describe output files on {host.name} (exit {done.exit_code}): "
            f"{done.stderr.decode(errors='replace').strip()}",
            code=ErrorCode.WORKSPACE_MISSING if done.exit_code == 96 else ErrorCode.NONZERO_EXIT,
        )
    found: list[Artifact] = []
    problems: list[tuple[str, str]] = []  # (kind, path)
    for line in done.stdout.decode(errors="replace").splitlines():
        fields = line.split("\t")
        if fields[0] == "ok" and len(fields) == 4:
            found.append(Artifact(path=fields[3], size=int(fields[2]), sha256=fields[1]))
        elif len(fields) == 2:
            problems.append((fields[0], fields[1]))
    if problems:
        listed = "; ".join(f"{path} {_WHY.get(kind, kind)}" for kind, path in problems)
        outside = any(kind == "outside" for kind, _ in problems)
        raise PodqError(f"{what}: {listed}", code=ErrorCode.NOT_ALLOWED if outside else ErrorCode.NOT_FOUND)
    return found


async def deliver(host: Host, paths: list[str], dest: Path | None, *, what: str) -> list[dict[str, Any]]:
    """Describe the files and, when `dest` is given, download them there: the `artifacts` of a result."""
    made = await describe(host, paths, what=what)
    if dest is not None:
        made = await download(host, made, dest)
    return [a.model_dump(exclude_none=True) for a in made]


async def download(host: Host, artifacts: list[Artifact], dest: Path) -> list[Artifact]:
    """Fetch each file to dest/<its workspace path>; verify it against the host's sha256."""
    transfers: list[tuple[str, Path]] = []
    for a in artifacts:
        local = dest / PurePosixPath(a.path)
        transfers.append((str(PurePosixPath(host.workspace) / a.path), local))
    await host.get_files(transfers)
    fetched = []
    for a, (_, local) in zip(artifacts, transfers, strict=True):
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        if digest != a.sha256:
            raise PodqError(
                f"{a.path} changed during the download (sha256 {digest[:12]}… != {a.sha256[:12]}…): fetch it again",
                code=ErrorCode.CHECKSUM_MISMATCH,
            )
        fetched.append(a.model_copy(update={"local_path": str(local)}))
    return fetched
