"""Pods with real guests, driven through the CLI the way containerd's CRI plugin drives a
runtime (../shared/reference/cri-pod-contract.md): a sandbox container boots the pod's VM and
each container that names it joins that VM, sharing the sandbox's network (127.0.0.1), IPC
and UTS namespaces, and its PID namespace when the pod asks for one."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.container import busybox
from cocoon.runtime.monitor import hostcgroup
from cocoon.testing.leaks import live_processes, sandbox_cgroups
from tests.integration.cli import Cli
from tests.integration.procs import cgroup_of

pytestmark = [pytest.mark.qemu, pytest.mark.root]

CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"


def sandbox_bundle(tmp: Path, sid: str) -> Path:
    """The pod's sandbox ("pause") container: new namespaces, the pod's hostname."""
    b = busybox.make_bundle(tmp / sid, ["sleep", "100000"])
    spec = json.loads((b / "config.json").read_text())
    spec["hostname"] = "podhost"
    spec["annotations"] = {CRI_TYPE: "sandbox", CRI_SANDBOX: sid}
    (b / "config.json").write_text(json.dumps(spec))
    return b


def member_bundle(
    tmp: Path, cid: str, sid: str, sandbox_pid: int, args: list[str], share_pid: bool = False
) -> Path:
    """A pod's container as the CRI plugin writes it: network, IPC and UTS (and PID when the
    pod shares it) at /proc/<sandbox pid>/ns/*, no hostname of its own."""
    b = busybox.make_bundle(tmp / cid, args)
    spec = json.loads((b / "config.json").read_text())
    spec.pop("hostname", None)
    spec["annotations"] = {CRI_TYPE: "container", CRI_SANDBOX: sid}
    shared = {"network": "net", "ipc": "ipc", "uts": "uts"} | ({"pid": "pid"} if share_pid else {})
    nss: list[dict[str, Any]] = []
    for ns in spec["linux"]["namespaces"]:
        kind = ns["type"]
        nss.append(
            {"type": kind, "path": f"/proc/{sandbox_pid}/ns/{shared[kind]}"}
            if kind in shared
            else {"type": kind}
        )
    kinds = {ns["type"] for ns in nss}
    nss += [
        {"type": k, "path": f"/proc/{sandbox_pid}/ns/{f}"}
        for k, f in shared.items()
        if k not in kinds
    ]
    spec["linux"]["namespaces"] = nss
    (b / "config.json").write_text(json.dumps(spec))
    return b


def ns_of(cli: Cli, cid: str, kind: str) -> str:
    return cli.ok("exec", cid, "readlink", f"/proc/self/ns/{kind}").strip()


def sandboxes(cli: Cli) -> list[str]:
    return cli.ok("sandbox", "list").split()


@pytest.fixture
def pod(cli: Cli, tmp_path: Path) -> tuple[str, int]:
    """A running pod sandbox "p1" and its pid (the shim's, as the CRI plugin reads it)."""
    assert cli.create("p1", sandbox_bundle(tmp_path, "p1")).returncode == 0
    cli.ok("start", "p1")
    return "p1", int(json.loads(cli.ok("state", "p1"))["pid"])


def test_a_pods_containers_share_one_vm_and_its_namespaces(
    cli: Cli, tmp_path: Path, pod: tuple[str, int]
) -> None:
    sid, spid = pod
    web = member_bundle(
        tmp_path, "web", sid, spid, ["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/etc"]
    )
    assert cli.create("web", web).returncode == 0, cli.last_error()
    cli.ok("start", "web")
    shell = member_bundle(tmp_path, "shell", sid, spid, ["sleep", "100000"], share_pid=True)
    assert cli.create("shell", shell).returncode == 0, cli.last_error()
    cli.ok("start", "shell")
    assert sandboxes(cli) == [sid], "a pod gets one VM"

    # 127.0.0.1 is the pod's: the shell reaches the web container's server there.
    body = ""
    for _ in range(50):
        r = cli("exec", "shell", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/passwd")
        if r.returncode == 0:
            body = r.stdout
            break
    assert "root:" in body, r.stderr
    for kind in ("net", "ipc", "uts"):
        assert ns_of(cli, "web", kind) == ns_of(cli, sid, kind) == ns_of(cli, "shell", kind), kind
    assert cli.ok("exec", "shell", "hostname").strip() == "podhost"
    # The shell shares the pod's PID namespace (it sees the sandbox's sleep); web has its own.
    assert ns_of(cli, "shell", "pid") == ns_of(cli, sid, "pid") != ns_of(cli, "web", "pid")
    ps = cli.ok("exec", "shell", "ps", "-o", "args")
    assert "sleep 100000" in ps and "httpd" not in ps, ps
    # /dev/shm is the pod's: what the sandbox writes there, its containers read.
    cli.ok("exec", sid, "sh", "-c", "echo shared > /dev/shm/pod")
    assert cli.ok("exec", "web", "cat", "/dev/shm/pod").strip() == "shared"
    assert cli.ok("exec", "shell", "cat", "/dev/shm/pod").strip() == "shared"

    # A container's delete leaves the VM and the others running.
    cli.ok("delete", "--force", "web")
    assert sandboxes(cli) == [sid]
    assert cli.ok("exec", "shell", "echo", "still here").strip() == "still here"
    assert cli.ok("list", "-q").split() == ["p1", "shell"]
    # The sandbox's delete takes the pod's remaining containers and the VM with it.
    cli.ok("delete", "--force", sid)
    assert cli.ok("list", "-q").split() == []
    assert sandboxes(cli) == []


@pytest.mark.parametrize(
    ("annotations", "error"),
    [
        ({CRI_TYPE: "container", CRI_SANDBOX: "nosuch"}, "its pod's sandbox nosuch does not exist"),
        (
            {
                "io.kubernetes.cri-o.ContainerType": "container",
                "io.kubernetes.cri-o.SandboxID": "dropped",
                "io.container.manager": "cri-o",
            },
            "sandbox dropped does not exist (CRI-O creates no infra container",
        ),
        ({CRI_TYPE: "container"}, "has no io.kubernetes.cri.sandbox-id annotation"),
        ({CRI_TYPE: "container", CRI_SANDBOX: "../x"}, "invalid sandbox id"),
        ({CRI_TYPE: "bogus", CRI_SANDBOX: "p1"}, "expected 'sandbox' or 'container'"),
        (
            {CRI_TYPE: "container", CRI_SANDBOX: "p1", "io.cocoon.config.network.model": "none"},
            "would change the VM of the running pod p1",
        ),
    ],
    ids=["no-sandbox", "crio-dropped-infra", "no-id", "bad-id", "bad-type", "vm-annotation"],
)
def test_a_container_that_cannot_join_is_refused_and_the_pod_untouched(
    cli: Cli, tmp_path: Path, pod: tuple[str, int], annotations: dict[str, str], error: str
) -> None:
    sid, spid = pod
    b = member_bundle(tmp_path, "bad", sid, spid, ["true"])
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"] = annotations
    (b / "config.json").write_text(json.dumps(spec))
    r = cli.create("bad", b)
    assert r.returncode == 1, r.stderr
    assert error in cli.last_error()
    assert cli.ok("list", "-q").split() == [sid]
    assert sandboxes(cli) == [sid]
    cli.ok("delete", "--force", sid)


def test_namespaces_that_are_not_the_sandboxs_are_refused(
    cli: Cli, tmp_path: Path, pod: tuple[str, int]
) -> None:
    sid, _ = pod
    b = member_bundle(tmp_path, "stray", sid, 1, ["true"])  # PID 1's namespaces: the host's
    r = cli.create("stray", b)
    assert r.returncode == 1
    err = cli.last_error()
    assert "namespace '/proc/1/ns/" in err and f"not its sandbox {sid}" in err
    assert cli.ok("list", "-q").split() == [sid]
    cli.ok("delete", "--force", sid)


def test_a_pods_container_is_not_a_sandbox_to_join(
    cli: Cli, tmp_path: Path, pod: tuple[str, int]
) -> None:
    sid, spid = pod
    assert (
        cli.create("m1", member_bundle(tmp_path, "m1", sid, spid, ["sleep", "1000"])).returncode
        == 0
    )
    m1_pid = int(json.loads(cli.ok("state", "m1"))["pid"])
    r = cli.create("m2", member_bundle(tmp_path, "m2", "m1", m1_pid, ["true"]))
    assert r.returncode == 1
    assert "m1 is not a pod's sandbox container (it is in p1's)" in cli.last_error()
    assert cli.ok("list", "-q").split() == ["m1", "p1"]
    cli.ok("delete", "--force", sid)  # takes m1 with it
    assert cli.ok("list", "-q").split() == []


def with_resources(b: Path, resources: dict[str, Any]) -> Path:
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["resources"].update(resources)
    (b / "config.json").write_text(json.dumps(spec))
    return b


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a host with 2 CPUs or more")
def test_the_pods_vm_grows_and_shrinks_with_its_containers(
    cli: Cli, tmp_path: Path, pod: tuple[str, int]
) -> None:
    sid, spid = pod
    cpus0, mem0 = cli.sees(sid)
    big = {"cpu": {"quota": 200000, "period": 100000}, "memory": {"limit": 256 << 20}}
    b = with_resources(member_bundle(tmp_path, "m", sid, spid, ["sleep", "1000"]), big)
    assert cli.create("m", b).returncode == 0, cli.last_error()
    cli.ok("start", "m")
    cpus1, mem1 = cli.sees(sid)
    assert (cpus0, cpus1) == (1, 2) and mem1 >= mem0 + 256 - 16, (mem0, mem1)
    assert cli.ok("exec", "m", "cat", "/sys/fs/cgroup/memory.max").strip() == str(256 << 20)
    cli.ok("delete", "--force", "m")
    cpus2, mem2 = cli.sees(sid)
    assert cpus2 == 1 and mem2 <= mem0 + 16, (mem0, mem2)
    cli.ok("delete", "--force", sid)


def test_a_pod_beyond_the_vm_is_clamped_not_refused(
    cli: Cli, tmp_path: Path, pod: tuple[str, int]
) -> None:
    sid, spid = pod
    huge = {"cpu": {"quota": 6400000, "period": 100000}}  # 64 CPUs
    b = with_resources(member_bundle(tmp_path, "m", sid, spid, ["sleep", "1000"]), huge)
    assert cli.create("m", b).returncode == 0, cli.last_error()
    log = cli.log.read_text()
    assert "asks for 64 CPUs" in log and "sized to" in log, log
    cli.ok("delete", "--force", sid)


def test_a_member_whose_create_fails_leaves_the_pod_as_it_was(
    cli: Cli, tmp_path: Path, pod: tuple[str, int]
) -> None:
    sid, spid = pod
    before = cli.sees(sid)
    b = member_bundle(tmp_path, "m", sid, spid, ["/no/such/program"])
    b = with_resources(b, {"memory": {"limit": 256 << 20}})
    r = cli.create("m", b)
    assert r.returncode == 1
    assert "/no/such/program" in cli.last_error()
    assert cli.ok("list", "-q").split() == [sid]
    assert cli.sees(sid)[1] <= before[1] + 16, "the VM gave back what the member asked for"
    assert list((cli.root / "sandboxes").glob("*/shared/m")) == [], "its share left behind"
    cli.ok("delete", "--force", sid)


