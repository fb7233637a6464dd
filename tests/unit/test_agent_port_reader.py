"""The agent's port reader takes what the port holds in one batch. The guest's virtio-serial
driver returns one receive buffer (a page) per read; a SOCK_SEQPACKET pair stands for it here
(one message per read). Decoding per page bounded stdin at ~5.6 MB/s under TCG."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from cocoon.agent import channel, mux


@pytest.fixture
def port() -> Iterator[tuple[socket.socket, channel.SerialMux]]:
    host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield host, channel.SerialMux(guest.fileno(), "/nonexistent")
    host.close()
    guest.close()


def pages(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def poller(fd: int) -> select.poll:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return p


def test_every_page_the_port_holds_is_read_in_one_batch(
    port: tuple[socket.socket, channel.SerialMux],
) -> None:
    host, smux = port
    frames = b"".join(
        mux.encode(mux.FrameType.DATA, 7, bytes([i]) * mux.MAX_PAYLOAD) for i in range(3)
    )
    for page in pages(frames):
        host.send(page)
    got = smux._read_batch(poller(smux._fd))
    assert got == frames  # 25 pages, one batch
    decoded = mux.Decoder().feed(got)
    assert [(f.session, f.payload[:1], len(f.payload)) for f in decoded] == [
        (7, bytes([i]), mux.MAX_PAYLOAD) for i in range(3)
    ]


def test_a_batch_stops_at_its_limit_and_the_rest_comes_next(
    port: tuple[socket.socket, channel.SerialMux], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, smux = port
    monkeypatch.setattr(channel, "READ_BATCH", 3 * 4096)
    data = os.urandom(5 * 4096)
    for page in pages(data):
        host.send(page)
    p = poller(smux._fd)
    first, second = smux._read_batch(p), smux._read_batch(p)
    assert (len(first), first + second) == (3 * 4096, data)


def test_a_port_with_nothing_more_returns_what_it_had_without_blocking(
    port: tuple[socket.socket, channel.SerialMux],
) -> None:
    host, smux = port
    host.send(b"x" * 100)
    assert smux._read_batch(poller(smux._fd)) == b"x" * 100


def test_a_closed_host_end_reads_as_empty(
    port: tuple[socket.socket, channel.SerialMux],
) -> None:
    host, smux = port
    host.close()
    assert smux._read_batch(poller(smux._fd)) == b""
