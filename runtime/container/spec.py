"""The OCI bundle: loading config.json (checked once, at the edge) and rewriting it for the
guest.

``load_bundle`` reads ``<bundle>/config.json`` and checks what cocoon relies on (process,
root, mounts, hooks, namespaces), with one clear error per problem. ``guest_spec`` produces the
spec crun sees inside the VM: the rootfs and bind-mount sources point into the sandbox share
(``/run/cocoon/shared/<id>/...``), host-only settings are dropped (AppArmor/SELinux labels,
host hooks; host namespace paths become new namespaces), cgroups go under ``/cocoon/<id>``
in the guest's cgroupfs, and /dev/shm becomes a guest tmpfs. ``default_spec`` is what ``cocoon
spec`` writes and what the embedded busybox bundle starts from.

May import: the standard library, cocoon.runtime.errors.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon.runtime.errors import SpecError

OCI_VERSION = "1.0.2"  # what `state` reports and `spec` writes

GUEST_SHARED = "/run/cocoon/shared"
HOST_HOOKS = ("prestart", "createRuntime", "poststart", "poststop")
GUEST_HOOKS = ("createContainer", "startContainer")


@dataclass(frozen=True)
class BindMount:
    """A host path the container mounts; it reaches the guest through the share."""

    index: int
    source: Path
    destination: str

    @property
    def share_name(self) -> str:
        return f"{self.index}-{self.source.name or 'root'}"


@dataclass(frozen=True)
class Bundle:
    path: Path
    spec: dict[str, Any]
    rootfs: Path
    binds: tuple[BindMount, ...]

    @property
    def terminal(self) -> bool:
        return bool(self.spec.get("process", {}).get("terminal"))

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.spec.get("annotations") or {})

    def hooks(self, kind: str) -> list[dict[str, Any]]:
        return list((self.spec.get("hooks") or {}).get(kind) or [])


MAX_DEPTH = 64  # JSON nesting: the runtime spec's deepest (seccomp's args) is 6


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


def _depth_ok(doc: Any) -> bool:
    """Whether ``doc`` nests at most MAX_DEPTH deep (walked without recursion)."""
    todo = [(doc, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            if d > MAX_DEPTH:
                return False
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


def parse_json(raw: bytes, where: str) -> Any:
    """A JSON document the runtime was given (config.json, a --process or --resources file):
    UTF-8, at most MAX_DEPTH deep (deeper would be a RecursionError in whatever walks it
    next: the guest spec's copy, the state's JSON), or one SpecError naming ``where``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{where}: not valid UTF-8: {exc}") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise SpecError(f"{where}: not valid JSON: nested deeper than {MAX_DEPTH}") from None
    except ValueError as exc:
        raise SpecError(f"{where}: not valid JSON: {exc}") from None
    _need(_depth_ok(doc), f"{where}: JSON nested deeper than {MAX_DEPTH}")
    return doc


def is_bind_mount(m: dict[str, Any]) -> bool:
    opts = m.get("options") or []
    return m.get("type") == "bind" or "bind" in opts or "rbind" in opts


def load_bundle(bundle: Path) -> Bundle:
    bundle = bundle.resolve()
    cfg = bundle / "config.json"
    try:
        raw = cfg.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{cfg}: no such file (is {bundle} an OCI bundle?)") from None
    except OSError as exc:
        raise SpecError(f"{cfg}: {exc.strerror}") from exc
    spec = parse_json(raw, str(cfg))
    _need(isinstance(spec, dict), f"{cfg}: the top level must be a JSON object")
    _need(isinstance(spec.get("ociVersion"), str), f"{cfg}: ociVersion must be a string")
    root = spec.get("root")
    _need(
        isinstance(root, dict) and isinstance(root.get("path"), str) and root["path"] != "",
        f"{cfg}: root.path must be a non-empty string",
    )
    rootfs = Path(root["path"])
    rootfs = rootfs if rootfs.is_absolute() else bundle / rootfs
    _need(rootfs.is_dir(), f"rootfs {rootfs} does not exist or is not a directory")
    proc = spec.get("process")
    _need(isinstance(proc, dict), f"{cfg}: process must be an object (runc needs one to create)")
    validate_process(proc, str(cfg))
    _check_namespaces(cfg, spec.get("linux"))
    mounts = spec.get("mounts") or []
    _need(isinstance(mounts, list), f"{cfg}: mounts must be a list")
    binds = []
    for i, m in enumerate(mounts):
        _need(
            isinstance(m, dict) and isinstance(m.get("destination"), str),
            f"{cfg}: mounts[{i}] needs a destination",
        )
        _need(_strings(m.get("options") or []), f"{cfg}: mounts[{i}].options must be strings")
        for key in ("type", "source"):
            _need(isinstance(m.get(key, ""), str), f"{cfg}: mounts[{i}].{key} must be a string")
        if is_bind_mount(m) and not str(m.get("source", "")).startswith("/dev/"):
            _need(
                isinstance(m.get("source"), str) and m["source"] != "",
                f"{cfg}: mounts[{i}] is a bind mount without a source",
            )
            src = Path(m["source"])
            src = src if src.is_absolute() else bundle / src
            _need(src.exists(), f"{cfg}: mounts[{i}] source {src} does not exist")
            binds.append(BindMount(i, src, m["destination"]))
    hooks = spec.get("hooks") or {}
    _need(isinstance(hooks, dict), f"{cfg}: hooks must be an object")
    for kind, entries in hooks.items():
        _need(isinstance(entries or [], list), f"{cfg}: hooks.{_key(kind)} must be a list")
        for j, h in enumerate(entries or []):
            _check_hook(h, f"{cfg}: hooks.{_key(kind)}[{j}]")
    annotations = spec.get("annotations") or {}
    _need(
        isinstance(annotations, dict) and all(isinstance(v, str) for v in annotations.values()),
        f"{cfg}: annotations must be an object of strings",
    )
    return Bundle(bundle, spec, rootfs, tuple(binds))


