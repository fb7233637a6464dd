"""The pytest plugin (cocoon.testing), run the way its users run it: pytester starts a pytest
in a subprocess on a suite of fixture-using tests, the plugin loaded through its entry point.
The example suite of docs/pytest-plugin.md runs unchanged; a failing test's report carries the
container's logs, and --cocoon-keep leaves it up with the command to reach it; bad input fails
at the test's line; a leak fails the test that made it; a pool makes a container a warm
start; xdist workers never collide; a host without QEMU or an image skips with the fix."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cocoon.testing.leaks import mounts_under, processes_left

pytestmark = [pytest.mark.qemu, pytest.mark.root]
pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "pytest-plugin.md"


def doc_files() -> dict[str, str]:
    """The code blocks of the docs page that name a file (``# file: name``)."""
    out = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            out[first.removeprefix("# file: ").strip()] = rest
    return out


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def inner_roots(pytester: pytest.Pytester) -> list[Path]:
    """The state roots of the inner runs (<basetemp>/cocoon*/root points at each)."""
    dirs = pytester.path.rglob("cocoon[0-9]*")  # not pytest's "cocooncurrent" link
    return [Path(os.readlink(d / "root")) for d in dirs if (d / "root").is_symlink()]


def nothing_left(pytester: pytest.Pytester) -> None:
    """No process, mount or state of the inner runs: under pytester's path (bundles,
    networks) or their state roots (removed at their sessions' end)."""
    roots = inner_roots(pytester)
    assert roots
    for root in [pytester.path, *roots]:
        assert processes_left(str(root)) == []
        assert mounts_under(root) == []
    assert [r for r in roots if r.exists()] == []


def test_the_documented_example_suite(pytester: pytest.Pytester) -> None:
    files = doc_files()
    assert list(files) == ["test_vm_isolation.py"], files
    pytester.makepyfile(**{name.removesuffix(".py"): text for name, text in files.items()})
    result = run(pytester, "-v")
    result.assert_outcomes(passed=4)
    nothing_left(pytester)


FAILING = """
def test_it_fails(cocoon):
    box = cocoon.run(cmd="echo out-marker; echo err-marker >&2; exec sleep 100000")
    r = box.exec("cat /etc/hostname; exit 3")
    assert r.exit_code == 0
"""


def test_a_failing_test_reports_its_logs_and_keep_leaves_it_up(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester, "--cocoon-keep")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    for section in ("stdout", "stderr", "console", "agent log", "monitor log"):
        assert re.search(rf"cocoon c \(c-[0-9a-f]+-1\) {section}", out), (section, out)
    assert "out-marker" in out and "err-marker" in out
    assert "agent ready" in out  # the agent's own log line
    hints = re.findall(r"^c: (.*) exec -t (c-[0-9a-f]+-1) sh$", out, re.M)
    assert hints, out
    argv, cid = hints[-1][0].split(), hints[-1][1]
    state = json.loads(subprocess.run([*argv, "state", cid], capture_output=True).stdout)
    assert state["status"] == "running"  # kept up
    r = subprocess.run([*argv, "exec", cid, "cat", "/etc/hostname"], capture_output=True)
    assert r.returncode == 0 and r.stdout == b"cocoon\n"
    assert subprocess.run([*argv, "delete", "--force", cid]).returncode == 0
    assert subprocess.run([*argv, "list", "-q"], capture_output=True).stdout == b""
    for root in inner_roots(pytester):  # a kept sandbox's root stays for its user to remove
        shutil.rmtree(root)
    nothing_left(pytester)


BAD_INPUT = """
import pytest
from cocoon.testing import CocoonTestError

def test_no_such_image(cocoon, tmp_path):
    with pytest.raises(CocoonTestError, match="no such OCI bundle"):
        cocoon.run(tmp_path / "nowhere")

def test_command_not_in_the_image(cocoon, cocoon_runtime):
    with pytest.raises(CocoonTestError, match="nosuch-cmd.* not found"):
        cocoon.run(cmd=["nosuch-cmd"])
    assert cocoon.containers() == []
    assert cocoon_runtime.call("list", "-q")[0].stdout == b""

def test_exec_of_a_missing_command(cocoon):
    box = cocoon.run()
    with pytest.raises(CocoonTestError, match="nosuch-cmd.* not found"):
        box.exec(["nosuch-cmd"])
    assert box.exec("exit 7").exit_code == 7

@pytest.mark.parametrize("memory", ["1P", "lots", -1, True])
def test_impossible_sizes(cocoon, memory):
    with pytest.raises(CocoonTestError, match="memory|MiB"):
        cocoon.run(memory=memory)

@pytest.mark.parametrize("cpus", [0, -2, "two"])
def test_impossible_cpus(cocoon, cpus):
    with pytest.raises(CocoonTestError, match="cpus"):
        cocoon.run(cpus=cpus)

def test_unknown_option(cocoon):
    with pytest.raises(TypeError, match="nosuch"):
        cocoon.run(nosuch=1)

def test_bad_names_and_commands(cocoon):
    with pytest.raises(CocoonTestError, match="name"):
        cocoon.run(name="../x")
    with pytest.raises(CocoonTestError, match="cmd"):
        cocoon.run(cmd=[])
    with pytest.raises(CocoonTestError, match="network"):
        cocoon.run(network="bridge")

def test_the_error_points_at_the_test_line(cocoon):
    cocoon.run("/no/such/bundle")  # the marker line
"""


def test_bad_input_is_one_clear_error_at_the_tests_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad=BAD_INPUT)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=12, failed=1)
    out = result.stdout.str()
    # The failure is shown at the test's own line, not inside the plugin.
    assert re.search(r"^>\s+cocoon.run\(\"/no/such/bundle\"\)  # the marker line$", out, re.M), out
    assert "CocoonTestError: image /no/such/bundle: no such OCI bundle" in out
    assert "harness.py" not in out.split("test_the_error_points_at_the_test_line")[-1]
    nothing_left(pytester)


