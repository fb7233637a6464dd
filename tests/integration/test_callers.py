"""cocoon driven by real callers, each a private instance from Debian's packages: containerd 1.6
(through ctr, runc shim v2 with options.BinaryName = cocoon), dockerd 20.10 (--add-runtime) and
podman 4.3 (--runtime). Every test checks the workload really ran in a guest (another kernel),
that the caller saw the workload's exit status, and that cocoon left nothing behind: no QEMU,
monitor, shim or virtiofsd process, no mount and no state dir under the state root the caller
gave (podman gives none: /run/cocoon).

One daemon per caller for the whole module (module-scoped fixtures); each guest boots in ~6 s
under TCG, so each test boots as few as it needs.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from cocoon.runtime.network import netns as N
from tests.integration import callers as C
from tests.integration.test_network import PeerServer, fetch_from

pytestmark = [pytest.mark.qemu, pytest.mark.root]
HOST_KERNEL = os.uname().release
OUT_ERR_EXIT_3 = ("sh", "-c", "echo out; echo err >&2; exit 3")
SHELL_INPUT = b"echo $((6*7))\nexit\n"


EXEC_TTY = ("sh", "-c", "tty; echo $((6*7))")


def assert_guest_kernel(r: subprocess.CompletedProcess[str], status: int = 0) -> None:
    """``uname -r`` ran (and exited ``status``), and in a guest: not the host's kernel."""
    assert r.returncode == status, r.stderr
    assert r.stdout.strip() not in ("", HOST_KERNEL), r.stdout


def assert_out_err_exit_3(r: subprocess.CompletedProcess[str]) -> None:
    """OUT_ERR_EXIT_3's stdout, stderr and status came back apart and intact."""
    assert r.returncode == 3, r.stderr
    assert r.stdout == "out\n" and r.stderr == "err\n"


def assert_tty_answered(status: int, out: str) -> None:
    """EXEC_TTY ran on a terminal of its own and answered."""
    assert status == 0 and "/dev/pts/" in out and "42" in out, out


def assert_pause_unpause(
    run: Callable[..., subprocess.CompletedProcess[str]], cid: str, status: Callable[[], str]
) -> None:
    """The caller's pause and unpause of ``cid``, each seen in the caller's own status."""
    assert run("pause", cid).returncode == 0
    assert status() == "paused"
    assert run("unpause", cid).returncode == 0
    assert status() == "running"


def assert_killed_137(run: Callable[..., subprocess.CompletedProcess[str]], cid: str) -> None:
    """The caller's kill (SIGKILL) of ``cid``, and its wait reporting 128 + 9."""
    assert run("kill", cid).returncode == 0
    r = run("wait", cid)
    assert r.stdout.strip() == "137", r.stdout + r.stderr


def assert_shell_answered(status: int, out: str) -> None:
    """An interactive shell fed SHELL_INPUT answered 42 and exited 0."""
    assert status == 0, out
    assert "42" in out.split("$((6*7))", 1)[-1], out


IMAGE = "docker.io/library/busybox:cocoon"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs, its layer tar and an OCI image archive of it."""
    d = tmp_path_factory.mktemp("img")
    C.busybox_rootfs(d / "rootfs")
    C.layer_tar(d / "rootfs", d / "layer.tar")
    C.oci_archive(d / "layer.tar", d / "image.tar", IMAGE)
    return d


def assert_leak_check_sees_a_sandbox(state_root: Path) -> None:
    """While a container runs, the leak check must see its QEMU, monitor, shim, mounts and
    state under ``state_root`` (else the checks after each test would pass vacuously)."""
    found = "\n".join(C.leaks(state_root))
    for what in ("qemu-system", "cocoon.runtime.monitor", "cocoon.shim", "mount ", "state "):
        assert what in found, f"{what!r} not seen under {state_root}:\n{found}"


# ---- containerd (ctr) -------------------------------------------------------------------

NS = "cocoon-test"


@pytest.fixture(scope="module")
def containerd_daemon(
    tmp_path_factory: pytest.TempPathFactory, image_dir: Path
) -> Iterator[C.Containerd]:
    with C.containerd(tmp_path_factory.mktemp("ctd")) as ctd:
        r = ctd.ctr("-n", NS, "images", "import", image_dir / "image.tar")
        assert r.returncode == 0, r.stderr
        yield ctd


@pytest.fixture
def ctd(containerd_daemon: C.Containerd) -> Iterator[C.Containerd]:
    yield containerd_daemon
    C.assert_no_leaks(containerd_daemon.runc_root / NS)


def runc_opts(ctd: C.Containerd) -> list[str]:
    """ctr's way to the runc shim's options: BinaryName (--runc-binary) and Root; and the
    client's stdio FIFOs in a private dir (else /run/containerd/fifo)."""
    return ["--runc-binary", C.COCOON, "--runc-root", str(ctd.runc_root), *fifo(ctd)]


def fifo(ctd: C.Containerd) -> list[str]:
    return ["--fifo-dir", str(ctd.base / "fifo")]


def ctr_argv(ctd: C.Containerd) -> list[str | Path]:
    """ctr on the private containerd, in the tests' namespace."""
    return [C.CTR, "--address", ctd.address, "-n", NS]


@pytest.mark.daemon("containerd")
def test_ctr_run_rm_prints_guest_output_and_exit_codes(ctd: C.Containerd) -> None:
    r = ctd.ctr(
        "-n", NS, "run", "--rm", "--runtime", "io.containerd.runc.v2", *runc_opts(ctd),
        IMAGE, "ctr-uname", "uname", "-r",
    )  # fmt: skip
    assert_guest_kernel(r)
    r = ctd.ctr("-n", NS, "run", "--rm", *runc_opts(ctd), IMAGE, "ctr-exit3", "sh", "-c", "exit 3")
    assert r.returncode == 3, r.stdout + r.stderr
    assert ctd.ctr("-n", NS, "containers", "list", "-q").stdout.split() == []


@pytest.mark.daemon("containerd")
def test_ctr_task_kill_sigkill_gives_137(ctd: C.Containerd) -> None:
    argv = [*ctr_argv(ctd), "run", "--rm", *runc_opts(ctd)]
    proc = subprocess.Popen(
        [*argv, IMAGE, "ctr-kill", "sleep", "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        C.wait_for(lambda: "RUNNING" in ctd.ctr("-n", NS, "tasks", "list").stdout, 90, "task")
        r = ctd.ctr("-n", NS, "tasks", "kill", "-s", "SIGKILL", "ctr-kill")
        assert r.returncode == 0, r.stderr
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 137, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.daemon("containerd")
def test_ctr_run_tty_interactive_shell(ctd: C.Containerd) -> None:
    argv = [*ctr_argv(ctd), "run", "-t", "--rm", *runc_opts(ctd), IMAGE, "ctr-tty", "sh"]
    assert_shell_answered(*C.run_pty(argv, SHELL_INPUT))


@pytest.mark.daemon("containerd")
def test_ctr_exec_pause_resume_kill(ctd: C.Containerd) -> None:
    cid = "ctr-exec"
    r = ctd.ctr("-n", NS, "run", "-d", *runc_opts(ctd), IMAGE, cid, "sleep", "1000")
    assert r.returncode == 0, r.stderr
    try:
        assert_leak_check_sees_a_sandbox(ctd.runc_root / NS)
        r = ctd.ctr("-n", NS, "tasks", "exec", *fifo(ctd), "--exec-id", "e1", cid, "sh", "-c",
                    "uname -r; echo err >&2; exit 5")  # fmt: skip
        assert r.returncode == 5, r.stderr
        assert r.stdout.strip() not in ("", HOST_KERNEL), r.stdout
        assert "err" in r.stderr
        argv = [*ctr_argv(ctd), "tasks", "exec", "-t", *fifo(ctd), "--exec-id", "e2", cid]
        assert_tty_answered(*C.run_pty([*argv, *EXEC_TTY]))
        assert ctd.ctr("-n", NS, "tasks", "pause", cid).returncode == 0
        assert f"{cid} " in (listing := ctd.ctr("-n", NS, "tasks", "list").stdout)
        assert "PAUSED" in listing, listing
        assert ctd.ctr("-n", NS, "tasks", "resume", cid).returncode == 0
        assert "RUNNING" in ctd.ctr("-n", NS, "tasks", "list").stdout
        r = ctd.ctr(
            "-n", NS, "tasks", "exec", *fifo(ctd), "--exec-id", "e3", cid, "echo", "resumed"
        )
        assert r.returncode == 0 and r.stdout.strip() == "resumed", r.stderr
        r = ctd.ctr("-n", NS, "tasks", "ps", cid)
        assert r.returncode == 0, r.stderr
        assert ctd.ctr("-n", NS, "tasks", "kill", "-s", "SIGKILL", cid).returncode == 0
        C.wait_for(lambda: "STOPPED" in ctd.ctr("-n", NS, "tasks", "list").stdout, 60, "stop")
    finally:
        ctd.ctr("-n", NS, "tasks", "delete", "-f", cid)
        ctd.ctr("-n", NS, "containers", "delete", cid)
    assert ctd.ctr("-n", NS, "containers", "list", "-q").stdout.split() == []


# ---- dockerd ----------------------------------------------------------------------------

DK_IMAGE = "cocoon-busybox:test"
DK_RUN = ["run", "--runtime", "cocoon", "--network", "none"]


@pytest.fixture(scope="module")
def dockerd_daemon(
    tmp_path_factory: pytest.TempPathFactory, containerd_daemon: C.Containerd, image_dir: Path
) -> Iterator[C.Dockerd]:
    """dockerd on the module's private containerd (namespace moby), the busybox layer imported."""
    with C.dockerd(tmp_path_factory.mktemp("dk"), containerd_daemon.address) as dk:
        r = dk.docker("import", image_dir / "layer.tar", DK_IMAGE)
        assert r.returncode == 0, r.stderr
        yield dk


@pytest.fixture
def dk(dockerd_daemon: C.Dockerd) -> Iterator[C.Dockerd]:
    yield dockerd_daemon
    C.assert_no_leaks(dockerd_daemon.runtime_root)


def dk_state(dk: C.Dockerd, cid: str, field: str) -> str:
    r = dk.docker("inspect", "-f", "{{.State." + field + "}}", cid)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def loopback_up() -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


@pytest.fixture(scope="module")
def dockerd_bridged(
    tmp_path_factory: pytest.TempPathFactory, containerd_daemon: C.Containerd, image_dir: Path
) -> Iterator[tuple[C.Dockerd, Path]]:
    """dockerd in a network namespace of its own, with its default bridge, iptables and
    port publishing, as on a host."""
    base = tmp_path_factory.mktemp("b")  # short: runtime socket paths live under it
    ns = base / "netns"
    N.create_netns(ns)
    N.in_netns(str(ns), loopback_up)  # -p publishes on 127.0.0.1 too, through docker-proxy
    try:
        with C.dockerd(base / "d", containerd_daemon.address, netns=ns) as dk:
            r = dk.docker("import", image_dir / "layer.tar", DK_IMAGE)
            assert r.returncode == 0, r.stderr
            yield dk, ns
            C.assert_no_leaks(dk.runtime_root)
    finally:
        N.remove_netns(ns)


@pytest.mark.daemon("dockerd")
def test_docker_bridge_network_and_published_port(
    dockerd_bridged: tuple[C.Dockerd, Path],
) -> None:
    dk, ns = dockerd_bridged
    srv = PeerServer(ns, "172.17.0.1", 9099, b"the bridge says hi")
    try:
        r = dk.docker(
            "run", "--runtime", "cocoon", "--rm", "--hostname", "boxed", DK_IMAGE,
            "sh", "-c", "wget -q -O - http://172.17.0.1:9099/; echo; hostname; cat /etc/hosts",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "the bridge says hi" and lines[1] == "boxed"
        assert any(x.startswith("172.17.") and "boxed" in x for x in lines[2:]), r.stdout
        r = dk.docker(
            "run", "--runtime", "cocoon", "-d", "-p", "18080:8080", DK_IMAGE,
            "httpd", "-f", "-p", "8080", "-h", "/etc",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        cid = r.stdout.strip()
        try:
            body = fetch_from(ns, "127.0.0.1", 18080, "/passwd", wait=60)
            assert b"root:" in body, body
        finally:
            dk.docker("rm", "-f", cid)
    finally:
        srv.close()


@pytest.mark.daemon("dockerd")
def test_docker_run_rm_prints_guest_output_and_exit_codes(dk: C.Dockerd) -> None:
    assert_guest_kernel(dk.docker(*DK_RUN, "--rm", DK_IMAGE, "uname", "-r"))
    assert_out_err_exit_3(dk.docker(*DK_RUN, "--rm", DK_IMAGE, *OUT_ERR_EXIT_3))
    assert dk.docker("ps", "-aq").stdout.split() == []


@pytest.mark.daemon("dockerd")
def test_docker_run_it_interactive_shell(dk: C.Dockerd) -> None:
    argv = [C.DOCKER, "-H", dk.host, *DK_RUN, "--rm", "-it", DK_IMAGE, "sh"]
    assert_shell_answered(*C.run_pty(argv, SHELL_INPUT))


@pytest.mark.daemon("dockerd")
def test_docker_exec_pause_update_stop_start_kill(dk: C.Dockerd) -> None:
    # PID 1 of the container turns SIGTERM into exit 7: `docker stop` must deliver it.
    loop = 'trap "exit 7" TERM; while :; do sleep 1; done'
    r = dk.docker(*DK_RUN, "-d", "--name", "dk-life", DK_IMAGE, "sh", "-c", loop)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        assert_leak_check_sees_a_sandbox(dk.runtime_root)
        assert_guest_kernel(dk.docker("exec", cid, "sh", "-c", "uname -r; exit 4"), 4)
        assert_tty_answered(*C.run_pty([C.DOCKER, "-H", dk.host, "exec", "-it", cid, *EXEC_TTY]))
        r = dk.docker("top", cid)
        assert r.returncode == 0 and "cocoon.shim" in r.stdout, r.stdout + r.stderr

        assert_pause_unpause(dk.docker, cid, lambda: dk_state(dk, cid, "Status"))

        r = dk.docker("update", "--memory", "300m", "--memory-swap", "600m", cid)
        assert r.returncode == 0, r.stderr
        limit = "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max"
        r = dk.docker("exec", cid, "sh", "-c", limit)
        assert r.stdout.strip() == str(300 << 20), r.stdout + r.stderr

        started = time.monotonic()
        r = dk.docker("stop", "-t", "30", cid)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - started < 25  # SIGTERM reached the workload, no SIGKILL
        assert dk_state(dk, cid, "ExitCode") == "7"
        C.assert_no_leaks(dk.runtime_root)

        assert dk.docker("start", cid).returncode == 0  # a second create + start
        assert dk_state(dk, cid, "Status") == "running"
        assert_killed_137(dk.docker, cid)
    finally:
        dk.docker("rm", "-f", cid)
    assert dk.docker("ps", "-aq").stdout.split() == []


@pytest.mark.daemon("dockerd")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a host with 2 CPUs or more")
def test_docker_update_hot_plugs_cpus_and_memory(dk: C.Dockerd) -> None:
    """`docker update` resizes the VM: the workload's nproc and MemTotal grow, then shrink."""
    r = dk.docker(*DK_RUN, "-d", DK_IMAGE, "sleep", "1000")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()

    def sees() -> tuple[int, int]:
        r = dk.docker("exec", cid, "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")
        return int(lines[0]), int(lines[1].split()[1]) // 1024

    try:
        cpus0, mem0 = sees()
        assert cpus0 == 1
        r = dk.docker("update", "--cpus", "2", "--memory", "768m", "--memory-swap", "2g", cid)
        assert r.returncode == 0, r.stderr
        cpus1, mem1 = sees()
        assert cpus1 == 2 and mem1 >= mem0 + 700, (cpus1, mem0, mem1)
        r = dk.docker("update", "--cpus", "1", "--memory", "128m", "--memory-swap", "256m", cid)
        assert r.returncode == 0, r.stderr
        cpus2, mem2 = sees()
        assert cpus2 == 1 and mem2 < mem1 - 500, (cpus2, mem1, mem2)
    finally:
        dk.docker("rm", "-f", cid)
    assert dk.docker("ps", "-aq").stdout.split() == []


@pytest.mark.daemon("dockerd")
def test_docker_rm_f_running(dk: C.Dockerd) -> None:
    r = dk.docker(*DK_RUN, "-d", DK_IMAGE, "sleep", "1000")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    assert dk_state(dk, cid, "Status") == "running"
    r = dk.docker("rm", "-f", cid)
    assert r.returncode == 0 and r.stdout.strip() == cid, r.stderr
    assert dk.docker("ps", "-aq").stdout.split() == []


# ---- podman -----------------------------------------------------------------------------

PM_IMAGE = "localhost/cocoon-busybox:test"
# --network none: the default (a CNI bridge) would add a host bridge and iptables rules.
PM_RUN = ["run", "--network", "none"]


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Iterator[C.Podman]:
    with C.podman(tmp_path_factory.mktemp("pm")) as pm:
        r = pm.podman("import", image_dir / "layer.tar", PM_IMAGE)
        assert r.returncode == 0, r.stderr
        yield pm


@pytest.fixture
def pm(podman_env: C.Podman) -> Iterator[C.Podman]:
    C.assert_no_leaks(C.PODMAN_ROOT, timeout=0)  # /run/cocoon is shared: start clean
    yield podman_env
    C.assert_no_leaks(C.PODMAN_ROOT, podman_env.base)


@pytest.mark.daemon("podman")
def test_podman_run_rm_on_rootfs_and_image(pm: C.Podman, image_dir: Path) -> None:
    assert_guest_kernel(pm.podman(*PM_RUN, "--rm", "--rootfs", image_dir / "rootfs", "uname", "-r"))
    assert_out_err_exit_3(pm.podman(*PM_RUN, "--rm", PM_IMAGE, *OUT_ERR_EXIT_3))
    assert pm.podman("ps", "-aq").stdout.split() == []


@pytest.mark.daemon("podman")
def test_podman_run_it_interactive_shell(pm: C.Podman) -> None:
    argv = [*pm.argv, *PM_RUN, "--rm", "-it", PM_IMAGE, "sh"]
    assert_shell_answered(*C.run_pty(argv, SHELL_INPUT, env=pm.env))


@pytest.mark.daemon("podman")
def test_podman_exec_pause_kill(pm: C.Podman) -> None:
    r = pm.podman(*PM_RUN, "-d", PM_IMAGE, "sleep", "1000")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        assert_leak_check_sees_a_sandbox(C.PODMAN_ROOT)
        assert_guest_kernel(pm.podman("exec", cid, "sh", "-c", "uname -r; exit 4"), 4)
        assert_tty_answered(*C.run_pty([*pm.argv, "exec", "-it", cid, *EXEC_TTY], env=pm.env))
        state = ["inspect", "-f", "{{.State.Status}}", cid]
        assert_pause_unpause(pm.podman, cid, lambda: pm.podman(*state).stdout.strip())
        assert_killed_137(pm.podman, cid)
    finally:
        pm.podman("rm", "-f", cid)
    assert pm.podman("ps", "-aq").stdout.split() == []


@pytest.mark.daemon("podman")
def test_podman_pod_is_one_vm(pm: C.Podman) -> None:
    """`podman pod create` + `podman run --pod`: the pod's containers share one VM, its
    127.0.0.1 and its hostname (podman marks them with CRI-O's pod annotations)."""
    infra = ["--infra-image", PM_IMAGE, "--infra-command", "sleep 2147483647"]
    r = pm.podman("pod", "create", "--name", "pp", "--hostname", "pphost", *infra)
    assert r.returncode == 0, r.stderr
    try:
        r = pm.podman(
            "run", "-d", "--pod", "pp", PM_IMAGE, "httpd", "-f", "-p", "8080", "-h", "/etc"
        )
        assert r.returncode == 0, r.stderr
        get = "wget -q -O - http://127.0.0.1:8080/passwd"
        fetch = f"for i in $(seq 50); do {get} && break; sleep 0.2; done"
        r = pm.podman("run", "--rm", "--pod", "pp", PM_IMAGE, "sh", "-c", f"{fetch}; hostname")
        assert r.returncode == 0, r.stderr
        assert "root:" in r.stdout and r.stdout.strip().endswith("pphost"), r.stdout
        sandboxes = sorted(p.name for p in (C.PODMAN_ROOT / "sandboxes").iterdir())
        assert len(sandboxes) == 1, f"one VM for the pod: {sandboxes}"
    finally:
        pm.podman("pod", "rm", "-f", "pp", timeout=180)
    assert pm.podman("ps", "-aq").stdout.split() == []
