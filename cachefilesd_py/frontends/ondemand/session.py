"""The on-demand session: which kernel objects exist and what each request asks. Sans-IO.

Rule 1 (after h11's ``_state.py``): everything that decides what the daemon does with
a message from ``/dev/cachefiles`` lives here. Which object ids exist, which fd each
owns, which READ belongs to which object, what an OPEN for an id that still exists
replaces, when an fd may be closed and a blob released.

Rule 2: nothing here does I/O. :meth:`Session.receive` takes the bytes of one
``read()`` of the device and returns :class:`Action` values; the driver carries them
out (write ``copen``, fill and complete a READ, close an fd, release a blob) and
reports back what finished (:meth:`Session.opened`, :meth:`Session.copen_failed`,
:meth:`Session.served`), which returns further actions. The driver does nothing else
with the protocol, so these rules are tested with byte tables and random message
sequences, without a kernel.

The kernel's rules it follows (``docs/protocol-ondemand.md`` §2, §3 and §7):

- **OPEN** installs an fd in the reader. It is adopted at once (the driver's
  ``adopt`` wraps it in a holder that sets FD_CLOEXEC, §2.3); an fd that cannot be
  adopted gets ``copen -EBADF``. Every OPEN gets exactly one ``copen``: the blob's size
  once the driver has opened it, or a negative errno.
- **READ** needs a completion on an fd *of its object* (6.10 rule, §2.5), always, with
  or without data: a READ never completed hangs its reader. A READ for an object whose
  OPEN is still being answered waits for it (it cannot normally arrive: the kernel
  holds READs until ``copen``); a READ for an object whose OPEN failed, or that is
  closing, is completed without data (the reader gets EIO). A READ for an object id
  the session does not know cannot be completed at all (no fd of it exists here); it
  is reported, never guessed at.
- **CLOSE** has no reply. The object's fd is closed and its blob released only once no
  READ of it is being served any more, so an fd number is never closed under a fill
  (a recycled number would receive another blob's bytes, §3.3).
- **Object ids are reused** (§2.6). An OPEN for an id that is still in the table
  replaces the old object: the old one is released without committing, after its
  READs are served. This also covers a duplicate OPEN re-delivered by ``restore``
  (§7.3) on kernels that give it a second fd of the same object.
- After ``restore``, re-delivered OPENs arrive with new object ids, for blobs the
  session may already hold under another id; both objects are served, the engine
  shares the blob. READs re-delivered after it carry msg ids never seen here: msg ids
  are only echoed, never interpreted, so a duplicate is served again (the kernel keeps
  the first completion and answers EINVAL to the second).

Each piece of work the driver carries out has a *ticket* (a number unique in the
session), by which the driver reports it finished.

Thread-safe: one lock, held only inside these methods (a leaf: nothing else is taken
while it is held, ``adopt`` excepted, which must not block).
"""

from __future__ import annotations

import enum
import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.errors import KernelProtocolError
from cachefilesd_py.frontends.ondemand import wire

#: the driver's fd holder (``OwnedFd``; a plain number in tests)
F = TypeVar("F")
#: the driver's handle of an opened object (its blob, sink, cache path)
H = TypeVar("H")


# -- actions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenObject(Generic[F]):
    """Open the blob ``key`` (its source, identity and presence), then report
    :meth:`Session.opened` with a handle and the blob's size, or a negative errno."""

    ticket: int
    msg_id: int
    object_id: int
    key: BlobKey
    fd: F


@dataclass(frozen=True, slots=True)
class Copen:
    """Write ``copen <msg_id>,<value>``; if the write fails, report
    :meth:`Session.copen_failed` with ``ticket``."""

    ticket: int
    msg_id: int
    value: int
    #: the blob it opens (None when refused)
    key: BlobKey | None = None


@dataclass(frozen=True, slots=True)
class ServeRead(Generic[F, H]):
    """Make ``[offset, offset+length)`` present (only if ``fill``), then complete
    ``msg_id`` on ``fd`` whatever happened, then report :meth:`Session.served`."""

    ticket: int
    msg_id: int
    object_id: int
    fd: F
    handle: H | None
    offset: int
    length: int
    fill: bool
    #: why a READ is completed without data (None when ``fill``)
    why_not: str | None = None


@dataclass(frozen=True, slots=True)
class CloseFd(Generic[F]):
    """Close the object's fd (the session never names it again)."""

    object_id: int
    fd: F


class ReleaseWhy(enum.Enum):
    """Why an object is done; only after a CLOSE may its file be committed."""

    #: the kernel sent CLOSE: the blob's file may now be committed into the cache tree
    CLOSED = "closed"
    #: an OPEN for the same object id replaced it (no CLOSE came)
    REPLACED = "replaced"
    #: ``copen`` could not be written: the kernel never opened the object
    COPEN_FAILED = "copen_failed"
    #: the OPEN was refused (``copen`` with an errno): there is no blob to release
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Release(Generic[H]):
    """The object is done: save (and, when ``commit``, bind) its blob's presence and
    give back its use lease."""

    object_id: int
    handle: H
    why: ReleaseWhy

    @property
    def commit(self) -> bool:
        return self.why is ReleaseWhy.CLOSED


