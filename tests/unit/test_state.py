"""Container state on disk (runtime/container/state.py): the Status rules against runc's, the
Store's round trips, atomic writes, the per-container flock, and liveness re-checked on load."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.container.state import ContainerState, Status, Store
from cocoon.runtime.errors import StateError
from cocoon.runtime.pids import pid_alive, wait_gone

S = Status

# ------------------------------------------------------------------------------ Status rules
# What runc (libcontainer) allows per verb, from its sources:
#   start:  created only ("cannot start a container that has stopped" / "not in created state")
#   kill:   created, running, paused (a stopped one is ErrNotRunning)
#   exec:   anything but stopped; paused only with --ignore-paused (exec.go)
#   pause:  `case Running, Created:` in Container.Pause, else ErrNotRunning
#   resume: paused only (ErrNotPaused)
#   delete: stopped -> destroy, created -> kill and destroy; anything else needs --force
RUNC_ALLOWS: dict[str, set[Status]] = {
    "start": {S.CREATED},
    "kill": {S.CREATED, S.RUNNING, S.PAUSED},
    "exec": {S.CREATED, S.RUNNING},
    "pause": {S.CREATED, S.RUNNING},
    "resume": {S.PAUSED},
    "delete": {S.CREATED, S.STOPPED},
}

KNOWN_DIFFERENCES: dict[tuple[str, Status], str] = {}


def _rule_cases() -> list[Any]:
    cases = []
    for rule, allowed in RUNC_ALLOWS.items():
        for st in Status:
            why = KNOWN_DIFFERENCES.get((rule, st))
            marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
            cases.append(
                pytest.param(rule, st, st in allowed, marks=marks, id=f"{rule}-{st.value}")
            )
    return cases


@pytest.mark.parametrize(("rule", "status", "expected"), _rule_cases())
def test_status_rules_match_runc(rule: str, status: Status, expected: bool) -> None:
    assert getattr(status, f"can_{rule}") is expected


def test_every_status_has_every_rule_and_creating_allows_nothing() -> None:
    rules = sorted(n[4:] for n in vars(Status) if n.startswith("can_"))
    assert rules == sorted(RUNC_ALLOWS)
    assert not any(getattr(S.CREATING, f"can_{r}") for r in rules)
    # Only a stopped container can be deleted without --force in any runtime.
    assert S.STOPPED.can_delete and not S.RUNNING.can_delete and not S.PAUSED.can_delete


def test_status_values_are_the_oci_words() -> None:
    assert [s.value for s in Status] == ["creating", "created", "running", "paused", "stopped"]


# ------------------------------------------------------------------------------ processes
@pytest.fixture
def dead_pid() -> int:
    """A pid that existed (our child) and has been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def live_child() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "30"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _zombie() -> subprocess.Popen[bytes]:
    """A child that has exited and is not reaped yet (the caller reaps it)."""
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while _proc_state(p.pid) != "Z":
        assert time.monotonic() < deadline, "child did not exit"
        time.sleep(0.01)
    return p


def test_pid_alive_for_live_dead_and_impossible_pids(dead_pid: int) -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(1)
    assert not pid_alive(dead_pid)
    assert not pid_alive(0)
    assert not pid_alive(-1)
    assert not pid_alive(2**22 + 1)  # above pid_max's ceiling


def test_a_zombie_is_not_alive() -> None:
    p = _zombie()
    try:
        assert Path(f"/proc/{p.pid}").exists()
        assert not pid_alive(p.pid)
    finally:
        p.wait()


def test_pid_alive_reads_the_state_after_the_last_paren(tmp_path: Path) -> None:
    """comm may hold ') Z (': the state is the field after the *last* ')'."""
    exe = tmp_path / "a) Z (b"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    try:
        p = subprocess.Popen([str(exe), "30"])
    except PermissionError:
        pytest.skip(f"{tmp_path} is mounted noexec")
    try:
        deadline = time.monotonic() + 10
        while "Z (b" not in Path(f"/proc/{p.pid}/stat").read_text():
            assert time.monotonic() < deadline, "child did not exec"
            time.sleep(0.01)
        assert pid_alive(p.pid)
    finally:
        p.kill()
        p.wait()


