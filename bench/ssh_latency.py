"""Per-command latency: the local host, SSH with and without the login shell's ~/.bashrc, and the whole loop
through the daemon. Prints a table; compare ratios measured side by side in one run, not absolute numbers.

    python bench/ssh_latency.py [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import config as config_mod
from agent import logs
from agent.config import SSHHostConfig
from agent.daemon import BackgroundDaemon
from agent.hosts import Invocation, LocalHost, SSHHost
from agent.submit import follow, results_size, submit
from tests.sshd import SSHServer, start_sshd

PROBE = Invocation(("true",), 30)


def ssh_config(server: SSHServer) -> SSHHostConfig:
    import getpass

    return SSHHostConfig(kind="ssh", name="bench", hostname="127.0.0.1", port=server.port, user=getpass.getuser(),
                         identity_file=server.client_key, known_hosts=server.known_hosts,
                         workspace=str(server.workspace))  # type: ignore[arg-type]


async def time_host(host: LocalHost | SSHHost, runs: int) -> list[float]:
    await host.run(PROBE)  # connect (SSH) outside the measurement: podq keeps the connection
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        done = await host.run(PROBE)
        samples.append(time.perf_counter() - t)
        assert done.exit_code == 0, done
    await host.close()
    return samples


def time_daemon_loop(root: Path, runs: int) -> list[float]:
    (root / "podq.toml").write_text(f'[[hosts]]\nname = "local"\nkind = "local"\nworkspace = "{root / "ws"}"\n')
    config = config_mod.load(root / "podq.toml")
    samples = []
    with BackgroundDaemon(config):
        for i in range(runs):
            offset = results_size(config)
            t = time.perf_counter()
            rid = submit(config, {"id": f"b{i}", "type": "gpu"})
            for line in follow(config, offset, timeout_s=30):
                if line.id == rid and line.terminal:
                    break
            samples.append(time.perf_counter() - t)
    return samples


def row(name: str, samples: list[float], base: float) -> str:
    med = statistics.median(samples)
    p90 = statistics.quantiles(samples, n=10)[-1]
    return f"| {name:<46} | {med * 1000:9.1f} | {p90 * 1000:8.1f} | {med / base:5.1f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    logs.configure(None, console_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        quiet = start_sshd(root / "quiet", skip_bashrc=True)
        login = start_sshd(root / "login", skip_bashrc=False)
        try:
            (root / "local").mkdir()
            local = asyncio.run(time_host(LocalHost("local", root / "local", 4), args.runs))
            ssh_quiet = asyncio.run(time_host(SSHHost(ssh_config(quiet)), args.runs))
            ssh_login = asyncio.run(time_host(SSHHost(ssh_config(login)), args.runs))
            loop = time_daemon_loop(root, args.runs)
        finally:
            quiet.stop()
            login.stop()
    base = statistics.median(local)
    print(f"`true` run {args.runs} times each, after one warm-up; ratios are to the local host's median.\n")
    print(f"| {'path':<46} | median ms |   p90 ms |  ratio |")
    print(f"|{'-' * 48}|----------:|---------:|-------:|")
    print(row("local host (subprocess)", local, base))
    print(row("ssh, persistent connection, ~/.bashrc skipped", ssh_quiet, base))
    print(row("ssh, persistent connection, ~/.bashrc runs", ssh_login, base))
    print(row("daemon loop: submit -> terminal line (local)", loop, base))
    extra = statistics.median(ssh_login) - statistics.median(ssh_quiet)
    print(f"\n~/.bashrc adds {extra * 1000:.0f} ms to every command run over SSH on this machine.")


if __name__ == "__main__":
    main()