def _show(v: Any) -> str:
    """A value of the user's document as an error quotes it: its repr, cut short."""
    r = repr(v)
    return r if len(r) <= 80 else r[:80] + "..."


def _key(name: str) -> str:
    """A key of the user's document as an error names it: as is if plain, else quoted."""
    return name if name.isascii() and name.isprintable() and name else json.dumps(name)


def _strings(v: Any, nul_ok: bool = True) -> bool:
    """A list of strings (with no NUL byte where it must reach execve)."""
    return isinstance(v, list) and all(isinstance(x, str) and (nul_ok or "\0" not in x) for x in v)


def _check_hook(h: Any, where: str) -> None:
    """An OCI hook as hooks.run_hooks runs it: an absolute path, string args and env, a
    positive integer timeout (the runtime spec's schema)."""
    _need(
        isinstance(h, dict) and isinstance(h.get("path"), str) and h["path"] != "",
        f"{where} needs a path",
    )
    _need(h["path"].startswith("/") and "\0" not in h["path"], f"{where}: path must be absolute")
    _need(_strings(h.get("args", []), False), f"{where}: args must be a list of strings")
    _need(_strings(h.get("env", []), False), f"{where}: env must be a list of strings")
    t = h.get("timeout")
    _need(
        t is None or (isinstance(t, int) and not isinstance(t, bool) and t > 0),
        f"{where}: timeout must be a positive integer (seconds)",
    )


# A namespace type and the name of its file under /proc/<pid>/ns.
NS_FILES = {
    "pid": "pid",
    "network": "net",
    "mount": "mnt",
    "ipc": "ipc",
    "uts": "uts",
    "user": "user",
    "cgroup": "cgroup",
    "time": "time",
}


def _check_namespaces(cfg: Path, linux: Any) -> None:
    if linux is None:
        return
    _need(isinstance(linux, dict), f"{cfg}: linux must be an object")
    _need(
        isinstance(linux.get("cgroupsPath", ""), str), f"{cfg}: linux.cgroupsPath must be a string"
    )
    nss = linux.get("namespaces") or []
    _need(isinstance(nss, list), f"{cfg}: linux.namespaces must be a list")
    seen: set[str] = set()
    for i, ns in enumerate(nss):
        where = f"{cfg}: linux.namespaces[{i}]"
        _need(isinstance(ns, dict), f"{where} must be an object")
        kind = ns.get("type")
        _need(
            isinstance(kind, str) and kind in NS_FILES,
            f"{where}: unknown namespace type {_show(kind)}",
        )
        _need(kind not in seen, f"{where}: a second {kind} namespace")
        _need(isinstance(ns.get("path", ""), str), f"{where}: path must be a string")
        seen.add(kind)
    devices = linux.get("devices") or []
    _need(isinstance(devices, list), f"{cfg}: linux.devices must be a list")
    for i, d in enumerate(devices):
        where = f"{cfg}: linux.devices[{i}]"
        _need(isinstance(d, dict) and isinstance(d.get("path"), str), f"{where} needs a path")
        _need(isinstance(d.get("type", ""), str), f"{where}: type must be a string")
        for key in ("major", "minor"):
            v = d.get(key, 0)
            _need(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
                f"{where}: {key} must be a device number",
            )
    validate_resources(linux.get("resources"), f"{cfg}: linux.resources")


_CPUS = re.compile(r"[0-9,\- \t]*")  # a cpuset list: 0-3,5 (checked further by sizing)


def validate_resources(res: Any, where: str) -> None:
    """The shape of what the host reads of linux.resources (``update --resources`` too):
    objects where sizing expects objects, integers where it does arithmetic."""
    if res is None:
        return
    _need(isinstance(res, dict), f"{where} must be an object")
    for table, ints in (("cpu", ("quota", "period")), ("memory", ("limit",))):
        sub = res.get(table)
        if sub is None:
            continue
        _need(isinstance(sub, dict), f"{where}.{table} must be an object")
        for key in ints:
            v = sub.get(key)
            _need(
                v is None or (isinstance(v, int) and not isinstance(v, bool)),
                f"{where}.{table}.{key} must be an integer",
            )
    cpus = (res.get("cpu") or {}).get("cpus")
    _need(
        cpus is None or (isinstance(cpus, str) and _CPUS.fullmatch(cpus) is not None),
        f"{where}.cpu.cpus must be a CPU list (e.g. 0-1,3)",
    )


