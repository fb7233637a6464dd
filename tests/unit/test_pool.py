"""The pool's bookkeeping without VMs (cocoon.runtime.sandbox.pool): the atomic claim step
under a race of processes, what state each kind of entry directory is in, which entries a fill
removes, the pool's key, and the host-memory ceiling."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.config import Config, FactoryConfig, HypervisorConfig
from cocoon.runtime.errors import HostError, SandboxError
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.sandbox import launcher, pool
from tests.unit.fakes import launch_spec

MONITORS: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _stop_fake_monitors() -> Iterator[None]:
    yield
    while MONITORS:
        p = MONITORS.pop()
        p.kill()
        p.wait()


def fake_monitor(d: Path) -> int:
    """A process whose command line is a monitor's for ``d`` (what launcher.our_monitor
    looks for)."""
    argv = [sys.executable, "-c", "import time; time.sleep(120)", "-m"]
    p = subprocess.Popen([*argv, "cocoon.runtime.monitor.main", "--launch", str(d / L.LAUNCH_FILE)])
    MONITORS.append(p)
    deadline = time.monotonic() + 10  # until its exec: before, its cmdline is still ours
    while b"cocoon.runtime.monitor.main" not in Path(f"/proc/{p.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the fake monitor did not start"
        time.sleep(0.005)
    return p.pid


def entry_dir(root: Path, vmid: str, *, ready: bool = True, monitor_pid: int | None = None) -> Path:
    """A pooled VM's directory as its monitor leaves it (a fake monitor unless told)."""
    d = pool.pool_root(root) / vmid
    d.mkdir(parents=True)
    launch_spec(d, sandbox_id=vmid, pool_key="k1").write(d / L.LAUNCH_FILE)
    (d / L.MONITOR_PID).write_text(f"{monitor_pid or fake_monitor(d)}\n")
    (d / L.MONITOR_SOCK).touch()
    if ready:
        (d / L.POOL_READY).write_text("1\n")
    return d


def _race(dirs: list[str], q: multiprocessing.Queue[tuple[int, list[str]]]) -> None:
    won = [d for d in dirs if pool.take(Path(d))]
    q.put((os.getpid(), won))


def test_concurrent_takes_never_get_the_same_vm(tmp_path: Path) -> None:
    dirs = [str(entry_dir(tmp_path, f"p-{i}")) for i in range(3)]
    # Forked from a fresh server, not from pytest: earlier tests leave gRPC's threads in this
    # process, and a child forked while one held a lock can hang (seen once in CI).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # the server imports this module once
    q: multiprocessing.Queue[tuple[int, list[str]]] = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(dirs, q)) for _ in range(20)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    won = [d for _, w in results for d in w]
    assert sorted(won) == sorted(dirs)  # each VM taken exactly once
    for pid, w in results:
        for d in w:
            assert (Path(d) / L.POOL_CLAIMED).read_text() == f"{pid}\n"
            assert not (Path(d) / L.POOL_READY).exists()


def test_give_back_makes_it_ready_again(tmp_path: Path) -> None:
    d = entry_dir(tmp_path, "p-a")
    assert pool.take(d) and not pool.take(d)
    pool.give_back(d)
    assert pool.take(d)


def test_entry_states(tmp_path: Path) -> None:
    entry_dir(tmp_path, "p-ready")
    entry_dir(tmp_path, "p-booting", ready=False)
    entry_dir(tmp_path, "p-dead", monitor_pid=2**22 + 1)  # above pid_max: never alive
    entry_dir(tmp_path, "p-rebooted", monitor_pid=os.getpid())  # alive, but not its monitor
    corrupt = pool.pool_root(tmp_path) / "p-corrupt"
    corrupt.mkdir()
    (corrupt / L.LAUNCH_FILE).write_text("{not json")
    nomonitor = pool.pool_root(tmp_path) / "p-nomonitor"
    nomonitor.mkdir()
    launch_spec(nomonitor, pool_key="k1").write(nomonitor / L.LAUNCH_FILE)
    claimed = entry_dir(tmp_path, "p-claimed")
    pool.take(claimed)
    (pool.pool_root(tmp_path) / "fill.lock").touch()  # files beside the entries are not VMs
    states = {e.vmid: e.state for e in pool.entries(tmp_path)}
    assert states == {
        "p-ready": "ready",
        "p-booting": "booting",
        "p-dead": "dead",
        "p-rebooted": "dead",
        "p-corrupt": "corrupt",
        "p-nomonitor": "booting",
        "p-claimed": "claimed",
    }
    st = pool.status(Config(), tmp_path)
    assert (st["ready"], st["booting"], st["stale"], st["claimed"]) == (1, 2, 3, [])


