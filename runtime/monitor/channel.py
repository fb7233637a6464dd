"""Host end of the agent channel: a local unix socket whose every connection reaches the agent.

gRPC (grpcio) dials ``unix:<state>/agent.sock``; behind it:
- virtio-serial: ``SerialMuxHost`` connects to QEMU's chardev socket, performs the
  flush + HELLO / HELLO_ACK resync (cocoon.agent.mux explains why), then carries each local
  connection as one mux session.
- vsock: ``VsockRelay`` connects a fresh AF_VSOCK socket to the guest's port per local
  connection (grpcio as shipped cannot dial vsock).

``SerialMuxHost.open_stream`` opens a raw stream of one process's stdout or stderr as a mux
session of its own (``RawStream``: chunks in, grants back), ``open_input`` one to its stdin
(``RawInput``: chunks out within the guest's grants), which the shims' endpoint
(monitor.stdio) relays without gRPC. ``VsockRelay`` opens them as vsock connections of their
own (``VsockStream``, ``VsockInput``: the same methods; vsock's credit is the window).

May import: the standard library, cocoon.agent.{errors, mux}, cocoon.runtime.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cocoon.agent import mux
from cocoon.agent.errors import MuxProtocolError
from cocoon.runtime.errors import ChannelError

log = logging.getLogger("cocoon.monitor.channel")


class _RawSession:
    """A raw stream's mux session: its id, the window's count, and ending it from our side."""

    def __init__(self, link: SerialMuxHost, sid: int) -> None:
        self._link = link
        self.sid = sid
        self.credit = mux.RAW_WINDOW
        self.ended = False  # by either side, or the port was lost

    def _end(self) -> None:
        self.ended = True

    async def close(self) -> None:
        """Ends the stream from our side (a no-op once it ended on the guest's)."""
        if self._link._raw.pop(self.sid, None) is not None:
            self._end()
            with contextlib.suppress(ConnectionError, OSError):
                await self._link._send(mux.encode(mux.FrameType.CLOSE, self.sid))


class RawStream(_RawSession):
    """One process's output as a mux session: ``read()`` gives its chunks (b"" at its end),
    ``grant(n)`` gives the guest room for n more bytes once the caller has passed n on;
    ``credit`` is what the guest may still send."""

    def __init__(self, link: SerialMuxHost, sid: int) -> None:
        super().__init__(link, sid)
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()

    def _put(self, data: bytes) -> bool:
        """Queues a chunk; False (and the stream ends) if the guest sent beyond its window."""
        self.credit -= len(data)
        if self.credit < 0:
            log.warning("raw stream %d: the guest sent beyond its window; ended", self.sid)
            self._end()
            return False
        if not self.ended:
            self._chunks.put_nowait(data)
        return True

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self._chunks.put_nowait(b"")

    async def read(self) -> bytes:
        return await self._chunks.get()

    async def grant(self, n: int) -> None:
        if not self.ended:
            self.credit += n
            await self._link._send(mux.encode_window(self.sid, n))


class RawInput(_RawSession):
    """A process's stdin as a mux session: ``write()`` sends within the window the guest has
    granted back (a process that stops reading stalls this stream only), ``finish()`` waits
    until the guest has written everything to the pipe, then ends the stream; ``credit`` is
    what we may still send."""

    def __init__(self, link: SerialMuxHost, sid: int) -> None:
        super().__init__(link, sid)
        self._changed = asyncio.Event()

    def _grant(self, n: int) -> None:
        self.credit = min(self.credit + n, mux.RAW_WINDOW)  # never beyond the window
        self._changed.set()

    def _end(self) -> None:
        self.ended = True
        self._changed.set()

    async def _room(self, want: int) -> None:
        while self.credit < want and not self.ended:
            self._changed.clear()
            await self._changed.wait()

    async def write(self, data: bytes) -> bool:
        """False once the stream has ended (the process's stdin is gone)."""
        for off in range(0, len(data), mux.MAX_PAYLOAD):
            chunk = data[off : off + mux.MAX_PAYLOAD]
            await self._room(len(chunk))
            if self.ended:
                return False
            self.credit -= len(chunk)
            await self._link._send(mux.encode(mux.FrameType.DATA, self.sid, chunk))
        return True

    async def finish(self) -> None:
        """Waits until the guest has written all we sent, then ends the stream."""
        await self._room(mux.RAW_WINDOW)
        await self.close()


class SerialMuxHost:
    def __init__(self, port_socket: Path, listen: Path) -> None:
        self._port_socket = port_socket
        self._listen = listen
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sessions: dict[int, asyncio.StreamWriter] = {}
        self._raw: dict[int, RawStream | RawInput] = {}
        self._ids = itertools.count(1)
        self._decoder = mux.Decoder(resync=True)
        self._server: asyncio.AbstractServer | None = None
        self._pump: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()

    async def connect(self, deadline: float) -> None:
        """Connects to QEMU's port and waits for the agent's HELLO_ACK (monotonic deadline)."""
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self._port_socket)
                )
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise ChannelError(f"agent port {self._port_socket}: {exc}") from exc
                await asyncio.sleep(0.02)
        nonces: set[bytes] = set()
        while True:
            nonce = os.urandom(mux.NONCE_LEN)
            # Only the first HELLO needs the flush (a previous client may have left half a
            # frame); retries follow our own complete frames. Retrying often is cheap and
            # bounds the delay between the agent starting and us noticing.
            hello = mux.encode(mux.FrameType.HELLO, 0, nonce)
            self._writer.write(mux.flush_and(mux.FrameType.HELLO, nonce) if not nonces else hello)
            nonces.add(nonce)
            await self._writer.drain()
            try:
                if await self._await_ack(nonces, min(0.05, max(0.0, deadline - time.monotonic()))):
                    break
            except asyncio.IncompleteReadError as exc:
                raise ChannelError("QEMU closed the agent port before the agent answered") from exc
            if time.monotonic() > deadline:
                raise ChannelError("the guest agent did not answer on the virtio-serial port")
        # In step with the guest from here: its spliced DATA frames may be longer than the
        # flush that resyncs us (MAX_PAYLOAD), so they are taken only now.
        self._decoder.resync = False
        self._decoder.max_payload = mux.RAW_SPLICE_MAX
        self._pump = asyncio.create_task(self._pump_port())

    async def _await_ack(self, nonces: set[bytes], timeout: float) -> bool:
        assert self._reader is not None
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            try:
                data = await asyncio.wait_for(self._reader.read(65536), left)
            except TimeoutError:
                return False
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            for frame in self._decoder.feed(data):
                if frame.type is mux.FrameType.HELLO_ACK and frame.payload in nonces:
                    return True

    async def serve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._listen.unlink()
        self._server = await asyncio.start_unix_server(self._on_client, str(self._listen))

    async def _send(self, data: bytes) -> None:
        if self._writer is None or self.lost.is_set():
            raise ConnectionError("agent port lost")
        self._writer.write(data)
        await self._writer.drain()

    async def _open(self, raw: RawStream | RawInput, cid: str, eid: str, stream: str) -> None:
        self._raw[raw.sid] = raw
        req = mux.RawRequest(cid, eid, stream, mux.RAW_WINDOW)
        try:
            await self._send(mux.encode(mux.FrameType.OPEN, raw.sid, req.encode()))
        except BaseException:
            self._raw.pop(raw.sid, None)
            raise

    async def open_stream(self, container_id: str, exec_id: str, stream: str) -> RawStream:
        """A raw stream of the process's ``stream`` ("stdout" or "stderr")."""
        raw = RawStream(self, next(self._ids))
        await self._open(raw, container_id, exec_id, stream)
        return raw

    async def open_input(self, container_id: str, exec_id: str) -> RawInput:
        """A raw stream to the process's stdin."""
        raw = RawInput(self, next(self._ids))
        await self._open(raw, container_id, exec_id, "stdin")
        return raw

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sid = next(self._ids)
        self._sessions[sid] = writer
        try:
            await self._send(mux.encode(mux.FrameType.OPEN, sid))
            while True:
                data = await reader.read(mux.MAX_PAYLOAD)
                if not data:
                    break
                if sid not in self._sessions:
                    return
                await self._send(mux.encode(mux.FrameType.DATA, sid, data))
            if self._sessions.pop(sid, None) is not None:
                await self._send(mux.encode(mux.FrameType.CLOSE, sid))
        except (ConnectionError, OSError):
            pass
        finally:
            self._sessions.pop(sid, None)
            writer.close()

    async def _pump_port(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(256 * 1024)
                if not data:
                    break
                for frame in self._decoder.feed(data):
                    raw = self._raw.get(frame.session)
                    if raw is not None:  # bounded by the window it granted: never blocks
                        if frame.type is mux.FrameType.CLOSE:
                            del self._raw[frame.session]
                            raw._end()
                        elif isinstance(raw, RawInput):
                            if frame.type is mux.FrameType.WINDOW:
                                raw._grant(mux.decode_window(frame.payload))
                        elif frame.type is mux.FrameType.DATA and not raw._put(frame.payload):
                            await raw.close()
                        continue
                    w = self._sessions.get(frame.session)
                    if frame.type is mux.FrameType.DATA and w is not None:
                        w.write(frame.payload)
                        with contextlib.suppress(ConnectionError):
                            await w.drain()
                    elif frame.type is mux.FrameType.CLOSE and w is not None:
                        self._sessions.pop(frame.session, None)
                        with contextlib.suppress(OSError):
                            w.write_eof()
        except (ConnectionError, MuxProtocolError) as exc:
            log.error("agent port: %s", exc)
        finally:
            self.lost.set()
            for w in self._sessions.values():
                w.close()
            self._sessions.clear()
            for raw in self._raw.values():
                raw._end()
            self._raw.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._pump is not None:
            self._pump.cancel()
        if self._writer is not None:
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            self._listen.unlink()


Dial = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class VsockStream:
    """A raw output stream over vsock (a connection of its own, cocoon.agent.mux): the same
    ``read``/``grant``/``close`` as ``RawStream``; vsock's own credit is its window."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self) -> bytes:
        try:
            return await self._reader.read(mux.RAW_WINDOW // 4)
        except (ConnectionError, OSError):
            return b""

    async def grant(self, n: int) -> None:
        """Nothing to grant: a chunk read off the socket is room the guest sees."""

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class VsockInput(VsockStream):
    """A raw stdin stream over vsock: the same ``write``/``finish``/``close`` as
    ``RawInput``."""

    async def write(self, data: bytes) -> bool:
        """False once the stream has ended (the guest closed it: the process's stdin is
        gone)."""
        if self._reader.at_eof() or self._writer.is_closing():
            return False
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def finish(self) -> None:
        """Ends our side, then waits until the guest has written all we sent (it closes the
        connection then), and closes it."""
        with contextlib.suppress(ConnectionError, OSError):
            self._writer.write_eof()
            while await self._reader.read(4096):
                pass
        await self.close()


class VsockRelay:
    """Relays each local connection to a new vsock connection to the guest agent, and opens
    raw streams as vsock connections of their own (``open_stream``, ``open_input``).
    ``dial`` connects to a port of the guest (a vsock one unless a test gives its own)."""

    def __init__(self, cid: int, port: int, listen: Path, dial: Dial | None = None) -> None:
        self._cid, self._port, self._listen = cid, port, listen
        self._dial_port = dial or self._dial_vsock
        self._server: asyncio.AbstractServer | None = None
        self.lost = asyncio.Event()

    async def connect(self, deadline: float) -> None:
        while True:
            try:
                _, w = await self._dial()
                w.close()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ChannelError(f"vsock {self._cid}:{self._port}: {exc}") from exc
                await asyncio.sleep(0.05)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self._dial_port(self._port)

    async def _dial_vsock(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, (self._cid, port))
        except OSError:
            s.close()
            raise
        return await asyncio.open_connection(sock=s)

    async def _open_raw(
        self, container_id: str, exec_id: str, stream: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._dial_port(mux.RAW_VSOCK_PORT)
        req = mux.RawRequest(container_id, exec_id, stream, mux.RAW_WINDOW)
        writer.write(req.encode() + b"\n")
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            writer.close()
            raise
        return reader, writer

    async def open_stream(self, container_id: str, exec_id: str, stream: str) -> VsockStream:
        """A raw stream of the process's ``stream`` ("stdout" or "stderr")."""
        return VsockStream(*await self._open_raw(container_id, exec_id, stream))

    async def open_input(self, container_id: str, exec_id: str) -> VsockInput:
        """A raw stream to the process's stdin."""
        return VsockInput(*await self._open_raw(container_id, exec_id, "stdin"))

    async def serve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._listen.unlink()
        self._server = await asyncio.start_unix_server(self._on_client, str(self._listen))

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            vr, vw = await self._dial()
        except OSError as exc:
            log.error("vsock dial: %s", exc)
            writer.close()
            return
        await asyncio.gather(_copy(reader, vw), _copy(vr, writer))
        vw.close()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self._listen.unlink()


async def _copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(256 * 1024):
            w.write(data)
            await w.drain()
        w.write_eof()
    except (ConnectionError, OSError):
        pass
