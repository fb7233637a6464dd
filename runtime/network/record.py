"""What networking made in a namespace, written down, and how it is undone.

A ``Plumbed`` is one bridged interface; its ``record()`` is JSON-able, so ``unplumb`` works
from a later process too (delete after a crashed monitor): ``save_record`` writes the
sandbox's network.json, ``unplumb_recorded`` undoes it. ``leftovers`` is what of cocoon's is
still in a namespace (for tests and leak checks).

May import: the standard library, cocoon.runtime.errors, cocoon.runtime.network.{netns, scan}.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cocoon.runtime.errors import NetworkError
from cocoon.runtime.network.netns import in_netns, iproute
from cocoon.runtime.network.scan import MACVTAP_PREFIX, TAP_PREFIX, Endpoint

_IFA_F_NODAD = 0x02


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


def close_fds(p: Plumbed) -> None:
    for fd in p.fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    p.fds = []


def unplumb(netns: str, records: list[dict[str, Any]]) -> None:
    """Removes what ``plumb`` made, from its records. A namespace that is gone took it all
    with it; a device already gone is fine."""
    if not records or not os.path.exists(netns):
        return
    with contextlib.suppress(NetworkError):
        in_netns(netns, lambda: unplumb_here(records))


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


def unplumb_here(records: list[dict[str, Any]]) -> None:
    with iproute() as ipr:
        for rec in reversed(records):
            undo_one(ipr, rec)


def undo_one(ipr: Any, rec: dict[str, Any]) -> None:
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
        with iproute() as ipr:
            for link in ipr.get_links():
                name = str(link.get("IFLA_IFNAME"))
                if name.startswith((TAP_PREFIX, MACVTAP_PREFIX)):
                    out.append(f"link {name}")
            for q in ipr.get_qdiscs():
                if q.get("TCA_KIND") == "ingress":
                    out.append(f"ingress qdisc on ifindex {q['index']}")
        return out

    return in_netns(netns, look)
