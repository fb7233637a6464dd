"""The shim (a real ``cocoon.shim.main`` process) against the monitor's stdio endpoint
(runtime/monitor/stdio.py) in front of a fake agent service: bytes through unchanged and in
order, stdin and its EOF, signals and window sizes, the exit status, per-stream flow control,
abandonment when the shim is killed, the monitor going away, and hostile connections. Real
guests run the same paths in tests/integration."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from cocoon.agent import agent_pb2 as pb
from cocoon.agent import agent_pb2_grpc as pbg
from cocoon.runtime.container import shim as shimmod
from cocoon.runtime.errors import LifecycleError
from cocoon.runtime.monitor import stdio

CHUNK = 64 * 1024


@dataclass
class Proc:
    stdout: bytes = b""
    stderr: bytes = b""
    endless_stdout: bool = False
    status: int = 0
    exited: threading.Event = field(default_factory=threading.Event)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: threading.Event = field(default_factory=threading.Event)
    signals: list[int] = field(default_factory=list)
    resizes: list[tuple[int, int]] = field(default_factory=list)
    wait_abandoned: threading.Event = field(default_factory=threading.Event)
    stdout_sent: int = 0


class FakeAgent(pbg.AgentServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.procs: dict[tuple[str, str], Proc] = {}
        self.execs: list[tuple[str, str, dict[str, Any], bool]] = []
        self.exec_stdin: list[bool] = []  # each ExecProcess's StdioConfig.stdin
        self.exec_error: tuple[grpc.StatusCode, str] | None = None

    def ExecProcess(self, req: Any, ctx: Any) -> pb.Empty:
        if self.exec_error is not None:
            ctx.abort(*self.exec_error)
        process = json.loads(req.process_json)
        self.execs.append((req.container_id, req.exec_id, process, req.stdio.terminal))
        self.exec_stdin.append(req.stdio.stdin)
        self.procs[(req.container_id, req.exec_id)] = Proc(stdout=b"started\n")
        return pb.Empty()

    def _proc(self, req: Any, ctx: Any) -> Proc:
        p = self.procs.get((req.container_id, req.exec_id))
        if p is None:
            ctx.abort(grpc.StatusCode.NOT_FOUND, f"no process {req.container_id}")
        assert p is not None
        return p

    def ReadStdout(self, req: Any, ctx: Any) -> Iterator[pb.ReadStreamResponse]:
        p = self._proc(req, ctx)
        if p.endless_stdout:
            while ctx.is_active():
                p.stdout_sent += CHUNK
                yield pb.ReadStreamResponse(data=b"o" * CHUNK)
            return
        for i in range(0, len(p.stdout), CHUNK):
            yield pb.ReadStreamResponse(data=p.stdout[i : i + CHUNK])

    def ReadStderr(self, req: Any, ctx: Any) -> Iterator[pb.ReadStreamResponse]:
        p = self._proc(req, ctx)
        for i in range(0, len(p.stderr), 1000):
            yield pb.ReadStreamResponse(data=p.stderr[i : i + 1000])

    def WriteStdin(self, it: Any, ctx: Any) -> pb.WriteStreamResponse:
        n = 0
        for r in it:
            self._proc(r, ctx).stdin.extend(r.data)
            n += len(r.data)
        return pb.WriteStreamResponse(written=n)

    def CloseStdin(self, req: Any, ctx: Any) -> pb.Empty:
        self._proc(req, ctx).stdin_closed.set()
        return pb.Empty()

    def WaitProcess(self, req: Any, ctx: Any) -> pb.WaitProcessResponse:
        p = self._proc(req, ctx)
        while not p.exited.wait(0.02):
            if not ctx.is_active():
                p.wait_abandoned.set()  # the agent kills such a process
                return pb.WaitProcessResponse()
        return pb.WaitProcessResponse(status=p.status)

    def SignalProcess(self, req: Any, ctx: Any) -> pb.Empty:
        p = self._proc(req, ctx)
        p.signals.append(req.signal)
        if req.signal == signal.SIGTERM:
            p.status = 128 + signal.SIGTERM
            p.exited.set()
        return pb.Empty()

    def TtyWinResize(self, req: Any, ctx: Any) -> pb.Empty:
        self._proc(req, ctx).resizes.append((req.rows, req.columns))
        return pb.Empty()


class Monitor:
    """The fake agent on agent.sock, the stdio endpoint on stdio.sock, in one loop thread."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.shims: list[subprocess.Popen[bytes]] = []  # killed at teardown if still up
        self.agent = FakeAgent()
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16))
        pbg.add_AgentServiceServicer_to_server(self.agent, self.server)
        self.server.add_insecure_port(f"unix:{d / 'agent.sock'}")
        self.server.start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.channel: grpc.aio.Channel | None = None
        self.endpoint = stdio.Endpoint(lambda: self.channel, 5.0)
        self.run(self._start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    async def _start(self) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{self.dir / 'agent.sock'}")
        await self.endpoint.serve(self.dir / "stdio.sock")

    async def _stop(self) -> None:
        await self.endpoint.close()
        # The shim says ready once its connections are made, which may be before this loop
        # has taken them: a few turns more, and their handlers close them (Endpoint.closed).
        # This loop then stops with its thread, not its process, whose exit would close them.
        await asyncio.sleep(0.2)
        if self.channel is not None:
            await self.channel.close()

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        with contextlib.suppress(Exception):
            self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.server.stop(0).wait(5)


@pytest.fixture
def mon(tmp_path: Path) -> Iterator[Monitor]:
    m = Monitor(tmp_path)
    try:
        yield m
    finally:
        m.stop()
        for s in m.shims:  # a test that failed before its shim ended must not leave it
            if s.poll() is None:
                s.kill()
                s.wait(10)


def shim(
    mon: Monitor,
    cid: str = "c1",
    stdin: Any = subprocess.DEVNULL,
    extra: tuple[str, ...] | list[str] = (),
    fds: tuple[int, ...] = (),
    **kw: Any,
) -> subprocess.Popen[bytes]:
    r, w = os.pipe()
    p = subprocess.Popen(
        shimmod.command(["--sandbox-dir", str(mon.dir), "--container", cid,
                         "--ready-fd", str(w), *extra]),
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(w, *fds), **kw,
    )  # fmt: skip
    os.close(w)
    mon.shims.append(p)
    with os.fdopen(r, "rb") as ready:
        assert ready.readline() == b"ok\n"
    return p


def test_bytes_through_unchanged_and_the_exit_status(mon: Monitor) -> None:
    out, err = os.urandom(3 * 1024 * 1024 + 17), b"warning: \xff\x00 line\n" * 500
    p = Proc(stdout=out, stderr=err, status=42)
    mon.agent.procs[("c1", "")] = p
    s = shim(mon)
    p.exited.set()
    got_out, got_err = s.communicate(timeout=60)
    assert s.returncode == 42
    assert got_out == out and got_err == err
    # /dev/null: create told the agent so (the process reads the guest's); no stream, no
    # CloseStdin
    assert not p.stdin_closed.is_set() and bytes(p.stdin) == b""


def test_stdin_reaches_the_process_then_its_eof(mon: Monitor) -> None:
    p = Proc()
    mon.agent.procs[("c1", "")] = p
    s = shim(mon, stdin=subprocess.PIPE)
    assert s.stdin is not None
    data = os.urandom(1024 * 1024)
    s.stdin.write(data)
    s.stdin.close()
    s.stdin = None  # closed: communicate() must not flush it
    assert p.stdin_closed.wait(20)
    assert bytes(p.stdin) == data
    p.exited.set()
    s.communicate(timeout=30)
    assert s.returncode == 0


def test_signals_are_forwarded_and_end_it(mon: Monitor) -> None:
    p = Proc()
    mon.agent.procs[("c1", "")] = p
    s = shim(mon)
    s.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while signal.SIGUSR1 not in p.signals and time.monotonic() < deadline:
        time.sleep(0.02)
    s.send_signal(signal.SIGTERM)
    s.communicate(timeout=30)
    assert p.signals == [signal.SIGUSR1, signal.SIGTERM]
    assert s.returncode == 128 + signal.SIGTERM


def test_a_stalled_stdout_stalls_only_itself(mon: Monitor) -> None:
    """Nobody reads the shim's stdout: the endless stdout stalls (the agent stops being
    asked for more), while stderr and the exit status still come through."""
    p = Proc(endless_stdout=True, stderr=b"E" * 200_000, status=3)
    mon.agent.procs[("c1", "")] = p
    s = shim(mon)
    assert s.stderr is not None
    got = b""
    while len(got) < 200_000:
        chunk = s.stderr.read1(65536)  # type: ignore[attr-defined]
        assert chunk, "stderr ended early"
        got += chunk
    time.sleep(1.0)
    sent = p.stdout_sent
    time.sleep(1.0)
    assert p.stdout_sent == sent, "the agent was still asked for stdout nobody reads"
    assert sent < 64 * 1024 * 1024  # bounded by socket and pipe buffers, not by the stream
    s.kill()
    s.wait()


def test_killed_shim_abandons_its_process(mon: Monitor) -> None:
    p = Proc()
    mon.agent.procs[("c1", "")] = p
    s = shim(mon)
    s.kill()
    s.wait()
    deadline = time.monotonic() + 10
    while signal.SIGKILL not in p.signals and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.signals == [signal.SIGKILL], "the process of a killed shim was not killed"


def test_monitor_gone_is_a_lost_workload(mon: Monitor) -> None:
    mon.agent.procs[("c1", "")] = Proc()
    s = shim(mon)
    mon.stop()
    _, err = s.communicate(timeout=30)
    assert s.returncode == 255 and b"lost the workload" in err


def test_a_connection_the_closing_endpoint_had_not_taken_yet_is_closed(mon: Monitor) -> None:
    """Endpoint.close() closes what it holds; a connection whose handler only starts after
    that (accepted as it closed) is closed by its handler, not left open with a shim on it."""
    mon.endpoint.closed = True  # as close() sets it first; the socket still listens here
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(str(mon.dir / "stdio.sock"))
        assert c.recv(1) == b""  # closed by the monitor, before any hello


def test_unknown_process_is_lost_not_hung(mon: Monitor) -> None:
    s = shim(mon, cid="nobody")
    _, err = s.communicate(timeout=30)
    assert s.returncode == 255 and b"no process nobody" in err


def _talk(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(15)
        c.connect(str(path))
        with contextlib.suppress(OSError):
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := c.recv(4096):
                out += chunk
        return out


@pytest.mark.parametrize(
    "hello",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"container_id": "c1", "stream": "stdmiddle"}\n',
        b'{"container_id": "", "stream": "stdout"}\n',
        b'{"container_id": "c1", "stream": "stdout", "extra": 1}\n',
        b'{"container_id": "c1", "stream": "stdin", "close": "yes"}\n',
        b'{"container_id": "c1", "stream": "stdout", "close": true}\n',
        b'{"container_id": "c1", "stream": "stdin", "size": 2}\n{}',
        b'{"container_id": "c1", "stream": "control", "size": true}\n{}',
        b'{"container_id": "c1", "stream": "control", "size": 0}\n',
        b'{"container_id": "c1", "stream": "control", "size": 99999999}\n{}',
        b'{"container_id": "c1", "stream": "control", "size": 2, "terminal": 1}\n{}',
        b'{"container_id": "c1", "stream": "control", "size": 500}\n{"args": ["short"]}',
        b"x" * 100_000,
        b"",
    ],
)
def test_hostile_connections_are_closed_and_the_rest_carries_on(mon: Monitor, hello: bytes) -> None:
    p = Proc(stdout=b"fine\n")
    mon.agent.procs[("c1", "")] = p
    assert _talk(mon.dir / "stdio.sock", hello) == b""
    assert not p.stdin_closed.is_set() and not p.signals
    s = shim(mon)
    p.exited.set()
    out, _ = s.communicate(timeout=30)
    assert out == b"fine\n" and s.returncode == 0


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("process")
    os.write(fd, data)
    return fd