def _no_pidfd(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """``on``: pidfd_open fails as on a kernel before 5.3, so wait_gone polls."""
    if on:

        def refuse(pid: int, flags: int = 0) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", refuse)


@pytest.mark.parametrize("polled", [False, True], ids=["pidfd", "polled"])
def test_wait_gone_times_out_on_a_live_process(
    live_child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch, polled: bool
) -> None:
    _no_pidfd(monkeypatch, polled)
    t0 = time.monotonic()
    assert wait_gone(live_child.pid, 0.2, interval=0.02) is False
    assert time.monotonic() - t0 >= 0.2


@pytest.mark.parametrize("polled", [False, True], ids=["pidfd", "polled"])
def test_wait_gone_returns_when_the_process_dies(
    live_child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch, polled: bool
) -> None:
    _no_pidfd(monkeypatch, polled)
    threading.Timer(0.2, live_child.kill).start()
    t0 = time.monotonic()
    # Not reaped by anyone until the fixture's wait(): a zombie counts as gone.
    assert wait_gone(live_child.pid, 10, interval=0.02) is True
    assert 0.1 < time.monotonic() - t0 < 5


def test_wait_gone_on_an_absent_pid_is_immediate(dead_pid: int) -> None:
    t0 = time.monotonic()
    assert wait_gone(dead_pid, 5) is True
    assert wait_gone(0, 5) is True
    assert time.monotonic() - t0 < 0.5


# ------------------------------------------------------------------------------ ContainerState
def make_state(
    cid: str = "c1", status: Status = S.CREATED, pid: int = 0, **kw: Any
) -> ContainerState:
    return ContainerState(
        id=cid,
        bundle=f"/bundles/{cid}",
        rootfs=f"/bundles/{cid}/rootfs",
        sandbox_id=cid,
        status=status.value,
        pid=pid,
        **kw,
    )


LIVE_STATUSES = [S.CREATED, S.RUNNING, S.PAUSED]


@pytest.mark.parametrize("status", LIVE_STATUSES, ids=lambda s: s.value)
def test_a_live_status_with_a_dead_shim_is_stopped(status: Status, dead_pid: int) -> None:
    st = make_state(status=status, pid=dead_pid)
    assert st.status == status.value  # the file's word is kept ...
    assert st.effective is S.STOPPED  # ... but nobody believes it
    oci = st.oci()
    assert oci["status"] == "stopped" and oci["pid"] == 0


@pytest.mark.parametrize("status", LIVE_STATUSES, ids=lambda s: s.value)
def test_a_live_status_with_a_live_shim_is_kept(status: Status) -> None:
    st = make_state(status=status, pid=os.getpid())
    assert st.effective is status
    assert st.oci()["status"] == status.value and st.oci()["pid"] == os.getpid()


def test_stopped_stays_stopped_even_with_a_live_pid() -> None:
    st = make_state(status=S.STOPPED, pid=os.getpid())
    assert st.effective is S.STOPPED
    assert st.oci()["pid"] == 0


def test_creating_is_not_rechecked(dead_pid: int) -> None:
    assert make_state(status=S.CREATING, pid=dead_pid).effective is S.CREATING


def test_liveness_is_rechecked_on_every_ask(live_child: subprocess.Popen[bytes]) -> None:
    st = make_state(status=S.RUNNING, pid=live_child.pid)
    before = st.effective
    live_child.kill()
    live_child.wait()
    after = st.effective
    assert (before, after) == (S.RUNNING, S.STOPPED)


def test_oci_state_has_runc_fields(dead_pid: int) -> None:
    st = make_state("web", S.RUNNING, os.getpid(), annotations={"a": "b"}, owner="")
    oci = st.oci()
    assert oci == {
        "ociVersion": oci["ociVersion"],
        "id": "web",
        "pid": os.getpid(),
        "status": "running",
        "bundle": "/bundles/web",
        "rootfs": "/bundles/web/rootfs",
        "created": st.created,
        "owner": "",
        "annotations": {"a": "b"},
    }
    assert re.fullmatch(r"1\.\d+\.\d+", oci["ociVersion"])
    json.dumps(oci)  # serialisable as `runc state` prints it


def test_created_is_utc_rfc3339_with_z() -> None:
    before = datetime.datetime.now(datetime.UTC)
    created = make_state().created
    after = datetime.datetime.now(datetime.UTC)
    assert created.endswith("Z") and "+00:00" not in created
    t = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
    assert before <= t <= after


def test_defaults_are_not_shared_between_states() -> None:
    a, b = make_state("a"), make_state("b")
    a.exec_pids["e1"] = 5
    a.disks.append("d0")
    assert b.exec_pids == {} and b.disks == []


# ------------------------------------------------------------------------------ Store
@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "root")


