"""containerd's CRI plugin as the pod tests drive it, the way a kubelet would: a private
containerd with the CRI plugin on, in a network namespace the tests made (CNI bridge and
host-local addresses only inside it), runtime handlers ``cocoon`` (runc.v2 with cocoon as its
binary) and ``runc`` (to prove the tests), images imported into its ``k8s.io`` namespace, and
``crictl`` as the client (../shared/tools/README.md: Debian 12 does not package it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration import callers as C

REPO = Path(__file__).resolve().parents[2]
PAUSE_IMAGE = "registry.k8s.io/pause:cocoon"
BUSYBOX_IMAGE = "docker.io/library/busybox:cocoon"
SUBNET = "10.99.0.0/24"  # only ever inside the tests' own network namespace


def crictl_binary() -> str:
    """crictl from PATH, else the one beside the checkout; "" if neither."""
    found = shutil.which("crictl")
    if found:
        return found
    shared = REPO.parent / "shared" / "tools" / "crictl"
    return str(shared) if shared.exists() else ""


@dataclass
class Cri:
    ctd: C.Containerd
    netns: Path
    crictl_path: str

    @property
    def runtime_root(self) -> Path:
        """cocoon's --root as the runc.v2 shim passes it for the CRI's k8s.io namespace."""
        return self.ctd.base / "cocoon" / "k8s.io"

    def crictl(self, *args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        self.ctd.daemon.check_alive()
        sock = f"unix://{self.ctd.address}"
        # In containerd's namespace: exec and attach stream from its server on 127.0.0.1 there.
        argv = [C.NSENTER, f"--net={self.netns}", self.crictl_path]
        argv += ["--runtime-endpoint", sock, "--image-endpoint", sock]
        return C.run([*argv, "--timeout", f"{int(timeout)}s", *args], timeout=timeout + 30)

    def ok(self, *args: str | Path, timeout: float = 240) -> str:
        r = self.crictl(*args, timeout=timeout)
        assert r.returncode == 0, f"crictl {args}: {r.stderr}\n{self.ctd.daemon.log_tail(20)}"
        return r.stdout.strip()

    def write(self, name: str, doc: dict[str, Any]) -> Path:
        path = self.ctd.base / "specs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc))
        return path


def cri_config(base: Path) -> Path:
    """containerd's config with the CRI plugin: two handlers, CNI under ``base``."""
    cni = base / "cni"
    cni.mkdir(parents=True, exist_ok=True)
    (cni / "10-pods.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "0.4.0",
                "name": "cocoon-pods",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "cni0",
                        "isGateway": True,
                        "ipMasq": False,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": SUBNET}]],
                            "dataDir": str(base / "ipam"),
                        },
                    },
                    {"type": "loopback"},
                ],
            }
        )
    )
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    runtimes = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
    return C.containerd_config(
        base,
        [
            cri,
            f'  sandbox_image = "{PAUSE_IMAGE}"',
            # containerd gives the pause container oom_score_adj -998, which needs
            # CAP_SYS_RESOURCE that these hosts lack (runc fails): keep it at ours.
            "  restrict_oom_score_adj = true",
            "  netns_mounts_under_state_dir = true",
            f"{cri[:-1]}.containerd]",
            '  default_runtime_name = "runc"',
            f"{runtimes}.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"{runtimes}.runc.options]",
            f'  BinaryName = "{C.RUNC}"',
            f'  Root = "{base}/runc"',
            f"{runtimes}.cocoon]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"{runtimes}.cocoon.options]",
            f'  BinaryName = "{C.COCOON}"',
            f'  Root = "{base}/cocoon"',
            f"{cri[:-1]}.cni]",
            '  bin_dir = "/usr/lib/cni"',
            f'  conf_dir = "{cni}"',
        ],
    )


def import_images(ctd: C.Containerd, work: Path) -> None:
    """The busybox image and a pause image (its command sleeps) into ``k8s.io``."""
    layer = C.layer_tar(C.busybox_rootfs(work / "rootfs"), work / "layer.tar")
    for name, cmd in ((BUSYBOX_IMAGE, ("/bin/sh",)), (PAUSE_IMAGE, ("sleep", "2147483647"))):
        archive = C.oci_archive(
            layer, work / f"{name.rsplit(':', 1)[0].rsplit('/', 1)[1]}.tar", name, cmd
        )
        r = ctd.ctr("-n", "k8s.io", "images", "import", archive)
        assert r.returncode == 0, r.stderr


def start_cri(base: Path, netns: Path, crictl: str) -> Cri:
    base.mkdir(parents=True, exist_ok=True)
    conf = cri_config(base)
    sock = base / "containerd.sock"
    d = C.start_daemon(
        "containerd (CRI)",
        [C.NSENTER, f"--net={netns}", C.CONTAINERD, "--config", conf, "--log-level", "info"],
        base / "containerd.log",
        lambda: (
            sock.is_socket()
            and C.run([C.CTR, "--address", sock, "version"], timeout=10).returncode == 0
        ),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    cri = Cri(C.Containerd(base, d), netns, crictl)
    try:
        import_images(cri.ctd, base / "images")
    except BaseException:
        C.stop_containerd(cri.ctd)
        raise
    return cri


def stop_cri(cri: Cri) -> None:
    """Every pod stopped and removed through the CRI, then containerd stopped."""
    if cri.ctd.daemon.proc.poll() is None:
        for pod in cri.crictl("pods", "-q").stdout.split():
            cri.crictl("stopp", pod)
            cri.crictl("rmp", "-f", pod)
    C.stop_containerd(cri.ctd)


@contextlib.contextmanager
def cri_containerd(base: Path, netns: Path, crictl: str) -> Iterator[Cri]:
    cri = start_cri(base, netns, crictl)
    try:
        yield cri
    finally:
        stop_cri(cri)
