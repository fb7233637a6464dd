"""The host side of container networking: what is in the container's network namespace, how
each interface is bridged to a tap file descriptor for a guest NIC, and how that is undone.

``scan`` lists the namespace's interfaces (MAC, MTU, addresses, routes, permanent
neighbours). ``plumb`` bridges each one with the sandbox's network model and returns open tap
fds for QEMU; ``unplumb`` removes what ``plumb`` made from a JSON-able record, so it also works
from a later process (delete after a crashed monitor). Models:

- ``tcfilter`` (default): a tap in the namespace, an ingress qdisc on the tap and on the
  interface, and a u32 match-all filter with a mirred egress redirect each way. The tap is not
  persistent: it goes away when the last fd (QEMU's) closes.
- ``macvtap``: a macvtap in bridge mode on the interface, carrying the interface's MAC (the
  guest NIC's), and the interface a new local MAC and none of its addresses (else the
  namespace's own stack would answer ARP/NDP for the guest's addresses too); unplumbing
  gives back the MAC, the addresses and the routes. The macvtap's char device is made in the
  sandbox directory from its device number as read in the namespace's own sysfs (/dev/tapN
  names collide between namespaces: they are by ifindex).
- ``none``: nothing is bridged.
- ``tap`` (not a configuration choice: the benchmark's baseline): the namespace's persistent
  taps are given to the guest as they are, with a new local MAC and no addresses (the
  namespace side is the peer); nothing is made, nothing undone.

Every netlink and tc operation goes through pyroute2's synchronous IPRoute. Work inside a
namespace runs in a fresh thread that joins the namespace (setns is per thread) and then ends,
so no thread of the caller ever changes namespace.

May import: the standard library, pyroute2, cocoon.runtime.errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import random
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cocoon.runtime.errors import CocoonError

# Link kinds each model can bridge; anything else in the namespace is skipped (and said so).
BRIDGEABLE = {
    "tcfilter": {"veth", "macvlan", "ipvlan"},
    "macvtap": {"veth", "macvlan"},
    "tap": {"tun"},
}
TAP_PREFIX = "cctap"  # tcfilter taps
MACVTAP_PREFIX = "ccmvt"  # macvtaps

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_REC = 0x4000
_MS_BIND = 0x1000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFF_MULTI_QUEUE = 0x0100
_ETH_P_ALL = 0x0003
_INGRESS = 0xFFFF0000
_RTPROT_KERNEL = 2
_NUD_PERMANENT = 0x80
_RT_TABLE_MAIN = 254
_IFA_F_NODAD = 0x02

_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


class NetworkError(CocoonError):
    pass


@dataclass
class Address:
    family: int  # 4 or 6
    address: str
    prefix: int


@dataclass
class Route:
    family: int
    dest: str  # "" for the default route
    prefix: int
    gateway: str
    source: str
    scope: int


@dataclass
class Neighbour:
    family: int
    ip: str
    lladdr: str


@dataclass
class Endpoint:
    name: str
    index: int
    kind: str
    mac: str
    mtu: int
    addresses: list[Address] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Endpoint:
        return cls(
            name=d["name"],
            index=d["index"],
            kind=d["kind"],
            mac=d["mac"],
            mtu=d["mtu"],
            addresses=[Address(**a) for a in d.get("addresses", [])],
            routes=[Route(**r) for r in d.get("routes", [])],
            neighbours=[Neighbour(**n) for n in d.get("neighbours", [])],
        )


@dataclass
class Skipped:
    name: str
    kind: str
    reason: str


@dataclass
class Plumbed:
    """One bridged interface: what the guest NIC needs, and what to undo."""

    endpoint: Endpoint
    model: str
    device: str  # the tap or macvtap cocoon made
    fds: list[int] = field(default_factory=list)  # open queue fds, the caller's to close

    def record(self) -> dict[str, Any]:
        return {
            "endpoint": asdict(self.endpoint),
            "model": self.model,
            "device": self.device,
        }


# --------------------------------------------------------------------------- namespaces
def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Runs ``fn`` in a new thread that has joined the network namespace at ``path``."""
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"network namespace {path}: {exc.strerror}") from None
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.setns(nsfd, _CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise NetworkError(f"network namespace {path}: not one ({os.strerror(e)})")
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    try:
        t = threading.Thread(target=run, name="netns")
        t.start()
        t.join()
    finally:
        os.close(nsfd)
    if error:
        raise error[0]
    return result[0]


def create_netns(path: Path) -> None:
    """A new, empty network namespace bound at ``path`` (as `ip netns add` does, without
    making the directory a mount point): a thread unshares its network namespace and binds
    it to the file, then ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
    error: list[str] = []

    def run() -> None:
        if _libc.unshare(_CLONE_NEWNET) != 0:
            error.append(f"unshare: {os.strerror(ctypes.get_errno())}")
            return
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        if _libc.mount(src, str(path).encode(), None, _MS_BIND, None) != 0:
            error.append(f"bind: {os.strerror(ctypes.get_errno())}")

    t = threading.Thread(target=run, name="netns-create")
    t.start()
    t.join()
    if error:
        with contextlib.suppress(OSError):
            path.unlink()
        raise NetworkError(f"cannot create a network namespace at {path}: {error[0]}")


def remove_netns(path: Path) -> None:
    if not path.exists():
        return
    _libc.umount2(str(path).encode(), _MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# --------------------------------------------------------------------------- scan
def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _kind(link: Any) -> str:
    info = link.get("IFLA_LINKINFO")
    return str(info.get("IFLA_INFO_KIND") or "") if info else ""


def scan(netns: str, model: str) -> tuple[list[Endpoint], list[Skipped]]:
    """The namespace's interfaces that ``model`` can bridge, and those it skips."""
    return in_netns(netns, lambda: _scan_here(model))


def _scan_here(model: str) -> tuple[list[Endpoint], list[Skipped]]:
    ok = BRIDGEABLE.get(model, set())
    eps: list[Endpoint] = []
    skipped: list[Skipped] = []
    with _ipr() as ipr:
        for link in ipr.get_links():
            name = str(link.get("IFLA_IFNAME"))
            kind = _kind(link)
            if name == "lo" or name.startswith((TAP_PREFIX, MACVTAP_PREFIX)):
                continue
            if kind not in ok:
                what = kind or "physical or unknown"
                skipped.append(
                    Skipped(
                        name,
                        what,
                        f"model {model} bridges {', '.join(sorted(ok))} links only; "
                        f"{name} ({what}) gets no guest NIC",
                    )
                )
                continue
            idx = int(link["index"])
            eps.append(
                Endpoint(
                    name=name,
                    index=idx,
                    kind=kind,
                    mac=str(link.get("IFLA_ADDRESS")),
                    mtu=int(link.get("IFLA_MTU")),
                    addresses=_addresses(ipr, idx),
                    routes=_routes(ipr, idx),
                    neighbours=_neighbours(ipr, idx),
                )
            )
    return eps, skipped


def _fam(af: int) -> int:
    return 6 if af == socket.AF_INET6 else 4


def _addresses(ipr: Any, idx: int) -> list[Address]:
    out = []
    for a in ipr.get_addr(index=idx):
        ip = str(a.get("IFA_ADDRESS"))
        if a["family"] == socket.AF_INET6 and ipaddress.ip_address(ip).is_link_local:
            continue  # the guest makes its own
        out.append(Address(_fam(a["family"]), ip, int(a["prefixlen"])))
    return out


def _routes(ipr: Any, idx: int) -> list[Route]:
    out = []
    for af in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=af, table=_RT_TABLE_MAIN):
            if r.get("RTA_OIF") != idx or r["proto"] == _RTPROT_KERNEL:
                continue  # the guest makes its own prefix routes from the addresses
            dest = r.get("RTA_DST") or ""
            if af == socket.AF_INET6 and dest and ipaddress.ip_address(dest).is_multicast:
                continue
            out.append(
                Route(
                    family=_fam(af),
                    dest=str(dest),
                    prefix=int(r["dst_len"]),
                    gateway=str(r.get("RTA_GATEWAY") or ""),
                    source=str(r.get("RTA_PREFSRC") or ""),
                    scope=int(r["scope"]),
                )
            )
    # Routes through a gateway go after the routes that make the gateway reachable.
    out.sort(key=lambda r: bool(r.gateway))
    return out


