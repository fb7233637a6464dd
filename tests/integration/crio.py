"""CRI-O as the pod tests drive it, the way a kubelet would: a private CRI-O in a network
namespace the tests made, with runtime handlers ``cocoon`` (cocoon's CLI through conmon,
``runtime_type = "oci"``) and ``runc`` (to prove the tests), and ``crictl`` as the client.

Debian 12 packages neither CRI-O nor crictl: ``crio`` comes from PATH, else from
../shared/tools beside the checkout, with its ``pinns`` helper beside it
(../shared/tools/README.md says how it was built and what was measured with it). Debian's
conmon monitors each container and its CNI plugins (bridge, host-local, loopback) set up the
pods' network, only inside the tests' namespace (``SUBNET``, not containerd's).

Every path CRI-O writes is under the fixture's directory: its config (``--config``, an
empty drop-in directory), storage root and runroot, socket, log dir, version and shutdown files,
exits and attach dirs, pinned namespaces, hooks, CDI and mounts files, registries.conf and
signature policy. Images come from the same kind of registry as containerd's
(tests/integration/cri.py), on the namespace's loopback, which registries.conf makes the
(insecure) mirror of docker.io and registry.k8s.io. CRI-O runs the infra container's
``pause_command`` (``/pause``) whatever the image says, so the pause image here carries a
``/pause`` script. A pod must name its cgroup parent: without one, CRI-O (cgroupfs) makes
``/crio`` in every hierarchy and leaves it there. Outside the directory: CRI-O's pulls, like
skopeo's pushes, update root's containers/image blob-info cache
(/var/lib/containers/cache/blob-info-cache-v1.boltdb; nothing moves it), and libcni keeps
its results under /var/lib/cni/results until each pod's network is torn down.

CRI-O drops the infra container of a pod without a shared PID namespace (``drop_infra_ctr``,
on by default, except for ``runtime_type = "vm"``); cocoon boots the pod's VM with the infra
container and needs it for every pod, so it is off here (docs/crio-calls.md).

runc cannot apply the infra container's ``oomScoreAdj: -998`` on these hosts (no
CAP_SYS_RESOURCE): the ``runc`` handler runs a wrapper that raises a negative value to 0 in the
bundle's config.json (and an exec's process.json) before runc. In front of it a second wrapper
records every call CRI-O and conmon make (and a third, the handler's ``monitor_path``, how
CRI-O starts conmon) (argv, cwd, what fds 0-2 are, the bundle's
config.json and an exec's process.json; the output and status of ``state``, ``kill`` and
``delete``) in ``calls.log`` (docs/crio-calls.md was written from it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cocoon.testing.leaks import mounts_under
from tests.integration import callers as C
from tests.integration import cri as R

SUBNET = "10.98.0.0/24"  # only ever inside the tests' own network namespace (not cri.SUBNET)
PAUSE_COMMAND = "/pause"
# The infra process: sleeps until it is told to stop (a shell as PID 1 ignores a TERM it has
# no handler for, and CRI-O would wait out its stop timeout).
PAUSE_SCRIPT = """#!/bin/sh
trap 'exit 0' TERM INT
while :; do sleep 2147483647 & wait $!; done
"""
IMAGES = {R.BUSYBOX_IMAGE: ("/bin/sh",), R.PAUSE_IMAGE: (PAUSE_COMMAND,)}
EXTRA = {R.PAUSE_IMAGE: {PAUSE_COMMAND: PAUSE_SCRIPT}}
CNI_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
SHARED_TOOLS = R.REPO.parent / "shared" / "tools"

# The wrappers' parse of a runtime call: its verb, --bundle and --process (runc's grammar).
PARSE_ARGS = """bundle= process= prev= verb=
for a in "$@"; do
  case "$prev" in --bundle|-b) bundle=$a ;; --process|-p) process=$a ;; esac
  case "$a" in --bundle=*) bundle=${a#--bundle=} ;; --process=*) process=${a#--process=} ;; esac
  if [ -z "$verb" ]; then
    case "$prev" in --root|--log|--log-format|--criu) prev=$a; continue ;; esac
    case "$a" in -*) ;; *) verb=$a ;; esac
  fi
  prev=$a
done
"""

# The runc handler's runtime: raises a negative oomScoreAdj to 0 (see the module's doc).
OOM_WRAPPER = """#!/bin/sh
# cocoon tests: runc cannot set a negative oom_score_adj without CAP_SYS_RESOURCE, which these
# hosts lack; CRI-O gives the infra container -998. Raise it to 0, then run runc.
@PARSE@bundle=${bundle:-.}
raise() { [ -f "$1" ] && sed -i 's/"oomScoreAdj": *-[0-9]*/"oomScoreAdj":0/' "$1"; }
case "$verb" in
  create|run) raise "$bundle/config.json" ;;
  exec) [ -n "$process" ] && raise "$process" ;;
