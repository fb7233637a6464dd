"""mount(2) for the agent (the guest has busybox, but a syscall needs no process).

May import: the standard library only.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID = 0x2
MS_NODEV = 0x4


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    Path(target).mkdir(parents=True, exist_ok=True)
    rc = _libc.mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target}: {os.strerror(err)}")


def is_mounted(target: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)
