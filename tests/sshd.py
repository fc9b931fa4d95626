"""A real OpenSSH server on a free loopback port, with keys generated for the test run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "podq-test", "-f", str(path)], check=True)


@dataclass
class SSHServer:
    root: Path
    port: int
    process: subprocess.Popen[bytes]
    client_key: Path
    known_hosts: Path
    workspace: Path
    user: str

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    def host_entry(self) -> str:
        """The line `podq trust` would record for this server."""
        pub = (self.root / "ssh_host_ed25519_key.pub").read_text().split()
        return f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_sshd(
    root: Path, *, skip_bashrc: bool = True, max_sessions: int = 10, extra_config: tuple[str, ...] = ()
) -> SSHServer:
    """Start sshd (as the current user) serving only `root`'s keys on 127.0.0.1."""
    root.mkdir(parents=True, exist_ok=True)
    keygen(root / "ssh_host_ed25519_key")
    keygen(root / "client_key")
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    workspace = root / "workspace"
    workspace.mkdir()
    known_hosts = root / "known_hosts"
    port = free_port()
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {root / 'ssh_host_ed25519_key'}",
        f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}",
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        f"MaxSessions {max_sessions}",
        "MaxStartups 64:30:128",
        "Subsystem sftp internal-sftp",
    ]
    if skip_bashrc:
        # Debian's bash skips ~/.bashrc for ssh commands when SHLVL is set: no pyenv init on every command.
        lines.append("SetEnv SHLVL=1")
    lines.extend(extra_config)
    (root / "sshd_config").write_text("\n".join(lines) + "\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
    process = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(root / "sshd_config"), "-E", str(root / "sshd.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log = (root / "sshd.log").read_text() if (root / "sshd.log").exists() else ""
            raise RuntimeError(f"sshd did not start (exit {process.poll()}): {log}")
        time.sleep(0.05)
    server = SSHServer(root, port, process, root / "client_key", known_hosts, workspace, os.environ.get("USER", "root"))
    known_hosts.write_text(server.host_entry())
    return server
