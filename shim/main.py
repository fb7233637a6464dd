"""The shim: one host process per container process; its pid stands for the workload.

``python -m cocoon.shim.main --sandbox-dir D --container ID [--exec-id E [--process-fd N]]
[--terminal] [--console-socket S] [--ready-fd N] [--netns PATH] [--ns KIND=PATH|KIND]...
[--go-fd N]``

``--go-fd``: a pipe the shim reads to its end before it does anything: ``go`` (the container
now exists in the guest) or nothing (it never will: the shim exits 0). ``create`` starts
the shim before it asks the agent for the container, so that the interpreter's start (~60 ms)
overlaps with that call.

``--process-fd``: an exec's OCI process as JSON (a memfd from ``cocoon exec``): the shim
starts it itself, on its control connection, after joining the namespaces and before it says
ready; the agent's refusal comes back on the ready fd as ``fail exec in ID: why``. A process
so started never runs without the shim that stands for it.

``--netns``: the container's network namespace, which the shim joins first, so that its pid
stands for the container there too (docker's libnetwork prestart hook finds the namespace
through /proc/<pid>/ns/net). ``--ns``: the IPC, UTS and cgroup namespaces the spec names by
path (joined) or asks new (``KIND`` alone: unshared), so that /proc/<pid>/ns/* of the pid that
stands for the container shows what runc's would (a pod's containers share the sandbox's).
The mount namespace stays the host's (a copy would pin the share's and the netns' mounts), and
a PID namespace cannot be entered by a running process.

It inherits the caller's stdio (pipes, FIFOs, /dev/null) or, for a terminal, makes a host pty
and sends its master over ``--console-socket`` (as runc does), then proxies to the agent's
process streams through the sandbox monitor's stdio endpoint (``<sandbox>/stdio.sock``,
runtime/monitor/stdio.py): one connection per stream, raw bytes, so the shim needs neither
gRPC nor protobuf. stdin goes until EOF (then the guest closes the process's stdin; an exec
whose caller gave /dev/null, as containerd and conmon do for a process without stdin, has the
process read /dev/null in the guest instead, and no stdin stream at all), stdout
and stderr until the guest closes them; a control connection carries signals and window
sizes as JSON lines and brings back the exit status. Every signal it receives is forwarded to
the workload. It exits with the workload's status (128 + signal number after a signal death)
once the output has drained; if the monitor goes away first, with 255.

Signals are taken with sigtimedwait in the main thread (blocked everywhere else), so that
the stream threads can block in reads and writes.

May import: the standard library, cocoon.agent.libc, cocoon.runtime.{errors, fds} (both
standard-library only).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import termios
import threading
import tty

from cocoon.agent import libc
from cocoon.runtime.errors import DEADLINE_WORDS
from cocoon.runtime.fds import close_inherited, is_dev_null

TYPE_CHECKING = False  # typing (4 ms of a 50 ms start) only for the type checker
if TYPE_CHECKING:
    from typing import Any

STDIO_SOCK = "stdio.sock"  # runtime/monitor/launch.py STDIO_SOCK (the shim imports no runtime)
NOT_FORWARDED = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE}
FORWARDED = {s for s in signal.valid_signals() if s not in NOT_FORWARDED}
CHUNK = 64 * 1024


def send_console(sock_path: str, master: int) -> None:
    """Sends the pty master to the caller's console socket (runc's protocol)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        fds = array.array("i", [master])
        s.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


