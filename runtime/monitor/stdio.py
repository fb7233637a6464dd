"""The shims' endpoint, ``<state>/stdio.sock``: raw byte streams and a line of JSON for
control, so that a shim imports neither gRPC nor protobuf.

A shim opens one connection per stream of its process; each starts with one JSON line of at
most 4 KiB: ``{"container_id": C, "exec_id": E, "stream": S}``, S one of

* ``stdout``, ``stderr``: the monitor relays the process's output as raw bytes and closes the
  connection when the guest closed the stream (or the process is gone). Over virtio-serial
  the output comes as a raw stream of the mux (channel.RawStream: no gRPC in the guest), each
  chunk granted back to the guest once written and drained; over vsock as a vsock connection
  of its own (channel.VsockStream), each chunk drained before the next is read, vsock's credit
  being the window. Either way a shim that stops reading stalls its own stream only: the
  agent's pipe fills and the workload blocks, nothing else does. (The agent's
  ReadStdout/ReadStderr carry it only for an endpoint given no channel of raw streams.)
* ``stdin`` (with ``"close": true|false``): raw bytes from the shim go to the process as they
  come (a raw stream of the mux, within the guest's grants; a vsock connection of its own
  over vsock; WriteStdin without raw streams); at the
  shim's EOF, once the guest has written them all, the stream ends and, with ``close``, the
  guest closes the process's stdin (CloseStdin; not for a terminal, whose EOF is the user's
  ^D). An exec started with ``"stdin": false`` has none: it reads /dev/null in the guest.
* ``control``: lines from the shim, ``{"signal": N}`` (SignalProcess) and ``{"resize":
  [rows, cols]}`` (TtyWinResize); one line back when the process ended, ``{"exit": status}``
  or ``{"lost": why}``. The connection closing before that abandons the process: the
  WaitProcess call is cancelled (the agent kills a process whose wait was abandoned) and the
  process is sent SIGKILL, so a SIGKILLed shim takes its workload with it, as runc's would.
  An exec's shim starts its process on this connection: with ``"size": N`` (and
  ``"terminal"``, ``"stdin"``) N bytes of the OCI process as JSON follow the line, the
  monitor does the agent's ExecProcess and answers ``{"started": true}`` first, or
  ``{"error": details, "code": C}`` (C a gRPC status name; a call that ran out of time in
  errors.DEADLINE_WORDS) and closes. So ``cocoon exec``
  needs no gRPC of its own, and a started process always has a shim whose going away kills
  it.

A first line with ``call`` in it is not a shim's: it carries one unary call of the CLI to the
VM service or the agent (monitor.calls), answered on the same connection.

Bad input from a shim (a long or malformed line, an unknown stream or field) closes that
connection and is logged; the other connections and the sandbox carry on.

May import: the standard library, grpc, cocoon.agent.{agent_pb2, mux}, cocoon.runtime.errors,
cocoon.runtime.monitor.{agentcalls, calls, channel, launch}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from cocoon.agent import agent_pb2 as apb
from cocoon.agent import mux
from cocoon.runtime.errors import DEADLINE_WORDS
from cocoon.runtime.monitor import calls as calls_mod
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.monitor.agentcalls import Stub
from cocoon.runtime.monitor.channel import SerialMuxHost, VsockRelay

log = logging.getLogger("cocoon.monitor.stdio")

HELLO_MAX = 4096  # the longest line a shim may send
CHUNK = 64 * 1024
GRANT_BATCH = mux.RAW_WINDOW // 2  # a raw stream's room given back half a window at a time
EXEC_TIMEOUT = 120.0  # crun exec in the guest, under TCG on a loaded host
SIGNAL_MAX = signal.SIGRTMAX
CALL_GRACE = 2.0  # how long a closing endpoint lets the calls in flight answer
# The fields each stream's first line may carry besides container_id, exec_id and stream.
STREAMS: dict[str, dict[str, type]] = {
    "stdout": {},
    "stderr": {},
    "stdin": {"close": bool},
    "control": {"size": int, "terminal": bool, "stdin": bool},
}


class BadHello(Exception):
    pass


@dataclass(frozen=True)
class Hello:
    container_id: str
    exec_id: str
    stream: str
    close: bool = False  # stdin: the guest closes the process's stdin at the shim's EOF
    size: int = 0  # control of an exec: the length of the process JSON after the line
    terminal: bool = False  # control of an exec: the process has a terminal
    stdin: bool = True  # control of an exec: False, its stdin is /dev/null (no stdin stream)


def parse_line(line: bytes) -> dict[str, Any]:
    """A connection's first line as a JSON object."""
    try:
        h = json.loads(line)
    except ValueError:
        raise BadHello("not JSON") from None
    if not isinstance(h, dict):
        raise BadHello("not an object")
    return h


def parse_hello(line: bytes) -> Hello:
    """A shim's first line, checked field by field."""
    return hello(parse_line(line))


