"""The guest is hostile (docs/security.md): what a root process in a container, and the guest,
can reach on the host, checked against a real sandbox.

One pod sandbox container ("hg", one VM boot) is shared by the VM tests: root in the guest,
given CAP_DAC_READ_SEARCH (the default set lacks it) so that open_by_handle_at can be tried,
with a host directory bound read-write at /vol. Host files holding a random secret sit next to
the share's sources (beside the volume, the rootfs, and in the sandbox state dir, outside
``shared/``); no check may ever see the secret. A small static C probe (gcc, compiled here) does
what busybox cannot: name_to_handle_at / open_by_handle_at with forged handles, and planting
symlinks in the share's root through such a handle, as a root process in the guest could.

The annotation checks need no VM: the allowlist (``io.cocoon.config.*``) is tried key by key
with hostile values, and every other configuration key is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cocoon.runtime import config as config_mod
from cocoon.runtime.container import busybox
from cocoon.runtime.container import shim as shimmod
from cocoon.runtime.errors import ConfigError
from cocoon.runtime.sandbox import paths
from cocoon.testing.leaks import live_processes, mounts_under, processes_left, processes_mentioning
from tests.integration.cli import Cli
from tests.integration.test_pods import CRI_SANDBOX, CRI_TYPE, member_bundle

VM = [pytest.mark.qemu, pytest.mark.root]
CAP_SYS_ADMIN = 21
CAP_MKNOD = 27

PROBE_C = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* probe scan FILE NEEDLE: forge FUSE handles (nodeid 0..4095, generation kept or 0, both
   handle types) from FILE's, open each, read files and directory entries, report NEEDLE.
   probe plant NAME TARGET: symlink NAME -> TARGET in the share's root (handle of nodeid 1).
   probe swap NAME MOVED TARGET: rename NAME to MOVED there, then plant NAME -> TARGET. */
static struct file_handle *fh;
static unsigned char orig[MAX_HANDLE_SZ];
static int mfd;

static int open_node(unsigned long long node, int type, int zero_gen) {
    memcpy(fh->f_handle, orig, fh->handle_bytes);
    fh->handle_type = type;
    unsigned int *w = (unsigned int *)fh->f_handle;
    w[0] = (unsigned int)(node >> 32);
    w[1] = (unsigned int)node;
    if (zero_gen) w[2] = 0;
    return open_by_handle_at(mfd, fh, O_RDONLY | O_NONBLOCK);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    fh = malloc(sizeof(*fh) + MAX_HANDLE_SZ);
    fh->handle_bytes = MAX_HANDLE_SZ;
    int mnt_id;
    const char *file = strcmp(argv[1], "scan") == 0 ? argv[2] : "/bin/busybox";
    if (name_to_handle_at(AT_FDCWD, file, fh, &mnt_id, 0) < 0) {
        printf("name_to_handle_at: %s\n", strerror(errno));
        return 1;
    }
    printf("handle type=%d bytes=%u\n", fh->handle_type, fh->handle_bytes);
    if (fh->handle_bytes < 12) return 1;
    memcpy(orig, fh->f_handle, fh->handle_bytes);
    int type = fh->handle_type;
    mfd = open("/", O_RDONLY | O_DIRECTORY);
    int fd = open_by_handle_at(mfd, fh, O_RDONLY);
    printf("own handle: %s\n", fd >= 0 ? "reopened" : strerror(errno));
    if (fd >= 0) close(fd);
    if (strcmp(argv[1], "plant") == 0 || strcmp(argv[1], "swap") == 0) {
        int root = open_node(1, type, 1);
        if (root < 0) { printf("share root: %s\n", strerror(errno)); return 1; }
        const char *name = argv[2];
        const char *target = argv[argc - 1];
        if (strcmp(argv[1], "swap") == 0 && renameat(root, name, root, argv[3]) < 0) {
            printf("rename: %s\n", strerror(errno));
            return 1;
        }
        if (symlinkat(target, root, name) < 0) {
            printf("symlink: %s\n", strerror(errno));
            return 1;
        }
        printf("planted %s -> %s\n", name, target);
        return 0;
    }
    const char *needle = argv[3];
    int opened = 0, found = 0;
    char buf[65536];
    int types[2] = {type, type ^ 3};
    for (int t = 0; t < 2; t++)
        for (unsigned long long node = 0; node < 4096; node++)
            for (int zero_gen = 0; zero_gen < 2; zero_gen++) {
                int f = open_node(node, types[t], zero_gen);
                if (f < 0) continue;
                opened++;
                struct stat st;
                fstat(f, &st);
                if (S_ISDIR(st.st_mode)) {
                    DIR *d = fdopendir(f);
                    struct dirent *e;
                    printf("node %llu: dir:", node);
                    while (d && (e = readdir(d))) {
                        printf(" %s", e->d_name);
                        int g = openat(dirfd(d), e->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
                        if (g < 0) continue;
                        ssize_t n = read(g, buf, sizeof buf);
                        if (n > 0 && memmem(buf, n, needle, strlen(needle))) {
                            printf(" [FOUND in %s]", e->d_name);
                            found++;
                        }
                        close(g);
                    }
                    printf("\n");
                    if (d) closedir(d);
                } else {
                    ssize_t n = read(f, buf, sizeof buf);
                    if (n > 0 && memmem(buf, n, needle, strlen(needle))) {
                        printf("node %llu: [FOUND]\n", node);
                        found++;
                    }
                    close(f);
                }
            }
    printf("opened %d handles, found %d\n", opened, found);
    return 0;
}
"""