LEAKY = """
import subprocess

def test_it_leaks_a_mount(cocoon):
    box = cocoon.run()
    mnt = box.bundle / "rootfs" / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "leak", str(mnt)], check=True)
    (mnt.parent.parent.parent / "mnt-path").write_text(str(mnt))
"""


def test_a_leak_fails_the_test_that_made_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "ERROR at teardown of test_it_leaks_a_mount" in out, out
    assert re.search(r"cocoon: left behind: mount left: \S+/rootfs/mnt", out), out
    left = mounts_under(pytester.path)
    assert len(left) == 1 and left[0].endswith("/rootfs/mnt"), left
    subprocess.run(["umount", left[0]], check=True)
    nothing_left(pytester)


POOLED = """
import json
import time

def test_a_container_claims_a_pooled_vm(cocoon, cocoon_runtime):
    deadline = time.monotonic() + 240
    while True:
        r, _ = cocoon_runtime.call("pool", "status")
        if json.loads(r.stdout)["ready"] >= 1:
            break
        assert time.monotonic() < deadline, r.stdout
        time.sleep(0.5)
    box = cocoon.run()
    assert box.pooled, box.vm_dir
    assert box.exec("echo warm").stdout == "warm\\n"
"""


def test_a_pool_makes_a_container_a_warm_start(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_pooled=POOLED)
    result = run(pytester, "--cocoon-pool", "1")
    result.assert_outcomes(passed=1)
    nothing_left(pytester)