@pytest.mark.parametrize("caller_made", [True, False], ids=["kubelet-made", "none-made"])
def test_the_pods_vm_runs_in_the_pods_host_cgroup(
    cli: Cli, tmp_path: Path, caller_made: bool
) -> None:
    """QEMU, virtiofsd and the monitor run in <pod cgroup>/cocoon-sandbox-<id> in every
    hierarchy (the pod cgroup: the parent of the sandbox's cgroupsPath); after the sandbox's
    delete the pod cgroup is as the caller left it."""
    top = f"/cocoon-test-{os.getpid()}"
    pod_cg = f"{top}/pod-uid1"
    points = [point for point, _ in hostcgroup.hierarchies()]
    if caller_made:  # as a kubelet does before the pod's sandbox is created
        for p in points:
            (p / pod_cg.lstrip("/")).mkdir(parents=True)
    try:
        b = sandbox_bundle(tmp_path, "p1")
        spec = json.loads((b / "config.json").read_text())
        spec["linux"]["cgroupsPath"] = f"{pod_cg}/p1"
        (b / "config.json").write_text(json.dumps(spec))
        assert cli.create("p1", b).returncode == 0, cli.last_error()
        spid = int(json.loads(cli.ok("state", "p1"))["pid"])
        m = member_bundle(tmp_path, "m", "p1", spid, ["sleep", "1000"])
        assert cli.create("m", m).returncode == 0, cli.last_error()
        vm_procs = {
            what: [pid for pid, cmd in live_processes() if what in cmd and str(cli.root) in cmd]
            for what in ("qemu-system", "cocoon.runtime.monitor.main", "virtiofsd")
        }
        assert all(vm_procs.values()), vm_procs
        for what, pids in vm_procs.items():
            for pid in pids:
                for ctrls, path in cgroup_of(pid).items():
                    assert path == f"{pod_cg}/cocoon-sandbox-p1", (what, ctrls, path)
        cli.ok("delete", "--force", "p1")
        assert not sandbox_cgroups()
        left = [p / pod_cg.lstrip("/") for p in points if (p / pod_cg.lstrip("/")).exists()]
        assert len(left) == (len(points) if caller_made else 0), left
    finally:
        for p in points:
            for d in (p / pod_cg.lstrip("/"), p / top.lstrip("/")):
                if d.exists():
                    d.rmdir()