def test_an_execs_shim_starts_its_process_on_its_control_connection(mon: Monitor) -> None:
    process = {"args": ["echo", "é"], "env": ["A=" + "x" * 100_000], "cwd": "/", "terminal": False}
    fd = _memfd(json.dumps(process).encode())
    try:
        s = shim(mon, "c1", extra=["--exec-id", "e1", "--process-fd", str(fd)], fds=(fd,))
    finally:
        os.close(fd)
    assert mon.agent.execs == [("c1", "e1", process, False)]
    mon.agent.procs[("c1", "e1")].exited.set()
    out, _ = s.communicate(timeout=30)
    assert out == b"started\n" and s.returncode == 0


@pytest.mark.parametrize("given", ["devnull", "pipe"])
def test_an_exec_given_dev_null_has_no_stdin_stream(mon: Monitor, given: str) -> None:
    """The caller's stdin is /dev/null (containerd's and conmon's for a process without
    stdin): the process is started reading /dev/null in the guest and no stdin stream is
    opened (no CloseStdin either); any other stdin is a stream, its bytes and its EOF."""
    fd = _memfd(json.dumps({"args": ["cat"], "cwd": "/"}).encode())
    stdin = subprocess.DEVNULL if given == "devnull" else subprocess.PIPE
    try:
        s = shim(mon, "c1", stdin, extra=["--exec-id", "e1", "--process-fd", str(fd)], fds=(fd,))
    finally:
        os.close(fd)
    p = mon.agent.procs[("c1", "e1")]
    if s.stdin is not None:
        s.stdin.write(b"in")
        s.stdin.close()
        s.stdin = None
        assert p.stdin_closed.wait(20)
    p.exited.set()
    out, _ = s.communicate(timeout=30)
    assert out == b"started\n" and s.returncode == 0
    assert mon.agent.exec_stdin == [given == "pipe"]
    assert p.stdin_closed.is_set() == (given == "pipe")
    assert bytes(p.stdin) == (b"in" if given == "pipe" else b"")


