"""The fanotify session: what each pre-content event asks and how it is answered. Sans-IO.

Everything that decides what the daemon does with an event of its group lives here;
the driver (``driver.py``) reads the group, hands the bytes to :meth:`Session.receive`
and carries out the actions it returns (write a response, fill a range, close an fd),
reporting back what finished (:meth:`Session.filled`). Tested with byte tables and
random event sequences, without a kernel.

The kernel's rules it follows (``docs/protocol-fanotify.md``):

- **Every permission event is answered exactly once, by its fd number, and its fd is
  closed once, after the answer.** The kernel matches answers by fd number (trap 7):
  an fd closed before its answer could be reused by the next event and the answer
  would go to the wrong one. So :class:`Answer` carries both: write, then close.
- **The kernel knows nothing of presence** (trap 3): every backing read raises an
  event, present or not. The daemon's own bitmap decides (``present``, a callable on
  the image's handle the driver provides, in memory): a range whose every chunk is
  present is allowed at once, in the reading thread, without a fill.
- **A missing range is filled through the event's own fd** (it raises no event, trap
  4) by the engine, then allowed; a failed fill is denied with an errno
  (``FAN_DENY_ERRNO(EIO)`` where the kernel takes it, trap: through EROFS the reader
  gets EIO whatever the errno). Never allowed unfilled: that hands out zeros.
- **Events the daemon cannot place are denied**, never allowed: an fd of a file that
  is not one of the daemon's images (a mark left behind), an event without a range
  record, an image that is being taken down. Non-permission events with an fd only
  need their fd closed. A queue overflow (cannot happen with ``FAN_UNLIMITED_QUEUE``)
  means the kernel allowed accesses unanswered: reported as an error.
- **Malformed bytes**: the events decoded before the bad record, and the bad record's
  own fd when readable, are denied and closed (``wire.MalformedEvent``).
- **Several events on one range** (trap 8: permission events never merge) each get
  their own fill request; the engine's in-flight table makes all but one wait for the
  fetch of a chunk (``engine/fill.py``), so a chunk is fetched once.

Thread-safe: one lock, a leaf, held only inside these methods (``identify`` and
``present`` are called with it held and must not block or take locks that wait for
the session).
"""

from __future__ import annotations

import enum
import errno
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachefilesd_py.frontends.fanotify import wire

#: the driver's handle of an image's blob (its engine blob and size)
H = TypeVar("H")
#: how the driver names a file: (st_dev, st_ino) of the event's fd
Identity = Hashable


class Reason(enum.Enum):
    """Why an event was answered the way it was (for logs and counters)."""

    #: every chunk of the range is present by the daemon's bitmap
    PRESENT = "present"
    #: the range lies past the end of the image (a read past EOF: nothing to fill)
    PAST_END = "past_end"
    #: the missing chunks were filled
    FILLED = "filled"
    #: the fill failed (source error, deadline, write error)
    FILL_FAILED = "fill_failed"
    #: the fd's file is not an image of this daemon
    UNKNOWN_FILE = "unknown_file"
    #: a pre-content event without a range record
    NO_RANGE = "no_range"
    #: the image is being taken down
    CLOSING = "closing"
    #: the bytes of the read were malformed
    MALFORMED = "malformed"
    #: the driver stops: whatever is still unanswered
    SHUTDOWN = "shutdown"