class Shim:
    def __init__(self, args: argparse.Namespace) -> None:
        self.cid: str = args.container
        self.exec_id: str = args.exec_id or ""
        self.endpoint = os.path.join(args.sandbox_dir, STDIO_SOCK)
        self.control: socket.socket | None = None
        self.control_in: Any = None  # the control connection's reading side (one buffer)
        self.control_lock = threading.Lock()
        self.terminal: bool = args.terminal
        self.tty_fd: int | None = None  # the host side the caller talks to
        self.in_fd, self.out_fd, self.err_fd = 0, 1, 2
        self.done = threading.Event()
        self.main_thread = threading.get_ident()  # woken when done (it waits in sigtimedwait)
        self.status = 255
        self.saved_tty: list[Any] | None = None  # the caller's terminal mode, restored
        # The process reads /dev/null in the guest (``create`` and ``exec`` decided so from
        # this same fd 0, ours since we were started): no stdin stream to open.
        self.null_stdin = not self.terminal and is_dev_null(0)

    def setup_terminal(self, console_socket: str | None) -> None:
        if not self.terminal:
            return
        if console_socket:
            master, slave = os.openpty()
            tty.setraw(slave)
            send_console(console_socket, master)
            os.close(master)
            with contextlib.suppress(OSError):
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # SIGWINCH on resize
            if slave <= 2:
                slave = fcntl.fcntl(slave, fcntl.F_DUPFD_CLOEXEC, 3)
            # Let go of the caller's stdio (runc's detached init holds none of it): go-runc
            # reads `create`'s output pipe to EOF, so containerd's shim hangs while we hold it.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            self.tty_fd = slave
            self.in_fd = self.out_fd = slave
        elif os.isatty(0):
            self.tty_fd = 0
            self.saved_tty = termios.tcgetattr(0)
            tty.setraw(0)

    def winsize(self) -> tuple[int, int] | None:
        if self.tty_fd is None:
            return None
        try:
            rows, cols, _, _ = struct.unpack(
                "HHHH", fcntl.ioctl(self.tty_fd, termios.TIOCGWINSZ, b"\0" * 8)
            )
        except OSError:
            return None
        return (rows, cols) if rows and cols else None

    def connect(self, stream: str, body: bytes = b"", **extra: object) -> socket.socket:
        """A connection to the monitor's stdio endpoint for one stream of the process."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.endpoint)
            hello = {"container_id": self.cid, "exec_id": self.exec_id, "stream": stream}
            s.sendall(json.dumps(hello | extra).encode() + b"\n" + body)
        except OSError:
            s.close()
            raise
        return s

    def open_control(self, process: bytes) -> str:
        """The control connection; for an exec (``process``), its process started on it.
        Returns why the agent refused it ("" when started)."""
        extra: dict[str, object] = {}
        if process:
            extra = {"size": len(process), "terminal": self.terminal}
            if self.null_stdin:
                extra["stdin"] = False
        self.control = self.connect("control", process, **extra)
        self.control_in = self.control.makefile("rb")
        if not process:
            return ""
        try:
            answer = json.loads(self.control_in.readline(64 * 1024) or b"{}")
        except (OSError, ValueError):
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if answer.get("started") is True:
            return ""
        if answer.get("code") == "DEADLINE_EXCEEDED":
            return DEADLINE_WORDS
        return str(answer.get("error") or "the sandbox's monitor gave no answer")

    def send(self, msg: dict[str, object]) -> None:
        """A control line (a signal, a window size); lost with the monitor, like the workload."""
        if self.control is None:
            return
        with self.control_lock, contextlib.suppress(OSError):
            self.control.sendall(json.dumps(msg).encode() + b"\n")

    def resize(self) -> None:
        ws = self.winsize()
        if ws is not None:
            self.send({"resize": [ws[0], ws[1]]})

    def forward(self, sig: int) -> None:
        self.send({"signal": sig})

    def pump_stdin(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = os.read(self.in_fd, CHUNK)
                except OSError:
                    data = b""
                if not data:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_WR)
                        conn.recv(1)  # the monitor closes once the guest had the EOF
                    return
                try:
                    conn.sendall(data)
                except OSError:
                    return

    @staticmethod
    def pump_out(conn: socket.socket, fd: int) -> None:
        with conn:
            try:
                while data := conn.recv(CHUNK):
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
            except OSError:
                pass

    def wait(self) -> None:
        """The control connection's last answer: the exit status, or why it is lost."""
        reply: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            line = self.control_in.readline(4096)
            reply = json.loads(line) if line else {}
        status = reply.get("exit") if isinstance(reply, dict) else None
        if isinstance(status, int) and 0 <= status <= 255:
            self.status = status
        else:
            why = reply.get("lost") if isinstance(reply, dict) else None
            why = why or "the sandbox's monitor went away"
            print(f"cocoon-shim: {self.cid}: lost the workload: {why}", file=sys.stderr)
            self.status = 255
        self.done.set()
        # SIGCHLD is blocked everywhere and only taken by the main thread's sigtimedwait: it
        # returns now rather than at its next timeout, so the exit is not delayed.
        signal.pthread_kill(self.main_thread, signal.SIGCHLD)


NAMESPACES = {"ipc": libc.CLONE_NEWIPC, "uts": libc.CLONE_NEWUTS, "cgroup": libc.CLONE_NEWCGROUP}


