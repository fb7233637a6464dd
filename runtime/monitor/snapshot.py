"""Saving a booted VM as a template and restoring new VMs from it (QEMU migration to a file).

A template is two files (sandbox.template names them): the guest's RAM, which the template VM
had in a file (``memory-backend-file,share=on``), and QEMU's device state, which ``save``
writes with a migration to an fd the monitor opened. The ``x-ignore-shared`` capability leaves
shared RAM out of the stream: guest RAM (kept in its file), the read-only root image on an
NVDIMM (the same file on both sides) and the unplugged virtio-mem region, so the state is
~0.5 MiB and a restore reads no RAM through the stream. ``copy_memory`` gives each clone its
own copy of the template's RAM (only the extents that hold data: the file is sparse), which
QEMU maps shared again because vhost-user needs it; ``load`` feeds the state to a QEMU started
with ``-incoming defer``. ``plug_share`` hot-plugs the virtio-fs device a template cannot hold
(QEMU 7.2's vhost-user-fs has a migration blocker), connecting to virtiofsd from the monitor
and handing QEMU the connected socket, so that a non-root QEMU needs no access to it.

QEMU never opens these files itself: fds go over QMP (``getfd``), which the seccomp filter
and a non-root QEMU both allow.

May import: the standard library, cocoon.runtime.errors, cocoon.runtime.monitor.launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cocoon.runtime.errors import StartError
from cocoon.runtime.monitor.launch import FS_PORT_ID, SHARE_TAG

QmpFn = Callable[[str, dict[str, Any] | None], Awaitable[Any]]
PassFdFn = Callable[[int, str], Awaitable[None]]

IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
STATE_FD = "template-state"
SHARE_FD = "virtiofsd"
COPY_CHUNK = 64 * 1024 * 1024


async def save(qmp: QmpFn, pass_fd: PassFdFn, state: Path, timeout: float) -> None:
    """The running VM paused and its device state written to ``state`` (a new file)."""
    await qmp("stop", None)
    await qmp("migrate-set-capabilities", IGNORE_SHARED)
    await _hand_over(pass_fd, state, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    await qmp("migrate", {"uri": f"fd:{STATE_FD}"})
    await _wait(qmp, timeout, "saving the template")


async def load(qmp: QmpFn, pass_fd: PassFdFn, state: Path, timeout: float) -> None:
    """A QEMU started with ``-incoming defer`` fed the template's device state from ``state``;
    it stays paused (``-S``) until the caller resumes it."""
    await qmp("migrate-set-capabilities", IGNORE_SHARED)
    await _hand_over(pass_fd, state, os.O_RDONLY)
    await qmp("migrate-incoming", {"uri": f"fd:{STATE_FD}"})
    await _wait(qmp, timeout, "restoring the template")


async def _hand_over(pass_fd: PassFdFn, state: Path, flags: int) -> None:
    """``state`` opened by the monitor and given to QEMU as ``STATE_FD``."""
    fd = os.open(state, flags | os.O_CLOEXEC, 0o600)
    try:
        await pass_fd(fd, STATE_FD)
    finally:
        os.close(fd)


async def _wait(qmp: QmpFn, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while True:
        info = await qmp("query-migrate", None)
        status = info.get("status", "") if isinstance(info, dict) else ""
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", "no reason given")
            raise StartError(f"{what}: QEMU's migration {status}: {why}")
        if time.monotonic() > end:
            raise StartError(f"{what}: not done after {timeout:g}s (migration {status})")
        await asyncio.sleep(0.01)


def copy_memory(src: Path, dst: Path) -> int:
    """``src`` copied to the new file ``dst`` (0600) extent by extent, holes left holes;
    returns the bytes copied. Raises OSError (dst removed)."""
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            copied = 0
            for start, end in _extents(fin.fileno(), size):
                _copy_range(fin.fileno(), fd, start, end)
                copied += end - start
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        os.close(fd)
    return copied


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Bytes ``start``..``end`` of ``src`` to the same offsets of ``dst``, in the kernel:
    copy_file_range within one filesystem, sendfile across them (the template is on the state
    root's filesystem, the copy on tmpfs)."""
    off = start
    while off < end:
        try:
            n = os.copy_file_range(src, dst, min(COPY_CHUNK, end - off), off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.lseek(dst, off, os.SEEK_SET)
            n = os.sendfile(dst, src, off, min(COPY_CHUNK, end - off))
        if n == 0:
            raise OSError(errno.EIO, f"the template's memory ended early at {off}")
        off += n


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``fd`` that hold data (SEEK_DATA / SEEK_HOLE)."""
    out = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past off
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size)))
        off = end
    return out


async def plug_share(qmp: QmpFn, pass_fd: PassFdFn, virtiofsd_sock: Path) -> None:
    """The virtio-fs device a template leaves out, plugged into its own root port: the
    monitor connects to virtiofsd and QEMU gets the connected socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(virtiofsd_sock))
        await pass_fd(sock.fileno(), SHARE_FD)
    finally:
        sock.close()
    await qmp(
        "chardev-add",
        {
            "id": "vfs",
            "backend": {
                "type": "socket",
                "data": {"addr": {"type": "fd", "data": {"str": SHARE_FD}}, "server": False},
            },
        },
    )
    await qmp(
        "device_add",
        {
            "driver": "vhost-user-fs-pci",
            "id": "fs0",
            "chardev": "vfs",
            "tag": SHARE_TAG,
            "queue-size": 1024,
            "bus": FS_PORT_ID,
        },
    )
