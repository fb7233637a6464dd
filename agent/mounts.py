"""Mounting in the guest: mount(2) through the agent's libc seam (the guest has busybox, but
a syscall needs no process), making the mount point first, and whether a path is mounted.

May import: the standard library, cocoon.agent.libc.
"""

from __future__ import annotations

from pathlib import Path

from cocoon.agent import libc


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
