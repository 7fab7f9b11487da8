"""Kernel contract of fanotify pre-content events and EROFS file-backed mounts.

Each ``case_*`` function takes a :class:`PreContentHarness` and checks one thing the
*kernel* does (not the daemon) that the fanotify frontend relies on or must guard
against; docs/protocol-fanotify.md explains each. The guest tier runs them on the real
7.3 kernel (tests/vm/test_fanotify_contract_guest.py); a fake of the interface that the
frontend's tests use must pass the same cases, which keeps it honest. :data:`CASES`
lists them all.

A case serves the group itself with :class:`MiniServer`: read events, fill the event's
range from the image through the event's fd, answer ``FAN_ALLOW``, close the fd; a case
overrides that per event when it tests something else. It is deliberately not the
project's frontend: these cases test the kernel side.

Blocking calls (a mount waits for its superblock read to be answered, a read for its
event) run in background threads while the case serves the group. Every wait is
bounded; a case that runs out of time fails with a message. "Nothing happens" is
watched for :data:`QUIET` seconds. Each case returns what it measured (event counts,
errnos), which the guest tier records.
"""

from __future__ import annotations

import errno
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.frontends.fanotify.wire import Event, FileRange
from cachefilesd_py.kernel.fanotify import FAN_PRE_ACCESS, FAN_Q_OVERFLOW
from cachefilesd_py.testing.fake_kernel import Background

#: how long any single step may take (TCG-emulated guests are slow)
STEP_TIMEOUT = 60.0
#: how long "no event comes" / "the reader stays blocked" is watched
QUIET = 1.5
PAGE = 4096

Observations = dict[str, object]
T = TypeVar("T")


class Group(Protocol):
    """One ``FAN_CLASS_PRE_CONTENT`` group, non-blocking, as a daemon holds it."""

    def fileno(self) -> int: ...

    def mark(self, path: Path) -> None:
        """Add ``FAN_PRE_ACCESS`` to the inode mark of ``path``."""
        ...

    def unmark(self, path: Path) -> None: ...

    def ignore(self, path: Path) -> None:
        """Add ``FAN_PRE_ACCESS`` to the ignore mask of ``path`` (``FAN_MARK_IGNORE``)."""
        ...

    def read(self) -> bytes:
        """One ``read()``: whole events, ``b""`` if none is queued."""
        ...

    def queued_bytes(self) -> int:
        """The size of the events queued and not yet read (``FIONREAD``)."""
        ...

    def respond(self, record: bytes) -> None:
        """Write one encoded response (OSError with the kernel's errno)."""
        ...

    def pwrite(self, event_fd: int, data: bytes, offset: int) -> int:
        """Write through an event's fd."""
        ...

    def same_file(self, event_fd: int, path: Path) -> bool: ...

    def close_fd(self, event_fd: int) -> None: ...

    def close(self) -> None: ...


class Holder(Protocol):
    """The group held by another process too (it inherited the fd)."""

    def read_one(self, fd_number: int) -> Event:
        """Make the other process read one event and leave it unanswered; its lower
        fds are taken first, so the event's fd there is ``fd_number``."""
        ...

    def kill(self) -> None:
        """SIGKILL the other process and wait for it."""
        ...