esac
exec @RUNC@ "$@"
"""

# The runc handler's runtime_path: records the call, then runs the OOM wrapper.
LOG_WRAPPER = """#!/bin/sh
# cocoon tests: records a call of CRI-O's or conmon's to the runtime in @LOG@.
log=@LOG@ dir=@DIR@ next=@NEXT@
n=$(date +%H%M%S.%N)
fd() { readlink "/proc/$$/fd/$1" 2>/dev/null || echo closed; }
@PARSE@files=
if [ "$verb" = create ] && [ -f "${bundle:-.}/config.json" ]; then
  cp "${bundle:-.}/config.json" "$dir/$n-config.json" && files="$files $n-config.json"
fi
if [ -n "$process" ] && [ -f "$process" ]; then
  cp "$process" "$dir/$n-process.json" && files="$files $n-process.json"
fi
rec=$(
  printf '%s parent=%s verb=%s\\n' "$n" "$(cat /proc/$PPID/comm 2>/dev/null)" "$verb"
  printf '   argv:'; printf ' %s' "$@"; printf '\\n'
  printf '   cwd: %s\\n' "$PWD"
  printf '   fds: 0 -> %s, 1 -> %s, 2 -> %s\\n' "$(fd 0)" "$(fd 1)" "$(fd 2)"
  [ -n "$files" ] && printf '   files:%s\\n' "$files"
)
printf '%s\\n' "$rec" >> "$log"
case "$verb" in
  state|kill|delete)
    out=$(mktemp "$dir/out.XXXXXX") err=$(mktemp "$dir/err.XXXXXX")
    "$next" "$@" >"$out" 2>"$err"
    rc=$?
    cat "$out"; cat "$err" >&2
    printf '%s %s rc=%s out=%s err=%s\\n' "$(date +%H%M%S.%N)" "$verb" "$rc" \\
      "$(head -c 300 "$out" | tr '\\n' ' ')" "$(head -c 300 "$err" | tr '\\n' ' ')" >> "$log"
    rm -f "$out" "$err"
    exit $rc ;;
