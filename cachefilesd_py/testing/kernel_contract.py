"""Kernel contract cases: the same expectations, run against the fake and the real kernel.

Each ``case_*`` function takes a :class:`KernelHarness` and checks one piece of the
on-demand protocol as the *kernel* implements it (not the daemon): the integration
tier runs them on :class:`~cachefilesd_py.testing.fake_kernel.FakeCachefiles`
(``FakeHarness``), the guest tier on the real 6.12 kernel with EROFS mounts. When both
pass, the fake is honest about what it models. :data:`CASES` lists them all.

A case drives the device itself with :class:`MiniDaemon`, a few lines of protocol
handling (OPEN → ``copen`` with the image size, READ → fill from the image and
READ_COMPLETE, CLOSE → note it) whose behaviour a case can override per request. It is
deliberately not the project's engine: these cases test the kernel side.

Blocking actions (a mount waits for the OPEN to be answered, a read for its READ, an
umount for its CLOSE to be read) run in background threads while the case serves the
device. Every wait is bounded; a case that runs out of time fails with a message.
Each case uses its own fsids, so a harness may run several cases on one cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import time
from collections.abc import Callable
from typing import Protocol

from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.kernel import commands
from cachefilesd_py.kernel.device import Device
from cachefilesd_py.kernel.dio import PAGE_SIZE, AlignedBuffer, pwrite_direct, round_up
from cachefilesd_py.testing.fake_kernel import Background

#: how long any single step may take (TCG-emulated guests are slow)
STEP_TIMEOUT = 60.0


class MountHandle(Protocol):
    def wait(self, timeout: float) -> int:
        """0 once mounted, or the errno the mount failed with (ETIMEDOUT: not yet)."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Read ``payload[offset:offset+length]`` through the mount (OSError on
        failure); blocks until the kernel has what it needs."""
        ...

    def umount(self) -> None: ...


class KernelHarness(Protocol):
    #: already bound in on-demand mode
    device: Device
    #: the primary blob's full bytes (an EROFS image on the real kernel)
    image: bytes
    #: where the payload's bytes sit in ``image``
    payload_offset: int
    payload: bytes

    def mount(self, fsid: str) -> MountHandle:
        """Start mounting ``fsid`` in the background (volume ``erofs,<fsid>``, cookie
        ``<fsid>``)."""
        ...


ReadHook = Callable[[wire.ReadRequest, int], None]
OpenHook = Callable[[wire.OpenRequest], None]


class MiniDaemon:
    """Minimal protocol handling for contract cases (see the module docstring)."""

    def __init__(self, h: KernelHarness) -> None:
        self.h = h
        #: object_id → anonymous fd, for every OPEN seen
        self.fds: dict[int, int] = {}
        #: every request read, in order
        self.seen: list[wire.Request] = []
        #: overrides the default answer to a READ; must complete it itself
        self.on_read: ReadHook | None = None
        #: overrides the default answer to an OPEN; must copen it itself
        self.on_open: OpenHook | None = None
        self._mounts: list[tuple[str, MountHandle]] = []
        self._unmounted: set[int] = set()

    # -- requests -----------------------------------------------------------------------

    def next_request(self, timeout: float = STEP_TIMEOUT) -> wire.Request:
        """The next request, recorded but not answered."""
        end = time.monotonic() + timeout
        while True:
            buf = self.h.device.read_message()
            if buf:
                req = wire.decode(buf)
                self.seen.append(req)
                if isinstance(req, wire.OpenRequest):
                    self.fds[req.object_id] = req.fd
                return req
            if time.monotonic() > end:
                raise AssertionError("no request from the kernel in time")
            select.select([self.h.device.fileno()], [], [], 0.05)

    def answer(self, req: wire.Request) -> None:
        """The default answer, or the case's hook."""
        if isinstance(req, wire.OpenRequest):
            if self.on_open is not None:
                self.on_open(req)
            else:
                self.h.device.write_command(commands.encode_copen(req.msg_id, len(self.h.image)))
        elif isinstance(req, wire.ReadRequest):
            fd = self.fds[req.object_id]
            if self.on_read is not None:
                self.on_read(req, fd)
            else:
                self.fill(req, fd)
                self.h.device.read_complete(fd, req.msg_id)

    def fill(self, req: wire.ReadRequest, fd: int) -> None:
        """Write the image's bytes for ``req`` through ``fd`` (page-aligned buffer,
        padded and clipped for direct I/O)."""
        end = min(len(self.h.image), req.offset + req.length)
        if end <= req.offset:
            return
        with AlignedBuffer(round_up(end - req.offset)) as buf:
            buf.view[: end - req.offset] = self.h.image[req.offset : end]
            pwrite_direct(
                self.h.device.pwrite,
                fd,
                buf,
                end - req.offset,
                req.offset,
                limit=len(self.h.image),
                object_may_be_settling=True,
            )

    def serve_until(
        self, done: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT
    ) -> list[wire.Request]:
        """Answer requests until ``done()``; returns the requests handled meanwhile."""
        start = len(self.seen)
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise AssertionError(f"timed out serving until {what}")
            buf = self.h.device.read_message()
            if not buf:
                select.select([self.h.device.fileno()], [], [], 0.02)
                continue
            req = wire.decode(buf)
            self.seen.append(req)
            if isinstance(req, wire.OpenRequest):
                self.fds[req.object_id] = req.fd
            self.answer(req)
        return self.seen[start:]

    def run(self, fn: Callable[[], object], what: str) -> list[wire.Request]:
        """Run a blocking call in the background while serving; re-raise its error."""
        job: Background[object] = Background(fn)
        handled = self.serve_until(job.done, what)
        job.result(0)
        return handled

    # -- mounts -------------------------------------------------------------------------

    def mount(self, fsid: str) -> MountHandle:
        """Mount and serve until the mount succeeded (AssertionError otherwise)."""
        m = self.start_mount(fsid)
        self.serve_until(lambda: m.wait(0) != errno.ETIMEDOUT, f"{fsid} is mounted")
        result = m.wait(0)
        assert result == 0, f"mount of {fsid} failed: {os.strerror(result)}"
        return m

    def start_mount(self, fsid: str) -> MountHandle:
        m = self.h.mount(fsid)
        self._mounts.append((fsid, m))
        return m

    def read(self, m: MountHandle, offset: int, length: int) -> bytes | int:
        """Read through a mount while serving: the bytes, or the errno it failed with."""
        job = Background(m.read, offset, length)
        self.serve_until(job.done, f"a read of {length} at {offset}")
        try:
            return job.result(0)
        except OSError as exc:
            return exc.errno or -1

    def umount(self, m: MountHandle) -> list[wire.Request]:
        self._unmounted.add(id(m))
        return self.run(m.umount, "umount")

    def finish(self) -> None:
        """Umount what is still mounted (serving its CLOSEs), close every anon fd."""
        for _fsid, m in self._mounts:
            if id(m) not in self._unmounted and m.wait(0) == 0:
                self.umount(m)
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                self.h.device.close_fd(fd)
        self.fds.clear()


