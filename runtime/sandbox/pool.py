"""The pool of pre-booted sandboxes (``[factory] pool_size``): claim, fill, drain, status.

A pooled VM is an ordinary sandbox state directory, ``<root>/pool/<vmid>/``, under its own
monitor (no daemon): booted at the default size, agent answering, no network, an empty share,
its processes in the host cgroup ``/cocoon-pool/cocoon-sandbox-<vmid>`` at nice 10. Its launch
file carries ``pool_key``, a hash of everything the VM was booted from (QEMU's argv with the
sandbox's own paths left out, the guest files, the launch settings): a VM whose key is not the
current configuration's is never handed out, and the next fill replaces it. Once the agent
answers, the fill runs one throwaway container in the VM (``warm``, container.warm: so that a
claim's container is not the VM's first) and only then writes the ``ready`` marker; a VM that
fails its warm-up is destroyed.

``claim`` (``create``, through ``start``) takes the oldest ready VM whose key matches by renaming
its ``ready`` marker to ``claimed``: a rename succeeds for one caller only, so concurrent
creates never get the same VM, and nothing waits for a fill. It then links
``<root>/sandboxes/<name>`` to the VM's directory and asks the monitor to ``Claim`` it (the
sandbox's id, host cgroup, nice level, log). A VM that died, or whose monitor refuses, is
destroyed and the next one is tried; with none left the sandbox boots cold. ``start`` then
spawns ``cocoon pool fill`` in the background (detached, its own session, no inherited fds,
at nice +10 from its first instruction), held back until the claimer exits, or for at most
``FILL_HOLD_S`` (a foreground ``run`` lives as long as its container): on a small host the
fill's interpreter and its QEMU's boot would otherwise share the cores with the claimer while
it creates, starts and (for a short ``run``) deletes its container. The fill boots
replacements one at a time under ``<root>/pool/fill.lock``. Holding that lock, a fill also
clears what is stale: entries whose monitor is gone, corrupt entries, VMs booted from another
configuration, half-booted entries of a fill that died, and VMs claimed by a process that
died before their monitor claimed them (with the sandbox name such a process linked;
``delete --force`` of that name removes both too).

May import: the standard library, cocoon.runtime.{config, errors, faults, pids,
monitor.{hostcgroup, launch}}, cocoon.runtime.sandbox.{client, launcher, paths, template}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cocoon.runtime import config as config_mod
from cocoon.runtime import faults
from cocoon.runtime.errors import CocoonError, HostError, SandboxError, StateError
from cocoon.runtime.monitor import hostcgroup
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.pids import pid_alive
from cocoon.runtime.sandbox import client as client_mod
from cocoon.runtime.sandbox import launcher, paths, template

log = logging.getLogger("cocoon")

POOL_CGROUP = "/cocoon-pool"  # pooled VMs' host cgroups are made below it
POOL_NICE = 10  # a fill's boots yield to running sandboxes; a claim restores the claimer's
QEMU_OVERHEAD_MIB = 64  # QEMU, the monitor and virtiofsd of an idle VM, beyond guest RAM
LOCK = "fill.lock"
FILL_CONFIG = "fill.toml"
FILL_LOG = "fill.log"
FILL_HOLD_S = 2  # the longest a claimer holds its refill back
# The write ends of the pipes that hold this process's spawned fills back (spawn_fill), with
# when their hold ends: kept open until then (closed by a later spawn) or this process's end.
_held_fills: list[tuple[float, int]] = []
DRAINED = "drained"  # touched by drain: fills asked for before it do nothing

Warm = Callable[[Path], None]  # runs a throwaway container in a booted VM (container.warm)


def pool_root(root: Path) -> Path:
    return root.absolute() / "pool"


@dataclass(frozen=True)
class Entry:
    vmid: str
    dir: Path
    state: str  # "ready", "claimed", "booting", "dead", "corrupt"
    key: str = ""
    sandbox_id: str = ""  # the claimer's sandbox, once claimed
    monitor_pid: int = 0
    since: float = 0.0  # when it reached its state


def entries(root: Path) -> list[Entry]:
    """Every pooled VM directory, oldest first."""
    out = []
    base = pool_root(root)
    for d in sorted(base.iterdir()) if base.is_dir() else ():
        if d.is_dir() and not d.is_symlink():
            out.append(_entry(d))
    return sorted(out, key=lambda e: (e.since, e.vmid))


def _entry(d: Path) -> Entry:
    try:
        spec = L.LaunchSpec.read(d / L.LAUNCH_FILE)
    except (OSError, ValueError, TypeError, KeyError):
        return Entry(d.name, d, "corrupt", since=_mtime(d))
    mpid = _int_in(d / L.MONITOR_PID)
    if not mpid:  # a fill is booting it (or died doing so: a fill holding the lock decides)
        return Entry(d.name, d, "booting", spec.pool_key, since=_mtime(d))
    if launcher.our_monitor(d) != mpid:  # gone, or a reboot's leftover naming another process
        return Entry(d.name, d, "dead", spec.pool_key, "", mpid, _mtime(d))
    if (d / L.POOL_READY).exists():
        return Entry(d.name, d, "ready", spec.pool_key, "", mpid, _mtime(d / L.POOL_READY))
    if (d / L.POOL_CLAIMED).exists():
        sid = spec.sandbox_id if spec.alias else ""
        return Entry(d.name, d, "claimed", spec.pool_key, sid, mpid, _mtime(d / L.POOL_CLAIMED))
    return Entry(d.name, d, "booting", spec.pool_key, "", mpid, _mtime(d))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _int_in(p: Path) -> int | None:
    try:
        return int(p.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def key(cfg: config_mod.Config, host: launcher.HostFacts) -> str:
    """What a pooled VM was booted from: QEMU's argv and the launch settings with the
    sandbox's own names left out, the guest files as they are on disk, and whether it was
    restored from a template."""
    return launcher.boot_key(cfg, host, Path("/pool"), "pool", {"template": cfg.factory.template})


def vm_cost_mib(cfg: config_mod.Config, accel: str) -> int:
    """Host memory an idle pooled VM may take: its boot RAM, TCG's translation cache, and
    QEMU's, the monitor's and virtiofsd's own."""
    tb = cfg.hypervisor.tcg_tb_size_mib if accel == "tcg" else 0
    return cfg.hypervisor.default_memory_mib + tb + QEMU_OVERHEAD_MIB


