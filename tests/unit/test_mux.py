"""Tests for cocoon.agent.mux: the frame codec of the virtio-serial multiplexer."""

from __future__ import annotations

import random

import pytest

from cocoon.agent import mux
from cocoon.agent.errors import MuxProtocolError
from cocoon.agent.mux import (
    FLUSH_LEN,
    HEADER,
    MAX_PAYLOAD,
    NONCE_LEN,
    Decoder,
    Frame,
    FrameType,
    encode,
    encode_data,
    flush_and,
)

NON_PAD = [t for t in FrameType if t is not FrameType.PAD]


def decode_all(data: bytes, resync: bool = False) -> list[Frame]:
    d = Decoder(resync=resync)
    frames = d.feed(data)
    assert d.feed(b"") == []
    return frames


def sample_frames() -> list[Frame]:
    """A bit of everything: each non-PAD type, session 0 and the top id, empty payloads."""
    frames: list[Frame] = []
    for i, t in enumerate(NON_PAD):
        frames.append(Frame(t, 0, b""))
        frames.append(Frame(t, 2**32 - 1, bytes([i]) * (i + 1)))
        frames.append(Frame(t, 7 + i, b"\x00\x05\xff" * 5))
    return frames


# ---------------------------------------------------------------------------------------------
# Encoding and decoding


def test_header_layout() -> None:
    assert HEADER.size == 9
    assert encode(FrameType.DATA, 0x01020304, b"xy") == b"\x04\x01\x02\x03\x04\x00\x00\x00\x02xy"
    assert encode(FrameType.HELLO) == b"\x01" + bytes(8)
    assert len(flush_and(FrameType.HELLO, b"")) == MAX_PAYLOAD + 2 * HEADER.size


@pytest.mark.parametrize("ftype", NON_PAD, ids=lambda t: t.name)
@pytest.mark.parametrize("payload_len", [0, 1, 100, MAX_PAYLOAD])
@pytest.mark.parametrize("session", [0, 1, 2**31, 2**32 - 1])
def test_round_trip(ftype: FrameType, payload_len: int, session: int) -> None:
    payload = random.Random(payload_len).randbytes(payload_len)
    wire = encode(ftype, session, payload)
    assert len(wire) == HEADER.size + payload_len
    assert decode_all(wire) == [Frame(ftype, session, payload)]
    assert decode_all(wire, resync=True) == [Frame(ftype, session, payload)]


def test_decoded_frame_type_is_the_enum() -> None:
    (frame,) = decode_all(encode(FrameType.CLOSE, 3))
    assert frame.type is FrameType.CLOSE


def test_pad_is_one_zero_byte() -> None:
    assert encode(FrameType.PAD) == b"\x00"
    # Session and payload are meaningless for PAD and are not written.
    assert encode(FrameType.PAD, 12345, b"ignored") == b"\x00"


def test_pad_decodes_to_nothing_and_keeps_alignment() -> None:
    d = Decoder()
    assert d.feed(b"\x00" * 50) == []
    assert d.feed(encode(FrameType.OPEN, 9)) == [Frame(FrameType.OPEN, 9)]
    stream = b"\x00" + encode(FrameType.DATA, 1, b"a") + b"\x00\x00" + encode(FrameType.CLOSE, 1)
    assert d.feed(stream) == [Frame(FrameType.DATA, 1, b"a"), Frame(FrameType.CLOSE, 1)]


def test_round_trip_many_frames_in_one_feed() -> None:
    frames = sample_frames()
    wire = b"".join(encode(f.type, f.session, f.payload) for f in frames)
    assert decode_all(wire) == frames


def test_split_at_every_byte_boundary() -> None:
    frames = sample_frames()
    wire = b"".join(encode(f.type, f.session, f.payload) + b"\x00" for f in frames)
    for cut in range(len(wire) + 1):
        d = Decoder()
        got = d.feed(wire[:cut]) + d.feed(wire[cut:])
        assert got == frames, f"split at byte {cut}"


def test_split_at_every_pair_of_boundaries() -> None:
    frames = [
        Frame(FrameType.OPEN, 1),
        Frame(FrameType.DATA, 1, b"hello"),
        Frame(FrameType.CLOSE, 1),
    ]
    wire = b"\x00".join(encode(f.type, f.session, f.payload) for f in frames)
    for a in range(len(wire) + 1):
        for b in range(a, len(wire) + 1):
            d = Decoder()
            got = d.feed(wire[:a]) + d.feed(wire[a:b]) + d.feed(wire[b:])
            assert got == frames, (a, b)


def test_byte_by_byte_including_max_payload() -> None:
    payload = random.Random(1).randbytes(MAX_PAYLOAD)
    frames = [Frame(FrameType.DATA, 5, payload), Frame(FrameType.CLOSE, 5)]
    wire = b"".join(encode(f.type, f.session, f.payload) for f in frames)
    d = Decoder()
    got: list[Frame] = []
    for i in range(len(wire)):
        got += d.feed(wire[i : i + 1])
    assert got == frames


