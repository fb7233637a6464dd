"""The host cgroup a sandbox's processes run in: QEMU, virtiofsd and the monitor itself.

A caller that sizes a pod's cgroup (the kubelet's ``/kubepods/pod<uid>``, with the
RuntimeClass overhead added) expects the VM to be inside it, as Kata's ``sandbox_cgroup_only``
puts it: the pod cgroup is the parent of the sandbox container's ``cgroupsPath``, and the VM's
processes go into ``<pod cgroup>/cocoon-sandbox-<id>``, one unrestricted child made for them
(a child, not the pod cgroup itself: cgroup v2 lets no process live in a cgroup whose
controllers are handed down to children, and the caller's limits hold for every descendant).
A container alone (docker, ctr, podman) is a pod of one: its VM goes under the parent of its
own cgroupsPath the same way. No cgroupsPath: the VM stays where its caller runs.

Every mounted hierarchy gets the same path: each cgroup v1 hierarchy and the v2 one (the
unified mount of a hybrid host, or /sys/fs/cgroup on a v2 host). ``make`` (the launcher, before
the monitor starts) creates what is missing and says what it made; ``join`` (the monitor, first
thing, so QEMU and virtiofsd are born inside) moves the monitor in; ``leave`` (the monitor, last
thing) moves it back where it came from and removes what was made, so the caller's cgroups are
left as it made them; ``remove`` is the launcher's cleanup for a monitor that never got there.

The launcher and the monitor both import it, so it stays standard-library only.

May import: the standard library, cocoon.runtime.monitor.launch.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from pathlib import Path

from cocoon.runtime.monitor.launch import HostCgroup

log = logging.getLogger("cocoon")

LEAF_PREFIX = "cocoon-sandbox-"
# Knobs a new cpuset cgroup (v1) has empty: no process may join it until they are filled.
CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")


class CgroupError(OSError):
    """A cgroup could not be made or joined (the launcher reports it as the create's error)."""


def pod_cgroup(cgroups_path: str) -> str | None:
    """The pod's cgroup, as a path from a hierarchy's root: the parent of ``cgroupsPath``.

    ``/kubepods/pod<uid>/<id>`` -> ``/kubepods/pod<uid>``; the systemd driver's
    ``kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`` -> the slice's path
    (``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice``).
    A relative path is taken from the root, as for runc's cgroupfs driver under a caller that
    runs at the root. None when there is none."""
    if not cgroups_path:
        return None
    parts = cgroups_path.split(":")
    if not cgroups_path.startswith("/") and len(parts) == 3:
        return systemd_slice_path(parts[0]) if parts[0] else "/system.slice"
    if any(p in (".", "..") for p in cgroups_path.split("/")):
        raise CgroupError(f"cgroupsPath {cgroups_path!r}: '.' and '..' are not allowed")
    return os.path.dirname("/" + cgroups_path.strip("/"))


def systemd_slice_path(name: str) -> str:
    """``a-b-c.slice`` -> ``/a.slice/a-b.slice/a-b-c.slice`` (systemd's slice nesting)."""
    if not name.endswith(".slice") or "/" in name:
        raise CgroupError(f"cgroupsPath: {name!r} is not a systemd slice")
    if name == "-.slice":
        return "/"
    stem = name.removesuffix(".slice")
    words = stem.split("-")
    if not all(words):
        raise CgroupError(f"cgroupsPath: {name!r} is not a valid slice name")
    return "/" + "/".join("-".join(words[: i + 1]) + ".slice" for i in range(len(words)))


def hierarchies(proc: Path = Path("/proc/self")) -> list[tuple[Path, str]]:
    """Each mounted cgroup hierarchy once: (its mount point, this process's cgroup in it)."""
    own: list[tuple[set[str], str]] = []
    for line in (proc / "cgroup").read_text().splitlines():
        _num, ctrls, where = line.split(":", 2)
        own.append(({c for c in ctrls.split(",") if c}, where))
    found: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for line in (proc / "mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mount_root, point = fields[3], _unescape(fields[4])
        opts = set(tail[2].split(","))
        # v2: this process's line with no controllers; v1: the one whose controllers it mounts
        mine = [(c, p) for c, p in own if (not c if tail[0] == "cgroup2" else c and c <= opts)]
        if not mine:
            continue
        key = ",".join(sorted(mine[0][0]))
        path = mine[0][1]
        if key in seen:
            continue
        seen.add(key)
        if mount_root != "/" and path.startswith(mount_root):
            path = path[len(mount_root) :] or "/"
        found.append((Path(point), path))
    return found


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def make(cgroups_path: str, sandbox_id: str, proc: Path = Path("/proc/self")) -> HostCgroup:
    """The sandbox's cgroup made in every hierarchy (what was missing), not yet joined."""
    pod = pod_cgroup(cgroups_path)
    if pod is None:
        return HostCgroup()
    rel = Path(pod.lstrip("/")) / f"{LEAF_PREFIX}{sandbox_id}"
    join: list[str] = []
    home: list[str] = []
    made: list[str] = []
    try:
        for point, own in hierarchies(proc):
            target = point / rel
            chain = [p for p in (*reversed(target.parents), target) if _inside(p, point)]
            for d in chain:  # parents first; one that exists is the caller's (or a pod's)
                try:
                    d.mkdir()
                except FileExistsError:
                    if d != target:  # a stale leaf of its own is still made by it
                        continue
                made.append(str(d))
            _fill_cpusets(point, chain)
            join.append(str(target))
            home.append(str(point / own.lstrip("/")))
    except OSError as exc:
        remove(HostCgroup(join, home, made))
        raise CgroupError(f"host cgroup for sandbox {sandbox_id} under {pod}: {exc}") from exc
    return HostCgroup(join, home, made)


def here(proc: Path = Path("/proc/self")) -> HostCgroup:
    """The calling process's own cgroup in every hierarchy, to join; nothing made."""
    own = [str(point / cg.lstrip("/")) for point, cg in hierarchies(proc)]
    return HostCgroup(own, list(own), [])


def members(hc: HostCgroup) -> set[int]:
    """The processes in the sandbox's cgroup, in any hierarchy."""
    pids: set[int] = set()
    for d in hc.join:
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(x) for x in Path(d, "cgroup.procs").read_text().split())
    return pids


def _inside(p: Path, point: Path) -> bool:
    return p != point and point in p.parents


def _fill_cpusets(point: Path, chain: list[Path]) -> None:
    """A v1 cpuset cgroup with no CPUs or memory nodes takes no process: each one on ``chain``
    (below the hierarchy's root, parents first) that is empty takes its parent's, as runc
    does."""
    if (point / "cgroup.controllers").exists():  # v2: an empty cpuset means the parent's
        return
    for d in chain:
        for name in CPUSET_FILES:
            f, up = d / name, d.parent / name
            if up.exists() and (not f.exists() or not f.read_text().strip()):
                f.write_text(up.read_text())


def join(hc: HostCgroup, pid: int) -> None:
    """``pid`` into the sandbox's cgroup of every hierarchy."""
    for d in hc.join:
        try:
            Path(d, "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CgroupError(f"joining host cgroup {d}: {exc}") from exc


def leave(hc: HostCgroup, pid: int) -> None:
    """``pid`` back where it came from, then what ``make`` made removed. Where it came from may
    be gone (conmon's cgroup, removed by CRI-O when conmon died): then its nearest ancestor.
    A hierarchy whose cgroup was not made (a claim into the claimer's own, ``here``) is not
    left: nothing is removed there, and moving a process is a cgroup migration (on cgroup v1
    here the first one costs ~9 ms, an RCU grace period)."""
    for home, joined in zip(hc.home, hc.join, strict=False):
        if joined not in hc.made:
            continue
        for d in (Path(home), *Path(home).parents):
            if (d / "cgroup.procs").is_file() and _write_pid(d, pid):
                break
    remove(hc)


def _write_pid(d: Path, pid: int) -> bool:
    try:
        fd = os.open(d / "cgroup.procs", os.O_WRONLY)  # never O_CREAT: cgroupfs only
    except OSError:
        return False
    try:
        os.write(fd, str(pid).encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove(hc: HostCgroup, settle_s: float = 5.0) -> None:
    """What ``make`` made, deepest first. The sandbox's own cgroup holds nothing but the
    sandbox's processes: any still in it (a virtiofsd still exiting, a QEMU whose monitor was
    SIGKILLed) are killed first, as runc's destroy does, so that it can go. A parent it made
    that now holds another pod's cgroup is left."""
    for d in hc.join:
        if Path(d).name.startswith(LEAF_PREFIX):
            _kill_members(Path(d), settle_s)
    for d in reversed(hc.made):
        deadline = time.monotonic() + (settle_s if d in hc.join else 0)
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as exc:  # EBUSY: an exiting task not yet gone from it
                if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                level = logging.WARNING if d in hc.join else logging.DEBUG
                log.log(level, "host cgroup %s left: %s", d, exc)
                break


def _kill_members(d: Path, settle_s: float) -> None:
    deadline = time.monotonic() + settle_s
    while True:
        try:
            pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        if time.monotonic() > deadline:
            log.warning("host cgroup %s: processes %s did not go", d, pids)
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