def test_what_a_fill_removes(tmp_path: Path) -> None:
    def entry(vmid: str, **kw: Any) -> pool.Entry:
        return dataclasses.replace(pool.Entry(vmid, tmp_path / vmid, "ready", "k1"), **kw)

    assert pool.stale(entry("a"), "k1") == ""
    assert "another configuration" in pool.stale(entry("a"), "k2")
    assert pool.stale(entry("a", state="dead"), "k1") == "dead"
    assert pool.stale(entry("a", state="corrupt"), "k1") == "corrupt"
    assert "half-booted" in pool.stale(entry("a", state="booting"), "k1")
    # claimed by a sandbox: its VM now, whatever its key
    assert pool.stale(entry("a", state="claimed", sandbox_id="web"), "k2") == ""
    # claimed by a process that died before linking it: an orphan, once it had time
    d = tmp_path / "b"
    d.mkdir()
    (d / L.POOL_CLAIMED).write_text(f"{2**22 + 1}\n")
    orphan = pool.Entry("b", d, "claimed", "k1", since=time.time() - 60)
    assert "died before using it" in pool.stale(orphan, "k1")
    assert pool.stale(dataclasses.replace(orphan, since=time.time()), "k1") == ""
    (d / L.POOL_CLAIMED).write_text(f"{os.getpid()}\n")  # the claimer is alive: its own
    assert pool.stale(orphan, "k1") == ""


def test_destroy_takes_the_sandbox_name_a_dead_claimer_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped: list[Path] = []

    def stop_dir(d: Path, timeout: float) -> str:
        stopped.append(d)
        return "forced"

    monkeypatch.setattr(launcher, "stop_dir", stop_dir)
    root = tmp_path / "root"
    names = root / "sandboxes"
    names.mkdir(parents=True)
    d = pool.pool_root(root) / "p-1"
    other = pool.pool_root(root) / "p-2"
    for vm in (d, other):
        vm.mkdir(parents=True)
    os.symlink(d, names / "half")  # linked, its monitor never told: no alias to remove
    os.symlink(other, names / "web")  # another VM's sandbox
    (names / "plain").mkdir()  # a cold-booted sandbox's state directory
    pool.destroy(d)
    assert stopped == [d]
    assert sorted(p.name for p in names.iterdir()) == ["plain", "web"]
    pool.destroy(pool.pool_root(root) / "p-3")  # nothing links to it: nothing else goes
    assert sorted(p.name for p in names.iterdir()) == ["plain", "web"]


def _facts(tmp_path: Path) -> launcher.HostFacts:
    files: list[Path] = []
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (tmp_path / name).write_bytes(b"x" * 4096)
        files.append(tmp_path / name)
    return launcher.HostFacts(
        launcher.GuestFiles(files[0], files[1], files[2], None), "tcg", "virtio-serial", True
    )


def test_key_names_the_vm_not_the_sandbox(tmp_path: Path) -> None:
    host = _facts(tmp_path)
    cfg = Config()
    k = pool.key(cfg, host)
    assert k == pool.key(cfg, host)  # no sandbox name, path or random CID in it
    bigger = dataclasses.replace(cfg, hypervisor=HypervisorConfig(default_memory_mib=512))
    assert pool.key(bigger, host) != k
    assert pool.key(cfg, dataclasses.replace(host, accel="kvm")) != k
    assert pool.key(dataclasses.replace(cfg, factory=FactoryConfig(pool_size=3)), host) == k
    os.utime(host.files.rootfs, ns=(1, 1))  # a rebuilt image in place
    assert pool.key(cfg, host) != k


def test_a_pool_may_take_half_the_hosts_memory() -> None:
    cfg = dataclasses.replace(Config(), factory=FactoryConfig(pool_size=8))
    cost = pool.vm_cost_mib(cfg, "tcg")
    assert cost == 256 + 64 + pool.QEMU_OVERHEAD_MIB
    pool.check_size(cfg, "tcg", host_mib=8 * cost * 2)
    with pytest.raises(HostError) as info:
        pool.check_size(cfg, "tcg", host_mib=4096)
    msg = str(info.value)
    assert f"8 idle VMs of ~{cost} MiB = {8 * cost} MiB" in msg
    assert "this host has 4096 MiB" in msg and f"pool_size to {2048 // cost} or less" in msg


