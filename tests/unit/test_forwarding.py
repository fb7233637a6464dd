"""The host<->guest agent channel and the monitor's forwarding, end to end, without QEMU.

    client --gRPC--> monitor.sock (grpc.aio server, cocoon.runtime.monitor.forward)
           --gRPC--> agent.sock (SerialMuxHost, cocoon.runtime.monitor.channel)
           --mux---> port.sock (PortBridge: QEMU's virtio-serial chardev, simulated)
           --mux---> socketpair (the guest's port) -> SerialMux (cocoon.agent.channel)
           --gRPC--> agent-guest.sock (the real AgentService, cocoon.agent.server)

The host side runs on one asyncio loop in a background thread (like the monitor process);
clients are synchronous grpc stubs in the test thread, every call with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import random
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
import types
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from cocoon.agent import AGENT_VERSION, api_hash, mux
from cocoon.agent import agent_pb2 as pb
from cocoon.agent import agent_pb2_grpc as pbg
from cocoon.agent import channel as agent_channel
from cocoon.agent import guest as agent_guest
from cocoon.agent.channel import SerialMux
from cocoon.agent.logbuf import LogBuffer, Record
from cocoon.agent.mux import Frame
from cocoon.agent.server import AgentService
from cocoon.runtime.monitor import forward
from cocoon.runtime.monitor.channel import SerialMuxHost
from tests.unit.streams import pipe_reader, pipe_writer, pty_writer, wait_for

T = TypeVar("T")
RPC_TIMEOUT = 10.0
TEST_ALARM_S = 60
MEM_TOTAL_KB = 2048000
MEM_FREE_KB = 1500000
MEM_AVAILABLE_KB = 1700000
UPTIME = 12.5

log = logging.getLogger("cocoon.test.forwarding")


# ---------------------------------------------------------------------------------------------
# Guards


@pytest.fixture(autouse=True)
def alarm_guard() -> Iterator[None]:
    """No test may hang: SIGALRM after 60 s fails it (fixture set-up and teardown included)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"test did not finish within {TEST_ALARM_S} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_ALARM_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# The host's event loop (one per module, in a daemon thread)


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="host-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_rest(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


@pytest.fixture(scope="module")
def host_loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.stop()


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for unix sockets (sun_path is limited to 107 bytes)."""
    if len(str(tmp_path / "agent-guest.sock")) < 100:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="cocoon-fwd-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# QEMU's side of the virtio-serial port


class PortBridge:
    """QEMU's chardev socket for the agent port, bridged to the guest's end of the port.

    The port (a socketpair; the guest's SerialMux holds one end) persists for the life of the
    guest. Host connections come and go: one at a time is accepted and pumped both ways; when
    it goes away pumping stops (the guest's unread output waits in the port, so the next host
    may start reading mid-frame, as with the real device) and the next one is accepted.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.qemu_end, self.guest_end = socket.socketpair()
        self.stop_ev = threading.Event()
        self.accepted = 0
        self.finished = 0  # host connections that have ended
        self._discard = 0
        self.thread = threading.Thread(target=self._run, name="port-bridge", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_ev.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            conn, _ = self.listener.accept()
            self.accepted += 1
            if self._discard:
                self._drop_pending(self._discard)
                self._discard = 0
            done = threading.Event()
            back = threading.Thread(
                target=self._guest_to_host, args=(conn, done), name="port-bridge-out", daemon=True
            )
            back.start()
            try:
                self._host_to_guest(conn, done)
            finally:
                done.set()
                back.join(5)
                conn.close()
                self.finished += 1

    def discard_on_next_accept(self, n: int) -> None:
        """Lose the first ``n`` bytes of queued guest output when the next host connects, as
        if the previous host had read them before it went away: the new host then starts
        reading in the middle of a frame."""
        self._discard = n

    def _drop_pending(self, n: int) -> None:
        while n > 0 and select.select([self.qemu_end], [], [], 1)[0]:
            n -= len(self.qemu_end.recv(n))

    def _host_to_guest(self, conn: socket.socket, done: threading.Event) -> None:
        while not (self.stop_ev.is_set() or done.is_set()):
            ready, _, _ = select.select([conn], [], [], 0.05)
            if not ready:
                continue
            try:
                data = conn.recv(256 * 1024)
            except OSError:
                return
            if not data:
                return
            self.qemu_end.sendall(data)

    def _guest_to_host(self, conn: socket.socket, done: threading.Event) -> None:
        while not (self.stop_ev.is_set() or done.is_set()):
            ready, _, _ = select.select([self.qemu_end], [], [], 0.05)
            if not ready:
                continue
            data = self.qemu_end.recv(256 * 1024)
            if not data:
                return
            try:
                conn.sendall(data)
            except OSError:
                done.set()  # the host went away; these bytes are lost, as with QEMU
                return

    def stop(self) -> None:
        self.stop_ev.set()
        self.thread.join(5)
        self.listener.close()


# ---------------------------------------------------------------------------------------------
# The guest: real AgentService behind a real SerialMux


class RecordingLogBuffer(LogBuffer):
    """The real LogBuffer, remembering each reader's liveness check (to see RPCs end)."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Callable[[], bool]] = []

    def records(self, follow: bool, alive: Callable[[], bool]) -> Iterator[Record]:
        self.readers.append(alive)
        return super().records(follow, alive)


class DeadlineRecorder(grpc.ServerInterceptor):  # type: ignore[misc]
    """Records, per call the guest serves, the method and the deadline the guest sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float | None]] = []

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]

        def wrap(inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
            def behaviour(req: Any, ctx: Any) -> Any:
                self.seen.append((method, ctx.time_remaining()))
                return inner(req, ctx)

            return behaviour

        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **kw)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **kw)
        return handler


