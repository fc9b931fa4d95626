"""The `podq` command line: a thin layer of argument parsing over the library's functions."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import orjson

from agent import __version__, admission, constants, demo, logs, render
from agent import config as config_mod
from agent.config import Config, SSHHostConfig
from agent.daemon import LOG_FILE, STATE_FILE, Daemon
from agent.errors import ConfigError, ErrorCode, PodqError, QueueBusy, RequestError
from agent.hosts import known_hosts
from agent.journal import result_lines
from agent.lock import QueueLock
from agent.requests import REQUEST_ADAPTER, REQUEST_TYPES, decode_line, request_schema
from agent.results import Event, ResultLine
from agent.state import StateStore
from agent.submit import follow, id_taken, results_size, submit

# Exit statuses of `podq submit --wait` (and the other commands where they apply).
EXIT_OK = 0
EXIT_FAILED = 1  # the request ran and failed, timed out or was cancelled
EXIT_REJECTED = 2  # the request was rejected (by podq submit itself or by the daemon), or bad usage
EXIT_CONFIG = 3  # podq.toml is missing or invalid, or the queue is busy
EXIT_WAIT_TIMEOUT = 124  # --wait-timeout passed with no terminal result (same as coreutils timeout)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "submit":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"podq: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except QueueBusy as exc:
        print(f"podq: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podq",
        description="Drive a remote GPU box safely: JSON requests in queue/requests.jsonl, results in "
        "queue/results.jsonl.",
    )
    parser.add_argument("--version", action="version", version=f"podq {__version__}")
    config_help = "config file (default: ./podq.toml, else the embedded default: a `local` host)"
    parser.add_argument("--config", type=Path, help=config_help)
    # --config is accepted after the command too (`podq status --config x.toml`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("run", help="run the daemon in the foreground (SIGINT/SIGTERM stop it cleanly)")
    p.add_argument("--until-idle", action="store_true", help="exit once every request so far has finished")
    p.add_argument("--json-logs", action="store_true", help="log JSON lines to stderr too")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "submit",
        help="validate a request and append it to the queue; prints its id",
        usage="podq submit [-h] (TYPE [--FIELD VALUE ...] | --json JSON) [--wait] [--wait-timeout S]",
        description="Validate a request exactly as the daemon will and append it to requests.jsonl; print "
        "its id (podq gives it one, r-YYYYMMDD-HHMMSS-xxxxxx, unless you pass --id). Any request field is "
        "given as --FIELD VALUE, e.g. `podq submit tail_log --path logs/run.log --lines 20 --timeout-s 10 "
        "--meta '{\"shot\": 3}'` (numbers, booleans and objects are read as JSON), or the whole request "
        "with --json. Exit status: 0 submitted (with --wait: succeeded), 1 failed/timed_out/cancelled, "
        "2 rejected or bad usage, 3 config problem, 124 no result within --wait-timeout.",
    )
    p.add_argument("type", nargs="?", choices=REQUEST_TYPES, metavar="TYPE",
                   help=f"request type: {', '.join(REQUEST_TYPES)}")
    p.add_argument("--json", dest="json_text", metavar="JSON", help="the whole request as a JSON object")
    p.add_argument("--id", dest="request_id", metavar="ID", help="the request's id (default: one podq makes)")
    p.add_argument("--host", dest="request_host", metavar="HOST", help="the host to run on (from podq.toml)")
    p.add_argument("--wait", action="store_true", help="follow the results until the request finishes")
    p.add_argument("--wait-timeout", type=float, metavar="S",
                   help="wait (implies --wait) at most S seconds; the request stays queued after that")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("tail", help="a readable view of results.jsonl")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new results")
    p.add_argument("--id", help="only this request's results")
    p.add_argument("-n", "--lines", type=int, default=20, help="how many recent lines to show first (20)")
    p.add_argument("--json", action="store_true", help="print the raw JSON lines")
    p.set_defaults(handler=cmd_tail)

    p = sub.add_parser("status", help="recent requests and their state")
    p.add_argument("-n", "--limit", type=int, default=20, help="how many recent requests to list (20)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("validate", help="check request lines in FILE without running them",
                       description="Check each line as the daemon would (schema, host, paths, ids already used). "
                       "Exit status: 0 all valid, 1 some invalid, 2 FILE unreadable, 3 config problem.")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of requests")
    p.set_defaults(handler=cmd_schema)

    p = sub.add_parser("init", help="write a starter podq.toml (works as is: a `local` host)")
    p.add_argument("--force", action="store_true", help="overwrite an existing podq.toml")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("trust", help="show an SSH host's key fingerprint and record it in known_hosts")
    p.add_argument("host", help="host name from podq.toml")
    p.add_argument("--yes", action="store_true", help="record without asking (for scripts)")
    p.set_defaults(handler=cmd_trust)

    p = sub.add_parser("stability-emulator", help="serve podq's offline emulator of the Stability API (not the "
                       "real API) on loopback until stopped",
                       description="An emulator of the Stability AI REST API for tests and dry runs: same paths, "
                       "fields, validation, headers and errors; images derived from the input. Prints its base "
                       "URL. To use it from a daemon: `[stability] base_url` = that URL, `emulator = \"never\"`, "
                       "and any key in STABILITY_API_KEY (it accepts every non-empty key). (With no key and "
                       "`emulator = \"auto\"`, the daemon starts an emulator of its own instead.)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.set_defaults(handler=cmd_stability_emulator)

    p = sub.add_parser("demo", help="start a daemon, run one request of each inspection type and a `character` "
                       "job (render, stylize, manifest) on the first host, print the results, stop (uses "
                       "./podq.toml, else ./queue, ./workspace and ./artifacts)")
    p.set_defaults(handler=cmd_demo)
    return parser


def _config(args: argparse.Namespace) -> Config:
    return config_mod.load(getattr(args, "config", None))


def _make_default_workspaces(config: Config) -> None:
    """The embedded default's local workspace is podq's to create; a configured one must already exist
    (a typo in podq.toml should fail with workspace_missing, not make a folder)."""
    if config.source is None:
        for host in config.hosts:
            if host.kind == "local":
                Path(host.workspace).mkdir(parents=True, exist_ok=True)


def _log_to(config: Config, *, json_console: bool = False, quiet: bool = False) -> None:
    logs.configure(config.queue.dir / LOG_FILE, json_console=json_console,
                   console_level=logging.WARNING if quiet else logging.INFO)


# -- commands ------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    config.queue.dir.mkdir(parents=True, exist_ok=True)
    _log_to(config, json_console=args.json_logs)
    if config.source is None:
        print("podq: no podq.toml here: using the embedded default (a `local` host, ./queue, ./workspace)",
              file=sys.stderr)
        _make_default_workspaces(config)
    return Daemon(config, until_idle=args.until_idle).run()


def cmd_submit(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        data = _request_from_args(args)
    except ValueError as exc:
        print(f"podq submit: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    start = results_size(config)
    try:
        request_id = submit(config, data)
    except RequestError as exc:
        print(f"podq submit: rejected ({exc.code.value}): {exc.message}", file=sys.stderr)
        return EXIT_REJECTED
    print(request_id, flush=True)
    if not (args.wait or args.wait_timeout is not None):
        if not QueueLock.is_held(config.queue.dir):
            print(f"podq: queued; no daemon is serving {config.queue.dir} yet: start one with `podq run`",
                  file=sys.stderr)
        return EXIT_OK
    return _wait(config, request_id, start, args.wait_timeout)


def _wait(config: Config, request_id: str, offset: int, timeout_s: float | None) -> int:
    hinted = False

    def on_idle(waited: float) -> None:
        nonlocal hinted
        if not hinted and waited >= constants.NO_DAEMON_HINT_AFTER_S and not QueueLock.is_held(config.queue.dir):
            print(f"podq: no daemon is serving {config.queue.dir}: start one with `podq run`", file=sys.stderr)
            hinted = True

    try:
        for line in follow(config, offset, until=lambda r: r.id == request_id and r.terminal,
                           timeout_s=timeout_s, on_idle=on_idle):
            if line.id != request_id:
                continue
            if line.terminal:
                sys.stdout.buffer.write(line.to_json_line())
                sys.stdout.flush()
                return {Event.SUCCEEDED: EXIT_OK, Event.REJECTED: EXIT_REJECTED}.get(line.event, EXIT_FAILED)
            print(render.event_line(line), file=sys.stderr)
    except TimeoutError:
        print(f"podq: no result for {request_id} within {timeout_s:g} s (it stays queued)", file=sys.stderr)
        return EXIT_WAIT_TIMEOUT
    return EXIT_FAILED  # pragma: no cover - follow only returns after a terminal line


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.json_text is not None:
        if args.type or args.extra:
            raise ValueError("give either --json or TYPE with --FIELD VALUE options, not both")
        try:
            whole = decode_line(args.json_text.encode())
        except RequestError as exc:
            raise ValueError(exc.message) from None
        return _with_id_and_host(whole, args)
    if args.type is None:
        raise ValueError("give a request TYPE (one of " + ", ".join(REQUEST_TYPES) + ") or --json")
    data: dict[str, Any] = {"type": args.type}
    string_fields = _string_fields(args.type)
    tokens = list(args.extra)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"expected --FIELD VALUE, got {token!r}")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if not tokens:
                raise ValueError(f"--{name} needs a value")
            value = tokens.pop(0)
        name = name.replace("-", "_")
        if name in string_fields:
            data[name] = value
        else:
            decoded = _json_or_text(value)
            if isinstance(decoded, str) and name in _json_fields(args.type):
                raise ValueError(f"--{name.replace('_', '-')} takes JSON, e.g. --{name.replace('_', '-')} "
                                 "'{\"key\": \"value\"}'")
            data[name] = decoded
    return _with_id_and_host(data, args)


def _with_id_and_host(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if args.request_id is not None:
        data["id"] = args.request_id
    if args.request_host is not None:
        data["host"] = args.request_host
    return data


def _json_fields(kind: str) -> set[str]:
    """Fields that take a JSON object or array (`--args '{...}'`)."""
    props = _type_properties(kind)
    return {name for name, prop in props.items()
            if prop.get("type") in ("object", "array") or "$ref" in prop
            or any(a.get("type") in ("object", "array") or "$ref" in a for a in prop.get("anyOf", []))}


def _type_properties(kind: str) -> dict[str, Any]:
    schema = REQUEST_ADAPTER.json_schema()
    for definition in schema.get("$defs", {}).values():
        props: dict[str, Any] = definition.get("properties", {})
        if props.get("type", {}).get("const") == kind:
            return props
    return {}


def _string_fields(kind: str) -> set[str]:
    """Fields whose value is text, so `--path 123` stays the string "123"."""
    return {
        name for name, prop in _type_properties(kind).items()
        if prop.get("type") == "string" or any(a.get("type") == "string" for a in prop.get("anyOf", []))
    }


def _json_or_text(value: str) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


def cmd_tail(args: argparse.Namespace) -> int:
    config = _config(args)
    lines = [line for _, line in _all_results(config) if args.id is None or line.id == args.id]
    for line in lines[-args.lines:] if args.lines > 0 else []:
        _print_result(line, args.json)
    if not args.follow:
        return EXIT_OK
    try:
        for line in follow(config, results_size(config)):
            if args.id is None or line.id == args.id:
                _print_result(line, args.json)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _all_results(config: Config) -> list[tuple[int, ResultLine]]:
    return list(result_lines(config.results_path))


def _print_result(line: ResultLine, raw: bool) -> None:
    if raw:
        sys.stdout.buffer.write(line.to_json_line())
    else:
        sys.stdout.write(render.event_line(line) + "\n")
    sys.stdout.flush()


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    state_path = config.queue.dir / STATE_FILE
    running = QueueLock.is_held(config.queue.dir)
    rows: list[Any] = []
    counts: dict[str, int] = {}
    cursor = None
    if state_path.exists():
        store = StateStore(state_path, readonly=True)
        try:
            rows, counts, cursor = store.recent(args.limit), store.counts(), store.cursor()
        finally:
            store.close()
    waiting = _unread_lines(config, cursor)
    if args.json:
        out = {"daemon_running": running, "counts": counts, "unread_lines": waiting,
               "requests": [{"id": r.id, "type": r.type, "host": r.host, "state": r.state,
                             "received_at": r.received_at, "updated_at": r.updated_at,
                             "duration_s": r.duration_s, "error_code": r.error_code} for r in rows]}
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
        return EXIT_OK
    print(render.status_table(rows, counts, daemon_running=running, queue_dir=config.queue.dir))
    if waiting:
        hint = "" if running else ": start the daemon with `podq run`"
        print(f"{waiting} request line(s) in {config.requests_path.name} not read yet{hint}")
    return EXIT_OK


def _unread_lines(config: Config, cursor: Any) -> int:
    """Complete, non-blank lines of requests.jsonl past the daemon's read position."""
    try:
        st = config.requests_path.stat()
    except FileNotFoundError:
        return 0
    start = 0
    if cursor is not None and (cursor.dev, cursor.ino) == (st.st_dev, st.st_ino) and st.st_size >= cursor.offset:
        start = cursor.offset
    with open(config.requests_path, "rb") as f:
        f.seek(start)
        return sum(1 for line in f if line.endswith(b"\n") and line.strip())


