"""A tiny OCI bundle made on the fly from the host's busybox-static: the default bundle of
``cocoon demo`` and the test image of the test suite (no container registry is needed).

``make_rootfs(dir)`` lays out a root filesystem: ``/bin/busybox`` (the statically linked
binary, so it runs in any kernel and libc-free rootfs) with a symlink per applet, the usual
empty mount points, and minimal /etc files. ``make_bundle(dir, args)`` adds a config.json
from ``spec.default_spec`` with the given process.

May import: the standard library, cocoon.runtime.{errors, container.spec}.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

from cocoon.runtime.errors import HostError

BUSYBOX = Path("/bin/busybox")
PT_INTERP = 3
DIRS = ("proc", "sys", "dev", "tmp", "etc", "root", "run", "var/tmp", "home", "usr/bin")


def has_interpreter(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF image has a PT_INTERP header (is dynamic)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    (phoff,) = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    return any(
        struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == PT_INTERP for i in range(phnum)
    )


def _static_busybox() -> Path:
    try:
        head = BUSYBOX.read_bytes()[:4096]
        dynamic = has_interpreter(head)
    except (OSError, ValueError, struct.error):
        raise HostError(f"{BUSYBOX} not found or not a binary: install busybox-static") from None
    if dynamic:
        raise HostError(f"{BUSYBOX} is dynamically linked: install busybox-static")
    return BUSYBOX


def make_rootfs(root: Path) -> Path:
    """Creates (or refreshes) a busybox root filesystem at ``root``."""
    bb = _static_busybox()
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for d in DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(bb, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(bb), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for a in applets:
        link = root / "bin" / a
        if a != "busybox" and not link.is_symlink():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc" / "hostname").write_text("cocoon\n")
    return root


def make_bundle(bundle: Path, args: list[str], *, terminal: bool = False, **process: Any) -> Path:
    """A bundle at ``bundle`` (rootfs/ + config.json) running ``args``."""
    from cocoon.runtime.container.spec import default_spec

    make_rootfs(bundle / "rootfs")
    spec = default_spec()
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["process"].update(process)
    spec["root"]["readonly"] = False
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return bundle