def _saved(store: Store, st: ContainerState) -> ContainerState:
    store.reserve(st.id)
    store.save(st)
    return st


def test_round_trip_keeps_every_field(store: Store) -> None:
    st = make_state(
        "c1",
        S.RUNNING,
        1234,
        annotations={"io.kubernetes.cri.container-type": "sandbox"},
        owner="root",
        exec_pids={"e1": 11, "e2": 12},
        terminal=True,
        resources={"memory": {"limit": 1 << 30}, "cpu": {"cpus": "0-1"}},
        disks=["d0", "d1"],
        vfio=["12"],
        netns="/run/netns/x",
        netns_owned=True,
    )
    _saved(store, st)
    loaded = store.load("c1")
    assert loaded == st
    assert loaded is not st
    on_disk = json.loads((store.dir / "c1" / "state.json").read_text())
    assert on_disk["status"] == "running" and on_disk["exec_pids"] == {"e1": 11, "e2": 12}


def test_save_overwrites(store: Store) -> None:
    st = _saved(store, make_state("c1", S.CREATED, 5))
    st.status = S.RUNNING.value
    st.exec_pids["x"] = 9
    store.save(st)
    loaded = store.load("c1")
    assert loaded.status == "running" and loaded.exec_pids == {"x": 9}


def test_load_rechecks_liveness(store: Store, dead_pid: int) -> None:
    _saved(store, make_state("c1", S.RUNNING, dead_pid))
    loaded = store.load("c1")
    assert loaded.effective is S.STOPPED
    assert loaded.oci()["status"] == "stopped"


def test_reserve_creates_private_directory_once(store: Store) -> None:
    d = store.reserve("c1")
    assert d == store.dir / "c1" and d.is_dir()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert not store.exists("c1")  # reserved, not yet saved
    with pytest.raises(StateError, match="container c1 already exists"):
        store.reserve("c1")


def test_ids_lists_saved_containers_sorted(store: Store) -> None:
    assert store.ids() == []  # no containers directory yet
    for cid in ("b", "a", "c"):
        _saved(store, make_state(cid))
    store.reserve("half")  # a create that never saved its state
    (store.dir / "stray-file").write_text("")
    assert store.ids() == ["a", "b", "c"]
    assert store.exists("a") and not store.exists("half") and not store.exists("nope")


def test_remove(store: Store) -> None:
    _saved(store, make_state("a"))
    _saved(store, make_state("b"))
    store.remove("a")
    assert not (store.dir / "a").exists()
    assert store.ids() == ["b"]
    with pytest.raises(StateError, match="container a does not exist"):
        store.load("a")
    store.remove("a")  # idempotent
    store.remove("never")
    assert store.ids() == ["b"]


def test_load_of_a_missing_container(store: Store) -> None:
    with pytest.raises(StateError, match=r"^container nope does not exist$"):
        store.load("nope")


BAD_IDS = ["", ".", "..", "../x", "../x/../x", "a/b", "<absolute>", "a\x00b"]