def test_pod_sysctls_hold_for_every_container_of_the_pod(cli: Cli, tmp_path: Path) -> None:
    """The sandbox spec's linux.sysctl (net.* of the pod's network namespace, kernel.shm_* of
    its IPC namespace) are what the pod's containers see."""
    b = sandbox_bundle(tmp_path, "p1")
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["sysctl"] = {
        "net.ipv4.ip_local_port_range": "30000 40000",
        "kernel.shm_rmid_forced": "1",
    }
    (b / "config.json").write_text(json.dumps(spec))
    assert cli.create("p1", b).returncode == 0, cli.last_error()
    cli.ok("start", "p1")
    spid = int(json.loads(cli.ok("state", "p1"))["pid"])
    assert (
        cli.create("m", member_bundle(tmp_path, "m", "p1", spid, ["sleep", "1000"])).returncode == 0
    )
    cli.ok("start", "m")
    for cid in ("p1", "m"):
        ports = cli.ok("exec", cid, "cat", "/proc/sys/net/ipv4/ip_local_port_range").split()
        assert ports == ["30000", "40000"], (cid, ports)
        assert cli.ok("exec", cid, "cat", "/proc/sys/kernel/shm_rmid_forced").strip() == "1"
    cli.ok("delete", "--force", "p1")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_members_block_device_is_its_own_and_leaves_with_it(
    cli: Cli, tmp_path: Path, pod: tuple[str, int], loop_device: str
) -> None:
    sid, spid = pod
    st = os.stat(loop_device)
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    b = member_bundle(tmp_path, "m", sid, spid, ["sleep", "1000"])
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["devices"] = [{"path": "/dev/xvdb", "type": "b", "major": major, "minor": minor}]
    spec["linux"]["resources"]["devices"] = [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "b", "major": major, "minor": minor, "access": "rwm"},
    ]
    (b / "config.json").write_text(json.dumps(spec))
    disks_before = cli.ok("exec", sid, "ls", "/sys/block").split()
    assert cli.create("m", b).returncode == 0, cli.last_error()
    cli.ok("start", "m")
    assert cli.ok("exec", "m", "stat", "-c", "%F", "/dev/xvdb").strip() == "block special file"
    cli.ok("exec", "m", "sh", "-c", "echo from-member | dd of=/dev/xvdb bs=512 count=1 conv=sync")
    # The sandbox container sees the guest's disks in sysfs, not the member's device node.
    assert len(cli.ok("exec", sid, "ls", "/sys/block").split()) == len(disks_before) + 1
    assert cli("exec", sid, "stat", "/dev/xvdb").returncode != 0
    cli.ok("delete", "--force", "m")
    assert cli.ok("exec", sid, "ls", "/sys/block").split() == disks_before, "unplugged"
    with open(loop_device, "rb") as f:
        assert f.read(11) == b"from-member"
    cli.ok("delete", "--force", sid)


