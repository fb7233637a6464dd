"""cocoon against runc and against the physical floor, in one run: a table and a JSON file.

Every figure is the median (min-max) of several runs; every comparison is a ratio of pairs
measured alternately in the same run (cocoon, then runc or the floor, then cocoon...):

1. cold ``run`` of a trivial workload to its exit, cocoon vs runc on the same bundle, with
   stages: kernel booted (guest uptime at the first stage), agent ready (monitor), container
   created, started, exited, deleted;
2. the floor: the same QEMU, kernel and memory with an init that powers off at once;
   cocoon's time to agent-ready as a multiple of it;
3. exec latency (``exec ID true``) and stdout throughput (100 MiB through ``run``), vs runc;
4. host memory per idle sandbox (PSS of QEMU, virtiofsd, the monitor and the shim), for two
   guest sizes, and with KSM merging where the host has KSM;
5. how many idle sandboxes fit in a memory budget (bounded count, all cleaned up);
6. hot-plug latencies (bench/hotplug.py); TCP throughput through tcfilter and macvtap next
   to a plain tap with the same guest (bench/net.py);
7. pods (bench/pods.py): a running two-container pod and a running pod's second container vs
   runc, and host PSS of a pod of 1 and 3 containers next to 1 and 3 separate VMs;
8. the pool (bench/pool.py): a warm ``run`` from the pool against ``crun run`` inside a booted
   guest (the in-guest floor), against runc and against a cold run, and an idle pooled VM's PSS;
9. hardening switches (bench/hardening.py): agent-ready and PSS with QEMU's seccomp sandbox on
   and off;
10. templates (bench/template.py): restore to agent-ready against the boot floor and a cold
   boot, a warm ``run`` restored from the template against a cold one and runc, and the idle
   PSS of a restored sandbox next to a cold one;
11. the data path (bench/stdio.py): stdout and stdin throughput and exec latency against runc
   and the in-guest floors, and the shim's and monitor's PSS;
12. density (bench/density.py): host PSS per idle pod by process with 10 pods up at once,
   booted, restored from a template (also with a 16 MiB TCG translation cache), booted
   with each monitor a fresh interpreter (not forked by the fork server), and booted with the
   host's KSM on (the monitors' memory is offered to it); idle pods per GiB;
13. the pytest plugin (bench/plugin.py): ``cocoon.run()`` to a running container, cold, from
   a pool and restored from a template, the first exec and the teardown's remove;
14. KSM and the guest RAM backend (bench/ksm.py): idle VMs' QEMU PSS on a shared memfd and on
   private memory, settled and after two KSM scans, and ksmd's CPU;
and the Python import time of the CLI, monitor and shim (the agent's is in the guest stages).

    scripts/bench [--runs 5] [--json bench-results.json] [--budget-mib 2048] [--max-sandboxes 6]

Not a test: it asserts nothing and prints numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import boot  # the floor (run from the repository root, as scripts/bench does)
from cocoon.runtime import config as config_mod
from cocoon.runtime.container import busybox
from cocoon.runtime.sandbox import launcher as sandbox
from cocoon.runtime.sandbox import paths, spawn

COCOON = str(Path(sys.executable).parent / "cocoon")
MIB = 1024 * 1024


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def print_rows(rows: dict[str, dict[str, float]], width: int, digits: int = 2) -> None:
    """One line per summary row: a name with "/" in it is a ratio (x), any other seconds."""
    for k, s in rows.items():
        unit = "x" if "/" in k else "s"
        lo, hi = f"{s['min']:.{digits}f}", f"{s['max']:.{digits}f}"
        print(f"{k:{width}s} {s['median']:8.{digits}f}{unit}  ({lo}-{hi})")


class Runtime:
    def __init__(self, name: str, root: Path, config: Path | None = None) -> None:
        self.name, self.root = name, root
        binary = COCOON if name == "cocoon" else (shutil.which("runc") or "runc")
        self.argv = [binary, "--root", str(root)]
        if config is not None:
            self.argv += ["--config", str(config)]

    def call(self, *args: str, out: Any = subprocess.DEVNULL) -> float:
        # stderr to a file, never a pipe: the shim (like runc's container) keeps create's
        # stdio open, so a pipe would not see EOF until the container ends.
        with tempfile.TemporaryFile() as err:
            t = time.monotonic()
            r = subprocess.Popen(
                [*self.argv, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
            # Not subprocess.run(timeout=): its wait polls, sleeping up to 50 ms between
            # polls, which is as much as a runc exec takes. A blocking wait, a timer to kill.
            killer = threading.Timer(300, r.kill)
            killer.start()
            try:
                r.wait()
            finally:
                killer.cancel()
            dt = time.monotonic() - t
            if r.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"{self.name} {args[0]}: {err.read().decode(errors='replace')}")
        return dt


def wait_pid(pid: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.005)
    raise RuntimeError(f"pid {pid} did not exit")


def _number(pattern: str, path: Path) -> float:
    m = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
    return float(m.group(1)) if m else float("nan")


def cold_run(rt: Runtime, bundle: Path, cid: str, work: Path) -> dict[str, float]:
    """create, start, exit, delete, each timed; for cocoon also the guest's boot stages."""
    pid_file = work / f"{cid}.pid"
    st: dict[str, float] = {}
    t0 = time.monotonic()
    st["create"] = rt.call("create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid)
    if rt.name == "cocoon":
        d = paths.sandbox_dir(rt.root, cid)
        st["kernel_booted"] = _number(r"first stage at ([\d.]+)s", d / "console.log")
        st["agent_ready"] = _number(r"ready after ([\d.]+)s", d / "monitor.log")
    pid = int(pid_file.read_text())
    st["start"] = rt.call("start", cid)
    t = time.monotonic()
    wait_pid(pid)
    st["exited"] = time.monotonic() - t
    st["delete"] = rt.call("delete", cid)
    st["total"] = time.monotonic() - t0
    return st


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def sandbox_pids(root: Path, cid: str, shim_pid: int) -> dict[str, int]:
    d = paths.sandbox_dir(root, cid)
    pids = {"shim": shim_pid}
    with contextlib.suppress(OSError, ValueError):
        pids["monitor"] = int((d / "monitor.pid").read_text())
        pids["qemu"] = int((d / "qemu.pid").read_text())
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
                argv0 = cmd.split(b"\0", 1)[0]
                # argv[0], not anywhere: QEMU's own command line names virtiofsd.sock
                if argv0.endswith(b"virtiofsd") and str(d).encode() in cmd:
                    pids.setdefault("virtiofsd", int(p))
                    pids[f"virtiofsd-{p}"] = int(p)
    pids.pop("virtiofsd", None)
    return pids


@contextlib.contextmanager
def idle_sandboxes(
    rt: Runtime, bundle: Path, work: Path, n: int, first: int = 0
) -> Iterator[list[int]]:
    """``n`` idle sandboxes named ``idle<pid>-<i>``, ``i`` from ``first``; their shims' pids."""
    shims: list[int] = []
    ids = [f"idle{os.getpid()}-{i}" for i in range(first, first + n)]
    try:
        for cid in ids:
            rt.call("create", "--bundle", str(bundle), "--pid-file", str(work / f"{cid}.pid"), cid)
            rt.call("start", cid)
            shims.append(int((work / f"{cid}.pid").read_text()))
        yield shims
    finally:
        for cid in ids:
            with contextlib.suppress(Exception):
                rt.call("delete", "--force", cid)


def forkserver_share_kib(root: Path) -> float:
    """The root's monitor fork server's PSS (monitor.forkserver), divided among the monitors
    it forked that are up: each sandbox's share of it (0 with no server)."""
    server = max(spawn.server_pids(root), default=0)
    if not server:
        return 0.0
    kids = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError, IndexError):
                kids += Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(
                    server
                )
    return pss_kib(server) / max(kids, 1)