class PreContentHarness(Protocol):
    #: an EROFS image holding one file, ``payload_name``, whose bytes are ``payload``
    image: bytes
    payload: bytes
    payload_name: str
    #: where the payload's bytes sit in ``image`` (page aligned)
    payload_offset: int
    #: the pid that events of :meth:`read_file` report
    reader_pid: int

    def backing_file(self, name: str, *, filled: bool = False) -> Path:
        """A new file of ``len(image)`` bytes on the cache filesystem (ext4 or xfs):
        all holes, or holding the whole image when ``filled`` (written before any
        mark exists)."""
        ...

    def group(self, *, queue_limit: int | None = None) -> Group:
        """A new group; ``queue_limit``: a queue of that many events instead of
        ``FAN_UNLIMITED_QUEUE``."""
        ...

    def read_file(self, path: Path, offset: int, length: int) -> bytes:
        """open, pread, close (blocks while an event is pending)."""
        ...

    def open_file(self, path: Path) -> Callable[[int, int], bytes]:
        """Open ``path`` now; the returned function preads through that open file."""
        ...

    def write_file(self, path: Path, data: bytes, offset: int) -> None:
        """open, pwrite, close (an ordinary writer, e.g. the daemon without event fd)."""
        ...

    def punch(self, path: Path, offset: int, length: int) -> None:
        """open, fallocate(PUNCH_HOLE | KEEP_SIZE), close."""
        ...

    def mount(self, backing: Path, *, by_fd: bool = False) -> Path:
        """Mount ``backing`` as EROFS (file-backed; ``by_fd``: the new mount API with
        the file given as an fd) and return the mount point. Blocks while the
        superblock read waits for its event."""
        ...

    def umount(self, mnt: Path) -> None: ...

    def holder(self, group: Group) -> Holder:
        """Start another process that holds ``group`` too."""
        ...

    def lowest_free_fd(self) -> int:
        """The fd number the next event read by this process will get."""
        ...


@dataclass
class MiniServer:
    """Minimal serving of one group (see the module docstring)."""

    h: PreContentHarness
    group: Group
    #: every event read, in order
    events: list[Event] = field(default_factory=list)
    #: ranges written through event fds
    fills: list[FileRange] = field(default_factory=list)
    #: overrides the default answer; must respond and close the fd itself
    on_event: Callable[[Event], None] | None = None
    #: the default answer fills the range before allowing it
    fill: bool = True

    def poll(self, timeout: float) -> list[Event]:
        """The events that arrive within ``timeout`` (at least one read is tried)."""
        end = time.monotonic() + timeout
        while True:
            raw = self.group.read()
            if raw:
                got = wire.decode_events(raw)
                self.events.extend(got)
                return got
            left = end - time.monotonic()
            if left <= 0:
                return []
            select.select([self.group.fileno()], [], [], min(left, 0.05))

    def wait_events(self, n: int, what: str, timeout: float = STEP_TIMEOUT) -> list[Event]:
        """Exactly the next ``n`` events, unanswered."""
        got: list[Event] = []
        end = time.monotonic() + timeout
        while len(got) < n:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(got)} of {n} events for {what} in time")
            got += self.poll(left)
        assert len(got) == n, f"{len(got)} events for {what}, expected {n}: {got}"
        return got

    def expect_quiet(self, what: str, duration: float = QUIET) -> None:
        got = self.poll(duration)
        assert not got, f"{what}: unexpected events {got}"

    def fill_from_image(self, ev: Event) -> None:
        assert ev.range is not None, ev
        end = min(ev.range.end, len(self.h.image))
        if end > ev.range.offset:
            data = self.h.image[ev.range.offset : end]
            assert self.group.pwrite(ev.fd, data, ev.range.offset) == len(data)
            self.fills.append(FileRange(ev.range.offset, end - ev.range.offset))

    def finish(self, ev: Event, record: bytes) -> None:
        """Answer ``ev`` and close its fd."""
        try:
            self.group.respond(record)
        finally:
            self.group.close_fd(ev.fd)

    def answer(self, ev: Event) -> None:
        if not ev.needs_response:
            return
        if self.on_event is not None:
            self.on_event(ev)
            return
        if self.fill:
            self.fill_from_image(ev)
        self.finish(ev, wire.allow(ev.fd))

    def serve_until(
        self, done: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT
    ) -> int:
        """Answer events until ``done()``; returns how many were handled."""
        n = 0
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise AssertionError(f"timed out serving until {what}")
            for ev in self.poll(0.02):
                self.answer(ev)
                n += 1
        return n

    def run(self, fn: Callable[[], T], what: str) -> T:
        """Run a blocking call in the background while serving; re-raise its error."""
        job: Background[T] = Background(fn)
        self.serve_until(job.done, what)
        return job.result(0)


