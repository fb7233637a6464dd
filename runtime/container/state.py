"""Container state on disk: one directory per container under ``<root>/containers``.

``state.json`` is written atomically (temp file + rename) under an flock on the directory's
``lock`` file; liveness is re-checked on every load (a container whose shim is gone is
stopped, whatever the file says). The status rules live on the Status enum so every verb asks
the same question the same way. ``Ctx`` is what every verb is given (configuration, state
root, logging); ``state`` and ``list_states`` answer runc's ``state`` and ``list`` from disk
alone, so those verbs import no gRPC.

May import: the standard library, cocoon.runtime.{config, errors, pids, container.{ids, spec}}.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import fcntl
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cocoon.runtime.container.ids import validate_id
from cocoon.runtime.container.spec import OCI_VERSION
from cocoon.runtime.errors import StateError
from cocoon.runtime.pids import pid_alive, start_time

TYPE_CHECKING = False
if TYPE_CHECKING:  # the configuration module is loaded only by verbs that read it
    from cocoon.runtime.config import Config


class Status(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"

    @property
    def can_start(self) -> bool:
        return self is Status.CREATED

    @property
    def can_kill(self) -> bool:
        return self in (Status.CREATED, Status.RUNNING, Status.PAUSED)

    @property
    def can_exec(self) -> bool:
        return self in (Status.CREATED, Status.RUNNING)

    @property
    def can_pause(self) -> bool:
        return self in (Status.CREATED, Status.RUNNING)

    @property
    def can_resume(self) -> bool:
        return self is Status.PAUSED

    @property
    def can_delete(self) -> bool:
        return self in (Status.CREATED, Status.STOPPED)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclass
class ContainerState:
    id: str
    bundle: str
    rootfs: str
    sandbox_id: str
    status: str
    pid: int = 0
    created: str = field(default_factory=now_iso)
    annotations: dict[str, str] = field(default_factory=dict)
    owner: str = ""
    exec_pids: dict[str, int] = field(default_factory=dict)
    terminal: bool = False
    resources: dict[str, Any] = field(default_factory=dict)  # linux.resources, as updated
    disks: list[str] = field(default_factory=list)  # hot-plugged disk ids
    vfio: list[str] = field(default_factory=list)  # hot-plugged VFIO group ids
    netns: str = ""  # the network namespace whose interfaces the guest got ("" for none)
    netns_owned: bool = False  # cocoon made it (the spec asked for a new one): delete removes it
    # A pod's sandbox container: its spec's namespace paths (its members may repeat them) and
    # whether its network namespace is the guest's own (the NICs stand for it).
    ns_paths: dict[str, str] = field(default_factory=dict)
    guest_network: bool = False
    # The spec's poststart and poststop hooks as create read them: config.json edited or removed
    # after create changes nothing (the runtime spec's rule; runc keeps its own copy too).
    hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    pid_start: int = 0  # start_time(pid) at create: a reused pid (a reboot) is not ours
    paused_from: str = ""  # the status pause found (created or running): resume goes back to it

    @property
    def owns_sandbox(self) -> bool:
        """The container whose create booted its sandbox (alone, or a pod's sandbox)."""
        return self.sandbox_id == self.id

    @property
    def effective(self) -> Status:
        st = Status(self.status)
        if st in (Status.CREATED, Status.RUNNING, Status.PAUSED) and not self.pid_is_ours():
            return Status.STOPPED
        return st

    def pid_is_ours(self) -> bool:
        """The recorded pid is still the process create started (alive, same start time)."""
        if not pid_alive(self.pid):
            return False
        return not self.pid_start or start_time(self.pid) == self.pid_start

    def oci(self) -> dict[str, Any]:
        st = self.effective
        return {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": self.pid if st is not Status.STOPPED else 0,
            "status": st.value,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": self.owner,
            "annotations": self.annotations,
        }


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "containers"

    def path(self, cid: str) -> Path:
        return self.dir / validate_id(cid)

    def exists(self, cid: str) -> bool:
        return (self.path(cid) / "state.json").exists()

    def reserve(self, cid: str) -> Path:
        """Creates the container's directory; an existing id is an error."""
        d = self.path(cid)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise StateError(f"container {cid} already exists") from None
        return d

    def load(self, cid: str) -> ContainerState:
        f = self.path(cid) / "state.json"
        try:
            data = json.loads(f.read_text())
        except FileNotFoundError:
            raise StateError(f"container {cid} does not exist") from None
        except (OSError, ValueError) as exc:
            raise StateError(f"container {cid}: unreadable state {f}: {exc}") from exc
        try:
            st = ContainerState(**data)
            Status(st.status)
        except (TypeError, ValueError) as exc:
            raise StateError(f"container {cid}: invalid state {f}: {exc}") from exc
        if not isinstance(st.pid, int) or isinstance(st.pid, bool):
            raise StateError(f"container {cid}: invalid state {f}: pid {st.pid!r}")
        return st

    def save(self, st: ContainerState) -> None:
        d = self.path(st.id)
        tmp = d / "state.json.tmp"
        try:
            tmp.write_text(json.dumps(asdict(st), indent=1))
            os.replace(tmp, d / "state.json")
        except OSError as exc:  # a full or read-only state filesystem
            with contextlib.suppress(OSError):
                tmp.unlink()
            why = exc.strerror or str(exc)
            raise StateError(f"saving the state of container {st.id}: {why}") from None

    @contextlib.contextmanager
    def locked(self, cid: str) -> Iterator[None]:
        d = self.path(cid)
        try:
            f = open(d / "lock", "a")  # noqa: SIM115 - held for the block
        except FileNotFoundError:
            raise StateError(f"container {cid} does not exist") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def remove(self, cid: str) -> None:
        shutil.rmtree(self.path(cid), ignore_errors=True)

    def ids(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if (p / "state.json").exists())


@dataclass(frozen=True)
class Ctx:
    """What every verb is given: the configuration, the state root, and how to log.
    ``config`` is the configuration or how to load it, on first use of ``cfg``: a verb that
    reads none (exec, state, kill) parses no TOML and imports no config module (~20 ms)."""

    config: Config | Callable[[], Config]
    root: Path
    log_file: Path | None = None
    log_format: str = "text"
    debug: bool = False

    @functools.cached_property
    def cfg(self) -> Config:
        return self.config() if callable(self.config) else self.config

    @property
    def store(self) -> Store:
        return Store(self.root)


def state(ctx: Ctx, cid: str) -> dict[str, Any]:
    """runc state: the container's OCI state (liveness re-checked)."""
    return ctx.store.load(validate_id(cid)).oci()


def list_states(ctx: Ctx) -> list[ContainerState]:
    """runc list: every container whose state loads (a half-removed one is skipped)."""
    out = []
    for cid in ctx.store.ids():
        with contextlib.suppress(StateError):
            out.append(ctx.store.load(cid))
    return out
