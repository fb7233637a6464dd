"""The monitors' fork server: ``python -m cocoon.runtime.monitor.forkserver --socket PATH
--ready-fd N``, one per state root, at ``<root>/monitor-forkserver.sock``.

It imports what a monitor imports once, freezes those objects out of the garbage collector's
reach (``gc.freeze``: a collection would write to every one of them), and forks each new
monitor from that state instead of starting a fresh interpreter. The monitors of one root then
share their interpreter's and their imports' pages (copy-on-write) for as long as none of them
writes to a page: with 10 idle pods, a monitor's PSS is about half of a fresh one's
(docs/performance.md). The launcher (sandbox.spawn) starts the server when it finds none, and
falls back to a fresh interpreter when the server cannot serve.

The server is no daemon: it starts with a launch and ends as soon as the last monitor it forked
has ended (or ``FIRST_REQUEST_S`` after its start when no launch came; at once when another
server took its socket path). It moves itself to the root cgroups, so as not to keep the
cgroup of the caller that started it from being removed. Killing it harms no sandbox: its
monitors run on, and the next launch starts another server. It holds nothing of any sandbox;
a launcher that stops waiting for its monitor's status leaves it no descriptor.

Protocol (SOCK_SEQPACKET, owner-only): one request per connection, a JSON object with the
monitor's command line (``cmdline``, without ``--ready-fd``), its environment, umask, working
directory, rlimits, nice, CPU affinity and OOM score adjustment (what a monitor started by
``subprocess.Popen`` would have inherited from its launcher), and two fds: the ready pipe's
write end and the monitor's log. The forked monitor answers ``{"pid": N}`` itself once it
carries that command line (``/proc/PID/cmdline``, ``set_cmdline``: identity checks, ``ps``
and the leak checks see a monitor like any other), or ``{"error": ...}``; the server
later sends ``{"exit": STATUS}`` on the same connection when it has reaped it (``wait``), and
answers ``{"error": "stale: ..."}`` when cocoon's code changed on disk since it started (it
then stops taking requests, and the launcher starts a new one).

May import: the standard library, cocoon.runtime.fds, cocoon.runtime.monitor.{hostcgroup,
main} (main lazily: what the server preloads for the monitors).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import errno
import gc
import importlib
import json
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from cocoon.runtime import fds
from cocoon.runtime.monitor import hostcgroup

# What a monitor imports, at start or on its first calls (grpc's server and channel parts,
# the thread pool, shutil with its compressors), loaded once here for every monitor.
PRELOAD = (
    "cocoon.runtime.monitor.main",
    "grpc._channel",
    "grpc._server",
    "grpc._utilities",
    "concurrent.futures.thread",
    "queue",
    "shutil",
    "qemu.qmp.qmp_client",
)
MAX_REQUEST = 256 * 1024
FIRST_REQUEST_S = 30.0  # a server nobody asked within this time ends
RECV_TIMEOUT_S = 5.0  # for a request's bytes, once connected

TITLE_MAX = 4096  # the kernel reads a page of a command line that overran its arguments
PR_SET_MM, PR_SET_MM_ARG_START, PR_SET_MM_ARG_END = 35, 8, 9
_cmdline_buffer: object = None  # the memory /proc/self/cmdline reads, kept alive


class Stale(Exception):
    """cocoon's code on disk is not what this server imported."""


def set_cmdline(args: list[str]) -> None:
    """This process's command line as /proc/PID/cmdline shows it, set to ``args``. With
    CAP_SYS_RESOURCE, ``PR_SET_MM`` points the kernel at new memory (as systemd renames its
    processes). Without it, the line is written over the process's own argument strings, as
    setproctitle(3) does: NUL-separated when it fits in them, else as one line with spaces
    running on into the environment strings after them (the kernel reads it so), which the
    server is started with room in (spawn's ``ROOM_ENV``). OSError when neither fits."""
    global _cmdline_buffer
    raw = b"".join(a.encode() + b"\0" for a in args)
    buf = ctypes.create_string_buffer(raw, len(raw))
    start = ctypes.addressof(buf)
    end = start + len(raw)
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def mm(opt: int, addr: int) -> bool:
        return bool(prctl(PR_SET_MM, opt, addr, 0, 0) == 0)

    # The kernel checks start <= end after each call: which goes first depends on where the
    # new memory lies against the old.
    if (mm(PR_SET_MM_ARG_START, start) and mm(PR_SET_MM_ARG_END, end)) or (
        mm(PR_SET_MM_ARG_END, end) and mm(PR_SET_MM_ARG_START, start)
    ):
        _cmdline_buffer = buf
        return
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    arg_start, arg_end, env_start, env_end = (int(x) for x in stat[45:49])  # fields 48-51
    if len(raw) <= arg_end - arg_start:
        ctypes.memmove(arg_start, raw.ljust(arg_end - arg_start, b"\0"), arg_end - arg_start)
        return
    title = " ".join(args).encode().replace(b"\0", b" ") + b"\0"
    if env_start != arg_end or len(title) > min(env_end - arg_start, TITLE_MAX):
        raise OSError(errno.ENOSPC, f"no room for a command line of {len(title)} bytes")
    ctypes.memmove(arg_start, title, len(title))