@dataclass
class Box:
    cli: Cli
    cid: str
    tmp: Path
    bundle: Path
    vol: Path
    secret: str
    probe: bool

    @property
    def sandbox_dir(self) -> Path:
        return paths.sandbox_dir(self.cli.root, self.cid)

    @property
    def share(self) -> Path:
        return self.sandbox_dir / "shared"

    def sh(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.cli("exec", self.cid, "sh", "-c", script, timeout=timeout)

    def assert_secret_unseen(self, *texts: str) -> None:
        for t in texts:
            assert self.secret not in t, t[-2000:]


def compile_probe(out: Path) -> bool:
    if shutil.which("gcc") is None:
        return False
    src = out.with_suffix(".c")
    src.write_text(PROBE_C)
    r = subprocess.run(
        ["gcc", "-static", "-O1", "-o", str(out), str(src)], capture_output=True, text=True
    )
    return r.returncode == 0


def leak_check(root: Path) -> None:
    leaked = processes_left(str(root))
    left = [str(p) for sub in ("sandboxes", "containers", "netns") for p in (root / sub).glob("*")]
    assert not leaked, leaked
    assert not left, f"state left behind: {left}"
    assert not mounts_under(root), f"mounts left behind: {mounts_under(root)}"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """A running pod sandbox container "hg" (one VM) with /vol bound from the host."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "root"
    root.mkdir()
    secret = f"COCOON-HOSTILE-{uuid.uuid4().hex}"
    cli = Cli(root, tmp)
    bundle = busybox.make_bundle(tmp / "bundle", ["sleep", "100000"])
    probe = compile_probe(tmp / "probe")
    if probe:
        shutil.copy(tmp / "probe", bundle / "rootfs" / "probe")
    vol = tmp / "data" / "vol"
    vol.mkdir(parents=True)
    # Host files the guest must never read: beside the volume, beside the rootfs (the bundle
    # dir), and (below) in the sandbox state dir, each outside what is bound into the share.
    for f in (tmp / "data" / "secret", bundle / "secret", tmp / "secret"):
        f.write_text(secret + "\n")
    (vol / "host-link").symlink_to(tmp / "data" / "secret")  # planted on the host side
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {CRI_TYPE: "sandbox", CRI_SANDBOX: "hg"}
    spec["mounts"].append(
        {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind", "rw"]}
    )
    for caps in spec["process"]["capabilities"].values():
        caps.append("CAP_DAC_READ_SEARCH")
    (bundle / "config.json").write_text(json.dumps(spec))
    r = cli.create("hg", bundle)
    try:
        assert r.returncode == 0, r.stderr
        cli.ok("start", "hg")
        b = Box(cli, "hg", tmp, bundle, vol, secret, probe)
        (b.sandbox_dir / "secret").write_text(secret + "\n")
        yield b
    finally:
        for cid in cli("list", "-q").stdout.split():
            cli("delete", "--force", cid)
        leak_check(root)


def mount_points() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def status_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


# ------------------------------------------------------------------ the host processes


@pytest.mark.qemu
@pytest.mark.root
def test_qemu_runs_under_its_seccomp_sandbox(box: Box) -> None:
    qemu = int((box.sandbox_dir / "qemu.pid").read_text())
    argv = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in argv, argv
    st = status_of(qemu)
    assert st["Seccomp"] == "2", st  # a filter is installed
    assert st["NoNewPrivs"] == "1", st  # elevateprivileges=deny


@pytest.mark.qemu
@pytest.mark.root
def test_virtiofsd_is_confined_to_the_share(box: Box) -> None:
    share = box.share.resolve()
    pids = [
        pid
        for pid, cmd in live_processes()
        if "virtiofsd" in cmd.split(" ", 1)[0] and f"source={share}" in cmd
    ]
    assert pids, "no virtiofsd for the sandbox"
    host_mnt = os.readlink("/proc/self/ns/mnt")
    assert Path("/etc/shadow").exists()
    share_id = (os.stat(share).st_dev, os.stat(share).st_ino)
    bound = {mp[len(str(share)) :] for mp in mount_points() if mp.startswith(f"{share}/")}
    assert f"/{box.cid}/rootfs" in bound, bound
    filtered = 0
    for pid in pids:
        assert os.readlink(f"/proc/{pid}/ns/mnt") != host_mnt, pid
        root = Path(f"/proc/{pid}/root")
        st = os.stat(root)
        assert (st.st_dev, st.st_ino) == share_id, f"virtiofsd {pid}'s root is not the share"
        assert not (root / "etc" / "shadow").exists()
        assert not (root / "secret").exists()  # the state dir's secret, one level up
        assert sorted(os.listdir(root)) == sorted(os.listdir(share))
        # Its mount namespace holds the share and what was bound into it, nothing else.
        mounts = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
        assert [m[3] for m in mounts if m[4] == "/"] == [str(share)], mounts
        assert {m[4] for m in mounts if m[4] != "/"} == bound, mounts
        st_ = status_of(pid)
        assert not int(st_["CapEff"], 16) & (1 << CAP_SYS_ADMIN), st_
        if st_["Seccomp"] == "2":
            filtered += 1
            assert st_["NoNewPrivs"] == "1"
            # the serving process makes no device node for the guest (modcaps=-mknod)
            assert not int(st_["CapEff"], 16) & (1 << CAP_MKNOD), st_
    assert filtered, "no virtiofsd process runs under a seccomp filter"


@pytest.mark.qemu
@pytest.mark.root
def test_state_dirs_are_private_and_no_socket_is_open_to_others(box: Box) -> None:
    cdir = box.cli.root / "containers" / box.cid
    for d in (box.sandbox_dir, cdir):
        assert os.stat(d).st_mode & 0o777 == 0o700, d
    for d in (box.sandbox_dir.parent, cdir.parent):
        assert os.stat(d).st_mode & 0o077 in (0o011, 0), d  # search only, no listing
    socks = [p for p in sockets(box) if os.stat(p).st_mode & 0o022]
    assert not socks, f"sockets others could connect to: {socks}"


def sockets(box: Box) -> list[Path]:
    out = []
    for d in (box.sandbox_dir, box.cli.root / "containers" / box.cid):
        out += [p for p in d.iterdir() if p.is_socket()]
    assert len(out) >= 4, out  # monitor, qmp, agent port, agent relay, virtiofsd
    return out


@pytest.mark.qemu
@pytest.mark.root
def test_every_socket_is_0600(box: Box) -> None:
    loose = {str(p): oct(os.stat(p).st_mode & 0o777) for p in sockets(box)}
    assert all(m == "0o600" for m in loose.values()), loose


# ------------------------------------------------------------------ from inside the guest


@pytest.mark.qemu
@pytest.mark.root
def test_no_host_file_outside_the_share_through_dotdot_or_symlinks(box: Box) -> None:
    secret_abs = box.tmp / "data" / "secret"
    r = box.sh(
        "cat /../secret /../../secret /../../../secret /vol/../secret /vol/../../secret "
        "/vol/../../../../../secret; "
        f"ln -s ../secret /vol/rel-link; ln -s {secret_abs} /vol/abs-link; "
        "ln -s /../../../../../../etc/shadow /vol/shadow-link; "
        "cat /vol/rel-link /vol/abs-link /vol/host-link /vol/shadow-link /etc/shadow; "
        "ls -la / /vol; echo done"
    )
    out = r.stdout + r.stderr
    assert "done" in out, out
    box.assert_secret_unseen(out)
    # The guest's symlinks went through virtio-fs to the host ...
    assert os.readlink(box.vol / "rel-link") == "../secret"
    assert os.readlink(box.vol / "abs-link") == str(secret_abs)
    # ... and on the host rel-link does name the secret: only the guest ever resolved it.
    assert (box.vol / "rel-link").read_text().strip() == box.secret
    assert "No such file or directory" in out


@pytest.mark.qemu
@pytest.mark.root
def test_open_by_handle_reaches_nothing_outside_the_share(box: Box) -> None:
    if not box.probe:
        pytest.skip("no gcc to build the static open_by_handle_at probe")
    r = box.cli("exec", box.cid, "/probe", "scan", "/bin/busybox", box.secret[:20], timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "own handle: reopened" in out, out  # the probe works: the handles are real
    opened = int(out.rsplit("opened ", 1)[1].split()[0])
    assert opened > 1, out
    assert "found 0" in out and "FOUND" not in out, out
    box.assert_secret_unseen(out)


@pytest.mark.qemu
@pytest.mark.root
def test_the_container_cannot_reach_the_agent_or_its_port(box: Box) -> None:
    r = box.sh(
        "ls /dev; echo ---; ls /run; test -e /run/cocoon-agent/agent.sock && echo AGENT-VISIBLE; "
        "for d in /sys/class/virtio-ports/*/dev; do "
        "  n=$(cat $d); mknod /tmp/vport c ${n%:*} ${n#*:} && echo MKNOD-OK; "
        "  cat /tmp/vport </dev/null >/dev/null 2>&1 && echo PORT-READABLE; done; echo done"
    )
    out = r.stdout + r.stderr
    assert "done" in out, out
    devs = out.split("---", 1)[0].split()
    assert not [d for d in devs if d.startswith(("vport", "virtio-ports", "hvc"))], devs
    assert "AGENT-VISIBLE" not in out and "PORT-READABLE" not in out, out
    assert "MKNOD-OK" not in out, out  # no CAP_MKNOD (and the device cgroup would refuse)


@pytest.mark.qemu
@pytest.mark.root
def _ppid(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return -1


def test_a_flooding_container_does_not_stall_or_bloat_the_monitor(box: Box) -> None:
    """stdout and stderr flooded while the reader (the exec's shim) is stopped: the monitor
    stays small and answers; other processes' calls go through."""
    monitor = int((box.sandbox_dir / "monitor.pid").read_text())
    rss0 = int(status_of(monitor)["VmRSS"].split()[0])
    flood = subprocess.Popen(
        [
            *box.cli.argv,
            "exec",
            box.cid,
            "sh",
            "-c",
            "while :; do cat /bin/busybox; cat /bin/busybox >&2; done",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        shim = 0
        end = time.monotonic() + 60
        while not shim and time.monotonic() < end:
            time.sleep(0.5)
            # The exec's shim: the foreground CLI's child (forked, or a started one).
            shim = next(
                (
                    pid
                    for pid, _ in live_processes()
                    if _ppid(pid) == flood.pid and shimmod.is_shim(pid, box.cid)
                ),
                0,
            )
        assert shim, "the flood's shim did not start"
        time.sleep(5)  # flowing
        os.kill(shim, signal.SIGSTOP)
        time.sleep(10)  # the guest keeps writing; nobody reads
        t = time.monotonic()
        assert json.loads(box.cli.ok("state", box.cid))["status"] == "running"
        assert box.cli.ok("exec", box.cid, "echo", "alive").strip() == "alive"
        assert time.monotonic() - t < 60
        rss1 = int(status_of(monitor)["VmRSS"].split()[0])
        assert rss1 - rss0 < 64 * 1024, (rss0, rss1)  # KiB: bounded, not the flood's size
        os.kill(shim, signal.SIGCONT)
        os.kill(shim, signal.SIGKILL)  # the agent kills the exec's process
    finally:
        with contextlib.suppress(ProcessLookupError):
            flood.kill()
        flood.wait(30)
    assert box.cli.ok("exec", box.cid, "echo", "still").strip() == "still"


@pytest.mark.qemu
@pytest.mark.root
def test_symlinks_planted_in_the_share_do_not_redirect_the_hosts_mounts(box: Box) -> None:
    """A root process in the guest (here: the container, through a forged handle of the
    share's root) plants ``shared/<id>`` before a pod member joins, and swaps a member's
    share dir for a symlink before it leaves: the host mounts and unmounts nothing outside."""
    if not box.probe:
        pytest.skip("no gcc to build the static open_by_handle_at probe")
    victim = box.tmp / "victim"
    (victim / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "victim", str(victim / "mnt")], check=True)
    try:
        (victim / "mnt" / "data").write_text("keep\n")
        pid = int(json.loads(box.cli.ok("state", box.cid))["pid"])
        r = box.cli("exec", box.cid, "/probe", "plant", "m1", str(victim))
        assert "planted m1" in r.stdout, r.stdout + r.stderr
        assert (box.share / "m1").is_symlink()
        r = box.cli.create("m1", member_bundle(box.tmp, "m1", box.cid, pid, ["sleep", "1000"]))
        assert r.returncode == 1, r.stderr
        assert "not a directory below the share" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert sorted(os.listdir(victim)) == ["mnt"], os.listdir(victim)
        assert not os.path.lexists(box.share / "m1")  # the failed create's undo removed it
        # A member joins, then the guest renames its share dir away and leaves a symlink.
        b2 = member_bundle(box.tmp, "m2", box.cid, pid, ["sleep", "1000"])
        assert box.cli.create("m2", b2).returncode == 0, box.cli.last_error()
        r = box.cli("exec", box.cid, "/probe", "swap", "m2", "m2-moved", str(victim))
        assert "planted m2" in r.stdout, r.stdout + r.stderr
        box.cli.ok("delete", "--force", "m2")
        assert str(victim / "mnt") in mount_points()
        assert (victim / "mnt" / "data").read_text() == "keep\n"
        assert sorted(os.listdir(victim)) == ["mnt"]
        assert (b2 / "rootfs" / "bin" / "busybox").exists()
    finally:
        subprocess.run(["umount", "-l", str(victim / "mnt")], check=False)


# ------------------------------------------------------------------ annotations (no VM)

HOSTILE = [
    "/usr/bin/evil",
    "../../../../usr/bin/evil",
    "tcfilter/../../usr/bin/evil",
    "tcfilter; rm -rf /",
    "$(touch /tmp/pwned)",
    "tcfilter\n",
    "tcfilter\x00",
    "\uff54\uff43\uff46\uff49\uff4c\uff54\uff45\uff52",  # "tcfilter", fullwidth
    "TCFILTER",
    "",
    " ",
    "-1",
    "9",
    "18446744073709551617",
    "9" * 5000,
    "1e3",
    "0x4",
    "x" * 100_000,
]


@pytest.mark.parametrize("key", config_mod.ANNOTATABLE)
@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v[:24]))
def test_hostile_values_of_allowed_annotations_are_one_error(key: str, value: str) -> None:
    name = config_mod.ANNOTATION_PREFIX + key
    with pytest.raises(ConfigError) as err:
        config_mod.with_annotations(config_mod.Config(), {name: value})
    msg = str(err.value)
    assert msg.startswith(f"annotation {name}: "), msg[:300]
    assert "\n" not in msg, msg[:300]


# Not ASCII digits, which int() alone would take: Unicode digits, spaces, "_", "+", a
# leading zero.
LAX_INTEGERS = ["\u0663", "\uff13", " 3", "3 ", "0_3", "+3", "03"]


@pytest.mark.parametrize("value", LAX_INTEGERS, ids=repr)
def test_queues_takes_plain_ascii_digits_only(value: str) -> None:
    with pytest.raises(ConfigError):
        config_mod.with_annotations(
            config_mod.Config(), {config_mod.ANNOTATION_PREFIX + "network.queues": value}
        )


def test_an_error_quotes_a_bounded_part_of_a_huge_value() -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.with_annotations(
            config_mod.Config(), {config_mod.ANNOTATION_PREFIX + "network.queues": "x" * 100_000}
        )
    assert len(str(err.value)) < 1024


OTHER_KEYS = [k for k in config_mod._ALL_KEYS if k not in config_mod.ANNOTATABLE] + [
    "",
    "network",
    "network.",
    "network.model.x",
    "network..model",
    "../hypervisor.path",
    "network/../hypervisor.path",
    "NETWORK.MODEL",
    "network.model ",
    "hypervisor.path\x00network.model",
]


@pytest.mark.parametrize("key", OTHER_KEYS, ids=repr)
def test_every_other_key_is_refused_with_a_host_path(key: str) -> None:
    """CVE-2020-27151's class (an annotation naming the hypervisor, virtiofsd, a kernel or
    an image on the host): nothing but the allowlist can be set, whatever the value."""
    name = config_mod.ANNOTATION_PREFIX + key
    with pytest.raises(ConfigError, match="cannot be set by an annotation"):
        config_mod.with_annotations(config_mod.Config(), {name: "/usr/bin/evil"})
    assert "hypervisor.path" in config_mod._ALL_KEYS  # the list above is the real one


def test_the_allowlist_is_what_the_docs_say() -> None:
    assert config_mod.ANNOTATABLE == ("network.model", "network.queues")


@pytest.mark.root
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hypervisor.path", "EVIL"),
        ("hypervisor.virtiofsd_path", "EVIL"),
        ("image.kernel", "EVIL"),
        ("network.queues", "9" * 5000),
        ("network.model", "EVIL"),
    ],
)
def test_a_refused_annotation_fails_create_before_anything_runs(
    cli: Cli, tmp_path: Path, key: str, value: str
) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    b = busybox.make_bundle(tmp_path / "b", ["true"])
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"] = {config_mod.ANNOTATION_PREFIX + key: value.replace("EVIL", str(evil))}
    (b / "config.json").write_text(json.dumps(spec))
    t = time.monotonic()
    r = cli.create("a1", b)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"annotation {config_mod.ANNOTATION_PREFIX}{key}" in lines[0]
    assert time.monotonic() - t < 20  # refused before any VM boots
    assert not marker.exists()
    assert not [p for sub in ("sandboxes", "containers") for p in (cli.root / sub).glob("*")]
    assert not processes_mentioning(str(cli.root))