def make_root(root: Path) -> None:
    cpu = root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text("0-1\n")
    (cpu / "possible").write_text("0-3\n")
    (root / "sys/devices/system/memory").mkdir(parents=True)
    (root / "sys/devices/system/memory/block_size_bytes").write_text("8000000\n")
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text(
        f"MemTotal:       {MEM_TOTAL_KB} kB\n"
        f"MemFree:        {MEM_FREE_KB} kB\n"
        f"MemAvailable:   {MEM_AVAILABLE_KB} kB\n"
        "HugePages_Total:       0\n"
    )
    (root / "proc/uptime").write_text(f"{UPTIME} 20.00\n")


@dataclass
class Guest:
    dir: Path
    root: Path
    logs: RecordingLogBuffer
    deadlines: DeadlineRecorder
    server: Any  # grpc.Server
    bridge: PortBridge
    mux: SerialMux
    mux_thread: threading.Thread
    poweroffs: list[float] = field(default_factory=list)
    powered_off: threading.Event = field(default_factory=threading.Event)
    serve_error: list[BaseException] = field(default_factory=list)
    # The raw streams' source: (container, exec, stream) -> the read end of a pipe.
    pipes: dict[tuple[str, str, str], int] = field(default_factory=dict)

    @property
    def port_sock(self) -> Path:
        return self.dir / "port.sock"

    @property
    def target(self) -> Path:
        return self.dir / "agent-guest.sock"

    def sessions(self) -> int:
        return len(self.mux._sessions)


def _session_readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith("(_session_reader)")]


@pytest.fixture
def guest(sock_dir: Path, tmp_path: Path) -> Iterator[Guest]:
    root = tmp_path / "root"
    make_root(root)
    logs = RecordingLogBuffer()
    poweroffs: list[float] = []
    powered_off = threading.Event()

    def poweroff() -> None:
        poweroffs.append(time.monotonic())
        powered_off.set()

    deadlines = DeadlineRecorder()
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=32), interceptors=(deadlines,)
    )
    service = AgentService(logs=logs, channel="virtio-serial", poweroff=poweroff, root=root)
    pbg.add_AgentServiceServicer_to_server(service, server)
    target = sock_dir / "agent-guest.sock"
    assert server.add_insecure_port(f"unix:{target}") == 1
    server.start()

    bridge = PortBridge(sock_dir / "port.sock")
    pipes: dict[tuple[str, str, str], int] = {}

    def streams(cid: str, eid: str, which: str) -> int:
        return pipes[(cid, eid, which)]  # KeyError: no such process

    smux = SerialMux(bridge.guest_end.fileno(), str(target), streams=streams)
    serve_error: list[BaseException] = []

    def serve() -> None:
        try:
            smux.serve_forever()
        except OSError as exc:  # the port was torn down (see teardown)
            serve_error.append(exc)

    mux_thread = threading.Thread(target=serve, name="guest-serial-mux", daemon=True)
    mux_thread.start()
    g = Guest(
        dir=sock_dir,
        root=root,
        logs=logs,
        deadlines=deadlines,
        server=server,
        bridge=bridge,
        mux=smux,
        mux_thread=mux_thread,
        poweroffs=poweroffs,
        powered_off=powered_off,
        serve_error=serve_error,
        pipes=pipes,
    )
    try:
        yield g
    finally:
        server.stop(grace=0).wait(5)
        # Session readers end once the gRPC server has dropped their connections.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not _session_readers(), 3, "guest session readers to end")
        bridge.stop()
        # End serve_forever: closing QEMU's end with unread bytes in it makes the guest's next
        # read fail with ECONNRESET (a plain close would only give it endless POLLHUP).
        with contextlib.suppress(OSError):
            bridge.guest_end.send(b"\x00")
        bridge.qemu_end.close()
        mux_thread.join(5)
        assert not mux_thread.is_alive(), "guest SerialMux did not stop"
        assert len(serve_error) == 1 and isinstance(serve_error[0], ConnectionResetError), (
            f"guest SerialMux ended with {serve_error!r}"
        )
        if not _session_readers():  # else leave the fd open: never close an fd in use
            bridge.guest_end.close()


# ---------------------------------------------------------------------------------------------
# The host: SerialMuxHost + the monitor's forwarding server