def test_update_of_a_member_resizes_the_pods_vm_by_its_difference(
    cli: Cli, tmp_path: Path, pod: tuple[str, int]
) -> None:
    sid, spid = pod
    _, mem0 = cli.sees(sid)
    b = with_resources(
        member_bundle(tmp_path, "m", sid, spid, ["sleep", "1000"]),
        {"memory": {"limit": 128 << 20}},
    )
    assert cli.create("m", b).returncode == 0, cli.last_error()
    cli.ok("start", "m")
    _, mem1 = cli.sees(sid)
    cli.ok("update", "--memory", str(384 << 20), "m")
    _, mem2 = cli.sees(sid)
    assert mem2 >= mem1 + 256 - 16, (mem0, mem1, mem2)
    assert cli.ok("exec", "m", "cat", "/sys/fs/cgroup/memory.max").strip() == str(384 << 20)
    cli.ok("delete", "--force", "m")
    assert cli.sees(sid)[1] <= mem0 + 16
    cli.ok("delete", "--force", sid)


def test_each_container_of_a_pod_has_its_own_lifecycle(
    cli: Cli, tmp_path: Path, pod: tuple[str, int]
) -> None:
    """pause/resume, ps, events --stats, kill and an exit status, per container, while the
    pod's other containers run on."""
    sid, spid = pod
    count = (
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done"
    )
    for cid, args in (("a", ["sh", "-c", count]), ("b", ["sleep", "1000"])):
        assert cli.create(cid, member_bundle(tmp_path, cid, sid, spid, args)).returncode == 0
        cli.ok("start", cid)

    def status(cid: str) -> str:
        return str(json.loads(cli.ok("state", cid))["status"])

    cli.ok("pause", "a")
    assert (status("a"), status("b"), status(sid)) == ("paused", "running", "running")
    assert cli.ok("exec", "b", "echo", "b-runs").strip() == "b-runs"
    cli.ok("resume", "a")
    first = int(cli.ok("exec", "a", "cat", "/tmp/n"))
    time.sleep(1)
    assert int(cli.ok("exec", "a", "cat", "/tmp/n")) > first

    pids_a = json.loads(cli.ok("ps", "--format", "json", "a"))
    pids_b = json.loads(cli.ok("ps", "--format", "json", "b"))
    assert pids_a and pids_b and not set(pids_a) & set(pids_b), (pids_a, pids_b)
    for cid in ("a", "b"):
        ev = json.loads(cli.ok("events", "--stats", cid))
        assert ev["type"] == "stats" and ev["id"] == cid, ev
        assert ev["data"]["memory"]["usage"]["usage"] > 0, ev

    # A container that exits: its own status, through `run`, while the others run.
    c = member_bundle(tmp_path, "c", sid, spid, ["sh", "-c", "exit 3"])
    r = cli("run", "--bundle", str(c), "c", timeout=240)
    assert r.returncode == 3, r.stderr
    assert (status("a"), status("b")) == ("running", "running")
    cli.ok("kill", "b", "KILL")  # TERM: sleep is its PID 1 and has no handler
    end = time.monotonic() + 30
    while status("b") != "stopped" and time.monotonic() < end:
        time.sleep(0.2)
    assert (status("b"), status("a"), status(sid)) == ("stopped", "running", "running")
    cli.ok("delete", "b")
    assert cli.ok("list", "-q").split() == ["a", sid]
    assert sandboxes(cli) == [sid]
    cli.ok("delete", "--force", sid)
    assert cli.ok("list", "-q").split() == []
