"""podq.toml: the typed configuration, where it is found, and the starter `podq init` writes.

Relative paths in the file are resolved against the file's own folder, so a config works the same whatever
the current directory is.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent import constants
from agent.errors import ConfigError

CONFIG_FILENAME = "podq.toml"
# The Blender scripts that come with podq (the repository's top-level blender_scripts/).
SHIPPED_SCRIPTS = Path(__file__).resolve().parent.parent / "blender_scripts"
HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySettings(_Strict):
    """Back-off for connection-level failures (never for a command that ran)."""

    attempts: int = Field(constants.DEFAULT_CONNECT_ATTEMPTS, ge=1, le=20)
    initial_s: float = Field(constants.DEFAULT_RETRY_INITIAL_S, ge=0)
    max_s: float = Field(constants.DEFAULT_RETRY_MAX_S, ge=0)


class _HostBase(_Strict):
    name: str = Field(pattern=HOST_NAME_PATTERN)
    # Upper bound on commands running at once on this host.
    max_concurrency: int = Field(
        constants.MAX_CHANNELS_PER_CONNECTION * constants.DEFAULT_MAX_CONNECTIONS, ge=1, le=256
    )
    # The Blender binary on this host; None: `[blender] binary`.
    blender_binary: str | None = Field(None, min_length=1)
    # The Python that runs podq's clients on this host (needs httpx and Pillow); None: `[stability] python`.
    python_binary: str | None = Field(None, min_length=1)


class SSHHostConfig(_HostBase):
    kind: Literal["ssh"]
    hostname: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("root", min_length=1)
    identity_file: Path = Path("~/.ssh/id_ed25519")
    known_hosts: Path = Path("~/.ssh/known_hosts")
    workspace: PurePosixPath = PurePosixPath("/workspace")
    connect_timeout_s: float = Field(constants.DEFAULT_CONNECT_TIMEOUT_S, gt=0)
    retry: RetrySettings = RetrySettings()

    @field_validator("workspace")
    @classmethod
    def _absolute_workspace(cls, value: PurePosixPath) -> PurePosixPath:
        if not value.is_absolute():
            raise ValueError("an ssh host's workspace must be an absolute path on the host, e.g. /workspace")
        return value

    @property
    def max_connections(self) -> int:
        return -(-self.max_concurrency // constants.MAX_CHANNELS_PER_CONNECTION)


class LocalHostConfig(_HostBase):
    """Runs the same commands on this machine: the embedded default, and handy without a pod."""

    kind: Literal["local"]
    workspace: Path = Path("workspace")


HostConfig = Annotated[SSHHostConfig | LocalHostConfig, Field(discriminator="kind")]


class QueueSettings(_Strict):
    dir: Path = Path("queue")


class DaemonSettings(_Strict):
    shutdown_grace_s: float = Field(constants.DEFAULT_SHUTDOWN_GRACE_S, ge=0)


class BlenderSettings(_Strict):
    binary: str = Field("blender", min_length=1)
    # None: `blender_scripts/` beside the config file when it exists, else the scripts shipped with podq.
    scripts_dir: Path | None = None


class StabilitySettings(_Strict):
    base_url: str = "https://api.stability.ai"
    # The key: the daemon's STABILITY_API_KEY, else this file (mode 0600, one line).
    api_key_file: Path | None = None
    # "auto": use podq's offline emulator when no key is configured (results say "emulated": true);
    # "always": use it even with a key; "never": fail without a key.
    emulator: Literal["auto", "always", "never"] = "auto"
    # The Python that runs podq's client on a host (needs httpx and Pillow); per host: `python_binary`.
    # None: podq's own interpreter on a local host, `python3` over SSH.
    python: str | None = Field(None, min_length=1)
    attempts: int = Field(4, ge=1, le=10)  # for what may succeed on retry (429, 5xx, network)
    backoff_s: float = Field(1.0, ge=0)
    rate_limit_wait_s: float = Field(60.0, ge=0)  # the API times a key out for 60 s after a 429


class ArtifactsSettings(_Strict):
    dir: Path = Path("artifacts")  # downloads land in <dir>/<request id>/


class Config(_Strict):
    queue: QueueSettings = QueueSettings()
    daemon: DaemonSettings = DaemonSettings()
    blender: BlenderSettings = BlenderSettings()
    stability: StabilitySettings = StabilitySettings()
    artifacts: ArtifactsSettings = ArtifactsSettings()
    hosts: list[HostConfig] = Field(min_length=1)
    # Where the file was read from (None for the embedded default); set by `load`, not by the file.
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_host_names(self) -> Config:
        names = [h.name for h in self.hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"host names must be unique; repeated: {', '.join(dupes)}")
        return self

    def host(self, name: str | None) -> HostConfig | None:
        """The host a request names, or the only host when it names none."""
        if name is None:
            return self.hosts[0] if len(self.hosts) == 1 else None
        return next((h for h in self.hosts if h.name == name), None)

    @property
    def host_names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def blender_binary(self, host: SSHHostConfig | LocalHostConfig) -> str:
        return host.blender_binary or self.blender.binary

    def python_binary(self, host: SSHHostConfig | LocalHostConfig) -> str:
        if host.python_binary or self.stability.python:
            return host.python_binary or self.stability.python or ""
        return sys.executable if isinstance(host, LocalHostConfig) else "python3"

    @property
    def scripts_dir(self) -> Path:
        """The local folder of Blender scripts (the allowlist for `blender_render`)."""
        assert self.blender.scripts_dir is not None, "set by load()"
        return self.blender.scripts_dir

    @property
    def requests_path(self) -> Path:
        return self.queue.dir / "requests.jsonl"

    @property
    def results_path(self) -> Path:
        return self.queue.dir / "results.jsonl"


STARTER_CONFIG = """\
# podq configuration. Every relative path is relative to this file's folder.
# Docs: README.md ("Configuration") and docs/requests.md.