@dataclass
class Host:
    loop: LoopThread
    dir: Path
    link: SerialMuxHost | None = None
    channel: Any = None  # grpc.aio.Channel to agent.sock
    server: Any = None  # grpc.aio.Server on monitor.sock
    clients: list[Any] = field(default_factory=list)

    @property
    def agent_sock(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def monitor_sock(self) -> Path:
        return self.dir / "monitor.sock"

    def get_channel(self) -> Any:
        return self.channel

    async def _link_up(self) -> None:
        self.link = SerialMuxHost(port_socket=self.dir / "port.sock", listen=self.agent_sock)
        await self.link.connect(deadline=time.monotonic() + 10)
        await self.link.serve()
        self.channel = grpc.aio.insecure_channel(f"unix:{self.agent_sock}")

    async def _link_down(self, channel_first: bool = True) -> None:
        channel, self.channel = self.channel, None
        if channel_first and channel is not None:
            await channel.close()
        if self.link is not None:
            await self.link.close()
            self.link = None
        if not channel_first and channel is not None:
            await channel.close()

    async def _serve(self, getter: forward.ChannelGetter) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((forward.handlers(getter),))
        assert self.server.add_insecure_port(f"unix:{self.monitor_sock}") == 1
        await self.server.start()

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None
        await self._link_down()

    def link_up(self) -> None:
        self.loop.run(self._link_up())

    def link_down(self, channel_first: bool = True) -> None:
        self.loop.run(self._link_down(channel_first))

    def serve(self, getter: forward.ChannelGetter | None = None) -> None:
        self.loop.run(self._serve(getter or self.get_channel))

    def client(self, sock: Path | None = None, own_connection: bool = False) -> Any:
        """A synchronous AgentService stub on the monitor's socket (or ``sock``).

        Channels to one target share a connection unless ``own_connection`` is set.
        """
        opts = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        ch = grpc.insecure_channel(f"unix:{sock or self.monitor_sock}", options=opts)
        self.clients.append(ch)
        return pbg.AgentServiceStub(ch)

    def raw_channel(self) -> Any:
        ch = grpc.insecure_channel(f"unix:{self.monitor_sock}")
        self.clients.append(ch)
        return ch

    def close(self) -> None:
        for ch in self.clients:
            ch.close()
        self.loop.run(self._stop())


@pytest.fixture
def host(host_loop: LoopThread, guest: Guest) -> Iterator[Host]:
    h = Host(loop=host_loop, dir=guest.dir)
    try:
        h.link_up()
        h.serve()
        yield h
    finally:
        h.close()


@pytest.fixture
def stub(host: Host) -> Any:
    return host.client()


def direct_stub(guest: Guest) -> Any:
    """A stub straight on the guest's gRPC socket (no mux, no monitor): the reference."""
    ch = grpc.insecure_channel(f"unix:{guest.target}")
    return contextlib.closing(ch), pbg.AgentServiceStub(ch)


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value


def log_record(msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("cocoon.test", level, __file__, 1, msg, None, None)


# ---------------------------------------------------------------------------------------------
# Unary calls through the whole path


def test_check_serving(stub: Any) -> None:
    resp = stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT)
    assert resp.status == pb.CheckResponse.SERVING


def test_version_api_hash(stub: Any) -> None:
    resp = stub.Version(pb.VersionRequest(), timeout=RPC_TIMEOUT)
    assert resp.api_hash == api_hash()
    assert len(resp.api_hash) == 64
    assert resp.agent_version == AGENT_VERSION
    assert resp.grpc_version == grpc.__version__


def test_generated_code_matches_proto() -> None:
    """The generated modules were built from the agent.proto that api_hash() hashes."""
    pb2 = Path(pb.__file__).read_text().splitlines()[0]
    assert pb2 == f"# proto-sha256: {api_hash()}"
    pb2_grpc = Path(pbg.__file__).read_text().splitlines()[0]
    assert pb2_grpc == f"# proto-sha256: {api_hash()}"


def test_guest_details(stub: Any, guest: Guest) -> None:
    d = stub.GetGuestDetails(pb.GuestDetailsRequest(), timeout=RPC_TIMEOUT)
    assert d.cpus_online == 2
    assert d.cpus_possible == 4
    assert d.mem_total_bytes == MEM_TOTAL_KB * 1024
    assert d.mem_free_bytes == MEM_FREE_KB * 1024
    assert d.mem_available_bytes == MEM_AVAILABLE_KB * 1024
    assert d.memory.block_size_bytes == 0x8000000
    assert d.memory.hotplug_probe is False
    assert d.uptime_seconds == UPTIME
    assert d.channel == "virtio-serial"
    assert d.agent_version == AGENT_VERSION
    assert d.kernel_release == os.uname().release
    # Facts are read per call, not cached.
    (guest.root / "sys/devices/system/cpu/online").write_text("0-3\n")
    (guest.root / "sys/devices/system/memory/probe").write_text("")
    d2 = stub.GetGuestDetails(pb.GuestDetailsRequest(), timeout=RPC_TIMEOUT)
    assert d2.cpus_online == 4
    assert d2.memory.hotplug_probe is True


# ---------------------------------------------------------------------------------------------
# Errors come back as the agent gave them


def test_unimplemented_method(stub: Any, guest: Guest) -> None:
    req = pb.GetOOMEventRequest()
    err = rpc_error(lambda: stub.GetOOMEvent(req, timeout=RPC_TIMEOUT))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    closing, ref = direct_stub(guest)
    with closing:
        ref_err = rpc_error(lambda: ref.GetOOMEvent(req, timeout=RPC_TIMEOUT))
    assert ref_err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == ref_err.details()


@pytest.mark.parametrize("path", ["etc/hosts", "/etc/../../escape", ""])
def test_copy_file_bad_path(stub: Any, guest: Guest, path: str) -> None:
    req = pb.CopyFileRequest(path=path, data=b"x")
    err = rpc_error(lambda: stub.CopyFile(req, timeout=RPC_TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"copy file: bad path {path!r}"
    assert not (guest.root / "escape").exists()


def test_no_agent_every_method_unavailable(host_loop: LoopThread, sock_dir: Path) -> None:
    """With no agent channel, every method answers UNAVAILABLE naming the agent, at once."""
    h = Host(loop=host_loop, dir=sock_dir)
    try:
        h.serve(lambda: None)
        ch = h.raw_channel()
        methods = forward.SERVICE.methods
        assert len(methods) > 30
        for m in methods:
            path = f"/{forward.SERVICE_NAME}/{m.name}"
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as ei:
                if not m.client_streaming and not m.server_streaming:
                    ch.unary_unary(path)(b"", timeout=RPC_TIMEOUT)
                elif not m.client_streaming:
                    list(ch.unary_stream(path)(b"", timeout=RPC_TIMEOUT))
                elif not m.server_streaming:
                    ch.stream_unary(path)(iter([b""]), timeout=RPC_TIMEOUT)
                else:
                    list(ch.stream_stream(path)(iter([b""]), timeout=RPC_TIMEOUT))
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, m.name
            assert "agent" in (ei.value.details() or ""), m.name
            assert time.monotonic() - t0 < 5, f"{m.name} did not fail fast"
    finally:
        h.close()


def test_host_link_gone_is_unavailable_not_a_hang(host: Host, stub: Any) -> None:
    assert stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT).status == pb.CheckResponse.SERVING
    # The link drops but the monitor keeps its (now dead) channel to agent.sock.
    channel = host.channel
    host.loop.run(host.link.close())  # type: ignore[union-attr]
    host.link = None
    t0 = time.monotonic()
    err = rpc_error(lambda: stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < RPC_TIMEOUT - 1
    host.loop.run(channel.close())


# ---------------------------------------------------------------------------------------------
# Streaming, deadlines, cancellation


def test_read_logs_stream(stub: Any, guest: Guest) -> None:
    for i in range(5):
        guest.logs.emit(log_record(f"record {i}", logging.WARNING if i == 3 else logging.INFO))
    recs = list(stub.ReadLogs(pb.ReadLogsRequest(follow=False), timeout=RPC_TIMEOUT))
    assert [r.message for r in recs] == [f"cocoon.test: record {i}" for i in range(5)]
    assert [r.level for r in recs] == ["info", "info", "info", "warning", "info"]
    assert all(r.time > 0 for r in recs)


def test_read_logs_empty_stream(stub: Any) -> None:
    assert list(stub.ReadLogs(pb.ReadLogsRequest(follow=False), timeout=RPC_TIMEOUT)) == []


def test_read_logs_follow_streams_new_records(stub: Any, guest: Guest) -> None:
    guest.logs.emit(log_record("before"))
    call = stub.ReadLogs(pb.ReadLogsRequest(follow=True), timeout=RPC_TIMEOUT)
    try:
        assert next(call).message == "cocoon.test: before"
        guest.logs.emit(log_record("after"))
        assert next(call).message == "cocoon.test: after"
    finally:
        call.cancel()


def test_deadline_reaches_the_guest(stub: Any, guest: Guest) -> None:
    stub.Check(pb.CheckRequest(), timeout=3.0)
    stub.GetGuestDetails(pb.GuestDetailsRequest(), timeout=7.0)
    list(stub.ReadLogs(pb.ReadLogsRequest(), timeout=5.0))
    seen = dict(guest.deadlines.seen)
    assert set(seen) == {"Check", "GetGuestDetails", "ReadLogs"}
    for method, limit in (("Check", 3.0), ("GetGuestDetails", 7.0), ("ReadLogs", 5.0)):
        remaining = seen[method]
        assert remaining is not None, f"{method}: the guest saw no deadline"
        assert limit - 2.0 < remaining < limit + 0.5, (method, remaining)


def test_deadline_exceeded_ends_the_guest_call(stub: Any, guest: Guest) -> None:
    """A follow=True ReadLogs never ends on its own: the client's deadline must end it, and
    the guest's handler must see its RPC end too (not run on behind the forwarder)."""
    t0 = time.monotonic()
    call = stub.ReadLogs(pb.ReadLogsRequest(follow=True), timeout=0.5)
    err = rpc_error(lambda: list(call))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    wait_for(lambda: len(guest.logs.readers) == 1, 5, "the guest to start ReadLogs")
    alive = guest.logs.readers[0]
    wait_for(lambda: not alive(), 5, "the guest's ReadLogs to see the deadline")


def test_cancellation_propagates(stub: Any, guest: Guest) -> None:
    guest.logs.emit(log_record("one"))
    call = stub.ReadLogs(pb.ReadLogsRequest(follow=True), timeout=30)
    assert next(call).message == "cocoon.test: one"
    assert len(guest.logs.readers) == 1
    alive = guest.logs.readers[0]
    assert alive()
    call.cancel()
    err = rpc_error(lambda: next(call))
    assert err.code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: not alive(), 5, "the guest's ReadLogs to see the cancellation")


# ---------------------------------------------------------------------------------------------
# Load, big payloads, many sessions


def test_concurrent_unary_calls(stub: Any, guest: Guest) -> None:
    futures = []
    for i in range(20):
        if i % 3 == 0:
            futures.append(("check", stub.Check.future(pb.CheckRequest(), timeout=RPC_TIMEOUT)))
        elif i % 3 == 1:
            futures.append(("version", stub.Version.future(pb.VersionRequest(), timeout=15)))
        else:
            req = pb.GuestDetailsRequest()
            futures.append(("details", stub.GetGuestDetails.future(req, timeout=RPC_TIMEOUT)))
    for kind, fut in futures:
        resp = fut.result(timeout=RPC_TIMEOUT + 5)
        if kind == "check":
            assert resp.status == pb.CheckResponse.SERVING
        elif kind == "version":
            assert resp.api_hash == api_hash()
        else:
            assert resp.cpus_possible == 4


def test_parallel_mux_sessions(host: Host, guest: Guest) -> None:
    """Several gRPC connections to agent.sock at once: one mux session each."""
    stubs = [host.client(host.agent_sock, own_connection=True) for _ in range(5)]

    def work(i: int) -> list[int]:
        out = []
        for _ in range(4):
            d = stubs[i].GetGuestDetails(pb.GuestDetailsRequest(), timeout=RPC_TIMEOUT)
            out.append(d.cpus_possible)
        return out

    with concurrent.futures.ThreadPoolExecutor(5) as ex:
        results = list(ex.map(work, range(5), timeout=RPC_TIMEOUT * 2))
    assert results == [[4] * 4] * 5
    assert guest.sessions() >= 5
    for ch in host.clients:
        ch.close()
    host.clients.clear()
    # Closing the clients closes their sessions on the guest (only the monitor's is left).
    wait_for(lambda: guest.sessions() <= 1, 5, "the guest to drop closed sessions")


def test_copy_file_one_mib(stub: Any, guest: Guest) -> None:
    data = random.Random(7).randbytes(1024 * 1024)
    req = pb.CopyFileRequest(
        path="/var/lib/blob.bin",
        data=data,
        file_size=len(data),
        file_mode=0o600,
        dir_mode=0o750,
        uid=os.getuid(),
        gid=os.getgid(),
    )
    stub.CopyFile(req, timeout=RPC_TIMEOUT)
    target = guest.root / "var/lib/blob.bin"
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o600
    # A second, smaller copy to the same path replaces the content (offset 0 truncates).
    stub.CopyFile(
        pb.CopyFileRequest(
            path="/var/lib/blob.bin", data=b"tiny", uid=os.getuid(), gid=os.getgid()
        ),
        timeout=RPC_TIMEOUT,
    )
    assert target.read_bytes() == b"tiny"


def test_copy_file_in_chunks_with_offsets(stub: Any, guest: Guest) -> None:
    data = random.Random(8).randbytes(200_000)
    chunk = 70_000
    for off in range(0, len(data), chunk):
        req = pb.CopyFileRequest(
            path="/chunks/f",
            data=data[off : off + chunk],
            offset=off,
            file_size=len(data),
            uid=os.getuid(),
            gid=os.getgid(),
        )
        stub.CopyFile(req, timeout=RPC_TIMEOUT)
    assert (guest.root / "chunks/f").read_bytes() == data


# ---------------------------------------------------------------------------------------------
# Host reconnects: the port persists, the mux resynchronises


@pytest.mark.parametrize("channel_first", [True, False], ids=["channel-first", "link-first"])
def test_reconnect_back_to_back(host: Host, guest: Guest, channel_first: bool) -> None:
    stub = host.client()
    assert stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT).status == pb.CheckResponse.SERVING
    for i in range(10):
        host.link_down(channel_first=channel_first)
        host.link_up()
        resp = stub.Version(pb.VersionRequest(), timeout=RPC_TIMEOUT)
        assert resp.api_hash == api_hash(), f"round {i}"
        d = stub.GetGuestDetails(pb.GuestDetailsRequest(), timeout=RPC_TIMEOUT)
        assert d.cpus_online == 2, f"round {i}"
    assert guest.bridge.accepted == 11
    # The guest dropped each old host's sessions: only the current one (at most) is open.
    assert guest.sessions() <= 1


def test_reconnect_with_stale_bytes_in_the_port(host: Host, guest: Guest) -> None:
    """Guest output queued while no host is connected reaches the next host first; the new
    host must skip it until its HELLO_ACK."""
    stub = host.client()
    guest.logs.emit(log_record("x" * 1000))
    call = stub.ReadLogs(pb.ReadLogsRequest(follow=True), timeout=30)
    assert next(call).message.endswith("x" * 1000)
    host.link_down(channel_first=False)
    # The guest's session is still open: records it streams now wait in the port.
    for i in range(50):
        guest.logs.emit(log_record(f"stale {i} " + "y" * 2000))
    ready, _, _ = select.select([guest.bridge.qemu_end], [], [], 5)
    assert ready, "expected the guest's output to queue in the port"
    time.sleep(0.2)
    call.cancel()
    old_stream_alive = guest.logs.readers[0]
    assert old_stream_alive(), "the guest cannot know yet that the old host is gone"
    guest.bridge.discard_on_next_accept(5)  # the new host starts mid-header
    host.link_up()
    # The HELLO made the guest drop the old host's session (and so end its stream).
    wait_for(lambda: not old_stream_alive(), 5, "the guest to drop the old session")
    big = pb.CopyFileRequest(
        path="/after/reconnect", data=b"z" * 100_000, uid=os.getuid(), gid=os.getgid()
    )
    stub.CopyFile(big, timeout=RPC_TIMEOUT)
    assert (guest.root / "after/reconnect").read_bytes() == b"z" * 100_000


# ---------------------------------------------------------------------------------------------
# Sandbox teardown


def test_destroy_sandbox_powers_off(stub: Any, guest: Guest) -> None:
    t0 = time.monotonic()
    stub.DestroySandbox(pb.DestroySandboxRequest(), timeout=RPC_TIMEOUT)
    assert guest.powered_off.wait(5), "poweroff callback was not called"
    assert len(guest.poweroffs) == 1
    assert guest.poweroffs[0] - t0 >= 0.04  # after the reply, via the timer
    time.sleep(0.1)
    assert len(guest.poweroffs) == 1


@pytest.mark.parametrize(
    ("refresh", "meminfo", "dirty"),
    [
        (True, "Dirty: 0 kB\nWriteback: 0 kB\nWritebackTmp: 0 kB\n", 0),
        (True, "Dirty: 8 kB\nWriteback: 0 kB\nWritebackTmp: 0 kB\n", 8192),
        (True, "Dirty: 0 kB\nWriteback: 0 kB\nWritebackTmp: 4 kB\n", 4096),  # FUSE's
        (True, "Dirty: 0 kB\nWriteback: 0 kB\n", -1),  # a key missing: unknown
        (False, "Dirty: 0 kB\nWriteback: 0 kB\nWritebackTmp: 0 kB\n", -1),  # not refreshed
    ],
)
def test_destroy_sandbox_syncs_only_when_the_guest_holds_something_dirty(
    stub: Any,
    guest: Guest,
    monkeypatch: pytest.MonkeyPatch,
    refresh: bool,
    meminfo: str,
    dirty: int,
) -> None:
    """A sync() through virtio-fs is a syncfs() of the host's filesystem (virtiofsd), which on
    a host busy writing waits for all of it: only what the guest holds dirty asks for one, and
    a count that cannot be read (per-CPU counters not folded, a key missing) is taken as
    dirty."""
    (guest.root / "proc/meminfo").write_text(meminfo)
    if refresh:
        (guest.root / "proc/sys/vm").mkdir(parents=True)
        (guest.root / "proc/sys/vm/stat_refresh").write_text("")
    assert agent_guest.dirty_bytes(guest.root) == dirty
    if refresh:
        assert (guest.root / "proc/sys/vm/stat_refresh").read_text() == "1"  # folded first
    syncs: list[float] = []
    monkeypatch.setattr(os, "sync", lambda: syncs.append(time.monotonic()))
    stub.DestroySandbox(pb.DestroySandboxRequest(), timeout=RPC_TIMEOUT)
    assert guest.powered_off.wait(5), "poweroff callback was not called"
    assert len(syncs) == (1 if dirty else 0)


def test_guest_resyncs_after_host_died_mid_frame(host: Host, guest: Guest) -> None:
    """A host that dies in the middle of a frame leaves the guest's decoder waiting for the
    rest of it: the next host's flush must complete that frame so its HELLO is seen."""
    host.link_down()
    before = guest.bridge.finished
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dying:
        dying.connect(str(guest.port_sock))
        dying.sendall(mux.HEADER.pack(mux.FrameType.DATA, 999, mux.MAX_PAYLOAD) + b"q" * 1000)
    wait_for(lambda: guest.bridge.finished > before, 5, "the dying host's bytes to be relayed")
    t0 = time.monotonic()
    host.link_up()
    assert time.monotonic() - t0 < 5
    stub = host.client()
    assert stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT).status == pb.CheckResponse.SERVING


