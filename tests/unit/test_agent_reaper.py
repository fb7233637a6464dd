"""The agent's Reaper (agent/proc.py): waiters and watchers of reaped children.

The reaper takes every child of its process (``waitpid(-1)``), so each test runs it in a
fresh interpreter of its own, never inside pytest's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    from cocoon.agent import proc

    reaper = proc.Reaper()
    got = {}
    caller = threading.get_ident()

    def watcher(name):
        def called(status):
            got[name] = (os.waitstatus_to_exitcode(status), threading.get_ident() == caller)
        return called

    def reap_until(cond, timeout=10.0):
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "never reaped"
            reaper.reap()
            time.sleep(0.01)

    # watched before its exit: called by the reaping (another thread), with its status
    late = proc.spawn(["/bin/sh", "-c", "sleep 0.3; exit 3"], None, None, None)
    reaper.watch(late, watcher("late"))
    assert "late" not in got
    reaping = threading.Thread(target=reap_until, args=(lambda: "late" in got,))
    reaping.start()
    reaping.join()

    # reaped before it is watched: called at once, in the watching thread
    early = proc.spawn(["/bin/sh", "-c", "exit 5"], None, None, None)
    reap_until(lambda: early in reaper._statuses)
    reaper.watch(early, watcher("early"))

    # a waiter still gets its own child's status, and a watched one is not left for waiters
    waited = proc.spawn(["/bin/sh", "-c", "exit 7"], None, None, None)
    reap_until(lambda: waited in reaper._statuses)
    print(got["late"], got["early"], os.waitstatus_to_exitcode(reaper.wait(waited, 1)),
          late in reaper._statuses, reaper._watchers)
    """
)


def test_a_watcher_gets_its_child_status_whether_reaped_before_or_after() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # (status, called in the watching thread): late by the reaping thread, early at once
    assert out.stdout.split("\n")[0] == "(3, False) (5, True) 7 False {}"