def cmd_validate(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        content = args.file.read_bytes()
    except OSError as exc:
        print(f"podq validate: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_REJECTED
    bad = total = 0
    seen: dict[str, int] = {}
    for number, line in enumerate(content.split(b"\n"), start=1):
        if not line.strip():
            continue
        total += 1
        try:
            if len(line) > constants.MAX_LINE_BYTES:
                raise RequestError(f"line longer than {constants.MAX_LINE_BYTES} bytes", code=ErrorCode.LINE_TOO_LONG)
            data = decode_line(line)
            admission.admit(config, data)
            request_id = data.get("id")
            if isinstance(request_id, str):
                if request_id in seen:
                    raise RequestError(f"id {request_id!r} is used on line {seen[request_id]} too",
                                       code=ErrorCode.DUPLICATE_ID)
                seen[request_id] = number
                if id_taken(config, request_id):
                    raise RequestError(f"id {request_id!r} was already used by a request in {config.queue.dir}",
                                       code=ErrorCode.DUPLICATE_ID)
        except RequestError as exc:
            bad += 1
            print(f"{args.file}:{number}: {exc.code.value}: {exc.message}")
    print(f"{total - bad} valid, {bad} invalid", file=sys.stderr)
    return EXIT_OK if bad == 0 else EXIT_FAILED


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.buffer.write(orjson.dumps(request_schema(), option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    path: Path = args.config or Path(config_mod.CONFIG_FILENAME)
    if path.exists() and not args.force:
        print(f"podq init: {path} exists; use --force to overwrite it", file=sys.stderr)
        return EXIT_CONFIG
    path.write_text(config_mod.STARTER_CONFIG, encoding="utf-8")
    config = config_mod.load(path)
    config.queue.dir.mkdir(parents=True, exist_ok=True)
    for host in config.hosts:
        if host.kind == "local":
            Path(host.workspace).mkdir(parents=True, exist_ok=True)
    print(f"wrote {path}; start the daemon with `podq run`, then try `podq submit ping --wait`")
    return EXIT_OK


def cmd_trust(args: argparse.Namespace) -> int:
    config = _config(args)
    host = config.host(args.host)
    if host is None:
        print(f"podq trust: no host {args.host!r} in podq.toml (hosts: {', '.join(config.host_names)})",
              file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(host, SSHHostConfig):
        print(f"podq trust: {host.name} is a {host.kind} host; only ssh hosts have host keys", file=sys.stderr)
        return EXIT_CONFIG
    try:
        server = asyncio.run(known_hosts.fetch_server_key(host.hostname, host.port, host.connect_timeout_s))
    except PodqError as exc:
        print(f"podq trust: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    trusted = known_hosts.trusted_keys(host.known_hosts, host.hostname, host.port)
    target = f"{host.hostname}:{host.port}"
    if any(k.public_data == server.key.public_data for k in trusted):
        print(f"{target} is already trusted ({server.algorithm} {server.fingerprint})")
        return EXIT_OK
    if trusted:
        print(f"podq trust: WARNING: {host.known_hosts} holds a DIFFERENT key for {target}. The pod may have "
              "been replaced, or someone may be intercepting the connection. Remove the old entry by hand "
              "(ssh-keygen -R) if the change is expected, then run this again.", file=sys.stderr)
        return EXIT_FAILED
    print(f"{target} presents {server.algorithm} key {server.fingerprint}")
    if not args.yes:
        if not sys.stdin.isatty():
            print("podq trust: not recording without confirmation: compare the fingerprint with the pod's "
                  "(e.g. `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on it), then rerun with --yes",
                  file=sys.stderr)
            return EXIT_FAILED
        answer = input(f"Record it in {host.known_hosts}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("not recorded")
            return EXIT_FAILED
    known_hosts.record(host.known_hosts, server.known_hosts_line(host.hostname, host.port))
    print(f"recorded in {host.known_hosts}")
    return EXIT_OK


def cmd_stability_emulator(args: argparse.Namespace) -> int:
    from agent.stability import emulator

    return emulator.main(["--host", args.host, "--port", str(args.port)])


def cmd_demo(args: argparse.Namespace) -> int:
    config = _config(args)
    config.queue.dir.mkdir(parents=True, exist_ok=True)
    _make_default_workspaces(config)
    logs.configure(config.queue.dir / LOG_FILE, console_level=logging.WARNING)
    demo.run(config)
    return EXIT_OK
