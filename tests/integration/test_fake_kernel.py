"""The fake /dev/cachefiles on its own: each test pins one kernel rule the fake models
(restated in cachefilesd_py/testing/fake_kernel.py). The rules the real kernel is
checked on are the contract cases (test_fake_kernel_contract.py and the guest tier)."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.kernel import commands
from cachefilesd_py.kernel.dio import PAGE_SIZE, AlignedBuffer, pwrite_direct, round_up
from cachefilesd_py.testing.fake_kernel import (
    AUX,
    AUX_XATTR,
    Background,
    FakeCachefiles,
    FakeObjectHandle,
    kstrtoll,
    kstrtoull,
    simple_strtoul,
)
from cachefilesd_py.testing.pattern import pattern_bytes

SIZE = 5 * PAGE_SIZE + 100
DATA = pattern_bytes(3, 0, SIZE)
Factory = Callable[..., FakeCachefiles]


@pytest.fixture
def make_fake(tmp_path: Path) -> Iterator[Factory]:
    made: list[FakeCachefiles] = []

    def make(version: tuple[int, int] = (6, 12), bind: bool = True, **kw: object) -> FakeCachefiles:
        fake = FakeCachefiles(version, **kw)  # type: ignore[arg-type]
        made.append(fake)
        if bind:
            cache = tmp_path / f"cache{len(made)}"
            cache.mkdir()
            fake.write_command(b"dir " + bytes(cache))
            fake.write_command(b"bind ondemand")
        return fake

    yield make
    for fake in made:
        fake.close_leftover_fds()
        fake.close()


def next_msg(fake: FakeCachefiles, timeout: float = 5) -> wire.Request:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        buf = fake.read_message()
        if buf:
            return wire.decode(buf)
        select.select([fake.fileno()], [], [], 0.02)
    raise AssertionError("no message")


def start_lookup(fake: FakeCachefiles, name: bytes = b"blob") -> Background[FakeObjectHandle]:
    return Background(fake.lookup, b"erofs," + name, name, 5)


def wait_pending(fake: FakeCachefiles, count: int) -> None:
    end = time.monotonic() + 5
    while len(fake.pending()) < count:
        assert time.monotonic() < end, "request never queued"
        time.sleep(0.005)


def open_object(
    fake: FakeCachefiles, name: bytes = b"blob", size: int = SIZE
) -> tuple[FakeObjectHandle, wire.OpenRequest]:
    job = start_lookup(fake, name)
    req = next_msg(fake)
    assert isinstance(req, wire.OpenRequest)
    fake.write_command(commands.encode_copen(req.msg_id, size))
    return job.result(5), req


def fill(fake: FakeCachefiles, fd: int, offset: int, data: bytes, limit: int = SIZE) -> int:
    with AlignedBuffer(len(data)) as buf:
        buf.view[: len(data)] = data
        return pwrite_direct(fake.pwrite, fd, buf, len(data), offset, limit=limit)


def expect_errno(code: int, call: Callable[[], object]) -> None:
    with pytest.raises(OSError) as e:
        call()
    assert e.value.errno == code, f"{e.value!r}, expected {errno.errorcode[code]}"


def serve_read(fake: FakeCachefiles, fd: int, handle: FakeObjectHandle, off: int, n: int) -> bytes:
    """Read through the handle, answering its READs from DATA."""
    job = Background(handle.read, off, n, 5)
    while not job.done():
        buf = fake.read_message()
        if not buf:
            select.select([fake.fileno()], [], [], 0.02)
            continue
        req = wire.decode(buf)
        assert isinstance(req, wire.ReadRequest), req
        end = min(SIZE, req.offset + req.length)
        fill(fake, fd, req.offset, DATA[req.offset : end])
        fake.read_complete(fd, req.msg_id)
    return job.result(0)


# -- number parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"0", 0),
        (b"12", 12),
        (b"+12", 12),
        (b"0x1f", 31),
        (b"0X1F", 31),
        (b"010", 8),
        (b"7\n", 7),
        (b"18446744073709551615", 2**64 - 1),
    ],
)
def test_kstrtoull(text: bytes, value: int) -> None:
    assert kstrtoull(text) == value


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (b"", errno.EINVAL),
        (b"-1", errno.EINVAL),
        (b"08", errno.EINVAL),
        (b"0x", errno.EINVAL),
        (b"1 ", errno.EINVAL),
        (b"1,", errno.EINVAL),
        (b"18446744073709551616", errno.ERANGE),
    ],
)
def test_kstrtoull_errors(text: bytes, code: int) -> None:
    expect_errno(code, lambda: kstrtoull(text))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"-2", -2),
        (b"-0x10", -16),
        (b"9223372036854775807", 2**63 - 1),
        (b"-9223372036854775808", -(2**63)),
    ],
)
def test_kstrtoll(text: bytes, value: int) -> None:
    assert kstrtoll(text) == value


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (b"9223372036854775808", errno.ERANGE),
        (b"-9223372036854775809", errno.ERANGE),
        (b"-+1", errno.EINVAL),
        (b"--1", errno.EINVAL),
    ],
)
def test_kstrtoll_errors(text: bytes, code: int) -> None:
    expect_errno(code, lambda: kstrtoll(text))


def test_simple_strtoul_takes_the_leading_digits() -> None:
    assert simple_strtoul(b"12%", 10) == (12, b"%")
    assert simple_strtoul(b"%", 10) == (0, b"%")
    assert simple_strtoul(b"0x10", 0) == (16, b"")
    assert simple_strtoul(b"+5%", 10) == (0, b"+5%")


# -- command parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("commands", "code"),
    [
        ([b""], errno.EOPNOTSUPP),
        ([b"\n"], errno.EINVAL),
        ([b"\ndir /x"], errno.EINVAL),
        ([b"bogus"], errno.EOPNOTSUPP),
        ([b" dir /x"], errno.EOPNOTSUPP),
        ([b"\tdir /x"], errno.EOPNOTSUPP),
        ([b"dir"], errno.EINVAL),
        ([b"dir  "], errno.EINVAL),
        ([b"dir /x", b"dir /y"], errno.EEXIST),
        ([b"tag"], errno.EINVAL),
        ([b"tag a", b"tag b"], errno.EEXIST),
        ([b"secctx"], errno.EINVAL),
        ([b"secctx label"], errno.EOPNOTSUPP),  # no LSM in this fake
        ([b"dir /x\0"], errno.EINVAL),
        ([b"tag " + b"x" * (PAGE_SIZE - 4)], errno.EOPNOTSUPP),
        ([b"brun"], errno.EINVAL),
        ([b"brun 50"], errno.EINVAL),
        ([b"brun 50%%"], errno.EINVAL),
        ([b"brun +50%"], errno.EINVAL),
        ([b"brun 100%"], errno.EINVAL),
        ([b"brun %"], errno.EINVAL),  # 0%, not above bcull 5%
        ([b"bcull 7%"], errno.EINVAL),  # must stay below brun 7%
        ([b"bstop 5%"], errno.EINVAL),  # must stay below bcull 5%
        ([b"fcull 1%"], errno.EINVAL),  # must stay above fstop 1%
        ([b"debug 1z"], errno.EINVAL),
        ([b"copen 1,2"], errno.EOPNOTSUPP),  # not bound on-demand
        ([b"restore"], errno.EOPNOTSUPP),
        ([b"cull Dx"], errno.EIO),  # not bound
        ([b"inuse Dx"], errno.EIO),
        ([b"cull a/b"], errno.EINVAL),
        ([b"bind"], errno.EINVAL),  # no dir
        ([b"dir /nonexistent/cache", b"bind"], errno.ENOENT),
        ([b"dir /etc/hostname", b"bind ondemand"], errno.ENOTDIR),
    ],
)
def test_command_errors(make_fake: Factory, commands: list[bytes], code: int) -> None:
    fake = make_fake(bind=False)
    for cmd in commands[:-1]:
        fake.write_command(cmd)
    expect_errno(code, lambda: fake.write_command(commands[-1]))


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        ([b"brun 50%", b"bcull 10%", b"bstop 0%"], {"brun": 50, "bcull": 10, "bstop": 0}),
        ([b"brun\t50%"], {"brun": 50}),  # any C whitespace separates the word
        ([b"bstop %"], {"bstop": 0}),  # 0%: fine, below bcull
        ([b"frun 90%", b"fcull 80%", b"fstop 70%"], {"frun": 90, "fcull": 80, "fstop": 70}),
        ([b"debug 0x10"], {"debug_mask": 16}),
        ([b"debug 9", b"debug"], {"debug_mask": 0}),  # no digits: mask 0
        ([b"tag x\ntag y"], {"tag": "x"}),  # the second line is dropped, not a second tag
        ([b"dir /c", b"tag t"], {"dir": Path("/c"), "tag": "t"}),
    ],
)
def test_commands_accepted(
    make_fake: Factory, commands: list[bytes], expected: dict[str, object]
) -> None:
    fake = make_fake(bind=False)
    for cmd in commands:
        fake.write_command(cmd)
    state = {**fake.thresholds, "debug_mask": fake.debug_mask, "tag": fake.tag, "dir": fake.dir}
    assert {k: state[k] for k in expected} == expected
    defaults = {"brun": 7, "bcull": 5, "bstop": 1, "frun": 7, "fcull": 5, "fstop": 1}
    untouched = {k: v for k, v in defaults.items() if k not in expected}
    assert {k: fake.thresholds[k] for k in untouched} == untouched


def test_thresholds_are_checked_against_the_current_values(make_fake: Factory) -> None:
    fake = make_fake(bind=False)
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"bcull 10%"))
    fake.write_command(b"brun 20%")
    fake.write_command(b"bcull 10%")
    assert fake.thresholds["bcull"] == 10 and fake.thresholds["brun"] == 20


def test_text_after_a_newline_is_ignored(make_fake: Factory, tmp_path: Path) -> None:
    fake = make_fake(bind=False)
    fake.write_command(b"dir " + bytes(tmp_path) + b"\ndir /elsewhere")
    assert fake.dir == tmp_path
    fake.write_command(b"bind ondemand\nbogus")
    assert fake.bound and fake.ondemand


def test_bind_rules(make_fake: Factory, tmp_path: Path) -> None:
    fake = make_fake(bind=False)
    fake.write_command(b"dir " + bytes(tmp_path))
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"bind ondemand "))  # trailing space
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"bind other"))
    fake.write_command(b"bind ondemand")
    assert (tmp_path / "cache").is_dir() and (tmp_path / "graveyard").is_dir()
    assert fake.tag == "CacheFiles"
    expect_errno(errno.EBUSY, lambda: fake.write_command(b"bind ondemand"))
    expect_errno(errno.EEXIST, lambda: fake.write_command(b"tag late"))


def test_kernel_without_ondemand_support(make_fake: Factory, tmp_path: Path) -> None:
    fake = make_fake(bind=False, ondemand_config=False)
    fake.write_command(b"dir " + bytes(tmp_path))
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"bind ondemand"))
    fake.write_command(b"bind")
    expect_errno(errno.EOPNOTSUPP, lambda: fake.write_command(b"copen 0,1"))
    expect_errno(errno.ENOBUFS, lambda: fake.lookup(b"erofs,x", b"x"))


@pytest.mark.parametrize(("version", "code"), [((6, 7), errno.EOPNOTSUPP), ((6, 8), None)])
def test_restore_exists_since_6_8(
    make_fake: Factory, version: tuple[int, int], code: int | None
) -> None:
    fake = make_fake(version)
    if code is None:
        fake.write_command(b"restore")
    else:
        expect_errno(code, lambda: fake.write_command(b"restore"))


def test_secctx_with_an_lsm(make_fake: Factory) -> None:
    fake = make_fake(bind=False, secctx_supported=True)
    fake.write_command(b"secctx system_u:object_r:cachefiles_var_t:s0")
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"secctx again"))


# -- OPEN and copen ---------------------------------------------------------------------


def test_open_message_and_anon_fd(make_fake: Factory) -> None:
    fake = make_fake()
    assert fake.read_message() == b""
    job = start_lookup(fake, b"x.img")
    wait_pending(fake, 1)
    assert fake.poll_mask() & select.POLLIN
    buf = fake.read_message()
    req = wire.decode(buf)
    assert isinstance(req, wire.OpenRequest)
    assert len(buf) == 32 + len(b"erofs,x.img\0") + len(b"x.img")
    assert (req.volume_key, req.cookie_key, req.flags, req.object_id) == (
        b"erofs,x.img",
        b"x.img",
        0,
        1,
    )
    assert not fcntl.fcntl(req.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not fake.poll_mask() & select.POLLIN, "a read OPEN no longer raises POLLIN (6.8+)"
    with AlignedBuffer(PAGE_SIZE) as buf4k:
        expect_errno(errno.ENOBUFS, lambda: fake.pwrite(req.fd, buf4k.view, 0))  # no file yet
    fake.write_command(commands.encode_copen(req.msg_id, SIZE))
    handle = job.result(5)
    assert handle.size == SIZE and handle.object_id == req.object_id
    assert os.fstat(req.fd).st_size == round_up(SIZE, 4096)
    assert not handle.path.exists(), "a new object is an unlinked tmpfile until commit"
    assert list(handle.path.parent.iterdir()) == []


def test_pwrite_rules_and_return_values(make_fake: Factory) -> None:
    fake = make_fake()
    _, req = open_object(fake)
    with AlignedBuffer(PAGE_SIZE) as buf:
        expect_errno(errno.ENOBUFS, lambda: fake.pwrite(req.fd, buf.view, 512))
        assert fake.pwrite(req.fd, buf.view, 0) == PAGE_SIZE
        assert fake.pwrite(req.fd, buf.view[:512], PAGE_SIZE) == PAGE_SIZE  # <= 6.12
        fake.set_space("stop")
        expect_errno(errno.ENOBUFS, lambda: fake.pwrite(req.fd, buf.view, 0))
    expect_errno(errno.EBADF, lambda: fake.pwrite(999, memoryview(b""), 0))


def test_pwrite_returns_the_byte_count_since_6_13(make_fake: Factory) -> None:
    fake = make_fake((6, 13))
    _, req = open_object(fake)
    with AlignedBuffer(PAGE_SIZE) as buf:
        assert fake.pwrite(req.fd, buf.view[:512], 0) == 512


def test_anon_fd_is_direct_io(make_fake: Factory) -> None:
    fake = make_fake()
    _, req = open_object(fake)
    if not fake.direct_io:
        pytest.skip("this filesystem has no O_DIRECT")
    expect_errno(errno.EINVAL, lambda: fake.pwrite(req.fd, memoryview(b"x" * 100), 0))


def test_writes_wait_for_the_file_after_copen(make_fake: Factory) -> None:
    gate = threading.Event()
    fake = make_fake(attach_gate=gate)
    job = start_lookup(fake)
    req = next_msg(fake)
    assert isinstance(req, wire.OpenRequest)
    fake.write_command(commands.encode_copen(req.msg_id, SIZE))
    with AlignedBuffer(PAGE_SIZE) as buf:
        expect_errno(errno.ENOBUFS, lambda: fake.pwrite(req.fd, buf.view, 0))
        assert not job.done(), "the lookup finishes only once the object has its file"
        gate.set()
        job.result(5)
        assert fake.pwrite(req.fd, buf.view, 0) == PAGE_SIZE


@pytest.mark.parametrize(
    ("size_text", "write_errno", "lookup_errno", "size"),
    [
        (b"4096", None, None, 4096),
        (b"0x1000", None, None, 4096),
        (b"010", None, None, 8),  # a leading zero is octal
        (b"0", None, None, 0),
        (b"-2", None, errno.ENOENT, None),
        (b"-4095", None, 4095, None),
        (b"-4096", errno.EINVAL, errno.EINVAL, None),
        (b"12abc", errno.EINVAL, errno.EINVAL, None),
        (b"", errno.EINVAL, errno.EINVAL, None),
        (b"99999999999999999999", errno.ERANGE, errno.ERANGE, None),
    ],
)
def test_copen_sizes(
    make_fake: Factory,
    size_text: bytes,
    write_errno: int | None,
    lookup_errno: int | None,
    size: int | None,
) -> None:
    fake = make_fake()
    job = start_lookup(fake)
    req = next_msg(fake)
    cmd = b"copen %d," % req.msg_id + size_text
    if write_errno is None:
        fake.write_command(cmd)
    else:
        expect_errno(write_errno, lambda: fake.write_command(cmd))
    if lookup_errno is None:
        assert job.result(5).size == size
    else:
        expect_errno(lookup_errno, lambda: job.result(5))


@pytest.mark.parametrize("id_form", ["%#x", "0%o", "+%d"])
def test_copen_id_bases(make_fake: Factory, id_form: str) -> None:
    fake = make_fake()
    for i in range(9):  # get msg ids past 8, where octal differs
        open_object(fake, b"filler%d" % i)
    job = start_lookup(fake, b"target")
    req = next_msg(fake)
    assert req.msg_id >= 9
    fake.write_command(b"copen " + (id_form % req.msg_id).encode() + b",4096")
    assert job.result(5).size == 4096


def test_copen_id_errors(make_fake: Factory) -> None:
    fake = make_fake()
    job = start_lookup(fake)
    wait_pending(fake, 1)
    [(unread_id, _, _)] = fake.pending()
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"copen %d,4096" % unread_id))
    req = next_msg(fake)
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"copen"))
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"copen %d" % req.msg_id))
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"copen -1,4096"))
    expect_errno(errno.EINVAL, lambda: fake.write_command(b"copen %d,4096" % (req.msg_id + 7)))
    fake.write_command(commands.encode_copen(req.msg_id, 4096))  # untouched by the failures
    job.result(5)
    expect_errno(errno.EINVAL, lambda: fake.write_command(commands.encode_copen(req.msg_id, 4096)))


def test_copen_after_the_fd_was_closed_fails_the_open_with_ebadfd(make_fake: Factory) -> None:
    fake = make_fake()
    job = start_lookup(fake)
    req = next_msg(fake)
    fake.close_fd(req.fd)
    fake.write_command(commands.encode_copen(req.msg_id, 4096))  # the write itself succeeds
    expect_errno(errno.EBADFD, lambda: job.result(5))


def test_object_ids_are_cyclic(make_fake: Factory) -> None:
    fake = make_fake()
    _, first = open_object(fake, b"a")
    fake.close_fd(first.fd)
    _, second = open_object(fake, b"b")
    assert (first.object_id, second.object_id) == (1, 2)


@pytest.mark.parametrize(("version", "expected"), [((6, 10), [0, 1, 2]), ((6, 9), [0, 0, 0])])
def test_msg_ids(make_fake: Factory, version: tuple[int, int], expected: list[int]) -> None:
    """Since 6.10 cyclic (a stale copen cannot hit a new request); before, the lowest
    free id was reused at once."""
    fake = make_fake(version)
    seen = []
    for name in (b"a", b"b", b"c"):
        _, req = open_object(fake, name)
        seen.append(req.msg_id)
    assert seen == expected


# -- READ and READ_COMPLETE -------------------------------------------------------------


def test_read_of_a_hole_asks_for_it_page_aligned(make_fake: Factory) -> None:
    """The READ covers the reader's range rounded out to pages."""
    fake = make_fake()
    handle, op = open_object(fake)
    job = Background(handle.read, PAGE_SIZE + 10, PAGE_SIZE, 5)
    req = next_msg(fake)
    assert isinstance(req, wire.ReadRequest)
    assert (req.object_id, req.offset, req.length) == (op.object_id, PAGE_SIZE, 2 * PAGE_SIZE)
    fill(fake, op.fd, req.offset, DATA[req.offset : req.offset + req.length])
    fake.read_complete(op.fd, req.msg_id)
    assert job.result(5) == DATA[PAGE_SIZE + 10 : 2 * PAGE_SIZE + 10]
    assert fake.reads_sent == 1
    assert handle.read(PAGE_SIZE, 50) == DATA[PAGE_SIZE : PAGE_SIZE + 50]
    assert fake.reads_sent == 1, "present data needs no READ"


