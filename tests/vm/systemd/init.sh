#!/bin/sh
# PID 1 of the systemd test guest (scripts/vmtest --systemd), before systemd itself:
# the guest's root is the host's / over 9p, read-only. Make the few places writable
# that systemd, the packaged unit (PrivateTmp=) and the tests need, install the
# generator, then become systemd with the rig's unit directory and target.
# $1: the rig's folder (also a writable 9p share tagged "results").
rig=$1
mount -t proc proc /proc
mount -t 9p -o trans=virtio,version=9p2000.L,access=any,msize=524288 results "$rig"
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/etc/upper /run/etc/work /run/systemd/system-generators
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/etc/upper,workdir=/run/etc/work /etc
: >/etc/fstab                      # the host's mounts are not ours
rm -f /etc/cachefilesd.conf
for d in /tmp /var/tmp /mnt; do mount -t tmpfs -o mode=1777 tmpfs "$d"; done
ln -s "$(cat "$rig/checkout")/.venv/bin/cachefilesd-py-generator" \
    /run/systemd/system-generators/cachefilesd-py-generator
# container= (empty): the host is a container image, and systemd would otherwise
# believe it runs in one (/.dockerenv) and ignore systemd.unit= on the command line.
exec env -i container= SYSTEMD_UNIT_PATH="$rig/units:" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd
