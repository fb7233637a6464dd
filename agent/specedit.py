"""The guest's own edits to a container's OCI spec before crun sees it, as pure functions.

The host already rewrote the spec for the guest (cocoon.runtime.container.spec.guest_spec:
rootfs and volume paths under the shared directory, namespaces without host paths, the
cgroup path, block-volume sources). What only the guest knows is added here:

- a hot-plugged block device gets the guest's major:minor (the host wrote its own), and the
  device cgroup allows it, so crun can make the node (``bind_device``);
- a mount whose source is a guest block device (a hot-plugged volume) is allowed in the device
  cgroup, or the kernel refuses the mount with EPERM (``device_mount_sources`` lists them,
  ``allow_block_device`` allows one);
- a container that shares the guest's network namespace has its ``net.*`` sysctls taken out
  of the spec, for the agent to set on the guest: crun only sets sysctls in a namespace it
  makes (``take_guest_net_sysctls``);
- a pod's container joins namespaces of its sandbox container: the host writes each as
  ``cocoon:container/<id>/ns/<file>`` (it cannot know guest pids), and it becomes the
  ``/proc/<pid>/ns/<file>`` of that container's init in the guest (``join_container_namespaces``);
- a pod's containers bind /dev/shm from one tmpfs of the guest's, ``/run/cocoon/shm/<pod>``
  (``pod_shm_dirs`` lists the ones a spec uses, for the agent to mount first).

Each function edits the parsed spec it is given (the agent's own copy, about to become the
bundle's config.json) and does nothing else: no file, no stat, no syscall. What the guest has
to look up (a device's numbers) comes in as arguments; ``containers`` does the lookups and
the writes. A spec that is not shaped as OCI says raises ContainerError(INVALID).

May import: the standard library, cocoon.agent.errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cocoon.agent.errors import ContainerError, ErrorKind

Spec = dict[str, Any]
CONTAINER_NS = "cocoon:container/"  # the host's marker: another container's namespace
POD_SHM = "/run/cocoon/shm"  # a pod's /dev/shm in the guest, one tmpfs per pod


def parse(data: bytes, what: str) -> Spec:
    """``data`` as a JSON object; ``what`` names it in the error (``container c1: spec``)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ContainerError(ErrorKind.INVALID, f"{what} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ContainerError(ErrorKind.INVALID, f"{what} is not a JSON object")
    return doc


def section(doc: Spec, key: str, where: str = "") -> Spec:
    """``doc[key]`` as an object: {} when absent or null (not stored), else it must be one;
    ``where`` names it in the error (default: ``key``)."""
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ContainerError(ErrorKind.INVALID, f"spec: {where or key} is not an object")
    return value


def _obj(doc: Spec, key: str, where: str) -> Spec:
    """``doc[key]`` as an object, made (and stored) when absent or null."""
    if doc.get(key) is None:
        doc[key] = {}
    return section(doc, key, where)


def _list(doc: Spec, key: str, where: str) -> list[Any]:
    """``doc[key]`` as a list, made (and stored) when absent or null."""
    value = doc.get(key)
    if value is None:
        value = doc[key] = []
    if not isinstance(value, list):
        raise ContainerError(ErrorKind.INVALID, f"spec: {where} is not a list")
    return value


def own_netns(spec: Spec) -> bool:
    """Whether crun makes the container a network namespace of its own in the guest."""
    namespaces = section(spec, "linux").get("namespaces") or []
    return any(isinstance(ns, dict) and ns.get("type") == "network" for ns in namespaces)


def bind_device(spec: Spec, container_path: str, major: int, minor: int) -> None:
    """Points the spec's device ``container_path`` at the guest's block device major:minor
    (adding the device when the spec lacks it) and allows it in the device cgroup."""
    devices = _list(_obj(spec, "linux", "linux"), "devices", "linux.devices")
    entry = next(
        (d for d in devices if isinstance(d, dict) and d.get("path") == container_path), None
    )
    if entry is None:
        entry = {"path": container_path, "type": "b"}
        devices.append(entry)
    entry.update(type="b", major=major, minor=minor)
    entry.setdefault("fileMode", 0o660)
    allow_block_device(spec, major, minor)


def allow_block_device(spec: Spec, major: int, minor: int) -> None:
    """Adds a device-cgroup rule allowing the block device major:minor (rwm)."""
    resources = _obj(_obj(spec, "linux", "linux"), "resources", "linux.resources")
    rules = _list(resources, "devices", "linux.resources.devices")
    rules.append({"allow": True, "type": "b", "major": major, "minor": minor, "access": "rwm"})


def device_mount_sources(spec: Spec) -> list[str]:
    """The sources of the spec's mounts that are nodes under /dev (maybe block devices)."""
    return [
        m["source"]
        for m in spec.get("mounts") or []
        if isinstance(m, dict)
        and isinstance(m.get("source"), str)
        and m["source"].startswith("/dev/")
    ]


def take_guest_net_sysctls(spec: Spec) -> dict[str, str]:
    """Takes the ``net.*`` sysctls out of a spec that shares the guest's network namespace
    and returns them (key -> value as a string); with a namespace of its own, crun sets them
    there and nothing is taken. Every key is checked before any is taken."""
    if own_netns(spec):
        return {}
    sysctl = section(section(spec, "linux"), "sysctl", "linux.sysctl")
    keys = [k for k in sysctl if k.startswith("net.")]
    for key in keys:
        if ".." in key or "/" in key or "\0" in key:
            raise ContainerError(ErrorKind.INVALID, f"sysctl {key!r}: not a sysctl name")
    return {key: str(sysctl.pop(key)) for key in keys}


def join_container_namespaces(spec: Spec, init_pid: Callable[[str], int]) -> None:
    """Each namespace path ``cocoon:container/<id>/ns/<file>`` becomes ``/proc/<pid>/ns/<file>``,
    ``pid`` being ``init_pid(<id>)`` (which raises if there is no such container)."""
    for i, ns in enumerate(_list(section(spec, "linux"), "namespaces", "linux.namespaces")):
        path = ns.get("path") if isinstance(ns, dict) else None
        if not isinstance(path, str) or not path.startswith(CONTAINER_NS):
            continue
        other, _, rest = path[len(CONTAINER_NS) :].partition("/")
        file = rest.removeprefix("ns/")
        if not other or rest == file or file in ("", ".", "..") or "/" in file:
            raise ContainerError(
                ErrorKind.INVALID, f"spec: linux.namespaces[{i}].path {path!r} is malformed"
            )
        ns["path"] = f"/proc/{init_pid(other)}/ns/{file}"


def pod_shm_dirs(spec: Spec) -> list[str]:
    """The pod /dev/shm directories (``POD_SHM/<sandbox id>``) the spec binds: each must be a
    tmpfs of the guest's before crun runs (the pod's containers share it)."""
    out = []
    for i, m in enumerate(spec.get("mounts") or []):
        source = m.get("source") if isinstance(m, dict) else None
        if not isinstance(source, str) or not source.startswith(POD_SHM + "/"):
            continue
        name = source[len(POD_SHM) + 1 :]
        if name in ("", ".", "..") or "/" in name:
            raise ContainerError(
                ErrorKind.INVALID, f"spec: mounts[{i}].source {source!r} is malformed"
            )
        out.append(source)
    return out
