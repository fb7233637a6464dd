"""containerd's CRI plugin as the pod tests drive it, the way a kubelet would: a private
containerd with the CRI plugin on, in a network namespace the tests made (CNI bridge and
host-local addresses only inside it), runtime handlers ``cocoon`` (runc.v2 with cocoon as its
binary) and ``runc`` (to prove the tests), and ``crictl`` as the client
(../shared/tools/README.md: Debian 12 does not package it).

Images come through the CRI (``crictl pull``, and containerd's own pull of the pause image)
from a registry on that namespace's loopback: Debian's docker-registry, filled with skopeo
from OCI archives of a busybox-static rootfs. containerd's registry hosts (``config_path``,
one hosts.toml per registry) make it the mirror of docker.io and registry.k8s.io. containerd
falls back to an image's own registry when the mirror lacks the image; the namespace has no
route out, so such a pull fails there and sends nothing off the machine
(tests/integration/test_cri_registry.py).

The crictl side (``CriClient``), the registry and the CNI set-up are shared with CRI-O's
(tests/integration/crio.py).
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cocoon.agent.network import loopback_up
from cocoon.runtime.network import netns as N
from tests.integration import callers as C

REPO = Path(__file__).resolve().parents[2]
PAUSE_IMAGE = "registry.k8s.io/pause:cocoon"
BUSYBOX_IMAGE = "docker.io/library/busybox:cocoon"
SUBNET = "10.99.0.0/24"  # only ever inside the tests' own network namespace
REGISTRY = "/usr/bin/docker-registry"
SKOPEO = "/usr/bin/skopeo"
# On the loopback of the tests' own namespace, which has a port space of its own; nothing else
# there binds it (containerd, started after the registry, takes an ephemeral port).
REGISTRY_PORT = 5000
# The registries the mirror stands in for, and where each image goes in the mirror.
MIRRORED = ("docker.io", "registry.k8s.io")
IMAGES = {BUSYBOX_IMAGE: ("/bin/sh",), PAUSE_IMAGE: ("sleep", "2147483647")}
# What the CRI set-up needs beyond the containerd caller (callers.NEEDS["containerd"]).
NEEDS = {REGISTRY: "docker-registry", SKOPEO: "skopeo"}
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# Whatever the environment says, no proxy: requests go to the namespace's 127.0.0.1 only.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
MANIFEST_TYPES = ",".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def crictl_binary() -> str:
    """crictl from PATH, else the one beside the checkout; "" if neither."""
    found = shutil.which("crictl")
    if found:
        return found
    shared = REPO.parent / "shared" / "tools" / "crictl"
    return str(shared) if shared.exists() else ""


def missing() -> str:
    """Why the CRI set-up cannot run here beyond the containerd caller ("" if it can)."""
    for path, package in NEEDS.items():
        if not os.access(path, os.X_OK):
            return f"needs {path} (Debian package {package}; COCOON_DEV=1 scripts/setup)"
    return ""


def split_ref(ref: str) -> tuple[str, str, str]:
    """docker.io/library/busybox:cocoon -> ("docker.io", "library/busybox", "cocoon")."""
    name, tag = ref.rsplit(":", 1)
    registry, repo = name.split("/", 1)
    return registry, repo, tag


def http(netns: Path, url: str, *, method: str = "GET", accept: str = "") -> tuple[int, Any]:
    """One HTTP request from a thread in ``netns`` (only ever to its loopback): (status,
    headers); (0, None) if nothing answered."""
    req = urllib.request.Request(url, method=method)
    if accept:
        req.add_header("Accept", accept)

    def fetch() -> tuple[int, Any]:
        try:
            with _DIRECT.open(req, timeout=5) as r:
                r.read()
                return r.status, r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.headers
        except OSError:
            return 0, None

    return N.in_netns(str(netns), fetch)


@dataclass
class Registry:
    """docker-registry serving plain HTTP on 127.0.0.1 of the network namespace ``netns``."""

    base: Path
    netns: Path
    daemon: C.Daemon
    port: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def digest(self, repo: str, tag: str) -> str:
        """The manifest digest the registry serves for ``repo:tag`` ("" if it has none)."""
        url = f"http://{self.host}/v2/{repo}/manifests/{tag}"
        status, headers = http(self.netns, url, method="HEAD", accept=MANIFEST_TYPES)
        return str(headers.get("Docker-Content-Digest", "")) if status == 200 else ""

    def push(self, archive: Path, repo: str, tag: str) -> None:
        """``skopeo copy`` of an OCI archive into the registry, run in its namespace with a
        private policy, no credentials and temporary files under ``base``."""
        policy = self.base / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        tmp = self.base / "tmp"
        tmp.mkdir(exist_ok=True)
        argv: list[str | Path] = [C.NSENTER, f"--net={self.netns}", SKOPEO, "--policy", policy]
        argv += ["--tmpdir", tmp]
        argv += ["copy", "--dest-tls-verify=false", "--dest-no-creds"]
        argv += [f"oci-archive:{archive}", f"docker://{self.host}/{repo}:{tag}"]
        r = C.run(argv, env={**ENV, "HOME": str(self.base)})
        assert r.returncode == 0, f"skopeo copy {archive}: {r.stderr}"


def registry_config(base: Path, port: int) -> Path:
    """A minimal config.yml: filesystem storage under ``base``, plain HTTP on the loopback,
    no auth (not Debian's /etc/docker/registry/config.yml: all addresses, htpasswd)."""
    conf = base / "config.yml"
    conf.write_text(
        "\n".join(
            [
                "version: 0.1",
                "log:",
                "  level: info",
                "storage:",
                "  filesystem:",
                f"    rootdirectory: {base / 'data'}",
                "http:",
                f"  addr: 127.0.0.1:{port}",
                "",
            ]
        )
    )
    return conf


def start_registry(base: Path, netns: Path, port: int = REGISTRY_PORT) -> Registry:
    base.mkdir(parents=True, exist_ok=True)
    conf = registry_config(base, port)
    d = C.start_daemon(
        "docker-registry",
        [C.NSENTER, f"--net={netns}", REGISTRY, "serve", conf],
        base / "registry.log",
        lambda: http(netns, f"http://127.0.0.1:{port}/v2/")[0] == 200,
        env=ENV,
    )
    return Registry(base, netns, d, port)


def fill_registry(
    reg: Registry,
    work: Path,
    images: Mapping[str, Sequence[str]] = IMAGES,
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Each image of ``images`` (reference: command), by default the busybox image and a pause
    image (its command sleeps), as an OCI archive of one busybox-static layer pushed under its
    repository and tag (the mirror's view). ``extra`` adds executable files to one image's
    layer (reference: {path in the rootfs: content}), e.g. CRI-O's ``/pause``."""
    work.mkdir(parents=True, exist_ok=True)
    layer = C.layer_tar(C.busybox_rootfs(work / "rootfs"), work / "layer.tar")
    for ref, cmd in images.items():
        _, repo, tag = split_ref(ref)
        short = repo.rsplit("/", 1)[-1]
        files = (extra or {}).get(ref)
        own = layer
        if files:
            rootfs = C.busybox_rootfs(work / f"rootfs-{short}")
            for path, content in files.items():
                f = rootfs / path.lstrip("/")
                f.write_text(content)
                f.chmod(0o755)
            own = C.layer_tar(rootfs, work / f"layer-{short}.tar")
        archive = C.oci_archive(own, work / f"{short}.tar", ref, cmd)
        reg.push(archive, repo, tag)


def registry_hosts(base: Path, mirror: str) -> Path:
    """containerd's registry hosts directory (CRI ``registry.config_path``): for each mirrored
    registry a hosts.toml naming ``mirror`` (plain HTTP) for pull and resolve. No ``server``
    line: the registry's own endpoint stays the fallback, as it is for a real mirror."""
    d = base / "certs.d"
    for registry in MIRRORED:
        (d / registry).mkdir(parents=True, exist_ok=True)
        (d / registry / "hosts.toml").write_text(
            f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
        )
    return d


@dataclass
class CriClient(abc.ABC):
    """crictl against a CRI runtime's socket, run in the tests' network namespace (the
    runtime's exec and attach streams come from its server on 127.0.0.1 there), and the
    registry its images come from. containerd (``Cri``) and CRI-O (tests/integration/crio.py)
    say where their socket, daemon, files and cocoon's state root are."""

    netns: Path
    crictl_path: str
    registry: Registry

    @property
    @abc.abstractmethod
    def base(self) -> Path:
        """The directory of the runtime's private state; the tests' specs and files go here."""

    @property
    @abc.abstractmethod
    def daemon(self) -> C.Daemon: ...

    @property
    @abc.abstractmethod
    def socket(self) -> Path: ...

    @property
    @abc.abstractmethod
    def runtime_root(self) -> Path:
        """cocoon's --root as the runtime passes it for the ``cocoon`` handler."""

    @property
    @abc.abstractmethod
    def subnet(self) -> str:
        """The pods' CNI subnet (host-local), only ever inside the tests' namespace."""

    def _argv(self, timeout: float) -> list[str | Path]:
        self.daemon.check_alive()
        sock = f"unix://{self.socket}"
        # In the runtime's namespace: exec and attach stream from its server on 127.0.0.1 there.
        argv: list[str | Path] = [C.NSENTER, f"--net={self.netns}", self.crictl_path]
        return [*argv, "--runtime-endpoint", sock, "--image-endpoint", sock, "--timeout",
                f"{int(timeout)}s"]  # fmt: skip

    def crictl(self, *args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return C.run([*self._argv(timeout), *args], timeout=timeout + 30)

    def crictl_tty(self, *args: str | Path, timeout: float = 120) -> tuple[int, str]:
        """crictl under a pseudo-terminal (``exec -it`` wants one): exit status and output."""
        return C.run_pty([*self._argv(timeout), *args], timeout=timeout + 30)

    def exec_tty(self, cid: str, *cmd: str) -> tuple[int, str]:
        """``crictl exec -it``: exit status and what the terminal showed."""
        return self.crictl_tty("exec", "-it", cid, *cmd)

    def ok(self, *args: str | Path, timeout: float = 240) -> str:
        r = self.crictl(*args, timeout=timeout)
        assert r.returncode == 0, f"crictl {args}: {r.stderr}\n{self.daemon.log_tail(20)}"
        return r.stdout.strip()

    def write(self, name: str, doc: dict[str, Any]) -> Path:
        path = self.base / "specs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc))
        return path


@dataclass
class Cri(CriClient):
    """containerd with the CRI plugin."""

    ctd: C.Containerd

    @property
    def base(self) -> Path:
        return self.ctd.base

    @property
    def daemon(self) -> C.Daemon:
        return self.ctd.daemon

    @property
    def socket(self) -> Path:
        return self.ctd.address

    @property
    def runtime_root(self) -> Path:
        """cocoon's --root as the runc.v2 shim passes it for the CRI's k8s.io namespace."""
        return self.ctd.base / "cocoon" / "k8s.io"

    @property
    def subnet(self) -> str:
        return SUBNET


def cni_config(base: Path, name: str, subnet: str) -> Path:
    """A CNI config directory under ``base``: one network ``name`` (a bridge ``cni0`` and
    host-local addresses from ``subnet``, kept under ``base``; plus loopback)."""
    cni = base / "cni"
    cni.mkdir(parents=True, exist_ok=True)
    (cni / "10-pods.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "0.4.0",
                "name": name,
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "cni0",
                        "isGateway": True,
                        "ipMasq": False,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": subnet}]],
                            "dataDir": str(base / "ipam"),
                        },
                    },
                    {"type": "loopback"},
                ],
            }
        )
    )
    return cni