API = """
import pytest
from cocoon.runtime.container import busybox

def test_a_users_bundle_runs_its_own_process(cocoon, tmp_path):
    b = busybox.make_bundle(tmp_path / "mine", ["sh", "-c", "echo out; echo oops >&2; exit 5"])
    box = cocoon.run(b, name="mine", memory="128M")
    assert box.wait() == 5
    assert (box.stdout(), box.stderr()) == ("out\\n", "oops\\n")
    assert box.logs() == "out\\noops\\n"
    assert box.status == "stopped"

def test_kill_ends_the_workload_with_its_signal(cocoon_session):
    box = cocoon_session.run(cmd=["sleep", "100000"], name="victim")
    assert box.status == "running" and box.pid > 0
    box.kill("KILL")
    assert box.wait() == 137

def test_a_directory_goes_in_and_comes_back(cocoon_session, tmp_path):
    src = tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("x")
    box = cocoon_session.run(name="files")
    box.copy_in(src, "/in/d")
    box.exec("echo y > /in/d/sub/g", check=True)
    back = box.copy_out("/in/d", tmp_path / "back")
    assert (back / "sub" / "f").read_text() == "x"
    assert (back / "sub" / "g").read_text() == "y\\n"

def test_a_root_filesystem_is_used_in_place(cocoon, tmp_path):
    rootfs = busybox.make_rootfs(tmp_path / "rootfs")
    box = cocoon.run(rootfs, cmd="echo hi > /written && exec sleep 100000", cpus=2)
    box.exec("while [ ! -s /written ]; do sleep 0.1; done; nproc", check=True)
    assert (rootfs / "written").read_text() == "hi\\n"
    assert box.exec("nproc").stdout.strip() == "2"
    assert box.exec("id -u", user="65534").stdout == "65534\\n"
    assert box.exec("pwd; echo $X", cwd="/tmp", env={"X": "y"}).stdout == "/tmp\\ny\\n"
"""


def test_the_api_on_real_guests(pytester: pytest.Pytester) -> None:
    """Bundles and root filesystems of the user's, exit status, signals, logs, directory
    copies, exec options, and a session-scoped fixture whose containers go at the end."""
    pytester.makepyfile(test_api=API)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=4)
    nothing_left(pytester)


TEMPLATED = """
import pytest

@pytest.mark.parametrize("n", [1, 2])
def test_a_container_is_restored_from_the_template(cocoon, n):
    box = cocoon.run()
    assert "restored from template" in box.diagnostics()["monitor log"]
    assert box.exec("cat /proc/sys/kernel/random/boot_id").ok
"""


def test_a_template_restores_each_vm(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_templated=TEMPLATED)
    result = run(pytester, "--cocoon-template")
    result.assert_outcomes(passed=2)
    nothing_left(pytester)


PARALLEL = """
import pytest

@pytest.mark.parametrize("n", [1, 2])
def test_each_worker_has_its_own_root(cocoon, cocoon_runtime, n, worker_id, tmp_path_factory):
    box = cocoon.run(name="same", network=cocoon.network(name="same"))
    assert box.exec("echo $((40 + 2))").stdout == "42\\n"
    (tmp_path_factory.getbasetemp() / f"seen-{worker_id}").write_text(
        f"{cocoon_runtime.root} {box.id} {box.ip}"
    )
"""


def test_xdist_workers_never_collide(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_parallel=PARALLEL)
    result = run(pytester, "-n", "2")
    result.assert_outcomes(passed=2)
    seen = [p.read_text().split() for p in pytester.path.rglob("seen-gw*")]
    assert len(seen) == 2, seen
    (root_a, id_a, ip_a), (root_b, id_b, ip_b) = seen
    assert root_a != root_b and id_a != id_b  # the same name, two ids
    assert ip_a == ip_b  # two networks, each private: the same address is no clash
    nothing_left(pytester)


SKIPPED = """
def test_needs_a_vm(cocoon):
    raise AssertionError("ran without a VM")
"""


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        ('[hypervisor]\npath = "/nonexistent/qemu"\n', "no QEMU at /nonexistent/qemu"),
        ('[image]\ncache_dir = "{empty}"\n', "no guest image .* run `cocoon image build`"),
    ],
)
def test_a_host_that_cannot_run_vms_skips_with_the_fix(
    pytester: pytest.Pytester, setting: str, why: str
) -> None:
    empty = pytester.mkdir("empty-cache")
    conf = pytester.makefile(".toml", cocoon=setting.format(empty=empty))
    pytester.makepyfile(test_skipped=SKIPPED)
    result = run(pytester, "-rs", "--cocoon-config", str(conf))
    result.assert_outcomes(skipped=1)
    out = result.stdout.str()
    assert re.search(f"SKIPPED .*cocoon: {why}", out), out
    assert "`cocoon check`" in out