@dataclass(frozen=True, slots=True)
class Report:
    """Nothing to do but log: ``event`` with ``fields``."""

    event: str
    level: str
    fields: tuple[tuple[str, object], ...]


Action = OpenObject[F] | Copen | ServeRead[F, H] | CloseFd[F] | Release[H] | Report


# -- state -----------------------------------------------------------------------------


class ObjectState(enum.Enum):
    #: OPEN received, the driver is opening the blob
    OPENING = "opening"
    #: ``copen`` with the size sent: READs are served
    OPEN = "open"
    #: the OPEN was refused: READs are completed without data until it is finished
    REFUSED = "refused"


@dataclass(eq=False)
class _Object(Generic[F, H]):
    object_id: int
    key: BlobKey
    fd: F
    open_ticket: int
    msg_id: int
    state: ObjectState = ObjectState.OPENING
    handle: H | None = None
    #: no more READs will be filled: CLOSE came, it was replaced, or it failed
    closing: ReleaseWhy | None = None
    #: pieces of work in flight that use the fd (the open, READs being served)
    busy: int = 1
    #: READs that arrived while the OPEN was being answered
    held: list[tuple[int, int, int]] = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class SessionCounts:
    opens: int = 0
    reads: int = 0
    closes: int = 0
    malformed: int = 0
    unknown_reads: int = 0
    unknown_closes: int = 0
    replaced: int = 0


