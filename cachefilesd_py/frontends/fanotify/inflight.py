"""The in-flight journal: which permission events a worker has read and not answered.

Why it exists (docs/protocol-fanotify.md, "Failover"; checked in the 7.3 source,
``fs/notify/fanotify/fanotify_user.c``): a ``read()`` of the group moves each
permission event from the group's queue to the group's ``access_list``, stamped with
the fd *number* the kernel installed in the reader. The event stays there until some
holder of the group writes a response with that number (``process_access_response``
takes the first event on the list whose number matches) or the group's last fd closes
(``fanotify_release`` allows every one: zeros). The reader's death changes nothing: its
fds close, the event stays, its accessing task sleeps. So whoever takes over from a dead
worker must know the numbers, ranges and files of the events it had read, and must
answer them **before** it reads an event of its own (a new event could get the same
number, and the first answer with that number goes to the older event).

The journal is a shared mapping (a memfd created by the supervisor, inherited by every
worker and kept in systemd's fd store): ``nslots`` slots, each

    header (16 bytes)   u8 in_use
    events (4096)       the bytes of one read(), written by the kernel itself
    side (170 x 24)     per event, in order: u64 st_dev, u64 st_ino, u8 identified,
                        u8 done

A worker marks a free slot in use, zeroes it and reads the group **into** it
(``kernel.fanotify.read_events_into``): the kernel has copied every event it hands over
before ``read()`` returns, so no kill can lose one. It then notes each event's file
(``fstat`` of its fd) and, after writing an event's answer and before closing its fd,
sets its ``done`` byte (one-byte stores: a kill never leaves half of one). A slot whose
events are all done is free again. A successor calls :meth:`InflightJournal.orphans`:
every event of an in-use slot that is a permission event, has an fd and is not done.
An orphan without a noted file (a kill between ``read()`` and ``fstat``, a few
microseconds) is served for every candidate file. An orphan answered but not marked
(a kill between the two) gets a second answer, which the kernel refuses with ENOENT:
harmless, since no other event of the dead worker can have had that number (it kept the
fd open until it died).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass

from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.kernel import fanotify
from cachefilesd_py.kernel.fd import OwnedFd

MAGIC = 0x43464A31  # "CFJ1"
HEADER = struct.Struct("<II B")  # magic, nslots, set_up
HEADER_SIZE = 4096
SLOT_HEADER = 16
EVENTS_SIZE = 4096
SIDE = struct.Struct("<QQBB6x")
MAX_EVENTS = EVENTS_SIZE // wire.METADATA.size
SLOT_SIZE = SLOT_HEADER + EVENTS_SIZE + MAX_EVENTS * SIDE.size
#: room for the fill scheduler's capacity (1024) plus the read being handled
DEFAULT_SLOTS = 1100
_EVENT_HEAD = struct.Struct("<I4xQi")  # event_len, mask, fd
_IDENTIFIED = 16
_DONE = 17
_ZEROS = bytes(SLOT_SIZE - 1)


@dataclass(frozen=True)
class Orphan:
    """A permission event a dead worker read and did not answer."""

    fd: int
    pid: int
    range: wire.FileRange | None
    #: (st_dev, st_ino) of its file, None if the worker died before noting it
    identity: tuple[int, int] | None


def _event_spans(area: bytes | memoryview) -> list[tuple[int, int]]:
    """(offset, length) of each whole event record in a slot's event area."""
    spans = []
    pos = 0
    while pos + wire.METADATA.size <= len(area):
        (length,) = struct.unpack_from("<I", area, pos)
        if length < wire.METADATA.size or pos + length > len(area):
            break
        spans.append((pos, length))
        pos += length
    return spans