def _payload_via(d: MiniDaemon, m: MountHandle) -> bytes:
    got = d.read(m, 0, len(d.h.payload))
    assert isinstance(got, bytes), f"payload read failed: {os.strerror(got)}"
    return got


def _expect_errno(call: Callable[[], object], expected: int, what: str) -> None:
    try:
        call()
    except OSError as exc:
        assert exc.errno == expected, (
            f"{what}: {errno.errorcode.get(exc.errno or 0)}, expected {errno.errorcode[expected]}"
        )
        return
    raise AssertionError(f"{what} succeeded, expected {errno.errorcode[expected]}")


# == the cases ===========================================================================


def case_open_message(h: KernelHarness) -> None:
    """OPEN carries volume ``erofs,<fsid>``, cookie ``<fsid>``, flags 0 and a valid fd
    that is not close-on-exec; ``copen`` with the image size lets the mount finish."""
    d = MiniDaemon(h)
    try:
        m = d.start_mount("open.img")
        req = d.next_request()
        assert isinstance(req, wire.OpenRequest), req
        assert req.volume_key == b"erofs,open.img", req.volume_key
        assert req.cookie_key == b"open.img", req.cookie_key
        assert req.flags == 0, req.flags
        os.fstat(req.fd)  # EBADF if the kernel did not install it
        assert not fcntl.fcntl(req.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "fd is CLOEXEC"
        d.answer(req)
        d.serve_until(lambda: m.wait(0) != errno.ETIMEDOUT, "mounted")
        assert m.wait(0) == 0
    finally:
        d.finish()


def case_copen_unknown_id_is_einval(h: KernelHarness) -> None:
    """``copen`` naming no pending OPEN fails with EINVAL and touches nothing: the
    real OPEN is still there to be answered."""
    d = MiniDaemon(h)
    try:
        m = d.start_mount("unknown-id.img")
        req = d.next_request()
        assert isinstance(req, wire.OpenRequest), req
        bogus = (req.msg_id + 1000) % commands.U32_LIMIT
        _expect_errno(
            lambda: h.device.write_command(commands.encode_copen(bogus, len(h.image))),
            errno.EINVAL,
            "copen of an unknown id",
        )
        d.answer(req)
        d.serve_until(lambda: m.wait(0) != errno.ETIMEDOUT, "mounted")
        assert m.wait(0) == 0
    finally:
        d.finish()


def case_refused_open_fails_the_mount(h: KernelHarness) -> None:
    """``copen <id>,-ENOENT`` succeeds as a write and fails the lookup. EROFS does not
    pass the errno on: 6.12 fails the mount with EIO, or with ENOBUFS when the
    superblock read finds no cache object (both seen, depending on timing)."""
    d = MiniDaemon(h)
    try:
        m = d.start_mount("refused.img")
        req = d.next_request()
        assert isinstance(req, wire.OpenRequest), req
        h.device.write_command(commands.encode_copen(req.msg_id, -errno.ENOENT))
        d.serve_until(lambda: m.wait(0) != errno.ETIMEDOUT, "the mount failed")
        got = m.wait(0)
        assert got in (errno.EIO, errno.ENOBUFS), f"mount ended with {os.strerror(got)}"
    finally:
        d.finish()


def case_serve_everything(h: KernelHarness) -> None:
    """Filling every READ from the image makes the payload read back identical."""
    d = MiniDaemon(h)
    try:
        m = d.mount("all.img")
        assert _payload_via(d, m) == h.payload
        assert any(isinstance(r, wire.ReadRequest) for r in d.seen), "no READ at all"
    finally:
        d.finish()


def case_unfilled_read_gives_eio(h: KernelHarness) -> None:
    """A READ completed without writing gives the reader EIO; the object stays usable:
    the same range read again is asked for again and served."""
    d = MiniDaemon(h)
    try:
        m = d.mount("eio.img")
        failed: list[int] = []

        def complete_empty(req: wire.ReadRequest, fd: int) -> None:
            failed.append(req.msg_id)
            h.device.read_complete(fd, req.msg_id)

        d.on_read = complete_empty
        got = d.read(m, 0, PAGE_SIZE)
        assert got == errno.EIO, f"unfilled READ gave {got!r}, expected EIO"
        assert failed, "no READ was sent for the read"
        d.on_read = None
        assert d.read(m, 0, PAGE_SIZE) == h.payload[:PAGE_SIZE]
    finally:
        d.finish()


def case_unaligned_pwrite_is_enobufs(h: KernelHarness) -> None:
    """A write through the anon fd at an offset that is not page aligned fails with
    ENOBUFS (a DIO misfit); an aligned one then succeeds."""
    d = MiniDaemon(h)
    try:
        m = d.mount("misfit.img")
        checked: list[bool] = []

        def misaligned_first(req: wire.ReadRequest, fd: int) -> None:
            if not checked:
                with AlignedBuffer(PAGE_SIZE) as buf:
                    _expect_errno(
                        lambda: h.device.pwrite(fd, buf.view, req.offset + 512),
                        errno.ENOBUFS,
                        "unaligned pwrite",
                    )
                checked.append(True)
            d.fill(req, fd)
            h.device.read_complete(fd, req.msg_id)

        d.on_read = misaligned_first
        assert _payload_via(d, m) == h.payload
        assert checked, "no READ came to check with"
    finally:
        d.finish()


def case_read_complete_unknown_id_is_einval(h: KernelHarness) -> None:
    """READ_COMPLETE of an id that is no pending request fails with EINVAL; the real
    READ is unaffected."""
    d = MiniDaemon(h)
    try:
        m = d.mount("cread.img")
        checked: list[bool] = []

        def bogus_first(req: wire.ReadRequest, fd: int) -> None:
            if not checked:
                bogus = (req.msg_id + 1000) % commands.U32_LIMIT
                _expect_errno(
                    lambda: h.device.read_complete(fd, bogus),
                    errno.EINVAL,
                    "READ_COMPLETE of an unknown id",
                )
                checked.append(True)
            d.fill(req, fd)
            h.device.read_complete(fd, req.msg_id)

        d.on_read = bogus_first
        assert _payload_via(d, m) == h.payload
        assert checked
    finally:
        d.finish()


def case_read_complete_needs_the_objects_fd(h: KernelHarness) -> None:
    """Since 6.10 a READ can be completed only through an fd of its own object:
    completing object A's READ through object B's fd fails with EINVAL."""
    d = MiniDaemon(h)
    try:
        a = d.mount("object-a.img")
        d.mount("object-b.img")
        opens = [r for r in d.seen if isinstance(r, wire.OpenRequest)]
        assert len(opens) == 2, opens
        fd_of = {r.cookie_key: r.fd for r in opens}
        checked: list[bool] = []

        def through_b_first(req: wire.ReadRequest, fd: int) -> None:
            assert fd == fd_of[b"object-a.img"], "READ for the wrong object"
            if not checked:
                _expect_errno(
                    lambda: h.device.read_complete(fd_of[b"object-b.img"], req.msg_id),
                    errno.EINVAL,
                    "READ_COMPLETE through another object's fd",
                )
                checked.append(True)
            d.fill(req, fd)
            h.device.read_complete(fd, req.msg_id)

        d.on_read = through_b_first
        assert _payload_via(d, a) == h.payload
        assert checked
    finally:
        d.finish()


def case_umount_sends_close_per_object(h: KernelHarness) -> None:
    """Each umount brings one CLOSE, carrying the id of the object that mount opened."""
    d = MiniDaemon(h)
    try:
        mounts = {fsid: d.mount(fsid) for fsid in ("close-a.img", "close-b.img")}
        ids = {r.cookie_key: r.object_id for r in d.seen if isinstance(r, wire.OpenRequest)}
        for fsid, m in mounts.items():
            handled = d.umount(m)
            closes = [r.object_id for r in handled if isinstance(r, wire.CloseRequest)]
            assert closes == [ids[fsid.encode()]], (fsid, closes, ids)
    finally:
        d.finish()


def case_second_mount_is_served_from_the_cache(h: KernelHarness) -> None:
    """What was filled before an umount is committed to the cache: mounting the same
    blob again (same ``copen`` size) and reading the same bytes sends no READ."""
    d = MiniDaemon(h)
    try:
        first = d.mount("again.img")
        assert _payload_via(d, first) == h.payload
        d.umount(first)
        d.finish()  # the first object's fd is closed, as a daemon does on CLOSE
        start = len(d.seen)
        second = d.mount("again.img")
        assert _payload_via(d, second) == h.payload
        reads = [r for r in d.seen[start:] if isinstance(r, wire.ReadRequest)]
        assert reads == [], f"READs for cached data: {reads}"
        assert any(isinstance(r, wire.OpenRequest) for r in d.seen[start:]), "no second OPEN"
    finally:
        d.finish()


def _die(d: MiniDaemon) -> None:
    """What a daemon process's death does to the kernel: every anonymous fd it held is
    closed (the device itself stays open: the harness, like a supervisor or systemd's
    fd store, still holds it). The objects go to their closed state."""
    for fd in d.fds.values():
        d.h.device.close_fd(fd)
    d.fds.clear()


def case_restore_after_daemon_death(h: KernelHarness) -> None:
    """A READ the dead daemon had read is not delivered again until ``restore``; after
    it, the object is re-opened first (an OPEN with a **new** object id and a new
    anonymous fd, same volume and cookie), then the READ comes again with its **old**
    msg id, and serving it completes the reader's read with the right bytes."""
    d = MiniDaemon(h)
    try:
        m = d.mount("restore.img")
        first = next(r for r in d.seen if isinstance(r, wire.OpenRequest))
        job = Background(m.read, 0, PAGE_SIZE)
        held = d.next_request()
        assert isinstance(held, wire.ReadRequest), held
        _die(d)
        # nothing is delivered again on its own
        time.sleep(0.5)
        assert d.h.device.read_message() == b"", "a request came back without restore"
        h.device.write_command(commands.encode_restore())
        reopen = d.next_request()
        assert isinstance(reopen, wire.OpenRequest), reopen
        assert (reopen.volume_key, reopen.cookie_key) == (first.volume_key, first.cookie_key)
        assert reopen.object_id != first.object_id, "the re-opened object kept its id"
        os.fstat(reopen.fd)
        d.answer(reopen)
        again = d.next_request()
        assert isinstance(again, wire.ReadRequest), again
        assert again.msg_id == held.msg_id, (again.msg_id, held.msg_id)
        assert again.object_id == reopen.object_id
        assert (again.offset, again.length) == (held.offset, held.length)
        d.answer(again)
        d.serve_until(job.done, "the held read completes")
        assert job.result(0) == h.payload[:PAGE_SIZE]
    finally:
        d.finish()


def case_restore_redelivers_an_unanswered_open(h: KernelHarness) -> None:
    """An OPEN the dead daemon read and never answered comes again after ``restore``,
    with the same msg id and a new object id and anonymous fd; answering it lets the
    mount finish."""
    d = MiniDaemon(h)
    try:
        m = d.start_mount("restore-open.img")
        req = d.next_request()
        assert isinstance(req, wire.OpenRequest), req
        _die(d)
        h.device.write_command(commands.encode_restore())
        again = d.next_request()
        assert isinstance(again, wire.OpenRequest), again
        assert again.msg_id == req.msg_id
        assert again.object_id != req.object_id
        d.answer(again)
        d.serve_until(lambda: m.wait(0) != errno.ETIMEDOUT, "mounted")
        assert m.wait(0) == 0
        assert _payload_via(d, m) == h.payload
    finally:
        d.finish()


def case_restore_with_nothing_pending_is_harmless(h: KernelHarness) -> None:
    """``restore`` on a cache with nothing outstanding succeeds and changes nothing (the
    daemon uses it to find out whether the kernel has it at all)."""
    d = MiniDaemon(h)
    try:
        m = d.mount("restore-idle.img")
        h.device.write_command(commands.encode_restore())
        assert d.h.device.read_message() == b""
        assert _payload_via(d, m) == h.payload
    finally:
        d.finish()


CASES: list[Callable[[KernelHarness], None]] = [
    case_open_message,
    case_copen_unknown_id_is_einval,
    case_refused_open_fails_the_mount,
    case_serve_everything,
    case_unfilled_read_gives_eio,
    case_unaligned_pwrite_is_enobufs,
    case_read_complete_unknown_id_is_einval,
    case_read_complete_needs_the_objects_fd,
    case_umount_sends_close_per_object,
    case_second_mount_is_served_from_the_cache,
    case_restore_after_daemon_death,
    case_restore_redelivers_an_unanswered_open,
    case_restore_with_nothing_pending_is_harmless,
]
