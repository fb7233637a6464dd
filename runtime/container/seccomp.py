"""The optional guest seccomp profile (``[runtime] guest_seccomp``): for a container whose spec
brings no seccomp profile of its own, a deny list of the system calls that reach the guest
kernel's least needed and most often exploited parts (keyrings, eBPF, perf events,
userfaultfd, io_uring, kexec and modules, open_by_handle_at, swap, process accounting,
quotas). The VM is the boundary; this narrows what a workload can try on the guest kernel
below it, as Kata's and docker's default profiles do. Everything else is allowed, so workloads
that run under runc without a profile run unchanged; a denied call fails with EPERM.

May import: the standard library.
"""

from __future__ import annotations

import copy
from typing import Any

DENIED = (
    "add_key", "keyctl", "request_key",
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "swapon", "swapoff", "acct", "quotactl", "lookup_dcookie",
)  # fmt: skip

EPERM = 1
PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "syscalls": [{"names": list(DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}],
}


def with_default_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the profile in ``linux.seccomp`` unless it has a profile already."""
    linux = spec.setdefault("linux", {})
    if not linux.get("seccomp"):
        linux["seccomp"] = copy.deepcopy(PROFILE)
    return spec
