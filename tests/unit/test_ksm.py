"""monitor.ksm: a process's private anonymous memory marked mergeable, read back from the
kernel (the ``mg`` flag of /proc/PID/smaps); not what a process it then execs maps."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import os, subprocess, sys
from cocoon.runtime.monitor import ksm
def flags(text):
    out = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        anon = len(line.split()) == 5 and line.split()[1].startswith("rw-p")
        if line.endswith("[heap]") or anon:
            for rest in lines[i + 1:]:
                if rest.startswith("VmFlags:"):
                    out[line.split()[0]] = "mg" in rest.split()[1:]
                    break
    return out
before = flags(open("/proc/self/smaps").read())
marked = ksm.mergeable()
after = flags(open("/proc/self/smaps").read())
child = subprocess.run(
    [sys.executable, "-c", "print(open('/proc/self/smaps').read().count(' mg'))"],
    capture_output=True, text=True, check=True,
).stdout.strip()
print(marked, sum(before.values()), sum(after.values()), len(after), child)
"""


def test_its_anonymous_mappings_are_mergeable_after_and_not_before_nor_in_what_it_execs() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True
    ).stdout.split()
    marked, before, after, total, child = (int(x) for x in out)
    assert before == 0
    assert marked >= 1
    assert after >= 1 and after >= total - 2  # mappings made after the call are not marked
    assert child == 0  # a process it execs starts unmarked (unlike PR_SET_MEMORY_MERGE)