def check_size(cfg: config_mod.Config, accel: str, host_mib: int | None = None) -> None:
    """A pool may hold at most half of the host's RAM: the rest is for the workloads."""
    size = cfg.factory.pool_size
    host_mib = host_mib if host_mib is not None else launcher.host_memory_mib()
    cost = vm_cost_mib(cfg, accel)
    allowed = host_mib // 2
    if size * cost > allowed:
        raise HostError(
            f"factory.pool_size = {size} asks for {size} idle VMs of ~{cost} MiB = "
            f"{size * cost} MiB; this host has {host_mib} MiB and a pool may take at most half "
            f"({allowed} MiB): set pool_size to {allowed // cost} or less"
        )


# ---------------------------------------------------------------------- claim
def start(
    cfg: config_mod.Config,
    root: Path,
    sandbox_id: str,
    *,
    log_file: Path | None = None,
    log_format: str = "text",
    debug: bool = False,
    cgroups_path: str = "",
) -> launcher.Sandbox:
    """The sandbox from the pool when it has a VM to give, else booted; with a pool
    configured, a background fill replaces what was taken."""
    host = None
    if cfg.factory.pool_size:
        host = launcher.host_facts(cfg)
        try:
            sb = claim(cfg, root, sandbox_id, host, log_file, log_format, debug, cgroups_path)
        finally:
            spawn_fill(cfg, root, held=True)
        if sb is not None:
            return sb
    tpl = None
    if cfg.factory.template:
        host = host or launcher.host_facts(cfg)
        tpl = template.ensure(cfg, root, host)
    sb = launcher.start(
        cfg,
        root,
        sandbox_id,
        log_file=log_file,
        log_format=log_format,
        debug=debug,
        cgroups_path=cgroups_path,
        host=host,
        template=tpl,
    )
    if sb.restore_failure:
        log.warning(
            "sandbox %s: the restore from template %s failed (%s): it was booted cold",
            sandbox_id,
            tpl.name if tpl else "?",
            sb.restore_failure,
        )
    return sb


