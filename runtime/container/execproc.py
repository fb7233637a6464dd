"""runc's ``exec``: a new process in a running container, without gRPC on the CLI's side.

``exec_process`` checks the container and the process, then starts the exec's shim with the
process (a memfd); the shim has the sandbox's monitor start it on its control connection
(``<sandbox>/stdio.sock``, runtime/monitor/stdio.py: the monitor does the agent's
ExecProcess), connects its streams and says ready; in the foreground we then wait for it. One
round trip to the guest, and the CLI loads neither gRPC nor protobuf nor the create path.

May import: the standard library, cocoon.runtime.{errors, faults, pids, monitor.launch,
container.{ids, shim, spec, state}, sandbox.paths}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cocoon.runtime import faults
from cocoon.runtime.container import shim as shimmod
from cocoon.runtime.container import spec as specmod
from cocoon.runtime.container.ids import validate_id
from cocoon.runtime.container.state import Ctx
from cocoon.runtime.errors import LifecycleError
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.pids import pid_alive
from cocoon.runtime.sandbox import paths

# The monitor gives ExecProcess 120 s (monitor.stdio.EXEC_TIMEOUT); we wait a little longer for
# the shim's ready line, so that its deadline, not ours, is what a slow guest reports.
START_TIMEOUT = 130.0


def build_process(
    base: dict[str, Any],
    args: list[str],
    tty: bool,
    env: list[str],
    cwd: str | None,
    user: str | None,
) -> dict[str, Any]:
    """An exec process from the container's own process and runc exec's flags."""
    p: dict[str, Any] = json.loads(json.dumps(base))
    p["args"] = args
    p["terminal"] = tty
    p["env"] = list(p.get("env") or []) + env
    if cwd:
        p["cwd"] = cwd
    if user:
        uid, _, gid = user.partition(":")
        try:
            p["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise LifecycleError(f"user {user!r}: use UID[:GID]") from None
    return p


def exec_process(
    ctx: Ctx,
    cid: str,
    process: dict[str, Any],
    detach: bool,
    pid_file: Path | None,
    console_socket: str | None,
) -> int:
    store = ctx.store
    st = store.load(validate_id(cid))
    if not st.effective.can_exec:
        raise LifecycleError(f"cannot exec in container {cid}: it is {st.effective.value}")
    specmod.validate_process(process, "process")
    terminal = bool(process.get("terminal"))
    if terminal and detach and not console_socket:
        raise LifecycleError("cannot allocate a terminal without --console-socket")
    body = json.dumps(process).encode()
    if len(body) > L.EXEC_MAX:
        raise LifecycleError(
            f"exec in {cid}: the process is {len(body)} bytes of JSON, at most {L.EXEC_MAX}"
        )
    exec_id = os.urandom(8).hex()  # not uuid: it loads platform (3 ms)
    d = paths.sandbox_dir(ctx.root, st.sandbox_id)
    if not (d / L.STDIO_SOCK).exists():
        raise LifecycleError(f"container {cid}: its sandbox is not running")
    # The exec's shim stands for its process in the container's namespaces, as its shim does,
    # and starts it (monitor.stdio: on its control connection, so never without the shim).
    nss = [(k, f"/proc/{st.pid}/ns/{k}") for k in shimmod.SHIM_NAMESPACES]
    netns = f"/proc/{st.pid}/ns/net" if st.netns else ""
    shim = shimmod.spawn(
        d, cid, exec_id, terminal, console_socket, netns, nss, body, START_TIMEOUT, fork=not detach
    )
    faults.point("exec:started", d, shim.pid)
    with store.locked(cid):
        st = store.load(cid)
        st.exec_pids = {k: v for k, v in st.exec_pids.items() if pid_alive(v)}
        st.exec_pids[exec_id] = shim.pid
        store.save(st)
    if pid_file is not None:
        shimmod.write_pid_file(pid_file, shim.pid)
    if detach:
        return 0
    return shimmod.wait_forwarding(shim)