class Session(Generic[F, H]):
    """The object table of one device and the rules above; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[int, _Object[F, H]] = {}
        #: ticket -> the object whose work it is
        self._work: dict[int, _Object[F, H]] = {}
        self._next_ticket = 1
        self._counts = dict.fromkeys(SessionCounts.__dataclass_fields__, 0)

    # -- inputs from the device ------------------------------------------------------

    def receive(self, raw: bytes, adopt: Callable[[int], F]) -> list[Action[F, H]]:
        """One message, as one ``read()`` of the device returned it. ``adopt`` takes
        ownership of an OPEN's fd number (raises OSError if it cannot)."""
        try:
            req = wire.decode(raw)
        except KernelProtocolError as exc:
            with self._lock:
                self._counts["malformed"] += 1
            return [
                _report(
                    "kernel.malformed_message",
                    "error",
                    error=str(exc),
                    length=len(raw),
                    head=bytes(raw[:32]).hex(),
                )
            ]
        with self._lock:
            if isinstance(req, wire.OpenRequest):
                return self._on_open(req, adopt)
            if isinstance(req, wire.ReadRequest):
                return self._on_read(req)
            return self._on_close(req)

    def _on_open(self, req: wire.OpenRequest, adopt: Callable[[int], F]) -> list[Action[F, H]]:
        self._counts["opens"] += 1
        try:
            fd = adopt(req.fd)
        except OSError as exc:
            return [
                _report("open.bad_fd", "error", msg_id=req.msg_id, fd=req.fd, error=str(exc)),
                Copen(0, req.msg_id, -errno.EBADF),
            ]
        actions: list[Action[F, H]] = []
        stale = self._objects.get(req.object_id)
        if stale is not None:  # the id was recycled without a CLOSE reaching us
            self._counts["replaced"] += 1
            actions.append(
                _report(
                    "open.stale_object", "warning", object_id=req.object_id, blob=str(stale.key)
                )
            )
            self._close(stale, ReleaseWhy.REPLACED, actions)
        ticket = self._ticket()
        obj: _Object[F, H] = _Object(
            req.object_id, BlobKey.ondemand(req.volume_key, req.cookie_key), fd, ticket, req.msg_id
        )
        self._objects[req.object_id] = obj
        self._work[ticket] = obj
        actions.append(OpenObject(ticket, req.msg_id, req.object_id, obj.key, fd))
        return actions

    def _on_read(self, req: wire.ReadRequest) -> list[Action[F, H]]:
        self._counts["reads"] += 1
        obj = self._objects.get(req.object_id)
        if obj is None:
            # Without an fd of that object (6.10 rule) it cannot be completed; this
            # only happens if the kernel broke protocol or we lost track of an OPEN.
            self._counts["unknown_reads"] += 1
            return [
                _report(
                    "read.unknown_object",
                    "error",
                    msg_id=req.msg_id,
                    object_id=req.object_id,
                    offset=req.offset,
                    length=req.length,
                    reason="no such object (never opened, or closed)",
                )
            ]
        if obj.state is ObjectState.OPENING and obj.closing is None:
            obj.held.append((req.msg_id, req.offset, req.length))
            return []
        return [self._serve(obj, req.msg_id, req.offset, req.length)]

    def _on_close(self, req: wire.CloseRequest) -> list[Action[F, H]]:
        self._counts["closes"] += 1
        obj = self._objects.get(req.object_id)
        if obj is None:
            self._counts["unknown_closes"] += 1
            return [_report("close.unknown_object", "warning", object_id=req.object_id)]
        actions: list[Action[F, H]] = [
            _report("close", "info", blob=str(obj.key), object_id=req.object_id)
        ]
        self._close(obj, ReleaseWhy.CLOSED, actions)
        return actions

    # -- inputs from the driver ------------------------------------------------------

    def opened(self, ticket: int, handle: H | None, size_or_errno: int) -> list[Action[F, H]]:
        """The driver opened the blob of OPEN ``ticket`` (``handle``, and its size) or
        could not (``handle`` None, a negative errno)."""
        with self._lock:
            obj = self._work.pop(ticket)
            obj.busy -= 1
            ok = handle is not None and size_or_errno >= 0
            value = size_or_errno if ok else min(-1, size_or_errno)
            actions: list[Action[F, H]] = [
                Copen(ticket, obj.msg_id, value, obj.key if ok else None)
            ]
            if ok:
                obj.state, obj.handle = ObjectState.OPEN, handle
                self._work[ticket] = obj  # until the copen is known to be written
            else:
                obj.state = ObjectState.REFUSED
                if obj.closing is None:
                    obj.closing = ReleaseWhy.REFUSED
            held, obj.held = obj.held, []
            for msg_id, offset, length in held:
                actions.append(self._serve(obj, msg_id, offset, length))
            self._maybe_finish(obj, actions)
            return actions

    def copen_failed(self, ticket: int) -> list[Action[F, H]]:
        """The ``copen`` of ``ticket`` could not be written (the OPEN is gone: the cache
        died, or a duplicate after ``restore``): the kernel never opened the object."""
        with self._lock:
            obj = self._work.pop(ticket, None)
            if obj is None or obj.finished:
                return []
            actions: list[Action[F, H]] = []
            self._close(obj, ReleaseWhy.COPEN_FAILED, actions)
            return actions

    def copen_written(self, ticket: int) -> None:
        """The ``copen`` of ``ticket`` was written (forget the ticket)."""
        with self._lock:
            self._work.pop(ticket, None)

    def served(self, ticket: int) -> list[Action[F, H]]:
        """The READ of ``ticket`` was completed (with or without data)."""
        with self._lock:
            obj = self._work.pop(ticket)
            obj.busy -= 1
            actions: list[Action[F, H]] = []
            self._maybe_finish(obj, actions)
            return actions

    def close_all(self) -> list[Action[F, H]]:
        """At shutdown: close every fd still open (no release: the engine saves every
        blob's presence when it closes)."""
        with self._lock:
            actions: list[Action[F, H]] = []
            for obj in {id(o): o for o in (*self._objects.values(), *self._work.values())}.values():
                if not obj.finished:
                    obj.finished = True
                    actions.append(CloseFd(obj.object_id, obj.fd))
            self._objects.clear()
            self._work.clear()
            return actions

    # -- queries ---------------------------------------------------------------------

    def counts(self) -> SessionCounts:
        with self._lock:
            return SessionCounts(**self._counts)

    def handles(self) -> list[H]:
        """Handles of the objects currently open."""
        with self._lock:
            return [o.handle for o in self._objects.values() if o.handle is not None]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    # -- internals (lock held) -------------------------------------------------------

    def _ticket(self) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        return ticket

    def _serve(self, obj: _Object[F, H], msg_id: int, offset: int, length: int) -> ServeRead[F, H]:
        ticket = self._ticket()
        obj.busy += 1
        self._work[ticket] = obj
        fill = obj.state is ObjectState.OPEN and obj.closing is None
        why = None
        if not fill:
            why = "its OPEN was refused" if obj.state is ObjectState.REFUSED else "it is closing"
        return ServeRead(
            ticket, msg_id, obj.object_id, obj.fd, obj.handle, offset, length, fill, why
        )

    def _close(self, obj: _Object[F, H], why: ReleaseWhy, actions: list[Action[F, H]]) -> None:
        if self._objects.get(obj.object_id) is obj:
            del self._objects[obj.object_id]
        if obj.closing is None or (
            why is ReleaseWhy.COPEN_FAILED and obj.closing is ReleaseWhy.CLOSED
        ):
            obj.closing = why
        self._maybe_finish(obj, actions)

    def _maybe_finish(self, obj: _Object[F, H], actions: list[Action[F, H]]) -> None:
        if obj.finished or obj.closing is None or obj.busy > 0:
            return
        obj.finished = True
        if self._objects.get(obj.object_id) is obj:
            del self._objects[obj.object_id]
        actions.append(CloseFd(obj.object_id, obj.fd))
        if obj.handle is not None:
            actions.append(Release(obj.object_id, obj.handle, obj.closing))


def _report(event: str, level: str, **fields: object) -> Report:
    return Report(event, level, tuple(fields.items()))
