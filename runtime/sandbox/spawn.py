"""How a sandbox's monitor process comes to be: forked by the state root's fork server
(monitor.forkserver), which is started here when there is none, so that the monitors of one
root share their interpreter's pages; or, when the server cannot serve (``[runtime]
fork_monitors = false``, a kernel that refuses to rename the forked process, anything else),
a fresh interpreter as before. Either way the monitor has the same command line, session,
environment, umask, rlimits, nice, CPU affinity and OOM score as the launcher's child would
have, and the caller gets a ``Process`` (``subprocess.Popen``'s pid, poll, wait, kill and
returncode) to wait for or kill it: a forked monitor's exit status comes from the server.

May import: the standard library, cocoon.runtime.pids (the server is reached by its module's
name and socket).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cocoon.runtime.pids import pid_alive

log = logging.getLogger("cocoon.spawn")

MONITOR_MODULE = "cocoon.runtime.monitor.main"
SERVER_MODULE = "cocoon.runtime.monitor.forkserver"
SOCKET_NAME = "monitor-forkserver.sock"
CODE = str(Path(__file__).parents[2])  # cocoon's package folder; the server compares its own
SERVER_START_S = 30.0  # its imports, on a busy host (~0.12 s on an idle one)
REPLY_S = 30.0
UNKNOWN_STATUS = 255  # a forked monitor whose server died before it: its status is lost
# The server's environment carries this much room for its forked monitors' command lines,
# which are written over its own argument and environment strings (forkserver.set_cmdline).
ROOM_ENV = "COCOON_FORKSERVER_ROOM"
ROOM = 512
RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_STACK")


class Unavailable(Exception):
    """The fork server could not fork this monitor (the reason; a fresh one is started)."""


class Process(Protocol):
    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def socket_path(root: Path) -> Path:
    return root.absolute() / SOCKET_NAME


def server_pids(root: Path) -> list[int]:
    """The live fork servers of ``root`` (one, or none; briefly two when two launches raced
    to start one)."""
    sock = str(socket_path(root)).encode()
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if SERVER_MODULE.encode() in cmd and sock in cmd and pid_alive(int(p)):
                found.append(int(p))
    return found


class Forked:
    """A monitor forked by the server: waited for through the server's connection (its exit
    status), signalled through a pidfd (never a reused pid)."""

    def __init__(self, pid: int, conn: socket.socket) -> None:
        self.pid = pid
        self.conn: socket.socket | None = conn
        self.returncode: int | None = None
        self.pidfd = -1
        with contextlib.suppress(OSError):
            self.pidfd = os.pidfd_open(pid)

    def _ended(self, timeout: float | None) -> bool:
        if self.returncode is not None:
            return True
        if self.conn is not None:
            r, _, _ = select.select([self.conn], [], [], timeout)
            if not r:
                return False
            status = _exit_status(self.conn)
            self.conn.close()
            self.conn = None
            if status is not None:
                return self._done(status)
        # The server ended before the monitor: the monitor itself is waited for.
        if self.pidfd >= 0:
            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                return False
        return self._done(UNKNOWN_STATUS)

    def _done(self, status: int) -> bool:
        self.returncode = status
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return True

    def poll(self) -> int | None:
        self._ended(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(MONITOR_MODULE, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None and self.pidfd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            if self.pidfd >= 0:
                os.close(self.pidfd)


def _exit_status(conn: socket.socket) -> int | None:
    try:
        msg = conn.recv(4096)
        status = json.loads(msg).get("exit") if msg else None
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, int) else None


def monitor(root: Path, args: list[str], log_path: Path, ready_fd: int, fork: bool) -> Process:
    """The monitor started with ``args`` (after the module; ``--ready-fd`` is added), its
    stdout and stderr on ``log_path``."""
    cmdline = [sys.executable, "-m", MONITOR_MODULE, *args]
    if fork:
        try:
            return forked(root, cmdline, log_path, ready_fd)
        except Unavailable as exc:
            log.debug("monitor not forked (%s): a fresh interpreter instead", exc)
    with open(log_path, "wb") as mlog:
        return subprocess.Popen(
            [*cmdline, "--ready-fd", str(ready_fd)],
            stdin=subprocess.DEVNULL,
            stdout=mlog,
            stderr=mlog,
            pass_fds=(ready_fd,),
            start_new_session=True,
        )


def forked(
    root: Path, cmdline: list[str], log_path: Path, ready_fd: int, server_args: Sequence[str] = ()
) -> Forked:
    """The monitor forked by the root's server (one started, with ``server_args``, if needed);
    Unavailable when it cannot be, after one more try with a new server (the old one ended as
    it was asked, or runs code that changed on disk)."""
    path = socket_path(root)
    req = json.dumps(request(cmdline)).encode()
    for attempt in (1, 2):
        conn = _server(path, server_args)
        try:
            reply = _ask(conn, req, log_path, ready_fd)
        except Unavailable:  # it ended as it was asked
            conn.close()
            if attempt == 2:
                raise
            continue
        if isinstance(reply.get("pid"), int):
            return Forked(int(reply["pid"]), conn)  # type: ignore[call-overload]
        conn.close()
        error = str(reply.get("error"))
        if not error.startswith("stale") or attempt == 2:
            raise Unavailable(error)
    raise AssertionError("unreachable")


def _server(path: Path, server_args: Sequence[str]) -> socket.socket:
    """A connection to the root's server, started if there is none (one launch at a time
    starts one: concurrent launches share it)."""
    with contextlib.suppress(OSError):
        return _connect(path)
    try:
        lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise Unavailable(f"fork server lock: {exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            return _connect(path)
        start_server(path, server_args)
    finally:
        os.close(lock)
    try:
        return _connect(path)
    except OSError as exc:
        raise Unavailable(f"fork server at {path}: {exc}") from None


def request(cmdline: list[str]) -> dict[str, object]:
    """What a Popen'd child would have inherited from this process."""
    req: dict[str, object] = {
        "cmdline": cmdline,
        "python": sys.executable,
        "code": CODE,
        "env": dict(os.environ),
        "umask": _umask(),
        "rlimits": {n: resource.getrlimit(getattr(resource, n)) for n in RLIMITS},
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    with contextlib.suppress(OSError):
        req["cwd"] = os.getcwd()
    with contextlib.suppress(OSError, ValueError):
        req["oom_score_adj"] = int(Path("/proc/self/oom_score_adj").read_text())
    return req


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        raise
    return s


def _ask(conn: socket.socket, req: bytes, log_path: Path, ready_fd: int) -> dict[str, object]:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        fds = array.array("i", [ready_fd, fd])
        conn.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        r, _, _ = select.select([conn], [], [], REPLY_S)
        msg = conn.recv(65536) if r else b""
    except OSError as exc:
        raise Unavailable(f"fork server: {exc}") from None
    finally:
        os.close(fd)
    if not msg:
        raise Unavailable("the fork server ended without an answer")
    try:
        reply = json.loads(msg)
    except ValueError:
        raise Unavailable(f"fork server: a reply that is not JSON: {msg[:100]!r}") from None
    if not isinstance(reply, dict):
        raise Unavailable("fork server: a reply that is not an object")
    return reply


def start_server(path: Path, server_args: Sequence[str] = ()) -> None:
    """A fork server started for ``path``'s root (it detaches; this waits for its ready line
    or its failure)."""
    rfd, wfd = os.pipe()
    try:
        argv = [sys.executable, "-m", SERVER_MODULE, "--socket", str(path)]
        proc = subprocess.Popen(
            [*argv, "--ready-fd", str(wfd), *server_args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(wfd,),
            start_new_session=True,
            env={**os.environ, ROOM_ENV: "." * ROOM},
        )
    finally:
        os.close(wfd)
    try:
        proc.wait(SERVER_START_S)  # the first process only forks the server off and ends
        line = read_line(rfd, SERVER_START_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        line = ""
    finally:
        os.close(rfd)
    try:
        ready = json.loads(line) if line else {}
    except ValueError:
        ready = {}
    if not isinstance(ready, dict) or not ready.get("ok"):
        error = ready.get("error") if isinstance(ready, dict) else None
        raise Unavailable(str(error or "the fork server did not start"))


def read_line(fd: int, timeout: float) -> str:
    """One line from a ready pipe, or what came before ``timeout`` or EOF."""
    buf = b""
    end = time.monotonic() + timeout
    while b"\n" not in buf and (left := end - time.monotonic()) > 0:
        r, _, _ = select.select([fd], [], [], left)
        chunk = os.read(fd, 4096) if r else b""
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace").strip()
