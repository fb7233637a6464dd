"""The launch contract: what the launcher hands the monitor, written to and read from one file.

``VmLimits`` is what the VM is built to hold, typed once: qemu_argv builds QEMU's command line
from it, the launcher writes it into the launch file, and the monitor's hot-plug checks every
request against it. Both sides import this module, so it stays standard-library only.

May import: the standard library only.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
# The machine's shape both sides must agree on: qemu_argv builds it, hot-plug addresses it.
VMEM_BLOCK_MIB = 2  # virtio-mem's block size: memory is resized in these steps
ROOT_PORT_SLOT = 0x10  # root port i sits at slot ROOT_PORT_SLOT + i // 8, function i % 8 on pcie.0
# A VM restored from a template (sandbox.template) gets its virtio-fs device hot-plugged into a
# root port of its own (QEMU 7.2 cannot migrate vhost-user-fs, so the template has none).
SHARE_TAG = "cocoon"  # the virtio-fs / 9p tag the guest mounts the sandbox share by
FS_PORT_ID = "rpfs"
FS_PORT_SLOT = 0x0F
FS_PORT_ADDRESS = f"0000:00:{FS_PORT_SLOT:02x}.0"  # as the guest sees it


@dataclass(frozen=True)
class VmLimits:
    """The VM's size at boot and the ceilings it was built for (maxcpus, maxmem, slots, ports)."""

    vcpus: int
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int
    memory_slots: int
    root_ports: int
    memory_hotplug: str = "virtio-mem"  # or "pc-dimm"
    cpu_hotunplug: bool = False  # the hypervisor survives a vCPU device_del
    shared_memory: bool = True  # guest RAM must be shareable (virtio-fs): memfd backends

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VmLimits:
        return cls(**d)


@dataclass(frozen=True)
class HostCgroup:
    """Where the sandbox's processes run on the host (monitor.hostcgroup): the cgroup to join in
    each hierarchy, the monitor's own cgroup there to go back to, and the cgroups made for it
    (parents first), removed when the sandbox ends. Empty: the caller's cgroups, untouched."""

    join: list[str] = field(default_factory=list)
    home: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)


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
    limits: VmLimits
    log_file: str = ""
    log_format: str = "text"
    debug: bool = False
    cgroup: HostCgroup = field(default_factory=HostCgroup)
    # A pooled VM (sandbox.pool): the key of what it was booted from (empty: booted for its
    # sandbox), and once claimed the sandboxes/<name> link that names it.
    pool_key: str = ""
    alias: str = ""
    # Non-root QEMU (monitor.qemuuser): [first uid, count] to take QEMU's uid from; empty:
    # QEMU runs as root. The argv then starts QEMU paused (-S), the monitor adds -runas.
    qemu_uids: list[int] = field(default_factory=list)
    # Templates (sandbox.template): "save" boots the template VM and saves it into
    # ``template_dir``; "restore" restores ``template_dir`` into guest RAM copied to
    # ``memory_file`` (argv is then the restore's; ``cold_argv`` is the boot to fall back to).
    template: str = ""
    template_dir: str = ""
    memory_file: str = ""
    cold_argv: list[str] = field(default_factory=list)
    mergeable: bool = False  # its memory offered to KSM (monitor.ksm)

    @property
    def dir(self) -> Path:
        return Path(self.state_dir)

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> LaunchSpec:
        raw = json.loads(path.read_text())
        cgroup = HostCgroup(**raw.get("cgroup", {}))
        return cls(**(raw | {"limits": VmLimits.from_dict(raw["limits"]), "cgroup": cgroup}))


def drop_dangling(link: Path) -> None:
    """Removes ``link`` if it is a symlink whose target is gone (a claimed pooled VM's
    ``sandboxes/<name>`` after its VM ended)."""
    if link.is_symlink() and not link.exists():
        with contextlib.suppress(FileNotFoundError):
            link.unlink()


# File names inside a sandbox state directory (QEMU's own are in qemu_argv.SandboxPaths).
MONITOR_SOCK = "monitor.sock"
STDIO_SOCK = "stdio.sock"  # the shims' raw streams and control lines (monitor.stdio)
EXEC_MAX = 2 * 1024 * 1024  # the largest process JSON `exec` hands stdio.sock (the agent: 4 MiB)
AGENT_SOCK = "agent.sock"
LAUNCH_FILE = "launch.json"
MONITOR_PID = "monitor.pid"
QEMU_PID = "qemu.pid"
QEMU_UID = "qemu.uid"  # a non-root QEMU's uid (monitor.qemuuser)
QEMU_LOG = "qemu.log"
MONITOR_LOG = "monitor.log"
VIRTIOFSD_LOG = "virtiofsd.log"
NETWORK_RECORD = "network.json"  # what networking made in the netns (runtime.network)
POOL_READY = "ready"  # a pooled VM's marker: booted, warmed, free to claim (the fill writes it)
POOL_CLAIMED = "claimed"  # what a claim renames POOL_READY to (atomic); holds the claimer's pid
# A template's files (sandbox.template): guest RAM, QEMU's saved device state, what it is.
TEMPLATE_MEMORY = "memory"
TEMPLATE_STATE = "state"
TEMPLATE_META = "meta.json"
