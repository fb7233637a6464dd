"""Images through containerd's CRI plugin come from the registry the tests run on their network
namespace's loopback (tests/integration/cri.py), and nothing else can: the namespace has no
route out, so when the mirror lacks an image containerd's fallback to the image's own registry
fails there at once and sends nothing off the machine. No VM: the CRI set-up only."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator

import pytest

from tests.integration import callers as C
from tests.integration.cri import IMAGES, SUBNET, Cri, cri_containerd, cri_namespace, split_ref

pytestmark = [pytest.mark.root, pytest.mark.daemon("containerd")]
IP = "/usr/bin/ip"
# Every route the namespace may hold, in any table: its loopback, the CNI bridge's subnet,
# IPv6 link-local and multicast. A default route, or any other prefix, would be a way out.
INSIDE = [
    ipaddress.ip_network(n) for n in ("127.0.0.0/8", SUBNET, "::1/128", "fe80::/10", "ff00::/8")
]


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    with (
        cri_namespace(tmp_path_factory, "cri") as (base, ns, crictl),
        cri_containerd(base / "c", ns, crictl) as c,
    ):
        yield c


def routes(cri: Cri, family: str) -> list[dict[str, str]]:
    r = C.run([C.NSENTER, f"--net={cri.netns}", IP, "-j", family, "route", "show", "table", "all"])
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout or "[]"))


def test_the_namespace_has_no_route_out(cri: Cri) -> None:
    """With a pod up (runc: the CNI bridge and the pod's veth in place), every route in every
    table of the namespace stays inside it."""
    meta = {"name": "routes", "namespace": "default", "uid": "uid-routes", "attempt": 1}
    pod = cri.ok("runp", "--runtime", "runc", cri.write("routes-pod.json", {"metadata": meta}))
    try:
        listed = [r for family in ("-4", "-6") for r in routes(cri, family)]
        assert any(r["dst"] == SUBNET for r in listed), f"no CNI bridge route: {listed}"
        for route in listed:
            assert route["dst"] != "default", f"a default route: {route}"
            dst = ipaddress.ip_network(route["dst"], strict=False)
            inside = [n for n in INSIDE if dst.network_address in n and dst.broadcast_address in n]
            assert inside, f"a route out of the namespace: {route}"
    finally:
        cri.ok("stopp", pod)
        cri.ok("rmp", pod)


def test_an_image_the_mirror_lacks_fails_to_pull_at_once(cri: Cri) -> None:
    ref = "docker.io/library/busybox:not-in-mirror"
    start = time.monotonic()
    r = cri.crictl("pull", ref, timeout=60)
    took = time.monotonic() - start
    assert r.returncode != 0, r.stdout
    assert took < 30, f"the pull took {took:.0f}s: it must fail at once, not time out"
    # The mirror was asked first and had no such tag ...
    assert "/v2/library/busybox/manifests/not-in-mirror" in cri.registry.daemon.log_tail(200)
    # ... then containerd fell back to the image's own registry and found no way there: a
    # resolver off the namespace has no route, one on 127.0.0.x has no listener in it.
    assert "registry-1.docker.io" in r.stderr, r.stderr
    assert "network is unreachable" in r.stderr or "connection refused" in r.stderr, r.stderr
    listed = json.loads(cri.ok("images", "-o", "json"))["images"]
    assert not [i for i in listed if ref in i["repoTags"]], listed


def test_the_images_are_the_mirrored_ones(cri: Cri) -> None:
    listed = json.loads(cri.ok("images", "-o", "json"))["images"]
    assert sorted(t for i in listed for t in i["repoTags"]) == sorted(IMAGES), listed
    for ref in IMAGES:
        _, repo, tag = split_ref(ref)
        digest = cri.registry.digest(repo, tag)
        assert digest, f"the registry has no {repo}:{tag}"
        (image,) = [i for i in listed if ref in i["repoTags"]]
        assert image["repoDigests"] == [f"{ref.rsplit(':', 1)[0]}@{digest}"], image
