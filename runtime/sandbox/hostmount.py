"""Host mounts for the sandbox share: bind mounts in, detach-unmounts out, and a remove that
never crosses into a mounted filesystem (a bind-mounted container rootfs must never be
deleted through the share).

The share directory is bind-mounted onto itself and made shared before virtiofsd starts:
virtiofsd sandboxes itself in a mount namespace whose mounts are slaves of the host's, so
binds added later (containers joining a pod) still propagate to it.

Everything below the share is the guest's to write (through virtiofsd), while the VM runs: a
root process in the guest can put a symlink where the host is about to make or remove a mount
point (``shared/<id>`` of a container joining or leaving a pod). So below a share (found by
``share_root``: the first ancestor named ``shared`` that is a mount point) no path is followed:
each component is opened with O_NOFOLLOW from the share down, the mount point is made with
mkdirat/mknodat, the bind goes onto ``/proc/self/fd/N`` of what was opened, unmounts go
through the same walk, and the remove walks directory fds (never a symlink, never another
device). Above the share the path is the host's own (the state root), followed as given.

May import: the standard library, cocoon.agent.libc, cocoon.runtime.errors.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from cocoon.agent import libc
from cocoon.runtime.errors import HostError

SHARE_NAME = "shared"  # the virtio-fs share in a sandbox's state dir (monitor.vm, container.create)
MAX_DEPTH = 128  # deeper trees below a share (the guest's doing) are refused, not recursed into
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _mount(src: str | None, target: str, flags: int, shown: str = "") -> None:
    try:
        libc.mount(src, target, None, flags)
    except OSError as exc:
        raise HostError(f"mount {src or ''} on {shown or target}: {exc.strerror}") from None


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4].replace("\\040", " ") for line in f}


def share_root(path: Path) -> Path | None:
    """The sandbox share ``path`` lies below: its first ancestor (from /) named ``shared``
    that is a mount point (make_shared binds it onto itself). Everything above it is the
    host's; everything below it may have been changed by the guest. None: not in a share."""
    p = Path(os.path.abspath(path))
    mps: set[str] | None = None
    for a in reversed(p.parents):
        if a.name == SHARE_NAME:
            mps = _mount_points() if mps is None else mps
            if os.path.realpath(a) in mps:
                return a
    return None


def _below(share: Path, path: Path) -> tuple[str, ...]:
    parts = Path(os.path.abspath(path)).relative_to(share).parts
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise HostError(f"{path}: not a path below the share {share}")
    return parts


@contextlib.contextmanager
def _walk(share: Path, parts: Sequence[str], shown: Path, create: bool) -> Iterator[int]:
    """An O_PATH fd of ``share/parts...``, each component a real directory (no symlink is
    followed; missing ones are made when ``create``)."""
    fd = os.open(share, _DIR)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                nfd = os.open(part, _DIR, dir_fd=fd)
            except OSError as exc:
                raise HostError(
                    f"{shown}: {part} is not a directory below the share ({exc.strerror}): "
                    "refusing to follow what the guest may have put there"
                ) from None
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def bind(src: Path, target: Path) -> None:
    """Bind-mounts ``src`` (file or directory) at ``target``, creating the mount point. Below
    a sandbox share, no symlink on the way to ``target`` is followed (see the module doc)."""
    share = share_root(target)
    if share is not None:
        _bind_below(src, share, target)
        return
    if src.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    _mount(str(src), str(target), libc.MS_BIND | libc.MS_REC)


def _bind_below(src: Path, share: Path, target: Path) -> None:
    parts = _below(share, target)
    is_dir = src.is_dir()
    with _walk(share, parts[:-1], target, create=True) as dfd:
        name = parts[-1]
        with contextlib.suppress(FileExistsError):
            if is_dir:
                os.mkdir(name, 0o755, dir_fd=dfd)
            else:
                os.mknod(name, stat.S_IFREG | 0o644, dir_fd=dfd)
        tfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            mode = os.fstat(tfd).st_mode
            if not (stat.S_ISDIR(mode) if is_dir else stat.S_ISREG(mode)):
                want = "directory" if is_dir else "regular file"
                raise HostError(
                    f"refusing to mount on {target}: not a {want} "
                    f"(a {_kind(mode)} the guest may have put there)"
                )
            _mount(str(src), f"/proc/self/fd/{tfd}", libc.MS_BIND | libc.MS_REC, str(target))
        finally:
            os.close(tfd)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "regular file"
    return "special file"


def make_shared(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _mount(str(d), str(d), libc.MS_BIND)
    _mount(None, str(d), libc.MS_SHARED)


def mounts_under(d: Path) -> list[str]:
    """Mount points at or below ``d``, deepest first. Below a share, ``d`` is not resolved
    (a symlink the guest put there has nothing of ours below it)."""
    share = share_root(d)
    if share is not None:
        prefix = os.path.join(os.path.realpath(share), *_below(share, d))
    else:
        prefix = str(d.resolve())
    found = [m for m in _mount_points() if m == prefix or m.startswith(prefix + "/")]
    return sorted(set(found), key=len, reverse=True)


def _umount(mp: str) -> None:
    share = share_root(Path(mp))
    if share is None:
        libc.umount2(mp, libc.MNT_DETACH)
        return
    parts = _below(share, Path(mp))
    with _walk(share, parts[:-1], Path(mp), create=False) as dfd:
        fd = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise HostError(f"refusing to unmount {mp}: it is a symlink now")
            libc.umount2(f"/proc/self/fd/{fd}", libc.MNT_DETACH)
        finally:
            os.close(fd)


def unmount_all(d: Path) -> None:
    """Detaches every mount at or below ``d``."""
    for _ in range(5):
        mps = mounts_under(d)
        if not mps:
            return
        for mp in mps:
            with contextlib.suppress(OSError, HostError):  # checked below, all at once
                _umount(mp)
    left = mounts_under(d)
    if left:
        raise HostError(f"cannot unmount {', '.join(left)}")


def safe_rmtree(d: Path) -> None:
    """Removes ``d`` after unmounting what is below it; never follows a symlink or goes into
    another device (a symlink at ``d`` itself is removed, not followed)."""
    if not os.path.lexists(d):
        return
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        d.unlink()
        return
    unmount_all(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _clear(fd, d, os.fstat(fd).st_dev, 0)
    finally:
        os.close(fd)
    d.rmdir()


def _clear(dfd: int, where: Path, dev: int, depth: int) -> None:
    """Removes everything in the directory open as ``dfd``, through directory fds only."""
    if depth > MAX_DEPTH:
        raise HostError(f"refusing to remove {where}: nested deeper than {MAX_DEPTH} directories")
    for name in os.listdir(dfd):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if st.st_dev != dev:
            raise HostError(
                f"refusing to remove {where / name}: a different filesystem is mounted there"
            )
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dfd)
            continue
        cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            if os.fstat(cfd).st_dev != dev:
                raise HostError(
                    f"refusing to remove {where / name}: a different filesystem is mounted there"
                )
            _clear(cfd, where / name, dev, depth + 1)
        finally:
            os.close(cfd)
        os.rmdir(name, dir_fd=dfd)
