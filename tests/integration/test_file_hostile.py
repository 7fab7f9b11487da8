"""``file://`` sources against a hostile source tree and hostile keys (issue 10):
escapes through symlinks and magic links, FIFOs and devices, fd numbers reused under a
worker, in-place rewrites, and thousands of blobs under a low fd limit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound
from cachefilesd_py.kernel import _sys
from cachefilesd_py.sources.base import Source
from cachefilesd_py.sources.file import FileSource, SourceFds
from cachefilesd_py.sources.open import SourceFactory
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.sources.resolve import SourceResolver
from cachefilesd_py.testing.pattern import pattern_bytes

A = pattern_bytes(1, 0, 200_000)
B = pattern_bytes(2, 0, 200_000)
SECRET = b"TOP SECRET " * 100


def fetch(src: Source, off: int, n: int) -> bytes:
    buf = bytearray(n)
    src.fetch_into(off, memoryview(buf), Deadline.after(5))
    return bytes(buf)


@pytest.fixture(params=["openat2", "by-components"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every escape test runs with openat2 and with the fallback walk."""
    if request.param == "by-components":
        monkeypatch.setattr(_sys, "_openat2_missing", True)
    return str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``base/`` with a blob, ``outside/secret.img`` next to it."""
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    (outside / "sub").mkdir(parents=True)
    (base / "blob.img").write_bytes(A)
    (outside / "secret.img").write_bytes(SECRET)
    return base


@pytest.fixture
def factory() -> Iterator[SourceFactory]:
    f = SourceFactory()
    yield f
    f.close()


def through_rules(factory: SourceFactory, base: Path, cookie: bytes) -> Source | None:
    url = SourceResolver([SourceRule("*", f"file://{base}/{{cookie}}")]).resolve(b"erofs,v", cookie)
    return None if url is None else factory.open(url)


def assert_secret_not_read(src: Source | None) -> None:
    if src is None:
        return  # refused by the rules
    try:
        ident = src.identity(Deadline.after(5))
        got = fetch(src, 0, min(ident.size, len(SECRET)))
    except SourceError as exc:
        assert exc.reason in ("outside-source", "not-found", "not-a-file"), exc
        return
    assert SECRET[:20] not in got, "a file outside the source tree was read"


# -- item 3: escapes ---------------------------------------------------------------------


def test_symlink_then_dotdot_does_not_leave_the_base(
    tree: Path, factory: SourceFactory, walk: str
) -> None:
    os.symlink(tree.parent / "outside" / "sub", tree / "link")
    # lexically "link/../secret.img" is "secret.img", inside; the kernel goes out
    assert_secret_not_read(through_rules(factory, tree, b"link/../secret.img"))
    src = FileSource(str(tree / "link" / ".." / "secret.img"), beneath=str(tree))
    assert_secret_not_read(src)


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_symlinks_out_of_the_base_are_refused(
    tree: Path, factory: SourceFactory, walk: str, target: str
) -> None:
    secret = tree.parent / "outside" / "secret.img"
    os.symlink(secret if target == "absolute" else "../outside/secret.img", tree / "evil.img")
    src = through_rules(factory, tree, b"evil.img")
    assert src is not None
    with pytest.raises(SourceError) as e:
        src.identity(Deadline.after(5))
    assert e.value.reason == "outside-source"


def test_symlink_inside_the_base_is_followed_by_openat2(
    tree: Path, factory: SourceFactory, walk: str
) -> None:
    os.symlink("blob.img", tree / "alias.img")
    src = through_rules(factory, tree, b"alias.img")
    assert src is not None
    if walk == "openat2":
        assert fetch(src, 0, 100) == A[:100]
    else:  # the fallback refuses every symlink: stricter, never looser
        with pytest.raises(SourceError):
            src.identity(Deadline.after(5))


def test_magic_links_are_refused(tmp_path: Path, factory: SourceFactory, walk: str) -> None:
    secret = tmp_path / "secret.img"
    secret.write_bytes(SECRET)
    fd = os.open(secret, os.O_RDONLY)
    try:
        rules = SourceResolver([SourceRule("*", "file:///proc/self/fd/{cookie}")])
        url = rules.resolve(b"erofs,v", str(fd).encode())
        assert url is not None
        assert_secret_not_read(factory.open(url))
        direct = FileSource(f"/proc/self/fd/{fd}", beneath="/proc/self/fd")
        with pytest.raises(SourceError):
            direct.identity(Deadline.after(5))
    finally:
        os.close(fd)


def test_slash_and_dotdot_keys_are_refused_before_any_open(tree: Path) -> None:
    rules = SourceResolver([SourceRule("*", f"file://{tree}/{{cookie}}")])
    for cookie in (b"../outside/secret.img", b"sub/blob.img", b"..", b"/", b"%2e%2e"):
        assert rules.resolve(b"erofs,v", cookie) is None, cookie


# -- item 7: never block on opening what a key names -------------------------------------


def test_fifo_is_refused_without_blocking(tree: Path, factory: SourceFactory, walk: str) -> None:
    fifo = tree / "fifo.img"
    os.mkfifo(fifo)
    src = through_rules(factory, tree, b"fifo.img")
    assert src is not None
    outcome: list[BaseException | None] = []

    def opener() -> None:
        try:
            src.identity(Deadline.after(5))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=opener, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the opener before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("opening a FIFO blob blocked")
    assert isinstance(outcome[0], SourceError) and outcome[0].reason == "not-a-file"


def test_directories_sockets_and_devices_are_refused(
    tree: Path, factory: SourceFactory, walk: str
) -> None:
    (tree / "dir.img").mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tree / "sock.img"))
        for name in (b"dir.img", b"sock.img"):
            src = through_rules(factory, tree, name)
            assert src is not None
            with pytest.raises(SourceError) as e:
                src.identity(Deadline.after(5))
            assert e.value.reason == "not-a-file", name
    dev = FileSource("/dev/null", beneath="/dev")
    with pytest.raises(SourceError) as e:
        dev.identity(Deadline.after(5))
    assert e.value.reason == "not-a-file"


def test_missing_file_is_not_found(tree: Path, factory: SourceFactory, walk: str) -> None:
    src = through_rules(factory, tree, b"absent.img")
    assert src is not None
    with pytest.raises(SourceNotFound):
        src.identity(Deadline.after(5))


# -- item 2: fd numbers are owned; versions are pinned -----------------------------------


def test_fd_reuse_under_a_worker_never_yields_the_new_version(
    tree: Path, factory: SourceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1 fetches from version A; between its identity check and its preadv a
    new OPEN of the same path sees version B (the file was replaced), and, in the old
    code, closed and reopened the shared fd: the number came back, now naming B."""
    url = f"file://{tree}/blob.img"
    worker = factory.open(url)
    worker.identity(Deadline.after(5))
    real_preadv = os.preadv
    interleaved: list[int] = []

    def preadv_after_a_concurrent_open(fd: int, bufs: list[memoryview], off: int) -> int:
        if not interleaved:
            interleaved.append(fd)
            tmp = tree / "blob.img.new"
            tmp.write_bytes(B)
            os.rename(tmp, tree / "blob.img")
            factory.open(url).identity(Deadline.after(5))  # the other worker's OPEN
        return real_preadv(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", preadv_after_a_concurrent_open)
    try:
        got = fetch(worker, 0, 4096)
    except IdentityChanged:
        got = None
    monkeypatch.setattr(os, "preadv", real_preadv)
    assert interleaved, "the interleaving was not forced"
    assert got != B[:4096], "version B's bytes were returned for a blob opened as A"
    assert got is None or got == A[:4096]


def test_in_place_rewrite_during_a_read_is_detected(
    tree: Path, factory: SourceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = factory.open(f"file://{tree}/blob.img")
    src.identity(Deadline.after(5))
    real_preadv = os.preadv

    def preadv_racing_a_writer(fd: int, bufs: list[memoryview], off: int) -> int:
        with open(tree / "blob.img", "r+b") as f:  # same inode, same size
            f.write(B)
        return real_preadv(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", preadv_racing_a_writer)
    with pytest.raises(IdentityChanged):
        fetch(src, 0, 4096)


def test_open_blob_keeps_its_version_and_the_next_open_learns_the_new(
    tree: Path, factory: SourceFactory
) -> None:
    url = f"file://{tree}/blob.img"
    old = factory.open(url)
    assert old.identity(Deadline.after(5)).size == len(A)
    tmp = tree / "new"
    tmp.write_bytes(B + b"more")
    os.rename(tmp, tree / "blob.img")
    with pytest.raises(IdentityChanged):
        fetch(old, 0, 10)
    new = factory.open(url)
    assert new.identity(Deadline.after(5)).size == len(B) + 4
    assert fetch(new, 0, 10) == B[:10]


def test_touch_back_after_a_rewrite_is_detected(tree: Path, factory: SourceFactory) -> None:
    path = tree / "blob.img"
    src = factory.open(f"file://{tree}/blob.img")
    ident = src.identity(Deadline.after(5))
    st = os.stat(path)
    path.write_bytes(B)  # same inode, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back
    with pytest.raises(IdentityChanged):
        fetch(src, 0, 10)
    assert factory.open(f"file://{tree}/blob.img").identity(Deadline.after(5)) != ident


# -- item 8: fds are bounded, idle ones closed --------------------------------------------


def test_fd_table_is_bounded_and_closes_idle_files(tmp_path: Path) -> None:
    now = [0.0]
    fds = SourceFds(capacity=8, idle_seconds=30, clock=lambda: now[0])
    srcs = []
    for i in range(50):
        p = tmp_path / f"b{i}"
        p.write_bytes(bytes([i]) * 100)
        src = FileSource(str(p), fds=fds)
        assert fetch(src, 0, 100) == bytes([i]) * 100
        srcs.append(src)
        assert len(fds) <= 8
    # a closed file is reopened on use, and must still be the same file
    assert fetch(srcs[0], 0, 100) == bytes([0]) * 100
    (tmp_path / "b1").unlink()
    with pytest.raises(SourceNotFound):
        fetch(srcs[1], 0, 100)
    # idle files are closed: a deleted source file is not pinned for long
    (tmp_path / "b0").unlink()
    now[0] += 31
    fds.sweep()
    assert len(fds) == 0
    assert not any(str(tmp_path) in os.readlink(f"/proc/self/fd/{n}") for n in _fds())
    fds.close()


def _fds() -> list[int]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
            out.append(int(name))
        except OSError:
            pass
    return out


def test_an_evicted_fd_is_not_closed_under_a_reader(tmp_path: Path) -> None:
    fds = SourceFds(capacity=1)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(A)
    b.write_bytes(B)
    src_a, src_b = FileSource(str(a), fds=fds), FileSource(str(b), fds=fds)
    src_a.identity(Deadline.after(5))
    real_preadv = os.preadv
    evicted: list[int] = []

    def preadv_while_evicted(fd: int, bufs: list[memoryview], off: int) -> int:
        if not evicted:
            evicted.append(fd)
            src_b.identity(Deadline.after(5))  # evicts a's fd from the table
            fetch(src_b, 0, 10)
        return real_preadv(fd, bufs, off)

    os.preadv = preadv_while_evicted  # type: ignore[assignment]
    try:
        assert fetch(src_a, 0, 4096) == A[:4096]
    finally:
        os.preadv = real_preadv
    fds.close()


def test_thousands_of_blobs_under_a_low_fd_limit(tmp_path: Path) -> None:
    """10,000 blobs opened one after the other used to need 10,000 fds (then EMFILE
    for every OPEN). Run in a child with RLIMIT_NOFILE 128."""
    script = textwrap.dedent(
        f"""
        import os, resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        from cachefilesd_py.sources.open import SourceFactory
        from cachefilesd_py.sources.resolve import SourceResolver
        from cachefilesd_py.config.model import SourceRule
        from cachefilesd_py.sources.policy import Deadline
        base = {str(tmp_path)!r}
        rules = SourceResolver([SourceRule("*", "file://" + base + "/{{cookie}}")])
        f = SourceFactory()
        for i in range(3000):
            name = f"blob{{i}}"
            with open(os.path.join(base, name), "wb") as out:
                out.write(i.to_bytes(4, "big") * 1024)
            src = f.open(rules.resolve(b"erofs,v", name.encode()))
            buf = bytearray(4096)
            src.fetch_into(0, memoryview(buf), Deadline.after(5))
            assert bytes(buf) == i.to_bytes(4, "big") * 1024, i
        print("fds", len(os.listdir("/proc/self/fd")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) <= 64


def test_an_idle_table_closes_its_files_by_itself(tmp_path: Path) -> None:
    fds = SourceFds(capacity=8, idle_seconds=0.2)
    p = tmp_path / "gone.img"
    p.write_bytes(A)
    assert fetch(FileSource(str(p), fds=fds), 0, 10) == A[:10]
    p.unlink()
    for _ in range(100):  # no further use of the table: its sweeper closes the file
        if not any(str(p) in os.readlink(f"/proc/self/fd/{n}") for n in _fds()):
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail("a deleted source file stayed open in an idle table")
    assert len(fds) == 0
    fds.close()


_PARTS = ["a", "b", "f", "in", "out", "upa", "abs", "dir_in", "dir_out", "..", ".", ""]


@pytest.fixture(scope="module")
def maze(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[tuple[int, int]]]:
    """A source tree with symlinks that stay inside and symlinks that lead out, and
    the (dev, ino) of everything really inside it."""
    root = tmp_path_factory.mktemp("maze")
    base, outside = root / "base", root / "outside"
    (base / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (base / "f").write_bytes(A)
    (base / "a" / "b" / "f").write_bytes(B)
    links = {
        "in": "f", "out": "../outside/secret", "upa": "..", "abs": str(outside / "secret"),
        "dir_in": "a", "dir_out": "../outside",
    }  # fmt: skip
    for name, target in links.items():
        os.symlink(target, base / name)
        os.symlink(target if not target.startswith("..") else "../" + target, base / "a" / name)
    inside = set()
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [*dirnames, *filenames, "."]:
            st = os.lstat(os.path.join(dirpath, name))
            inside.add((st.st_dev, st.st_ino))
    return base, inside


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PARTS), min_size=1, max_size=5), st.booleans())
def test_open_beneath_never_leaves_the_base(
    maze: tuple[Path, set[tuple[int, int]]], parts: list[str], fallback: bool
) -> None:
    base, inside = maze
    dirfd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    try:
        if fallback:
            fd = _sys.open_beneath_by_components(dirfd, "/".join(parts), os.O_PATH)
        else:
            fd = _sys.open_beneath(dirfd, "/".join(parts), os.O_PATH)
    except OSError:
        return
    finally:
        os.close(dirfd)
    try:
        st_ = os.fstat(fd)
        assert (st_.st_dev, st_.st_ino) in inside, f"{'/'.join(parts)} left the base"
    finally:
        os.close(fd)