class _HeldSocket(socket.socket):
    """A socket whose recv can be made to stall after it has data (a preempted thread)."""

    made: list[_HeldSocket] = []
    release = threading.Event()

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.hold = False
        self.holding = threading.Event()
        _HeldSocket.made.append(self)

    def recv(self, n: int, flags: int = 0) -> bytes:
        data = super().recv(n, flags)
        if data and self.hold:
            self.holding.set()
            _HeldSocket.release.wait(10)
        return data


def test_old_session_output_never_reaches_the_new_host(
    host: Host, guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session ids restart with each host connection. Output an old session's reader had
    already read when the HELLO dropped it must not be sent after the HELLO_ACK: the new host
    would hand it to its own session with the same id, corrupting that connection."""
    _HeldSocket.made.clear()
    _HeldSocket.release.clear()
    shim = types.SimpleNamespace(**vars(socket))
    shim.socket = _HeldSocket
    monkeypatch.setattr(agent_channel, "socket", shim)
    try:
        old = host.client(host.agent_sock, own_connection=True)
        guest.logs.emit(log_record("first"))
        stream = old.ReadLogs(pb.ReadLogsRequest(follow=True), timeout=30)
        assert next(stream).message == "cocoon.test: first"
        (old_sock,) = _HeldSocket.made  # the guest's connection for session 1
        old_sock.hold = True
        guest.logs.emit(log_record("in flight when the host goes away"))
        assert old_sock.holding.wait(5), "the guest's session reader did not read the record"

        host.link_down()
        host.link_up()
        new = host.client(host.agent_sock, own_connection=True)
        # The new host's first session gets id 1 again; its first stream is HTTP/2 stream 1
        # again, just like the old session's ReadLogs.
        fresh = new.ReadLogs(pb.ReadLogsRequest(follow=True), timeout=30)
        got = [next(fresh).message, next(fresh).message]
        assert got == ["cocoon.test: first", "cocoon.test: in flight when the host goes away"]
        assert len(_HeldSocket.made) == 2
        _HeldSocket.release.set()  # the old reader resumes with the record it had read
        time.sleep(0.3)
        guest.logs.emit(log_record("sentinel"))
        # Only the new record may come next, not a replay of the old session's bytes.
        assert next(fresh).message == "cocoon.test: sentinel"
        fresh.cancel()
        stream.cancel()
        resp = new.GetGuestDetails(pb.GuestDetailsRequest(), timeout=RPC_TIMEOUT)
        assert resp.cpus_possible == 4
    finally:
        _HeldSocket.release.set()


# ---------------------------------------------------------------------------------------------
# Raw output streams (SerialMuxHost.open_stream <-> SerialMux's raw sessions)


def read_stdout(host: Host, until: int = -1) -> tuple[bytes, int]:
    """c1's stdout through a raw stream, granted back chunk by chunk: its bytes (to its end, or
    the first ``until`` of them) and the longest frame's payload."""

    async def read() -> tuple[bytes, int]:
        assert host.link is not None
        raw = await host.link.open_stream("c1", "", "stdout")
        got, largest = bytearray(), 0
        while len(got) != until and (chunk := await raw.read()):
            got += chunk
            largest = max(largest, len(chunk))
            await raw.grant(len(chunk))
        await raw.close()
        return bytes(got), largest

    return host.loop.run(read(), timeout=60)


