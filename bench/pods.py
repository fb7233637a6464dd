"""Pods: one VM per pod, measured the way containerd's CRI plugin drives cocoon (a sandbox
container, then containers naming it in their annotations and joining its namespaces), next to
runc on the same bundles; median (min-max) of several runs.

Rows:
- a running two-container pod: the sandbox's create + start, then one container's create +
  start, cocoon and runc, and their ratio;
- the second container of a running pod, create + start: cocoon (no boot: the container is
  made by crun in the running guest) next to runc and next to cocoon's own cold create of a
  container alone (the boot that it saves);
- host PSS (QEMU, virtiofsd, monitor, shims) of a pod with 1 and with 3 containers, next to 1
  and 3 containers each in its own VM.

    python bench/pods.py [--runs 3] [--json out.json]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like hotplug.py
from bench.run import Runtime, bench_args, print_rows, pss_kib, sandbox_pids, summary
from cocoon.runtime.container import busybox

CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"
SHARED = {"network": "net", "ipc": "ipc", "uts": "uts"}


def sandbox_bundle(work: Path, sid: str) -> Path:
    b = busybox.make_bundle(work / f"b-{sid}", ["sleep", "100000"])
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"] = {CRI_TYPE: "sandbox", CRI_SANDBOX: sid}
    (b / "config.json").write_text(json.dumps(spec))
    return b


def member_bundle(work: Path, cid: str, sid: str, sandbox_pid: int) -> Path:
    """As the CRI plugin writes a pod's container: the sandbox's net, IPC and UTS."""
    b = busybox.make_bundle(work / f"b-{cid}", ["sleep", "100000"])
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"] = {CRI_TYPE: "container", CRI_SANDBOX: sid}
    spec.pop("hostname", None)
    nss = [ns for ns in spec["linux"]["namespaces"] if ns["type"] not in SHARED]
    nss += [{"type": k, "path": f"/proc/{sandbox_pid}/ns/{f}"} for k, f in SHARED.items()]
    spec["linux"]["namespaces"] = nss
    (b / "config.json").write_text(json.dumps(spec))
    return b


def up(rt: Runtime, work: Path, cid: str, bundle: Path) -> tuple[float, int]:
    """create + start; the time and the container's pid (cocoon's: its shim)."""
    pid_file = work / f"{rt.name}-{cid}.pid"
    t = rt.call("create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid)
    t += rt.call("start", cid)
    return t, int(pid_file.read_text())


@contextlib.contextmanager
def pod(rt: Runtime, work: Path, sid: str, members: int) -> Iterator[dict[str, Any]]:
    """A running pod: its sandbox and ``members`` containers; times and pids."""
    made: list[str] = []
    try:
        t_sb, spid = up(rt, work, sid, sandbox_bundle(work, sid))
        made.append(sid)
        out: dict[str, Any] = {"sandbox_s": t_sb, "pids": [spid], "member_s": []}
        for i in range(members):
            cid = f"{sid}-c{i}"
            t, pid = up(rt, work, cid, member_bundle(work, cid, sid, spid))
            made.append(cid)
            out["member_s"].append(t)
            out["pids"].append(pid)
        yield out
    finally:
        for cid in reversed(made):
            with contextlib.suppress(Exception):
                rt.call("delete", "--force", cid)


def pod_pss_mib(rt: Runtime, sid: str, pids: list[int]) -> float:
    vm = sandbox_pids(rt.root, sid, pids[0])
    return (sum(pss_kib(p) for p in vm.values()) + sum(pss_kib(p) for p in pids[1:])) / 1024


def main() -> int:
    args = bench_args(__doc__)
    rows: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        rows.setdefault(k, []).append(v)

    with tempfile.TemporaryDirectory(prefix="cocoon-bench-") as td:
        work = Path(td)
        coc = Runtime("cocoon", work / "cocoon-root")
        runc = Runtime("runc", work / "runc-root")
        alone = busybox.make_bundle(work / "alone", ["sleep", "100000"])
        for i in range(args.runs):
            for rt in (coc, runc):
                with pod(rt, work, f"p{i}", 2) as p:
                    add(f"two-container pod, {rt.name}", p["sandbox_s"] + p["member_s"][0])
                    add(f"second container, {rt.name}", p["member_s"][1])
            t, _ = up(coc, work, f"alone{i}", alone)
            coc.call("delete", "--force", f"alone{i}")
            add("a container alone (boots a VM), cocoon", t)
        for a, b, name in (
            ("two-container pod, cocoon", "two-container pod, runc", "pod ratio cocoon / runc"),
            ("second container, cocoon", "second container, runc", "2nd ratio cocoon / runc"),
            (
                "second container, cocoon",
                "a container alone (boots a VM), cocoon",
                "2nd container / a boot",
            ),
        ):
            rows[name] = [x / y for x, y in zip(rows[a], rows[b], strict=True)]

        pss: dict[str, float] = {}
        for n in (1, 3):
            with pod(coc, work, f"pss{n}", n - 1) as p:
                time.sleep(3)  # let the guest settle
                pss[f"pod of {n}"] = pod_pss_mib(coc, f"pss{n}", p["pids"])
            with contextlib.ExitStack() as stack:
                vms = [stack.enter_context(pod(coc, work, f"vm{n}-{i}", 0)) for i in range(n)]
                time.sleep(3)
                pss[f"{n} separate VMs"] = sum(
                    pod_pss_mib(coc, f"vm{n}-{i}", q["pids"]) for i, q in enumerate(vms)
                )

    res = {
        "seconds": {k: summary(v) for k, v in rows.items()},
        "host_pss_mib": pss,
        "runs": args.runs,
    }
    print_rows(res["seconds"], 44)
    for k, v in pss.items():
        print(f"host PSS, {k:34s} {v:8.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
