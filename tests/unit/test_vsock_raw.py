"""Raw stdio streams over vsock (cocoon.agent.mux): the agent's ``serve_raw`` and the
monitor's ``VsockRelay.open_stream``/``open_input``, end to end without QEMU.

This host has no /dev/vhost-vsock, so the guest's listener is a unix socket and the relay is
given a ``dial`` that reaches it: the same code on both ends, the address family aside. Each
test runs the host's side in ``asyncio.run`` while the guest's threads serve.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon.agent import channel as agent_channel
from cocoon.agent import mux
from cocoon.runtime.monitor.channel import VsockRelay
from tests.unit.streams import pipe_reader, pipe_writer, pty_writer, wait_for

STEP = 10.0  # seconds any one step of a test may take


class Guest:
    """The agent's raw stream server on a unix socket; ``fds`` is its stream source."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fds: dict[tuple[str, str, str], int] = {}
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(str(path))
        self.lsock.listen(64)  # as listen_vsock does before the agent says it is ready
        self.server = threading.Thread(
            target=agent_channel.serve_raw, args=(self.lsock, self.source), daemon=True
        )
        self.server.start()

    def stop(self) -> None:
        """Shut down, the accept loop ends (before the socket is closed: a thread still in
        accept() on a closed fd could take the next test's socket of the same number)."""
        self.lsock.shutdown(socket.SHUT_RDWR)
        self.server.join(STEP)
        assert not self.server.is_alive(), "serve_raw did not end at its socket's shutdown"
        self.lsock.close()

    def source(self, cid: str, eid: str, stream: str) -> int | None:
        if cid == "nobody":
            raise LookupError(f"no container {cid}")
        return self.fds.get((cid, eid, stream))

    def relay(self, tmp: Path) -> VsockRelay:
        async def dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            assert port == mux.RAW_VSOCK_PORT  # the gRPC port is not dialled here
            return await asyncio.open_unix_connection(str(self.path))

        return VsockRelay(3, 1024, tmp / "agent.sock", dial=dial)


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    g = Guest(tmp_path / "raw.sock")
    try:
        yield g
    finally:
        g.stop()
        wait_for(lambda: not raw_threads(), STEP, "every stream's thread to end")


def raw_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == agent_channel.RAW_THREAD]


async def read_all(relay: VsockRelay, cid: str, eid: str, stream: str) -> bytes:
    raw = await relay.open_stream(cid, eid, stream)
    got = bytearray()
    while chunk := await asyncio.wait_for(raw.read(), STEP):
        got += chunk
        await raw.grant(len(chunk))
    await raw.close()
    return bytes(got)