FORK_SPAWN = """
import json, sys
from pathlib import Path
from cocoon.runtime.container import shim as shimmod
body = json.dumps({"args": ["true"], "cwd": "/"}).encode()
s = shimmod.spawn(Path(sys.argv[1]), sys.argv[2], "e1", False, None, process=body, fork=True)
err = sys.stderr  # ours; stdout is the shim's too
print(type(s).__name__, shimmod.is_shim(s.pid, "c1"), shimmod.is_shim(s.pid, "c2"), file=err)
err.flush()
print(shimmod.wait_forwarding(s), file=err)
"""


def test_a_foreground_execs_shim_is_forked_and_stands_for_its_process(mon: Monitor) -> None:
    """spawn(fork=True) in a process with one thread (the CLI's) forks the shim: no second
    interpreter start; ``is_shim`` knows it by its name, the exit status comes back as a
    started shim's would, and it took none of our fds but its own."""
    h = subprocess.Popen(  # the container's id in its argv, as in `cocoon exec c1 ...`
        [sys.executable, "-c", FORK_SPAWN, str(mon.dir), "c1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert h.stdout is not None and h.stderr is not None
    try:
        first = h.stderr.readline()
        assert first.split() == ["Forked", "True", "False"], first
        (shim_dir,) = [p for p in Path("/proc").iterdir() if _comm(p) == shimmod.FORKED_COMM
                       and _ppid(p) == h.pid]  # fmt: skip
        # Its ready pipe is its own until it has said ready and closed it, a moment after
        # `spawn` returned: the listing is taken again until that one is gone.
        stdio = {os.readlink(shim_dir / "fd/1"), os.readlink(shim_dir / "fd/2")}
        deadline = time.monotonic() + 10
        while True:
            fds = _fds(shim_dir)
            if not any(f.startswith("pipe:") for f in fds - stdio) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert not any("cocoon-exec-process" in f for f in fds)  # read, then closed
        assert all(not f.startswith("pipe:") for f in fds - stdio), fds
    finally:
        mon.agent.procs[("c1", "e1")].status = 7
        mon.agent.procs[("c1", "e1")].exited.set()
    out, err = h.communicate(timeout=30)
    assert h.returncode == 0 and out == "started\n" and err == "7\n"


@pytest.mark.parametrize(
    ("marker", "want"),
    [(shimmod.SHIM_BOOT, True), (shimmod.SHIM_MODULE, True), ("cocoon.shim", False)],
)
def test_is_shim_knows_a_started_shim_by_either_command_line(marker: str, want: bool) -> None:
    """``command``'s boot string, or ``-m cocoon.shim.main`` (a shim an older CLI started,
    which ``delete`` must still know after an upgrade), with the container's id; not any
    process that merely mentions them."""
    p = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", marker, "--container", "c1"]
    )
    try:
        time.sleep(0.2)
        assert shimmod.is_shim(p.pid, "c1") is want
        assert not shimmod.is_shim(p.pid, "c2")
    finally:
        p.kill()
        p.wait()


def _fds(p: Path) -> set[str]:
    """What the process's fds are, without the ones it closed while they were listed."""
    out = set()
    for f in (p / "fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out.add(os.readlink(f))
    return out


def _comm(p: Path) -> str:
    with contextlib.suppress(OSError):
        return (p / "comm").read_text().strip()
    return ""


def _ppid(p: Path) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return -1


def test_a_held_shim_waits_for_go_and_a_cancelled_one_leaves_quietly(mon: Monitor) -> None:
    """create starts its shim before the container exists: held, it does nothing until
    "go" (a shim that connected first would find no process: status 255); one that never
    gets it (the create failed) exits 0 as its pipe closes."""
    s = shimmod.begin(mon.dir, "c1", "", False, None, held=True)
    time.sleep(1.0)  # long enough for an unheld shim to have started and asked
    assert s.proc.poll() is None
    p = Proc(status=3)
    mon.agent.procs[("c1", "")] = p
    proc = shimmod.finish(s, timeout=30)
    assert shimmod.is_shim(proc.pid, "c1")
    p.exited.set()
    assert proc.wait(30) == 3  # type: ignore[call-arg]
    gone = shimmod.begin(mon.dir, "c2", "", False, None, held=True)
    shimmod.cancel(gone)
    assert gone.proc.returncode == 0 and gone.go_fd == gone.ready_fd == -1
    assert ("c2", "") not in mon.agent.procs


def test_a_process_with_threads_starts_its_shim_instead_of_forking(mon: Monitor) -> None:
    """Forking a process with other threads (this one has the fake monitor's) could copy a
    lock held mid-operation: spawn then starts a fresh shim, fork or not."""
    body = json.dumps({"args": ["true"], "cwd": "/"}).encode()
    s = shimmod.spawn(mon.dir, "c1", "e1", False, None, process=body, fork=True)
    try:
        assert isinstance(s, subprocess.Popen) and shimmod.is_shim(s.pid, "c1")
    finally:
        mon.agent.procs[("c1", "e1")].exited.set()
        s.wait()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (grpc.StatusCode.NOT_FOUND, "exec in c1: no such file: /bin/nothing"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "exec in c1: the sandbox did not finish it in time"),
    ],
)
def test_an_exec_the_agent_refuses_is_one_clear_error_and_no_shim(
    mon: Monitor, code: grpc.StatusCode, words: str
) -> None:
    mon.agent.exec_error = (code, "no such file: /bin/nothing")
    body = json.dumps({"args": ["/bin/nothing"]}).encode()
    with pytest.raises(LifecycleError) as exc:
        shimmod.spawn(mon.dir, "c1", "e1", False, None, process=body, timeout=30)
    assert str(exc.value).startswith(words)
    assert not mon.agent.execs and ("c1", "e1") not in mon.agent.procs


