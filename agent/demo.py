"""`podq demo`: podq's main job on whatever the config names (by default this machine): one request of each
inspection type, the render -> stylize -> manifest pipeline, and a refused line, printed as results land."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

from agent import render
from agent.config import Config
from agent.daemon import BackgroundDaemon
from agent.submit import append_line, follow, results_size, submit

# The main job: render a base image of the character, stylize it, one manifest linking it all.
CHARACTER = {
    "type": "character", "download": True,
    "render": {"args": {"subject": "character", "pose": "walking", "resolution": [256, 256], "samples": 16,
                        "camera": {"azimuth_deg": 35, "elevation_deg": 8}, "passes": ["depth", "mask"]}},
    "stylize": {"prompt": "a heroic knight in ornate armour, comic book style", "negative_prompt": "blurry, text",
                "variants": 2, "seed": 7},
}


def run(config: Config) -> None:
    host = config.hosts[0]
    where = str(config.source) if config.source else "the embedded default config (a `local` host)"
    print(f"podq demo: {where}; queue {config.queue.dir}; host {host.name} ({host.kind})")
    if host.kind == "local":
        log_dir = Path(host.workspace) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "demo.log").write_text("".join(f"demo log line {i}\n" for i in range(1, 11)))
    requests: list[dict[str, Any]] = [
        {"type": "ping"},
        {"type": "gpu"},
        {"type": "df"},
        {"type": "ls", "path": "."},
        {"type": "tail_log", "path": "logs/demo.log", "lines": 3},
    ]
    binary = config.blender_binary(host)
    if host.kind != "local" or shutil.which(binary):
        requests.append(dict(CHARACTER))
    else:
        print(f"(no `{binary}` on this machine: the render-and-stylize step is skipped)")
    for r in requests:
        r["host"] = host.name
    # Written raw, as a careless writer might: the daemon answers it with a `rejected` line.
    bad_id = f"demo-bad-{secrets.token_hex(3)}"
    print(f"submitting {len(requests)} requests, plus one raw line the daemon must refuse ({bad_id})\n")
    offset = results_size(config)
    with BackgroundDaemon(config):
        ids = [submit(config, r) for r in requests]
        append_line(config.requests_path, {"id": bad_id, "type": "ls", "path": "../etc", "host": host.name})
        pending = {*ids, bad_id}
        for line in follow(config, offset, timeout_s=600):
            if line.id not in pending:
                continue
            print(render.event_line(line))
            if line.terminal:
                pending.discard(line.id)
                for artifact in (line.output or {}).get("artifacts", []):
                    print(f"    {artifact['path']} -> {artifact.get('local_path', '(not downloaded)')}")
                if (line.output or {}).get("emulated"):
                    print("    (stylized by podq's offline emulator of the Stability API: no API key is "
                          "configured; set STABILITY_API_KEY for real images)")
            if not pending:
                break
    print(f"\nresults: {config.results_path}\nnext: `podq tail`, `podq status`, `podq submit ping --wait`")
