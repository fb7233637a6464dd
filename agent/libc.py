"""The one seam to libc: setns, unshare, mount, umount2, reboot, finit_module, and constants.

Both sides use it: the agent in the guest (mounts, joining a container's network namespace,
power-off), and the host side (the shim joining a netns, the network package, the sandbox
share's mounts), which imports it from here as it imports the mux codec (the agent package is
the one the host may import, never the other way). Every kernel call that Python's ``os``
lacks goes through ``current``, a ``Libc`` (ctypes over the process's own libc, loaded on
first use), so unit tests swap in a recording fake with ``monkeypatch.setattr(libc,
"current", fake)`` and run without root. Failures raise ``OSError`` with the errno; callers
turn it into their own error with the context they have.

``join_netns`` moves the calling thread into a network namespace (setns is per thread);
``in_thread`` runs a function in a fresh thread that may join one and then ends, so no
long-lived thread (gRPC workers, the channel, the caller's) ever changes namespace.

May import: the standard library (at module level ``os`` only: the shim imports this
module; ``ctypes`` and ``threading`` where they are used).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing is 4 ms of the shim's start: for the type checker only
if TYPE_CHECKING:
    import ctypes
    from collections.abc import Callable
    from typing import Protocol, TypeVar

    T = TypeVar("T")
else:
    Protocol = object

CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2
RB_POWER_OFF = 0x4321FEDC
SYS_FINIT_MODULE = 313  # x86_64; the guest is x86_64 (glibc has no wrapper)


class Libc(Protocol):
    def setns(self, fd: int, nstype: int) -> None: ...
    def unshare(self, flags: int) -> None: ...
    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None: ...
    def umount2(self, target: str, flags: int) -> None: ...
    def reboot(self, cmd: int) -> None: ...
    def finit_module(self, fd: int) -> None: ...


def _b(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


class CLibc:
    """The real calls, through ctypes (loaded on first use)."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None

    def _call(self, name: str, what: str, *args: object) -> None:
        import ctypes  # on first use: the shim imports this module

        if self._lib is None:
            self._lib = ctypes.CDLL(None, use_errno=True)
        if getattr(self._lib, name)(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), what)

    def setns(self, fd: int, nstype: int) -> None:
        self._call("setns", f"setns({fd})", fd, nstype)

    def unshare(self, flags: int) -> None:
        self._call("unshare", "unshare", flags)

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        self._call("mount", target, _b(source), _b(target), _b(fstype), flags, _b(data))

    def umount2(self, target: str, flags: int) -> None:
        self._call("umount2", target, _b(target), flags)

    def reboot(self, cmd: int) -> None:
        self._call("reboot", "reboot", cmd)

    def finit_module(self, fd: int) -> None:
        self._call("syscall", f"finit_module({fd})", SYS_FINIT_MODULE, fd, b"", 0)


current: Libc = CLibc()


def setns(fd: int, nstype: int) -> None:
    current.setns(fd, nstype)


def unshare(flags: int) -> None:
    current.unshare(flags)


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    current.mount(source, target, fstype, flags, data)


def umount2(target: str, flags: int = 0) -> None:
    current.umount2(target, flags)


def reboot(cmd: int) -> None:
    """reboot(2); with RB_POWER_OFF it returns only if it failed (OSError)."""
    current.reboot(cmd)


def finit_module(fd: int) -> None:
    """Loads the kernel module open at ``fd`` (finit_module(2), no parameters)."""
    current.finit_module(fd)


def join_netns(path: str) -> None:
    """Moves the calling thread into the network namespace at ``path``; an OSError names
    ``path`` whether opening it or joining it failed."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, CLONE_NEWNET)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from exc
    finally:
        os.close(fd)


def in_thread(fn: Callable[[], T], name: str) -> T:
    """Runs ``fn`` in a fresh thread (which may change namespace and then ends); its result
    or exception comes back to the caller."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    import threading  # here: the shim imports this module and never calls this

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