def _errno_of(job: Background[bytes]) -> int | bytes:
    """The job's bytes, or the errno it failed with (waits for it)."""
    try:
        return job.result(STEP_TIMEOUT)
    except OSError as exc:
        return exc.errno or -1


def _still_blocked(job: Background[Any], duration: float = QUIET) -> bool:
    end = time.monotonic() + duration
    while time.monotonic() < end:
        if job.done():
            return False
        time.sleep(0.05)
    return True


def _marked(
    h: PreContentHarness, name: str, *, filled: bool = False, fill: bool = True
) -> tuple[Path, Group, MiniServer]:
    """A new backing file, a new group marking it, and a server of that group."""
    b = h.backing_file(name, filled=filled)
    g = h.group()
    g.mark(b)
    return b, g, MiniServer(h, g, fill=fill)


def _wait_queued(g: Group, n: int, what: str) -> None:
    """Until ``n`` pre-content events (48 bytes each) wait unread in the group."""
    end = time.monotonic() + STEP_TIMEOUT
    while g.queued_bytes() < n * (wire.METADATA.size + wire.RANGE_INFO.size):
        assert time.monotonic() < end, f"no event queued for {what}"
        time.sleep(0.02)


def _unfilled_page(fills: list[FileRange], size: int) -> int | None:
    """The offset of a page of ``[0, size)`` that no fill touched, if any."""
    for off in range(0, size - PAGE + 1, PAGE):
        if not any(f.offset < off + PAGE and f.end > off for f in fills):
            return off
    return None


def _payload(h: PreContentHarness, server: MiniServer, mnt: Path) -> bytes:
    return server.run(lambda: (mnt / h.payload_name).read_bytes(), "the payload is read")


# == the cases ===========================================================================


def case_read_of_a_hole_raises_one_event_with_its_range(h: PreContentHarness) -> Observations:
    """A read of a marked file raises one ``FAN_PRE_ACCESS`` event before it happens:
    its range is the pages the read touches (offset rounded down, end rounded up to
    4 KiB), its pid the reader's, its fd the same file; the reader sleeps until the
    answer; filling the range through the event's fd and allowing it gives the reader
    the filled bytes."""
    b, g, s = _marked(h, "range")
    try:
        reader = Background(h.read_file, b, 2 * PAGE + 100, PAGE)
        (ev,) = s.wait_events(1, "a 4 KiB read at 8 KiB + 100")
        assert ev.mask == FAN_PRE_ACCESS, hex(ev.mask)
        assert ev.range == FileRange(2 * PAGE, 2 * PAGE), ev.range
        assert ev.pid == h.reader_pid, (ev.pid, h.reader_pid)
        assert g.same_file(ev.fd, b), "the event's fd is another file"
        assert _still_blocked(reader), "the read did not wait for the answer"
        s.answer(ev)
        assert reader.result(STEP_TIMEOUT) == h.image[2 * PAGE + 100 : 3 * PAGE + 100]
        return {"read": [2 * PAGE + 100, PAGE], "range": [ev.range.offset, ev.range.count]}
    finally:
        g.close()


def case_filling_through_the_event_fd_raises_no_event(h: PreContentHarness) -> Observations:
    """Bytes written through the event's fd raise no event of their own (the kernel
    opened it without notifications), so the fill cannot recurse; but the kernel knows
    nothing of presence: reading the filled range again raises an event again."""
    b, g, s = _marked(h, "fill")
    try:
        reader = Background(h.read_file, b, 0, 4 * PAGE)
        (ev,) = s.wait_events(1, "a read of 16 KiB")
        s.fill_from_image(ev)
        s.expect_quiet("after a write through the event fd")
        s.finish(ev, wire.allow(ev.fd))
        assert reader.result(STEP_TIMEOUT) == h.image[: 4 * PAGE]
        again = Background(h.read_file, b, 0, 4 * PAGE)
        (ev2,) = s.wait_events(1, "a read of the now filled range")
        assert ev2.range == FileRange(0, 4 * PAGE), ev2.range
        s.finish(ev2, wire.allow(ev2.fd))
        assert again.result(STEP_TIMEOUT) == h.image[: 4 * PAGE]
        return {"events_for_present_range": 1}
    finally:
        g.close()