def cri_config(base: Path, mirror: str) -> Path:
    """containerd's config with the CRI plugin: two handlers, CNI under ``base``, images from
    the registry at ``mirror`` (host:port)."""
    cni = cni_config(base, "cocoon-pods", SUBNET)
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
            f"{cri[:-1]}.registry]",
            f'  config_path = "{registry_hosts(base, mirror)}"',
        ],
    )


def start_cri(base: Path, netns: Path, crictl: str) -> Cri:
    base.mkdir(parents=True, exist_ok=True)
    reg = start_registry(base / "registry", netns)
    try:
        fill_registry(reg, base / "images")
        conf = cri_config(base, reg.host)
        sock = base / "containerd.sock"
        d = C.start_daemon(
            "containerd (CRI)",
            [C.NSENTER, f"--net={netns}", C.CONTAINERD, "--config", conf, "--log-level", "info"],
            base / "containerd.log",
            lambda: (
                sock.is_socket()
                and C.run([C.CTR, "--address", sock, "version"], timeout=10).returncode == 0
            ),
            env=ENV,
        )
    except BaseException:
        reg.daemon.stop()
        raise
    cri = Cri(netns=netns, crictl_path=crictl, registry=reg, ctd=C.Containerd(base, d))
    return pulled(cri, IMAGES, stop_cri)


