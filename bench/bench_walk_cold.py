"""The first cull pass's walk against its floor: cold ``stat`` of every object.

    python scripts/vmtest --memory 3G -- \
        python -m bench.bench_walk_cold [--objects 30000] [--rounds 2]

In the test guest only (it makes and mounts an ext4 on a loop device, and drops the
page cache between runs). Creates ``--objects`` empty objects in the cachefiles layout
(one volume, 256 fan-out directories) on a fresh ext4, then per round, each after
``drop_caches``: the classic walk (``space/scan.py``'s ``scan``: list, ``fstatat``,
keep the oldest), ``find -printf`` (C: ``getdents`` + ``fstatat`` per object, the
floor a C daemon pays), a bare Python ``listdir`` + ``stat(dir_fd=)`` loop, and the
walk again warm. Prints µs per object.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from cachefilesd_py.space.scan import scan

WORK = Path("/tmp/vm/walk-cold")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def bare(volume: Path) -> int:
    n = 0
    for d in os.listdir(volume):
        fd = os.open(volume / d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(fd):
                os.stat(name, dir_fd=fd, follow_symlinks=False)
                n += 1
        finally:
            os.close(fd)
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if os.environ.get("CACHEFILESD_GUEST") != "1" or os.geteuid() != 0:
        print("run it in the test guest (scripts/vmtest): it mounts and drops caches")
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    img, mnt = WORK / "fs.img", WORK / "mnt"
    subprocess.run(["truncate", "-s", "1G", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        cache = mnt / "cache"
        volume = cache / "Ivol"
        for f in range(256):
            (volume / f"@{f:02x}").mkdir(parents=True, exist_ok=True)
        for i in range(args.objects):
            os.close(os.open(volume / f"@{i % 256:02x}" / f"D{i:07x}", os.O_CREAT | os.O_WRONLY))
        n = args.objects
        print(f"{n} empty objects in 256 directories, ext4 on loop; µs per object\n")
        print("| round | walk, cold | find, cold | bare Python, cold | walk, warm |")
        print("|---|---|---|---|---|")
        for rnd in range(1, args.rounds + 1):
            drop_caches()
            t = time.perf_counter()
            scan(str(cache), 1 << 17)
            walk = time.perf_counter() - t
            drop_caches()
            t = time.perf_counter()
            subprocess.run(
                ["find", str(cache), "-type", "f", "-printf", "%A@ %b %h %f\n"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            find = time.perf_counter() - t
            drop_caches()
            t = time.perf_counter()
            bare(volume)
            plain = time.perf_counter() - t
            t = time.perf_counter()
            scan(str(cache), 1 << 17)
            warm = time.perf_counter() - t
            cells = " | ".join(f"{x / n * 1e6:.0f}" for x in (walk, find, plain, warm))
            print(f"| {rnd} | {cells} |", flush=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
