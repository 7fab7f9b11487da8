#!/bin/bash
# Runs inside the test guest (started by scripts/vmtest): prepares the guest, runs the
# command given as arguments in the checkout, and leaves its output and exit status in
# $CACHEFILESD_VM_RESULTS for the host.
res=${CACHEFILESD_VM_RESULTS:?}
{
    ip link set lo up
    ulimit -n 65536
    mkdir -p /tmp/vm
    # cachefiles needs /proc/fs/fscache only for stats; mount debugfs-free basics
    mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug 2>/dev/null
} >"$res/setup.log" 2>&1
cd "${CACHEFILESD_CHECKOUT:?}" || exit 1
export HOME=/root PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
"$@" >"$res/output.log" 2>&1
echo $? >"$res/rc"
sync
