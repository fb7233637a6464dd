#!/bin/busybox sh
# The benchmark floor: the same kernel and QEMU, an init that only prints and powers off.
/bin/busybox mount -t proc proc /proc
echo "cocoon-floor: init reached at $(/bin/busybox cut -d' ' -f1 /proc/uptime)s"
/bin/busybox poweroff -f
