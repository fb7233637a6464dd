"""The runc verbs, black box: every test drives a runtime binary exactly as callers do
(global flags first, stdio as pipes/files/a console socket, the pid file as "create done"),
and runs against runc too, which proves the tests (RUNTIME=runc or RUNTIME=cocoon picks one;
both by default).

The test process makes itself a child subreaper, as containerd-shim and conmon are, so the
processes whose pids the runtime reports (the shims for cocoon, the container init for runc)
are reparented to it and their exit statuses can be waited for.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.container import busybox
from tests.integration.cli import COCOON, Cli

pytestmark = [pytest.mark.root]

PR_SET_CHILD_SUBREAPER = 36


def _runtimes() -> list[Any]:
    wanted = os.environ.get("RUNTIME", "")
    out = []
    for name in ("runc", "cocoon"):
        if wanted and wanted != name:
            continue
        marks = [pytest.mark.qemu] if name == "cocoon" else []
        if name == "runc" and shutil.which("runc") is None:
            marks.append(pytest.mark.skip(reason="runc is not installed (apt-get install runc)"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


class Rt(Cli):
    """runc or cocoon (by name), driven the same way; ``work`` holds the containers' stdio."""

    def __init__(self, name: str, root: Path, tmp: Path) -> None:
        binary = COCOON if name == "cocoon" else str(shutil.which("runc"))
        super().__init__(root, tmp, binary, timeout=180)
        self.name = name
        self.work = tmp / "work"
        self.work.mkdir(exist_ok=True)

    def create_ok(self, cid: str, bundle: Path, *extra: str) -> int:
        """create with the container's stdio on files (work/<cid>.out/.err); returns its pid."""
        pid_file = self.work / f"{cid}.pid"
        with (
            open(self.work / f"{cid}.out", "wb") as out,
            open(self.work / f"{cid}.err", "wb") as err,
        ):
            argv = [*self.argv, "create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
            r = subprocess.run(
                [*argv, *extra, cid],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=180,
            )
        assert r.returncode == 0, (self.work / f"{cid}.err").read_text()
        return int(pid_file.read_text())

    def output(self, cid: str) -> str:
        return (self.work / f"{cid}.out").read_text(errors="replace")

    def state(self, cid: str) -> dict[str, Any]:
        return json.loads(self.ok("state", cid))  # type: ignore[no-any-return]

    def wait_status(self, cid: str, status: str, timeout: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            st = self.state(cid)
            if st["status"] == status or time.monotonic() > end:
                assert st["status"] == status, st
                return st
            time.sleep(0.1)

    def wait_output(self, cid: str, text: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while text not in self.output(cid):
            assert time.monotonic() < end, f"{text!r} not in output: {self.output(cid)!r}"
            time.sleep(0.1)
        return self.output(cid)

    def error_logged(self, fragment: str = "") -> dict[str, Any]:
        """The last --log line: runc-style JSON, level error (holding ``fragment``)."""
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        errors = [r for r in lines if r.get("level") == "error"]
        assert errors, f"no error line in {self.log}: {lines}"
        assert {"level", "msg", "time"} <= set(errors[-1]), errors[-1]
        if self.name == "cocoon":  # runc's messages are terser (no ids); cocoon's say more
            assert fragment.lower() in errors[-1]["msg"].lower(), errors[-1]
        last: dict[str, Any] = errors[-1]
        return last

    def rejected(self, r: subprocess.CompletedProcess[str]) -> bool:
        """A refused call: exit 1 for cocoon (runc uses 1, and 255 for exec errors)."""
        return r.returncode == 1 if self.name == "cocoon" else r.returncode in (1, 255)

    def ids(self) -> list[str]:
        return self.ok("list", "-q").split()


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_orphans() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def wait_pid(pid: int, timeout: float = 60) -> int:
    """Waits for a reparented pid; returns the status as a shell sees it (128+sig)."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return (
                os.waitstatus_to_exitcode(status) % 256
                if os.WIFEXITED(status)
                else (128 + os.WTERMSIG(status))
            )
        assert time.monotonic() < end, f"pid {pid} did not exit"
        time.sleep(0.05)


@pytest.fixture(params=_runtimes())
def rt(request: pytest.FixtureRequest, state_root: Path, tmp_path: Path) -> Iterator[Rt]:
    r = Rt(request.param, state_root, tmp_path)
    yield r
    # Whatever a failing test left: force-delete it, so the leak check sees only real leaks.
    leftovers = r.ids()
    for cid in leftovers:
        r("delete", "--force", cid)
    reap_orphans()
    assert not leftovers, f"containers left: {leftovers}"


@pytest.fixture
def mkbundle(tmp_path: Path) -> Callable[..., Path]:
    count = [0]

    def make(args: list[str], **process: Any) -> Path:
        count[0] += 1
        return busybox.make_bundle(tmp_path / f"bundle{count[0]}", args, **process)

    return make


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


# ------------------------------------------------------------------------------- run
def test_run_prints_output_and_returns_status(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(sh("echo out; echo err >&2; uname -r; hostname; exit 3"))
    r = rt("run", "--bundle", str(b), "c1")
    assert r.returncode == 3, r.stderr
    out = r.stdout.split()
    assert out[0] == "out" and "err" in r.stderr
    if rt.name == "cocoon":
        assert out[1] != os.uname().release  # the guest's kernel, not the host's
    assert out[2] == "cocoon"  # the spec's hostname
    assert rt.ids() == []


@contextlib.contextmanager
def run_until_ready(rt: Rt, bundle: Path) -> Iterator[subprocess.Popen[str]]:
    """`run` in the foreground, once the workload has printed its first line (ready)."""
    proc = subprocess.Popen(
        [*rt.argv, "run", "--bundle", str(bundle), "c1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_run_killed_returns_137(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    with run_until_ready(rt, mkbundle(sh("echo ready; exec sleep 1000"))) as proc:
        rt.ok("kill", "c1", "KILL")
        assert proc.wait(60) == 137


def test_stdin_reaches_workload_until_eof(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    data = "".join(f"line {i}\n" for i in range(20000))
    b = mkbundle(sh("wc -c; echo after-eof"))
    r = rt("run", "--bundle", str(b), "c1", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(data)), "after-eof"]


def test_100_mib_of_stdout_arrive_byte_exact(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    size = 100 * 1024 * 1024
    line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\n"
    b = mkbundle(sh(f"yes '{line.strip()}' | head -c {size}"))
    proc = subprocess.Popen(
        [*rt.argv, "run", "--bundle", str(b), "c1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    got = hashlib.sha256()
    n = 0
    assert proc.stdout is not None
    while chunk := proc.stdout.read(1 << 20):
        got.update(chunk)
        n += len(chunk)
    assert proc.wait(60) == 0
    want = hashlib.sha256((line * (size // len(line) + 1)).encode()[:size])
    assert n == size
    assert got.hexdigest() == want.hexdigest()


def test_sigterm_to_run_reaches_the_workload(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(sh("trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done"))
    with run_until_ready(rt, b) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 7
        assert proc.stdout is not None and proc.stdout.read().strip() == "got TERM"


# ------------------------------------------------------------------------------- create/start
def test_create_start_state_kill_delete(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(sh("echo started; exec sleep 1000"))
    pid = rt.create_ok("c1", b)
    st = rt.state("c1")
    assert st["status"] == "created" and st["pid"] == pid and st["id"] == "c1"
    assert st["bundle"] == str(b) and st["ociVersion"]
    assert rt.output("c1") == ""  # nothing runs before start
    assert rt("start", "c1").returncode == 0
    rt.wait_output("c1", "started")
    assert rt.state("c1")["status"] == "running"
    # start twice is an error; delete of a running container without --force too
    assert rt("start", "c1").returncode == 1
    r = rt("delete", "c1")
    assert r.returncode == 1
    rt.error_logged("c1")
    rt.ok("kill", "c1", "9")
    assert wait_pid(pid) == 137
    rt.wait_status("c1", "stopped")
    # kill --all of a stopped container: 0 (containerd sends it after every exit); the plain
    # form is an error, as the runtime spec says ("container not running", runc's words).
    rt.ok("kill", "--all", "c1", "KILL")
    r = rt("kill", "c1", "KILL")
    assert r.returncode == 1 and "container not running" in r.stderr, r.stderr
    rt.error_logged("container not running")
    rt.ok("delete", "c1")
    r = rt("state", "c1")
    assert r.returncode == 1
    rt.error_logged("c1")
    rt.ok("delete", "--force", "c1")  # a missing container with --force: 0


def test_config_json_changed_after_create_changes_nothing(
    rt: Rt, mkbundle: Callable[..., Path], tmp_path: Path
) -> None:
    """Every verb after create works from what create read: config.json replaced, then removed,
    changes neither start (its poststart hook still runs) nor delete."""
    b = mkbundle(sh("echo started; exec sleep 1000"))
    spec = json.loads((b / "config.json").read_text())
    marker = tmp_path / "poststart-ran"
    spec["hooks"] = {"poststart": [{"path": "/bin/sh", "args": ["sh", "-c", f"touch {marker}"]}]}
    (b / "config.json").write_text(json.dumps(spec))
    pid = rt.create_ok("c1", b)
    (b / "config.json").write_text(json.dumps({"ociVersion": "1.0.0"}))
    rt.ok("start", "c1")
    rt.wait_output("c1", "started")
    assert marker.exists(), "the poststart hook create read"
    rt.ok("kill", "c1", "KILL")
    wait_pid(pid)
    rt.wait_status("c1", "stopped")
    (b / "config.json").unlink()
    rt.ok("delete", "c1")


@pytest.mark.parametrize("model", ["", "none"])
def test_a_new_network_namespace_has_lo_up(
    rt: Rt, mkbundle: Callable[..., Path], model: str
) -> None:
    """A container in a new network namespace with nothing to bridge still has lo up (runc
    brings it up), and reaches itself on 127.0.0.1. With cocoon's network model "none" the
    container has a network namespace of its own in the guest too, whose lo the agent brings
    up between crun's create and start (a `run` is then not started in one crun call)."""
    b = mkbundle(
        sh(
            "cat /sys/class/net/lo/flags; httpd -p 127.0.0.1:8080 -h /etc; "
            "wget -q -O - http://127.0.0.1:8080/hostname && echo fetched"
        )
    )
    spec = json.loads((b / "config.json").read_text())
    assert {"type": "network"} in spec["linux"]["namespaces"]
    if model:  # runc ignores the annotation
        spec.setdefault("annotations", {})["io.cocoon.config.network.model"] = model
        (b / "config.json").write_text(json.dumps(spec))
    r = rt("run", "--bundle", str(b), "c1")
    assert r.returncode == 0, r.stderr
    flags = int(r.stdout.split()[0], 16)
    assert flags & 0x1, f"lo is down: flags {flags:#x}"  # IFF_UP
    assert r.stdout.rstrip().endswith("fetched"), r.stdout


def test_a_device_node_no_host_device_backs_is_made(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    """linux.devices lists nodes the runtime makes: one whose major:minor is on no host device
    is made in the container all the same (runc mknods it)."""
    b = mkbundle(sh("stat -c '%F %t:%T %a' /dev/made"))
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["devices"] = [
        {"path": "/dev/made", "type": "b", "major": 8, "minor": 666, "fileMode": 0o640}
    ]
    (b / "config.json").write_text(json.dumps(spec))
    r = rt("run", "--bundle", str(b), "c1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "block special file 8:29a 640", r.stdout


def test_bind_mount_propagation_options(
    rt: Rt, mkbundle: Callable[..., Path], tmp_path: Path
) -> None:
    """Bind mounts with shared / rshared get a peer group of their own in the container; with
    slave, rslave or private (of a private source) none, as under runc."""
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_text("x")
    b = mkbundle(sh('grep -E " /v[1-5] " /proc/self/mountinfo; cat /v2/f'))
    spec = json.loads((b / "config.json").read_text())
    for i, opt in enumerate(["shared", "rshared", "slave", "rslave", "private"], 1):
        spec["mounts"].append(
            {"destination": f"/v{i}", "type": "bind", "source": str(vol), "options": ["rbind", opt]}
        )
    (b / "config.json").write_text(json.dumps(spec))
    r = rt("run", "--bundle", str(b), "c1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    by_dest = {line.split()[4]: line.split(" - ")[0].split()[6:] for line in lines[:-1]}
    assert sorted(by_dest) == ["/v1", "/v2", "/v3", "/v4", "/v5"], r.stdout
    for dest in ("/v1", "/v2"):
        assert any(f.startswith("shared:") for f in by_dest[dest]), (dest, r.stdout)
    for dest in ("/v3", "/v4", "/v5"):
        assert not any(f.startswith("shared:") for f in by_dest[dest]), (dest, r.stdout)
    assert lines[-1] == "x"


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_the_reported_pid_is_in_the_containers_new_namespaces(
    rt: Rt, mkbundle: Callable[..., Path]
) -> None:
    """/proc/<pid>/ns/* of the pid a runtime reports (runc: the workload; cocoon: its shim)
    shows the new IPC, UTS and cgroup namespaces the spec asks for, and an exec's pid is in the
    same ones, as callers that look there (the CRI, for a sandbox) expect."""
    pid = rt.create_ok("c1", mkbundle(["sleep", "1000"]))
    for kind in ("ipc", "uts", "cgroup", "net"):
        assert _ns(pid, kind) != _ns("self", kind), kind
    rt.ok("start", "c1")
    pid_file = rt.work / "exec.pid"
    subprocess.run(  # detached: its stdio stays open in the process, never a pipe here
        [*rt.argv, "exec", "-d", "--pid-file", str(pid_file), "c1", "sleep", "1000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        check=True, timeout=120,
    )  # fmt: skip
    epid = int(pid_file.read_text())
    for kind in ("ipc", "uts", "cgroup", "net"):
        assert _ns(epid, kind) == _ns(pid, kind), kind
    rt.ok("kill", "c1", "KILL")
    wait_pid(epid)  # first: a PID namespace's init is not reaped before its last process
    wait_pid(pid)
    rt.ok("delete", "c1")


def test_sigterm_to_the_reported_pid_reaches_the_workload(
    rt: Rt, mkbundle: Callable[..., Path]
) -> None:
    """Callers signal the pid from --pid-file directly (kill(2)): it must reach the workload."""
    b = mkbundle(sh("trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done"))
    pid = rt.create_ok("c1", b)
    rt.ok("start", "c1")
    rt.wait_output("c1", "ready")
    os.kill(pid, signal.SIGTERM)
    assert wait_pid(pid) == 7
    assert "got TERM" in rt.output("c1")
    rt.wait_status("c1", "stopped")
    rt.ok("delete", "c1")


def test_kill_signal_names_and_numbers(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(
        sh(
            "trap 'echo got USR1' USR1; trap 'echo got HUP' HUP; trap 'echo got USR2' USR2;"
            " echo ready; while :; do sleep 0.1; done"
        )
    )
    pid = rt.create_ok("c1", b)
    rt.ok("start", "c1")
    rt.wait_output("c1", "ready")
    rt.ok("kill", "c1", "USR1")
    rt.wait_output("c1", "got USR1")
    rt.ok("kill", "c1", "1")
    rt.wait_output("c1", "got HUP")
    rt.ok("kill", "c1", "SIGUSR2")
    rt.wait_output("c1", "got USR2")
    r = rt("kill", "c1", "NOSUCHSIG")
    assert r.returncode == 1
    rt.error_logged("signal")
    rt.ok("kill", "--all", "c1", "KILL")
    assert wait_pid(pid) == 137
    rt.ok("delete", "c1")


def test_pause_resume(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    # The counter is replaced whole (a rename), so a reader never sees it truncated.
    count = (
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done"
    )
    b = mkbundle(sh(count))
    pid = rt.create_ok("c1", b)
    rt.ok("start", "c1")
    rt.ok("pause", "c1")
    assert rt.state("c1")["status"] == "paused"
    assert rt("exec", "c1", "true").returncode != 0  # no exec into a paused container
    rt.ok("resume", "c1")
    assert rt.state("c1")["status"] == "running"
    first = rt.ok("exec", "c1", "cat", "/tmp/n")
    time.sleep(1)
    assert int(rt.ok("exec", "c1", "cat", "/tmp/n")) > int(first)
    rt.ok("kill", "c1", "KILL")
    wait_pid(pid)
    rt.ok("delete", "c1")


def test_a_created_container_takes_exec_pause_and_delete(
    rt: Rt, mkbundle: Callable[..., Path]
) -> None:
    """As runc: exec into a created container (its workload not started), pause and resume it
    (back to created), and delete it without --force (killed and destroyed)."""
    b = mkbundle(["sh", "-c", "echo started; sleep 1000"])
    pid = rt.create_ok("c1", b)
    assert rt.ok("exec", "c1", "echo", "in-created") == "in-created\n"
    rt.ok("pause", "c1")
    assert rt.state("c1")["status"] == "paused"
    rt.ok("resume", "c1")
    assert rt.state("c1")["status"] == "created"
    assert "started" not in rt.output("c1")
    rt.ok("start", "c1")
    rt.wait_output("c1", "started")
    rt.ok("kill", "c1", "KILL")
    wait_pid(pid)
    rt.ok("delete", "c1")
    pid = rt.create_ok("c2", b)
    rt.ok("delete", "c2")  # created: no --force needed
    assert "c2" not in rt.ids()
    wait_pid(pid)
    assert "started" not in rt.output("c2")


def test_delete_force_running_and_paused(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(["sleep", "1000"])
    rt.create_ok("c1", b)
    rt.ok("start", "c1")
    rt.ok("pause", "c1")
    rt.ok("delete", "--force", "c1")
    assert rt.ids() == []
    rt.create_ok("c2", b)  # created, never started
    rt.ok("delete", "--force", "c2")
    assert rt.ids() == []


# ------------------------------------------------------------------------------- exec
def test_exec_variants(rt: Rt, mkbundle: Callable[..., Path], tmp_path: Path) -> None:
    b = mkbundle(["sleep", "1000"])
    pid = rt.create_ok("c1", b)
    rt.ok("start", "c1")
    r = rt("exec", "-e", "FOO=bar", "c1", "sh", "-c", "echo $FOO; exit 5")
    assert r.returncode == 5 and r.stdout.strip() == "bar"
    assert rt.ok("exec", "--cwd", "/tmp", "c1", "pwd").strip() == "/tmp"
    assert rt.ok("exec", "-u", "65534:65534", "c1", "id", "-u").strip() == "65534"
    assert rt.ok("exec", "c1", "echo", "-n", "x") == "x"
    # the callers' form: --process FILE --detach --pid-file
    proc_file = tmp_path / "process.json"
    proc_file.write_text(
        json.dumps(
            {
                "args": ["sh", "-c", "echo detached > /tmp/d; exit 4"],
                "cwd": "/",
                "env": ["PATH=/bin"],
                "user": {"uid": 0, "gid": 0},
                "terminal": False,
            }
        )
    )
    epid_file = tmp_path / "exec.pid"
    rt.ok("exec", "--process", str(proc_file), "--detach", "--pid-file", str(epid_file), "c1")
    assert wait_pid(int(epid_file.read_text())) == 4
    assert rt.ok("exec", "c1", "cat", "/tmp/d").strip() == "detached"
    # ps --format json lists the pid that stands for the container
    pids = json.loads(rt.ok("ps", "--format", "json", "c1"))
    assert pid in pids
    # a process file that does not parse
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = rt("exec", "--process", str(bad), "c1")
    assert rt.rejected(r), r
    rt.error_logged()
    rt.ok("kill", "c1", "KILL")
    wait_pid(pid)
    rt.wait_status("c1", "stopped")
    r = rt("exec", "c1", "true")
    assert rt.rejected(r), r  # exec on a stopped container
    rt.error_logged()
    rt.ok("delete", "c1")


def test_an_exec_dies_with_its_pid(rt: Rt, mkbundle: Callable[..., Path], tmp_path: Path) -> None:
    """SIGKILL to the pid an exec's --pid-file names (conmon does it when a probe times out)
    ends the process in the guest, as it would under runc, and the container runs on."""
    pid = rt.create_ok("c1", mkbundle(["sleep", "1000"]))
    rt.ok("start", "c1")
    proc_file = tmp_path / "process.json"
    proc_file.write_text(
        json.dumps(
            {
                "args": ["sleep", "7777"],
                "cwd": "/",
                "env": ["PATH=/bin"],
                "user": {"uid": 0, "gid": 0},
            }
        )
    )
    epid_file = tmp_path / "exec.pid"
    # stdio on a file: the process (runc) or its shim (cocoon) keeps it open while it runs
    with open(tmp_path / "exec.out", "wb") as out:
        argv = [*rt.argv, "exec", "--process", str(proc_file), "--detach", "--pid-file"]
        r = subprocess.run(
            [*argv, str(epid_file), "c1"], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    assert r.returncode == 0, (tmp_path / "exec.out").read_text()
    assert "sleep 7777" in rt.ok("exec", "c1", "ps", "-o", "args")
    epid = int(epid_file.read_text())
    os.kill(epid, signal.SIGKILL)
    assert wait_pid(epid) == 128 + signal.SIGKILL
    end = time.monotonic() + 30
    while "sleep 7777" in rt.ok("exec", "c1", "ps", "-o", "args") and time.monotonic() < end:
        time.sleep(0.5)
    assert "sleep 7777" not in rt.ok("exec", "c1", "ps", "-o", "args")
    assert rt.state("c1")["status"] == "running"
    rt.ok("kill", "c1", "KILL")
    wait_pid(pid)
    rt.ok("delete", "c1")


# ------------------------------------------------------------------------------- terminal
def _console_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    s.settimeout(180)
    return s


def _receive_master(listener: socket.socket) -> int:
    conn, _ = listener.accept()
    with conn:
        fds = array.array("i")
        _msg, anc, _flags, _addr = conn.recvmsg(1024, socket.CMSG_LEN(fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: fds.itemsize])
    assert len(fds) == 1, "no pty master received on the console socket"
    return fds[0]


def _talk(master: int, command: bytes, expect: bytes, timeout: float = 60) -> bytes:
    os.write(master, command)
    seen = b""
    end = time.monotonic() + timeout
    while expect not in seen:
        r, _, _ = select.select([master], [], [], max(0.0, end - time.monotonic()))
        assert r, f"{expect!r} not seen on the terminal: {seen!r}"
        try:
            seen += os.read(master, 4096)
        except OSError:
            break
    assert expect in seen, seen
    return seen


def test_terminal_over_console_socket(
    rt: Rt, mkbundle: Callable[..., Path], tmp_path: Path
) -> None:
    b = mkbundle(["sh"], terminal=True)
    sock = tmp_path / "console.sock"
    listener = _console_listener(sock)
    pid_file = rt.work / "c1.pid"
    argv = [*rt.argv, "create", "--bundle", str(b), "--console-socket", str(sock)]
    create = subprocess.Popen(
        [*argv, "--pid-file", str(pid_file), "c1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    master = _receive_master(listener)
    try:
        _, err = create.communicate(timeout=180)
        assert create.returncode == 0, err
        pid = int(pid_file.read_text())
        rt.ok("start", "c1")
        _talk(master, b"", b"# ")
        _talk(master, b"echo $((6*7))x\n", b"42x")
        _talk(master, b"tty\n", b"/dev/pts/")
        # an exec with its own terminal, as containerd/dockerd ask for one
        esock = tmp_path / "exec.sock"
        elistener = _console_listener(esock)
        epid_file = tmp_path / "exec.pid"
        r = rt(
            "exec",
            "-t",
            "-d",
            "--console-socket",
            str(esock),
            "--pid-file",
            str(epid_file),
            "c1",
            "sh",
        )
        assert r.returncode == 0, r.stderr
        emaster = _receive_master(elistener)
        try:
            _talk(emaster, b"", b"# ")
            _talk(emaster, b"echo $((7*6))y\n", b"42y")
            os.write(emaster, b"exit 6\n")
            assert wait_pid(int(epid_file.read_text())) == 6
        finally:
            os.close(emaster)
            elistener.close()
        os.write(master, b"exit 0\n")
        assert wait_pid(pid) == 0
    finally:
        os.close(master)
        listener.close()
        create.kill()
        create.wait()
    rt.wait_status("c1", "stopped")
    rt.ok("delete", "c1")


def test_terminal_without_console_socket_is_refused(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(["sh"], terminal=True)
    r = rt("create", "--bundle", str(b), "c1")
    assert r.returncode == 1
    rt.error_logged("console")
    assert rt.ids() == []


# ------------------------------------------------------------------------------- update/list
def test_update_limits_seen_in_the_container(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(["sleep", "1000"])
    pid = rt.create_ok("c1", b)
    rt.ok("start", "c1")
    limit = 256 * 1024 * 1024
    rt.ok("update", "--resources", "-", "c1", input=json.dumps({"memory": {"limit": limit}}))
    read_mem = "cat /sys/fs/cgroup/memory.max 2>/dev/null || " + (
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
    )
    assert rt.ok("exec", "c1", "sh", "-c", read_mem).strip() == str(limit)
    rt.ok("update", "--pids-limit", "77", "c1")
    read_pids = "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max"
    assert rt.ok("exec", "c1", "sh", "-c", read_pids).strip() == "77"
    ev = json.loads(rt.ok("events", "--stats", "c1"))
    assert ev["type"] == "stats" and ev["id"] == "c1", ev
    assert ev["data"]["memory"]["usage"]["limit"] == limit, ev
    assert ev["data"]["pids"]["limit"] == 77 and ev["data"]["pids"]["current"] >= 1, ev
    r = rt("update", "--resources", "-", "c1", input="{oops")
    assert r.returncode == 1
    rt.error_logged()
    rt.ok("kill", "c1", "KILL")
    wait_pid(pid)
    rt.ok("delete", "c1")


def test_list_formats(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(["sleep", "1000"])
    pid = rt.create_ok("c1", b)
    assert rt.ids() == ["c1"]
    listed = json.loads(rt.ok("list", "--format", "json"))
    assert [(c["id"], c["status"], c["pid"]) for c in listed] == [("c1", "created", pid)]
    table = rt.ok("list").splitlines()
    assert table[0].split()[:3] == ["ID", "PID", "STATUS"]
    assert table[1].split()[:3] == ["c1", str(pid), "created"]
    rt.ok("delete", "--force", "c1")
    assert json.loads(rt.ok("list", "--format", "json") or "null") in (None, [])


# ------------------------------------------------------------------------------- bad input
def _assert_rejected(rt: Rt, r: subprocess.CompletedProcess[str], fragment: str = "") -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip(), "no message on stderr"
    rt.error_logged(fragment)
    assert rt.ids() == []


@pytest.mark.parametrize("case", ["no-config", "bad-json", "no-rootfs", "no-args", "not-an-object"])
def test_bad_bundles(rt: Rt, mkbundle: Callable[..., Path], case: str) -> None:
    b = mkbundle(["true"])
    cfg = b / "config.json"
    if case == "no-config":
        cfg.unlink()
    elif case == "bad-json":
        cfg.write_text(cfg.read_text()[:-20])
    elif case == "no-rootfs":
        shutil.rmtree(b / "rootfs")
    elif case == "no-args":
        spec = json.loads(cfg.read_text())
        spec["process"]["args"] = []
        cfg.write_text(json.dumps(spec))
    else:
        cfg.write_text("[1, 2]")
    _assert_rejected(rt, rt("create", "--bundle", str(b), "c1"))


@pytest.mark.parametrize("cid", ["", "a/b", "..", "../x", "x" * 300])
def test_bad_ids(rt: Rt, mkbundle: Callable[..., Path], cid: str) -> None:
    b = mkbundle(["true"])
    _assert_rejected(rt, rt("create", "--bundle", str(b), cid))


def test_existing_id_is_refused_and_kept(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(["sleep", "1000"])
    rt.create_ok("c1", b)
    r = rt("create", "--bundle", str(b), "c1")
    assert r.returncode == 1
    rt.error_logged("c1")
    assert rt.state("c1")["status"] == "created"  # the first one is untouched
    rt.ok("delete", "--force", "c1")


def test_verbs_on_missing_containers(rt: Rt) -> None:
    for verb in (["start"], ["state"], ["pause"], ["resume"], ["exec"], ["kill"], ["delete"]):
        args = [*verb, "ghost"] + (["true"] if verb == ["exec"] else [])
        r = rt(*args)
        assert rt.rejected(r), (verb, r.stdout, r.stderr)
        rt.error_logged("ghost")


# ------------------------------------------------------------------------------- no VM
def test_version_spec_features(rt: Rt, tmp_path: Path) -> None:
    out = rt.ok("--version")
    assert any(line.startswith("commit:") for line in out.splitlines())
    d = tmp_path / "spec"
    d.mkdir()
    subprocess.run([*rt.argv, "spec"], cwd=d, check=True, timeout=30)
    spec = json.loads((d / "config.json").read_text())
    assert spec["process"]["args"] == ["sh"] and spec["root"]["path"] == "rootfs"
    feats = json.loads(rt.ok("features"))
    assert "prestart" in feats["hooks"] and feats["ociVersionMax"]


# ------------------------------------------------------------------------------- hooks
def _hook(out: Path) -> dict[str, Any]:
    return {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {out}"], "timeout": 30}


def test_host_hooks_get_the_state(rt: Rt, mkbundle: Callable[..., Path], tmp_path: Path) -> None:
    b = mkbundle(["sleep", "1000"])
    spec = json.loads((b / "config.json").read_text())
    spec["hooks"] = {
        kind: [_hook(tmp_path / f"{kind}.json")]
        for kind in ("prestart", "createRuntime", "poststart", "poststop")
    }
    (b / "config.json").write_text(json.dumps(spec))
    pid = rt.create_ok("c1", b)
    for kind in ("prestart", "createRuntime"):
        st = json.loads((tmp_path / f"{kind}.json").read_text())
        assert st["id"] == "c1" and st["pid"] == pid and st["bundle"] == str(b), st
    if rt.name == "cocoon":  # runc 1.1 runs poststart at create (fixed in runc 1.2)
        assert not (tmp_path / "poststart.json").exists()
    rt.ok("start", "c1")
    assert json.loads((tmp_path / "poststart.json").read_text())["id"] == "c1"
    rt.ok("kill", "c1", "KILL")
    wait_pid(pid)
    rt.wait_status("c1", "stopped")
    rt.ok("delete", "c1")
    assert json.loads((tmp_path / "poststop.json").read_text())["id"] == "c1"


def _run_detached(rt: Rt, cid: str, bundle: Path) -> int:
    """`run -d` with the container's stdio on files (its shim keeps them); returns its pid."""
    pid_file = rt.work / f"{cid}.pid"
    with open(rt.work / f"{cid}.out", "wb") as out, open(rt.work / f"{cid}.err", "wb") as err:
        argv = [*rt.argv, "run", "-d", "--pid-file", str(pid_file), "--bundle", str(bundle), cid]
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=180)
    assert r.returncode == 0, (rt.work / f"{cid}.err").read_text()
    return int(pid_file.read_text())


def test_run_starts_at_create_unless_hooks_come_between(
    rt: Rt, mkbundle: Callable[..., Path], tmp_path: Path, state_root: Path
) -> None:
    """`run` of a container without prestart or createRuntime hooks: started by the call that
    creates it (in cocoon's guest, one `crun run --detach`). With those hooks, they run
    between the create (status "created") and the start, and poststart after the start."""
    plain = mkbundle(sh("echo early; exec sleep 1000"))
    pid = _run_detached(rt, "c1", plain)
    assert rt.state("c1")["status"] == "running"
    rt.wait_output("c1", "early")
    hooked = mkbundle(sh("echo hooked; exec sleep 1000"))
    spec = json.loads((hooked / "config.json").read_text())
    spec["hooks"] = {
        kind: [_hook(tmp_path / f"{kind}.json")]
        for kind in ("prestart", "createRuntime", "poststart")
    }
    (hooked / "config.json").write_text(json.dumps(spec))
    pid2 = _run_detached(rt, "c2", hooked)
    assert rt.state("c2")["status"] == "running"
    rt.wait_output("c2", "hooked")
    for kind in ("prestart", "createRuntime", "poststart"):
        st = json.loads((tmp_path / f"{kind}.json").read_text())
        assert st["id"] == "c2" and st["pid"] == pid2, (kind, st)
    if rt.name == "cocoon":  # runc 1.1 runs poststart at create (see above)
        for kind, status in (("prestart", "created"), ("poststart", "running")):
            assert json.loads((tmp_path / f"{kind}.json").read_text())["status"] == status
        # what the agent did in each VM, from its log
        for cid, said in (("c1", "started (crun run --detach)"), ("c2", "created (crun create)")):
            log = (state_root / "sandboxes" / cid / "console.log").read_text()  # the agent's
            assert f"container {cid} {said}" in log, log[-2000:]
            # gRPC's asyncio half was never imported in the guest (agent/deferred.py)
            assert "(deferred, not imported: asyncio, grpc.aio)" in log, log[-2000:]
            assert "imported on first use" not in log, log[-2000:]
    for cid, p in (("c1", pid), ("c2", pid2)):
        rt.ok("kill", cid, "KILL")
        wait_pid(p)
        rt.ok("delete", cid)


def test_failing_prestart_hook_fails_create(rt: Rt, mkbundle: Callable[..., Path]) -> None:
    b = mkbundle(["sleep", "1000"])
    spec = json.loads((b / "config.json").read_text())
    spec["hooks"] = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 9"]}]}
    (b / "config.json").write_text(json.dumps(spec))
    r = rt("create", "--bundle", str(b), "c1")
    assert r.returncode == 1
    rt.error_logged()
    assert rt.ids() == []


def test_run_in_the_foreground_on_the_callers_terminal(
    rt: Rt, mkbundle: Callable[..., Path]
) -> None:
    """`run` of a terminal spec without --console-socket uses the caller's own terminal."""
    b = mkbundle(["sh"], terminal=True)
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [*rt.argv, "run", "--bundle", str(b), "c1"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        _talk(master, b"", b"# ", timeout=120)  # type when the shell is there, as a person would
        _talk(master, b"echo $((6*7))z\n", b"42z")
        os.write(master, b"exit 3\n")
        assert proc.wait(60) == 3
    finally:
        os.close(master)
        proc.kill()
        proc.wait()


def test_exec_stdio_edge_cases(rt: Rt, mkbundle: Callable[..., Path], tmp_path: Path) -> None:
    """What the data path must not lose or hang on (the same under runc): 10,000 small writes
    in order, a process that closes its stdout and runs on, a long stream without newlines."""
    pid = rt.create_ok("c1", mkbundle(["sleep", "1000"]))
    rt.ok("start", "c1")
    r = rt("exec", "c1", "sh", "-c", "i=0; while [ $i -lt 10000 ]; do echo $i; i=$((i+1)); done")
    assert r.returncode == 0 and r.stdout.split("\n") == [*map(str, range(10000)), ""]
    r = rt("exec", "c1", "sh", "-c", "exec >&-; sleep 1; echo after >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "", "after\n")
    size = 16 * 1024 * 1024
    p = subprocess.run(
        [*rt.argv, "exec", "c1", "sh", "-c", f"yes abcdefgh | tr -d '\\n' | head -c {size}"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=180,
    )  # fmt: skip
    assert p.returncode == 0 and len(p.stdout) == size
    assert p.stdout == b"abcdefgh" * (size // 8)
    # stdin as the caller gives it. Its own form (--detach, containerd's and conmon's): /dev/null
    # is /dev/null to the process (cocoon starts it on the guest's, and opens no stdin stream).
    # In the foreground (runc copies through pipes then): EOF at once, or the caller's bytes.
    with open(tmp_path / "exec.out", "wb") as out:
        argv = [*rt.argv, "exec", "--detach", "--pid-file", str(tmp_path / "e.pid"), "c1"]
        look = ["sh", "-c", "readlink /proc/self/fd/0 > /tmp/fd0; cat > /tmp/in"]
        d = subprocess.run([*argv, *look], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    assert d.returncode == 0, (tmp_path / "exec.out").read_text()
    assert wait_pid(int((tmp_path / "e.pid").read_text())) == 0
    assert rt.ok("exec", "c1", "cat", "/tmp/fd0", "/tmp/in") == "/dev/null\n"
    for given, want in ((None, b""), (b"piped", b"piped")):
        kw: dict[str, Any] = {"input": given} if given else {"stdin": subprocess.DEVNULL}
        p = subprocess.run([*rt.argv, "exec", "c1", "cat"], capture_output=True, timeout=60, **kw)
        assert (p.returncode, p.stdout) == (0, want), p.stderr
    assert rt.state("c1")["status"] == "running"
    rt.ok("kill", "c1", "KILL")
    wait_pid(pid)
    rt.ok("delete", "c1")
