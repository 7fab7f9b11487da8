"""The main job, shown: inside the test guest, serve an EROFS image over HTTP through
cachefilesd-py and list what the mount shows.

Run from the host with ``scripts/demo`` (it boots the test kernel). Steps: build an
EROFS image of this project's sources with mkfs.erofs, serve it with nginx on loopback,
start ``cachefilesd-py`` in on-demand mode on a loop-mounted ext4 cache, mount the
image with ``mount -t erofs none -o fsid=demo.erofs``, list and checksum every file
against the source tree, unmount, stop the daemon and print what it did.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.vm.rig import Daemon, mkfs_erofs, mount_erofs, run, start_nginx, tree_digests

CHECKOUT = Path(__file__).resolve().parents[2]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="demo-", dir="/tmp"))
    src = work / "src"
    shutil.copytree(
        CHECKOUT / "cachefilesd_py",
        src / "cachefilesd_py",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(CHECKOUT / "README.md", src / "README.md")
    blobs = work / "blobs"
    blobs.mkdir()
    mkfs_erofs(blobs / "demo.erofs", src)
    print(f"built {blobs / 'demo.erofs'} ({(blobs / 'demo.erofs').stat().st_size} bytes)")

    image = work / "cache.img"
    image.write_bytes(b"")
    with open(image, "r+b") as f:
        f.truncate(128 << 20)
    run("mkfs.ext4", "-q", "-F", str(image))
    cache = work / "cache"
    cache.mkdir()
    run("mount", "-o", "loop", str(image), str(cache))

    web = start_nginx(blobs, work)
    print(f"nginx serves {blobs} at {web.url}")
    conf = work / "cachefilesd.conf"
    conf.write_text(f"dir {cache}\ntag demo\nondemand\nsource * {web.url}/{{cookie}}\n")
    print(conf.read_text())
    daemon = Daemon(conf, work / "daemon.log")
    daemon.start()
    mnt = work / "mnt"
    mount_erofs(mnt, "demo.erofs")
    print(f"mounted: {run('findmnt', '-n', str(mnt)).stdout.strip()}")
    listing = subprocess.run(
        ["find", str(mnt), "-maxdepth", "2"], text=True, capture_output=True, check=True
    ).stdout
    print(listing.replace(str(mnt), "<mnt>"))
    got, want = tree_digests(mnt), tree_digests(src)
    ok = got == want
    print(f"{len(got)} files read through the mount; sha256 identical to the source: {ok}")
    run("umount", str(mnt))
    daemon.stop()
    web.proc.terminate()
    for ev in daemon.read_events():
        if ev.get("event") in {"open", "close", "presence.bound", "stats"}:
            shown = {k: v for k, v in ev.items() if k not in {"timestamp", "logger", "level"}}
            print("daemon:", shown)
    run("umount", str(cache))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
