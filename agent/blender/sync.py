"""Mirroring a local folder of scripts to the host (`<workspace>/blender_scripts/`, `<workspace>/clients/`),
uploading only what changed."""

from __future__ import annotations

from dataclasses import dataclass

from agent.blender.scripts import REMOTE_FOLDER, ScriptLibrary, sha256_file
from agent.errors import ErrorCode, HostError
from agent.hosts.base import Host, Invocation

# sha256 of each script already on the host (creating the folder on first use).
LIST_SCRIPT = """\
mkdir -p -- "$1" && cd -- "$1" || exit 96
for f in *.py; do [ -f "$f" ] && sha256sum -- "$f"; done
exit 0
"""


@dataclass(frozen=True)
class SyncReport:
    hashes: dict[str, str]  # every script's sha256, as it now is on the host
    uploaded: list[str]


async def sync_scripts(host: Host, library: ScriptLibrary) -> SyncReport:
    return await sync_folder(host, library, f"{host.workspace}/{REMOTE_FOLDER}")


async def sync_folder(host: Host, library: ScriptLibrary, remote_dir: str) -> SyncReport:
    """Make `remote_dir` on the host hold the library's files as they are now (changed files only)."""
    # Jobs starting together would each upload the same files; one sync per folder at a time.
    async with host.lock(f"sync:{remote_dir}"):
        return await _sync(host, library, remote_dir)


async def _sync(host: Host, library: ScriptLibrary, remote_dir: str) -> SyncReport:
    files = library.files()
    local = {name: sha256_file(path) for name, path in files.items()}
    listing = await host.run(Invocation(("sh", "-c", LIST_SCRIPT, "podq-sync", remote_dir), 60))
    if listing.exit_code != 0:
        raise HostError(
            f"cannot prepare {remote_dir} on {host.name}: {listing.stderr.decode(errors='replace').strip()}",
            code=ErrorCode.WORKSPACE_MISSING if listing.exit_code == 96 else ErrorCode.NONZERO_EXIT,
        )
    remote: dict[str, str] = {}
    for line in listing.stdout.decode(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        remote[name.strip()] = digest
    changed = [name for name, digest in local.items() if remote.get(name) != digest]
    if changed:
        await host.put_files([(files[name], f"{remote_dir}/{name}") for name in changed])
    return SyncReport(local, changed)