# ------------------------------------------------------------------ the channel (no VM)


def test_a_hostile_guest_port_ends_the_channel_without_allocating(tmp_path: Path) -> None:
    """The monitor's end of the virtio-serial mux against a fake QEMU port speaking for a
    hostile guest: frames for sessions that do not exist are dropped, a header claiming a
    4 GiB payload is refused before any of it is read (nothing is allocated for it), and the
    channel ends cleanly: the open session sees EOF, nothing raises."""
    import asyncio

    from cocoon.agent import mux
    from cocoon.runtime.monitor.channel import SerialMuxHost

    async def run() -> None:
        port, listen = tmp_path / "port.sock", tmp_path / "agent.sock"
        guest_done, stop = asyncio.Event(), asyncio.Event()

        async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            dec = mux.Decoder(resync=True)
            while True:
                frames = dec.feed(await r.read(65536))
                hello = [f for f in frames if f.type is mux.FrameType.HELLO]
                if hello:
                    w.write(mux.flush_and(mux.FrameType.HELLO_ACK, hello[-1].payload))
                    break
            await r.readexactly(mux.HEADER.size)  # the host's OPEN of session 1
            for sid in (0, 2, 999, 2**32 - 1):  # sessions the host never opened
                w.write(mux.encode(mux.FrameType.DATA, sid, b"x" * mux.MAX_PAYLOAD))
                w.write(mux.encode(mux.FrameType.CLOSE, sid))
            w.write(mux.encode(mux.FrameType.HELLO_ACK, 0, b"again"))  # ignored
            w.write(mux.encode(mux.FrameType.DATA, 1, b"hello"))
            await w.drain()
            await asyncio.sleep(0.5)  # a bad header drops the good frames read with it
            w.write(mux.HEADER.pack(mux.FrameType.DATA, 1, 2**32 - 1))  # 4 GiB claimed
            await w.drain()
            guest_done.set()
            await stop.wait()
            w.close()

        server = await asyncio.start_unix_server(guest, str(port))
        host = SerialMuxHost(port, listen)
        await host.connect(time.monotonic() + 10)
        await host.serve()
        r, w = await asyncio.open_unix_connection(str(listen))
        got = await asyncio.wait_for(r.read(), 10)  # data, then EOF when the channel ends
        assert got == b"hello"
        await asyncio.wait_for(host.lost.wait(), 5)
        assert guest_done.is_set()
        assert len(host._decoder._buf) <= mux.HEADER.size + 256 * 1024
        w.close()
        stop.set()
        await host.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
