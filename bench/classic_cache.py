"""A classic-mode cache for the culling benchmark, built in the test guest.

The result is one ext4 image file holding ``cache/I9p,<tag>,/@xx/<object>`` exactly as
the 6.12 kernel lays out a 9p ``cache=fscache`` cache, filled to a chosen free-space
percentage, so that the benchmark can hand byte-identical copies of it to each daemon.

Two ways to get the objects (``source``):

- ``kernel``: every object is made by the kernel. A classic cache is bound on the image
  (by this process: ``dir``/``tag``/``bind`` on ``/dev/cachefiles``, no culling), the
  spare 9p share is mounted with ``cache=fscache`` and every file of it is read once;
  netfs writes what was read into the cache, and unmounting withdraws the cookies, which
  links each object into its fan-out directory. Faithful, but every object costs a 9p
  round trip or three under TCG, so it is slow past a few thousand objects.
- ``synthetic``: a few objects (``TEMPLATES``) are made by the kernel as above; the rest
  are clones of them: named and placed as the kernel would name and place the objects of
  other 9p files (cookie key = the file's little-endian 64-bit qid.path, name by
  ``cachefiles_cook_key``, fan-out by the cookie hash; ``kernel/layout.py``), with the
  same mode and the kernel's ``user.CacheFiles.cache`` xattr copied from a real object
  (its object-size field set to the clone's size), and their blocks allocated by
  ``fallocate`` (or written, ``data="write"``). The kernel's ``cull`` looks an object
  up by name, refuses it only if the inode is in use (``S_KERNEL_FILE``) and unlinks it;
  it reads no xattr, so it culls a clone exactly as it culls a kernel-made object (the
  benchmark's own runs check that the kernel counted every removal as a cull).

Atimes: clones get distinct whole-second atimes in a random order (cachefilesd C keeps
atimes in seconds), older than the kernel-made objects, so LRU order is spread over
all fan-out directories, as on a cache that has been in use for a while.

Free space: the image is sized for the objects plus ``free_pct`` of free blocks and a
little slack; a ``ballast`` file outside ``cache/`` (neither daemon looks there) then
takes the slack, so that ``f_bavail / f_blocks`` is ``free_pct`` to the block. The
filesystem has no reserved blocks (``-m 0``), so free and available blocks agree.

The image lives in the guest's ``/tmp`` (RAM): blocks never written (fallocate, the
inode tables and journal once zeroed) are turned into holes (``fallocate --dig-holes``)
so that copies (``cp --sparse=always``) cost only the metadata.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cachefilesd_py.kernel.layout import (
    fanout_dir_name,
    object_file_name,
    object_path,
    volume_dir_name,
)
from tests.vm.rig import run

BLOCK = 4096
XATTR = "user.CacheFiles.cache"
#: kernel-made objects in a synthetic cache (templates for the clones)
TEMPLATES = 16
#: qid.paths of the clones start here, far from the host inode numbers of real files
CLONE_QID_BASE = 1 << 48
#: the fill binding must never ask for culls: tiny limits (set in this order, each
#: below the kernel's defaults 7/5/1 or above the one before)
FILL_LIMITS = (b"bstop 1%", b"bcull 2%", b"brun 3%", b"fstop 1%", b"fcull 2%", b"frun 3%")


@dataclass(frozen=True)
class CacheSpec:
    objects: int
    object_kb: int = 16
    free_pct: float = 16.0
    source: str = "synthetic"  # or "kernel"
    data: str = "fallocate"  # or "write" (synthetic objects' blocks)
    seed: int = 1

    @property
    def object_bytes(self) -> int:
        return self.object_kb * 1024

    @property
    def object_blocks(self) -> int:
        return -(-self.object_bytes // BLOCK)


@dataclass
class BuiltCache:
    image: Path
    spec: CacheSpec
    volume: str
    objects: int
    kernel_made: int
    f_blocks: int
    free_blocks: int
    files: int
    free_files: int
    build_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def size_mb(self) -> float:
        return self.f_blocks * BLOCK / 1e6

    @property
    def free_pct(self) -> float:
        return 100 * self.free_blocks / self.f_blocks


@dataclass(frozen=True)
class NinePShare:
    """The spare 9p share of ``scripts/vmtest``: channel ``tag``, mounted at ``path``."""

    tag: str
    path: Path

    @classmethod
    def from_env(cls) -> NinePShare:
        try:
            return cls(os.environ["CACHEFILESD_9P_TAG"], Path(os.environ["CACHEFILESD_9P_DIR"]))
        except KeyError as exc:
            raise SystemExit("needs the test guest's 9p share: run through scripts/vmtest") from exc

    @property
    def volume_key(self) -> bytes:
        """9p's fscache volume key: ``9p,<device name>,<cachetag or aname>`` (no aname)."""
        return f"9p,{self.tag},".encode()

    def mount(self, fscache: bool) -> None:
        """(Re)mount the share at its own path, with or without ``cache=fscache``; one
        virtio 9p channel mounts once, so the current mount goes first."""
        if os.path.ismount(self.path):
            run("umount", str(self.path))
        opts = "trans=virtio,version=9p2000.L" + (",cache=fscache" if fscache else "")
        run("mount", "-t", "9p", "-o", opts, self.tag, str(self.path))