def hello(h: dict[str, Any]) -> Hello:
    cid, eid, stream = h.pop("container_id", None), h.pop("exec_id", ""), h.pop("stream", None)
    if not isinstance(cid, str) or not cid or not isinstance(eid, str):
        raise BadHello("container_id and exec_id must be strings")
    if stream not in STREAMS:
        raise BadHello(f"unknown stream {stream!r}")
    fields = STREAMS[stream]
    for k, v in h.items():
        if k not in fields or type(v) is not fields[k]:
            raise BadHello(f"unknown field {k!r} or not a {fields.get(k, object).__name__}")
    if "size" in h and not 0 < h["size"] <= L.EXEC_MAX:
        raise BadHello(f"size must be 1..{L.EXEC_MAX}")
    return Hello(cid, eid, stream, **h)


def parse_control(line: bytes) -> tuple[str, tuple[int, ...]]:
    """("signal", (n,)) or ("resize", (rows, cols)); ValueError for anything else."""
    msg = json.loads(line)
    if isinstance(msg, dict) and len(msg) == 1:
        ((key, value),) = msg.items()
        if key == "signal" and type(value) is int and 1 <= value <= SIGNAL_MAX:
            return "signal", (value,)
        if (
            key == "resize"
            and isinstance(value, list)
            and len(value) == 2
            and all(type(v) is int and 0 < v < 65536 for v in value)
        ):
            return "resize", (value[0], value[1])
    raise ValueError(f"not a control message: {line[:80]!r}")


