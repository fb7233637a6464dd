"""What the fork server's unit tests have it fork instead of a monitor: reports what the forked
process is (its command line, environment, umask, working directory, session, nice, NOFILE
limit, stdin, parent) as one JSON line on its ``--ready-fd``, writes a line to its stdout
(the log), then sleeps ``--sleep`` seconds and exits with ``--exit``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

from cocoon.runtime.fds import is_dev_null


def run() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--exit", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args(sys.argv[1:])
    mask = os.umask(0)
    links = {}
    for f in os.listdir("/proc/self/fd"):  # whose own descriptor is gone once it returns
        with contextlib.suppress(FileNotFoundError):
            links[int(f)] = os.readlink(f"/proc/self/fd/{f}")
    fds = sorted(links)
    me = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "argv": sys.argv,
        "cmdline": Path("/proc/self/cmdline").read_bytes().decode(),
        "env": dict(os.environ),
        "umask": mask,
        "cwd": os.getcwd(),
        "sid": os.getsid(0),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "stdin_null": is_dev_null(0),
        "fds": fds,
        "fd_links": links,
    }
    os.write(args.ready_fd, (json.dumps(me) + "\n").encode())
    os.close(args.ready_fd)
    print(f"target {os.getpid()} up", flush=True)
    time.sleep(args.sleep)
    os._exit(args.exit)
