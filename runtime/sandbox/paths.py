"""Where a sandbox lives: its state directory under ``<root>/sandboxes``, by the same rule for
every caller (the light CLI verbs too, which must not load the launcher and its gRPC).

May import: the standard library, cocoon.runtime.container.ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from cocoon.runtime.container.ids import validate_id

# Unix socket paths (sun_path) hold at most 107 bytes, and the sandbox dir holds sockets
# (monitor.sock, qmp.sock, virtiofsd.sock, agent-port.sock): long ids (containerd and dockerd
# use 64 hex digits) get a short, stable directory name derived from the id.
MAX_DIR_NAME = 24


def sandboxes_dir(root: Path) -> Path:
    """Where every sandbox has its name: ``<root>/sandboxes``."""
    return root.absolute() / "sandboxes"


def sandbox_path(root: Path, sandbox_id: str) -> Path:
    """The sandbox's name in ``<root>/sandboxes``: its state directory, or for a VM claimed
    from the pool a link to the pooled VM's directory."""
    validate_id(sandbox_id, "sandbox")
    name = sandbox_id
    if len(name) > MAX_DIR_NAME:
        import hashlib  # here: OpenSSL's load is 4 ms of every short id's CLI call

        name = "h-" + hashlib.sha256(sandbox_id.encode()).hexdigest()[: MAX_DIR_NAME - 2]
    return sandboxes_dir(root) / name


def sandbox_dir(root: Path, sandbox_id: str) -> Path:
    """The sandbox's state directory (a pooled VM's link resolved)."""
    p = sandbox_path(root, sandbox_id)
    return Path(os.path.realpath(p)) if p.is_symlink() else p