def sandbox_pss_mib(rt: Runtime, cid: str, shim: int) -> dict[str, float]:
    parts = {k: pss_kib(p) / 1024 for k, p in sandbox_pids(rt.root, cid, shim).items()}
    parts["forkserver"] = forkserver_share_kib(rt.root) / 1024
    vfs = sum(v for k, v in parts.items() if k.startswith("virtiofsd"))
    out = {k: v for k, v in parts.items() if not k.startswith("virtiofsd")}
    out["virtiofsd"] = vfs
    out["total"] = sum(out.values())
    return out


def ksm_available() -> bool:
    return Path("/sys/kernel/mm/ksm/run").exists() and os.access("/sys/kernel/mm/ksm/run", os.W_OK)


def import_time_ms(module: str) -> float:
    runs = []
    for _ in range(3):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        last = [ln for ln in r.stderr.splitlines() if ln.rstrip().endswith(module)]
        runs.append(int(last[-1].split("|")[1]) / 1000 if last else float("nan"))
    return statistics.median(runs)


def sub_bench(script: str, work: Path, timeout: float, *extra: str) -> Any:
    """Runs bench/<script> --runs 3 (and ``extra``) and returns the JSON it wrote."""
    out = work / f"{Path(script).stem}-{len(list(work.glob(Path(script).stem + '-*')))}.json"
    subprocess.run(
        [sys.executable, str(Path(__file__).parent / script), "--runs", "3", "--json", str(out),
         *extra],
        check=True, stdout=subprocess.DEVNULL, timeout=timeout,
    )  # fmt: skip
    return json.loads(out.read_text())