esac
exec "$next" "$@"
"""


# The runc handler's monitor_path: records how CRI-O starts conmon, then runs conmon.
MONITOR_WRAPPER = """#!/bin/sh
# cocoon tests: records CRI-O's start of conmon in @LOG@.
log=@LOG@
n=$(date +%H%M%S.%N)
rec=$(
  printf '%s conmon parent=%s\\n' "$n" "$(cat /proc/$PPID/comm 2>/dev/null)"
  printf '   argv:'; printf ' %s' "$@"; printf '\\n'
  printf '   cwd: %s\\n' "$PWD"
  printf '   fds:'
  for f in /proc/$$/fd/*; do printf ' %s -> %s,' "${f##*/}" "$(readlink "$f")"; done
  printf '\\n   env:'; env | grep '^_OCI' | tr '\\n' ' '
)
printf '%s\\n' "$rec" >> "$log"
exec @CONMON@ "$@"
"""


def crio_binary() -> str:
    """crio from PATH, else the one in ../shared/tools beside the checkout; "" if neither."""
    found = shutil.which("crio")
    if found:
        return found
    shared = SHARED_TOOLS / "crio"
    return str(shared) if os.access(shared, os.X_OK) else ""


def pinns_binary(crio: str) -> str:
    """pinns beside crio, else from PATH, else from ../shared/tools; "" if none."""
    for candidate in (Path(crio).parent / "pinns", shutil.which("pinns"), SHARED_TOOLS / "pinns"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return ""


def missing() -> str:
    """Why CRI-O cannot run here beyond crio, pinns and crictl ("" if it can): Debian's
    packages (callers.NEEDS["crio"], also the ``daemon("crio")`` marker's), the registry."""
    return C.missing("crio") or R.missing()


@dataclass
class Crio(R.CriClient):
    """A private CRI-O: everything under ``home``."""

    home: Path
    crio_daemon: C.Daemon

    @property
    def base(self) -> Path:
        return self.home

    @property
    def daemon(self) -> C.Daemon:
        return self.crio_daemon

    @property
    def socket(self) -> Path:
        return self.home / "crio.sock"

    @property
    def runtime_root(self) -> Path:
        """The ``cocoon`` handler's runtime_root: CRI-O and conmon pass it as --root."""
        return self.home / "cocoon"

    @property
    def runc_root(self) -> Path:
        return self.home / "runc"

    @property
    def subnet(self) -> str:
        return SUBNET

    def exec_tty(self, cid: str, *cmd: str) -> tuple[int, str]:
        """CRI-O (1.25 to at least 1.29, cri-o/cri-o#8483) may end an ``exec -it`` stream
        before it has copied the last output of a process that exits at once (its pty read
        fails with EIO first; under runc here 2 of 6 ``tty`` runs showed nothing): the
        command lingers a second after it is done, keeping its status."""
        linger = '"$@"; s=$?; sleep 1; exit $s'
        return self.crictl_tty("exec", "-it", cid, "sh", "-c", linger, "sh", *cmd)

    @property
    def calls(self) -> Path:
        """What CRI-O and conmon called the ``runc`` handler's runtime with."""
        return self.home / "calls" / "calls.log"


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def write_wrappers(base: Path) -> Path:
    """The runc handler's two wrappers; returns the one CRI-O calls."""
    calls = base / "calls"
    calls.mkdir(parents=True, exist_ok=True)
    oom = base / "runc-oom"
    oom.write_text(OOM_WRAPPER.replace("@PARSE@", PARSE_ARGS).replace("@RUNC@", C.RUNC))
    conmon = base / "conmon-log"
    conmon.write_text(
        MONITOR_WRAPPER.replace("@LOG@", str(calls / "calls.log")).replace("@CONMON@", C.CONMON)
    )
    logger = base / "runc-log"
    logger.write_text(
        LOG_WRAPPER.replace("@PARSE@", PARSE_ARGS)
        .replace("@LOG@", str(calls / "calls.log"))
        .replace("@DIR@", str(calls))
        .replace("@NEXT@", str(oom))
    )
    for w in (oom, conmon, logger):
        w.chmod(0o755)
    return logger


def crio_config(base: Path, pinns: str, mirror: str) -> Path:
    """crio.conf with every path under ``base``, the two handlers, CNI under ``base``, images
    from the registry at ``mirror`` (host:port); registries.conf, policy.json, storage.conf."""
    cni = R.cni_config(base, "cocoon-crio-pods", SUBNET)
    for d in ("hooks", "cdi", "keys", "confd", "registries.d", "tmp"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "mounts.conf").write_text("")
    (base / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    mirrors = []
    for registry in R.MIRRORED:
        mirrors += [
            "[[registry]]",
            f'prefix = "{registry}"',
            f'location = "{registry}"',
            "[[registry.mirror]]",
            f'location = "{mirror}"',
            "insecure = true",
        ]
    (base / "registries.conf").write_text(
        "\n".join(["unqualified-search-registries = []", *mirrors, ""])
    )
    (base / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/root"\nrunroot = "{base}/run"\n'
    )
    logger = write_wrappers(base)

    def monitor(path: str | Path) -> list[str]:
        return [
            f'monitor_path = "{path}"',
            'monitor_cgroup = "pod"',
            f"monitor_env = {toml_list(['PATH=' + ENV['PATH']])}",
        ]

    conf = base / "crio.conf"
    conf.write_text(
        "\n".join(
            [
                "[crio]",
                f'root = "{base}/root"',
                f'runroot = "{base}/run"',
                'storage_driver = "overlay"',
                f'log_dir = "{base}/logs"',
                f'version_file = "{base}/version"',
                f'version_file_persist = "{base}/version-persist"',
                f'clean_shutdown_file = "{base}/clean.shutdown"',
                "[crio.api]",
                f'listen = "{base}/crio.sock"',
                'stream_address = "127.0.0.1"',
                'stream_port = "0"',
                "[crio.runtime]",
                'default_runtime = "runc"',
                'cgroup_manager = "cgroupfs"',
                f'pinns_path = "{pinns}"',
                f'namespaces_dir = "{base}/ns"',
                f'container_exits_dir = "{base}/exits"',
                f'container_attach_socket_dir = "{base}/attach"',
                f'decryption_keys_path = "{base}/keys"',
                f'hooks_dir = ["{base}/hooks"]',
                f'cdi_spec_dirs = ["{base}/cdi"]',
                f'default_mounts_file = "{base}/mounts.conf"',
                f'irqbalance_config_file = "{base}/irqbalance"',
                'apparmor_profile = "unconfined"',
                "selinux = false",
                # cocoon needs the infra container in every pod (module doc).
                "drop_infra_ctr = false",
                "[crio.runtime.runtimes.runc]",
                f'runtime_path = "{logger}"',
                'runtime_type = "oci"',
                f'runtime_root = "{base}/runc"',
                *monitor(base / "conmon-log"),
                "[crio.runtime.runtimes.cocoon]",
                f'runtime_path = "{C.COCOON}"',
                'runtime_type = "oci"',
                f'runtime_root = "{base}/cocoon"',
                *monitor(C.CONMON),
                "[crio.image]",
                f'pause_image = "{R.PAUSE_IMAGE}"',
                f'pause_command = "{PAUSE_COMMAND}"',
                f'signature_policy = "{base}/policy.json"',
                f'big_files_temporary_dir = "{base}/tmp"',
                "[crio.network]",
                f'network_dir = "{cni}"',
                f'plugin_dirs = ["{CNI_PLUGINS}"]',
                "[crio.metrics]",
                "enable_metrics = false",
                "",
            ]
        )
    )
    return conf


def crio_env(base: Path) -> dict[str, str]:
    """No host configuration of containers/image and containers/storage, no credentials."""
    return {
        **ENV,
        "HOME": str(base),
        "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
        "TMPDIR": str(base / "tmp"),
    }


def start_crio(base: Path, netns: Path, crictl: str, crio: str, pinns: str) -> Crio:
    base.mkdir(parents=True, exist_ok=True)
    reg = R.start_registry(base / "registry", netns)
    try:
        R.fill_registry(reg, base / "images", IMAGES, EXTRA)
        conf = crio_config(base, pinns, reg.host)
        sock = base / "crio.sock"
        argv: list[str | Path] = [C.NSENTER, f"--net={netns}", crio, "--config", conf]
        argv += ["--config-dir", base / "confd", "--registries-conf", base / "registries.conf"]
        argv += ["--registries-conf-dir", base / "registries.d", "--signature-policy"]
        argv += [base / "policy.json", "--log-level", "info"]
        d = C.start_daemon(
            "crio",
            argv,
            base / "crio.log",
            lambda: (
                sock.is_socket()
                and C.run(
                    [crictl, "--runtime-endpoint", f"unix://{sock}", "--timeout", "5s", "version"],
                    timeout=20,
                ).returncode
                == 0
            ),
            env=crio_env(base),
        )
    except BaseException:
        reg.daemon.stop()
        cleanup(base)
        raise
    c = Crio(netns=netns, crictl_path=crictl, registry=reg, home=base, crio_daemon=d)
    return R.pulled(c, IMAGES, stop_crio)


def cleanup(base: Path) -> None:
    """What CRI-O and its conmons may leave: containers of either handler (forced down),
    processes naming ``base`` (conmon), and mounts under ``base`` (containers/storage keeps
    ``root/overlay`` bind-mounted on itself; each container's rootfs, the pods' /dev/shm and
    the pinned namespaces if a pod was not removed); then checks that no mount is left."""
    for runtime, root in ((C.RUNC, base / "runc"), (C.COCOON, base / "cocoon")):
        if root.is_dir() and os.access(runtime, os.X_OK):
            for cid in C.run([runtime, "--root", root, "list", "-q"]).stdout.split():
                C.run([runtime, "--root", root, "delete", "--force", cid], timeout=120)
    C.kill_stragglers(str(base))
    deadline = time.monotonic() + 20
    while mounts_under(base):
        C.unmount_under(base)
        if time.monotonic() > deadline:
            raise AssertionError(f"mounts left under {base}: {mounts_under(base)}")
        time.sleep(0.2)


def stop_crio(c: Crio) -> None:
    """Every pod stopped and removed through the CRI, every image removed, then CRI-O and the
    registry stopped, and nothing of theirs left running or mounted."""
    try:
        if c.daemon.proc.poll() is None:
            for pod in c.crictl("pods", "-q").stdout.split():
                c.crictl("stopp", pod)
                c.crictl("rmp", "-f", pod)
            c.crictl("rmi", "--all")
        c.daemon.stop()
    finally:
        c.registry.daemon.stop()
        cleanup(c.home)


@contextlib.contextmanager
def crio_in(base: Path, netns: Path, crictl: str) -> Iterator[Crio]:
    """CRI-O and its registry in ``netns``; skips the caller's tests if crio, pinns, conmon,
    the CNI plugins, the registry or skopeo is missing."""
    crio = crio_binary()
    if not crio:
        pytest.skip("crio is not on PATH nor in ../shared/tools (Debian 12 does not package it)")
    pinns = pinns_binary(crio)
    if not pinns:
        pytest.skip(f"no pinns beside {crio}, on PATH or in ../shared/tools")
    if reason := missing():
        pytest.skip(reason)
    c = start_crio(base, netns, crictl, crio, pinns)
    try:
        yield c
    finally:
        stop_crio(c)