def sources(prefix: str) -> dict[str, tuple[int, int]]:
    """(mtime, size) of each imported module's file under ``prefix`` (cocoon's code)."""
    out: dict[str, tuple[int, int]] = {}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.startswith(prefix):
            with contextlib.suppress(OSError):
                st = os.stat(f)
                out[f] = (st.st_mtime_ns, st.st_size)
    return out


def changed(recorded: dict[str, tuple[int, int]]) -> str:
    """The first recorded file that is no longer as it was, or ""."""
    for f, was in recorded.items():
        try:
            st = os.stat(f)
        except OSError:
            return f
        if (st.st_mtime_ns, st.st_size) != was:
            return f
    return ""


def to_root_cgroups() -> None:
    """This process into the root cgroup of every hierarchy: the server outlives the launch
    that started it, and must not keep that caller's cgroup (conmon's, a pod's) from being
    removed. Its monitors join their sandboxes' cgroups themselves."""
    with contextlib.suppress(OSError, ValueError):
        for point, _cg in hostcgroup.hierarchies():
            with contextlib.suppress(OSError):
                Path(point, "cgroup.procs").write_text(str(os.getpid()))


class Server:
    """The accept, fork and reap loop (``target`` is what a forked child runs: the monitor's
    ``main.run``; it must not return)."""

    def __init__(
        self,
        sock_path: Path,
        target: Callable[[], object],
        code_prefix: str,
        python: str,
        first_request_s: float = FIRST_REQUEST_S,
    ) -> None:
        self.path = sock_path
        self.first_request_s = first_request_s
        self.target = target
        self.python = python
        self.code_prefix = code_prefix
        self.code = sources(code_prefix)
        # Each forked monitor, with the connection its launcher may wait on for its status
        # (None once the launcher closed it: only waiting launchers hold a descriptor here).
        self.children: dict[int, socket.socket | None] = {}
        self.open = True  # its socket path still leads here
        self.served = False  # it has forked a monitor (it ends with the last one)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def bind(self) -> None:
        """Listens at the socket path, replacing a stale socket atomically (a server racing
        another for the same path: the later one wins, the other ends unasked)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self.listener.bind(str(tmp))
        self.listener.listen(64)
        os.rename(tmp, self.path)
        self.ino = os.stat(self.path).st_ino

    def ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.ino
        except OSError:
            return False

    def unlink(self) -> None:
        """The socket path removed if it is still this server's."""
        if self.ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        since = time.monotonic()  # the last request
        tick = min(1.0, self.first_request_s)
        while True:
            self.reap()
            if not self.children and (
                not self.open
                or self.served
                or time.monotonic() - since >= self.first_request_s
                or not self.ours()  # another server took the path: nobody finds this one
            ):
                self.close()  # no new launch finds it; one already connected is still served
                if not self.pending():
                    return
            waiting = {c.fileno(): pid for pid, c in self.children.items() if c is not None}
            try:
                watched = [self.listener.fileno(), self.wake_r, *waiting]
                r, _, _ = select.select(watched, [], [], None if self.children else tick)
            except InterruptedError:
                continue
            if self.wake_r in r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 4096)
            for fd in r:  # a launcher that stopped waiting: its connection is let go
                if fd in waiting:
                    self.letgo(waiting[fd])
            if self.listener.fileno() in r:
                since = time.monotonic()
                self.accept()

    def pending(self) -> bool:
        r, _, _ = select.select([self.listener], [], [], 0)
        return bool(r)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.unlink()

    def letgo(self, pid: int) -> None:
        conn = self.children.get(pid)
        if conn is not None:
            conn.close()
            self.children[pid] = None

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # EMFILE and the like: the connection waits in the backlog
            time.sleep(0.1)
            return
        got: list[int] = []
        try:
            conn.settimeout(RECV_TIMEOUT_S)
            msg, anc, _flags, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(8 * 4))
            got = _fds(anc)
            req = self.check(msg, got)
            pid = os.fork()
        except (OSError, ValueError, Stale) as exc:
            if isinstance(exc, Stale):
                self.close()  # first: the launcher's next try must not find this server
            self.answer(conn, {"error": str(exc)})
            for fd in got:
                os.close(fd)
            return
        if pid == 0:
            self.child(conn, req, got)  # never returns
        for fd in got:
            os.close(fd)
        self.children[pid] = conn
        self.served = True

    def check(self, msg: bytes, got: list[int]) -> dict[str, object]:
        if len(got) != 2:
            raise ValueError(f"a request carries 2 fds (ready pipe, log), not {len(got)}")
        try:
            req = json.loads(msg)
        except ValueError:
            raise ValueError("a request is one JSON object") from None
        if not isinstance(req, dict) or not isinstance(req.get("cmdline"), list):
            raise ValueError("a request is one JSON object with a cmdline list")
        if req.get("python") != self.python:
            raise Stale(f"stale: this server runs {self.python}, not {req.get('python')}")
        if req.get("code") != self.code_prefix:
            raise Stale(f"stale: this server runs cocoon from {self.code_prefix}")
        if f := changed(self.code):
            raise Stale(f"stale: {f} changed since this server started")
        return req

    def answer(self, conn: socket.socket, reply: dict[str, object]) -> None:
        with contextlib.suppress(OSError):
            conn.send(json.dumps(reply).encode())
        conn.close()

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                self.answer(conn, {"exit": os.waitstatus_to_exitcode(status)})

    def child(self, conn: socket.socket, req: dict[str, object], got: list[int]) -> None:
        """The forked monitor: this server's state dropped, the launcher's process state
        taken on, then ``target``. Never returns."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for s in (self.listener, *self.children.values()):
                if s is not None:
                    s.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            os.setsid()
            ready, log = got
            adopt(req, log)
            cmdline = [str(a) for a in req["cmdline"]]  # type: ignore[attr-defined]
            cmdline += ["--ready-fd", str(ready)]
            set_cmdline(cmdline)
            conn.send(json.dumps({"pid": os.getpid()}).encode())
            conn.close()
            sys.argv = cmdline[2:] if cmdline[1:2] == ["-m"] else cmdline[1:]
            self.target()
        except BaseException as exc:
            traceback.print_exc()  # on the monitor's log, once fds 1 and 2 are it
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"error": f"forked monitor: {exc}"}).encode())
        finally:
            os._exit(status)


def adopt(req: dict[str, object], log: int) -> None:
    """The launcher's process state, as ``subprocess.Popen`` would have passed it on."""
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    env = req.get("env")
    if isinstance(env, dict):
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
    os.umask(int(req.get("umask", 0o022)))  # type: ignore[call-overload]
    try:
        os.chdir(str(req.get("cwd") or "/"))
    except OSError:
        os.chdir("/")
    limits = req.get("rlimits")
    for name, (soft, hard) in limits.items() if isinstance(limits, dict) else ():
        with contextlib.suppress(AttributeError, ValueError, OSError):
            resource.setrlimit(getattr(resource, name), (soft, hard))
    if "nice" in req:
        with contextlib.suppress(OSError, TypeError, ValueError):
            os.setpriority(os.PRIO_PROCESS, 0, int(req["nice"]))  # type: ignore[call-overload]
    cpus = req.get("cpus")
    if isinstance(cpus, list) and cpus:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(0, cpus)
    if "oom_score_adj" in req:
        with contextlib.suppress(OSError):
            Path("/proc/self/oom_score_adj").write_text(str(req["oom_score_adj"]))


