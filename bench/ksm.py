"""KSM and the guest RAM backend (issue 14, item 3): N idle VMs (agent answering, no
container) booted with guest RAM on a shared memfd (the default: virtio-fs's vhost-user
daemon must map it) and on private anonymous memory (``hypervisor.shared_fs = "none"``, the
only configuration that allows it today), each measured settled, then after KSM has scanned
everything twice: QEMU's PSS per VM, KSM's counters, and what ksmd cost in CPU.

    python bench/ksm.py [--vms 6] [--settle 10] [--json out.json]

KSM merges only private anonymous pages that QEMU marked mergeable (``mem-merge``, on by
default): a shared memfd is never scanned, whatever KSM is set to. The host's KSM settings
are put back afterwards (merged pages unmerged first when KSM was off).

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like pods.py
from bench.pool import vm_pss_mib
from bench.run import Runtime, bench_args, ksm_available

KSM = Path("/sys/kernel/mm/ksm")
KNOBS = ("run", "pages_to_scan", "sleep_millisecs")
BACKENDS = {
    "memfd (shared, virtio-fs)": "",
    "private anonymous": '[hypervisor]\nshared_fs = "none"\n',
}


def ksm(name: str) -> int:
    return int((KSM / name).read_text())


@contextlib.contextmanager
def ksm_on() -> Iterator[None]:
    """KSM scanning fast (4000 pages per 20 ms) for the duration; the old settings back."""
    old = {k: (KSM / k).read_text().strip() for k in KNOBS}
    try:
        (KSM / "pages_to_scan").write_text("4000")
        (KSM / "sleep_millisecs").write_text("20")
        (KSM / "run").write_text("1")
        yield
    finally:
        if old["run"] != "1":
            (KSM / "run").write_text("2")  # unmerge what was merged for this run
        for k in KNOBS:
            (KSM / k).write_text(old[k])


def ksmd_cpu_s() -> float:
    pids = subprocess.run(["pgrep", "-x", "ksmd"], capture_output=True, text=True).stdout.split()
    if not pids:
        return 0.0
    fields = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_scans(n: int, timeout: float = 240) -> float:
    start, t0 = ksm("full_scans"), time.monotonic()
    while ksm("full_scans") < start + n and time.monotonic() - t0 < timeout:
        time.sleep(1)
    return time.monotonic() - t0


def measure(rt: Runtime, ids: list[str]) -> dict[str, float]:
    per = [vm_pss_mib(rt.root / "sandboxes" / sid) for sid in ids]
    return {k: statistics.mean(p[k] for p in per) for k in per[0]}


def one_backend(work: Path, name: str, conf_text: str, n: int, settle: float) -> dict[str, Any]:
    conf = work / f"{len(conf_text)}.toml"
    conf.write_text(conf_text)
    rt = Runtime("cocoon", work / f"root-{len(conf_text)}", conf)
    ids = [f"ksm{os.getpid()}-{i}" for i in range(n)]
    res: dict[str, Any] = {}
    try:
        for sid in ids:
            rt.call("sandbox", "start", sid)
        time.sleep(settle)
        res["settled_mib_per_vm"] = measure(rt, ids)
        with ksm_on():
            cpu0 = ksmd_cpu_s()
            res["ksm_wait_s"] = wait_scans(2)
            res["ksmd_cpu_s"] = ksmd_cpu_s() - cpu0
            res["ksm_mib_per_vm"] = measure(rt, ids)
            page = os.sysconf("SC_PAGE_SIZE") / 2**20
            res["pages_shared_mib"] = ksm("pages_shared") * page
            res["pages_sharing_mib"] = ksm("pages_sharing") * page
    finally:
        for sid in ids:
            subprocess.run([*rt.argv, "sandbox", "stop", sid], capture_output=True, check=False)
    print(f"{name}: QEMU PSS per VM settled {res['settled_mib_per_vm']['qemu']:.1f} MiB, "
          f"after two KSM scans {res['ksm_mib_per_vm']['qemu']:.1f} MiB "
          f"(KSM sharing {res['pages_sharing_mib']:.1f} MiB in {res['pages_shared_mib']:.1f} "
          f"MiB of pages; ksmd {res['ksmd_cpu_s']:.1f} s CPU over {res['ksm_wait_s']:.0f} s); "
          f"virtiofsd {res['settled_mib_per_vm']['virtiofsd']:.1f} MiB")  # fmt: skip
    return res


def main() -> int:
    args = bench_args(__doc__, 1, vms=6, settle=10)
    res: dict[str, Any] = {"vms": args.vms}
    if not ksm_available():
        res["ksm"] = "not available on this host (/sys/kernel/mm/ksm/run missing or read-only)"
        print(f"KSM is {res['ksm']}")
    else:
        with tempfile.TemporaryDirectory(prefix="cocoon-bench-ksm-") as td:
            for name, text in BACKENDS.items():
                res[name] = one_backend(Path(td), name, text, args.vms, args.settle)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