def test_bad_control_lines_are_ignored(mon: Monitor) -> None:
    p = Proc()
    mon.agent.procs[("c1", "")] = p
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(mon.dir / "stdio.sock"))
        c.sendall(json.dumps({"container_id": "c1", "stream": "control"}).encode() + b"\n")
        for bad in ({"signal": 0}, {"signal": 9999}, {"signal": "9"}, {"resize": [0, 5]},
                    {"resize": [1]}, {"kill": 9}, [1]):  # fmt: skip
            c.sendall(json.dumps(bad).encode() + b"\n")
        c.sendall(b'{"resize": [24, 80]}\n{"signal": 10}\n')
        deadline = time.monotonic() + 10
        while not p.signals and time.monotonic() < deadline:
            time.sleep(0.02)
        p.exited.set()
        c.settimeout(10)
        assert json.loads(c.makefile("rb").readline()) == {"exit": 0}
    assert p.signals == [10] and p.resizes == [(24, 80)]


@pytest.mark.parametrize("module", ["cocoon.shim.main", "cocoon.runtime.container.execproc"])
def test_the_shim_and_the_exec_verb_import_no_grpc_nor_protobuf(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "print([m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_monitors_stub_is_the_generated_ones_made_from_the_descriptor() -> None:
    """monitor.agentcalls.Stub gives each agent method with the generated stub's path,
    cardinality and message types, without importing agent_pb2_grpc."""
    from cocoon.runtime.monitor.agentcalls import Stub

    class Recorder:
        def __init__(self) -> None:
            self.made: dict[str, tuple[str, Any, Any]] = {}

        def __getattr__(self, kind: str) -> Any:
            def make(path: str, request_serializer: Any, response_deserializer: Any) -> str:
                self.made[path] = (kind, request_serializer, response_deserializer)
                return path

            return make

    generated, ours = Recorder(), Recorder()
    pbg.AgentServiceStub(generated)
    stub = Stub(ours)  # type: ignore[arg-type]
    names = [m.name for m in pb.DESCRIPTOR.services_by_name["AgentService"].methods]
    for name in names:
        assert getattr(stub, name) == getattr(stub, name)  # made once, then kept
    assert ours.made == generated.made and len(ours.made) == len(names)
    assert {k for k, _, _ in ours.made.values()} >= {"unary_unary", "unary_stream", "stream_unary"}
    with pytest.raises(AttributeError):
        _ = stub.NoSuchMethod