def claim(
    cfg: config_mod.Config,
    root: Path,
    sandbox_id: str,
    host: launcher.HostFacts,
    log_file: Path | None = None,
    log_format: str = "text",
    debug: bool = False,
    cgroups_path: str = "",
) -> launcher.Sandbox | None:
    """A ready pooled VM made ``sandbox_id``'s, or None when there is none to take."""
    want = key(cfg, host)
    link = paths.sandbox_path(root, sandbox_id)
    for e in entries(root):
        if e.state != "ready" or e.key != want or not take(e.dir):
            continue
        link.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        L.drop_dangling(link)  # a claimed VM's link left by a crash
        try:
            os.symlink(e.dir, link)
        except FileExistsError:
            give_back(e.dir)
            raise StateError(f"sandbox {sandbox_id} already exists ({link})") from None
        faults.point("create:claiming", e.dir)
        try:
            _specialise(cfg, e, link, sandbox_id, log_file, log_format, debug, cgroups_path)
        except (CocoonError, OSError, client_mod.CallError) as exc:
            detail = exc.details if isinstance(exc, client_mod.CallError) else str(exc)
            log.warning("pooled VM %s could not be claimed (%s): trying another", e.vmid, detail)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            destroy(e.dir)
            continue
        return launcher.Sandbox(sandbox_id, e.dir, e.monitor_pid, 0.0, host.accel, None, True)
    return None


def take(d: Path) -> bool:
    """The atomic step of a claim: ``ready`` renamed to ``claimed`` (one caller wins), which
    then records the claimer's pid."""
    try:
        os.rename(d / L.POOL_READY, d / L.POOL_CLAIMED)
    except FileNotFoundError:
        return False
    (d / L.POOL_CLAIMED).write_text(f"{os.getpid()}\n")
    return True