def _neighbours(ipr: Any, idx: int) -> list[Neighbour]:
    out = []
    for n in ipr.get_neighbours(ifindex=idx):
        if not n["state"] & _NUD_PERMANENT or not n.get("NDA_LLADDR"):
            continue
        out.append(Neighbour(_fam(n["family"]), str(n.get("NDA_DST")), str(n.get("NDA_LLADDR"))))
    return out


# --------------------------------------------------------------------------- plumb
def plumb(
    netns: str, eps: list[Endpoint], model: str, queues: int, node_dir: Path
) -> list[Plumbed]:
    """Bridges every endpoint; all or nothing (a failure undoes what was made)."""
    if model not in BRIDGEABLE:
        raise NetworkError(f"network model {model!r} bridges nothing")
    return in_netns(netns, lambda: _plumb_here(eps, model, max(1, queues), node_dir))


def _plumb_here(eps: list[Endpoint], model: str, queues: int, node_dir: Path) -> list[Plumbed]:
    done: list[Plumbed] = []
    try:
        with _ipr() as ipr:
            for i, ep in enumerate(eps):
                if model == "tcfilter":
                    done.append(_tcfilter(ipr, ep, f"{TAP_PREFIX}{i}", queues))
                elif model == "tap":
                    guest = Endpoint(ep.name, ep.index, ep.kind, _local_mac(), ep.mtu)
                    done.append(Plumbed(guest, "tap", "", _open_tap(ep.name, 1)))
                else:
                    done.append(_macvtap(ipr, ep, f"{MACVTAP_PREFIX}{i}", queues, node_dir))
    except BaseException:
        for p in reversed(done):
            close_fds(p)
        _unplumb_here([p.record() for p in done])
        raise
    return done


