"""QEMU's command line as a pure function of a resolved launch plan.

``plan()`` turns the configuration plus host facts (resolved accel and channel, host CPUs and
RAM, the guest image) into a ``VmPlan``; ``build_argv()`` turns a plan into argv. Neither
touches the system, so both are tested against golden output (tests/unit/golden/). The plan's
size and ceilings are one ``VmLimits`` (the launch contract): the same value goes into the
launch file, and the monitor's hot-plug checks against it.

Machine shape (see docs/architecture.md): q35 with ACPI PCI hot-plug; pcie.0 refuses
hot-plug, so ``hotplug_root_ports`` pcie-root-ports are pre-created for NICs and VFIO; disks
go on one virtio-scsi controller; vCPUs as one socket each (``-smp 1,maxcpus=N,sockets=N``)
so each can be hot-added; ``-m X,slots=S,maxmem=Y``; the root filesystem image on virtio-pmem
(read-only, DAX in the guest); the agent channel on vsock or a virtio-serial port; the
sandbox share on virtio-fs (vhost-user-fs, guest RAM on a shared memfd) or virtio-9p.

May import: the standard library, cocoon.runtime.config, cocoon.runtime.monitor.launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cocoon.runtime.config import Config
from cocoon.runtime.monitor.launch import (
    FS_PORT_ID,
    FS_PORT_SLOT,
    MIB,
    ROOT_PORT_SLOT,
    SHARE_TAG,
    VMEM_BLOCK_MIB,
    VmLimits,
)

AGENT_PORT_NAME = "agent.channel.0"
VSOCK_AGENT_PORT = 1024
PMEM_ALIGN = 2 * 1024 * 1024

BASE_KERNEL_PARAMS = (
    "console=ttyS0",
    "panic=-1",
    "reboot=k",
    "memhp_default_state=online_movable",
    "swiotlb=noforce",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "cryptomgr.notests",
    "no_timer_check",
    "rcupdate.rcu_expedited=1",
    "quiet",
)

# Free page reporting in 128 KiB blocks (order 5) instead of the kernel's 2 MiB: measured, an
# idle 256 MiB guest keeps ~12 MiB less of host RAM, a 128 MiB one ~30 MiB less (docs/
# performance.md "Free page reporting's order").
REPORTING_ORDER = 5

SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# A non-root QEMU (-runas) calls setgid/setuid after the filter is in: allowed, since a
# process that dropped root holds no capability to raise them again (and no_new_privs is set).
SECCOMP_RUNAS = SECCOMP.replace("elevateprivileges=deny", "elevateprivileges=allow")


@dataclass(frozen=True)
class SandboxPaths:
    """Files of one sandbox's state directory that QEMU is told about."""

    state_dir: Path

    @property
    def qmp(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def agent_port(self) -> Path:
        return self.state_dir / "agent-port.sock"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def virtiofsd_sock(self) -> Path:
        return self.state_dir / "virtiofsd.sock"

    @property
    def share_dir(self) -> Path:
        return self.state_dir / "shared"


@dataclass(frozen=True)
class VmPlan:
    sandbox_id: str
    qemu: str
    machine: str
    accel: str  # "kvm" or "tcg", already resolved
    cpu_model: str
    tb_size_mib: int
    limits: VmLimits
    kernel: Path
    initrd: Path
    rootfs_image: Path
    rootfs_size: int
    kernel_params: tuple[str, ...]
    channel: str  # "vsock" or "virtio-serial", already resolved
    vsock_cid: int
    shared_fs: str
    msize_9p: int
    seccomp: bool
    paths: SandboxPaths
    free_page_reporting: bool = True
    # Non-root QEMU: the monitor adds -runas with the sandbox's uid; QEMU starts paused (-S)
    # and the monitor resumes it once it checked QEMU dropped root.
    rootless: bool = False
    # Templates (sandbox.template): "save" boots the VM a template is saved from, "restore"
    # starts one paused, waiting for the template's state (-incoming defer). Both keep guest
    # RAM in ``memory_path`` (a file: saved apart from the device state, copied per clone),
    # put the root image on an NVDIMM, not virtio-pmem, leave out vhost-user-fs (QEMU 7.2
    # migrates neither) and add the root port vhost-user-fs is hot-plugged into after a
    # restore.
    template: str = ""
    memory_path: str = ""


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def plan(
    cfg: Config,
    *,
    sandbox_id: str,
    state_dir: Path,
    kernel: Path,
    initrd: Path,
    rootfs_image: Path,
    rootfs_size: int,
    accel: str,
    channel: str,
    seccomp: bool,
    host_cpus: int,
    host_memory_mib: int,
    vsock_cid: int = 0,
    template: str = "",
    memory_path: str = "",
) -> VmPlan:
    h = cfg.hypervisor
    max_vcpus, max_memory = h.ceilings(host_cpus, host_memory_mib)
    params = list(BASE_KERNEL_PARAMS)
    if cfg.agent.debug:
        params.append("cocoon.debug=1")
    if h.free_page_reporting:  # the agent sets it again after the balloon driver registers
        params.append(f"page_reporting.page_reporting_order={REPORTING_ORDER}")
    params.extend(h.kernel_params)
    return VmPlan(
        sandbox_id=sandbox_id,
        qemu=h.path,
        machine=h.machine_type,
        accel=accel,
        cpu_model=h.cpu_model or ("host" if accel == "kvm" else "max"),
        tb_size_mib=h.tcg_tb_size_mib,
        limits=VmLimits(
            vcpus=h.default_vcpus,
            max_vcpus=max_vcpus,
            memory_mib=h.default_memory_mib,
            max_memory_mib=max_memory,
            memory_slots=h.memory_slots,
            root_ports=h.hotplug_root_ports,
            memory_hotplug=h.memory_hotplug,
            cpu_hotunplug=h.cpu_hotunplug,
            shared_memory=h.shared_fs == "virtio-fs",
        ),
        kernel=kernel,
        initrd=initrd,
        rootfs_image=rootfs_image,
        rootfs_size=_align_up(rootfs_size, PMEM_ALIGN),
        kernel_params=tuple(params),
        channel=channel,
        vsock_cid=vsock_cid,
        shared_fs=h.shared_fs,
        msize_9p=h.msize_9p,
        seccomp=seccomp,
        paths=SandboxPaths(state_dir),
        free_page_reporting=h.free_page_reporting,
        rootless=h.rootless,
        template=template,
        memory_path=memory_path,
    )


def build_argv(p: VmPlan) -> list[str]:
    if p.template not in ("", "save", "restore") or bool(p.template) != bool(p.memory_path):
        raise ValueError(f"template mode {p.template!r} with memory {p.memory_path!r}")
    lim = p.limits
    a: list[str] = [p.qemu, "-name", f"sandbox-{p.sandbox_id},debug-threads=on"]
    machine = p.machine
    if lim.shared_memory or p.template:
        machine += ",memory-backend=ram0"
    if p.template:
        machine += ",nvdimm=on"
    a += ["-machine", machine]
    if p.accel == "tcg" and p.tb_size_mib:
        a += ["-accel", f"tcg,tb-size={p.tb_size_mib}"]
    else:
        a += ["-accel", p.accel]
    a += ["-cpu", p.cpu_model]
    a += [
        "-smp",
        f"{lim.vcpus},maxcpus={lim.max_vcpus},sockets={lim.max_vcpus},cores=1,threads=1",
    ]
    # maxmem bounds all device memory: hot-plugged DIMMs/virtio-mem and the pmem root image.
    pmem_mib = p.rootfs_size // MIB
    a += [
        "-m",
        f"{lim.memory_mib}M,slots={max(lim.memory_slots, 1)},"
        f"maxmem={lim.max_memory_mib + pmem_mib}M",
    ]
    if p.template:
        a += [
            "-object",
            f"memory-backend-file,id=ram0,size={lim.memory_mib}M,mem-path={p.memory_path},share=on",
        ]
    elif lim.shared_memory:
        a += ["-object", f"memory-backend-memfd,id=ram0,size={lim.memory_mib}M,share=on"]
    a += ["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot"]
    a += ["-kernel", str(p.kernel), "-initrd", str(p.initrd)]
    a += ["-append", " ".join(p.kernel_params)]
    a += ["-chardev", f"file,id=console,path={p.paths.console_log}", "-serial", "chardev:console"]
    a += ["-chardev", f"socket,id=qmp,path={p.paths.qmp},server=on,wait=off"]
    a += ["-mon", "chardev=qmp,mode=control"]
    for i in range(lim.root_ports):
        slot, fn = ROOT_PORT_SLOT + i // 8, i % 8
        multi = ",multifunction=on" if fn == 0 else ""
        a += [
            "-device",
            f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},addr={slot:#x}.{fn}{multi}",
        ]
    if p.template and p.shared_fs == "virtio-fs":
        a += [
            "-device",
            f"pcie-root-port,id={FS_PORT_ID},bus=pcie.0,chassis={lim.root_ports + 1},"
            f"addr={FS_PORT_SLOT:#x}.0",
        ]
    a += ["-device", "virtio-scsi-pci,id=scsi0"]
    if lim.memory_hotplug == "virtio-mem" and lim.max_memory_mib > lim.memory_mib:
        # Pre-created (virtio-mem devices cannot be hot-added usefully), resized over QMP.
        size = (lim.max_memory_mib - lim.memory_mib) // VMEM_BLOCK_MIB * VMEM_BLOCK_MIB
        backend = "memory-backend-memfd" if lim.shared_memory else "memory-backend-ram"
        share = ",share=on" if lim.shared_memory else ""
        a += [
            "-object",
            f"{backend},id=vmem0,size={size}M{share},reserve=off",
            "-device",
            f"virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0,block-size={VMEM_BLOCK_MIB}M",
        ]
    a += [
        "-object",
        f"memory-backend-file,id=rootfs,mem-path={p.rootfs_image},size={p.rootfs_size},"
        "share=on,readonly=on",
        "-device",
        # QEMU 7.2 does not migrate virtio-pmem's state (a restored guest's flush, at its
        # power-off, would wait forever): a template's root image is an ACPI NVDIMM instead
        # (read-only: unarmed), which the guest sees as the same /dev/pmem0, without DAX.
        "nvdimm,id=rootfs0,memdev=rootfs,unarmed=on"
        if p.template
        else "virtio-pmem-pci,id=rootfs0,memdev=rootfs",
    ]
    if p.channel == "vsock":
        a += ["-device", f"vhost-vsock-pci,id=vsock0,guest-cid={p.vsock_cid}"]
    else:
        a += [
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            f"socket,id=agent,path={p.paths.agent_port},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    if p.shared_fs == "virtio-fs" and not p.template:
        a += [
            "-chardev",
            f"socket,id=vfs,path={p.paths.virtiofsd_sock}",
            "-device",
            f"vhost-user-fs-pci,id=fs0,chardev=vfs,tag={SHARE_TAG},queue-size=1024",
        ]
    elif p.shared_fs == "virtio-9p":
        a += [
            "-fsdev",
            f"local,id=fs0,path={p.paths.share_dir},security_model=none",
            "-device",
            f"virtio-9p-pci,id=fs0dev,fsdev=fs0,mount_tag={SHARE_TAG}",
        ]
    if p.free_page_reporting:
        # The guest reports free blocks (REPORTING_ORDER); QEMU drops them from the host (a
        # hole punched in the memfd): an idle guest gives back what boot touched and freed.
        a += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    if p.rootless or p.template == "restore":
        a += ["-S"]
    if p.template == "restore":
        a += ["-incoming", "defer"]
    if p.seccomp:
        a += ["-sandbox", SECCOMP_RUNAS if p.rootless else SECCOMP]
    return a