def _fds(anc: Iterable[tuple[int, int, bytes]]) -> list[int]:
    got = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got.frombytes(data[: len(data) - len(data) % got.itemsize])
    return list(got)


def code_prefix() -> str:
    """Where cocoon's code is imported from (the package's folder), found as the launcher
    finds it (sandbox.spawn ``CODE``)."""
    return str(Path(__file__).parents[2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cocoon-monitor-forkserver")
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--preload", action="append", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--target", default="cocoon.runtime.monitor.main:run", help=argparse.SUPPRESS)
    ap.add_argument(
        "--first-request-s", type=float, default=FIRST_REQUEST_S, help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    fds.close_inherited({args.ready_fd})
    if os.fork():  # the launcher waits for this one; the server is its child, then init's
        os._exit(0)
    os.setsid()
    os.umask(0o077)  # the socket: the owner's only
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    try:
        to_root_cgroups()
        for name in PRELOAD if args.preload is None else args.preload:
            importlib.import_module(name)
        mod, _, func = args.target.partition(":")
        target = getattr(importlib.import_module(mod), func)
        # Only now out of the launcher's directory: a relative entry of its PYTHONPATH (or a
        # namespace package's path) must resolve as it would for a monitor it started.
        os.chdir("/")
        set_cmdline(_own_cmdline())  # the same line: whether forked monitors can be renamed
        server = Server(args.socket, target, code_prefix(), sys.executable, args.first_request_s)
        server.bind()
    except (OSError, ImportError, AttributeError) as exc:
        fds.report(args.ready_fd, {"ok": False, "error": str(exc)})
        return 1
    gc.collect()
    gc.freeze()
    fds.report(args.ready_fd, {"ok": True, "pid": os.getpid()})
    server.serve()
    return 0


def _own_cmdline() -> list[str]:
    raw = Path("/proc/self/cmdline").read_bytes()
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


if __name__ == "__main__":
    os._exit(main())
