"""Reseeding the guest kernel's random number generator from bytes the host sends.

A VM restored from a template starts with the template's CRNG state, so every clone would
hand out the same "random" bytes until the kernel's next periodic reseed (a minute away in
Linux 6.1). ``reseed`` mixes the host's bytes into the input pool with RNDADDENTROPY,
crediting them as entropy, then forces the CRNG to rekey from that pool with RNDRESEEDCRNG:
from the next read on, each clone's /dev/urandom and getrandom(2) stream is its own.

May import: the standard library only.
"""

from __future__ import annotations

import fcntl
import os
import struct

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07), Linux >= 4.17
MIN_BYTES = 32  # a 256-bit key's worth
MAX_BYTES = 4096


def reseed(data: bytes, device: str = "/dev/urandom") -> None:
    """Credits ``data`` to the kernel's pool and rekeys the CRNG (needs CAP_SYS_ADMIN)."""
    if not MIN_BYTES <= len(data) <= MAX_BYTES:
        raise ValueError(f"reseed takes {MIN_BYTES} to {MAX_BYTES} bytes, got {len(data)}")
    info = struct.pack("ii", len(data) * 8, len(data)) + data
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
