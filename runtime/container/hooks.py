"""OCI hooks that run on the host: prestart, createRuntime, poststart, poststop.

Each hook gets the container's state JSON on stdin, its own args/env, and its timeout; a
failing prestart/createRuntime/poststart hook fails the operation, a failing poststop hook is
logged (as runc does). createContainer/startContainer hooks run in the guest (crun runs them).

May import: the standard library, cocoon.runtime.errors.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from typing import Any

from cocoon.runtime.errors import HookError

log = logging.getLogger("cocoon.hooks")


def run_hooks(kind: str, hooks: list[dict[str, Any]], state: dict[str, Any]) -> None:
    payload = json.dumps(state).encode()
    for i, h in enumerate(hooks):
        path = h["path"]
        args = h.get("args") or [path]
        env = dict(e.split("=", 1) for e in h.get("env") or [] if "=" in e)
        timeout = h.get("timeout")
        try:
            res = subprocess.run(
                args,
                executable=path,
                input=payload,
                capture_output=True,
                env=env,
                timeout=timeout if timeout else None,
                cwd=state.get("bundle") or "/",
                close_fds=True,
            )
        except subprocess.TimeoutExpired:
            msg = f"{kind} hook {i} ({path}) timed out after {timeout}s"
        except OSError as exc:
            msg = f"{kind} hook {i} ({path}): {os.strerror(exc.errno or 0)}"
        else:
            if res.returncode == 0:
                continue
            err = res.stderr.decode(errors="replace").strip()
            msg = f"{kind} hook {i} ({path}) exited with status {res.returncode}" + (
                f": {err.splitlines()[-1]}" if err else ""
            )
        if kind == "poststop":
            log.warning("%s", msg)
            continue
        raise HookError(msg)
