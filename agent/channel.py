"""Guest end of the host<->guest channel: carries host connections to the local gRPC server.

Two transports, the same gRPC server behind both (it listens on a unix socket):
- virtio-serial: one port (named ``agent.channel.0``) multiplexed with ``cocoon.agent.mux``
  frames; each host session becomes one connection to the local socket.
- vsock: a plain AF_VSOCK listener; each accepted connection is relayed to the local socket
  (grpcio as shipped cannot listen on vsock itself). Raw streams have a port of their own
  (``listen_vsock``, ``serve_raw``): each connection one stream, plain bytes after its
  request line.

A mux session may also be a raw stream (cocoon.agent.mux): ``streams`` gives the fd of the
process's stdout, stderr or stdin, and a thread of its own sends that pipe's bytes as DATA
frames within the window the host grants (spliced, no byte through Python; a pty is read), or
writes the host's DATA to it and grants each chunk back. Stdio then skips protobuf and HTTP/2
in the guest.

Threads, not asyncio: the port is a character device that reports host disconnects only as
POLLHUP, which a poll loop handles plainly.

May import: the standard library, cocoon.agent.{errors, mux}.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import queue
import select
import socket
import stat
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cocoon.agent import mux
from cocoon.agent.errors import MuxProtocolError

log = logging.getLogger("cocoon.agent.channel")

PORT_NAME = "agent.channel.0"
VSOCK_PORT = 1024
READ_BATCH = 256 * 1024  # the most the port reader decodes at once
RAW_THREAD = "vsock-raw-stream"  # the name of each vsock raw stream's thread


def find_serial_port(
    name: str = PORT_NAME, sysfs: Path = Path("/sys/class/virtio-ports")
) -> Path | None:
    """The /dev node of the virtio-serial port called ``name`` (no udev in the guest)."""
    if not sysfs.is_dir():
        return None
    for entry in sorted(sysfs.iterdir()):
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    return None


def has_vsock_device(drivers: Path = Path("/sys/bus/virtio/drivers")) -> bool:
    """True when a virtio vsock device is bound (the module alone creates /dev/vsock)."""
    d = drivers / "vmw_vsock_virtio_transport"
    return d.is_dir() and any(p.name.startswith("virtio") for p in d.iterdir())


F_SETPIPE_SZ = fcntl.F_SETPIPE_SZ  # a module name, so that a test can make the kernel refuse
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _buffered(fd: int) -> int:
    """The bytes waiting in pipe ``fd`` (0 if it cannot say: the caller then waits on it)."""
    n = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, n)
    except OSError:
        return 0
    return n[0]


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _write_all(fd: int, data: bytes | memoryview, poll: float = 1.0) -> None:
    """All of ``data`` to the non-blocking ``fd``, waiting (``poll`` s at a time) while it is
    full; OSError (EPIPE, EBADF) as ``os.write`` raises it."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], poll)


# The fd of a raw stream: (container id, exec id, "stdout" | "stderr" | "stdin") -> the fd, None
# for a stream the process does not have, or an exception naming why not (no such process).
StreamSource = Callable[[str, str, str], "int | None"]