# -- the image --------------------------------------------------------------------------


def mkfs(image: Path, blocks: int, inodes: int) -> None:
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(blocks * BLOCK)
    run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        str(BLOCK),
        "-m",
        "0",
        "-N",
        str(inodes),
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        str(image),
    )


@contextlib.contextmanager
def mounted(image: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        os.sync()
        for attempt in range(50):
            if run("umount", str(mnt), check=False).returncode == 0:
                break
            time.sleep(0.1 * (attempt + 1))  # the kernel may still withdraw a cache
        else:
            run("umount", str(mnt))


def sparsify(image: Path) -> None:
    """Turn the image's zero blocks into holes (it lives in RAM)."""
    run("fallocate", "--dig-holes", str(image))


def copy_image(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    run("cp", "--sparse=always", str(src), str(dst))


def inode_count(objects: int) -> int:
    """Room for the objects with free inodes well above the kernel's default file limits
    (frun 7 %), so that only blocks decide culling."""
    return max(4096, math.ceil(objects * 1.4) + 2048)


def fanout_blocks(objects: int) -> int:
    """Directory blocks: cache/, graveyard/, the volume, 256 fan-out directories of
    about ``objects / 256`` entries of ~24-byte names (ext4 dirents: 8 + name, 4-aligned)."""
    per_dir = -(-objects // 256)
    return 4 + 256 * max(1, -(-per_dir * 32 // BLOCK))


# -- the cache, bound by this process for filling --------------------------------------


@contextlib.contextmanager
def fill_binding(root: Path, tag: str = "bench-fill") -> Iterator[int]:
    """A classic cache on ``root`` that never asks for culls (its device fd is yielded):
    enough for the kernel to make objects, or for timing commands. Closing the device
    unbinds it."""
    fd = os.open("/dev/cachefiles", os.O_RDWR | os.O_CLOEXEC)
    try:
        for cmd in (f"dir {root}".encode(), f"tag {tag}".encode(), *FILL_LIMITS, b"bind"):
            os.write(fd, cmd)
        yield fd
    finally:
        os.close(fd)


def make_share_files(share: NinePShare, count: int, size: int, start: int = 0) -> list[str]:
    """``count`` sparse files of ``size`` bytes in the 9p share (through the plain 9p
    mount); reading them returns zeros, which the cache stores like any data."""
    share.mount(fscache=False)
    names = []
    for i in range(start, start + count):
        name = f"o{i:07d}"
        fd = os.open(share.path / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        names.append(name)
    return names


def read_through_fscache(share: NinePShare, root: Path, names: list[str]) -> None:
    """Read every file once through a ``cache=fscache`` mount while a cache is bound on
    ``root``: netfs marks the folios for the cache and writeback writes them (synced in
    bursts well below the free space, since the kernel drops a write that would take the
    cache below *stop* with the writes in flight); unmounting withdraws the cookies,
    which commits every object into its fan-out directory."""
    with fill_binding(root):
        share.mount(fscache=True)
        try:
            for n, name in enumerate(names, 1):
                with open(share.path / name, "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass
                if n % 256 == 0:
                    os.sync()
            os.sync()
        finally:
            share.mount(fscache=False)  # unmount (withdraw the cookies), plain mount back


def kernel_objects(root: Path) -> list[Path]:
    return sorted(p for p in (root / "cache").glob("I*/@*/*") if p.is_file())


# -- clones -----------------------------------------------------------------------------


def clone_objects(root: Path, share: NinePShare, spec: CacheSpec, template: Path) -> int:
    """``spec.objects - kernel-made`` clones of ``template`` (see the module docstring)."""
    made = len(kernel_objects(root))
    count = spec.objects - made
    if count <= 0:
        return 0
    volume_key = share.volume_key
    vdir = root / "cache" / volume_dir_name(volume_key)
    xattr = bytearray(os.getxattr(template, XATTR))
    struct.pack_into(">Q", xattr, 0, spec.object_bytes)  # object_size
    mode = os.stat(template).st_mode & 0o7777
    rng = random.Random(spec.seed)
    ages = list(range(count))
    rng.shuffle(ages)
    newest = int(min(os.stat(p).st_atime for p in kernel_objects(root))) - 60
    zeros = bytes(spec.object_bytes) if spec.data == "write" else b""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    for i in range(count):
        key = struct.pack("<Q", CLONE_QID_BASE + i)
        path = vdir / fanout_dir_name(volume_key, key) / object_file_name(key)
        fd = os.open(path, flags, mode)
        try:
            if zeros:
                os.write(fd, zeros)
            else:
                os.posix_fallocate(fd, 0, spec.object_bytes)
            os.setxattr(fd, XATTR, xattr)
            t = newest - count + ages[i]
            os.utime(fd, (t, t))
        finally:
            os.close(fd)
        if (i + 1) % 20000 == 0:
            os.sync()  # keep dirty metadata bounded in a small guest
    return count


def check_kernel_naming(root: Path, share: NinePShare, names: list[str]) -> list[str]:
    """The clones are named and placed by ``kernel/layout.py``; check that it names and
    places the kernel-made objects of this very cache where the kernel put them (a 9p
    inode number is the qid.path + 2 on 64-bit). Returns the problems found, as text."""
    problems = []
    made = set(kernel_objects(root))
    for name in names:
        qid_path = os.stat(share.path / name).st_ino - 2
        want = object_path(root, share.volume_key, struct.pack("<Q", qid_path))
        if want not in made:
            problems.append(f"{name}: layout.py says {want}, not in the cache")
    return problems


# -- the whole build --------------------------------------------------------------------


def _statvfs(path: Path) -> os.statvfs_result:
    return os.statvfs(path)


def _size_for(spec: CacheSpec, overhead: int) -> int:
    """Image blocks for the objects, their directories, the filesystem's own overhead
    and ``free_pct`` of free blocks, plus 1 % slack for the ballast to take."""
    used = spec.objects * spec.object_blocks + fanout_blocks(spec.objects) + overhead
    return math.ceil(used / (1 - spec.free_pct / 100 - 0.01)) + 256


def build_cache(spec: CacheSpec, work: Path, share: NinePShare) -> BuiltCache:
    """Build the cache image ``work/master.img`` for ``spec`` (see the module docstring)."""
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    image, mnt = work / "master.img", work / "master"
    inodes = inode_count(spec.objects)
    overhead = 0
    blocks = _size_for(spec, overhead)
    for _ in range(4):  # the fs's own overhead depends on its size (journal, bitmaps)
        mkfs(image, blocks, inodes)
        with mounted(image, mnt):
            st = _statvfs(mnt)
        overhead = blocks - st.f_bavail
        need = _size_for(spec, overhead)
        if need <= blocks:
            break
        blocks = need
    notes: list[str] = []
    with mounted(image, mnt) as root:
        kernel_count = spec.objects if spec.source == "kernel" else min(TEMPLATES, spec.objects)
        names = make_share_files(share, kernel_count, spec.object_bytes)
        read_through_fscache(share, root, names)
        made = kernel_objects(root)
        if len(made) < kernel_count:
            notes.append(f"the kernel committed {len(made)} of {kernel_count} objects")
        notes += check_kernel_naming(root, share, names)
        for name in names:  # the share is the guest tests' too
            (share.path / name).unlink()
        if not made:
            raise RuntimeError("the kernel made no cache object: is 9p cache=fscache working?")
        clone_objects(root, share, spec, made[0])
        fit_ballast(root, spec.free_pct)
        st = _statvfs(root)
        objects = len([p for p in (root / "cache").glob("I*/@*/*")])
        volume = next(p.name for p in (root / "cache").iterdir())
    sparsify(image)
    return BuiltCache(
        image=image,
        spec=spec,
        volume=volume,
        objects=objects,
        kernel_made=len(made),
        f_blocks=st.f_blocks,
        free_blocks=st.f_bavail,
        files=st.f_files,
        free_files=st.f_ffree,
        build_seconds=time.monotonic() - t0,
        notes=notes,
    )


def fit_ballast(root: Path, free_pct: float) -> None:
    """Size ``root/ballast`` so that ``f_bavail`` is ``free_pct`` of ``f_blocks``."""
    ballast = root / "ballast"
    fd = os.open(ballast, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        for _ in range(8):
            os.fsync(fd)
            st = _statvfs(root)
            target = round(st.f_blocks * free_pct / 100)
            excess = st.f_bavail - target
            if excess == 0:
                return
            size = os.fstat(fd).st_size
            new = size + excess * BLOCK
            if new < 0:
                raise RuntimeError(
                    f"the cache is {-new // BLOCK} blocks too small for {free_pct} % free"
                )
            if excess > 0:
                os.posix_fallocate(fd, 0, new)
            else:
                os.ftruncate(fd, new)
        raise RuntimeError(f"could not set the free space to {free_pct} %")
    finally:
        os.close(fd)