def test_oversize_payload_raises_on_encode() -> None:
    encode(FrameType.DATA, 1, bytes(MAX_PAYLOAD))  # the limit itself is fine
    with pytest.raises(ValueError, match=str(MAX_PAYLOAD)):
        encode(FrameType.DATA, 1, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        encode(FrameType.HELLO, 0, bytes(MAX_PAYLOAD + 1))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad_type", [7, 8, 0x7F, 0xFF])
def test_strict_decoder_rejects_bad_type(bad_type: int) -> None:
    with pytest.raises(MuxProtocolError, match=f"type={bad_type}"):
        Decoder().feed(HEADER.pack(bad_type, 1, 0))


def test_strict_decoder_rejects_oversize_length() -> None:
    with pytest.raises(MuxProtocolError, match=f"length={MAX_PAYLOAD + 1}"):
        Decoder().feed(HEADER.pack(FrameType.DATA, 1, MAX_PAYLOAD + 1))
    # The biggest legal length just waits for its payload.
    assert Decoder().feed(HEADER.pack(FrameType.DATA, 1, MAX_PAYLOAD)) == []


def test_a_decoder_in_step_takes_spliced_frames_up_to_its_limit() -> None:
    """The host's decoder, once past HELLO_ACK, takes the guest's spliced DATA frames (up to
    RAW_SPLICE_MAX) whole, and still refuses a byte more."""
    d = Decoder(max_payload=mux.RAW_SPLICE_MAX)
    big = bytes(range(256)) * (mux.RAW_SPLICE_MAX // 256)
    assert d.feed(encode_spliced(7, big)) == [Frame(FrameType.DATA, 7, big)]
    with pytest.raises(MuxProtocolError, match=f"length={mux.RAW_SPLICE_MAX + 1}"):
        d.feed(HEADER.pack(FrameType.DATA, 7, mux.RAW_SPLICE_MAX + 1))
    # While resyncing the limit is the flush's: such a header is garbage, skipped byte by byte.
    resyncing = Decoder(resync=True)
    frames = resyncing.feed(
        encode_spliced(7, big[: MAX_PAYLOAD + 1]) + flush_and(FrameType.HELLO_ACK, b"n" * NONCE_LEN)
    )
    assert frames[-1] == Frame(FrameType.HELLO_ACK, 0, b"n" * NONCE_LEN)
    assert Frame(FrameType.DATA, 7, big[: MAX_PAYLOAD + 1]) not in frames


def encode_spliced(session: int, payload: bytes) -> bytes:
    """A DATA frame as the guest's splice path writes it (encode() caps at MAX_PAYLOAD)."""
    return HEADER.pack(FrameType.DATA, session, len(payload)) + payload


def test_strict_decoder_rejects_bad_type_after_good_frames() -> None:
    d = Decoder()
    assert d.feed(encode(FrameType.OPEN, 1)) == [Frame(FrameType.OPEN, 1)]
    with pytest.raises(MuxProtocolError):
        d.feed(b"\x00" + HEADER.pack(9, 0, 0))


def test_resync_decoder_skips_bad_header() -> None:
    d = Decoder(resync=True)
    got = d.feed(HEADER.pack(0xEE, 0xEEEEEEEE, 0xEEEEEEEE) + encode(FrameType.OPEN, 4))
    assert got == [Frame(FrameType.OPEN, 4)]


# ---------------------------------------------------------------------------------------------
# Resynchronisation: whatever came before, flush + HELLO_ACK always gets through


def _fake_header(rng: random.Random) -> bytes:
    """A header that a resyncing decoder accepts and that swallows up to MAX_PAYLOAD bytes."""
    length = rng.choice([MAX_PAYLOAD, MAX_PAYLOAD - 1, rng.randrange(MAX_PAYLOAD + 1)])
    return HEADER.pack(rng.choice(NON_PAD), rng.getrandbits(32), length)


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    noise = rng.randbytes(rng.randrange(0, 200))
    if kind == 0:
        return noise
    if kind == 1:  # a complete fake header at the very end: swallows the most
        return noise + _fake_header(rng)
    if kind == 2:  # a fake header cut anywhere
        return noise + _fake_header(rng)[: rng.randrange(1, HEADER.size)]
    if kind == 3:  # a fake header with part of its payload
        return noise + _fake_header(rng) + rng.randbytes(rng.randrange(0, 3000))
    if kind == 4:  # a stale HELLO_ACK (wrong nonce) followed by a half frame
        stale = encode(FrameType.HELLO_ACK, 0, rng.randbytes(NONCE_LEN))
        return noise + stale + encode(FrameType.DATA, 3, b"x" * 500)[:100]
    # the tail of a real frame stream, starting mid-frame
    wire = b"".join(encode(FrameType.DATA, 1, rng.randbytes(rng.randrange(1, 4000))) for _ in "ab")
    return wire[rng.randrange(len(wire)) :]


def _feed_in_chunks(d: Decoder, data: bytes, rng: random.Random) -> list[Frame]:
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 9, 100, 4096, 65536, len(data)])
        frames += d.feed(data[pos : pos + n])
        pos += n
    return frames


