"""A pooled VM's warm-up: one throwaway container run in it before the pool offers it.

The first container a VM runs pays for what nothing in the boot did: the shared filesystem's
mount in the guest, crun's first start and the kernel's namespace, cgroup and mount paths,
and the agent's own create path. Under TCG that first run also pays for translating all of
it (a first ``crun run`` in a guest takes ~0.37 s against ~0.21 s for the next ones, and a
claim's CreateContainer 0.55-0.6 s against ~0.24 s in a warmed VM; docs/performance.md). A
pool fill (``sandbox.pool``) therefore runs ``true`` in a busybox container through the same
agent calls a ``run`` makes (share, create and start in one, wait, remove) and marks the VM
ready only after it exited 0: a pooled VM that cannot run a container is never handed out.

May import: the standard library, cocoon.runtime.{errors, container.{busybox, create, spec},
sandbox.{client, hostmount}}.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cocoon.runtime.container import busybox
from cocoon.runtime.container import spec as specmod
from cocoon.runtime.container.create import share_in
from cocoon.runtime.errors import LifecycleError
from cocoon.runtime.sandbox import hostmount
from cocoon.runtime.sandbox.client import CallError, Client, b64, rpc_error

WARM_ID = "cocoon-pool-warm"  # a container id no caller's VM ever sees: the VM is not one yet
WARM_DIR = "warm-bundle"  # in the pooled VM's state directory, while the warm-up runs


def warm_vm(d: Path, timeout: float = 60.0) -> None:
    """Runs ``true`` in a throwaway container in the VM whose state directory is ``d``, and
    leaves nothing of it (in the guest, the share or ``d``). A failure: LifecycleError."""
    tmp = d / WARM_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        bundle = specmod.load_bundle(busybox.make_bundle(tmp, ["true"]))
        share_in(d, WARM_ID, bundle)
        # As a claim's `run` makes it: the VM's network stands for the container's, so the
        # agent starts it with one `crun run --detach`.
        spec = specmod.guest_spec(bundle, WARM_ID, guest_network=True)
        with Client(d, timeout) as c:
            try:
                _run(c, spec, timeout)
            except CallError as exc:
                raise rpc_error("warming the pooled VM", exc) from exc
    finally:
        hostmount.safe_rmtree(d / "shared" / WARM_ID)
        shutil.rmtree(tmp, ignore_errors=True)


def _run(c: Client, spec: dict[str, object], timeout: float) -> None:
    req = {
        "container_id": WARM_ID,
        "oci_spec_json": b64(json.dumps(spec).encode()),
        "stdio": {"terminal": False, "stdin": False},
        "start": True,
    }
    c.agent.CreateContainer(req, timeout=timeout)
    try:
        r = c.agent.WaitProcess({"container_id": WARM_ID, "exec_id": ""}, timeout=timeout)
    finally:
        c.agent.RemoveContainer({"container_id": WARM_ID}, timeout=timeout)
    if r["signaled"] or r["status"] != 0:
        how = "was killed by signal" if r["signaled"] else "exited"
        raise LifecycleError(f"warming the pooled VM: true {how} {r['status']}")