def give_back(d: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rename(d / L.POOL_CLAIMED, d / L.POOL_READY)


def _specialise(
    cfg: config_mod.Config,
    e: Entry,
    link: Path,
    sandbox_id: str,
    log_file: Path | None,
    log_format: str,
    debug: bool,
    cgroups_path: str,
) -> None:
    try:
        hc = hostcgroup.make(cgroups_path, sandbox_id)
    except hostcgroup.CgroupError as exc:
        raise HostError(str(exc)) from None
    cg = hc if hc.join else hostcgroup.here()
    try:
        with client_mod.Client(e.dir, cfg.agent.request_timeout_s) as c:
            c.vm.Claim(
                {
                    "sandbox_id": sandbox_id,
                    "alias": str(link),
                    "cgroup_json": json.dumps(dataclasses.asdict(cg)),
                    "log_file": str(log_file) if log_file else "",
                    "log_format": log_format,
                    "debug": debug,
                    "nice": os.getpriority(os.PRIO_PROCESS, 0),
                },
                timeout=30,
            )
    except BaseException:
        hostcgroup.remove(hc)
        raise
    log.info("sandbox %s: pooled VM %s claimed", sandbox_id, e.vmid)


def destroy(d: Path) -> None:
    """A pooled VM stopped and its directory removed, however far it got, and any sandbox name
    still linked to it (a claimer that died between linking it and its monitor's Claim: the
    monitor never learnt the name, so it does not remove it)."""
    with contextlib.suppress(CocoonError, OSError):
        launcher.stop_dir(d, 5.0)  # forces what an orderly stop leaves
    root = d.parent.parent  # d is pool_root(root) / vmid
    with contextlib.suppress(OSError):
        for link in paths.sandboxes_dir(root).iterdir():
            if link.is_symlink() and os.readlink(link) == str(d):
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()


# ---------------------------------------------------------------------- fill
@contextlib.contextmanager
def locked(root: Path, wait: bool) -> Iterator[bool]:
    """The pool's fill lock (yields False when another fill holds it and ``wait`` is off)."""
    base = pool_root(root)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(base / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def stale(e: Entry, want: str) -> str:
    """Why a fill (holding the lock) removes this entry, or ""."""
    if e.state in ("dead", "corrupt"):
        return e.state
    if e.state == "booting":
        return "half-booted by a fill that is gone"
    if e.state == "ready" and e.key != want:
        return "booted from another configuration or image"
    if e.state == "claimed" and not e.sandbox_id:
        claimer = _int_in(e.dir / L.POOL_CLAIMED)
        if claimer and not pid_alive(claimer) and time.time() - e.since > 5:
            return f"claimed by process {claimer}, which died before using it"
    return ""


def fill(
    cfg: config_mod.Config,
    root: Path,
    *,
    wait: bool = True,
    spawned_at: float = 0.0,
    warm: Warm | None = None,
) -> dict[str, int]:
    """Clears what is stale, trims what is over ``pool_size``, boots what is missing (one at a
    time, counting again after each boot: creates claim meanwhile), each VM warmed by ``warm``
    before it is marked ready. A fill spawned before the last drain does nothing. Returns
    counts: removed, booted, ready, failed."""
    counts = {"removed": 0, "booted": 0, "ready": 0, "failed": 0}
    with locked(root, wait) as got:
        if not got:
            log.info("pool: another fill is running")
            return counts
        if spawned_at and _mtime(pool_root(root) / DRAINED) >= spawned_at:
            log.info("pool: drained since this fill was asked for")
            return counts
        host = launcher.host_facts(cfg)
        check_size(cfg, host.accel)
        want = key(cfg, host)
        # what this fill boots yields to running sandboxes until claimed
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), POOL_NICE))
        for e in entries(root):
            why = stale(e, want)
            if why:
                log.info("pool: removing VM %s (%s)", e.vmid, why)
                destroy(e.dir)
                counts["removed"] += 1
        while True:
            ready = [e for e in entries(root) if e.state == "ready" and e.key == want]
            counts["ready"] = len(ready)
            if len(ready) > cfg.factory.pool_size:  # made smaller: the newest go
                for e in ready[cfg.factory.pool_size :]:
                    if take(e.dir):
                        destroy(e.dir)
                        counts["removed"] += 1
                continue
            if len(ready) == cfg.factory.pool_size or not _room_for_one(cfg, host.accel):
                break
            try:
                boot_one(cfg, root, host, want, warm)
            except CocoonError as exc:
                log.error("pool: booting a VM failed: %s", exc)
                counts["failed"] += 1
                break
            counts["booted"] += 1
    return counts


def _room_for_one(cfg: config_mod.Config, accel: str) -> bool:
    avail = launcher.meminfo_mib("MemAvailable", 0)
    need = vm_cost_mib(cfg, accel) + 512  # and some left for everything else
    if avail < need:
        log.warning("pool: %d MiB available, a pooled VM needs ~%d: not booting more", avail, need)
        return False
    return True


def boot_one(
    cfg: config_mod.Config,
    root: Path,
    host: launcher.HostFacts,
    want: str,
    warm: Warm | None = None,
) -> launcher.Sandbox:
    """One pooled VM booted, warmed, then marked ready (claimable); one that fails its
    warm-up is destroyed (CocoonError)."""
    vmid = "p-" + secrets.token_hex(6)
    d = pool_root(root) / vmid
    launcher.check_socket_room(d)
    tpl = template.ensure(cfg, root, host) if cfg.factory.template else None
    sb = launcher.boot(
        cfg, d, vmid, host, cgroups_path=f"{POOL_CGROUP}/{vmid}", pool_key=want, template=tpl
    )
    if warm is not None:
        try:
            warm(d)
        except (CocoonError, OSError) as exc:
            destroy(d)
            raise SandboxError(f"pooled VM {vmid} could not run a container: {exc}") from None
    (d / L.POOL_READY).write_text(f"{sb.monitor_pid}\n")
    return sb