class _Booted:
    """launcher.boot and pool.destroy stand-ins: what boot_one asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.booted: list[Path] = []
        self.destroyed: list[Path] = []
        monkeypatch.setattr(launcher, "boot", self.boot)
        monkeypatch.setattr(pool, "destroy", self.destroyed.append)

    def boot(self, cfg: Config, d: Path, vmid: str, host: Any, **kw: Any) -> launcher.Sandbox:
        d.mkdir(parents=True)
        assert kw["pool_key"] == "k1" and kw["cgroups_path"].endswith(f"/{vmid}")
        self.booted.append(d)
        return launcher.Sandbox(vmid, d, 4242, 1.0, "tcg")


HOST = launcher.HostFacts(None, "tcg", "virtio-serial", True)  # type: ignore[arg-type]


def test_a_pooled_vm_is_ready_only_once_warmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _Booted(monkeypatch)
    seen: list[tuple[Path, bool]] = []

    def warm(d: Path) -> None:  # the marker is not there while the warm-up runs
        seen.append((d, (d / L.POOL_READY).exists()))

    pool.boot_one(Config(), tmp_path, HOST, "k1", warm)
    (d,) = fake.booted
    assert seen == [(d, False)]
    assert (d / L.POOL_READY).read_text() == "4242\n" and not fake.destroyed
    pool.boot_one(Config(), tmp_path, HOST, "k1")  # no warm-up asked for: ready at once
    assert (fake.booted[1] / L.POOL_READY).exists()


@pytest.mark.parametrize("exc", [HostError("crun failed"), OSError(28, "No space left")])
def test_a_pooled_vm_that_fails_its_warm_up_is_destroyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    fake = _Booted(monkeypatch)

    def warm(d: Path) -> None:
        raise exc

    with pytest.raises(SandboxError) as info:
        pool.boot_one(Config(), tmp_path, HOST, "k1", warm)
    (d,) = fake.booted
    assert fake.destroyed == [d] and not (d / L.POOL_READY).exists()
    assert str(info.value).startswith(f"pooled VM {d.name} could not run a container: ")


PYTHON = sys.executable  # the real one: _fake_fill replaces it


def _fake_fill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the fill's interpreter: it writes its session, nice level, the fds it
    has open on pipes and its argv to the returned file."""
    fake = tmp_path / "python"
    out = tmp_path / "fill.out"
    fake.write_text(
        f"#!{PYTHON} -S\n"
        "import os, sys\n"
        "stat = open('/proc/self/stat').read().rsplit(')', 1)[1].split()\n"
        "def link(f):\n"
        "    try: return os.readlink(f'/proc/self/fd/{f}')\n"
        "    except OSError: return ''  # listdir's own\n"
        "pipes = [f for f in os.listdir('/proc/self/fd') if link(f).startswith('pipe:')]\n"
        f"open('{out}.tmp', 'w').write(' '.join([stat[3], stat[16], ','.join(pipes) or '-',"
        " *sys.argv[1:]]))\n"
        f"os.rename('{out}.tmp', '{out}')\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr(pool, "_held_fills", [])
    return out


def _wait_file(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the fill never ran"
        time.sleep(0.02)


@pytest.mark.parametrize("held", [False, True])
def test_a_spawned_fill_is_at_nice_plus_10_from_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    """The background fill must not take a core from the claim's container while its
    interpreter starts: it is nice +10 before its first instruction, in a session of its own,
    given the caller's configuration, and holds none of the caller's fds but stdio."""
    out = _fake_fill(tmp_path, monkeypatch)
    monkeypatch.setattr(pool, "FILL_HOLD_S", 0.2)  # held: the caller, pytest, lives on
    before = os.getpriority(os.PRIO_PROCESS, 0)
    pool.spawn_fill(Config(), tmp_path / "root", held=held)
    _wait_file(out)
    session, nice, fds, *argv = out.read_text().split()
    assert fds == "-"  # no pipe: neither the caller's nor the one that held it back
    assert int(nice) == min(before + pool.POOL_NICE, 19)
    assert int(session) != os.getsid(0)  # detached: a session of its own
    assert argv[:2] == ["-m", "cocoon.runtime.cli.main"] and argv[-2] == "fill"
    assert argv[argv.index("--config") + 1] == str(tmp_path / "root" / "pool" / pool.FILL_CONFIG)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the caller's own is unchanged


def test_a_held_fill_waits_for_its_claimer_at_most_fill_hold_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim's refill waits while its claimer (here pytest, which lives on) runs, but no
    longer than FILL_HOLD_S; the pipes of holds that ended are closed by later spawns, so a
    long-lived claimer does not collect them."""
    out = _fake_fill(tmp_path, monkeypatch)
    monkeypatch.setattr(pool, "FILL_HOLD_S", 1.5)
    t0 = time.monotonic()
    pool.spawn_fill(Config(), tmp_path / "root", held=True)
    time.sleep(0.7)
    assert not out.exists(), "a held fill started while its claimer was still running"
    _wait_file(out)
    assert time.monotonic() - t0 >= 1.5
    (hold,) = pool._held_fills
    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(pool, "FILL_HOLD_S", 0)
    for _ in range(3):
        pool.spawn_fill(Config(), tmp_path / "root", held=True)
    assert len(pool._held_fills) == 1 and hold not in pool._held_fills
    assert len(os.listdir("/proc/self/fd")) == fds  # each spawn closed the hold before it


def test_a_held_fill_starts_when_its_claimer_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claimer's end (here SIGKILL) lets its refill go at once."""
    out = _fake_fill(tmp_path, monkeypatch)
    claimer = (  # a fresh interpreter: pytest's own may hold threads a fork would inherit
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cocoon.runtime.config import Config\n"
        "from cocoon.runtime.sandbox import pool\n"
        "sys.executable = sys.argv[1]\n"
        "pool.FILL_HOLD_S = 60\n"
        "pool.spawn_fill(Config(), Path(sys.argv[2]), held=True)\n"
        "print('spawned', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [PYTHON, "-c", claimer, str(tmp_path / "python"), str(tmp_path / "root")],
        stdout=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == b"spawned\n"
        time.sleep(0.3)
        assert not out.exists()
    finally:
        p.kill()
        p.wait()
    t0 = time.monotonic()
    _wait_file(out)
    assert time.monotonic() - t0 < 30  # not the 60 s hold's end
