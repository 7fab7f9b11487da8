#!/bin/bash
# The test command of a systemd guest (cfd-vmtest-run.service): runs "$@" in the
# checkout and leaves its output and exit status in the rig's folder for the host.
rig=${CACHEFILESD_VM_RESULTS:?}
cd "$(cat "$rig/checkout")" || exit 1
export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 CACHEFILESD_GUEST=1 \
    CACHEFILESD_SYSTEMD=1 CACHEFILESD_CHECKOUT="$PWD" \
    PATH="$PWD/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ulimit -n 65536
"$@" >"$rig/output.log" 2>&1
echo $? >"$rig/rc"
sync
