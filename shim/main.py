"""The shim: one host process per container process; its pid stands for the workload.

``cocoon-shim --sandbox-dir D --container ID [--exec-id E [--process-fd N]] [--terminal]
[--console-socket S] [--ready-fd N] [--netns PATH] [--ns KIND=PATH|KIND]... [--go-fd N]``,
started by the runtime as ``python -I -S -c SHIM_BOOT ROOT OPTIONS...``
(runtime/container/shim.py ``command``: no ``site``, no ``runpy``) or forked by a foreground
exec; ``python -m cocoon.shim.main OPTIONS...`` runs it too.

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

Signals are taken with sigwaitinfo in the main thread (blocked everywhere else), so that
the stream threads can block in reads and writes; the thread that gets the exit status wakes
it with a SIGCHLD of its own, so an idle shim never wakes.

Its resident cost is the reason for its imports: one shim stands for every container
process, so it uses the interpreter's built-in modules (``_socket``, ``_signal``, ``_thread``,
and the C half of ``json``) rather than the standard library's wrappers over them, which
import ``enum``, ``re``, ``collections`` and more (~2 MiB of private memory per shim:
docs/performance.md). ``termios`` and ``tty`` come only with a terminal, ``ctypes`` only to
join a namespace.

May import: the standard library (at module level only the built-in modules above, ``os``
and ``sys``; ``termios``, ``tty`` and ``fcntl`` for a terminal), cocoon.agent.libc,
cocoon.runtime.fds (both import only ``os`` and ``stat`` at module level).
tests/unit/test_imports.py checks what a shim's start loads.
"""

from __future__ import annotations

import _json
import _signal  # type: ignore[import-not-found]  # signal's C half, no stub
import _socket
import _thread
import os
import sys

from cocoon.agent import libc
from cocoon.runtime.fds import close_inherited, is_dev_null

TYPE_CHECKING = False  # typing (4 ms of a 50 ms start) only for the type checker
if TYPE_CHECKING:
    from typing import Any

STDIO_SOCK = "stdio.sock"  # runtime/monitor/launch.py STDIO_SOCK (the shim imports no runtime)
NOT_FORWARDED = {
    _signal.SIGCHLD,
    _signal.SIGWINCH,
    _signal.SIGKILL,
    _signal.SIGSTOP,
    _signal.SIGPIPE,
}
FORWARDED = _signal.valid_signals() - NOT_FORWARDED
WAITED = FORWARDED | {_signal.SIGWINCH, _signal.SIGCHLD}
CHUNK = 64 * 1024
JOIN_S = 30.0  # how long the output streams may still drain after the exit status


class _Decoding:
    """What json's C scanner reads from its decoder (json.decoder.JSONDecoder's fields)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity


_scan = _json.make_scanner(_Decoding())  # type: ignore[arg-type]  # duck-typed in C


def loads(line: bytes) -> object:
    """One JSON value (a line of the monitor's), by the scanner ``json.loads`` uses; ValueError
    when it is not one."""
    text = line.decode().strip()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text):
        raise ValueError("extra data after a JSON value")
    return value


def dumps(msg: dict[str, object]) -> bytes:
    """A JSON object of strings, booleans, integers and lists of integers, as one line."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return _json.encode_basestring_ascii(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot encode {type(v).__name__}")

    items = ", ".join(f"{_json.encode_basestring_ascii(k)}: {value(v)}" for k, v in msg.items())
    return ("{" + items + "}\n").encode()


def connect_unix(path: str) -> _socket.socket:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


def send_console(sock_path: str, master: int) -> None:
    """Sends the pty master to the caller's console socket (runc's protocol)."""
    s = connect_unix(sock_path)
    try:
        fds = master.to_bytes(4, sys.byteorder, signed=True)  # one C int
        s.sendmsg([b"/dev/ptmx"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    finally:
        s.close()


class Lines:
    """The reading side of the control connection: lines, at most ``limit`` bytes each."""

    def __init__(self, conn: _socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def readline(self, limit: int) -> bytes:
        while b"\n" not in self.buf and len(self.buf) < limit:
            data = self.conn.recv(4096)
            if not data:
                break
            self.buf += data
        cut = min(self.buf.find(b"\n") + 1 or len(self.buf), limit)
        line, self.buf = self.buf[:cut], self.buf[cut:]
        return line


class Shim:
    def __init__(self, args: Args) -> None:
        self.cid: str = args.container
        self.exec_id: str = args.exec_id
        self.endpoint = os.path.join(args.sandbox_dir, STDIO_SOCK)
        self.control: _socket.socket | None = None
        self.control_in: Lines | None = None
        self.control_lock = _thread.allocate_lock()
        self.terminal: bool = args.terminal
        self.tty_fd: int | None = None  # the host side the caller talks to
        self.in_fd, self.out_fd, self.err_fd = 0, 1, 2
        self.done = False
        self.main_thread = _thread.get_ident()  # woken when done (it waits in sigwaitinfo)
        self.status = 255
        self.saved_tty: list[Any] | None = None  # the caller's terminal mode, restored
        # The process reads /dev/null in the guest (``create`` and ``exec`` decided so from
        # this same fd 0, ours since we were started): no stdin stream to open.
        self.null_stdin = not self.terminal and is_dev_null(0)

    def setup_terminal(self, console_socket: str | None) -> None:
        if not self.terminal:
            return
        import fcntl
        import termios
        import tty

        if console_socket:
            master, slave = os.openpty()
            tty.setraw(slave)
            send_console(console_socket, master)
            os.close(master)
            try:
                fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # SIGWINCH on resize
            except OSError:
                pass
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
            size = os.get_terminal_size(self.tty_fd)  # TIOCGWINSZ
        except OSError:
            return None
        return (size.lines, size.columns) if size.lines and size.columns else None

    def connect(self, stream: str, body: bytes = b"", **extra: object) -> _socket.socket:
        """A connection to the monitor's stdio endpoint for one stream of the process."""
        s = connect_unix(self.endpoint)
        try:
            hello = {"container_id": self.cid, "exec_id": self.exec_id, "stream": stream}
            s.sendall(dumps(hello | extra) + body)
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
        self.control_in = Lines(self.control)
        if not process:
            return ""
        try:
            answer = loads(self.control_in.readline(64 * 1024) or b"{}")
        except (OSError, ValueError):
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if answer.get("started") is True:
            return ""
        return str(answer.get("error") or "the sandbox's monitor gave no answer")

    def send(self, msg: dict[str, object]) -> None:
        """A control line (a signal, a window size); lost with the monitor, like the workload."""
        if self.control is None:
            return
        with self.control_lock:
            try:
                self.control.sendall(dumps(msg))
            except OSError:
                pass

    def resize(self) -> None:
        ws = self.winsize()
        if ws is not None:
            self.send({"resize": [ws[0], ws[1]]})

    def forward(self, sig: int) -> None:
        self.send({"signal": sig})

    def pump_stdin(self, conn: _socket.socket) -> None:
        try:
            while True:
                try:
                    data = os.read(self.in_fd, CHUNK)
                except OSError:
                    data = b""
                if not data:
                    try:
                        conn.shutdown(_socket.SHUT_WR)
                        conn.recv(1)  # the monitor closes once the guest had the EOF
                    except OSError:
                        pass
                    return
                try:
                    conn.sendall(data)
                except OSError:
                    return
        finally:
            conn.close()

    @staticmethod
    def pump_out(conn: _socket.socket, fd: int, finished: _thread.LockType) -> None:
        try:
            while data := conn.recv(CHUNK):
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
        except OSError:
            pass
        finally:
            conn.close()
            finished.release()

    def wait(self) -> None:
        """The control connection's last answer: the exit status, or why it is lost."""
        reply: object = {}
        try:
            assert self.control_in is not None
            line = self.control_in.readline(4096)
            reply = loads(line) if line else {}
        except (OSError, ValueError):
            pass
        status = reply.get("exit") if isinstance(reply, dict) else None
        if isinstance(status, int) and 0 <= status <= 255:
            self.status = status
        else:
            why = reply.get("lost") if isinstance(reply, dict) else None
            why = why or "the sandbox's monitor went away"
            print(f"cocoon-shim: {self.cid}: lost the workload: {why}", file=sys.stderr)
            self.status = 255
        self.done = True
        # SIGCHLD is blocked everywhere and only taken by the main thread's sigwaitinfo: it
        # returns now (or at once, if it was not yet waiting), so the exit is not delayed.
        _signal.pthread_kill(self.main_thread, _signal.SIGCHLD)


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


class Args:
    """The command line (runtime/container/shim.py writes it; argparse is ~1 MiB of a shim)."""

    USAGE = (
        "usage: cocoon-shim --sandbox-dir D --container ID [--exec-id E] [--terminal] "
        "[--console-socket S] [--ready-fd N] [--process-fd N] [--netns PATH] "
        "[--ns KIND[=PATH]]... [--go-fd N]"
    )
    FLAGS = {"--terminal"}
    TEXT = {"--sandbox-dir", "--container", "--exec-id", "--console-socket", "--netns", "--ns"}
    FDS = {"--ready-fd", "--process-fd", "--go-fd"}

    def __init__(self, argv: list[str]) -> None:
        self.sandbox_dir = self.container = self.exec_id = self.netns = ""
        self.console_socket: str | None = None
        self.terminal = False
        self.ready_fd = self.process_fd = self.go_fd = -1
        self.ns: list[str] = []
        args = list(argv)
        while args:
            opt = args.pop(0)
            name, eq, val = opt.partition("=")
            if name in self.FLAGS and not eq:
                self.terminal = True
                continue
            if name not in self.TEXT | self.FDS:
                raise ValueError(f"unrecognized argument: {opt}")
            if not eq:
                if not args:
                    raise ValueError(f"argument {name}: expected one argument")
                val = args.pop(0)
            attr = name[2:].replace("-", "_")
            if name in self.FDS:
                try:
                    setattr(self, attr, int(val))
                except ValueError:
                    raise ValueError(f"argument {name}: invalid int value: {val!r}") from None
            elif name == "--ns":
                self.ns.append(val)
            else:
                setattr(self, attr, val)
        for name in ("--sandbox-dir", "--container"):
            if not getattr(self, name[2:].replace("-", "_")):
                raise ValueError(f"the following arguments are required: {name}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = Args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"{Args.USAGE}\ncocoon-shim: error: {exc}", file=sys.stderr)
        return 2
    close_inherited({args.ready_fd, args.process_fd, args.go_fd})
    if args.go_fd >= 0 and not _go(args.go_fd):
        return 0  # the caller's create failed (or it died) before the container was made
    process = b""
    if args.process_fd >= 0:
        os.lseek(args.process_fd, 0, os.SEEK_SET)  # a memfd its writer left at its end
        while chunk := os.read(args.process_fd, 1 << 20):
            process += chunk
        os.close(args.process_fd)
    try:
        enter_namespaces(args.ns)
        if args.netns:
            libc.join_netns(args.netns)
    except OSError as exc:
        if args.ready_fd >= 0:
            os.write(args.ready_fd, f"error {exc}\n".encode())
        return 255
    _signal.pthread_sigmask(_signal.SIG_BLOCK, WAITED)
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
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
    drained = []
    for conn, fd in conns:
        finished = _thread.allocate_lock()
        finished.acquire()
        _thread.start_new_thread(shim.pump_out, (conn, fd, finished))
        drained.append(finished)
    if stdin is not None:
        _thread.start_new_thread(shim.pump_stdin, (stdin,))
    _thread.start_new_thread(shim.wait, ())
    shim.resize()
    if args.ready_fd >= 0:
        os.write(args.ready_fd, b"ok\n")
        os.close(args.ready_fd)
    while not shim.done:
        info = _signal.sigwaitinfo(WAITED)
        if info.si_signo == _signal.SIGWINCH:
            shim.resize()
        elif info.si_signo != _signal.SIGCHLD:
            shim.forward(info.si_signo)
    for finished in drained:
        finished.acquire(timeout=JOIN_S)
    if shim.saved_tty is not None:
        import termios

        try:
            termios.tcsetattr(0, termios.TCSADRAIN, shim.saved_tty)
        except termios.error:
            pass
    return shim.status


def run(argv: list[str] | None = None) -> None:
    """main(), then out without the interpreter's teardown (~8 ms of an exec's exit path):
    nothing is left to flush but stdout and stderr. A forked shim ends here too."""
    status = main(argv)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    run()
