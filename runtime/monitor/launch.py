"""The launch file: everything the monitor needs, written by the launcher, read by the monitor.

May import: the standard library only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LaunchSpec:
    sandbox_id: str
    state_dir: str
    argv: list[str]
    accel: str
    channel: str
    vsock_cid: int
    shared_fs: str
    virtiofsd: str
    ready_timeout_s: float
    request_timeout_s: float
    shutdown_timeout_s: float
    log_file: str = ""
    log_format: str = "text"
    debug: bool = False
    # hotplug.Limits as a dict: what the VM was built to hold (maxcpus, maxmem, slots, ports).
    hotplug: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return Path(self.state_dir)

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> LaunchSpec:
        return cls(**json.loads(path.read_text()))


# File names inside a sandbox state directory (QEMU's own are in qemu_argv.SandboxPaths).
MONITOR_SOCK = "monitor.sock"
AGENT_SOCK = "agent.sock"
LAUNCH_FILE = "launch.json"
MONITOR_PID = "monitor.pid"
QEMU_PID = "qemu.pid"
QEMU_LOG = "qemu.log"
MONITOR_LOG = "monitor.log"
VIRTIOFSD_LOG = "virtiofsd.log"
NETWORK_RECORD = "network.json"  # what networking made in the netns (runtime.network)