@pytest.mark.parametrize("cid", BAD_IDS, ids=repr)
@pytest.mark.parametrize("method", ["path", "exists", "reserve", "load", "remove", "locked"])
def test_every_store_method_refuses_bad_ids(
    tmp_path: Path, store: Store, method: str, cid: str
) -> None:
    _saved(store, make_state("keep"))
    # Decoys where a traversal would land: <root>/x (from containers/../x) and an absolute path.
    for decoy in (store.root / "x", tmp_path / "victim"):
        decoy.mkdir()
        (decoy / "state.json").write_text(json.dumps(_raw_state()))
    if cid == "<absolute>":
        cid = str(tmp_path / "victim")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(StateError, match="invalid container id"):
        r = getattr(store, method)(cid)
        if method == "locked":
            with r:
                pass
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing made or removed


def test_state_dir_is_under_the_root(store: Store) -> None:
    assert store.path("abc") == store.root / "containers" / "abc"


# ------------------------------------------------------------------------------ corrupt files
CORRUPT = {
    "empty": (b"", "unreadable state"),
    "not-json": (b"{not json", "unreadable state"),
    "truncated": (b'{"id": "c1", "bundle": "/b"', "unreadable state"),
    "not-utf8": (b'{"id": "\xff\xfe"}', "unreadable state"),
    "list": (b"[1, 2]", "invalid state"),
    "string": (b'"running"', "invalid state"),
    "missing-fields": (b'{"id": "c1"}', "invalid state"),
    "unknown-field": (
        json.dumps(
            {
                "id": "c1",
                "bundle": "/b",
                "rootfs": "/b/r",
                "sandbox_id": "c1",
                "status": "running",
                "bogus": 1,
            }
        ).encode(),
        "invalid state",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_a_corrupt_state_file_is_a_clear_state_error(store: Store, name: str) -> None:
    content, why = CORRUPT[name]
    store.reserve("c1")
    f = store.dir / "c1" / "state.json"
    f.write_bytes(content)
    with pytest.raises(StateError) as e:
        store.load("c1")
    msg = str(e.value)
    assert msg.startswith("container c1: ") and why in msg and str(f) in msg


def test_a_state_file_that_is_a_directory_is_a_state_error(store: Store) -> None:
    (store.reserve("c1") / "state.json").mkdir()
    with pytest.raises(StateError, match="container c1: unreadable state"):
        store.load("c1")


def _raw_state(**over: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "bundle": "/b",
        "rootfs": "/b/r",
        "sandbox_id": "c1",
        "status": "running",
        "pid": os.getpid(),
        **over,
    }


@pytest.mark.parametrize(
    "over", [{"status": "bogus"}, {"status": None}, {"pid": "12"}, {"pid": None}], ids=repr
)
def test_a_state_with_bad_values_is_a_state_error(store: Store, over: dict[str, Any]) -> None:
    store.reserve("c1")
    (store.dir / "c1" / "state.json").write_text(json.dumps(_raw_state(**over)))
    with pytest.raises(StateError):
        store.load("c1").effective  # noqa: B018


# ------------------------------------------------------------------------------ atomic writes
def test_save_leaves_no_temp_file(store: Store) -> None:
    st = _saved(store, make_state("c1"))
    for _ in range(3):
        store.save(st)
    assert sorted(p.name for p in (store.dir / "c1").iterdir()) == ["state.json"]


def test_save_replaces_the_file_instead_of_rewriting_it(store: Store) -> None:
    st = _saved(store, make_state("c1", S.CREATED))
    f = store.dir / "c1" / "state.json"
    ino = f.stat().st_ino
    with open(f) as reader:  # a concurrent reader of the old version ...
        st.status = S.RUNNING.value
        store.save(st)
        old = json.loads(reader.read())  # ... still reads a whole, consistent old file
    assert old["status"] == "created"
    assert f.stat().st_ino != ino
    assert store.load("c1").status == "running"


def test_a_failed_save_keeps_the_previous_state(store: Store) -> None:
    st = _saved(store, make_state("c1", S.CREATED))
    before = (store.dir / "c1" / "state.json").read_bytes()
    st.resources = {"bad": object()}  # not JSON-serialisable
    with pytest.raises(TypeError):
        store.save(st)
    assert (store.dir / "c1" / "state.json").read_bytes() == before
    assert store.load("c1").status == "created"
    assert not (store.dir / "c1" / "state.json.tmp").exists()


def test_a_crash_before_rename_keeps_the_previous_state(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = _saved(store, make_state("c1", S.CREATED))

    def crash(src: Any, dst: Any) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    st.status = S.RUNNING.value
    with pytest.raises(StateError, match="saving the state of container c1: simulated crash"):
        store.save(st)
    monkeypatch.undo()
    assert store.load("c1").status == "created"
    # The next save goes through despite the stale temp file.
    store.save(st)
    assert store.load("c1").status == "running"
    assert not (store.dir / "c1" / "state.json.tmp").exists()


# ------------------------------------------------------------------------------ the lock
def _try_lock(path: Path) -> bool:
    """Whether another open file description can take the lock right now."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_locked_refuses_a_missing_container(store: Store) -> None:
    with pytest.raises(StateError, match="container nope does not exist"), store.locked("nope"):
        pass
    assert not (store.dir / "nope").exists()


def test_locked_holds_an_exclusive_flock(store: Store) -> None:
    store.reserve("c1")
    lock = store.dir / "c1" / "lock"
    with store.locked("c1"):
        assert lock.exists()
        assert not _try_lock(lock)
    assert _try_lock(lock)


def test_the_lock_is_released_on_an_exception(store: Store) -> None:
    store.reserve("c1")
    with pytest.raises(RuntimeError), store.locked("c1"):
        raise RuntimeError("verb failed")
    assert _try_lock(store.dir / "c1" / "lock")


def test_locks_are_per_container(store: Store) -> None:
    store.reserve("a")
    store.reserve("b")
    with store.locked("a"):
        assert _try_lock(store.dir / "b" / "lock")
        with store.locked("b"):
            pass


def test_a_second_locker_waits_for_the_first(store: Store) -> None:
    store.reserve("c1")
    entered = threading.Event()
    released = threading.Event()
    order: list[str] = []

    def second() -> None:
        with store.locked("c1"):
            order.append("second")
            entered.set()

    with store.locked("c1"):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.3), "second locker got in while the first held the lock"
        order.append("first-done")
        released.set()
    assert entered.wait(5), "second locker never got the lock"
    t.join(5)
    assert order == ["first-done", "second"]


def test_the_lock_serialises_read_modify_write(store: Store) -> None:
    _saved(store, make_state("c1", resources={"n": 0}))
    rounds = 40

    def bump() -> None:
        for _ in range(rounds):
            with store.locked("c1"):
                st = store.load("c1")
                st.resources["n"] += 1
                time.sleep(0)
                store.save(st)

    threads = [threading.Thread(target=bump) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert store.load("c1").resources["n"] == 3 * rounds


def test_a_locker_in_another_process_is_refused_without_blocking(store: Store) -> None:
    store.reserve("c1")
    lock = store.dir / "c1" / "lock"
    code = (
        "import fcntl, sys\n"
        "f = open(sys.argv[1], 'a')\n"
        "try:\n"
        "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(3)\n"
    )
    with store.locked("c1"):
        held = subprocess.run([sys.executable, "-c", code, str(lock)], timeout=30)
    free = subprocess.run([sys.executable, "-c", code, str(lock)], timeout=30)
    assert (held.returncode, free.returncode) == (3, 0)


def test_a_reused_pid_is_not_the_containers() -> None:
    """After a reboot (or pid reuse) the recorded pid names another process: the start time
    recorded at create tells them apart, as runc's does."""
    from cocoon.runtime.container.state import ContainerState
    from cocoon.runtime.pids import start_time

    me = os.getpid()
    st = ContainerState("c", "/b", "/b/rootfs", "c", Status.RUNNING.value, pid=me)
    assert st.effective is Status.RUNNING  # no start time recorded (an older state file)
    st.pid_start = start_time(me)
    assert st.pid_start > 0 and st.effective is Status.RUNNING
    st.pid_start += 1
    assert st.oci() == st.oci() | {"pid": 0, "status": Status.STOPPED.value}
    assert start_time(2**22 + 1) == 0