# -- actions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """Write ``FAN_ALLOW`` (``allow``) or a deny with ``err`` for the event of ``fd``,
    then close ``fd``."""

    fd: int
    allow: bool
    reason: Reason
    err: int = 0


@dataclass(frozen=True, slots=True)
class Fill(Generic[H]):
    """Make ``[offset, offset+length)`` of ``image`` present through ``fd`` (the event's
    fd), then report :meth:`Session.filled` with ``ticket``."""

    ticket: int
    fd: int
    image: H
    offset: int
    length: int
    pid: int


@dataclass(frozen=True, slots=True)
class CloseFd:
    """Close ``fd`` (an event that needs no answer)."""

    fd: int


@dataclass(frozen=True, slots=True)
class Report:
    """Nothing to do but log ``event`` with ``fields`` at ``level``."""

    event: str
    level: str
    fields: tuple[tuple[str, object], ...]


Action = Answer | Fill[H] | CloseFd | Report


@dataclass(frozen=True)
class SessionCounts:
    events: int = 0
    allowed_present: int = 0
    allowed_past_end: int = 0
    fills: int = 0
    filled: int = 0
    fill_failed: int = 0
    denied_unknown: int = 0
    denied_no_range: int = 0
    denied_closing: int = 0
    malformed: int = 0
    overflows: int = 0


@dataclass(eq=False)
class _Image(Generic[H]):
    handle: H
    size: int
    closing: bool = False
    #: fills in flight for this image
    busy: int = 0


class Session(Generic[H]):
    """The images served and the events in flight; see the module docstring.

    ``present(handle, offset, length)`` answers from the daemon's bitmap whether every
    chunk of the range is present. ``deny_errno`` is what failed and refused events
    are denied with (EIO where the kernel takes ``FAN_DENY_ERRNO``, else EPERM)."""

    def __init__(
        self,
        present: Callable[[H, int, int], bool],
        *,
        deny_errno: int = errno.EIO,
    ) -> None:
        if deny_errno not in wire.DENY_ERRNOS:
            raise ValueError(f"the kernel does not take FAN_DENY_ERRNO({deny_errno})")
        self._present = present
        self.deny_errno = deny_errno
        self._lock = threading.Lock()
        self._images: dict[Identity, _Image[H]] = {}
        #: ticket -> (fd, identity) of a fill in flight
        self._fills: dict[int, tuple[int, Identity]] = {}
        self._next_ticket = 1
        self._counts = dict.fromkeys(SessionCounts.__dataclass_fields__, 0)

    # -- images ----------------------------------------------------------------------

    def add_image(self, identity: Identity, handle: H, size: int) -> None:
        """Serve events for the file ``identity`` (its fanotify mark is added after)."""
        with self._lock:
            if identity in self._images:
                raise ValueError(f"file {identity!r} is already served")
            self._images[identity] = _Image(handle, size)

    def close_image(self, identity: Identity) -> bool:
        """Deny new events of ``identity`` from now on; True when no fill of it is in
        flight any more (then :meth:`forget_image` may follow)."""
        with self._lock:
            img = self._images[identity]
            img.closing = True
            return img.busy == 0

    def forget_image(self, identity: Identity) -> H:
        with self._lock:
            img = self._images.pop(identity)
            if img.busy:
                self._images[identity] = img
                raise RuntimeError(f"file {identity!r} still has {img.busy} fills in flight")
            return img.handle

    def images(self) -> list[H]:
        with self._lock:
            return [img.handle for img in self._images.values()]

    # -- events ----------------------------------------------------------------------

    def receive(self, raw: bytes, identify: Callable[[int], Identity | None]) -> list[Action[H]]:
        """The bytes of one ``read()`` of the group. ``identify(fd)`` names the file an
        event's fd refers to (None if it cannot: then the event is denied)."""
        try:
            events = wire.decode_events(raw)
            bad: wire.MalformedEvent | None = None
        except wire.MalformedEvent as exc:
            events, bad = list(exc.events), exc
        with self._lock:
            actions: list[Action[H]] = []
            for event in events:
                self._on_event(event, identify, actions)
            if bad is not None:
                self._counts["malformed"] += 1
                actions.append(
                    _report(
                        "fanotify.malformed_event",
                        "error",
                        error=str(bad),
                        length=len(raw),
                        head=bytes(raw[bad.offset : bad.offset + 48]).hex(),
                    )
                )
                if bad.fd is not None:
                    actions.append(Answer(bad.fd, False, Reason.MALFORMED, self.deny_errno))
            return actions

    def _on_event(
        self,
        event: wire.Event,
        identify: Callable[[int], Identity | None],
        actions: list[Action[H]],
    ) -> None:
        self._counts["events"] += 1
        if event.is_overflow:
            self._counts["overflows"] += 1
            actions.append(
                _report(
                    "fanotify.queue_overflow",
                    "error",
                    note="the kernel dropped events and allowed their accesses",
                )
            )
            if event.fd >= 0:
                actions.append(CloseFd(event.fd))
            return
        if event.fd < 0:
            # no fd: nothing to answer or close (with FAN_REPORT_FD_ERROR the kernel
            # has denied the access itself)
            actions.append(_report("fanotify.event_without_fd", "warning", fd=event.fd))
            return
        if not event.needs_response:
            actions.append(CloseFd(event.fd))
            return
        ident = identify(event.fd)
        img = self._images.get(ident) if ident is not None else None
        if img is None:
            self._counts["denied_unknown"] += 1
            actions.append(
                _report("fanotify.unknown_file", "error", fd=event.fd, pid=event.pid, file=ident)
            )
            actions.append(Answer(event.fd, False, Reason.UNKNOWN_FILE, self.deny_errno))
            return
        if img.closing:
            self._counts["denied_closing"] += 1
            actions.append(Answer(event.fd, False, Reason.CLOSING, self.deny_errno))
            return
        rng = event.range
        if rng is None:
            self._counts["denied_no_range"] += 1
            actions.append(_report("fanotify.no_range", "error", fd=event.fd, pid=event.pid))
            actions.append(Answer(event.fd, False, Reason.NO_RANGE, self.deny_errno))
            return
        offset = rng.offset
        length = min(rng.end, img.size) - offset
        if length <= 0:
            self._counts["allowed_past_end"] += 1
            actions.append(Answer(event.fd, True, Reason.PAST_END))
            return
        if self._present(img.handle, offset, length):
            self._counts["allowed_present"] += 1
            actions.append(Answer(event.fd, True, Reason.PRESENT))
            return
        ticket = self._next_ticket
        self._next_ticket += 1
        self._fills[ticket] = (event.fd, ident)
        img.busy += 1
        self._counts["fills"] += 1
        actions.append(Fill(ticket, event.fd, img.handle, offset, length, event.pid))

    def filled(self, ticket: int, ok: bool) -> list[Action[H]]:
        """The fill of ``ticket`` finished: allow its event if every byte was made
        present, else deny it."""
        with self._lock:
            fd, ident = self._fills.pop(ticket)
            img = self._images.get(ident)
            if img is not None:
                img.busy -= 1
            if ok:
                self._counts["filled"] += 1
                return [Answer(fd, True, Reason.FILLED)]
            self._counts["fill_failed"] += 1
            return [Answer(fd, False, Reason.FILL_FAILED, self.deny_errno)]

    def in_flight(self) -> list[int]:
        """The fd numbers of events read and not answered yet (fills in flight): what
        a successor holding the group would have to answer (trap 7)."""
        with self._lock:
            return sorted(fd for fd, _ident in self._fills.values())

    def counts(self) -> SessionCounts:
        with self._lock:
            return SessionCounts(**self._counts)


def _report(event: str, level: str, **fields: object) -> Report:
    return Report(event, level, tuple(fields.items()))