def test_a_raw_stream_carries_a_pipe_byte_exact_beside_grpc(
    host: Host, guest: Guest, stub: Any
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    writer = pipe_writer(guest.pipes, ("c1", "", "stdout"), data)

    got, largest = read_stdout(host)
    assert got == data
    # A pipe is spliced: frames longer than a write() could make, never beyond the limit.
    assert mux.MAX_PAYLOAD < largest <= mux.RAW_SPLICE_MAX
    writer.join(5)
    assert stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT).status == pb.CheckResponse.SERVING
    wait_for(lambda: not guest.mux._raw, 5, "the guest to forget the ended stream")


def test_a_frame_larger_than_the_staging_pipe_leaves_in_pieces_byte_exact(
    host: Host, guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staging pipe could not be enlarged (the kernel refused): frames longer than it
    go to the port in several splices, still whole and in order."""
    monkeypatch.setattr(agent_channel, "F_SETPIPE_SZ", -1)  # fcntl: EINVAL, default 64 KiB
    data = os.urandom(2 * 1024 * 1024 + 7)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1024 * 1024)  # the source holds more than the stage
    guest.pipes[("c1", "", "stdout")] = r

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)

    t = threading.Thread(target=write, daemon=True)
    t.start()

    got, largest = read_stdout(host)
    assert got == data
    assert largest > 64 * 1024  # a frame longer than the staging pipe went out
    t.join(5)


def test_a_pipe_lost_inside_a_frame_pads_it_and_the_port_stays_in_step(
    host: Host, guest: Guest, stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process's pipe fails in the middle of a spliced frame (removed, its fd closed): the
    frame is finished with zeros, the stream ends with CLOSE, and the port keeps serving."""
    data = os.urandom(200 * 1024)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1024 * 1024)
    os.write(w, data)  # all buffered: one frame of 200 KiB
    guest.pipes[("c1", "", "stdout")] = r
    real = os.splice
    calls: list[int] = []

    def flaky(src: int, dst: int, count: int, *a: Any, **kw: Any) -> int:
        if src != r:
            return real(src, dst, count, *a, **kw)
        calls.append(count)
        if len(calls) == 1:
            return real(src, dst, 1000, *a, **kw)
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(os, "splice", flaky)
    got, _ = read_stdout(host)
    assert got == data[:1000] + bytes(len(data) - 1000)
    assert stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT).status == pb.CheckResponse.SERVING
    wait_for(lambda: not guest.mux._raw, 5, "the guest to forget the ended stream")
    os.close(w)