def _netlink_error(what: str, exc: Exception) -> NetworkError:
    code = getattr(exc, "code", None)
    why = os.strerror(code) if isinstance(code, int) else str(exc)
    return NetworkError(f"{what}: {why}")


def _open_tap(name: str, queues: int) -> list[int]:
    flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR | (_IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise NetworkError(f"tap {name}: {exc.strerror}") from None
    return fds


def _bring_up(ipr: Any, ep: Endpoint, device: str, what: str) -> int:
    """``device`` (cocoon's tap or macvtap for ``ep``) up with the interface's MTU, and the
    interface up; the device's ifindex."""
    idx = int(ipr.link_lookup(ifname=device)[0])
    try:
        ipr.link("set", index=idx, mtu=ep.mtu, state="up")
    except Exception as exc:
        raise _netlink_error(f"{ep.name}: MTU {ep.mtu} on its {what}", exc) from None
    ipr.link("set", index=ep.index, state="up")
    return idx


def _tcfilter(ipr: Any, ep: Endpoint, tap: str, queues: int) -> Plumbed:
    fds = _open_tap(tap, queues)
    p = Plumbed(ep, "tcfilter", tap, fds)
    try:
        tidx = _bring_up(ipr, ep, tap, "tap")
        for src, dst in ((ep.index, tidx), (tidx, ep.index)):
            try:
                ipr.tc("add", "ingress", index=src)
                ipr.tc(
                    "add-filter",
                    "u32",
                    index=src,
                    parent=_INGRESS,
                    protocol=_ETH_P_ALL,
                    target=0x1,  # pyroute2 wants one; an ingress qdisc ignores it
                    keys=["0x0/0x0+0"],
                    action=[
                        {
                            "kind": "mirred",
                            "direction": "egress",
                            "action": "redirect",
                            "ifindex": dst,
                        }
                    ],
                )
            except Exception as exc:
                if src == ep.index and getattr(exc, "code", 0) == errno.EEXIST:
                    raise NetworkError(
                        f"{ep.name}: it already has an ingress qdisc (another runtime's?)"
                    ) from None
                raise _netlink_error(f"{ep.name}: tc redirect", exc) from None
    except BaseException:
        close_fds(p)
        _undo_one(ipr, p.record())
        raise
    return p


def _local_mac() -> str:
    b = [random.randrange(256) for _ in range(6)]
    b[0] = (b[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{x:02x}" for x in b)


def _macvtap(ipr: Any, ep: Endpoint, name: str, queues: int, node_dir: Path) -> Plumbed:
    p = Plumbed(ep, "macvtap", name)
    try:
        try:
            ipr.link("set", index=ep.index, address=_local_mac())
            ipr.link(
                "add",
                ifname=name,
                kind="macvtap",
                link=ep.index,
                macvtap_mode="bridge",
                address=ep.mac,
            )
        except Exception as exc:
            raise _netlink_error(f"{ep.name}: macvtap", exc) from None
        midx = _bring_up(ipr, ep, name, "macvtap")
        for a in ep.addresses:
            with contextlib.suppress(Exception):
                ipr.addr("del", index=ep.index, address=a.address, prefixlen=a.prefix)
        p.fds = _open_macvtap(name, midx, queues, node_dir)
    except BaseException:
        close_fds(p)
        _undo_one(ipr, p.record())
        raise
    return p


def _macvtap_devnum(name: str, idx: int) -> tuple[int, int]:
    """The macvtap's char device number, from a sysfs mounted for this namespace (the
    host's /sys shows the host's). Runs in a thread of its own that unshares its mounts."""
    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise NetworkError(f"macvtap {name}: unshare: {os.strerror(ctypes.get_errno())}")
    if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise NetworkError(f"macvtap {name}: mount: {os.strerror(ctypes.get_errno())}")
    d = tempfile.mkdtemp(prefix="cocoon-sysfs-")
    try:
        if _libc.mount(b"sysfs", d.encode(), b"sysfs", 0, None) != 0:
            raise NetworkError(f"macvtap {name}: sysfs: {os.strerror(ctypes.get_errno())}")
        try:
            text = Path(f"{d}/class/net/{name}/macvtap/tap{idx}/dev").read_text()
        finally:
            _libc.umount2(d.encode(), _MNT_DETACH)
    finally:
        os.rmdir(d)
    major, minor = text.strip().split(":")
    return int(major), int(minor)


def _open_macvtap(name: str, idx: int, queues: int, node_dir: Path) -> list[int]:
    # The mount-namespace change must not outlive the read: in_netns' thread is fresh, but
    # it goes on with pyroute2, so the read gets a thread of its own (joining the same netns
    # by /proc/self/task/<tid>/ns/net of the current thread).
    here = f"/proc/self/task/{threading.get_native_id()}/ns/net"
    major, minor = in_netns(here, lambda: _macvtap_devnum(name, idx))
    node = node_dir / f"tap-{name}-{idx}"
    with contextlib.suppress(FileNotFoundError):
        node.unlink()
    os.mknod(node, 0o600 | 0o020000, os.makedev(major, minor))
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(os.open(node, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise NetworkError(f"macvtap {name}: {exc.strerror}") from None
    finally:
        node.unlink()
    return fds


def close_fds(p: Plumbed) -> None:
    for fd in p.fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    p.fds = []


# --------------------------------------------------------------------------- unplumb
def unplumb(netns: str, records: list[dict[str, Any]]) -> None:
    """Removes what ``plumb`` made, from its records. A namespace that is gone took it all
    with it; a device already gone is fine."""
    if not records or not os.path.exists(netns):
        return
    with contextlib.suppress(NetworkError):
        in_netns(netns, lambda: _unplumb_here(records))


def save_record(path: Path, netns: str, plumbed: list[Plumbed]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"netns": netns, "records": [p.record() for p in plumbed]}))
    os.replace(tmp, path)


def unplumb_recorded(path: Path) -> None:
    """``unplumb`` from a saved record, then the record removed."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    unplumb(rec.get("netns", ""), rec.get("records", []))
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _unplumb_here(records: list[dict[str, Any]]) -> None:
    with _ipr() as ipr:
        for rec in reversed(records):
            _undo_one(ipr, rec)


def _undo_one(ipr: Any, rec: dict[str, Any]) -> None:
    if rec["model"] == "tap":
        return  # the taps were the namespace's own
    ep = Endpoint.from_dict(rec["endpoint"])
    try:
        alive = any(str(x.get("IFLA_IFNAME")) == ep.name for x in ipr.get_links(ep.index))
    except Exception:
        alive = False
    for idx in ipr.link_lookup(ifname=rec["device"]):
        with contextlib.suppress(Exception):
            ipr.link("del", index=idx)
    if not alive:
        return
    if rec["model"] == "tcfilter":
        with contextlib.suppress(Exception):
            ipr.tc("del", "ingress", index=ep.index)
    elif rec["model"] == "macvtap":  # the interface's own MAC (the guest NIC's meanwhile)
        with contextlib.suppress(Exception):
            ipr.link("set", index=ep.index, address=ep.mac)
        for a in ep.addresses:
            fam = socket.AF_INET6 if a.family == 6 else socket.AF_INET
            with contextlib.suppress(Exception):
                ipr.addr(
                    "add", index=ep.index, address=a.address, prefixlen=a.prefix, family=fam,
                    **({"flags": _IFA_F_NODAD} if a.family == 6 else {}),
                )  # fmt: skip
        for r in ep.routes:
            kw: dict[str, Any] = {
                "oif": ep.index,
                "family": socket.AF_INET6 if r.family == 6 else socket.AF_INET,
            }
            if r.dest:
                kw |= {"dst": r.dest, "dst_len": r.prefix}
            if r.gateway:
                kw["gateway"] = r.gateway
            with contextlib.suppress(Exception):
                ipr.route("replace", **kw)


def leftovers(netns: str) -> list[str]:
    """What of cocoon's is in the namespace: its devices, ingress qdiscs (for tests)."""

    def look() -> list[str]:
        out = []
        with _ipr() as ipr:
            for link in ipr.get_links():
                name = str(link.get("IFLA_IFNAME"))
                if name.startswith((TAP_PREFIX, MACVTAP_PREFIX)):
                    out.append(f"link {name}")
            for q in ipr.get_qdiscs():
                if q.get("TCA_KIND") == "ingress":
                    out.append(f"ingress qdisc on ifindex {q['index']}")
        return out

    return in_netns(netns, look)
