"""The monitors' fork server (monitor.forkserver) and its client (sandbox.spawn), with a small
target (forkserver_target) forked in place of a monitor: what a forked process inherits and
what it does not, its command line, exit statuses, concurrent launches, bad requests, a
stale or killed server, and the fallback to a fresh interpreter. No VM is booted here; the
integration tests fork real monitors."""

from __future__ import annotations

import array
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cocoon.runtime.monitor import forkserver
from cocoon.runtime.sandbox import spawn

REPO = Path(__file__).resolve().parents[2]
TARGET = "tests.unit.forkserver_target"
SERVER_ARGS = ("--preload", "json", "--target", f"{TARGET}:run")


def eventually(cond: Callable[[], object], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Absolute: a test changes directory before it launches, and the server's imports must
    # find the cocoon this process runs.
    here = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *here]))
    r = tmp_path / "root"
    r.mkdir()
    yield r
    assert eventually(lambda: not spawn.server_pids(r)), f"fork server left: {spawn.server_pids(r)}"
    assert not spawn.socket_path(r).exists()


def launch(root: Path, *args: str) -> tuple[spawn.Forked, dict[str, object], int]:
    """The target forked with ``args``: its process, its report, and its ready fd's number
    as passed on its command line."""
    r, w = os.pipe()
    try:
        p = spawn.forked(
            root, [sys.executable, "-m", TARGET, *args], root / "target.log", w, SERVER_ARGS
        )
    finally:
        os.close(w)
    try:
        line = spawn.read_line(r, 30)
    finally:
        os.close(r)
    me = json.loads(line)
    return p, me, int(me["argv"][-1])


def test_a_forked_process_has_its_launchers_state_and_none_of_the_servers(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COCOON_TEST_MARK", "from the launcher")
    monkeypatch.chdir(tmp_path)
    old_mask = os.umask(0o027)
    old_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1000, old_nofile[1]))
    try:
        p, me, ready = launch(root, "--sleep", "0.5")
    finally:
        os.umask(old_mask)
        resource.setrlimit(resource.RLIMIT_NOFILE, old_nofile)
    (server,) = spawn.server_pids(root) or [0]
    assert me["pid"] == p.pid and me["ppid"] == server
    # The command line a monitor started by Popen would have, NUL-separated.
    cmdline = str(me["cmdline"]).rstrip("\0").split("\0")
    assert cmdline == [sys.executable, "-m", TARGET, "--sleep", "0.5", "--ready-fd", str(ready)]
    assert me["argv"] == [TARGET, "--sleep", "0.5", "--ready-fd", str(ready)]
    env = me["env"]
    assert isinstance(env, dict)
    assert env["COCOON_TEST_MARK"] == "from the launcher" and spawn.ROOM_ENV not in env
    assert me["umask"] == 0o027 and me["cwd"] == str(tmp_path)
    assert me["nofile"] == [1000, old_nofile[1]]
    assert me["sid"] == p.pid and me["stdin_null"] is True
    assert me["fds"] == [0, 1, 2, ready], f"the server's fds leaked into it: {me['fd_links']}"
    assert p.wait(10) == 0
    assert (root / "target.log").read_text() == f"target {p.pid} up\n"


def test_exit_statuses_come_from_the_server_and_kill_reaches_only_the_process(root: Path) -> None:
    seven, _, _ = launch(root, "--exit", "7")
    sleeper, _, _ = launch(root, "--sleep", "60")
    assert seven.wait(10) == 7 and seven.returncode == 7
    assert sleeper.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(0.2)
    sleeper.kill()
    assert sleeper.wait(10) == -signal.SIGKILL
    sleeper.kill()  # once it ended: nothing, never a reused pid


