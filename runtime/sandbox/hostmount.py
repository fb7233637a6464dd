"""Host mounts for the sandbox share: bind mounts in, detach-unmounts out, and a remove that
never crosses into a mounted filesystem (a bind-mounted container rootfs must never be
deleted through the share).

The share directory is bind-mounted onto itself and made shared before virtiofsd starts:
virtiofsd sandboxes itself in a mount namespace whose mounts are slaves of the host's, so
binds added later (containers joining a pod) still propagate to it.

May import: the standard library, cocoon.agent.libc, cocoon.runtime.errors.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cocoon.agent import libc
from cocoon.runtime.errors import HostError


def _mount(src: str | None, target: str, flags: int) -> None:
    try:
        libc.mount(src, target, None, flags)
    except OSError as exc:
        raise HostError(f"mount {src or ''} on {target}: {exc.strerror}") from None


def bind(src: Path, target: Path) -> None:
    """Bind-mounts ``src`` (file or directory) at ``target``, creating the mount point."""
    if src.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    _mount(str(src), str(target), libc.MS_BIND | libc.MS_REC)


def make_shared(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _mount(str(d), str(d), libc.MS_BIND)
    _mount(None, str(d), libc.MS_SHARED)


def mounts_under(d: Path) -> list[str]:
    """Mount points at or below ``d``, deepest first."""
    prefix = str(d.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return sorted(set(found), key=len, reverse=True)


def unmount_all(d: Path) -> None:
    """Detaches every mount at or below ``d``."""
    for _ in range(5):
        mps = mounts_under(d)
        if not mps:
            return
        for mp in mps:
            with contextlib.suppress(OSError):  # checked below, all at once
                libc.umount2(mp, libc.MNT_DETACH)
    left = mounts_under(d)
    if left:
        raise HostError(f"cannot unmount {', '.join(left)}")


def safe_rmtree(d: Path) -> None:
    """Removes ``d`` after unmounting what is below it; never follows into another device."""
    if not d.exists():
        return
    unmount_all(d)
    top = os.lstat(d).st_dev
    _remove(d, top)


def _remove(p: Path, dev: int) -> None:
    st = os.lstat(p)
    if st.st_dev != dev:
        raise HostError(f"refusing to remove {p}: a different filesystem is mounted there")
    if stat.S_ISDIR(st.st_mode):
        for child in p.iterdir():
            _remove(child, dev)
        p.rmdir()
    else:
        p.unlink()