def test_a_raw_stream_from_a_pty_is_read_in_frames_of_a_write(host: Host, guest: Guest) -> None:
    """A pty master cannot be spliced: its stream takes the read path, byte exact, each frame
    at most what one write() to the port carries."""
    data = os.urandom(256 * 1024)
    _, t = pty_writer(guest.pipes, ("c1", "", "stdout"), data)

    got, largest = read_stdout(host, until=len(data))
    assert got == data and 0 < largest <= mux.RAW_CHUNK
    t.join(5)


def test_a_raw_stream_not_granted_stalls_alone(host: Host, guest: Guest, stub: Any) -> None:
    data = os.urandom(2 * mux.RAW_WINDOW)
    writer = pipe_writer(guest.pipes, ("c1", "e1", "stderr"), data)

    async def first_window() -> tuple[Any, bytes]:
        assert host.link is not None
        raw = await host.link.open_stream("c1", "e1", "stderr")
        got = bytearray()
        while len(got) < mux.RAW_WINDOW:
            got += await raw.read()
        await asyncio.sleep(0.5)  # nothing more may come: the window is used up
        assert raw._chunks.empty()
        return raw, bytes(got)

    raw, got = host.loop.run(first_window())
    assert got == data[: mux.RAW_WINDOW]
    # the port and every other session keep moving while that stream waits
    assert stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT).status == pb.CheckResponse.SERVING

    async def rest() -> bytes:
        await raw.grant(len(got))
        more = bytearray()
        while chunk := await raw.read():
            more += chunk
            await raw.grant(len(chunk))
        return bytes(more)

    assert host.loop.run(rest()) == data[mux.RAW_WINDOW :]
    writer.join(5)