CriT = TypeVar("CriT", bound=CriClient)


def pulled(client: CriT, images: Iterable[str], stop: Callable[[CriT], None]) -> CriT:
    """``client`` once it has pulled ``images`` through the CRI (the pause image too: runp
    would pull it, but fail slower); stopped if a pull fails."""
    try:
        for ref in images:
            client.ok("pull", ref)
    except BaseException:
        stop(client)
        raise
    return client


@contextlib.contextmanager
def cri_namespace(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[tuple[Path, Path, str]]:
    """A short base directory (sockets live under it), a network namespace of the tests' own
    with lo up (the registry and the CRI's stream server are on its 127.0.0.1) and crictl:
    (base, netns, crictl). Skips the caller's tests when there is no crictl."""
    crictl = crictl_binary()
    if not crictl:
        pytest.skip("crictl is not on PATH nor in ../shared/tools (Debian 12 does not package it)")
    base = tmp_path_factory.mktemp(name)
    ns = base / "netns"
    N.create_netns(ns)
    try:
        N.in_netns(str(ns), loopback_up)
        yield base, ns, crictl
    finally:
        N.remove_netns(ns)


def stop_cri(cri: Cri) -> None:
    """Every pod stopped and removed through the CRI, then containerd and the registry
    stopped."""
    try:
        if cri.ctd.daemon.proc.poll() is None:
            for pod in cri.crictl("pods", "-q").stdout.split():
                cri.crictl("stopp", pod)
                cri.crictl("rmp", "-f", pod)
        C.stop_containerd(cri.ctd)
    finally:
        cri.registry.daemon.stop()


@contextlib.contextmanager
def cri_containerd(base: Path, netns: Path, crictl: str) -> Iterator[Cri]:
    """containerd with the CRI plugin and its registry in ``netns``; skips the caller's tests
    if the registry or skopeo is missing."""
    if reason := missing():
        pytest.skip(reason)
    cri = start_cri(base, netns, crictl)
    try:
        yield cri
    finally:
        stop_cri(cri)
