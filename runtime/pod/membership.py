"""Which sandbox (VM) a container belongs to, read from its annotations, and how the host
namespace paths of a pod's container map to its sandbox container's namespaces in the guest.

The callers mark a Kubernetes pod the same way runc sees it: the pod's sandbox ("pause" or
"infra") container and then each application container, which names the sandbox by id.
containerd's CRI plugin writes ``io.kubernetes.cri.container-type`` (``sandbox`` /
``container``) and ``io.kubernetes.cri.sandbox-id``; CRI-O and podman pods write
``io.kubernetes.cri-o.ContainerType`` and ``io.kubernetes.cri-o.SandboxID``; dockershim wrote
``io.kubernetes.docker.type`` (``podsandbox`` / ``container``) and
``io.kubernetes.sandbox.id``. A sandbox container boots the pod's VM; a container joins the VM
of the sandbox it names; a container with no such annotation gets a VM of its own (docker,
plain podman, ctr).

An application container's spec points its shared namespaces at the sandbox on the host: at
``/proc/<sandbox pid>/ns/<kind>`` (containerd; the sandbox pid is the one the runtime wrote
in the sandbox's --pid-file, cocoon's shim) or at the same pinned paths the sandbox's own spec
had (CRI-O's pinns). ``guest_namespaces`` turns each such path into the marker the guest agent
resolves to the sandbox container's own namespace in the guest; a path that is neither is an
error (it points at no sandbox cocoon knows).

May import: the standard library, cocoon.runtime.errors, cocoon.runtime.container.{ids, spec}.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cocoon.runtime.container.ids import validate_id
from cocoon.runtime.container.spec import NS_FILES
from cocoon.runtime.errors import SpecError

# (type annotation, sandbox value, container value, sandbox-id annotation), by caller
_SCHEMES = (
    ("io.kubernetes.cri.container-type", "sandbox", "container", "io.kubernetes.cri.sandbox-id"),
    ("io.kubernetes.cri-o.ContainerType", "sandbox", "container", "io.kubernetes.cri-o.SandboxID"),
    ("io.kubernetes.docker.type", "podsandbox", "container", "io.kubernetes.sandbox.id"),
)
# What the guest agent resolves: GUEST_MARKER<id>/ns/<file> is /proc/<pid>/ns/<file> of
# container <id>'s init process in the guest.
GUEST_MARKER = "cocoon:container/"
POD_SHM = "/run/cocoon/shm"  # the guest's directory of pods' /dev/shm tmpfs mounts
_PROC_NS = re.compile(r"^/proc/(\d+)/ns/([a-z_]+)$")


class Role(enum.Enum):
    ALONE = "alone"  # no pod annotation: a VM of its own
    SANDBOX = "sandbox"  # a pod's sandbox container: boots the pod's VM
    MEMBER = "member"  # a pod's container: joins its sandbox's VM


@dataclass(frozen=True)
class Membership:
    role: Role
    sandbox_id: str = ""  # for a MEMBER: the sandbox container it joins


def membership(cid: str, annotations: Mapping[str, str]) -> Membership:
    """The container's place in a pod, from the first caller scheme its annotations use."""
    for type_key, sandbox_value, member_value, id_key in _SCHEMES:
        kind = annotations.get(type_key)
        if kind is None:
            continue
        if kind == sandbox_value:
            return Membership(Role.SANDBOX)
        if kind != member_value:
            raise SpecError(
                f"annotation {type_key}={kind[:80]!r}: expected {sandbox_value!r} or"
                f" {member_value!r}"
            )
        sid = annotations.get(id_key, "")
        if not sid:
            raise SpecError(f"container {cid} is a pod's container but has no {id_key} annotation")
        validate_id(sid, "sandbox")
        if sid == cid:
            raise SpecError(f"container {cid} names itself as its sandbox ({id_key})")
        return Membership(Role.MEMBER, sid)
    return Membership(Role.ALONE)


def shm_source(sandbox_id: str) -> str:
    """Where the containers of pod ``sandbox_id`` bind /dev/shm from in the guest: one tmpfs
    the agent mounts for the pod (a bind from a container's own mount namespace is refused)."""
    return f"{POD_SHM}/{sandbox_id}"


def sandbox_ns_paths(namespaces: list[dict[str, object]]) -> dict[str, str]:
    """A sandbox spec's namespace paths by type (the pinned paths its members may repeat)."""
    return {str(ns["type"]): str(ns["path"]) for ns in namespaces if ns.get("path")}


def guest_namespaces(
    cid: str,
    namespaces: list[dict[str, object]],
    sandbox_id: str,
    sandbox_pid: int,
    sandbox_paths: Mapping[str, str],
) -> list[dict[str, object]]:
    """A member's namespaces for the guest: each host path that is the sandbox's becomes the
    marker of the sandbox container's namespace in the guest; no path, a new namespace."""
    out: list[dict[str, object]] = []
    for ns in namespaces:
        kind, path = str(ns.get("type")), str(ns.get("path") or "")
        if kind not in NS_FILES:
            raise SpecError(f"container {cid}: unknown namespace type {kind[:80]!r}")
        if not path:
            out.append({"type": kind})
            continue
        m = _PROC_NS.match(path)
        ours = m is not None and int(m.group(1)) == sandbox_pid and m.group(2) == NS_FILES.get(kind)
        if not ours and sandbox_paths.get(kind) != path:
            raise SpecError(
                f"container {cid}: its {kind} namespace {path[:200]!r} is not its sandbox"
                f" {sandbox_id}'s"
            )
        out.append({"type": kind, "path": f"{GUEST_MARKER}{sandbox_id}/ns/{NS_FILES[kind]}"})
    return out
