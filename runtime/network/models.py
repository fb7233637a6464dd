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

Every netlink and tc operation goes through pyroute2's synchronous IPRoute, inside the
namespace (network.netns).

May import: the standard library, cocoon.agent.libc, cocoon.runtime.errors,
cocoon.runtime.network.{netns, scan, record}.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

from cocoon.agent import libc
from cocoon.runtime.errors import NetworkError
from cocoon.runtime.network.netns import in_netns, iproute
from cocoon.runtime.network.record import Plumbed, close_fds, undo_one, unplumb_here
from cocoon.runtime.network.scan import BRIDGEABLE, MACVTAP_PREFIX, TAP_PREFIX, Endpoint

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFF_MULTI_QUEUE = 0x0100
_ETH_P_ALL = 0x0003
_INGRESS = 0xFFFF0000


def plumb(
    netns: str, eps: list[Endpoint], model: str, queues: int, node_dir: Path
) -> list[Plumbed]:
    """Bridges every endpoint; all or nothing (a failure undoes what was made)."""
    if model not in BRIDGEABLE:
        raise NetworkError(f"network model {model!r} bridges nothing")
    if not eps:
        return []
    return in_netns(netns, lambda: _plumb_here(eps, model, max(1, queues), node_dir))


def _plumb_here(eps: list[Endpoint], model: str, queues: int, node_dir: Path) -> list[Plumbed]:
    done: list[Plumbed] = []
    try:
        with iproute() as ipr:
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
        unplumb_here([p.record() for p in done])
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
        undo_one(ipr, p.record())
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
        undo_one(ipr, p.record())
        raise
    return p


def _macvtap_devnum(name: str, idx: int) -> tuple[int, int]:
    """The macvtap's char device number, from a sysfs mounted for this namespace (the
    host's /sys shows the host's). Runs in a thread of its own that unshares its mounts."""
    try:
        libc.unshare(libc.CLONE_NEWNS)
        libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)
    except OSError as exc:
        raise NetworkError(f"macvtap {name}: {exc.filename}: {exc.strerror}") from None
    d = tempfile.mkdtemp(prefix="cocoon-sysfs-")
    try:
        try:
            libc.mount("sysfs", d, "sysfs", 0)
        except OSError as exc:
            raise NetworkError(f"macvtap {name}: sysfs: {exc.strerror}") from None
        try:
            text = Path(f"{d}/class/net/{name}/macvtap/tap{idx}/dev").read_text()
        finally:
            with contextlib.suppress(OSError):
                libc.umount2(d, libc.MNT_DETACH)
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
