"""Frame codec for the multiplexer spoken over the virtio-serial agent port.

A virtio-serial port is one byte stream that survives host reconnects without the guest being
told where a connection starts, so a plain relay wedges when a new client's bytes land in the
old session. Both ends therefore speak frames:

    type:u8 [session:u32 length:u32 payload]       (PAD is the single byte 0)

On every new host connection the host writes ``FLUSH_LEN`` zero bytes (they complete any
half-parsed frame on the guest side, then parse as 1-byte PAD frames) followed by HELLO with a
nonce. The guest drops every session, answers the same way with HELLO_ACK carrying the nonce,
and the host ignores everything until that ACK. After that each local connection is one
session: OPEN, DATA..., CLOSE from either side.

An OPEN with an empty payload is a gRPC session (bytes to and from the agent's server). An
OPEN whose payload is a JSON object is a raw stream of one process's stdio (``RawRequest``):
- stdout, stderr: the guest sends that pipe's bytes as DATA, at most as many as the host has
  granted (the ``window`` in the request, then each WINDOW frame's u32 payload adds to it),
  then CLOSE at the pipe's EOF. The host grants a chunk back once it has passed it on;
- stdin: the host sends DATA, at most ``window`` bytes beyond what the guest has granted back
  with WINDOW frames, which it does once a chunk is written to the process's pipe; the host's
  CLOSE ends the stream (its bytes all written first), the guest's says the pipe is gone.
So a reader or writer that stops stalls its own stream only, and the port (and every other
session) keeps moving.

Over vsock there is no mux: a raw stream is a connection of its own to ``RAW_VSOCK_PORT``,
whose first line is the same ``RawRequest`` (JSON, ``RAW_LINE_MAX`` bytes at most with its
newline) and whose bytes after it are the stream's, plain. vsock's own credit is the window:
a reader that stops fills its connection's buffers and stalls that stream only. At a stdout's
or stderr's EOF the guest closes the connection; a stdin's host shuts its side down after its
last byte, and the guest closes the connection once it has written them all (or at once when
the pipe is gone).

A malformed frame is a ``MuxProtocolError`` (cocoon.agent.errors, with the agent's other
errors; the host monitor catches it from there).

May import: the standard library, cocoon.agent.errors (both light: the host monitor imports
this module too).
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from cocoon.agent.errors import MuxProtocolError

HEADER = struct.Struct("!BII")
WINDOW = struct.Struct("!I")
MAX_PAYLOAD = 32 * 1024
# A raw stream's DATA frame is 32 KiB with its header: under TCG that moved 17% more than
# 32 KiB of payload plus the header (Linux's virtio-console caps one port write at 32 KiB).
RAW_CHUNK = 32 * 1024 - HEADER.size
RAW_WINDOW = 1024 * 1024  # what a raw stream may have in flight before the host grants more
# A raw stream's DATA frame spliced from a pipe (cocoon.agent.channel) may carry up to this much:
# the guest -> host direction only, so only the host's decoder takes frames this long.
RAW_SPLICE_MAX = 512 * 1024
RAW_STREAMS = ("stdout", "stderr", "stdin")
RAW_VSOCK_PORT = 1025  # raw streams over vsock: one connection each (the agent's gRPC: 1024)
RAW_LINE_MAX = 4096  # a vsock raw stream's request line, its newline included
FLUSH_LEN = MAX_PAYLOAD + HEADER.size
NONCE_LEN = 8


class FrameType(enum.IntEnum):
    PAD = 0
    HELLO = 1
    HELLO_ACK = 2
    OPEN = 3
    DATA = 4
    CLOSE = 5
    WINDOW = 6


@dataclass(frozen=True)
class Frame:
    type: FrameType
    session: int = 0
    payload: bytes = b""


def encode(ftype: FrameType, session: int = 0, payload: bytes = b"") -> bytes:
    if ftype is FrameType.PAD:
        return b"\x00"
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(ftype, session, len(payload)) + payload


def encode_data(session: int, data: bytes) -> Iterator[bytes]:
    """DATA frames for ``data``, split at MAX_PAYLOAD."""
    view = memoryview(data)
    for off in range(0, len(view), MAX_PAYLOAD):
        yield encode(FrameType.DATA, session, bytes(view[off : off + MAX_PAYLOAD]))


@dataclass(frozen=True)
class RawRequest:
    """What a raw stream's OPEN asks for: one stream of one process, and its first window."""

    container_id: str
    exec_id: str
    stream: str
    window: int

    def encode(self) -> bytes:
        return json.dumps(
            {
                "container_id": self.container_id,
                "exec_id": self.exec_id,
                "stream": self.stream,
                "window": self.window,
            }
        ).encode()

    @classmethod
    def decode(cls, payload: bytes) -> RawRequest:
        """The request in an OPEN's payload; MuxProtocolError for anything else."""
        try:
            r = json.loads(payload)
            req = cls(r["container_id"], r["exec_id"], r["stream"], r["window"])
        except (ValueError, TypeError, KeyError) as exc:
            raise MuxProtocolError(f"bad raw stream request: {exc}") from None
        if (
            set(r) != {"container_id", "exec_id", "stream", "window"}
            or not isinstance(req.container_id, str)
            or not isinstance(req.exec_id, str)
            or req.stream not in RAW_STREAMS
            or type(req.window) is not int
            or not 0 < req.window <= 16 * RAW_WINDOW
        ):
            raise MuxProtocolError(f"bad raw stream request: {payload[:200]!r}")
        return req


def encode_window(session: int, grant: int) -> bytes:
    return encode(FrameType.WINDOW, session, WINDOW.pack(grant))


def decode_window(payload: bytes) -> int:
    if len(payload) != WINDOW.size:
        raise MuxProtocolError(f"WINDOW payload of {len(payload)} bytes")
    (grant,) = WINDOW.unpack(payload)
    return int(grant)


def flush_and(ftype: FrameType, nonce: bytes) -> bytes:
    """The resync preamble followed by HELLO or HELLO_ACK."""
    return bytes(FLUSH_LEN) + encode(ftype, 0, nonce)


class Decoder:
    """Incremental decoder: feed bytes, get complete frames.

    Unknown frame types and lengths above ``max_payload`` raise MuxProtocolError unless
    ``resync`` is set, in which case one byte is dropped and parsing goes on: the host uses that
    while it waits for HELLO_ACK on a stream that may start mid-frame. The host's decoder takes
    ``RAW_SPLICE_MAX`` (the guest's spliced DATA frames), the guest's ``MAX_PAYLOAD``.
    """

    def __init__(self, resync: bool = False, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self.resync = resync
        self.max_payload = max_payload

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        while pos < len(buf):
            t = buf[pos]
            if t == FrameType.PAD:
                pos += 1
                continue
            if len(buf) - pos < HEADER.size:
                break
            _, session, length = HEADER.unpack_from(buf, pos)
            if t > FrameType.WINDOW or length > self.max_payload:
                if self.resync:
                    pos += 1
                    continue
                raise MuxProtocolError(f"bad frame header type={t} length={length}")
            end = pos + HEADER.size + length
            if end > len(buf):
                break
            frames.append(Frame(FrameType(t), session, bytes(buf[pos + HEADER.size : end])))
            pos = end
        del buf[:pos]
        return frames