def enter_namespaces(entries: list[str]) -> None:
    """``KIND=PATH``: joins the namespace at PATH; ``KIND``: a new one (unshare)."""
    for entry in entries:
        kind, _, path = entry.partition("=")
        flag = NAMESPACES[kind]
        if not path:
            libc.unshare(flag)
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc.setns(fd, flag)
            finally:
                os.close(fd)
        except OSError as exc:
            what = f"joining the {kind} namespace: {exc.strerror}"
            raise OSError(exc.errno, what, path) from None


def _go(fd: int) -> bool:
    """Waits on ``--go-fd``: the caller started this shim while the container was still
    being made, so that our interpreter's start overlapped with that; "go" once it exists,
    nothing (the pipe closed) when it never will."""
    said = b""
    while chunk := os.read(fd, 16):
        said += chunk
    os.close(fd)
    return said == b"go"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cocoon-shim")
    ap.add_argument("--sandbox-dir", required=True)
    ap.add_argument("--container", required=True)
    ap.add_argument("--exec-id", default="")
    ap.add_argument("--terminal", action="store_true")
    ap.add_argument("--console-socket")
    ap.add_argument("--ready-fd", type=int, default=-1)
    ap.add_argument("--process-fd", type=int, default=-1)
    ap.add_argument("--netns", default="")
    ap.add_argument("--ns", action="append", default=[])
    ap.add_argument("--go-fd", type=int, default=-1)
    args = ap.parse_args(argv)
    close_inherited({args.ready_fd, args.process_fd, args.go_fd})
    if args.go_fd >= 0 and not _go(args.go_fd):
        return 0  # the caller's create failed (or it died) before the container was made
    process = b""
    if args.process_fd >= 0:
        with os.fdopen(args.process_fd, "rb") as f:
            f.seek(0)  # a memfd its writer left at its end
            process = f.read()
    try:
        enter_namespaces(args.ns)
        if args.netns:
            libc.join_netns(args.netns)
    except OSError as exc:
        if args.ready_fd >= 0:
            os.write(args.ready_fd, f"error {exc}\n".encode())
        return 255
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED | {signal.SIGWINCH, signal.SIGCHLD})
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    shim = Shim(args)
    try:
        shim.setup_terminal(args.console_socket)
    except OSError as exc:
        print(f"cocoon-shim: console socket {args.console_socket}: {exc}", file=sys.stderr)
        return 255
    try:
        refused = shim.open_control(process)
        if refused:
            if args.ready_fd >= 0:
                os.write(args.ready_fd, f"fail exec in {shim.cid}: {refused}\n".encode())
            return 255
        conns = [(shim.connect("stdout"), shim.out_fd)]
        if not shim.terminal:
            conns.append((shim.connect("stderr"), shim.err_fd))
        stdin = None
        if not shim.null_stdin:
            stdin = shim.connect("stdin", close=not shim.terminal)
    except OSError as exc:
        print(f"cocoon-shim: {shim.endpoint}: {exc.strerror}", file=sys.stderr)
        if args.ready_fd >= 0:
            os.write(args.ready_fd, f"error {shim.endpoint}: {exc.strerror}\n".encode())
        return 255
    outs = [threading.Thread(target=shim.pump_out, args=c, daemon=True) for c in conns]
    for t in outs:
        t.start()
    if stdin is not None:
        threading.Thread(target=shim.pump_stdin, args=(stdin,), daemon=True).start()
    threading.Thread(target=shim.wait, daemon=True).start()
    shim.resize()
    if args.ready_fd >= 0:
        os.write(args.ready_fd, b"ok\n")
        os.close(args.ready_fd)
    waited = FORWARDED | {signal.SIGWINCH, signal.SIGCHLD}
    while not shim.done.is_set():
        info = signal.sigtimedwait(waited, 0.2)
        if info is None:
            continue
        if info.si_signo == signal.SIGWINCH:
            shim.resize()
        elif info.si_signo != signal.SIGCHLD:
            shim.forward(info.si_signo)
    for t in outs:
        t.join(30)
    if shim.saved_tty is not None:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(0, termios.TCSADRAIN, shim.saved_tty)
    return shim.status


def run(argv: list[str] | None = None) -> None:
    """main(), then out without the interpreter's teardown (~8 ms of an exec's exit path):
    nothing is left to flush but stdout and stderr. A forked shim ends here too."""
    status = main(argv)
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            f.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