def _serve_erofs(h: PreContentHarness, *, by_fd: bool) -> Observations:
    b, g, s = _marked(h, "erofs-fd" if by_fd else "erofs")
    try:
        mnt = s.run(lambda: h.mount(b, by_fd=by_fd), "the mount")
        at_mount = len(s.events)
        assert at_mount >= 1, "mounting raised no event (was the mark in place?)"
        assert _payload(h, s, mnt) == h.payload
        ranges = [e.range for e in s.events]
        assert all(r is not None and r.offset < len(h.image) for r in ranges), ranges
        h.umount(mnt)
        return {
            "events_at_mount": at_mount,
            "events": len(s.events),
            "ranges": [[e.range.offset, e.range.count] for e in s.events if e.range],
            "fills": len(s.fills),
            "filled_bytes": sum(f.count for f in s.fills),
            "image_bytes": len(h.image),
        }
    finally:
        g.close()


def case_erofs_mount_of_a_marked_file_is_served_through_events(
    h: PreContentHarness,
) -> Observations:
    """``mount(2)`` of the marked sparse file as EROFS: every backing read of a missing
    range raises an event with its range, and serving them gives an identical file."""
    return _serve_erofs(h, by_fd=False)


def case_erofs_mount_by_fd_is_served_through_events(h: PreContentHarness) -> Observations:
    """The same with the new mount API, the source given as an open fd (opened after
    the mark, so its reads raise events)."""
    return _serve_erofs(h, by_fd=True)


def case_present_ranges_still_raise_an_event_per_backing_read(
    h: PreContentHarness,
) -> Observations:
    """A file holding the whole image still raises an event for every backing read:
    the daemon's own bitmap must answer each (here: allowed without filling)."""
    b, g, s = _marked(h, "present", filled=True, fill=False)
    try:
        mnt = s.run(lambda: h.mount(b), "the mount")
        assert _payload(h, s, mnt) == h.payload
        h.umount(mnt)
        assert s.events, "no event for a present file"
        return {"events": len(s.events)}
    finally:
        g.close()


def case_an_ignore_mark_silences_a_present_file(h: PreContentHarness) -> Observations:
    """``FAN_MARK_IGNORE`` of ``FAN_PRE_ACCESS`` on the marked file: no more events
    from it (also for a mount made after the ignore mark), the data reads as is."""
    b = h.backing_file("ignored", filled=True)
    g = h.group()
    g.mark(b)
    g.ignore(b)
    s = MiniServer(h, g, fill=False)
    try:
        mnt = s.run(lambda: h.mount(b), "the mount")
        assert _payload(h, s, mnt) == h.payload
        h.umount(mnt)
        assert s.events == [], f"events despite the ignore mark: {s.events}"
        return {"events": 0}
    finally:
        g.close()


def case_removing_the_mark_stops_the_events(h: PreContentHarness) -> Observations:
    """Removing the mark while EROFS is mounted: later backing reads raise no event
    (the reads of a fully present file then cost nothing), and a hole would read as
    zeros, so only a fully present file may lose its mark."""
    b, g, s = _marked(h, "unmarked")
    try:
        reader = h.open_file(b)  # opened while marked
        mnt = s.run(lambda: h.mount(b), "the mount")
        assert _payload(h, s, mnt) == h.payload
        before = len(s.events)
        g.unmark(b)
        h.umount(mnt)
        mnt = h.mount(b)  # served without any event now
        assert (mnt / h.payload_name).read_bytes() == h.payload
        s.expect_quiet("reads after the mark was removed")
        h.umount(mnt)
        hole = _unfilled_page(s.fills, len(h.image))
        seen: Observations = {"events_while_marked": before, "events_after": 0}
        if hole is not None:
            got = reader(hole, PAGE)
            s.expect_quiet("a read of a hole after the mark was removed")
            assert got == bytes(len(got)), "an unfilled page read as data"
            seen["hole_after_unmark"] = "zeros, no event"
        return seen
    finally:
        g.close()


