"""The pool of pre-booted VMs with real guests ([factory] pool_size, cocoon.runtime.sandbox.pool):
a pooled VM is warmed (one throwaway container) before it is offered,
create claims a pooled VM and specialises it (host cgroup, nice level, size, share), the pool
refills in the background, a pod's sandbox comes from the pool too, concurrent creates never
share a VM, and a pooled VM that died, was booted from another configuration or is corrupt is
never handed out (the create boots cold) and is replaced. Every test drains the pool, and the
state root's leak check covers pooled VMs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.agent import agent_pb2 as apb
from cocoon.runtime import faults
from cocoon.runtime.container import busybox
from cocoon.runtime.container.warm import WARM_DIR, WARM_ID
from cocoon.runtime.monitor import launch as L
from tests.integration.cli import Cli
from tests.integration.conftest import grpc_stubs
from tests.integration.procs import cgroup_of

pytestmark = [pytest.mark.qemu, pytest.mark.root]


class Pool:
    """The CLI with a configuration whose [factory] pool_size is set (COCOON_CONFIG)."""

    def __init__(self, cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        self.cli, self.tmp, self.mp = cli, tmp, monkeypatch
        self.configure(1)

    def configure(self, size: int, extra: str = "") -> None:
        conf = self.tmp / f"pool-{size}-{len(extra)}.toml"
        conf.write_text(f"{extra}\n[factory]\npool_size = {size}\n")
        self.mp.setenv("COCOON_CONFIG", str(conf))
        self.mp.setenv("COCOON_CONFIG_DIR", str(self.tmp / "no-drop-ins"))

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli.ok("pool", "status")))

    def ready(self) -> list[dict[str, Any]]:
        return [v for v in self.status()["vms"] if v["state"] == "ready"]

    def wait_ready(self, n: int, timeout: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(vms := self.ready()) < n:
            assert time.monotonic() < deadline, f"pool never got {n} ready VMs: {self.status()}"
            time.sleep(0.5)
        return vms

    def qemu_pid(self, d: Path) -> int:
        return int((d / L.QEMU_PID).read_text())


@pytest.fixture
def pool(cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Pool]:
    p = Pool(cli, monkeypatch, tmp_path)
    yield p
    p.configure(0)
    for cid in cli.ok("list", "-q").split():
        cli("delete", "--force", cid)
    cli.ok("pool", "drain")  # waits for a background fill, then stops every pooled VM
    assert p.status()["vms"] == []


def sleeper(tmp: Path, cid: str, **linux: Any) -> Path:
    b = busybox.make_bundle(tmp / cid, ["sleep", "100000"])
    spec = json.loads((b / "config.json").read_text())
    spec["linux"].update(linux)
    (b / "config.json").write_text(json.dumps(spec))
    return b


def test_create_claims_a_pooled_vm_specialises_it_and_the_pool_refills(
    pool: Pool, cli: Cli, tmp_path: Path
) -> None:
    counts = json.loads(cli.ok("pool", "fill"))
    assert counts == {"removed": 0, "booted": 1, "ready": 1, "failed": 0}
    (vm,) = pool.ready()
    vmdir = cli.root / "pool" / vm["vmid"]
    qemu = pool.qemu_pid(vmdir)
    assert os.getpriority(os.PRIO_PROCESS, qemu) == 10  # an idle pooled VM yields
    # warmed before it was marked ready: one throwaway container ran in it and left nothing
    with grpc_stubs(vmdir) as (agent, _):
        logs = [r.message for r in agent.ReadLogs(apb.ReadLogsRequest(follow=False), timeout=30)]
    assert any(f"container {WARM_ID} process init" in m and m.endswith("exited: 0") for m in logs)
    assert list((vmdir / "shared").iterdir()) == [] and not (vmdir / WARM_DIR).exists()
    assert cgroup_of(qemu)["cpu,cpuacct" if "cpu,cpuacct" in cgroup_of(qemu) else "cpu"].endswith(
        f"/cocoon-pool/cocoon-sandbox-{vm['vmid']}"
    )

    mem = {"memory": {"limit": 256 * 1024 * 1024}}
    b = sleeper(tmp_path, "c1", cgroupsPath="/cocoon-test-pool/c1", resources=mem)
    (b / "rootfs" / "marker").write_text(f"from the bundle of {tmp_path.name}\n")
    r = cli.create("c1", b)
    assert r.returncode == 0, r.stderr
    link = cli.root / "sandboxes" / "c1"
    assert link.is_symlink() and link.resolve() == vmdir  # the pooled VM, not a new one
    assert pool.qemu_pid(vmdir) == qemu
    assert cli.ok("sandbox", "list").split() == ["c1"]
    # specialised: the container's host cgroup, the claimer's nice level on every thread, its
    # memory hot-plugged, its rootfs shared in
    assert all(p.endswith("/cocoon-test-pool/cocoon-sandbox-c1") for p in cgroup_of(qemu).values())
    for task in Path(f"/proc/{qemu}/task").iterdir():
        assert os.getpriority(os.PRIO_PROCESS, int(task.name)) == os.getpriority(os.PRIO_PROCESS, 0)
    cli.ok("start", "c1")
    _cpus, mem_mib = cli.sees("c1")
    assert mem_mib > 256 + 128
    assert cli.ok("exec", "c1", "cat", "/marker") == f"from the bundle of {tmp_path.name}\n"
    assert json.loads(cli.ok("pool", "status"))["claimed"] == ["c1"]
    st = json.loads(cli.ok("sandbox", "status", "c1"))
    assert st["sandbox_id"] == "c1" and st["qemu_pid"] == qemu

    (refill,) = pool.wait_ready(1)  # booted in the background by the create
    assert refill["vmid"] != vm["vmid"]

    cli.ok("delete", "--force", "c1")
    assert not link.is_symlink() and not vmdir.exists()
    assert not Path("/sys/fs/cgroup/cpu/cocoon-test-pool/cocoon-sandbox-c1").exists()


def test_a_pods_sandbox_comes_from_the_pool(pool: Pool, cli: Cli, tmp_path: Path) -> None:
    cli.ok("pool", "fill")
    (vm,) = pool.ready()
    sid = "pod1"
    b = busybox.make_bundle(tmp_path / sid, ["sleep", "100000"])
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"] = {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": sid,
    }
    (b / "config.json").write_text(json.dumps(spec))
    assert cli.create(sid, b).returncode == 0
    assert (cli.root / "sandboxes" / sid).resolve().name == vm["vmid"]
    cli.ok("start", sid)
    m = busybox.make_bundle(tmp_path / "m1", ["sleep", "100000"])
    mspec = json.loads((m / "config.json").read_text())
    mspec["annotations"] = {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": sid,
    }
    (m / "config.json").write_text(json.dumps(mspec))
    r = cli.create("m1", m)
    assert r.returncode == 0, r.stderr
    cli.ok("start", "m1")
    assert cli.ok("exec", "m1", "hostname").strip() == cli.ok("exec", sid, "hostname").strip()
    assert cli.ok("sandbox", "list").split() == [sid]  # one VM for the pod
    cli.ok("delete", "--force", "m1")
    cli.ok("delete", "--force", sid)


def test_sandbox_start_takes_a_vm_from_the_pool(pool: Pool, cli: Cli) -> None:
    cli.ok("pool", "fill")
    (vm,) = pool.ready()
    vmdir = cli.root / "pool" / vm["vmid"]
    started = json.loads(cli.ok("sandbox", "start", "s1"))
    try:
        assert started["pooled"] is True and started["id"] == "s1"
        assert (cli.root / "sandboxes" / "s1").resolve() == vmdir
        assert json.loads(cli.ok("sandbox", "status", "s1"))["sandbox_id"] == "s1"
        assert json.loads(cli.ok("pool", "status"))["claimed"] == ["s1"]
        r = cli("sandbox", "start", "s1")
        assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
    finally:
        cli.ok("sandbox", "stop", "s1")
    assert not (cli.root / "sandboxes" / "s1").is_symlink() and not vmdir.exists()


def test_concurrent_creates_never_share_a_vm(pool: Pool, cli: Cli, tmp_path: Path) -> None:
    pool.configure(2)
    cli.ok("pool", "fill")
    pooled = {v["vmid"] for v in pool.wait_ready(2)}
    bundles = {f"k{i}": sleeper(tmp_path, f"k{i}") for i in range(4)}
    results: dict[str, int] = {}

    def create(cid: str) -> None:
        results[cid] = cli.create(cid, bundles[cid]).returncode

    threads = [threading.Thread(target=create, args=(cid,)) for cid in bundles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == dict.fromkeys(bundles, 0)
    dirs = {cid: (cli.root / "sandboxes" / cid).resolve() for cid in bundles}
    qemus = {cid: pool.qemu_pid(d) for cid, d in dirs.items()}
    assert len(set(qemus.values())) == 4  # four VMs
    from_pool = [cid for cid, d in dirs.items() if d.name in pooled]
    assert 1 <= len(from_pool) <= 2 and len({dirs[c] for c in from_pool}) == len(from_pool)
    for cid in bundles:
        cli.ok("delete", "--force", cid)


def kill_monitor(d: Path) -> int:
    """SIGKILLs a pooled VM's monitor; its QEMU lives on (the next fill must reap it)."""
    mpid = int((d / L.MONITOR_PID).read_text())
    os.kill(mpid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{mpid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return int((d / L.QEMU_PID).read_text())


@pytest.mark.parametrize("fault", ["monitor-killed", "other-config", "corrupt", "qemu-killed"])
def test_a_broken_or_foreign_pooled_vm_is_never_handed_out(
    pool: Pool, cli: Cli, tmp_path: Path, fault: str
) -> None:
    cli.ok("pool", "fill")
    (vm,) = pool.ready()
    vmdir = cli.root / "pool" / vm["vmid"]
    stray_qemu = 0
    if fault == "monitor-killed":
        stray_qemu = kill_monitor(vmdir)
    elif fault == "other-config":
        pool.configure(1, "[hypervisor]\ndefault_memory_mib = 320\n")
    elif fault == "corrupt":
        (vmdir / L.LAUNCH_FILE).write_text("{truncated")
    else:
        os.kill(pool.qemu_pid(vmdir), signal.SIGKILL)
    r = cli.create("c1", sleeper(tmp_path, "c1"))
    assert r.returncode == 0, r.stderr
    d = (cli.root / "sandboxes" / "c1").resolve()
    assert d.name != vm["vmid"]  # booted cold, or a replacement: never the broken one
    cli.ok("start", "c1")
    assert cli.ok("exec", "c1", "echo", "ok").strip() == "ok"
    # the background fill removed the broken VM (and its stray QEMU) and booted a good one
    deadline = time.monotonic() + 120
    while True:
        vms = pool.status()["vms"]
        if [v["state"] for v in vms] == ["ready"] and vms[0]["vmid"] != vm["vmid"]:
            break
        assert time.monotonic() < deadline, vms
        time.sleep(0.5)
    assert not vmdir.exists()
    if stray_qemu:
        assert not Path(f"/proc/{stray_qemu}").exists() or _zombie(stray_qemu)
    cli.ok("delete", "--force", "c1")


@pytest.mark.parametrize("point", faults.POOL_POINTS)
@pytest.mark.parametrize("victim", ["cli", "monitor", "qemu", "virtiofsd"])
def test_a_pooled_vm_or_its_claimer_killed_mid_claim_leaves_nothing_half_claimed(
    pool: Pool, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, victim: str
) -> None:
    """Killed between the take (the ``ready`` marker renamed, the sandbox's name linked to the
    VM) and the monitor's Claim: the create boots cold or fails with one clean error, never
    hands out the broken VM, and ``delete --force`` plus the next fill leave nothing of it."""
    cli.ok("pool", "fill")
    (vm,) = pool.ready()
    vmdir = cli.root / "pool" / vm["vmid"]
    qemu = pool.qemu_pid(vmdir)
    monkeypatch.setenv(faults.ENV, f"{point}:{victim}")
    r = cli.create("c1", sleeper(tmp_path, "c1"))
    monkeypatch.delenv(faults.ENV)
    link = cli.root / "sandboxes" / "c1"
    if victim == "cli":
        assert r.returncode == -9, (r.returncode, r.stderr)
    else:
        assert "Traceback" not in r.stderr, r.stderr
        if r.returncode == 0:  # a cold boot (or another pooled VM): never the one that broke
            assert link.resolve() != vmdir
            cli.ok("start", "c1")
            assert cli.ok("exec", "c1", "echo", "ok").strip() == "ok"
        else:
            assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("delete", "--force", "c1")
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink()
    cli.ok("pool", "fill")  # holds the fill lock: clears what is stale, boots a replacement
    assert not vmdir.exists(), pool.status()
    assert not Path(f"/proc/{qemu}").exists() or _zombie(qemu)
    assert [v["state"] for v in pool.status()["vms"]] == ["ready"]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_pool_bad_input(pool: Pool, cli: Cli) -> None:
    pool.configure(64, "[hypervisor]\ndefault_memory_mib = 4096\n")
    r = cli("pool", "fill")
    assert r.returncode == 1
    assert "factory.pool_size = 64 asks for" in r.stderr and "set pool_size to" in r.stderr
    assert "asks for" in cli.last_error()
    assert pool.status()["vms"] == []
    pool.configure(-1)
    r = cli("pool", "status")
    assert r.returncode == 1 and "factory.pool_size: must be between 0 and 64" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