[queue]
dir = "queue"                 # requests.jsonl, results.jsonl and podq's state live here

[daemon]
shutdown_grace_s = 10         # on SIGINT/SIGTERM, how long running commands get to finish

[blender]
binary = "blender"            # per host: `blender_binary = "/opt/blender/blender"` in its [[hosts]] entry
# scripts_dir = "blender_scripts"   # default: blender_scripts/ beside this file, else the scripts shipped with podq

[stability]
base_url = "https://api.stability.ai"
# The API key: the daemon's STABILITY_API_KEY environment variable, or a file (mode 0600) named here.
# api_key_file = "~/.config/podq/stability.key"
emulator = "auto"             # no key: podq's offline emulator ("emulated": true); "never": fail;
                              # "always": the emulator even with a key
# python = "python3"          # runs podq's client on a host (needs httpx, Pillow); default: podq's own Python
                              # on a local host, python3 over SSH; per host: `python_binary`

[artifacts]
dir = "artifacts"             # files fetched from hosts land in artifacts/<request id>/

# The embedded default: run commands on this machine, inside ./workspace. Needs no pod.
[[hosts]]
name = "local"
kind = "local"
workspace = "workspace"       # every path in a request is relative to this and must stay inside it

# A remote GPU pod over SSH. Uncomment, fill in, then run `podq trust pod1` once to record its host key.
# With more than one host, each request names its `host`.
# [[hosts]]
# name = "pod1"
# kind = "ssh"
# hostname = "1.2.3.4"
# port = 22
# user = "root"
# identity_file = "~/.ssh/id_ed25519"
# known_hosts = "~/.ssh/known_hosts"   # host keys are verified against this; never silently accepted
# workspace = "/workspace"
# max_concurrency = 8                  # commands at once; 4 SSH channels per connection, more connections above that
# blender_binary = "/opt/blender/blender"
# connect_timeout_s = 10
# retry = { attempts = 4, initial_s = 0.5, max_s = 8 }   # connection-level failures only
"""


def _resolve(config: Config, base: Path) -> Config:
    """Make every path absolute: relative ones against `base`, `~` expanded."""

    def local(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    hosts: list[SSHHostConfig | LocalHostConfig] = []
    for h in config.hosts:
        if isinstance(h, SSHHostConfig):
            hosts.append(
                h.model_copy(update={"identity_file": local(h.identity_file), "known_hosts": local(h.known_hosts)})
            )
        else:
            hosts.append(h.model_copy(update={"workspace": local(h.workspace)}))
    scripts = config.blender.scripts_dir
    if scripts is not None:
        scripts = local(scripts)
    elif (base / "blender_scripts").is_dir():
        scripts = base / "blender_scripts"
    else:
        scripts = SHIPPED_SCRIPTS
    return config.model_copy(update={
        "queue": QueueSettings(dir=local(config.queue.dir)),
        "hosts": hosts,
        "blender": config.blender.model_copy(update={"scripts_dir": scripts}),
        "artifacts": ArtifactsSettings(dir=local(config.artifacts.dir)),
        "stability": config.stability.model_copy(update={
            "api_key_file": local(config.stability.api_key_file) if config.stability.api_key_file else None,
        }),
    })


def parse(text: str, *, base: Path, source: Path | None) -> Config:
    where = str(source) if source else "the embedded default config"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from exc
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where} is invalid:\n{_describe(exc)}") from exc
    return _resolve(config, base).model_copy(update={"source": source})


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        # Drop the union's tag from locations: hosts.0.ssh.hostname reads better as hosts[0].hostname.
        parts = [p for p in err["loc"] if p not in ("ssh", "local")]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "(top level)"
        match err["type"]:
            case "extra_forbidden":
                message = "unknown key: remove it, or check its spelling against the starter (`podq init`)"
            case "missing":
                message = "required"
            case "union_tag_invalid" | "union_tag_not_found":
                loc += ".kind"
                message = f"must be \"ssh\" or \"local\" (got {err.get('input', {}).get('kind')!r})"
            case "string_pattern_mismatch" if parts and parts[-1] == "name":
                message = "use letters, digits and . _ - (starting with a letter or digit), at most 64"
            case _:
                message = err["msg"]
        lines.append(f"  {loc}: {message}")
    return "\n".join(lines)


def load(path: Path | None = None, *, cwd: Path | None = None) -> Config:
    """Read the config: `path` when given, else ./podq.toml, else the embedded default (a `local` host)."""
    if path is None:
        candidate = (cwd or Path.cwd()) / CONFIG_FILENAME
        if not candidate.exists():
            return default(cwd=cwd)
        path = candidate
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found: create one with `podq init`") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    return parse(text, base=path.resolve().parent, source=path.resolve())


def default(*, cwd: Path | None = None) -> Config:
    """The embedded default: the starter config, rooted at the current directory."""
    return parse(STARTER_CONFIG, base=(cwd or Path.cwd()).resolve(), source=None)