def validate_process(proc: dict[str, Any], where: str) -> None:
    args = proc.get("args")
    _need(
        isinstance(args, list) and len(args) > 0 and all(isinstance(a, str) for a in args),
        f"{where}: process.args must be a non-empty list of strings",
    )
    _need(
        isinstance(proc.get("cwd", "/"), str) and str(proc.get("cwd", "/")).startswith("/"),
        f"{where}: process.cwd must be an absolute path",
    )
    env = proc.get("env", [])
    _need(
        isinstance(env, list) and all(isinstance(e, str) for e in env),
        f"{where}: process.env must be a list of strings",
    )
    user = proc.get("user", {})
    _need(isinstance(user, dict), f"{where}: process.user must be an object")
    for key in ("uid", "gid"):
        _need(_is_id(user.get(key, 0)), f"{where}: process.user.{key} must be 0 to {MAX_UID}")
    gids = user.get("additionalGids", [])
    _need(
        isinstance(gids, list) and all(_is_id(g) for g in gids),
        f"{where}: process.user.additionalGids must be a list of ids (0 to {MAX_UID})",
    )
    _need(
        isinstance(proc.get("terminal", False), bool),
        f"{where}: process.terminal must be true or false",
    )


MAX_UID = 2**32 - 2  # uid_t; (uid_t)-1 means "no change" to the kernel


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_UID


def is_vfio_group(d: Any) -> bool:
    """A linux.devices entry naming a VFIO group (/dev/vfio/N, not the /dev/vfio/vfio node)."""
    p = d.get("path", "") if isinstance(d, dict) else ""
    return isinstance(p, str) and p.startswith("/dev/vfio/") and p != "/dev/vfio/vfio"


def guest_container_dir(cid: str) -> str:
    return f"{GUEST_SHARED}/{cid}"


def network_namespace(spec: dict[str, Any]) -> tuple[bool, str]:
    """(whether the spec gives the container a network namespace, its path or "" for new)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return True, str(ns.get("path") or "")
    return False, ""


def guest_spec(
    b: Bundle,
    cid: str,
    block_sources: dict[int, str] | None = None,
    guest_network: bool = False,
    namespaces: list[dict[str, Any]] | None = None,
    shm_source: str = "",
) -> dict[str, Any]:
    """``block_sources``: mount index -> the guest node of its hot-plugged block device.
    ``guest_network``: the sandbox's NICs stand for the container's network namespace, so the
    container joins the guest's own (no network namespace of its own in the guest).
    ``namespaces``: a pod member's namespaces as they are in the guest (pod.membership);
    without them every host namespace path becomes a new namespace. ``shm_source``: where a
    pod's container binds its /dev/shm from (its sandbox's, in the guest); without it /dev/shm
    is a tmpfs of its own."""
    spec = copy.deepcopy(b.spec)
    block_sources = block_sources or {}
    base = guest_container_dir(cid)
    spec["root"]["path"] = f"{base}/rootfs"
    binds = {bm.index: bm for bm in b.binds}
    mounts = []
    for i, m in enumerate(spec.get("mounts") or []):
        if m.get("destination") == "/dev/shm" and shm_source:
            m = {
                "destination": "/dev/shm",
                "type": "bind",
                "source": shm_source,
                "options": ["rbind", "nosuid", "noexec", "nodev"],
            }
        elif m.get("destination") == "/dev/shm":
            m = {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            }
        elif i in binds:
            m["source"] = f"{base}/mounts/{binds[i].share_name}"
        elif i in block_sources:
            m["source"] = block_sources[i]
        mounts.append(m)
    spec["mounts"] = mounts
    proc = spec.get("process") or {}
    proc.pop("apparmorProfile", None)
    proc.pop("selinuxLabel", None)
    linux = spec["linux"] = spec.get("linux") or {}  # "linux": null is no linux
    linux.pop("mountLabel", None)
    linux["cgroupsPath"] = f"/cocoon/{cid}"
    if namespaces is None:
        # Host namespace paths mean nothing in the guest: each becomes a new namespace.
        namespaces = [{"type": ns.get("type")} for ns in linux.get("namespaces") or []]
    linux["namespaces"] = [
        ns for ns in namespaces if not (ns.get("type") == "network" and guest_network)
    ]
    # VFIO groups are hot-plugged PCI devices the guest kernel drives: no node to make.
    devs = [d for d in linux.get("devices") or [] if not is_vfio_group(d)]
    if devs or "devices" in linux:
        linux["devices"] = devs
    hooks = {k: v for k, v in (spec.get("hooks") or {}).items() if k in GUEST_HOOKS}
    if hooks:
        spec["hooks"] = hooks
    else:
        spec.pop("hooks", None)
    return spec


def default_spec(rootless: bool = False) -> dict[str, Any]:
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm",
            ],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "cocoon",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": t}
                for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")
                + (("user",) if rootless else ())
            ],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }
