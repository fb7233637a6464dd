"""How big a pod's VM must be: room for every container in it, clamped to what it can hold.

The VM of a pod is sized for the sum of its containers (resources.sizing.pod_size): a
container's CPU quota and memory limit are added at its create, given back at its delete,
and an ``update`` of one container resizes the VM by that container's difference. A pod whose
containers ask for more than the VM can ever hold gets the ceiling and a warning in the log,
never a refusal (runc and Kubernetes accept a CPU limit above the host's CPU count).

May import: the standard library, cocoon.runtime.{container.state, resources.sizing,
sandbox.launcher}.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cocoon.runtime.container.state import ContainerState, Ctx, list_states
from cocoon.runtime.resources import sizing
from cocoon.runtime.sandbox.launcher import host_memory_mib

log = logging.getLogger("cocoon")


def vm_size(
    ctx: Ctx, sandbox_id: str, *, drop: str = "", add: dict[str, Any] | None = None
) -> sizing.Size:
    """The size of VM ``sandbox_id`` for the containers in it, without ``drop`` and with a
    container whose resources are ``add``, clamped (with a warning) to the VM's ceilings."""
    every: list[dict[str, Any] | None] = [
        st.resources for st in in_vm(ctx, sandbox_id) if st.id != drop
    ]
    if add is not None:
        every.append(add)
    size, warning = sizing.clamp(
        ctx.cfg, sizing.pod_size(ctx.cfg, every), os.cpu_count() or 1, host_memory_mib()
    )
    if warning:
        log.warning("pod %s: %s", sandbox_id, warning)
    return size


def in_vm(ctx: Ctx, sandbox_id: str) -> list[ContainerState]:
    """Every container in VM ``sandbox_id``: the one that booted it and the pod's others."""
    return [st for st in list_states(ctx) if st.sandbox_id == sandbox_id]


def members(ctx: Ctx, sandbox_id: str) -> list[ContainerState]:
    """The containers that joined VM ``sandbox_id`` (a pod's, besides its sandbox)."""
    return [st for st in in_vm(ctx, sandbox_id) if not st.owns_sandbox]


def in_pod(ctx: Ctx, sandbox_id: str) -> bool:
    """Whether VM ``sandbox_id`` holds more than the container that booted it."""
    return bool(members(ctx, sandbox_id))