def test_read_of_the_tail_is_clipped_to_the_cache_file(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    job = Background(handle.read, SIZE - 50, 1000, 5)
    req = next_msg(fake)
    assert isinstance(req, wire.ReadRequest)
    assert req.offset + req.length == round_up(SIZE, 4096)
    fill(fake, op.fd, req.offset, DATA[req.offset :])
    fake.read_complete(op.fd, req.msg_id)
    assert job.result(5) == DATA[SIZE - 50 :]
    assert handle.read(SIZE, 10) == b""


def test_only_the_hole_is_asked_for(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    fill(fake, op.fd, 2 * PAGE_SIZE, DATA[2 * PAGE_SIZE : 3 * PAGE_SIZE])
    assert serve_read(fake, op.fd, handle, 0, SIZE) == DATA
    assert fake.reads_sent == 2  # [0, 2 pages) and [3 pages, end)


def test_unfilled_read_is_eio_and_partial_fill_is_short(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    job = Background(handle.read, 0, 100, 5)
    req = next_msg(fake)
    fake.read_complete(op.fd, req.msg_id)
    expect_errno(errno.EIO, lambda: job.result(5))
    job = Background(handle.read, 0, 3 * PAGE_SIZE, 5)
    req = next_msg(fake)
    assert isinstance(req, wire.ReadRequest) and req.length >= 3 * PAGE_SIZE
    fill(fake, op.fd, 0, DATA[:PAGE_SIZE])  # only the first page
    fake.read_complete(op.fd, req.msg_id)
    rest = next_msg(fake)  # the read goes on from the hole with a new READ
    assert isinstance(rest, wire.ReadRequest) and rest.offset == PAGE_SIZE
    fake.read_complete(op.fd, rest.msg_id)  # unfilled: the read ends short
    assert job.result(5) == DATA[:PAGE_SIZE]


def test_read_complete_rules(make_fake: Factory) -> None:
    fake = make_fake()
    a, op_a = open_object(fake, b"a")
    b, op_b = open_object(fake, b"b")
    job = Background(a.read, 0, 10, 5)
    req = next_msg(fake)
    expect_errno(errno.EINVAL, lambda: fake.read_complete(op_a.fd, req.msg_id + 50))
    expect_errno(errno.EINVAL, lambda: fake.read_complete(op_b.fd, req.msg_id))
    other = start_lookup(fake, b"c")  # an OPEN: not a READ
    wait_pending(fake, 2)
    open_id = next(m for m, op, _ in fake.pending() if op == wire.OP_OPEN)
    expect_errno(errno.EINVAL, lambda: fake.read_complete(op_a.fd, open_id))
    r, w = os.pipe()
    expect_errno(errno.ENOTTY, lambda: fake.read_complete(r, req.msg_id))
    os.close(r)
    os.close(w)
    fill(fake, op_a.fd, 0, DATA[:SIZE])
    fake.read_complete(op_a.fd, req.msg_id)
    assert job.result(5) == DATA[:10]
    expect_errno(errno.EINVAL, lambda: fake.read_complete(op_a.fd, req.msg_id))
    opening = next_msg(fake)
    fake.write_command(commands.encode_copen(opening.msg_id, 4096))
    other.result(5)
    del b


def test_before_6_10_any_fd_completes_any_request(make_fake: Factory) -> None:
    fake = make_fake((6, 9))
    a, op_a = open_object(fake, b"a")
    _, op_b = open_object(fake, b"b")
    job = Background(a.read, 0, 10, 5)
    req = next_msg(fake)
    fill(fake, op_a.fd, 0, DATA)
    fake.read_complete(op_b.fd, req.msg_id)
    assert job.result(5) == DATA[:10]


def test_before_6_10_copen_erases_a_read(make_fake: Factory) -> None:
    fake = make_fake((6, 9))
    a, op = open_object(fake)
    job = Background(a.read, 0, 10, 5)
    req = next_msg(fake)
    fill(fake, op.fd, 0, DATA)
    fake.write_command(commands.encode_copen(req.msg_id, SIZE))
    assert job.result(5) == DATA[:10]


def test_copen_of_a_read_is_einval_since_6_10(make_fake: Factory) -> None:
    fake = make_fake()
    a, op = open_object(fake)
    job = Background(a.read, 0, 10, 5)
    req = next_msg(fake)
    expect_errno(errno.EINVAL, lambda: fake.write_command(commands.encode_copen(req.msg_id, SIZE)))
    fake.read_complete(op.fd, req.msg_id)
    expect_errno(errno.EIO, lambda: job.result(5))


# -- restore and re-open ------------------------------------------------------------------


def test_restore_redelivers_and_a_live_fd_refuses_the_open(make_fake: Factory) -> None:
    fake = make_fake()
    job = start_lookup(fake)
    first = next_msg(fake)
    assert fake.read_message() == b""
    fake.write_command(b"restore")
    assert fake.poll_mask() & select.POLLIN
    expect_errno(errno.EEXIST, fake.read_message)  # 6.10+: the old fd is still open
    expect_errno(errno.EEXIST, lambda: job.result(5))
    assert isinstance(first, wire.OpenRequest)
    fake.close_fd(first.fd)


def test_restore_redelivers_an_open_with_a_new_fd_before_6_10(make_fake: Factory) -> None:
    fake = make_fake((6, 9))
    job = start_lookup(fake)
    first = next_msg(fake)
    fake.write_command(b"restore")
    again = next_msg(fake)
    assert isinstance(first, wire.OpenRequest) and isinstance(again, wire.OpenRequest)
    assert again.msg_id == first.msg_id and again.fd != first.fd
    fake.write_command(commands.encode_copen(again.msg_id, 4096))
    job.result(5)


def test_restore_redelivers_a_read_and_the_first_completion_wins(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    job = Background(handle.read, 0, 10, 5)
    req = next_msg(fake)
    fake.write_command(b"restore")
    again = next_msg(fake)
    assert again == req
    fill(fake, op.fd, 0, DATA)
    fake.read_complete(op.fd, req.msg_id)
    expect_errno(errno.EINVAL, lambda: fake.read_complete(op.fd, again.msg_id))
    assert job.result(5) == DATA[:10]


def test_read_after_the_fd_was_closed_reopens_the_object(make_fake: Factory) -> None:
    """6.8+: the READ is held; a new OPEN (new object_id, new fd) comes first; after
    its copen the READ arrives carrying the new id."""
    fake = make_fake()
    handle, op = open_object(fake)
    fake.close_fd(op.fd)
    assert handle.object_id == -1
    job = Background(handle.read, 0, 10, 5)
    reopen = next_msg(fake)
    assert isinstance(reopen, wire.OpenRequest)
    assert reopen.object_id != op.object_id and reopen.cookie_key == b"blob"
    assert fake.read_message() == b"", "the READ waits for the re-open"
    fake.write_command(commands.encode_copen(reopen.msg_id, SIZE))
    req = next_msg(fake)
    assert isinstance(req, wire.ReadRequest) and req.object_id == reopen.object_id
    fill(fake, reopen.fd, 0, DATA)
    fake.read_complete(reopen.fd, req.msg_id)
    assert job.result(5) == DATA[:10]


def test_before_6_8_a_closed_fd_is_eio_for_good(make_fake: Factory) -> None:
    fake = make_fake((6, 7))
    handle, op = open_object(fake)
    job = Background(handle.read, 0, 10, 5)
    next_msg(fake)
    fake.close_fd(op.fd)  # fails the pending READ
    expect_errno(errno.EIO, lambda: job.result(5))
    expect_errno(errno.EIO, lambda: handle.read(0, 10, 5))
    assert fake.read_message() == b""


# -- CLOSE, commit, cache hits ----------------------------------------------------------


def test_withdraw_sends_close_then_commits(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    assert serve_read(fake, op.fd, handle, 0, SIZE) == DATA
    job = Background(handle.withdraw, 5)
    req = next_msg(fake)
    assert req == wire.CloseRequest(req.msg_id, op.object_id)
    job.result(5)
    assert handle.committed and handle.path.is_file()
    assert handle.path.stat().st_size == round_up(SIZE, 4096)
    assert handle.path.read_bytes()[:SIZE] == DATA
    aux = os.getxattr(handle.path, AUX_XATTR)
    assert AUX.unpack(aux)[0] == SIZE and AUX.unpack(aux)[2] == 1
    assert os.getxattr(handle.path.parent.parent, AUX_XATTR) == bytes(4)
    assert len(list(handle.path.parent.parent.iterdir())) == 256
    with AlignedBuffer(PAGE_SIZE) as buf:
        expect_errno(errno.ENOBUFS, lambda: fake.pwrite(op.fd, buf.view, 0))  # withdrawn
    expect_errno(errno.EIO, lambda: handle.read(0, 10))


def umount(fake: FakeCachefiles, handle: FakeObjectHandle, fd: int) -> wire.Request:
    """Withdraw while answering: read the CLOSE, wait for the commit, close the fd."""
    job = Background(handle.withdraw, 5)
    req = next_msg(fake)
    job.result(5)
    fake.close_fd(fd)
    return req


def test_cache_hit_needs_no_read_and_a_new_size_starts_afresh(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    serve_read(fake, op.fd, handle, 0, SIZE)
    umount(fake, handle, op.fd)
    first_ino = handle.path.stat().st_ino

    hit, op2 = open_object(fake)
    assert hit.committed and hit.path.stat().st_ino == first_ino
    reads_before = fake.reads_sent
    assert hit.read(0, SIZE) == DATA
    assert fake.reads_sent == reads_before, "a cache hit needs no READ"
    umount(fake, hit, op2.fd)

    stale, op3 = open_object(fake, size=SIZE + 1)
    assert not stale.committed and stale.path.stat().st_ino == first_ino, "stale file stays"
    job = Background(stale.read, 0, 10, 5)
    req = next_msg(fake)
    assert isinstance(req, wire.ReadRequest), "a size change discards the cached bytes"
    fake.read_complete(op3.fd, req.msg_id)
    expect_errno(errno.EIO, lambda: job.result(5))
    umount(fake, stale, op3.fd)
    assert stale.path.stat().st_ino != first_ino, "the commit replaced the stale file"
    assert AUX.unpack(os.getxattr(stale.path, AUX_XATTR))[0] == SIZE + 1


def test_spoiled_coherency_xattr_is_a_miss(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    serve_read(fake, op.fd, handle, 0, SIZE)
    umount(fake, handle, op.fd)
    job = start_lookup(fake)
    req = next_msg(fake)
    assert isinstance(req, wire.OpenRequest)
    # the file is in use from the lookup on: it cannot be culled, but its xattr can be
    # spoiled before copen (what the daemon does with files it cannot vouch for)
    os.setxattr(handle.path, AUX_XATTR, b"\xff" * AUX.size)
    fake.write_command(commands.encode_copen(req.msg_id, SIZE))
    again = job.result(5)
    assert not again.committed
    fake.close_fd(req.fd)


def test_lookup_of_an_acquired_cookie_is_ebusy(make_fake: Factory) -> None:
    fake = make_fake()
    open_object(fake)
    expect_errno(errno.EBUSY, lambda: fake.lookup(b"erofs,blob", b"blob", 1))


@pytest.mark.parametrize("version", [(6, 12), (6, 7)])
def test_close_is_not_sent_for_a_closed_object(
    make_fake: Factory, version: tuple[int, int]
) -> None:
    fake = make_fake(version)
    handle, op = open_object(fake)
    fake.close_fd(op.fd)
    handle.withdraw(5)  # no CLOSE to wait for
    assert fake.read_message() == b"" and handle.committed


def test_close_queued_before_the_fd_closes(make_fake: Factory) -> None:
    """Inference from 6.12's code: the header's object_id of a never-read request is
    0, so the fd release drops no CLOSE; it arrives carrying ID_CLOSED (-1)."""
    fake = make_fake()
    handle, op = open_object(fake)
    job = Background(handle.withdraw, 5)
    wait_pending(fake, 1)
    fake.close_fd(op.fd)
    req = next_msg(fake)
    assert req == wire.CloseRequest(req.msg_id, 0xFFFFFFFF)
    job.result(5)


def test_close_queued_before_the_fd_closes_keeps_its_id_before_6_8(
    make_fake: Factory,
) -> None:
    """Before 6.8 a CLOSE got its object_id when queued, and the fd release flushed
    READs only: the CLOSE still arrives, with the old id."""
    fake = make_fake((6, 7))
    handle, op = open_object(fake)
    job = Background(handle.withdraw, 5)
    wait_pending(fake, 1)
    fake.close_fd(op.fd)
    req = next_msg(fake)
    assert req == wire.CloseRequest(req.msg_id, op.object_id)
    job.result(5)


# -- poll ------------------------------------------------------------------------------


def test_pollin_follows_unread_requests(make_fake: Factory) -> None:
    fake = make_fake()
    assert fake.poll_mask() == 0
    handle, op = open_object(fake)
    assert fake.poll_mask() == 0
    job = Background(handle.read, 0, 10, 5)
    wait_pending(fake, 1)
    assert fake.poll_mask() == select.POLLIN
    req = next_msg(fake)
    assert fake.poll_mask() == 0, "6.8+: a read request no longer raises POLLIN"
    fake.read_complete(op.fd, req.msg_id)
    expect_errno(errno.EIO, lambda: job.result(5))


def test_pollin_stays_while_any_request_is_outstanding_before_6_8(make_fake: Factory) -> None:
    fake = make_fake((6, 7))
    handle, op = open_object(fake)
    job = Background(handle.read, 0, 10, 5)
    req = next_msg(fake)
    assert fake.poll_mask() == select.POLLIN and fake.read_message() == b""
    fake.read_complete(op.fd, req.msg_id)
    expect_errno(errno.EIO, lambda: job.result(5))
    assert fake.poll_mask() == 0


def test_pollout_means_culling_needed(make_fake: Factory) -> None:
    fake = make_fake()
    fake.set_space("cull")
    assert fake.poll_mask() == select.POLLOUT
    fake.set_space("stop")
    assert fake.poll_mask() == select.POLLOUT
    fake.set_space("ok")
    assert fake.poll_mask() == 0
    with pytest.raises(ValueError):
        fake.set_space("full")


# -- death ----------------------------------------------------------------------------


def test_close_fails_pending_requests_and_unbinds(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    fill(fake, op.fd, 0, DATA[:PAGE_SIZE])
    job = Background(handle.read, PAGE_SIZE, 10, 5)
    wait_pending(fake, 1)
    opening = start_lookup(fake, b"other")
    wait_pending(fake, 2)
    fake.close()
    expect_errno(errno.EIO, lambda: job.result(5))
    expect_errno(errno.EIO, lambda: opening.result(5))
    expect_errno(errno.EBADF, fake.read_message)
    expect_errno(errno.EBADF, lambda: fake.write_command(b"restore"))
    assert fake.fileno() == -1
    assert not handle.committed, "an anon fd still pins the cache"
    fake.close_fd(op.fd)
    assert handle.committed, "the last anon fd closed: objects withdrawn and committed"


def test_mark_dead_keeps_the_device_open(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    job = Background(handle.read, 0, 10, 5)
    req = next_msg(fake)
    fake.mark_dead()
    expect_errno(errno.EIO, lambda: job.result(5))
    assert fake.read_message() == b""
    expect_errno(errno.EIO, lambda: fake.write_command(b"restore"))
    expect_errno(errno.EINVAL, lambda: fake.read_complete(op.fd, req.msg_id))
    expect_errno(errno.EIO, lambda: fake.lookup(b"erofs,x", b"x", 1))


# -- cull and inuse ---------------------------------------------------------------------


def in_dir(path: Path, fake: FakeCachefiles, cmd: bytes) -> None:
    old = os.getcwd()
    os.chdir(path)
    try:
        fake.write_command(cmd)
    finally:
        os.chdir(old)


def test_inuse_and_cull(make_fake: Factory) -> None:
    fake = make_fake()
    handle, op = open_object(fake)
    serve_read(fake, op.fd, handle, 0, PAGE_SIZE)
    fan, name = handle.path.parent, handle.path.name.encode()
    umount(fake, handle, op.fd)
    in_dir(fan, fake, b"inuse " + name)  # not in use: success

    again, op2 = open_object(fake)
    expect_errno(errno.EBUSY, lambda: in_dir(fan, fake, b"inuse " + name))
    expect_errno(errno.EBUSY, lambda: in_dir(fan, fake, b"cull " + name))
    expect_errno(errno.EBUSY, lambda: in_dir(fan.parent, fake, b"cull " + fan.name.encode()))
    volume = fan.parent
    expect_errno(errno.EBUSY, lambda: in_dir(volume.parent, fake, b"cull " + volume.name.encode()))
    umount(fake, again, op2.fd)

    expect_errno(errno.ENOENT, lambda: in_dir(fan, fake, b"inuse Dabsent"))
    expect_errno(errno.EIO, lambda: in_dir(fan, fake, b"cull ."))
    expect_errno(errno.EIO, lambda: in_dir(fan, fake, b"cull " + b"D" * 256))
    in_dir(fan, fake, b"cull " + name)
    assert not handle.path.exists()
    assert list((fake.dir / "graveyard").iterdir()) == [], "files are unlinked"  # type: ignore[operator]

    stray = fan / "Dstray"
    stray.mkdir()
    in_dir(fan, fake, b"cull Dstray")
    assert not stray.exists()
    assert len(list((fake.dir / "graveyard").iterdir())) == 1, "directories are buried"  # type: ignore[operator]