def case_a_file_opened_before_the_mark_raises_nothing(h: PreContentHarness) -> Observations:
    """Whether an open file raises pre-content events is decided when it is opened: an
    fd opened before the mark reads holes as zeros without any event, and so does an
    EROFS mount made before the mark. The mark must come first."""
    b = h.backing_file("late-mark")
    early = h.open_file(b)
    g = h.group()
    g.mark(b)
    s = MiniServer(h, g)
    try:
        assert early(0, PAGE) == bytes(PAGE), "an early fd read something else than a hole"
        s.expect_quiet("a read through an fd opened before the mark")
        late = Background(h.read_file, b, 0, PAGE)
        (ev,) = s.wait_events(1, "a read through an fd opened after the mark")
        s.answer(ev)
        assert late.result(STEP_TIMEOUT) == h.image[:PAGE]
        # EROFS mounted before the mark: its backing file was opened unmarked
        g2 = h.group()
        mounted = h.backing_file("late-mark-erofs", filled=True)
        h.punch(mounted, h.payload_offset, len(h.payload))
        mnt = h.mount(mounted)
        g2.mark(mounted)
        s2 = MiniServer(h, g2)
        try:
            data = (mnt / h.payload_name).read_bytes()
            s2.expect_quiet("reads of an EROFS mount made before the mark")
            assert data == bytes(len(h.payload)), "expected the holes' zeros"
        finally:
            h.umount(mnt)
            g2.close()
        return {"erofs_read_zeros_unnoticed": True}
    finally:
        g.close()


def case_deny_errno_reaches_the_reader(h: PreContentHarness) -> Observations:
    """``FAN_DENY_ERRNO(e)`` fails the reader's call with ``e``, for each errno the
    kernel allows; through EROFS the reader of the mounted file gets the errno EROFS
    turns a failed backing read into."""
    b, g, s = _marked(h, "deny")
    seen: dict[str, object] = {}
    try:
        for err in sorted(wire.DENY_ERRNOS):
            reader = Background(h.read_file, b, 0, PAGE)
            (ev,) = s.wait_events(1, f"a read to deny with {errno.errorcode[err]}")
            s.finish(ev, wire.deny(ev.fd, err))
            got = _errno_of(reader)
            assert got == err, f"denied with {errno.errorcode[err]}, the reader got {got!r}"
            seen[errno.errorcode[err]] = errno.errorcode[err]
        # through EROFS: serve the metadata, deny the payload's data
        erofs_backing = h.backing_file("deny-erofs")
        g.mark(erofs_backing)
        mnt = s.run(lambda: h.mount(erofs_backing), "the mount")
        start, end = h.payload_offset, h.payload_offset + len(h.payload)

        def deny_payload(ev: Event) -> None:
            assert ev.range is not None
            if ev.range.offset < end and ev.range.end > start:
                s.finish(ev, wire.deny(ev.fd, errno.EAGAIN))
            else:
                s.fill_from_image(ev)
                s.finish(ev, wire.allow(ev.fd))

        s.on_event = deny_payload
        reader = Background(lambda: (mnt / h.payload_name).read_bytes())
        s.serve_until(reader.done, "the denied payload read")
        got_erofs = _errno_of(reader)
        assert isinstance(got_erofs, int), "the denied read returned data"
        s.on_event = None
        h.umount(mnt)
        seen["erofs_reader_gets"] = errno.errorcode.get(got_erofs, got_erofs)
        return seen
    finally:
        g.close()