def test_stdout_arrives_byte_exact_and_ends_at_the_pipes_eof(guest: Guest, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    writer = pipe_writer(guest.fds, ("c1", "", "stdout"), data)
    assert asyncio.run(read_all(guest.relay(tmp_path), "c1", "", "stdout")) == data
    writer.join(STEP)
    assert not writer.is_alive()


def test_a_pty_is_read_byte_exact(guest: Guest, tmp_path: Path) -> None:
    """A pty master cannot be spliced: its stream takes the read path."""
    data = os.urandom(256 * 1024)
    master, t = pty_writer(guest.fds, ("c1", "e1", "stdout"), data)
    try:
        assert asyncio.run(read_all(guest.relay(tmp_path), "c1", "e1", "stdout")) == data
    finally:
        t.join(STEP)
        os.close(master)


def test_a_reader_that_stops_stalls_its_own_stream_only(guest: Guest, tmp_path: Path) -> None:
    big = os.urandom(8 * 1024 * 1024)  # more than the pipe and both sockets' buffers hold
    small = os.urandom(512 * 1024)
    stalled = pipe_writer(guest.fds, ("c1", "", "stdout"), big)
    other = pipe_writer(guest.fds, ("c1", "", "stderr"), small)
    relay = guest.relay(tmp_path)

    async def go() -> tuple[bytes, bytes]:
        raw = await relay.open_stream("c1", "", "stdout")
        first = await asyncio.wait_for(raw.read(), STEP)
        # that stream is not read on: its writer blocks, the other stream flows to its end
        rest = await read_all(relay, "c1", "", "stderr")
        await asyncio.sleep(0.5)
        assert stalled.is_alive(), "the stalled stream's writer did not block"
        got = bytearray(first)
        while chunk := await asyncio.wait_for(raw.read(), STEP):
            got += chunk
        await raw.close()
        return bytes(got), rest

    got, rest = asyncio.run(go())
    assert rest == small and got == big
    stalled.join(STEP)
    other.join(STEP)


def test_no_such_process_or_stream_is_an_empty_stream_and_garbage_is_refused(
    guest: Guest, tmp_path: Path
) -> None:
    relay = guest.relay(tmp_path)

    async def go() -> tuple[bytes, bytes]:
        nobody = await read_all(relay, "nobody", "", "stdout")  # the lookup raised
        no_stderr = await read_all(relay, "c1", "", "stderr")  # a terminal's: None
        return nobody, no_stderr

    assert asyncio.run(go()) == (b"", b"")
    for garbage in (b"not json\n", b'{"container_id": "c1"}\n', b"x" * mux.RAW_LINE_MAX):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(STEP)
            s.connect(str(guest.path))
            s.sendall(garbage)
            assert s.recv(1) == b"", f"{garbage[:20]!r} was not refused"
    # and the server still serves
    writer = pipe_writer(guest.fds, ("c2", "", "stdout"), b"still here")
    assert asyncio.run(read_all(relay, "c2", "", "stdout")) == b"still here"
    writer.join(STEP)


def test_a_reader_that_goes_away_ends_the_guests_side(guest: Guest, tmp_path: Path) -> None:
    r, w = os.pipe()
    guest.fds[("c1", "", "stdout")] = r
    os.write(w, b"first")
    relay = guest.relay(tmp_path)

    async def go() -> bytes:
        raw = await relay.open_stream("c1", "", "stdout")
        first = await asyncio.wait_for(raw.read(), STEP)
        await raw.close()  # the shim went away while the process runs on, writing nothing
        return first

    assert asyncio.run(go()) == b"first"
    wait_for(lambda: not raw_threads(), STEP, "the guest to end the abandoned stream")
    os.close(r)
    os.close(w)


def test_stdin_arrives_in_order_and_finish_waits_until_all_is_written(
    guest: Guest, tmp_path: Path
) -> None:
    w, got, go = pipe_reader(guest.fds, ("c1", "", "stdin"))
    data = os.urandom(6 * 1024 * 1024 + 7)
    relay = guest.relay(tmp_path)

    async def send() -> bool:
        raw = await relay.open_input("c1", "")
        task = asyncio.ensure_future(raw.write(data))
        await asyncio.sleep(0.5)  # the process does not read: the pipe and the sockets fill
        assert not task.done(), "a stdin nobody reads did not stall"
        go.set()
        ok = await asyncio.wait_for(task, STEP)
        await asyncio.wait_for(raw.finish(), STEP)
        return ok

    assert asyncio.run(send())
    os.close(w)  # what CloseStdin does, once the stream has ended
    wait_for(lambda: bytes(got) == data, STEP, "stdin to arrive whole and in order")


def test_a_stdin_whose_process_is_gone_ends(guest: Guest, tmp_path: Path) -> None:
    r, w = os.pipe()
    guest.fds[("c1", "", "stdin")] = w
    os.close(r)  # the process exited: writing to its stdin is EPIPE
    relay = guest.relay(tmp_path)

    async def go() -> bool:
        raw = await relay.open_input("c1", "")
        ok = True
        for _ in range(64):  # the guest closes at its first write; ours fail soon after
            ok = await asyncio.wait_for(raw.write(bytes(256 * 1024)), STEP)
            if not ok:
                break
        await asyncio.wait_for(raw.finish(), STEP)
        return ok

    assert asyncio.run(go()) is False
    os.close(w)
