"""Mounting in the guest: mount(2) through the agent's libc seam (the guest has busybox, but
a syscall needs no process), making the mount point first, and whether a path is mounted.

May import: the standard library, cocoon.agent.libc.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cocoon.agent import libc

PROPAGATION = {
    "shared": libc.MS_SHARED,
    "rshared": libc.MS_SHARED | libc.MS_REC,
    "slave": libc.MS_SLAVE,
    "rslave": libc.MS_SLAVE | libc.MS_REC,
    "private": libc.MS_PRIVATE,
    "rprivate": libc.MS_PRIVATE | libc.MS_REC,
    "unbindable": libc.MS_UNBINDABLE,
    "runbindable": libc.MS_UNBINDABLE | libc.MS_REC,
}


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """Mounts ``source`` (a device, or a tag such as virtiofs's) of type ``fstype`` on
    ``target``, made if missing; OSError names all three."""
    Path(target).mkdir(parents=True, exist_ok=True)
    try:
        libc.mount(source, target, fstype, flags, data or None)
    except OSError as exc:
        raise OSError(exc.errno, f"mount {fstype} {source} on {target}: {exc.strerror}") from exc


def is_mounted(target: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def propagation_wanted(spec: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(destination, flags) of each mount whose options ask for a propagation, in order."""
    out = []
    for m in spec.get("mounts") or []:
        if not isinstance(m, dict):
            continue
        for opt in m.get("options") or []:
            if isinstance(opt, str) and opt in PROPAGATION:
                out.append((str(m.get("destination", "")), PROPAGATION[opt]))
    return out


def apply_propagation(pid: int, wanted: list[tuple[str, int]]) -> None:
    """Sets each mount's propagation in the mount namespace of ``pid`` (a container crun
    created: crun 1.8 leaves the mounts with their root's propagation, where runc applies the
    options), from a thread of its own that unshared its fs context so it may join."""
    if not wanted:
        return
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)

    def run() -> None:
        libc.unshare(libc.CLONE_FS)
        libc.setns(fd, libc.CLONE_NEWNS)
        for dest, flags in wanted:
            try:
                libc.mount(None, dest, None, flags)
            except OSError as exc:
                raise OSError(exc.errno, f"propagation of {dest}: {exc.strerror}") from exc

    try:
        libc.in_thread(run, "mount-propagation")
    finally:
        os.close(fd)