def case_the_kernel_says_which_deny_errnos_it_takes(h: PreContentHarness) -> Observations:
    """A response with fd ``FAN_NOFD``, ``FAN_INFO`` and an audit-rule record answers
    no event but is checked like one: the kernel accepts ``FAN_DENY_ERRNO(e)`` exactly
    for the errnos of ``wire.DENY_ERRNOS`` and fails the write with EINVAL for every
    other errno, so a daemon can check its errnos at start-up."""
    g = h.group()
    try:
        accepted = []
        for err in range(1, 134):
            try:
                g.respond(wire.deny_errno_probe(err))
            except OSError as exc:
                assert exc.errno == errno.EINVAL, (err, exc)
            else:
                accepted.append(err)
        assert set(accepted) == wire.DENY_ERRNOS, [errno.errorcode[e] for e in accepted]
        return {"accepted": sorted(errno.errorcode[e] for e in accepted), "tried": "1..133"}
    finally:
        g.close()


def case_responses_the_kernel_refuses(h: PreContentHarness) -> Observations:
    """A deny with an errno outside the allowed set, an allow with an errno, and an
    answer for an fd with no pending event fail the ``write()`` (EINVAL, EINVAL,
    ENOENT) and leave the real event pending; it can still be answered."""
    b, g, s = _marked(h, "refused")
    try:
        reader = Background(h.read_file, b, 0, PAGE)
        (ev,) = s.wait_events(1, "a read")
        tries = {
            "deny_enoent": wire.encode_response(ev.fd, wire.FAN_DENY | errno.ENOENT << 24),
            "allow_with_errno": wire.encode_response(ev.fd, wire.FAN_ALLOW | errno.EIO << 24),
            "unknown_fd": wire.allow(ev.fd + 1000),
        }
        got: dict[str, object] = {}
        for name, record in tries.items():
            try:
                g.respond(record)
            except OSError as exc:
                got[name] = errno.errorcode.get(exc.errno or 0)
            else:
                got[name] = "accepted"
        assert got == {
            "deny_enoent": "EINVAL",
            "allow_with_errno": "EINVAL",
            "unknown_fd": "ENOENT",
        }, got
        assert _still_blocked(reader), "a refused response answered the event"
        s.answer(ev)
        assert reader.result(STEP_TIMEOUT) == h.image[:PAGE]
        return got
    finally:
        g.close()


def case_closing_the_group_fails_open(h: PreContentHarness) -> Observations:
    """Closing the group allows every pending event, read or still queued: readers of
    holes get zeros. Through EROFS, a file whose metadata was served before the group
    closed reads as zeros. The frontend must never let a mount outlive its group."""
    b, g, s = _marked(h, "fail-open")
    try:
        taken = Background(h.read_file, b, 0, PAGE)
        s.wait_events(1, "the first read")  # read, never answered
        queued = Background(h.read_file, b, 4 * PAGE, PAGE)
        _wait_queued(g, 1, "the second read")
    except BaseException:
        g.close()
        raise
    for ev in s.events:
        g.close_fd(ev.fd)
    g.close()
    assert taken.result(STEP_TIMEOUT) == bytes(PAGE), "the read event was not allowed"
    assert queued.result(STEP_TIMEOUT) == bytes(PAGE), "the queued event was not allowed"

    b2 = h.backing_file("fail-open-erofs")
    g2 = h.group()
    g2.mark(b2)
    s2 = MiniServer(h, g2)
    try:
        mnt = s2.run(lambda: h.mount(b2), "the mount")
        payload = mnt / h.payload_name
        s2.run(payload.stat, "the payload's inode is read")
    finally:
        g2.close()  # a mount left behind by a failure is the harness's to unmount
    outcome: object
    try:
        data = payload.read_bytes()
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno or 0)
    else:
        outcome = "zeros" if data == bytes(len(data)) else "data"
    finally:
        h.umount(mnt)
    assert outcome == "zeros", f"after the group closed, the payload read gave {outcome}"
    return {"direct_reads": "zeros", "erofs_payload_after_close": outcome}


