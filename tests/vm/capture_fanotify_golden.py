"""Capture the golden fanotify bytes of tests/unit/golden/fanotify/ from a real kernel.

    scripts/vmtest --kernel 7.3 -- python -m tests.vm.capture_fanotify_golden

Each ``*.bin`` is the unmodified buffer of one ``read()`` of a pre-content group;
``index.json`` says what it must decode to. Those expectations do not come from the
project's decoder: the ranges and pids are the reads this program made, the fd numbers
are the ones the kernel accepted answers for (a wrong number fails with ENOENT and its
reader would never return), and the record layout is read with a few ``struct`` calls
written here, independently of ``frontends/fanotify/wire.py``.

The files land in ``$CACHEFILESD_VM_RESULTS/golden/fanotify`` (or the directory given);
copy them into tests/unit/golden/fanotify/ to adopt them.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cachefilesd_py.kernel import fanotify, mount

FAN_REPORT_PIDFD = 0x00000080
FAN_ALLOW = 1
PAGE = 4096


def independent_parse(raw: bytes) -> list[dict[str, object]]:
    """The records of one read, from the UAPI layout, with nothing shared with wire.py."""
    out: list[dict[str, object]] = []
    pos = 0
    while pos < len(raw):
        event_len, vers, _r, metadata_len, mask, fd, pid = struct.unpack_from("=IBBHQii", raw, pos)
        assert vers == 3 and metadata_len == 24, (vers, metadata_len)
        rng = None
        skipped = []
        p = pos + metadata_len
        while p < pos + event_len:
            info_type, _pad, length = struct.unpack_from("=BBH", raw, p)
            if info_type == 6:
                rng = list(struct.unpack_from("=QQ", raw, p + 8))
            else:
                skipped.append(info_type)
                if info_type == 4:  # a pidfd installed in this process
                    os.close(struct.unpack_from("=i", raw, p + 4)[0])
            p += length
        out.append({"mask": mask, "fd": fd, "pid": pid, "range": rng, "skipped_info": skipped})
        pos += event_len
    return out


def wait_readable(fd: int, timeout: float = 60) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "no event in time"


def reader(path: Path, offset: int, length: int, out: list[bytes]) -> threading.Thread:
    def run() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            out.append(os.pread(fd, length, offset))
        finally:
            os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def answer_all(group: int, events: list[dict[str, object]]) -> None:
    for ev in events:
        fd = int(ev["fd"])  # type: ignore[call-overload]
        if fd >= 0:
            os.write(group, struct.pack("=iI", fd, FAN_ALLOW))  # ENOENT if the number is wrong
            os.close(fd)


def capture_reads(
    out: Path, name: str, ranges: list[tuple[int, int]], *, init_flags: int = 0
) -> dict[str, object]:
    backing = out.parent.parent / f"{name}.data"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    group = fanotify.fanotify_init(
        fanotify.FAN_CLASS_PRE_CONTENT | fanotify.FAN_CLOEXEC | init_flags, fanotify.EVENT_FD_FLAGS
    )
    with group:
        fanotify.mark_pre_access(group.fileno(), backing)
        results: list[bytes] = []
        threads = [reader(backing, off, n, results) for off, n in ranges]
        time.sleep(1.0)  # let every read queue its event, so that one read() returns all
        wait_readable(group.fileno())
        raw = os.read(group.fileno(), 65536)
        events = independent_parse(raw)
        answer_all(group.fileno(), events)
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a reader is still blocked"
    # the kernel reports the pages a read touches: [round down, round up)
    pages = [(o // PAGE * PAGE, -(-(o + n) // PAGE) * PAGE - o // PAGE * PAGE) for o, n in ranges]
    assert sorted(tuple(e["range"]) for e in events) == sorted(pages), events  # type: ignore[arg-type]
    assert all(e["pid"] == os.getpid() for e in events)
    (out / f"{name}.bin").write_bytes(raw)
    return {"events": events, "how": f"{len(ranges)} concurrent preads {ranges}"}


def capture_overflow(out: Path) -> dict[str, object]:
    backing = out.parent.parent / "overflow.data"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    knob = Path("/proc/sys/fs/fanotify/max_queued_events")
    saved = knob.read_text()
    knob.write_text("1")
    try:
        group = fanotify.pre_content_group(nonblocking=True, unlimited_queue=False)
    finally:
        knob.write_text(saved)
    with group:
        fanotify.mark_pre_access(group.fileno(), backing)
        results: list[bytes] = []
        threads = [reader(backing, i * PAGE, PAGE, results) for i in range(2)]
        time.sleep(1.0)
        raw = os.read(group.fileno(), 65536)
        events = independent_parse(raw)
        answer_all(group.fileno(), events)
        for t in threads:
            t.join(60)
    masks = sorted(int(e["mask"]) for e in events)  # type: ignore[call-overload]
    assert masks == [fanotify.FAN_Q_OVERFLOW, fanotify.FAN_PRE_ACCESS], events
    (out / "overflow.bin").write_bytes(raw)
    return {"events": events, "how": "queue limit 1, two concurrent preads of holes"}


def capture_erofs_mount(out: Path) -> dict[str, object]:
    work = out.parent.parent
    src = work / "erofs-src"
    src.mkdir()
    (src / "hello.txt").write_text("hello\n")
    image = work / "golden.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(src)], check=True)
    size = image.stat().st_size
    data = image.read_bytes()
    backing = work / "erofs.data"
    with open(backing, "wb") as f:
        f.truncate(size)
    mnt = work / "mnt"
    mnt.mkdir()
    group = fanotify.pre_content_group(nonblocking=True)
    with group:
        fanotify.mark_pre_access(group.fileno(), backing)
        errors: list[BaseException] = []

        def do_mount() -> None:
            try:
                mount.mount_file(backing, mnt)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=do_mount, daemon=True)
        t.start()
        wait_readable(group.fileno())
        raw = os.read(group.fileno(), 65536)
        first = independent_parse(raw)
        pending = first
        while True:  # serve the mount to its end
            for ev in pending:
                off, n = ev["range"]  # type: ignore[misc]
                os.pwrite(int(ev["fd"]), data[off : off + n], off)  # type: ignore[call-overload]
            answer_all(group.fileno(), pending)
            t.join(0.2)
            if not t.is_alive():
                break
            try:
                pending = independent_parse(os.read(group.fileno(), 65536))
            except BlockingIOError:
                pending = []
        assert not errors, errors
        assert (mnt / "hello.txt").read_text() == "hello\n"
        mount.umount(mnt)
    for e in first:
        assert e["pid"] == os.getpid() and e["range"][0] < size  # type: ignore[index]
    (out / "erofs-mount.bin").write_bytes(raw)
    return {"events": first, "how": "the first read() while mount(2) of a file-backed EROFS"}


def main() -> int:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if dest is None:
        dest = Path(os.environ["CACHEFILESD_VM_RESULTS"]) / "golden" / "fanotify"
    work = Path(tempfile.mkdtemp(prefix="golden-", dir="/tmp"))
    image = work / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    fs = work / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(fs)], check=True)
    try:
        out = fs / "golden" / "fanotify"
        out.mkdir(parents=True)
        index = {
            "single-read.bin": capture_reads(out, "single-read", [(2 * PAGE, PAGE)]),
            "three-reads.bin": capture_reads(
                out, "three-reads", [(0, PAGE), (10 * PAGE, 3 * PAGE), (100 * PAGE + 5, 17)]
            ),
            "pidfd.bin": capture_reads(
                out, "pidfd", [(7 * PAGE, 2 * PAGE)], init_flags=FAN_REPORT_PIDFD
            ),
            "overflow.bin": capture_overflow(out),
            "erofs-mount.bin": capture_erofs_mount(out),
        }
        (out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        dest.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
        print(f"golden files in {dest}: {sorted(p.name for p in dest.iterdir())}")
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
