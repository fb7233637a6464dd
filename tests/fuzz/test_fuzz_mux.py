"""Fuzz the mux frames both ends read (agent/mux.py's Decoder, the guest's SerialMux, the
host's SerialMuxHost) and the gRPC replies the host monitor reads from the guest agent
(monitor/agentcalls.py, then hot-plug's use of them).

Properties: a decoder raises nothing but MuxProtocolError and never holds more than one frame
of buffer (a header claiming a huge length is refused before anything is allocated); framing
is the same however the stream is cut; after any garbage the flush + HELLO preamble resyncs
both ends; the host's port pump ends (lost is set) on any stream, within a timeout; an agent
reply of any content becomes a value the host can use or a clean HotplugError."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cocoon.agent import agent_pb2 as apb
from cocoon.agent import channel as guest_channel
from cocoon.agent import mux
from cocoon.agent.errors import MuxProtocolError
from cocoon.agent.mux import HEADER, MAX_PAYLOAD, Decoder, Frame, FrameType
from cocoon.runtime.errors import HotplugError
from cocoon.runtime.monitor import agentcalls, hotplug
from cocoon.runtime.monitor.channel import SerialMuxHost
from tests.unit.fakes import FakeQemu, limits, no_event

pytestmark = pytest.mark.fuzz

NON_PAD = [t for t in FrameType if t is not FrameType.PAD]
frames = st.builds(
    Frame,
    st.sampled_from(NON_PAD),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64) | st.sampled_from([b"", bytes(MAX_PAYLOAD)]),
)
# A header claiming a huge length, a bad type, a good header: what garbage is made of.
headers = st.builds(
    HEADER.pack, st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)
)
garbage = st.lists(st.one_of(st.binary(max_size=40), headers), max_size=6).map(b"".join)


def cut(data: bytes, at: list[int]) -> list[bytes]:
    """``data`` cut at the offsets ``at`` (taken modulo its length)."""
    idx = sorted(a % (len(data) + 1) for a in at)
    return [data[a:b] for a, b in zip([0, *idx], [*idx, len(data)], strict=True)]


cut_points = st.lists(st.integers(0, 2**20), max_size=6)
encoded = frames.map(lambda f: mux.encode(f.type, f.session, f.payload))


# ------------------------------------------------------------------------------ the codec
@given(data=garbage, resync=st.booleans())
@example(data=HEADER.pack(4, 1, 2**32 - 1), resync=False)  # a 4 GiB length: refused at once
@example(data=HEADER.pack(4, 1, MAX_PAYLOAD + 1), resync=True)
def test_decoder_any_bytes(data: bytes, resync: bool) -> None:
    d = Decoder(resync=resync)
    try:
        out = d.feed(data)
    except MuxProtocolError:
        assert not resync, "a resyncing decoder raised"
        return
    assert all(len(f.payload) <= MAX_PAYLOAD for f in out)
    assert len(d._buf) < HEADER.size + MAX_PAYLOAD


@given(fs=st.lists(frames, max_size=5), pads=st.integers(0, 3), at=cut_points)
def test_framing_does_not_depend_on_the_cuts(fs: list[Frame], pads: int, at: list[int]) -> None:
    wire = b"".join(bytes(pads) + mux.encode(f.type, f.session, f.payload) for f in fs)
    for resync in (False, True):
        d = Decoder(resync=resync)
        got = [f for chunk in cut(wire, at) for f in d.feed(chunk)]
        assert got == fs


@given(junk=garbage, nonce=st.binary(min_size=mux.NONCE_LEN, max_size=mux.NONCE_LEN))
@example(junk=HEADER.pack(4, 0, MAX_PAYLOAD)[:5], nonce=b"n" * 8)  # half a header
@example(junk=HEADER.pack(4, 0, MAX_PAYLOAD) + b"x", nonce=b"n" * 8)  # a frame cut short
def test_flush_and_hello_resync_a_resyncing_decoder(junk: bytes, nonce: bytes) -> None:
    d = Decoder(resync=True)
    got = d.feed(junk) + d.feed(mux.flush_and(FrameType.HELLO, nonce))
    assert got and got[-1] == Frame(FrameType.HELLO, 0, nonce)


# ------------------------------------------------------------------------------ the guest end
@given(
    junk=st.lists(st.one_of(garbage, encoded), max_size=4),
    nonce=st.binary(min_size=mux.NONCE_LEN, max_size=mux.NONCE_LEN),
)
@example(  # a HELLO, then a bad type that the flush completes: the HELLO after it was lost
    junk=[mux.encode(FrameType.HELLO, 0, b""), b"\x06"], nonce=bytes(mux.NONCE_LEN)
)
def test_guest_mux_answers_hello_after_any_garbage(
    tmp_path: Path, junk: list[bytes], nonce: bytes
) -> None:
    """The guest's SerialMux fed garbage (and stray OPEN/DATA/CLOSE for sessions to a socket
    that is not there) raises nothing and answers the next HELLO with its nonce."""
    host, guest = socket.socketpair()
    host.setblocking(False)
    got: list[Frame] = []
    dec = Decoder(resync=True)

    def drain() -> None:
        while True:
            try:
                chunk = host.recv(1 << 20)
            except BlockingIOError:
                return
            got.extend(dec.feed(chunk))

    try:
        m = guest_channel.SerialMux(guest.fileno(), str(tmp_path / "no-agent.sock"))
        for chunk in junk:
            m.on_data(chunk)
            drain()
        m.on_data(mux.flush_and(FrameType.HELLO, nonce))
        drain()
        assert Frame(FrameType.HELLO_ACK, 0, nonce) in got
        m._drop_all()
    finally:
        host.close()
        guest.close()


# ------------------------------------------------------------------------------ the host end
class _Writer:
    """A session's writer: what the pump calls on it."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = self.closed = False

    def write(self, b: bytes) -> None:
        self.data += b

    async def drain(self) -> None:
        pass

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True


