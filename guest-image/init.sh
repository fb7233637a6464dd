#!/bin/busybox sh
# cocoon first stage (PID 1 in the initramfs): load the kernel modules the guest needs, mount
# the read-only root image from virtio-pmem (DAX), put a tmpfs overlay on top, and switch_root
# into the agent, which becomes PID 1. Any failure powers the VM off with a message on the
# console, which the host shows to the user.
/bin/busybox mkdir -p /proc /sys /dev /bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
up() { cut -d' ' -f1 /proc/uptime; }
echo "cocoon-init: first stage at $(up)s" > /dev/console

fail() {
    echo "cocoon-init: FATAL: $*" > /dev/console
    sync
    poweroff -f
}

while read -r mod; do
    insmod "/lib/modules/$mod" || fail "insmod $mod"
done < /modules.list
echo "cocoon-init: modules loaded at $(up)s" > /dev/console

root=""
for i in $(seq 1 200); do
    [ -b /dev/pmem0 ] && { root=/dev/pmem0; break; }
    usleep 10000
done
[ -n "$root" ] || fail "root device /dev/pmem0 did not appear"

mkdir -p /lower /rw /newroot
mount -t ext4 -o ro,dax,noload "$root" /lower 2>/dev/null \
    || mount -t ext4 -o ro,noload "$root" /lower || fail "mount root image $root"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "mount overlay root"
mkdir -p /newroot/run /newroot/tmp /newroot/dev /newroot/proc /newroot/sys
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm
mount --move /sys /newroot/sys
mount -t cgroup2 -o nsdelegate cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
echo "cocoon-init: root ready at $(up)s, starting the agent" > /dev/console
mount --move /proc /newroot/proc
exec switch_root /newroot /usr/bin/python3 -m cocoon.agent
