"""Network namespaces on the host: entering one, making and removing one, opening netlink.

Work inside a namespace runs in a fresh thread that joins it and then ends (setns is per
thread), so no thread of the caller ever changes namespace. Every kernel call goes through
cocoon.agent.libc, so unit tests run this without root.

May import: the standard library, pyroute2 (lazily), cocoon.agent.libc,
cocoon.runtime.errors.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cocoon.agent import libc
from cocoon.runtime.errors import NetworkError

T = TypeVar("T")


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Runs ``fn`` in a new thread that has joined the network namespace at ``path``."""
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"network namespace {path}: {exc.strerror}") from None

    def run() -> T:
        try:
            libc.setns(nsfd, libc.CLONE_NEWNET)
        except OSError as exc:
            raise NetworkError(f"network namespace {path}: not one ({exc.strerror})") from None
        return fn()

    try:
        return libc.in_thread(run, "netns")
    finally:
        os.close(nsfd)


def create_netns(path: Path) -> None:
    """A new, empty network namespace bound at ``path`` (as `ip netns add` does, without
    making the directory a mount point): a thread unshares its network namespace and binds
    it to the file, then ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))

    def run() -> str:
        try:
            libc.unshare(libc.CLONE_NEWNET)
        except OSError as exc:
            return f"unshare: {exc.strerror}"
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net"
        try:
            libc.mount(src, str(path), None, libc.MS_BIND)
        except OSError as exc:
            return f"bind: {exc.strerror}"
        return ""

    error = libc.in_thread(run, "netns-create")
    if error:
        with contextlib.suppress(OSError):
            path.unlink()
        raise NetworkError(f"cannot create a network namespace at {path}: {error}")


def remove_netns(path: Path) -> None:
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        libc.umount2(str(path), libc.MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def iproute() -> Any:
    """A pyroute2 IPRoute for the calling thread's namespace (imported on first use)."""
    from pyroute2 import IPRoute

    return IPRoute()