def test_a_raw_stream_of_no_process_ends_at_once_and_a_closed_one_stops(
    host: Host, guest: Guest
) -> None:
    writer = pipe_writer(guest.pipes, ("c1", "", "stdout"), b"x" * (4 * mux.RAW_WINDOW))

    async def go() -> tuple[bytes, bytes]:
        assert host.link is not None
        none = await host.link.open_stream("nobody", "", "stdout")
        nothing = await asyncio.wait_for(none.read(), 5)
        raw = await host.link.open_stream("c1", "", "stdout")
        first = await raw.read()
        await raw.close()  # the reader went away: the guest stops sending
        return nothing, first

    nothing, first = host.loop.run(go())
    assert nothing == b"" and first
    wait_for(lambda: not guest.mux._raw, 5, "the guest to end the closed stream")
    os.close(guest.pipes.pop(("c1", "", "stdout")))  # the writer sees EPIPE, as a workload would
    writer.join(5)
    assert not writer.is_alive()


def test_a_guest_sending_beyond_its_window_loses_that_stream_only() -> None:
    """A guest that ignores the window cannot make the monitor hold more than it granted."""
    sent = bytearray()

    class PortWriter:
        def write(self, b: bytes) -> None:
            sent.extend(b)

        async def drain(self) -> None:
            return None

        def close(self) -> None:
            return None

    async def go() -> tuple[list[bytes], list[bytes], int]:
        link = SerialMuxHost(Path("/nonexistent"), Path("/nonexistent"))
        reader = asyncio.StreamReader()
        link._reader, link._writer = reader, PortWriter()  # type: ignore[assignment]
        link._decoder.resync = False
        pump = asyncio.create_task(link._pump_port())
        greedy = await link.open_stream("c1", "", "stdout")
        good = await link.open_stream("c2", "", "stdout")
        for _ in range(mux.RAW_WINDOW // mux.MAX_PAYLOAD + 1):
            reader.feed_data(mux.encode(mux.FrameType.DATA, greedy.sid, bytes(mux.MAX_PAYLOAD)))
        reader.feed_data(mux.encode(mux.FrameType.DATA, good.sid, b"fine"))
        reader.feed_data(mux.encode(mux.FrameType.CLOSE, good.sid))
        got_good = [await good.read(), await good.read()]
        got_greedy = []
        while chunk := await greedy.read():
            got_greedy.append(chunk)
        reader.feed_eof()
        await pump
        return got_good, got_greedy, greedy.sid

    got_good, got_greedy, sid = asyncio.run(go())
    assert got_good == [b"fine", b""]
    assert len(got_greedy) == mux.RAW_WINDOW // mux.MAX_PAYLOAD
    assert Frame(mux.FrameType.CLOSE, sid) in mux.Decoder().feed(bytes(sent))


def test_a_raw_stdin_arrives_in_order_and_a_stalled_reader_stalls_it_alone(
    host: Host, guest: Guest, stub: Any
) -> None:
    w, got, go = pipe_reader(guest.pipes, ("c1", "", "stdin"))
    data = os.urandom(4 * mux.RAW_WINDOW + 7)

    async def send_until_stalled() -> Any:
        assert host.link is not None
        raw = await host.link.open_input("c1", "")
        task = asyncio.ensure_future(raw.write(data))
        await asyncio.sleep(1.0)  # the reader does not read: the pipe, then the window, fill
        assert not task.done() and raw.credit < mux.MAX_PAYLOAD
        return raw, task

    raw, task = host.loop.run(send_until_stalled())
    assert stub.Check(pb.CheckRequest(), timeout=RPC_TIMEOUT).status == pb.CheckResponse.SERVING
    go.set()

    async def finish() -> bool:
        ok = bool(await task)
        await raw.finish()
        return ok

    assert host.loop.run(finish(), timeout=60)
    os.close(w)  # what CloseStdin does, once the stream has ended
    wait_for(lambda: bytes(got) == data, 10, "stdin to arrive whole and in order")
    wait_for(lambda: not guest.mux._raw, 5, "the guest to end the finished stream")


def test_a_raw_stdin_whose_process_is_gone_ends(host: Host, guest: Guest) -> None:
    r, w = os.pipe()
    guest.pipes[("c1", "", "stdin")] = w
    os.close(r)  # the process exited: writing to its stdin is EPIPE

    async def go() -> bool:
        assert host.link is not None
        raw = await host.link.open_input("c1", "")
        ok = await raw.write(bytes(3 * mux.RAW_WINDOW))
        await raw.finish()
        return ok or not raw.ended

    assert host.loop.run(go(), timeout=30) is False
    os.close(w)