def case_a_killed_holder_leaves_its_event_pending(h: PreContentHarness) -> Observations:
    """Another process holds the group too; the one that read an event is SIGKILLed
    before answering. Events it had not read stay queued and the survivor reads them;
    the event it had read is not re-queued: its reader stays blocked until an answer
    names the dead process's fd *number*. Answers match by number, so when the
    survivor's own event gets the same number, its first answer goes to the orphan
    (whose hole is then read as zeros) and only the second to its own event."""
    b, g, s = _marked(h, "holder")
    holder = None
    try:
        first = h.open_file(b)
        second = h.open_file(b)
        holder = h.holder(g)
        number = h.lowest_free_fd()  # what this process's next event fd will be
        orphaned = Background(first, 0, PAGE)
        ev = holder.read_one(number)
        assert ev.fd == number, (ev.fd, number)
        queued = Background(second, 8 * PAGE, PAGE)
        _wait_queued(g, 1, "the second read")
        holder.kill()
        holder = None
        assert _still_blocked(orphaned, 0.2), "the orphaned event was answered"
        (mine,) = s.wait_events(1, "the event the dead holder had not read")
        assert mine.range == FileRange(8 * PAGE, PAGE), mine.range
        assert mine.fd == number, f"the survivor's event fd is {mine.fd}, not {number}"
        s.expect_quiet("the orphaned event is not delivered again")
        s.fill_from_image(mine)
        g.respond(wire.allow(number))  # meant for the survivor's event ...
        got = orphaned.result(STEP_TIMEOUT)  # ... released the orphan, unfilled
        assert got == bytes(PAGE), "the orphan read something else than its hole"
        assert _still_blocked(queued), "the survivor's event was answered first"
        g.respond(wire.allow(number))
        g.close_fd(mine.fd)
        assert queued.result(STEP_TIMEOUT) == h.image[8 * PAGE : 9 * PAGE]
        return {
            "unread_events": "stay queued, read by the survivor",
            "read_unanswered": "pending until answered by fd number",
            "same_number_answer_went_to": "the orphan first",
        }
    finally:
        if holder is not None:
            holder.kill()
        g.close()


def case_punching_a_hole_while_mounted(h: PreContentHarness) -> Observations:
    """Punching a range of the marked file through an ordinary fd raises an event for
    the punched range (the punching task waits for the group: a daemon must not punch
    from the thread that answers). Afterwards the backing reads of that range raise
    events again, and allowing them unfilled gives the mount's reader zeros: the
    daemon's bitmap must forget a range before its hole is punched."""
    b, g, s = _marked(h, "punch", filled=True, fill=False)
    try:
        mnt = s.run(lambda: h.mount(b), "the mount")
        assert _payload(h, s, mnt) == h.payload
        before = len(s.events)
        puncher = Background(h.punch, b, h.payload_offset, len(h.payload))
        (ev,) = s.wait_events(1, "the punch")
        punch_range = ev.range
        assert punch_range is not None
        s.finish(ev, wire.allow(ev.fd))
        puncher.result(STEP_TIMEOUT)
        h.umount(mnt)  # drop EROFS's page cache of the payload
        mnt = s.run(lambda: h.mount(b), "the second mount")
        again = _payload(h, s, mnt)  # allowed, not filled
        h.umount(mnt)
        assert again == bytes(len(h.payload)), "a punched range read as something else"
        return {
            "punch_event_range": [punch_range.offset, punch_range.count],
            "punched": [h.payload_offset, len(h.payload)],
            "events_before_punch": before,
            "reread_allowed_unfilled": "zeros",
        }
    finally:
        g.close()


def case_several_events_on_one_range(h: PreContentHarness) -> Observations:
    """Concurrent reads of one missing range raise one event each (permission events
    are never merged), all with the same range and their own fds; one fill through any
    of them and an allow for each serves them all."""
    b, g, s = _marked(h, "concurrent")
    n = 4
    try:
        readers = [Background(h.read_file, b, 16 * PAGE, 2 * PAGE) for _ in range(n)]
        evs = s.wait_events(n, f"{n} concurrent reads")
        assert {e.range for e in evs} == {FileRange(16 * PAGE, 2 * PAGE)}, evs
        assert len({e.fd for e in evs}) == n, "events share an fd"
        s.fill_from_image(evs[0])
        for ev in evs:
            s.finish(ev, wire.allow(ev.fd))
        for r in readers:
            assert r.result(STEP_TIMEOUT) == h.image[16 * PAGE : 18 * PAGE]
        return {"events": n, "fills": 1}
    finally:
        g.close()