class InflightJournal:
    """See the module docstring. The worker side is thread-safe."""

    def __init__(self, fd: OwnedFd, nslots: int) -> None:
        self.fd = fd
        self.nslots = nslots
        with fd.borrow() as n:
            self._mm = mmap.mmap(n, HEADER_SIZE + nslots * SLOT_SIZE, mmap.MAP_SHARED)
        self._lock = threading.Lock()
        self._free = [i for i in reversed(range(nslots)) if not self._in_use(i)]
        #: fd number -> (slot, event index) of events read and not done
        self._where: dict[int, tuple[int, int]] = {}
        self._outstanding = [0] * nslots

    @classmethod
    def create(cls, nslots: int = DEFAULT_SLOTS) -> InflightJournal:
        fd = OwnedFd(os.memfd_create("fanotify-inflight", os.MFD_CLOEXEC))
        with fd.borrow() as n:
            os.ftruncate(n, HEADER_SIZE + nslots * SLOT_SIZE)
            os.pwrite(n, HEADER.pack(MAGIC, nslots, 0), 0)
        return cls(fd, nslots)

    @classmethod
    def attach(cls, fd: OwnedFd) -> InflightJournal:
        """A journal made by :meth:`create` (inherited, or from the fd store); raises
        ValueError if ``fd`` is not one."""
        with fd.borrow() as n:
            head = os.pread(n, HEADER.size, 0)
            size = os.fstat(n).st_size
        if len(head) < HEADER.size:
            raise ValueError("not an in-flight journal: too short")
        magic, nslots, _ = HEADER.unpack(head)
        if magic != MAGIC or size != HEADER_SIZE + nslots * SLOT_SIZE:
            raise ValueError("not an in-flight journal")
        return cls(fd, nslots)

    def close(self) -> None:
        self._mm.close()

    # -- shared state ----------------------------------------------------------------

    @property
    def set_up(self) -> bool:
        """Whether a worker has started marking and mounting images with this group:
        a successor then adopts the mounts it finds instead of removing them."""
        return self._mm[HEADER.size - 1] == 1

    @set_up.setter
    def set_up(self, value: bool) -> None:
        self._mm[HEADER.size - 1] = 1 if value else 0

    def _base(self, slot: int) -> int:
        return HEADER_SIZE + slot * SLOT_SIZE

    def _in_use(self, slot: int) -> bool:
        return self._mm[self._base(slot)] == 1

    def _side(self, slot: int, index: int) -> int:
        return self._base(slot) + SLOT_HEADER + EVENTS_SIZE + index * SIDE.size

    # -- the worker's side -----------------------------------------------------------

    def has_room(self) -> bool:
        with self._lock:
            return bool(self._free)

    def read(self, group_fd: int) -> tuple[int, bytes] | None:
        """Read the group into a free slot: (slot, the bytes read), ``b""`` when there
        was nothing; None when no slot is free (answer some events first)."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        base = self._base(slot)
        self._mm[base + 1 : base + SLOT_SIZE] = _ZEROS
        self._mm[base] = 1
        area = memoryview(self._mm)[base + SLOT_HEADER : base + SLOT_HEADER + EVENTS_SIZE]
        try:
            n = fanotify.read_events_into(group_fd, area)
        except BaseException:
            area.release()
            self._release(slot)
            raise
        raw = bytes(area[:n])
        area.release()
        count = 0
        for index, (pos, _length) in enumerate(_event_spans(raw)):
            _len, _mask, fd = _EVENT_HEAD.unpack_from(raw, pos)
            if fd < 0:
                continue
            side = self._side(slot, index)
            try:
                st = os.fstat(fd)
                self._mm[side : side + 16] = struct.pack("<QQ", st.st_dev, st.st_ino)
                self._mm[side + _IDENTIFIED] = 1
            except OSError:
                pass
            with self._lock:
                self._where[fd] = (slot, index)
            count += 1
        with self._lock:
            self._outstanding[slot] += count
            empty = self._outstanding[slot] == 0
        if empty:
            self._release(slot)
        return slot, raw

    def done(self, fd: int) -> None:
        """The event with this fd number was answered (or needs no answer); called
        before its fd is closed."""
        with self._lock:
            where = self._where.pop(fd, None)
            if where is None:
                return
            slot, index = where
            self._mm[self._side(slot, index) + _DONE] = 1
            self._outstanding[slot] -= 1
            empty = self._outstanding[slot] == 0
        if empty:
            self._release(slot)

    def settle(self, slot: int, keep: set[int]) -> None:
        """After a read's events were handled: every event of ``slot`` whose fd is not
        in ``keep`` (fills in flight) is done (answered, closed, or never decoded)."""
        with self._lock:
            fds = [fd for fd, (s, _i) in self._where.items() if s == slot and fd not in keep]
        for fd in fds:
            self.done(fd)

    def _release(self, slot: int) -> None:
        self._mm[self._base(slot)] = 0
        with self._lock:
            self._outstanding[slot] = 0
            self._free.append(slot)

    # -- the successor's side --------------------------------------------------------

    def orphans(self) -> list[Orphan]:
        """Every permission event a dead worker read and did not mark done."""
        found = []
        for slot in range(self.nslots):
            if not self._in_use(slot):
                continue
            base = self._base(slot) + SLOT_HEADER
            area = bytes(self._mm[base : base + EVENTS_SIZE])
            for index, (pos, length) in enumerate(_event_spans(area)):
                try:
                    events = wire.decode_events(area[pos : pos + length])
                except wire.MalformedEvent as exc:
                    events = list(exc.events)
                    if not events and exc.fd is not None:  # still owed an answer
                        events = [wire.Event(wire.PERMISSION_EVENTS, exc.fd, 0)]
                if not events or not events[0].needs_response:
                    continue
                side = self._side(slot, index)
                dev, ino, identified, done = SIDE.unpack_from(self._mm, side)
                if done:
                    continue
                event = events[0]
                found.append(
                    Orphan(event.fd, event.pid, event.range, (dev, ino) if identified else None)
                )
        return found

    def clear(self) -> None:
        """Every slot free (after the successor answered the orphans)."""
        with self._lock:
            for slot in range(self.nslots):
                self._mm[self._base(slot)] = 0
            self._where.clear()
            self._outstanding = [0] * self.nslots
            self._free = list(reversed(range(self.nslots)))
