"""fanotify-mode serving speed on the 7.3 test kernel, side by side in one guest run.

Run from the host (boots the 7.3 test kernel):

    .venv/bin/python scripts/vmtest --kernel 7.3 --timeout 1800 -- \\
        python -m bench.bench_fanotify [--size-mb 200]

One EROFS image holding a ``--size-mb`` file of random bytes; a sequential ``read()``
of that file (1 MiB at a time, page cache dropped first) through:

- ``loop``: the image loop-mounted directly: the physical limit here;
- ``file-backed, no mark``: the fully present image copied onto the same kind of
  ext4 cache (a loop-mounted ext4 file) and mounted file-backed with ``mount(2)``,
  without any mark: the same I/O path as the frontend's mounts minus fanotify, so the
  ratio of the fanotify rows to this one is the frontend's own cost;
- ``cold file://`` and ``cold nginx``: the fanotify frontend (in this process: the
  same engine, driver and images the daemon runs) on a fresh ext4 cache, mounting the
  image from its sparse cache file and filling what EROFS reads;
- ``warm, events``: the same mount after dropping the page cache, every chunk present
  and the ignore mark switched off: every backing read still raises an event that the
  daemon answers from its bitmap; events per second of that path;
- ``warm, ignore mark``: the same with the ignore mark (the default): no event.

Ratios are against the loop mount and the unmarked file-backed mount of the same run
(the machine is noisy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from bench.bench_ondemand import timed_read
from cachefilesd_py.config.model import FanotifyImage, SourceRule
from cachefilesd_py.engine.service import Engine, EngineSettings
from cachefilesd_py.frontends.fanotify.service import FanotifyFrontend
from cachefilesd_py.kernel import mount
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.sources.open import SourceFactory
from cachefilesd_py.sources.resolve import SourceResolver
from tests.vm.rig import mkfs_erofs, run, start_nginx


def cache_fs(work: Path, name: str, size_mb: int) -> Path:
    image = work / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    run("mkfs.ext4", "-q", "-F", str(image))
    mnt = work / name
    mnt.mkdir()
    run("mount", "-o", "loop", str(image), str(mnt))
    return mnt


def frontend(cache: Path, url: str, mnt: Path, *, silence: bool) -> FanotifyFrontend:
    factory = SourceFactory()
    engine = Engine(
        resolve=SourceResolver([SourceRule("imgs/*", url)]).resolve,
        open_source=factory.open,
        presence=PresenceStore(cache / "cachefilesd-py" / "presence"),
        settings=EngineSettings(max_run=4 << 20, buffers=12),
    )
    engine.start()
    fe = FanotifyFrontend(
        engine,
        cache,
        (FanotifyImage("imgs", "bench.erofs", str(mnt)),),
        silence_complete=silence,
    )
    failed = fe.start()
    if failed:
        raise RuntimeError(f"image not served: {failed}")
    return fe


def stop(fe: FanotifyFrontend) -> None:
    fe.stop()
    fe.engine.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fan-", dir="/tmp"))
    src = work / "src"
    src.mkdir()
    with open(src / "data.bin", "wb") as f:
        for _ in range(args.size_mb):
            f.write(os.urandom(1 << 20))
    origin = work / "origin"
    (origin / "imgs").mkdir(parents=True)
    mkfs_erofs(origin / "imgs" / "bench.erofs", src, "-Enoinline_data")
    rows: list[tuple[str, float, str]] = []

    loop = work / "loop"
    loop.mkdir()
    run("mount", "-t", "erofs", "-o", "loop,ro", str(origin / "imgs" / "bench.erofs"), str(loop))
    loop_s = timed_read(loop / "data.bin")
    run("umount", str(loop))
    rows.append(("loop mount (physical limit)", loop_s, ""))

    cache_mb = args.size_mb * 2 + 64
    plain = cache_fs(work, "cache-plain", cache_mb)
    shutil.copyfile(origin / "imgs" / "bench.erofs", plain / "bench.erofs")
    plain_mnt = work / "m-plain"
    plain_mnt.mkdir()
    mount.mount_file(plain / "bench.erofs", plain_mnt)
    plain_s = timed_read(plain_mnt / "data.bin")
    mount.umount(plain_mnt)
    run("umount", str(plain))
    rows.append(
        ("file-backed, no mark (same ext4 cache)", plain_s, "the baseline of the rows below")
    )
    nginx = start_nginx(origin, work)
    try:
        for label, url in (
            ("file://", f"file://{origin}/{{volume}}/{{cookie}}"),
            ("nginx", nginx.url + "/{volume}/{cookie}"),
        ):
            cache = cache_fs(work, f"cache-{label.strip(':/')}", cache_mb)
            mnt = work / f"m-{label.strip(':/')}"
            fe = frontend(cache, url, mnt, silence=False)
            try:
                cold = timed_read(mnt / "data.bin")
                rows.append((f"cold {label}", cold, ""))
                if label != "file://":
                    continue
                driver = fe.driver
                assert driver is not None
                before = driver.session.counts().allowed_present
                warm = timed_read(mnt / "data.bin")
                events = driver.session.counts().allowed_present - before
                rows.append(
                    (
                        "warm, events answered from the bitmap",
                        warm,
                        f"{events / warm:,.0f} events/s",
                    )
                )
                p = driver.present_times.summary_ms("present")
                rows.append(
                    (
                        "  (reader thread: event read → answered)",
                        0.0,
                        f"p50 {p['present_p50_ms']} ms, p99 {p['present_p99_ms']} ms",
                    )
                )
                driver.silence_complete = True
                for served in fe.images[0].blobs:
                    driver.maybe_silence(served)
                before = driver.session.counts().events
                quiet = timed_read(mnt / "data.bin")
                after = driver.session.counts().events - before
                rows.append(("warm, ignore mark", quiet, f"{after} events"))
            finally:
                stop(fe)
                run("umount", str(cache))
    finally:
        nginx.proc.terminate()
        nginx.proc.wait(10)

    mb = args.size_mb
    print(f"\nfanotify mode, {mb} MB sequential read, kernel {os.uname().release}\n")
    print(f"{'case':44} {'seconds':>8} {'MB/s':>8} {'× loop':>7} {'× file':>7}  notes")
    for name, secs, note in rows:
        if secs:
            print(
                f"{name:44} {secs:8.2f} {mb / secs:8.1f} {secs / loop_s:7.2f}"
                f" {secs / plain_s:7.2f}  {note}"
            )
        else:
            print(f"{name:44} {'':8} {'':8} {'':7} {'':7}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