def case_a_full_bounded_queue_lets_reads_through(h: PreContentHarness) -> Observations:
    """With a bounded queue (no ``FAN_UNLIMITED_QUEUE``), events beyond the limit are
    dropped and their accesses *allowed*: the reads return the holes' zeros; the queue
    holds the limit's events plus one ``FAN_Q_OVERFLOW``."""
    limit, n = 2, 4
    b = h.backing_file("overflow")
    g = h.group(queue_limit=limit)
    g.mark(b)
    s = MiniServer(h, g)
    try:
        readers = [Background(h.read_file, b, i * 4 * PAGE, PAGE) for i in range(n)]
        end = time.monotonic() + STEP_TIMEOUT
        while sum(r.done() for r in readers) < n - limit:
            assert time.monotonic() < end, "no read got through the full queue"
            time.sleep(0.05)
        leaked = [r.result(0) for r in readers if r.done()]
        assert leaked == [bytes(PAGE)] * (n - limit), leaked
        got = s.poll(QUIET)
        perm = [e for e in got if e.mask & FAN_PRE_ACCESS]
        overflow = [e for e in got if e.mask & FAN_Q_OVERFLOW]
        assert len(perm) == limit and len(overflow) == 1, got
        for ev in perm:
            s.answer(ev)
        for r in readers:
            r.result(STEP_TIMEOUT)
        return {"limit": limit, "readers": n, "allowed_unanswered": n - limit}
    finally:
        g.close()


def case_an_ordinary_write_raises_an_event(h: PreContentHarness) -> Observations:
    """A write through an ordinary fd opened after the mark raises ``FAN_PRE_ACCESS``
    with the pages the write touches (the daemon's own writes must go through event
    fds)."""
    b, g, s = _marked(h, "write")
    try:
        writer = Background(h.write_file, b, b"x" * 100, 3 * PAGE + 7)
        (ev,) = s.wait_events(1, "a write")
        assert ev.range == FileRange(3 * PAGE, PAGE), ev.range
        s.finish(ev, wire.allow(ev.fd))
        writer.result(STEP_TIMEOUT)
        return {"write": [3 * PAGE + 7, 100], "range": [ev.range.offset, ev.range.count]}
    finally:
        g.close()


CASES: list[Callable[[PreContentHarness], Observations]] = [
    case_read_of_a_hole_raises_one_event_with_its_range,
    case_filling_through_the_event_fd_raises_no_event,
    case_erofs_mount_of_a_marked_file_is_served_through_events,
    case_erofs_mount_by_fd_is_served_through_events,
    case_present_ranges_still_raise_an_event_per_backing_read,
    case_an_ignore_mark_silences_a_present_file,
    case_removing_the_mark_stops_the_events,
    case_a_file_opened_before_the_mark_raises_nothing,
    case_deny_errno_reaches_the_reader,
    case_the_kernel_says_which_deny_errnos_it_takes,
    case_responses_the_kernel_refuses,
    case_closing_the_group_fails_open,
    case_a_killed_holder_leaves_its_event_pending,
    case_punching_a_hole_while_mounted,
    case_several_events_on_one_range,
    case_a_full_bounded_queue_lets_reads_through,
    case_an_ordinary_write_raises_an_event,
]

#: the cases worth repeating on a second cache filesystem (xfs)
CORE_CASES = [
    case_read_of_a_hole_raises_one_event_with_its_range,
    case_erofs_mount_of_a_marked_file_is_served_through_events,
    case_present_ranges_still_raise_an_event_per_backing_read,
]