def _assert_resyncs(garbage: bytes, nonce: bytes, rng: random.Random | None = None) -> None:
    d = Decoder(resync=True)
    wire = garbage + flush_and(FrameType.HELLO_ACK, nonce)
    frames = _feed_in_chunks(d, wire, rng) if rng else d.feed(wire)
    ack = Frame(FrameType.HELLO_ACK, 0, nonce)
    assert frames, f"nothing decoded after garbage {garbage[-16:].hex()}"
    assert frames[-1] == ack, f"garbage tail {garbage[-16:].hex()} -> {frames[-3:]}"
    # Aligned afterwards: the next frame parses, with no leftover bytes.
    d.resync = False
    assert d.feed(encode(FrameType.OPEN, 77)) == [Frame(FrameType.OPEN, 77)]


def test_resync_property_random_garbage() -> None:
    rng = random.Random(0xC0C00)
    for _ in range(400):
        nonce = rng.randbytes(NONCE_LEN)
        _assert_resyncs(_garbage(rng), nonce, rng)


@pytest.mark.parametrize("ftype", NON_PAD, ids=lambda t: t.name)
@pytest.mark.parametrize("cut", range(1, HEADER.size + 1))
def test_resync_worst_case_headers(ftype: FrameType, cut: int) -> None:
    """A fake header, cut after ``cut`` bytes, whose length the flush zeros complete to the
    largest value still accepted: the flush must still be long enough."""
    # Length bytes that, padded with zeros, read as MAX_PAYLOAD (0x00008000) when possible.
    header = HEADER.pack(ftype, 0xFFFFFFFF, MAX_PAYLOAD)[:cut]
    _assert_resyncs(b"\xaa" * 3 + header, b"n" * NONCE_LEN)


def test_resync_swallowing_header_with_partial_payload() -> None:
    for already in (0, 1, MAX_PAYLOAD // 2, MAX_PAYLOAD - 1):
        garbage = HEADER.pack(FrameType.DATA, 1, MAX_PAYLOAD) + b"\xff" * already
        _assert_resyncs(garbage, b"\x01" * NONCE_LEN)


def test_flush_and_layout() -> None:
    nonce = b"12345678"
    wire = flush_and(FrameType.HELLO, nonce)
    assert wire[:FLUSH_LEN] == bytes(FLUSH_LEN)
    assert wire[FLUSH_LEN:] == encode(FrameType.HELLO, 0, nonce)
    assert decode_all(wire) == [Frame(FrameType.HELLO, 0, nonce)]


# ---------------------------------------------------------------------------------------------
# encode_data


@pytest.mark.parametrize(
    ("size", "chunks"),
    [
        (1, [1]),
        (MAX_PAYLOAD - 1, [MAX_PAYLOAD - 1]),
        (MAX_PAYLOAD, [MAX_PAYLOAD]),
        (MAX_PAYLOAD + 1, [MAX_PAYLOAD, 1]),
        (2 * MAX_PAYLOAD + 5, [MAX_PAYLOAD, MAX_PAYLOAD, 5]),
    ],
)
def test_encode_data_splits_at_max_payload(size: int, chunks: list[int]) -> None:
    data = random.Random(size).randbytes(size)
    wires = list(encode_data(42, data))
    frames = decode_all(b"".join(wires))
    assert [len(f.payload) for f in frames] == chunks
    assert all(f.type is FrameType.DATA and f.session == 42 for f in frames)
    assert b"".join(f.payload for f in frames) == data
    assert all(len(w) <= HEADER.size + MAX_PAYLOAD for w in wires)


def test_encode_data_empty_gives_no_frames() -> None:
    assert list(encode_data(1, b"")) == []


def test_module_constants() -> None:
    assert mux.MAX_PAYLOAD == 32 * 1024
    assert [int(t) for t in FrameType] == [0, 1, 2, 3, 4, 5, 6]


def test_window_frames_round_trip() -> None:
    (frame,) = decode_all(mux.encode_window(7, 65536))
    assert frame.type is FrameType.WINDOW and frame.session == 7
    assert mux.decode_window(frame.payload) == 65536
    for bad in (b"", b"\x00\x01", bytes(5)):
        with pytest.raises(MuxProtocolError):
            mux.decode_window(bad)


def test_raw_requests_round_trip_and_refuse_anything_else() -> None:
    req = mux.RawRequest("c1", "e1", "stderr", mux.RAW_WINDOW)
    assert mux.RawRequest.decode(req.encode()) == req
    for bad in (
        b"not json",
        b"[1]",
        b'{"container_id": "c1", "exec_id": "", "stream": "stdmiddle", "window": 1}',
        b'{"container_id": "c1", "exec_id": "", "stream": "stdout", "window": 0}',
        b'{"container_id": "c1", "exec_id": "", "stream": "stdout", "window": true}',
        b'{"container_id": "c1", "exec_id": "", "stream": "stdout", "window": 99999999999}',
        b'{"container_id": 1, "exec_id": "", "stream": "stdout", "window": 1}',
        b'{"container_id": "c1", "exec_id": "", "stream": "stdout", "window": 1, "x": 1}',
        b'{"container_id": "c1", "stream": "stdout", "window": 1}',
    ):
        with pytest.raises(MuxProtocolError):
            mux.RawRequest.decode(bad)
