"""How a spec's network namespace is read and rewritten for the guest, and how the agent
takes a container's net.* sysctls when the container shares the guest's namespace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cocoon.agent.containers import apply_guest_net_sysctls
from cocoon.agent.errors import ContainerError
from cocoon.runtime.container import busybox
from cocoon.runtime.container import spec as specmod


def spec_with(namespaces: list[dict[str, str]], **linux: Any) -> dict[str, Any]:
    return {"linux": {"namespaces": namespaces, **linux}}


def test_network_namespace_path_new_or_none() -> None:
    assert specmod.network_namespace(spec_with([{"type": "network", "path": "/x"}])) == (
        True,
        "/x",
    )
    assert specmod.network_namespace(spec_with([{"type": "network"}])) == (True, "")
    assert specmod.network_namespace(spec_with([{"type": "pid"}])) == (False, "")
    assert specmod.network_namespace({}) == (False, "")


def test_guest_spec_joins_the_guest_netns_only_with_a_network(tmp_path: Path) -> None:
    b = busybox.make_bundle(tmp_path / "b", ["true"])
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["namespaces"] = [{"type": "network", "path": "/run/netns/x"}, {"type": "pid"}]
    (b / "config.json").write_text(json.dumps(spec))
    bundle = specmod.load_bundle(b)
    types = [ns for ns in specmod.guest_spec(bundle, "c1")["linux"]["namespaces"]]
    assert types == [{"type": "network"}, {"type": "pid"}]  # a new, empty one in the guest
    types = [ns for ns in specmod.guest_spec(bundle, "c1", None, True)["linux"]["namespaces"]]
    assert types == [{"type": "pid"}]


def test_net_sysctls_go_to_the_guest_when_it_shares_the_netns(tmp_path: Path) -> None:
    knob = tmp_path / "proc/sys/net/ipv4/ip_unprivileged_port_start"
    knob.parent.mkdir(parents=True)
    knob.write_text("1024")
    spec = spec_with(
        [{"type": "pid"}],
        sysctl={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.msgmax": "9000"},
    )
    apply_guest_net_sysctls(spec, tmp_path)
    assert knob.read_text() == "0"
    assert spec["linux"]["sysctl"] == {"kernel.msgmax": "9000"}  # crun still sets this one
    own = spec_with([{"type": "network"}], sysctl={"net.ipv4.ip_forward": "1"})
    apply_guest_net_sysctls(own, tmp_path)
    assert own["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}  # crun sets it in its netns


@pytest.mark.parametrize("key", ["net.nosuch.knob", "net.../../etc/passwd"])
def test_bad_net_sysctls_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ContainerError):
        apply_guest_net_sysctls(spec_with([], sysctl={key: "1"}), tmp_path)
