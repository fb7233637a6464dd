"""The pool of pre-booted VMs ([factory] pool_size): a warm ``run`` against the floors, in one
run; median (min-max) of several runs, pairs alternated.

Rows:
- warm ``run`` of ``true`` with a VM from the pool (create, start, exit, delete; the pool full
  before each run, its background refill running during it, as it would);
- the in-guest floor: ``crun run`` of ``true`` inside an already booted guest, timed in the
  guest (a privileged container in the guest's PID namespace enters PID 1's mount namespace
  and runs the guest's own crun on a bundle whose root is the guest's root);
- runc ``run`` of the same ``true`` bundle; a cold cocoon ``run`` (boots its VM);
- ratios: warm / in-guest floor, warm / runc, warm / cold;
- the pool's cost: host PSS of one idle pooled VM (QEMU, virtiofsd, monitor), 10 s after it
  was marked ready (its warm-up's freed pages reported back).

    python bench/pool.py [--runs 3] [--json out.json]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like pods.py
from bench.run import Runtime, bench_args, forkserver_share_kib, print_rows, pss_kib, summary
from cocoon.runtime.container import busybox

ALL_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_MKNOD",
    "CAP_AUDIT_WRITE", "CAP_SETFCAP", "CAP_NET_BIND_SERVICE",
]  # fmt: skip
# In the guest: a bundle whose root is the guest's own root, then crun run of `true`, timed.
# `crun spec` asks for CAP_NET_BIND_SERVICE, so the floor container holds it too (crun fails
# at capset otherwise, before `true` runs), and a crun that fails ends the script (set -e).
FLOOR_SCRIPT = r"""
set -e
nsenter -t 1 -m -- /bin/sh -c 'mkdir -p /tmp/fb/rootfs && cd /tmp/fb && rm -f config.json &&
  crun spec'
nsenter -t 1 -m mount --bind / /tmp/fb/rootfs
nsenter -t 1 -m -- /bin/sh -c '
set -e
cd /tmp/fb
sed -i "s/\"sh\"/\"true\"/; s/\"terminal\": true/\"terminal\": false/" config.json
for i in $(seq N); do
  s=$(date +%s%N); crun run -b /tmp/fb floor$i; e=$(date +%s%N)
  echo $(( (e - s) / 1000 ))
done'
"""


SETTLE = 10.0  # seconds an idle pooled VM is left before its PSS is taken


def floor_bundle(work: Path) -> Path:
    """A privileged busybox container in the guest's PID namespace (no PID or cgroup namespace
    of its own), so that it can enter the guest's mount namespace."""
    b = busybox.make_bundle(work / "floor", ["sleep", "100000"])
    spec = json.loads((b / "config.json").read_text())
    spec["process"]["capabilities"] = {k: ALL_CAPS for k in ("bounding", "effective", "permitted")}
    spec["linux"]["namespaces"] = [
        ns for ns in spec["linux"]["namespaces"] if ns["type"] not in ("pid", "cgroup")
    ]
    for k in ("seccomp", "maskedPaths", "readonlyPaths"):
        spec["linux"].pop(k, None)
    (b / "config.json").write_text(json.dumps(spec))
    return b


def in_guest_floor(rt: Runtime, work: Path, runs: int) -> list[float]:
    """``crun run`` of ``true`` inside a booted guest, seconds each (the first, cold, left out)."""
    cid = "floor"
    rt.call("create", "--bundle", str(floor_bundle(work)), cid)
    try:
        rt.call("start", cid)
        out = subprocess.run(
            [*rt.argv, "exec", cid, "sh", "-c", FLOOR_SCRIPT.replace("seq N", f"seq {runs + 1}")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"the in-guest floor failed ({out.returncode}): {out.stderr}")
        return [int(x) / 1e6 for x in out.stdout.split()][1:]
    finally:
        rt.call("delete", "--force", cid)


def wait_ready(rt: Runtime, n: int, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = json.loads(subprocess.check_output([*rt.argv, "pool", "status"], text=True))
        if st["ready"] >= n and not st["booting"]:
            return dict(st)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool never filled: {st}")
        time.sleep(0.3)


def pooled_pss_mib(root: Path, vmid: str) -> dict[str, float]:
    return vm_pss_mib(root / "pool" / vmid)


def vm_pss_mib(d: Path) -> dict[str, float]:
    """Host PSS of the VM whose state directory is ``d``: QEMU, virtiofsd, the monitor and its
    share of the fork server that forked it."""
    pids = {
        "monitor": int((d / "monitor.pid").read_text()),
        "qemu": int((d / "qemu.pid").read_text()),
    }
    vfs = subprocess.run(["pgrep", "-f", f"virtiofsd.*{d}/"], capture_output=True, text=True)
    out = {k: pss_kib(p) / 1024 for k, p in pids.items()}
    out["virtiofsd"] = sum(pss_kib(int(p)) for p in vfs.stdout.split()) / 1024
    out["forkserver"] = forkserver_share_kib(d.parent.parent) / 1024  # <root>/<kind>/<name>
    out["total"] = sum(out.values())
    return out


def main() -> int:
    args = bench_args(__doc__)
    rows: dict[str, list[float]] = {}
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-pool-") as td:
        work = Path(td)
        conf = work / "pool.toml"
        conf.write_text("[factory]\npool_size = 1\n")
        warm = Runtime("cocoon", work / "warm-root", conf)
        cold = Runtime("cocoon", work / "cold-root")
        runc = Runtime("runc", work / "runc-root")
        trivial = busybox.make_bundle(work / "trivial", ["true"])
        try:
            subprocess.run([*warm.argv, "pool", "fill"], check=True, stdout=subprocess.DEVNULL)
            st = wait_ready(warm, 1)
            time.sleep(SETTLE)  # what the warm-up touched and freed is reported back meanwhile
            res["pooled_vm_pss_mib"] = pooled_pss_mib(warm.root, st["vms"][0]["vmid"])
            for i in range(args.runs):
                wait_ready(warm, 1)
                rows.setdefault("warm run, cocoon (pool)", []).append(
                    warm.call("run", "--bundle", str(trivial), f"w{i}")
                )
                rows.setdefault("run, runc", []).append(
                    runc.call("run", "--bundle", str(trivial), f"r{i}")
                )
                rows.setdefault("cold run, cocoon (boots)", []).append(
                    cold.call("run", "--bundle", str(trivial), f"c{i}")
                )
            wait_ready(warm, 1)
            rows["in-guest floor: crun run"] = in_guest_floor(cold, work, args.runs)
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run([*warm.argv, "pool", "drain"], check=True, stdout=subprocess.DEVNULL)
    w = rows["warm run, cocoon (pool)"]
    for name, other in (
        ("warm / in-guest floor", "in-guest floor: crun run"),
        ("warm / runc", "run, runc"),
        ("warm / cold", "cold run, cocoon (boots)"),
    ):
        rows[name] = [x / y for x, y in zip(w, rows[other], strict=False)]
    res["rows"] = {k: summary(v) for k, v in rows.items()}
    print_rows(res["rows"], 32, 3)
    pss = res["pooled_vm_pss_mib"]
    print("idle pooled VM PSS: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in pss.items()))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