def _host(chunks: list[bytes]) -> tuple[SerialMuxHost, asyncio.StreamReader]:
    h = SerialMuxHost(Path("/nonexistent/port"), Path("/nonexistent/listen"))
    r = asyncio.StreamReader()
    for c in chunks:
        r.feed_data(c)
    r.feed_eof()
    h._reader = r
    return h, r


@given(stream=st.lists(st.one_of(garbage, encoded), max_size=5).map(b"".join), at=cut_points)
@example(stream=HEADER.pack(4, 1, 2**32 - 1), at=[])
def test_host_pump_ends_on_any_stream(stream: bytes, at: list[int]) -> None:
    chunks = cut(stream, at)

    async def go() -> dict[int, _Writer]:
        h, _ = _host(chunks)
        h._decoder.resync = False  # as after HELLO_ACK
        ws = {sid: _Writer() for sid in (0, 1, 2)}
        h._sessions.update(ws)  # type: ignore[arg-type]
        await asyncio.wait_for(h._pump_port(), 5)
        assert h.lost.is_set() and not h._sessions
        return ws

    for w in asyncio.run(go()).values():
        assert w.closed or w.eof


@given(junk=garbage, ack=st.booleans())
def test_host_waits_for_its_ack_through_garbage(junk: bytes, ack: bool) -> None:
    nonce = b"N" * mux.NONCE_LEN
    stream = junk + (mux.flush_and(FrameType.HELLO_ACK, nonce) if ack else b"")

    async def go() -> bool:
        h, _ = _host([stream])
        try:
            return await asyncio.wait_for(h._await_ack({nonce}, 1.0), 5)
        except asyncio.IncompleteReadError:
            return False  # connect() turns this into a ChannelError

    assert asyncio.run(go()) == ack


# ------------------------------------------------------------------------------ agent replies
class _Channel:
    """A grpc.aio channel whose every unary call answers with ``raw`` (the guest's bytes)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def unary_unary(self, name: str, request_serializer: Any, response_deserializer: Any) -> Any:
        async def call(req: Any, timeout: float | None = None) -> Any:
            request_serializer(req)
            try:
                return response_deserializer(self.raw)
            except Exception as exc:  # grpc's own: a reply that does not parse
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), str(exc)
                ) from exc

        return call


replies = st.one_of(
    st.binary(max_size=40),
    st.builds(
        apb.OnlineCPUMemResponse,
        cpus_online=st.integers(0, 2**32 - 1),
        mem_total_bytes=st.integers(0, 2**64 - 1),
    ).map(lambda m: m.SerializeToString()),
    st.builds(
        apb.WaitDeviceResponse, guest_path=st.text(max_size=20), sysfs_path=st.text(max_size=20)
    ).map(lambda m: m.SerializeToString()),
)


@given(raw=replies)
def test_agent_calls_map_any_reply(raw: bytes) -> None:
    """Each call returns the type the monitor expects, or grpc's error for a reply that does
    not parse (which hot-plug and the service already map)."""
    calls = agentcalls.AgentCalls(_Channel(raw), 1.0)  # type: ignore[arg-type]

    async def go() -> None:
        for coro, tp in (
            (calls.online_cpus(2), int),
            (calls.offline_cpus(1), int),
            (calls.memory_total(), int),
            (calls.wait_device("scsi", "0:0:0", 10), str),
        ):
            try:
                v = await coro
            except grpc.aio.AioRpcError:
                continue
            assert isinstance(v, tp)
            if isinstance(v, int):
                assert 0 <= v < 2**64

    asyncio.run(go())


@given(
    online=st.integers(0, 2**32 - 1),
    total=st.integers(0, 2**64 - 1),
    vcpus=st.integers(1, 4),
    memory_mib=st.integers(256, 2048),
)
@example(online=2**32 - 1, total=0, vcpus=2, memory_mib=256)  # was taken as it was
@example(online=0, total=0, vcpus=2, memory_mib=256)
def test_hotplug_with_any_agent_cpu_count(
    online: int, total: int, vcpus: int, memory_mib: int
) -> None:
    """Resize over an agent that answers anything: done, or a HotplugError; the vCPUs the
    monitor then reports stay within what the VM can hold."""
    raw = apb.OnlineCPUMemResponse(cpus_online=online, mem_total_bytes=total).SerializeToString()
    calls = agentcalls.AgentCalls(_Channel(raw), 1.0)  # type: ignore[arg-type]
    qemu = FakeQemu()
    lim = limits()
    h = hotplug.Hotplug(lim, qemu, no_event, calls, device_timeout_s=0.3, pass_fd=qemu.pass_fd)

    async def go() -> None:
        try:
            await asyncio.wait_for(h.resize(vcpus, memory_mib), 10)
        except HotplugError as exc:
            assert str(exc)
        assert 0 <= h.cpus_online <= lim.max_vcpus, h.cpus_online

    asyncio.run(go())


def test_no_test_here_opens_a_real_port() -> None:
    assert not os.path.exists("/nonexistent/port")