class _Raw:
    """A raw stream's sending side: the pipe it reads and the bytes the host still takes."""

    def __init__(self, fd: int, window: int) -> None:
        self.fd = fd
        self.credit = window
        self.ended = False
        self.cond = threading.Condition()

    def grant(self, n: int) -> None:
        with self.cond:
            self.credit += n
            self.cond.notify()

    def take(self, n: int) -> None:
        with self.cond:
            self.credit -= n

    def end(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify()

    def wait_credit(self) -> int:
        """The bytes it may send now (0: the stream ended)."""
        with self.cond:
            while self.credit <= 0 and not self.ended:
                self.cond.wait()
            return 0 if self.ended else self.credit


class _RawIn:
    """A raw stdin stream's receiving side: the host's chunks, written to the pipe in order by
    a thread of its own (a full pipe must not stall the port), each granted back once written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def end(self) -> None:
        self.chunks.put(None)


class SerialMux:
    """Demultiplexes the framed serial port into connections to ``target`` (a unix socket)."""

    def __init__(self, port: Path | int, target: str, streams: StreamSource | None = None) -> None:
        """``port`` is the port's device path, or an open fd (tests use a socket);
        ``streams`` serves raw streams (without it, their OPEN is answered with CLOSE)."""
        if isinstance(port, int):
            self._fd = port
        else:
            self._fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        self._target = target
        self._streams = streams
        self._wlock = threading.Lock()
        self._sessions: dict[int, socket.socket] = {}
        self._raw: dict[int, _Raw | _RawIn] = {}
        self._slock = threading.Lock()
        self._decoder = mux.Decoder(resync=True)
        self._garbage = False  # a malformed frame was seen: only a HELLO is heard until one

    def _write(self, data: bytes) -> None:
        with self._wlock:
            self._write_locked(data)

    def _write_locked(self, data: bytes | memoryview) -> None:
        _write_all(self._fd, data, poll=0.05)

    def _drop_all(self) -> None:
        with self._slock:
            sessions, self._sessions = self._sessions, {}
            raws, self._raw = self._raw, {}
        for sock in sessions.values():
            _close(sock)
        for raw in raws.values():
            raw.end()

    def _raw_reader(self, sid: int, raw: _Raw) -> None:
        """Sends the pipe's bytes within the host's window, then CLOSE at its EOF. Like
        ``_session_reader``, the check that the stream is current and the write are one step
        under _wlock, so nothing of it follows a HELLO_ACK."""
        # Each DATA frame is read in place behind its header: one copy fewer per chunk.
        frame = memoryview(bytearray(mux.HEADER.size + mux.RAW_CHUNK))
        body = frame[mux.HEADER.size :]
        while n := raw.wait_credit():
            try:  # the pipe is non-blocking: a stream that flows costs one read per chunk
                got: int | None = os.readv(raw.fd, [body[: min(n, mux.RAW_CHUNK)]])
            except BlockingIOError:
                select.select([raw.fd], [], [], 1.0)
                got = None
            except (OSError, ValueError):  # EIO: a pty's last slave closed; EBADF: removed
                got = 0
            with self._wlock:
                if self._raw.get(sid) is not raw:
                    return
                if got is None:
                    continue
                if not got:
                    self._end_raw_locked(sid, raw)
                    return
                raw.take(got)
                mux.HEADER.pack_into(frame, 0, mux.FrameType.DATA, sid, got)
                try:
                    self._write_locked(frame[: mux.HEADER.size + got])
                except OSError as exc:
                    log.warning("raw stream %d: %s", sid, exc)
                    return

    def _raw_splicer(self, sid: int, raw: _Raw) -> None:
        """``_raw_reader`` for a pipe: no byte passes through Python. Each DATA frame's header
        is written to a staging pipe of our own, the pipe's bytes are spliced in behind it
        (pipe to pipe: the pages move, nothing is copied) and the frame is spliced on to the
        port, so one port write (one virtqueue kick) carries a frame of up to RAW_SPLICE_MAX,
        against a 32 KiB copy per write() (Linux's virtio-console caps one write at that).
        The whole frame goes out under _wlock, so frames never interleave on the port."""
        try:
            stage_r, stage_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:  # EMFILE, ENFILE: the read path needs no pipe of its own
            log.warning("raw stream %d: no staging pipe (%s); read instead", sid, exc)
            self._raw_reader(sid, raw)
            return
        try:
            # Room for a whole frame: the header's page and the payload's pages. Without it a
            # frame leaves in pieces as the staging pipe fills, which is slower, not wrong.
            with contextlib.suppress(OSError):
                fcntl.fcntl(stage_w, F_SETPIPE_SZ, mux.RAW_SPLICE_MAX + 2 * _PAGE)
            while n := raw.wait_credit():
                size = min(_buffered(raw.fd), n, mux.RAW_SPLICE_MAX)
                if not size:  # nothing buffered: wait; readable and still empty is the EOF
                    try:
                        ready = bool(select.select([raw.fd], [], [], 1.0)[0])
                        ended = ready and not _buffered(raw.fd)
                    except (OSError, ValueError):  # EBADF: the process was removed
                        ended = True
                    with self._wlock:
                        if self._raw.get(sid) is not raw:
                            return
                        if ended:
                            self._end_raw_locked(sid, raw)
                            return
                    continue
                with self._wlock:
                    if self._raw.get(sid) is not raw:
                        return
                    raw.take(size)
                    os.write(stage_w, mux.HEADER.pack(mux.FrameType.DATA, sid, size))
                    try:
                        if not self._splice_frame(raw.fd, stage_r, stage_w, size):
                            self._end_raw_locked(sid, raw)  # the pipe is gone: CLOSE
                            return
                    except OSError as exc:
                        log.warning("raw stream %d: %s", sid, exc)
                        return
        finally:
            os.close(stage_r)
            os.close(stage_w)

    def _splice_frame(self, src: int, stage_r: int, stage_w: int, size: int) -> bool:
        """Moves ``size`` bytes (all buffered in ``src``) behind the header already in the
        staging pipe, and the whole frame to the port (under _wlock); OSError if the port
        fails. False if ``src`` failed inside the frame (its process was removed and the fd
        closed under us): the frame is then finished with zero bytes, so that the port stays
        in step for every other session."""
        left_in, left_out = size, mux.HEADER.size + size
        lost: OSError | None = None
        while left_out:
            if left_in and lost is None:
                try:
                    moved = os.splice(src, stage_w, left_in, flags=os.SPLICE_F_NONBLOCK)
                    left_in -= moved
                    if not moved:
                        lost = OSError(errno.EPIPE, "the pipe ended inside a frame")
                except BlockingIOError:  # the staging pipe is full: send some of it first
                    pass
                except OSError as exc:
                    lost = exc
            # Until the source is lost, ask for the whole rest: the port takes what is staged.
            want = left_out - left_in if lost is not None else left_out
            if not want:  # the source is lost and what was staged is out: pad the rest
                log.warning("raw stream source lost inside a frame: %s", lost)
                self._write_locked(bytes(left_in))
                return False
            try:
                left_out -= os.splice(stage_r, self._fd, want)
            except BlockingIOError:  # a non-blocking port (the tests' socket) that is full
                select.select([], [self._fd], [], 0.05)
        return True

    def _end_raw_locked(self, sid: int, raw: _Raw | _RawIn) -> None:
        """Forgets a raw stream that ended on our side and tells the host (under _wlock)."""
        with self._slock:
            current = self._raw.get(sid) is raw
            if current:
                del self._raw[sid]
        if current:
            with contextlib.suppress(OSError):
                self._write_locked(mux.encode(mux.FrameType.CLOSE, sid))

    def _raw_writer(self, sid: int, raw: _RawIn) -> None:
        """Writes the host's chunks to the pipe and grants them back once written, in batches
        (half a window, or all it had). A pipe whose reader is gone (EPIPE) ends the stream:
        CLOSE, and what else comes is dropped."""
        owed = 0  # written, not yet granted back: granted in batches (each grant wakes the host)
        while (data := raw.chunks.get()) is not None:
            try:
                _write_all(raw.fd, data)
            except OSError as exc:  # EPIPE: the process is gone; EBADF: stdin closed
                log.debug("raw stdin %d: %s", sid, exc)
                with self._wlock:
                    self._end_raw_locked(sid, raw)
                return
            owed += len(data)
            if owed < mux.RAW_WINDOW // 2 and not raw.chunks.empty():
                continue
            with self._wlock:
                if self._raw.get(sid) is not raw:
                    return
                try:
                    self._write_locked(mux.encode_window(sid, owed))
                    owed = 0
                except OSError as exc:
                    log.warning("raw stdin %d: %s", sid, exc)
                    return

    def _open_raw(self, sid: int, payload: bytes) -> None:
        try:
            req = mux.RawRequest.decode(payload)
            if self._streams is None:
                raise MuxProtocolError("no raw streams here")
            fd = self._streams(req.container_id, req.exec_id, req.stream)
        except Exception as exc:  # the manager's lookup error, or a bad request
            log.info("raw stream %d refused: %s", sid, exc)
            fd = None
        if fd is None:  # an empty stream, as ReadStdout would give
            self._write(mux.encode(mux.FrameType.CLOSE, sid))
            return
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)  # our side of the process's pipe (or its pty master)
        raw: _Raw | _RawIn = _RawIn(fd) if req.stream == "stdin" else _Raw(fd, req.window)
        with self._slock:
            stale = self._raw.get(sid)
            self._raw[sid] = raw
        if stale is not None:
            stale.end()
        if isinstance(raw, _RawIn):
            threading.Thread(target=self._raw_writer, args=(sid, raw), daemon=True).start()
        else:
            send = self._raw_splicer if _is_pipe(fd) else self._raw_reader  # a pty: read
            threading.Thread(target=send, args=(sid, raw), daemon=True).start()

    def _session_reader(self, sid: int, sock: socket.socket) -> None:
        # A HELLO may drop this session at any moment, and the next host reuses session ids.
        # Checking that the session is still current and writing are one step under _wlock,
        # which HELLO holds from dropping the sessions until HELLO_ACK is written: so nothing
        # of an old session (data it had already read, or its CLOSE) follows the ACK.
        try:
            while True:
                data = sock.recv(mux.MAX_PAYLOAD)
                if not data:
                    break
                with self._wlock:
                    if self._sessions.get(sid) is not sock:
                        break
                    self._write_locked(mux.encode(mux.FrameType.DATA, sid, data))
        except OSError:
            pass
        with self._wlock:
            with self._slock:
                current = self._sessions.get(sid)
                if current is sock:
                    del self._sessions[sid]
            if current is sock:
                self._write_locked(mux.encode(mux.FrameType.CLOSE, sid))
        _close(sock)

    def _handle(self, frame: mux.Frame) -> None:
        t = frame.type
        if t is mux.FrameType.HELLO:
            log.log(
                logging.INFO if self._sessions else logging.DEBUG,
                "host (re)connected; dropping %d session(s)",
                len(self._sessions),
            )
            with self._wlock:  # see _session_reader
                self._drop_all()
                self._decoder.resync = False
                self._write_locked(mux.flush_and(mux.FrameType.HELLO_ACK, frame.payload))
        elif t is mux.FrameType.OPEN and frame.payload:
            self._open_raw(frame.session, frame.payload)
        elif t is mux.FrameType.OPEN:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self._target)
            except OSError as exc:
                log.error("session %d: cannot reach %s: %s", frame.session, self._target, exc)
                _close(sock)
                self._write(mux.encode(mux.FrameType.CLOSE, frame.session))
                return
            with self._slock:
                stale = self._sessions.get(frame.session)
                self._sessions[frame.session] = sock
            if stale is not None:
                _close(stale)
            threading.Thread(
                target=self._session_reader, args=(frame.session, sock), daemon=True
            ).start()
        elif t is mux.FrameType.DATA and frame.session in self._raw:
            raw_in = self._raw.get(frame.session)
            if isinstance(raw_in, _RawIn):  # bounded by the window the host keeps to
                raw_in.chunks.put(frame.payload)
        elif t is mux.FrameType.DATA:
            sock_or_none = self._sessions.get(frame.session)
            if sock_or_none is not None:
                try:
                    sock_or_none.sendall(frame.payload)
                except OSError:
                    self._close_session(frame.session)
        elif t is mux.FrameType.CLOSE:
            with self._slock:
                raw = self._raw.pop(frame.session, None)
            if raw is not None:
                raw.end()
            self._close_session(frame.session, notify=False)
        elif t is mux.FrameType.WINDOW:
            raw = self._raw.get(frame.session)
            if isinstance(raw, _Raw):
                try:
                    raw.grant(mux.decode_window(frame.payload))
                except MuxProtocolError as exc:
                    log.warning("raw stream %d: %s", frame.session, exc)

    def _close_session(self, sid: int, notify: bool = True) -> None:
        with self._slock:
            sock = self._sessions.pop(sid, None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            if notify:
                self._write(mux.encode(mux.FrameType.CLOSE, sid))

    def serve_forever(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            events = poller.poll(1000)
            if not events:
                continue
            _, ev = events[0]
            if ev & select.POLLIN:
                try:
                    data = self._read_batch(poller)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    raise
                if data:
                    self.on_data(data)
                    continue
            # POLLHUP without data: no host connected. The state is a level, so wait a bit.
            time.sleep(0.02)

    def _read_batch(self, poller: select.poll) -> bytes:
        """What the port holds now, up to READ_BATCH bytes. The guest's virtio-serial driver
        returns one receive buffer (a page) per read, so a stdin stream arrives 4 KiB a read;
        decoding once per batch rather than once per page is what bounds stdin under TCG."""
        parts = [os.read(self._fd, READ_BATCH)]
        size = len(parts[0])
        while 0 < size < READ_BATCH and poller.poll(0):
            more = os.read(self._fd, READ_BATCH - size)
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts)  # one part: that very object, not a copy

    def on_data(self, data: bytes) -> None:
        """What the port delivered: decoded and handled. After a malformed frame everything
        but a HELLO is dropped until one comes (the host's flush + HELLO resyncs), the HELLO
        in the very chunk that held the garbage included."""
        try:
            frames = self._decoder.feed(data)
        except MuxProtocolError as exc:
            log.warning("dropping garbage on the port until the next HELLO: %s", exc)
            self._decoder = mux.Decoder(resync=True)
            self._garbage = True
            frames = self._decoder.feed(data)  # resyncing: never raises
        # The host repeats HELLO until the agent answers, so a freshly started agent finds
        # many queued: answer only the last of a batch.
        hellos = [i for i, f in enumerate(frames) if f.type is mux.FrameType.HELLO]
        for i, frame in enumerate(frames):
            if frame.type is mux.FrameType.HELLO:
                if i != hellos[-1]:
                    continue
                self._garbage = False
            elif self._garbage:
                continue
            self._handle(frame)


def serve_vsock(target: str, port: int = VSOCK_PORT) -> None:
    """Relays every vsock connection on ``port`` to the unix socket ``target``."""
    lsock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    lsock.bind((socket.VMADDR_CID_ANY, port))
    lsock.listen(16)
    while True:
        conn, _ = lsock.accept()
        local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            local.connect(target)
        except OSError as exc:
            log.error("vsock session: cannot reach %s: %s", target, exc)
            _close(conn)
            _close(local)
            continue
        threading.Thread(target=_relay_pair, args=(conn, local), daemon=True).start()


def listen_vsock(port: int = mux.RAW_VSOCK_PORT) -> socket.socket:
    """A vsock socket listening on ``port`` (raw streams': ``serve_raw``), made before the
    agent says it is ready, so that no host's connection finds it not listening yet."""
    lsock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        lsock.bind((socket.VMADDR_CID_ANY, port))
        lsock.listen(64)
    except OSError:
        lsock.close()
        raise
    return lsock


def serve_raw(lsock: socket.socket, streams: StreamSource) -> None:
    """Each connection to the listening socket ``lsock`` is one raw stream (cocoon.agent.mux:
    its first line a ``RawRequest``, then the stream's bytes), served by a thread of its own.
    Returns once ``lsock`` is shut down."""
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # shut down: the way to stop serving
                return
            raise
        threading.Thread(
            target=_raw_connection, args=(conn, streams), name=RAW_THREAD, daemon=True
        ).start()


def _raw_connection(conn: socket.socket, streams: StreamSource) -> None:
    try:
        conn.settimeout(10)
        head = b""
        while b"\n" not in head:
            data = conn.recv(mux.RAW_LINE_MAX - len(head)) if len(head) < mux.RAW_LINE_MAX else b""
            if not data:
                raise MuxProtocolError(f"no raw stream request line: {head[:200]!r}")
            head += data
        line, _, rest = head.partition(b"\n")
        conn.settimeout(None)
        req = mux.RawRequest.decode(line)
        fd = streams(req.container_id, req.exec_id, req.stream)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, False)  # our side of the process's pipe (or pty master)
            if req.stream == "stdin":
                _raw_to_pipe(conn, fd, rest)
            else:
                _raw_from_pipe(conn, fd)
    except Exception as exc:  # a bad request, the manager's lookup error, a lost host
        log.info("vsock raw stream refused or lost: %s", exc)
    finally:
        _close(conn)  # a stream with no fd ends at once, empty, as ReadStdout would give


def _raw_from_pipe(conn: socket.socket, fd: int) -> None:
    """The pipe's (or pty's) bytes to the host until their EOF. A host that stops reading
    blocks the send, so the pipe fills and the process blocks; a host that goes away ends it."""
    splice = _is_pipe(fd)
    host = conn.fileno()
    while True:
        ready, _, _ = select.select([fd, host], [], [], 1.0)
        if host in ready:
            return  # the host closed its end (it sends nothing on an output stream)
        if fd not in ready:
            continue
        try:
            if splice:  # no byte through Python; the socket's send blocks while it is full
                got = os.splice(fd, conn.fileno(), mux.RAW_SPLICE_MAX)
            else:
                data = os.read(fd, mux.RAW_CHUNK)
                conn.sendall(data)
                got = len(data)
        except BlockingIOError:
            continue
        except ConnectionError:  # the host went away
            return
        except OSError as exc:
            if exc.errno == errno.EINVAL and splice:
                splice = False  # a socket this kernel cannot splice into: read instead
                continue
            got = 0  # EIO: a pty's last slave closed; EBADF: the fd was closed
        except ValueError:
            got = 0
        if not got:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            return


def _raw_to_pipe(conn: socket.socket, fd: int, first: bytes) -> None:
    """The host's bytes to the pipe until the host's EOF, then the connection is closed: the
    host learns that all it sent is written. A pipe whose reader is gone ends it at once."""
    data = first
    while True:
        try:
            _write_all(fd, data)
        except OSError as exc:  # EPIPE: the process is gone; EBADF: stdin closed
            log.debug("vsock raw stdin: %s", exc)
            return
        data = conn.recv(READ_BATCH)
        if not data:
            return


def _relay_pair(a: socket.socket, b: socket.socket) -> None:
    """Copies both ways until both directions reach EOF, then closes both sockets."""
    back = threading.Thread(target=_pump, args=(b, a), daemon=True)
    back.start()
    _pump(a, b)
    back.join()
    _close(a)
    _close(b)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(256 * 1024)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
