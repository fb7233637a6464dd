"""Non-root QEMU: a host uid of its own for each sandbox's QEMU, and what QEMU is handed.

With ``hypervisor.rootless`` QEMU starts as root only long enough to open what its command
line names (``-runas``), then runs as a uid no other process on the host has: one per VM, from
``hypervisor.rootless_uid_first`` on, ``rootless_uid_count`` of them, with no passwd entry
(QEMU 7.2 takes ``uid:gid``). An escape from one sandbox's QEMU is then an unprivileged
process that cannot signal, trace or read the memory of another sandbox's QEMU, and cannot
open host files that are not world-readable. What it needs later is handed to it: hot-plugged
disks as fds (``add-fd``, for every QEMU, root or not), tap and vhost-net fds (``getfd``), and
a VFIO group's node chowned to its uid for as long as the device is plugged.

Allocation is host-wide (uids are, whatever ``--root`` a caller uses): a marker file
``<UID_DIR>/<uid>`` made with O_EXCL under a flock holds the monitor's pid and its start time.
A marker whose monitor is gone and whose uid no process runs as any more is stale and taken
over; a uid some process still runs as (a QEMU that outlived its monitor) is never reused.

May import: the standard library, cocoon.runtime.pids.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from cocoon.runtime.pids import pid_alive, start_time

UID_DIR = Path("/run/cocoon-qemu-uids")


class UidError(Exception):
    pass


def _status(pid: int) -> dict[str, str]:
    """/proc/PID/status as fields (empty if the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def uids_of(pid: int) -> tuple[int, ...]:
    """The real, effective, saved and filesystem uids of ``pid`` (empty if it is gone or a
    zombie: a zombie holds nothing and waits only to be reaped)."""
    fields = _status(pid)
    if fields.get("State", "")[:1] in ("Z", "X"):
        return ()
    try:
        return tuple(int(x) for x in fields["Uid"].split()[:4])
    except (KeyError, ValueError):
        return ()


def capabilities_of(pid: int) -> int:
    """The permitted capability set of ``pid`` (-1 if it cannot be read)."""
    try:
        return int(_status(pid)["CapPrm"], 16)
    except (KeyError, ValueError):
        return -1


def uid_in_use(uid: int) -> bool:
    """Whether any process on the host runs with ``uid`` (real, effective or saved)."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and uid in uids_of(int(p.name))[:3]:
            return True
    return False


def _stale(marker: Path, uid: int) -> bool:
    """The marker's monitor is gone (or its pid names another process now) and nothing runs
    as ``uid`` any more."""
    try:
        pid, start = (int(x) for x in marker.read_text().split())
    except (OSError, ValueError):
        pid = start = 0
    if pid_alive(pid) and start_time(pid) == start:
        return False
    return not uid_in_use(uid)


def allocate(first: int, count: int, seed: str, directory: Path = UID_DIR) -> int:
    """A uid in [first, first + count) that no live sandbox holds, marked as this process's.
    The search starts at a point ``seed`` (the sandbox's id) picks, so concurrent boots rarely
    contend."""
    if count < 1:
        raise UidError("no uids to allocate from (hypervisor.rootless_uid_count)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    me = f"{os.getpid()} {start_time(os.getpid())}\n"
    start = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) % count
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for i in range(count):
            uid = first + (start + i) % count
            marker = directory / str(uid)
            if marker.exists():
                if not _stale(marker, uid):
                    continue
                marker.unlink()
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return uid
    raise UidError(
        f"all {count} QEMU uids from {first} are in use (hypervisor.rootless_uid_first, "
        "rootless_uid_count)"
    )


def release_stale(uid: int, directory: Path = UID_DIR) -> None:
    """Gives back ``uid`` if its monitor died and nothing runs as it any more (the clean-up of
    a sandbox whose monitor was killed), so it is free again before the next allocation."""
    marker = directory / str(uid)
    with contextlib.suppress(OSError), open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and _stale(marker, uid):
            marker.unlink()


def release(uid: int, directory: Path = UID_DIR) -> None:
    """Gives ``uid`` back if this process holds it (its QEMU must be gone)."""
    marker = directory / str(uid)
    with contextlib.suppress(OSError, ValueError):
        if int(marker.read_text().split()[0]) == os.getpid():
            marker.unlink()


def grant(node: Path, uid: int) -> tuple[int, int]:
    """Hands a device node (a VFIO group's) to QEMU's uid, for QEMU to open on hot-plug;
    returns the owner it had, for ``revoke``."""
    try:
        st = node.stat()
        os.chown(node, uid, uid)
    except FileNotFoundError:
        raise UidError(f"{node} does not exist (is the group bound to vfio-pci?)") from None
    except OSError as exc:
        raise UidError(f"cannot hand {node} to QEMU's uid {uid}: {exc.strerror}") from exc
    return st.st_uid, st.st_gid


def revoke(node: Path, owner: tuple[int, int]) -> None:
    """Gives a device node back to its owner once QEMU let go of it."""
    with contextlib.suppress(OSError):
        os.chown(node, *owner)