def bench_args(
    doc: str, runs: int = 3, json_default: Path | None = None, **ints: int
) -> argparse.Namespace:
    """A benchmark's flags (``--runs``, ``--json`` and an integer flag per ``ints`` entry,
    ``budget_mib=2048`` giving ``--budget-mib``), parsed; and this process made a child
    subreaper, so that the shims and runc inits its runs leave behind are waited for here."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--json", type=Path, default=json_default)
    for name, default in ints.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    args = ap.parse_args()
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    return args


def main() -> int:
    args = bench_args(__doc__, 5, Path("bench-results.json"), budget_mib=2048, max_sandboxes=6)
    cfg = config_mod.load().config
    files = sandbox.guest_files(cfg)
    accel, why, _, _ = sandbox.resolve_host(cfg, files)
    has_runc = shutil.which("runc") is not None
    res: dict[str, Any] = {"accel": accel, "runs": args.runs, "host_cpus": os.cpu_count()}
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-") as td:
        work = Path(td)
        coc = Runtime("cocoon", work / "cocoon-root")
        runc = Runtime("runc", work / "runc-root")
        trivial = busybox.make_bundle(work / "trivial", ["true"])
        sleeper = busybox.make_bundle(work / "sleeper", ["sleep", "100000"])
        big = busybox.make_bundle(work / "big", ["sh", "-c", f"head -c {100 * MIB} /dev/zero"])

        # 1 + 2: cold runs against runc, agent-ready against the floor
        stages: dict[str, list[float]] = {}
        runc_total: list[float] = []
        floor: list[float] = []
        ratio_runc: list[float] = []
        ratio_floor: list[float] = []
        for i in range(args.runs):
            c = cold_run(coc, trivial, f"cold{i}", work)
            for k, v in c.items():
                stages.setdefault(k, []).append(v)
            if has_runc:
                r = cold_run(runc, trivial, f"cold{i}", work)
                runc_total.append(r["total"])
                ratio_runc.append(c["total"] / r["total"])
            f = boot.floor_once(cfg, files, accel)
            floor.append(f)
            ratio_floor.append(c["agent_ready"] / f)
        res["cold_run_cocoon_s"] = {k: summary(v) for k, v in stages.items()}
        res["floor_s"] = summary(floor)
        res["ratio_agent_ready_over_floor"] = summary(ratio_floor)
        if has_runc:
            res["cold_run_runc_s"] = summary(runc_total)
            res["ratio_cold_run_cocoon_over_runc"] = summary(ratio_runc)

        # 3: exec latency and stdout throughput
        execs: dict[str, list[float]] = {"cocoon": [], "runc": []}
        rts = [coc, runc] if has_runc else [coc]
        for rt in rts:
            rt.call("create", "--bundle", str(sleeper), "--pid-file", str(work / "x.pid"), "ex")
            rt.call("start", "ex")
        try:
            for _ in range(args.runs):
                for rt in rts:
                    execs[rt.name].append(rt.call("exec", "ex", "true"))
        finally:
            for rt in rts:
                rt.call("delete", "--force", "ex")
        res["exec_s"] = {k: summary(v) for k, v in execs.items() if v}
        tput: dict[str, list[float]] = {"cocoon": [], "runc": []}
        for i in range(max(3, args.runs // 2)):
            for rt in rts:
                t = time.monotonic()
                p = subprocess.run(
                    [*rt.argv, "run", "--bundle", str(big), f"tp{i}"],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=300,
                )  # fmt: skip
                dt = time.monotonic() - t
                if len(p.stdout) != 100 * MIB:
                    raise RuntimeError(f"{rt.name}: {len(p.stdout)} bytes of stdout")
                tput[rt.name].append(100 / dt)
        res["stdout_run_mb_per_s"] = {k: summary(v) for k, v in tput.items() if v}
        if has_runc:
            res["ratio_exec_cocoon_over_runc"] = summary(
                [a / b for a, b in zip(execs["cocoon"], execs["runc"], strict=True)]
            )
            res["ratio_stdout_cocoon_over_runc"] = summary(
                [a / b for a, b in zip(tput["cocoon"], tput["runc"], strict=True)]
            )

        # 4: memory per idle sandbox, two guest sizes, KSM
        mem: dict[str, Any] = {}
        for size in (256, 1024):
            conf = work / f"mem{size}.toml"
            conf.write_text(f"[hypervisor]\ndefault_memory_mib = {size}\n")
            rt = Runtime("cocoon", work / f"mem{size}-root", conf)
            with idle_sandboxes(rt, sleeper, work, 2) as shims:
                time.sleep(3)  # let the guests settle
                ids = [f"idle{os.getpid()}-{i}" for i in range(2)]
                per = [sandbox_pss_mib(rt, cid, s) for cid, s in zip(ids, shims, strict=True)]
                mem[f"guest_{size}_mib"] = {k: statistics.median(p[k] for p in per) for k in per[0]}
                if size == 256 and ksm_available():
                    run_file = Path("/sys/kernel/mm/ksm/run")
                    old = run_file.read_text().strip()
                    try:
                        run_file.write_text("1")
                        time.sleep(20)
                        per = [sandbox_pss_mib(rt, c, s) for c, s in zip(ids, shims, strict=True)]
                        mem["guest_256_mib_ksm"] = {
                            k: statistics.median(p[k] for p in per) for k in per[0]
                        }
                    finally:
                        run_file.write_text(old)
        res["pss_per_idle_sandbox_mib"] = mem
        if not ksm_available():
            res["ksm"] = "not available on this host (/sys/kernel/mm/ksm/run missing or read-only)"

        # 5: density within a budget
        fit = 0
        used = 0.0
        with contextlib.ExitStack() as stack:
            rt = Runtime("cocoon", work / "dens-root")  # one root, as on a host: one fork server
            for i in range(args.max_sandboxes):
                shims = stack.enter_context(idle_sandboxes(rt, sleeper, work, 1, first=i))
                used += sandbox_pss_mib(rt, f"idle{os.getpid()}-{i}", shims[0])["total"]
                if used > args.budget_mib:
                    break
                fit += 1
        res["density"] = {
            "budget_mib": args.budget_mib,
            "fit": fit,
            "bound": args.max_sandboxes,
            "pss_used_mib": used,
        }

        # 6: hot-plug, network throughput
        res["hotplug"] = sub_bench("hotplug.py", work, 600)
        res["network"] = sub_bench("net.py", work, 900)
        res["pods"] = sub_bench("pods.py", work, 900)
        res["pool"] = sub_bench("pool.py", work, 900)
        res["hardening"] = sub_bench("hardening.py", work, 900)
        res["template"] = sub_bench("template.py", work, 900)
        res["stdio"] = sub_bench("stdio.py", work, 900, "--mib", "32")
        res["pod_density"] = {
            "booted": sub_bench("density.py", work, 900, "--pods", "10"),
            "template": sub_bench("density.py", work, 900, "--pods", "10", "--template", "1"),
            "template, tb 16": sub_bench(  # the 150 MiB goal's configuration, at a speed cost
                "density.py", work, 900, "--pods", "10", "--template", "1", "--tb-size", "16"
            ),
            "unforked": sub_bench(
                "density.py", work, 900, "--pods", "10", "--fork-monitors", "0"
            ),  # each monitor a fresh interpreter: what the fork server saves
        }
        if ksm_available():  # the monitors' pages merged, on a host that runs KSM
            res["pod_density"]["KSM on"] = sub_bench(
                "density.py", work, 900, "--pods", "10", "--ksm", "1"
            )
        res["plugin"] = sub_bench("plugin.py", work, 900)
        res["ksm_backends"] = sub_bench("ksm.py", work, 900)

    res["python_import_ms"] = {
        m: import_time_ms(m)
        for m in ("cocoon.runtime.cli.main", "cocoon.runtime.monitor.main", "cocoon.shim.main")
    }
    res["wall_seconds"] = time.monotonic() - t_all
    report(res, why)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nJSON: {args.json}")
    return 0


def _f(s: dict[str, float], unit: str = "s", scale: float = 1.0) -> str:
    return f"{s['median'] * scale:8.2f}{unit}  ({s['min'] * scale:.2f}-{s['max'] * scale:.2f})"


def report(r: dict[str, Any], why: str) -> None:
    print(f"cocoon benchmarks: accel {r['accel']}{f' ({why})' if why else ''}, "
          f"{r['runs']} runs, median (min-max)")  # fmt: skip
    print("\n1. cold run of `true` to its exit, cocoon stages:")
    names = {
        "kernel_booted": "guest kernel booted (guest uptime)",
        "agent_ready": "QEMU spawn -> agent ready",
        "create": "create (boot included)",
        "start": "start",
        "exited": "start -> exit seen",
        "delete": "delete (VM stopped)",
        "total": "total",
    }
    for k, label in names.items():
        print(f"   {label:36s} {_f(r['cold_run_cocoon_s'][k])}")
    if "cold_run_runc_s" in r:
        print(f"   {'runc total':36s} {_f(r['cold_run_runc_s'])}")
        print(f"   {'ratio cocoon / runc':36s} {_f(r['ratio_cold_run_cocoon_over_runc'], 'x')}")
    print("\n2. floor (same QEMU, kernel, memory; init powers off):")
    print(f"   {'floor':36s} {_f(r['floor_s'])}")
    print(f"   {'agent ready / floor':36s} {_f(r['ratio_agent_ready_over_floor'], 'x')}")
    print("\n3. exec and stdout:")
    for k, s in r["exec_s"].items():
        print(f"   {'exec true, ' + k:36s} {_f(s, 'ms', 1000)}")
    for k, s in r["stdout_run_mb_per_s"].items():
        print(f"   {'stdout 100 MiB via run, ' + k:36s} {_f(s, 'MB/s')}")
    if "ratio_exec_cocoon_over_runc" in r:
        print(f"   {'exec ratio cocoon / runc':36s} {_f(r['ratio_exec_cocoon_over_runc'], 'x')}")
        print(f"   {'stdout ratio cocoon / runc':36s} "
              f"{_f(r['ratio_stdout_cocoon_over_runc'], 'x')}")  # fmt: skip
    print("\n4. PSS per idle sandbox (MiB):")
    for k, parts in r["pss_per_idle_sandbox_mib"].items():
        detail = ", ".join(f"{n} {v:.1f}" for n, v in parts.items() if n != "total")
        print(f"   {k:36s} {parts['total']:8.1f}  ({detail})")
    if "ksm" in r:
        print(f"   KSM: {r['ksm']}")
    d = r["density"]
    print(f"\n5. idle sandboxes within {d['budget_mib']} MiB of PSS: {d['fit']}"
          f" (bounded at {d['bound']}; {d['pss_used_mib']:.0f} MiB used)")  # fmt: skip
    print("\n6. hot-plug (ms, x floor of one QMP round trip):")
    for k, s in r["hotplug"].items():
        print(f"   {k:36s} {s['median'] * 1000:8.1f}ms  {s['x_floor']:6.1f}x")
    net = r["network"]
    print(f"   TCP throughput, {net['transfer_mib']} MiB transfers (MB/s, x plain tap):")
    for k, s in net["mb_per_s"].items():
        ratio = net["ratio_over_plain_tap"].get(k)
        x = f"  {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else ""
        print(f"   {k:36s} {_f(s, ' MB/s')}{x}")
    print("\n7. pods (one VM per pod; CRI-style sandbox + containers):")
    for k, s in r["pods"]["seconds"].items():
        print(f"   {k:36s} {_f(s, 'x' if '/' in k else 's')}")
    for k, v in r["pods"]["host_pss_mib"].items():
        print(f"   {'host PSS, ' + k:36s} {v:8.1f} MiB")
    print("\n8. the pool of pre-booted VMs (pool_size 1):")
    for k, s in r["pool"]["rows"].items():
        print(f"   {k:36s} {_f(s, 'x' if '/' in k else 's')}")
    for k, v in r["pool"]["pooled_vm_pss_mib"].items():
        print(f"   {'idle pooled VM PSS, ' + k:36s} {v:8.1f} MiB")
    print("\n9. hardening switches (on / off):")
    for name, rows in r["hardening"].items():
        for k, s in rows.items():
            print(f"   {name + ' ' + k:36s} {_f(s, 'x' if 'ratio' in k else '')}")
    print("\n10. templates (restored instead of booted):")
    for k, s in r["template"]["rows"].items():
        print(f"   {k:36s} {_f(s, 'x' if '/' in k else 's')}")
    for kind, by in r["template"]["idle_pss_mib"].items():
        print(f"   {'idle ' + kind + ' sandbox PSS':36s} {by['total']['median']:8.1f} MiB")
    print("\n11. the data path (32 MiB per stream):")
    for k, s in r["stdio"]["rows"].items():
        print(f"   {k:36s} {_f(s, 'x' if ' / ' in k else '')}")
    print("\n12. density, 10 idle 1-container pods (host PSS per pod, MiB):")
    for kind, d in r["pod_density"].items():
        pss = d["pss_mib_per_pod"]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in pss.items())
        print(f"   {kind:15s} {parts}; {d['idle_pods_per_gib']:.2f} pods/GiB")
    print("\n13. the pytest plugin (cocoon.run() to a running container):")
    for k, s in r["plugin"]["rows"].items():
        print(f"   {k:36s} {_f(s, 'x' if '/' in k else 's')}")
    print("\n14. KSM and the guest RAM backend (idle VMs, QEMU PSS per VM, MiB):")
    for kind, k in r["ksm_backends"].items():
        if isinstance(k, dict):
            settled, merged = k["settled_mib_per_vm"]["qemu"], k["ksm_mib_per_vm"]["qemu"]
            print(f"   {kind:26s} settled {settled:.1f}, after KSM {merged:.1f}; "
                  f"ksmd {k['ksmd_cpu_s']:.1f} s CPU")  # fmt: skip
    print("\nPython import time (ms): " + ", ".join(
        f"{m} {v:.0f}" for m, v in r["python_import_ms"].items()))  # fmt: skip
    print(f"wall time: {r['wall_seconds']:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