class Endpoint:
    """Serves the shims of one sandbox; ``channel()`` is the monitor's agent channel."""

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel | None],
        timeout: float,
        link: Callable[[], SerialMuxHost | VsockRelay | None] = lambda: None,
    ) -> None:
        """``link``: the channel's raw streams (the virtio-serial mux's sessions, or vsock
        connections of their own); without it, gRPC's stream calls carry stdio."""
        self._channel = channel
        self._timeout = timeout
        self._link = link
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[asyncio.StreamWriter] = set()
        self.calls: calls_mod.Calls | None = None  # set once the VM service exists
        self.calling: set[asyncio.Task[Any]] = set()  # the handlers of calls not answered yet
        self.closed = False

    async def serve(self, path: Path) -> None:
        self.server = await asyncio.start_unix_server(self._handle, str(path), limit=HELLO_MAX)
        path.chmod(0o600)

    async def close(self) -> None:
        """No new shims, and the connected ones learn that the sandbox is gone; calls being
        answered (the Shutdown that ended the sandbox) get their answer first. A connection
        accepted before this but not yet handled is closed by its handler (``closed``), or a
        shim could wait on it for as long as this process outlives its endpoint."""
        self.closed = True
        if self.calling:
            await asyncio.wait(self.calling, timeout=CALL_GRACE)
        writers = list(self.conns)
        for w in writers:
            w.close()
        if writers:  # a transport closes in a later turn of the loop, which may be the last
            waits = asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waits, 2)
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closed:
            writer.close()
            return
        self.conns.add(writer)
        try:
            try:
                first = parse_line(await asyncio.wait_for(reader.readuntil(b"\n"), 10))
                if "call" in first:
                    await self._call(first, reader, writer)
                    return
                h = hello(first)
                body = await asyncio.wait_for(reader.readexactly(h.size), 10) if h.size else b""
            except (
                BadHello,
                calls_mod.BadCall,
                ValueError,
                asyncio.IncompleteReadError,
                TimeoutError,
            ) as exc:
                log.warning("connection refused: %s", exc)
                return
            channel = self._channel()
            if channel is None:
                return
            stub = Stub(channel)
            cid, eid = h.container_id, h.exec_id
            if h.stream in ("stdout", "stderr"):
                await self._output(stub, cid, eid, h.stream, writer)
            elif h.stream == "stdin":
                await self._input(stub, cid, eid, h.close, reader)
            elif not body or await self._exec(stub, h, body, writer):
                await self._control(stub, cid, eid, reader, writer)
        except (ConnectionError, OSError) as exc:
            log.debug("shim connection ended: %s", exc)
        finally:
            self.conns.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _call(
        self, first: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A client's unary call (monitor.calls)."""
        h = calls_mod.parse_header(first)
        body = await asyncio.wait_for(reader.readexactly(h.size), 10)
        if self.calls is None:
            raise calls_mod.BadCall("the sandbox's services are not up yet")
        task = asyncio.current_task()
        assert task is not None  # a connection's handler runs as a task
        self.calling.add(task)
        try:
            await calls_mod.serve(self.calls, h, body, reader, writer)
        finally:
            self.calling.discard(task)

    async def _exec(self, stub: Stub, h: Hello, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Starts an exec's process; False if the agent refused it (the shim has the error)."""
        reply: dict[str, Any] = {"started": True}
        try:
            await stub.ExecProcess(
                apb.ExecProcessRequest(
                    container_id=h.container_id,
                    exec_id=h.exec_id,
                    process_json=body,
                    stdio=apb.StdioConfig(terminal=h.terminal, stdin=h.stdin),
                ),
                timeout=EXEC_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            why = DEADLINE_WORDS if code == grpc.StatusCode.DEADLINE_EXCEEDED else exc.details()
            reply = {"error": why or str(code), "code": code.name}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
        return "started" in reply

    async def _output(
        self,
        stub: Stub,
        cid: str,
        eid: str,
        stream: str,
        writer: asyncio.StreamWriter,
    ) -> None:
        link = self._link()
        if link is not None:
            await self._output_raw(link, cid, eid, stream, writer)
            return
        req = apb.ReadStreamRequest(container_id=cid, exec_id=eid)
        call = (stub.ReadStdout if stream == "stdout" else stub.ReadStderr)(req)
        try:
            async for chunk in call:
                writer.write(chunk.data)
                await writer.drain()
        except grpc.aio.AioRpcError as exc:
            log.debug("%s %s/%s: %s", stream, cid, eid, exc.code())
        finally:
            call.cancel()

    async def _output_raw(
        self,
        link: SerialMuxHost | VsockRelay,
        cid: str,
        eid: str,
        stream: str,
        writer: asyncio.StreamWriter,
    ) -> None:
        raw = await link.open_stream(cid, eid, stream)
        owed = 0  # passed on, not yet granted back: granted in batches (each grant wakes the guest)
        try:
            while chunk := await raw.read():
                writer.write(chunk)
                await writer.drain()
                owed += len(chunk)
                if owed >= GRANT_BATCH:
                    await raw.grant(owed)
                    owed = 0
        finally:
            await raw.close()  # a no-op after the guest's CLOSE

    async def _input(
        self,
        stub: Stub,
        cid: str,
        eid: str,
        close: bool,
        reader: asyncio.StreamReader,
    ) -> None:
        link = self._link()
        if link is not None:
            raw = await link.open_input(cid, eid)
            try:
                while (data := await reader.read(CHUNK)) and await raw.write(data):
                    pass
                await raw.finish()  # all written to the pipe before CloseStdin
            finally:
                await raw.close()
        else:

            async def chunks() -> AsyncIterator[apb.WriteStreamRequest]:
                while data := await reader.read(CHUNK):
                    yield apb.WriteStreamRequest(container_id=cid, exec_id=eid, data=data)

            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.WriteStdin(chunks())
        if close:
            with contextlib.suppress(grpc.aio.AioRpcError):
                req = apb.CloseStdinRequest(container_id=cid, exec_id=eid)
                await stub.CloseStdin(req, timeout=self._timeout)

    async def _control(
        self,
        stub: Stub,
        cid: str,
        eid: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        wait = asyncio.ensure_future(
            stub.WaitProcess(apb.WaitProcessRequest(container_id=cid, exec_id=eid))
        )
        try:
            while True:
                line_task = asyncio.ensure_future(reader.readline())
                await asyncio.wait({wait, line_task}, return_when=asyncio.FIRST_COMPLETED)
                if wait.done():
                    line_task.cancel()
                    break
                try:
                    line = line_task.result()
                except ValueError:  # longer than HELLO_MAX: not a shim speaking
                    log.warning("shim of %s/%s: overlong control line", cid, eid)
                    return
                if not line.endswith(b"\n"):
                    log.info("shim of %s/%s went away: its process is killed", cid, eid)
                    wait.cancel()
                    await self._kill(stub, cid, eid)
                    return
                await self._command(stub, cid, eid, line)
            reply: dict[str, Any]
            try:
                status = (await wait).status
                reply = {"exit": status if 0 <= status <= 255 else 255}
            except grpc.aio.AioRpcError as exc:
                reply = {"lost": exc.details() or str(exc.code())}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            wait.cancel()  # a no-op once it returned; else the agent kills the process

    async def _kill(self, stub: Stub, cid: str, eid: str) -> None:
        """The process of a shim that went away: SIGKILL, besides the abandoned wait (which the
        agent may not have seen yet if the shim died at once)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.SignalProcess(
                apb.SignalProcessRequest(container_id=cid, exec_id=eid, signal=signal.SIGKILL),
                timeout=self._timeout,
            )

    async def _command(self, stub: Stub, cid: str, eid: str, line: bytes) -> None:
        try:
            kind, args = parse_control(line)
        except ValueError as exc:
            log.warning("shim of %s/%s: %s", cid, eid, exc)
            return
        with contextlib.suppress(grpc.aio.AioRpcError):
            if kind == "signal":
                await stub.SignalProcess(
                    apb.SignalProcessRequest(container_id=cid, exec_id=eid, signal=args[0]),
                    timeout=self._timeout,
                )
            else:
                await stub.TtyWinResize(
                    apb.TtyWinResizeRequest(
                        container_id=cid, exec_id=eid, rows=args[0], columns=args[1]
                    ),
                    timeout=self._timeout,
                )