def test_concurrent_launches_with_no_server_all_get_their_own_process(root: Path) -> None:
    got: list[tuple[spawn.Forked, dict[str, object], int]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            got.append(launch(root, "--exit", "3"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len({p.pid for p, _, _ in got}) == 6
    assert [p.wait(10) for p, _, _ in got] == [3] * 6


def test_a_launcher_that_stops_waiting_leaves_the_server_no_descriptor(root: Path) -> None:
    kept, _, _ = launch(root, "--sleep", "60")
    (server,) = spawn.server_pids(root)
    held = len(os.listdir(f"/proc/{server}/fd"))
    gone, _, _ = launch(root, "--sleep", "60")
    assert eventually(lambda: len(os.listdir(f"/proc/{server}/fd")) == held + 1)
    assert gone.conn is not None
    gone.conn.close()  # as a CLI that exits after the start
    assert eventually(lambda: len(os.listdir(f"/proc/{server}/fd")) == held)
    gone.kill()  # through its pidfd, still
    assert eventually(lambda: spawn.server_pids(root) == [server] and kept.poll() is None)
    kept.kill()
    assert kept.wait(10) == -signal.SIGKILL  # the one still waiting gets its status


def _raw(root: Path, payload: bytes, fds: list[int]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.connect(str(spawn.socket_path(root)))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        c.sendmsg([payload], anc)
        r, _, _ = select.select([c], [], [], 10)
        assert r, "no answer"
        return dict(json.loads(c.recv(65536)))


def test_bad_requests_get_one_error_each_and_a_stale_server_hands_over(
    root: Path, tmp_path: Path
) -> None:
    sleeper, _, _ = launch(root, "--sleep", "60")
    (server,) = spawn.server_pids(root)
    log = os.open(tmp_path / "x.log", os.O_WRONLY | os.O_CREAT, 0o600)
    r, w = os.pipe()
    try:
        good = spawn.request([sys.executable, "-m", TARGET])
        assert "2 fds" in str(_raw(root, json.dumps(good).encode(), [])["error"])
        assert "JSON" in str(_raw(root, b"\xff not json", [w, log])["error"])
        assert "cmdline" in str(_raw(root, b"[1, 2]", [w, log])["error"])
        assert spawn.server_pids(root) == [server], "a bad request must not end the server"
        other = dict(good, python="/elsewhere/python3")
        assert str(_raw(root, json.dumps(other).encode(), [w, log])["error"]).startswith("stale")
    finally:
        for fd in (log, r, w):
            os.close(fd)
    # A stale server takes no more requests: the next launch starts a new server, while the
    # old one still relays its child's status.
    sock = spawn.socket_path(root)
    assert eventually(lambda: not sock.exists() or spawn.server_pids(root) != [server])
    fresh, me, _ = launch(root, "--exit", "0")
    assert me["ppid"] != server
    assert fresh.wait(10) == 0
    sleeper.kill()
    assert sleeper.wait(10) == -signal.SIGKILL


def test_a_killed_server_leaves_its_processes_running_and_is_replaced(root: Path) -> None:
    sleeper, _, _ = launch(root, "--sleep", "60")
    (server,) = spawn.server_pids(root)
    os.kill(server, signal.SIGKILL)
    assert eventually(lambda: not spawn.server_pids(root))
    assert sleeper.poll() is None, "the forked process must outlive its server"
    assert spawn.socket_path(root).exists()  # stale: nobody listens there
    again, me, _ = launch(root, "--exit", "5")
    assert me["ppid"] not in (server, 0)
    assert again.wait(10) == 5
    sleeper.kill()
    assert sleeper.wait(10) == spawn.UNKNOWN_STATUS  # its server, which reaped it, is gone


def test_a_server_nobody_asks_ends_by_itself(root: Path) -> None:
    spawn.start_server(spawn.socket_path(root), (*SERVER_ARGS, "--first-request-s", "0.3"))
    assert spawn.server_pids(root)
    assert eventually(lambda: not spawn.server_pids(root), 10)


def test_without_a_server_the_monitor_is_a_fresh_interpreter(tmp_path: Path) -> None:
    """A root the server cannot listen in: the monitor is started as before (here it fails
    at once, its launch file missing, and says so on the ready pipe)."""
    missing = tmp_path / "no-such-root"
    log = tmp_path / "monitor.log"
    r, w = os.pipe()
    try:
        p = spawn.monitor(missing, ["--launch", str(tmp_path / "none.json")], log, w, fork=True)
    finally:
        os.close(w)
    try:
        report = json.loads(spawn.read_line(r, 60))
    finally:
        os.close(r)
    assert isinstance(p, subprocess.Popen)
    assert p.wait(60) == 1 and report["ok"] is False
    assert not spawn.server_pids(missing)


def test_code_changed_on_disk_is_found(tmp_path: Path) -> None:
    f = tmp_path / "mod.py"
    f.write_text("x = 1\n")
    st = f.stat()
    recorded = {str(f): (st.st_mtime_ns, st.st_size)}
    assert forkserver.changed(recorded) == ""
    f.write_text("x = 22\n")
    assert forkserver.changed(recorded) == str(f)
    f.unlink()
    assert forkserver.changed(recorded) == str(f)


SET_CMDLINE = """
import sys
from pathlib import Path
from cocoon.runtime.monitor import forkserver
args = ["renamed", "x" * int(sys.argv[1])]
try:
    forkserver.set_cmdline(args)
except OSError as exc:
    print("refused", exc.errno)
else:
    print(repr(Path("/proc/self/cmdline").read_bytes()))
"""


@pytest.mark.parametrize("size", [1, 600, 5000])
def test_a_process_command_line_is_set_when_there_is_room(size: int) -> None:
    """1 byte fits in the process's own arguments, 600 only with the environment's room after
    them, 5000 in neither (a page is what the kernel reads of such a line) unless PR_SET_MM is
    allowed, which takes any length."""
    env = {**os.environ, "PAD": "." * 2000}
    r = subprocess.run(
        [sys.executable, "-c", SET_CMDLINE, str(size)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    args = [b"renamed", b"x" * size]
    if out.startswith("refused"):
        assert size == 5000 and out == "refused 28"  # ENOSPC
        return
    seen = eval(out)  # our own repr of bytes
    if seen.startswith(b"renamed\0"):  # NUL-separated: PR_SET_MM, or it fit in the arguments
        assert seen.rstrip(b"\0").split(b"\0") == args
    else:  # one line with spaces, run on into the environment's room
        assert size == 600 and seen.rstrip(b"\0") == b" ".join(args)