def drain(root: Path) -> int:
    """Every pooled VM not claimed by a sandbox stopped; returns how many."""
    n = 0
    with locked(root, True):
        (pool_root(root) / DRAINED).touch()
        for e in entries(root):
            if e.state == "claimed" and e.sandbox_id:
                continue  # a sandbox's VM now
            if e.state == "ready" and not take(e.dir):
                continue  # claimed under our feet
            destroy(e.dir)
            n += 1
    return n


def status(cfg: config_mod.Config, root: Path) -> dict[str, object]:
    es = entries(root)
    return {
        "pool_size": cfg.factory.pool_size,
        "ready": sum(e.state == "ready" for e in es),
        "booting": sum(e.state == "booting" for e in es),
        "claimed": sorted(e.sandbox_id for e in es if e.state == "claimed" and e.sandbox_id),
        "stale": sum(e.state in ("dead", "corrupt") for e in es),
        "vms": [
            {"vmid": e.vmid, "state": e.state, "key": e.key, "sandbox_id": e.sandbox_id} for e in es
        ],
    }


def spawn_fill(cfg: config_mod.Config, root: Path, held: bool = False) -> None:
    """``cocoon pool fill`` in the background with this configuration, detached (its own
    session, stdio on /dev/null, reparented at once): the caller waits for nothing.
    ``held``: the fill's interpreter starts only once this process has ended (a pipe's
    EOF) or after ``FILL_HOLD_S``, so that it does not compete with what the caller does
    next."""
    base = pool_root(root)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = base / FILL_CONFIG
    tmp = conf.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(config_mod.to_toml(cfg))
    tmp.replace(conf)
    argv = [
        sys.executable,
        "-m",
        "cocoon.runtime.cli.main",
        "--root",
        str(root.absolute()),
        "--config",
        str(conf),
        "--log",
        str(base / FILL_LOG),
        "--log-format",
        "json",
        "pool",
        "fill",
        f"--background={time.time()}",
    ]
    env = dict(os.environ, COCOON_CONFIG_DIR=str(base / "no-drop-ins"))
    env.pop("COCOON_CONFIG", None)
    # sh backgrounds the fill and exits: the fill is nobody's child here. It starts at a
    # lower priority at once (not only once its imports are done): its interpreter's start
    # would otherwise take a core from the claim's container while that one starts. Held,
    # the backgrounded shell first waits for the EOF of the pipe on its stdin (taken as fd 3
    # before the `&`, which would give the list /dev/null), for FILL_HOLD_S at most.
    script = f'nice -n {POOL_NICE} "$@" &'
    stdin: int = subprocess.DEVNULL
    if held:
        now = time.monotonic()
        for hold in [h for h in _held_fills if h[0] < now]:  # long since let go
            _held_fills.remove(hold)
            os.close(hold[1])
        stdin, gate = os.pipe()  # both not inheritable: the fill's sh gets stdin only
        _held_fills.append((now + FILL_HOLD_S, gate))
        script = (
            f"exec 3<&0; {{ timeout {FILL_HOLD_S} cat <&3 >/dev/null; exec 3<&-;"
            f' exec nice -n {POOL_NICE} "$@"; }} &'
        )
    try:
        subprocess.run(
            ["/bin/sh", "-c", script, "sh", *argv],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            check=False,
        )
    finally:
        if held:
            os.close(stdin)


def background_fill(
    cfg: config_mod.Config, root: Path, spawned_at: float, warm: Warm | None = None
) -> dict[str, int]:
    """The body of ``pool fill --background=T``: out of the caller's cgroup and niceness
    first, then a fill once the running one (if any) is done, unless a drain came after T."""
    hc = L.HostCgroup()
    with contextlib.suppress(OSError):
        hc = hostcgroup.make(f"{POOL_CGROUP}/fill", f"fill-{os.getpid()}")
        hostcgroup.join(hc, os.getpid())
    try:
        return fill(cfg, root, spawned_at=spawned_at, warm=warm)
    finally:
        hostcgroup.leave(hc, os.getpid())
