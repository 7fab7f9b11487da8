"""A userspace fake of ``/dev/cachefiles`` in on-demand mode, with Linux 6.12 semantics.

:class:`FakeCachefiles` implements the :class:`~cachefilesd_py.kernel.device.Device`
port byte for byte and errno for errno, backed by a real cache directory, so the
daemon's driver runs against it unchanged. The other side, what EROFS would do, is
driven by tests: :meth:`FakeCachefiles.lookup` acquires a cookie and returns a
:class:`FakeObjectHandle` to read through and to withdraw. Every rule below is restated
from the kernel sources (``daemon.c``, ``ondemand.c``, ``namei.c``, ``xattr.c``,
``io.c``) as ``docs/protocol-ondemand.md`` explains them; section numbers refer to that
file; behaviour marked *inference* was read from code, not observed. The same expectations
run against the real kernel through ``testing/kernel_contract.py``.

**Commands** (§1.2, §1.3; ``cachefiles_daemon_write``). A dead cache gives EIO; more
than PAGE_SIZE-1 bytes EOPNOTSUPP; a NUL EINVAL; everything from the first newline on
is dropped (a leading newline is EINVAL); the command word ends at the first C
whitespace, leading whitespace is EOPNOTSUPP, the arguments start after the following
whitespace and keep trailing spaces; an unknown word is EOPNOTSUPP (``copen`` and
``restore`` exist only with CONFIG_CACHEFILES_ONDEMAND, ``restore`` only since 6.8).
``dir``/``tag``: empty EINVAL, second EEXIST (``bind`` sets the default tag).
``secctx``: empty or second EINVAL, then the LSM's verdict (this fake has no LSM:
EOPNOTSUPP unless ``secctx_supported``). Thresholds: ``<digits>%`` exactly
(``simple_strtoul``, so ``%`` alone is 0), each checked against the current others.
``bind``: inconsistent thresholds ERANGE, no ``dir`` EINVAL, bound EBUSY, an argument
other than ``ondemand`` EINVAL, then the directory must exist (ENOENT/ENOTDIR) and
``cache/`` + ``graveyard/`` are created. ``cull``/``inuse``: a ``/`` EINVAL, unbound EIO,
``""``/``.``/``..``/over-long names EIO (the kernel's lookup fails with EACCES or
ENAMETOOLONG and reports "internal error"), absent ENOENT, in use EBUSY; ``cull``
unlinks a file and moves a directory into ``graveyard/`` (``cachefiles_bury_object``).

**copen** (§3.1). Id and size are parsed like ``kstrtoul``/``kstrtol`` (base auto:
``0x`` hex, leading ``0`` octal; EINVAL/ERANGE). Since 6.10 the id must name an OPEN
that was read, else EINVAL; before, any request with that id is erased (a READ is thus
completed). A bad size fails the OPEN and the write with the parse error; -4095..-1
fails the OPEN with that errno and the write succeeds; below -4095 both get EINVAL;
an anon fd closed before ``copen`` fails the OPEN with EBADFD. A successful ``copen``
opens the object: a committed file whose coherency xattr matches (18 bytes, type
DATA, the same object size, not DIRTY) is used as it is (a cache hit), otherwise a new
O_TMPFILE is created in the fan-out directory and truncated to ``round_up(size,
4096)``; a stale file stays in place until the commit replaces it.

**Messages** (§2.1, §2.6, §2.7, §7.3, §7.4). ``read_message`` returns one whole message or ``b""``.
Selection is round-robin over not-yet-read requests. Reading an OPEN installs a real
fd (``fd`` field) **without** FD_CLOEXEC; since 6.10 an OPEN for an object whose anon
fd is still open fails the read and the OPEN with EEXIST. ``object_id`` comes from a
cyclic allocator in 1..INT_MAX when an OPEN is read, and is written into each message
when it is read (6.8+). A CLOSE is completed by being read. ``msg_id`` is cyclic over
u32 since 6.10, lowest-free before. ``restore`` (6.8+) marks every request unread
again. POLLIN: some unread request that is not a READ held for a re-opening object
(before 6.8: any request at all). POLLOUT: "culling needed", set by
:meth:`FakeCachefiles.set_space`.

**Anonymous fds** (§3.2–§3.4). A real fd: a placeholder (``/dev/null``) until the
object has a file, then (``dup2``) the cache file itself, opened O_WRONLY|O_DIRECT when
the filesystem allows, so a misaligned buffer or length fails for real and
SEEK_DATA/SEEK_HOLE work on it as on the kernel's. :meth:`FakeCachefiles.pwrite`:
an unaligned offset, an object without file (before ``copen`` attached it, after
withdrawal) and space below *stop* give ENOBUFS; success returns the page-rounded
length (<= 6.12) or the byte count (6.13+). READ_COMPLETE: since 6.10 the id must be a
READ of this fd's object, else EINVAL; before, any id is erased. Closing an anon fd
(:meth:`close_fd`) closes its object: the object's id is freed;
since 6.8 not-yet-read CLOSEs carrying that id are dropped (*inference*: the header's
object_id of a never-read request is still 0, so in practice only re-delivered CLOSEs
match, and a CLOSE queued before the fd was closed arrives with object_id
0xFFFFFFFF) and a later READ starts the re-open flow (a new OPEN, new object_id, then
the held READ); before 6.8 the object's READs fail with EIO, now and later (a CLOSE
got its object_id when queued then, and still arrives).

**The filesystem side** (§2.5, §5.2). :meth:`FakeObjectHandle.read` reads the backing
file; where SEEK_DATA finds a hole at the (page-aligned) start it queues a READ for
the hole (up to the next data, page-rounded), waits, and checks once more: still a
hole gives EIO (or a short read if bytes were already read), data is read up to the
next hole and the read goes on from there, one READ per hole (as EROFS loops).
:meth:`FakeObjectHandle.withdraw` (umount) queues a CLOSE if the object is open and
waits until it is read, cancels the object's other requests with EIO, then
commits: a tmpfile gets the coherency xattr and is linked into
``cache/I<volume>/@xx/<name>`` (replacing a stale file).

**Death** (§7.1). :meth:`mark_dead` is ``cachefiles_io_error`` (the device stays open:
writes EIO, reads 0); :meth:`close` is closing the device. Both fail every pending
request with EIO. Anonymous fds stay the daemon's (process exit would close them):
:meth:`open_anon_fds` lists those not closed through ``close_fd``. Once the device is
closed and no anon fd is left, every object is withdrawn and committed (the unbind
pin-count reaching zero). Pwrites through a dead cache still land (*inference*: the
object keeps its file until withdrawal).

Not modelled: classic mode's state line (use ``fake_classic``), disk accounting (see
:meth:`set_space`), EMSGSIZE (the port always reads with a 4096-byte buffer), the
killable wait and the DROPPING race windows, shared domains (a second lookup of an
active cookie is EBUSY), ``lseek`` on an anon fd after withdrawal (the kernel says
ENOBUFS).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Final, Generic, TypeVar

from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.kernel import commands, layout
from cachefilesd_py.kernel.dio import PAGE_SIZE, round_down, round_up
from cachefilesd_py.testing.pattern import pattern_bytes

Version = tuple[int, int]

#: ``CACHEFILES_DIO_BLOCK_SIZE``: new cache files are sized in these
DIO_BLOCK: Final = 4096
AUX_XATTR: Final = "user.CacheFiles.cache"
#: ``struct cachefiles_xattr``: __be64 object_size, __be64 zero_point, u8 type, u8 content
AUX: Final = struct.Struct(">QQBB")
assert AUX.size == 18
COOKIE_TYPE_DATA: Final = 1
CONTENT_NO_DATA: Final = 0
CONTENT_DIRTY: Final = 4
#: ``struct cachefiles_vol_xattr`` without coherency data: __be32 reserved = 0
VOLUME_AUX: Final = bytes(4)
#: ``CACHEFILES_ONDEMAND_ID_CLOSED``
ID_CLOSED: Final = -1
INT_MAX: Final = 2**31 - 1
U32: Final = 2**32
U64: Final = 2**64
_C_SPACE: Final = b" \t\n\v\f\r"
_HEX: Final = b"0123456789abcdefABCDEF"


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {os.strerror(code)}")


# -- the kernel's number parsing (lib/kstrtox.c, lib/vsprintf.c) --------------------------


def _fixup_radix(s: bytes, base: int) -> tuple[bytes, int]:
    if base == 0:
        if s[:1] == b"0":
            base = 16 if s[1:2] in (b"x", b"X") and s[2:3] != b"" and s[2] in _HEX else 8
        else:
            base = 10
    if base == 16 and s[:2] in (b"0x", b"0X"):
        s = s[2:]
    return s, base


def _digits(s: bytes, base: int) -> tuple[int, int]:
    value = count = 0
    for ch in s:
        if 0x30 <= ch <= 0x39:
            digit = ch - 0x30
        elif 0x61 <= (ch | 0x20) <= 0x66:
            digit = (ch | 0x20) - 0x61 + 10
        else:
            break
        if digit >= base:
            break
        value = value * base + digit
        count += 1
    return value, count


def _kstrtoull_body(s: bytes, base: int) -> int:
    s, base = _fixup_radix(s, base)
    value, count = _digits(s, base)
    if count == 0:
        raise _err(errno.EINVAL, "not a number")
    if value >= U64:
        raise _err(errno.ERANGE, "number out of range")
    rest = s[count:]
    if rest not in (b"", b"\n"):
        raise _err(errno.EINVAL, "trailing characters")
    return value


def kstrtoull(s: bytes, base: int = 0) -> int:
    """``kstrtoull``/``kstrtoul`` (64-bit): optional ``+``, base auto, one trailing
    newline allowed; OSError EINVAL or ERANGE."""
    if s[:1] == b"+":
        s = s[1:]
    return _kstrtoull_body(s, base)


def kstrtoll(s: bytes, base: int = 0) -> int:
    """``kstrtoll``/``kstrtol`` (64-bit)."""
    if s[:1] == b"-":
        value = _kstrtoull_body(s[1:], base)
        if value > 2**63:
            raise _err(errno.ERANGE, "number out of range")
        return -value
    value = kstrtoull(s, base)
    if value > 2**63 - 1:
        raise _err(errno.ERANGE, "number out of range")
    return value


def simple_strtoul(s: bytes, base: int) -> tuple[int, bytes]:
    """``simple_strtoul``: the leading digits (none is 0) and the rest; never fails."""
    s, base = _fixup_radix(s, base)
    value, count = _digits(s, base)
    return value % U64, s[count:]


# -- a pollable fd with independent POLLIN and POLLOUT ----------------------------------


class _PollSignal:
    """One fd whose POLLIN and POLLOUT are set independently: the near end of a unix
    stream socket pair. POLLIN = a byte waiting to be received on it; POLLOUT = room
    in its send buffer, taken away by filling the far end until a send would block."""

    def __init__(self) -> None:
        self._near, self._far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (self._near, self._far):
            end.setblocking(False)
        self._near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # kernel minimum
        self._in = False
        self._out = True
        self.set(pollin=False, pollout=False)

    def fileno(self) -> int:
        return self._near.fileno()

    def set(self, *, pollin: bool, pollout: bool) -> None:
        if pollin != self._in:
            if pollin:
                self._far.send(b"!")
            else:
                self._drain(self._near)
            self._in = pollin
        if pollout != self._out:
            if pollout:
                self._drain(self._far)
            else:
                filler = bytes(4096)
                try:
                    while True:
                        self._near.send(filler)
                except BlockingIOError:
                    pass
            self._out = pollout

    @staticmethod
    def _drain(end: socket.socket) -> None:
        try:
            while end.recv(65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._near.close()
        self._far.close()


# -- kernel state -----------------------------------------------------------------------


class _State(Enum):
    """``enum cachefiles_object_state`` (6.8+)."""

    CLOSE = "close"
    OPEN = "open"
    REOPENING = "reopening"
    DROPPING = "dropping"


@dataclass(eq=False)
class _Object:
    """A cachefiles object with its on-demand info."""

    handle: FakeObjectHandle
    ondemand_id: int = 0
    state: _State = _State.CLOSE
    #: ``object->file``: the fake's own O_RDWR fd of the cache file, or None
    backing: int | None = None
    #: the file is an unlinked O_TMPFILE until the commit links it
    tmpfile: bool = False
    #: (st_dev, st_ino) of the file marked in use (S_KERNEL_FILE)
    in_use: tuple[int, int] | None = None
    attached: threading.Event = field(default_factory=threading.Event)
    attach_error: int = 0


@dataclass(eq=False)
class _Request:
    msg_id: int
    opcode: int
    obj: _Object
    offset: int = 0
    length: int = 0
    #: ``CACHEFILES_REQ_NEW``: not yet read
    new: bool = True
    #: the header's object_id field (0 until filled in)
    msg_object_id: int = 0
    error: int = 0
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _AnonFd:
    fd: int
    obj: _Object
    #: dup2'ed onto the cache file (else still the /dev/null placeholder)
    bound: bool
    #: (st_dev, st_ino) the number points at, to recognise it before closing it
    ident: tuple[int, int]


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class FakeObjectHandle:
    """The filesystem's side of one cache object (what a netfs cookie is to EROFS)."""

    def __init__(
        self, fake: FakeCachefiles, volume_key: bytes, cookie_key: bytes, path: Path
    ) -> None:
        self._fake = fake
        self.volume_key = volume_key
        self.cookie_key = cookie_key
        #: where the kernel commits the file (``cache/I<volume>/@xx/<name>``)
        self.path = path
        #: the object size from the accepted ``copen``
        self.size = 0
        self.withdrawn = False
        self._obj = _Object(self)

    @property
    def object_id(self) -> int:
        """The object's current id (0 before an OPEN was read, -1 once closed)."""
        return self._obj.ondemand_id

    @property
    def committed(self) -> bool:
        """Whether the object's file is linked into the cache tree."""
        return not self._obj.tmpfile and self.path.exists()

    def read(self, offset: int, length: int, timeout: float = 10.0) -> bytes:
        """Read like EROFS: holes become READ requests; EIO if still a hole after."""
        return self._fake._read(self, offset, length, timeout)

    def withdraw(self, timeout: float = 10.0) -> None:
        """Relinquish the cookie (umount): CLOSE, wait until read, commit."""
        self._fake._withdraw(self, timeout)

    def __repr__(self) -> str:
        return f"<FakeObjectHandle {self.volume_key!r}/{self.cookie_key!r} id={self.object_id}>"


#: kept for callers written against the first version of this module
FakeObject = FakeObjectHandle

T = TypeVar("T")


class Background(Generic[T]):
    """Run ``fn(*args)`` in a daemon thread; ``result(timeout)`` returns or re-raises."""

    def __init__(self, fn: Callable[..., T], *args: object) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., T], args: tuple[object, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> T:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("background call still running")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class FakeCachefiles:
    """The fake device. ``version`` gates behaviour that changed between kernels.

    ``ondemand_config``: CONFIG_CACHEFILES_ONDEMAND (else ``bind ondemand`` is EINVAL
    and ``copen``/``restore`` are unknown). ``attach_gate``: when given, an object
    gets its file after a successful ``copen`` only once this event is set (writes
    meanwhile: ENOBUFS, as on a real kernel that is still opening the file). ``direct_io``: open the
    anon fds' file with O_DIRECT where the filesystem allows it."""

    def __init__(
        self,
        version: Version = (6, 12),
        *,
        ondemand_config: bool = True,
        secctx_supported: bool = False,
        attach_gate: threading.Event | None = None,
        direct_io: bool = True,
    ) -> None:
        self.version = version
        self.ondemand_config = ondemand_config
        self.secctx_supported = secctx_supported
        self.attach_gate = attach_gate
        self.direct_io = direct_io
        self._lock = threading.RLock()
        self._poll: _PollSignal | None = _PollSignal()
        self._requests: dict[int, _Request] = {}
        self._msg_id_next = 0
        self._req_id_next = 0
        self._object_id_next = 1
        self._live_ids: dict[int, _Object] = {}
        self._anon: dict[int, _AnonFd] = {}
        self._active: dict[tuple[bytes, bytes], FakeObjectHandle] = {}
        self._volumes: set[Path] = set()
        self._graves = 0
        self._space = "ok"
        self.dir: Path | None = None  #: as given by ``dir`` (resolved at ``bind``)
        self.tag: str | None = None
        self.secctx: str | None = None
        self.debug_mask = 0
        self.thresholds = {"brun": 7, "bcull": 5, "bstop": 1, "frun": 7, "fcull": 5, "fstop": 1}
        self.bound = False
        self.ondemand = False
        self.dead = False
        self.closed = False
        #: every command written, as written
        self.commands: list[bytes] = []
        #: how many READ requests were queued
        self.reads_sent = 0

    # == the Device port ================================================================

    def fileno(self) -> int:
        return -1 if self._poll is None else self._poll.fileno()

    def read_message(self) -> bytes:
        with self._lock:
            self._check_open()
            if not (self.bound and self.ondemand):
                return b""
            req = self._select()
            if req is None:
                self._update_poll()
                return b""
            req.new = False
            self._req_id_next = req.msg_id + 1
            obj = req.obj
            fd = 0
            if req.opcode == wire.OP_OPEN:
                try:
                    fd = self._install_anon_fd(obj)
                except OSError as exc:
                    self._finish(req, -(exc.errno or errno.EIO))
                    self._update_poll()
                    raise
                req.msg_object_id = obj.ondemand_id
            elif self.version >= (6, 8):
                req.msg_object_id = obj.ondemand_id
            msg = self._encode(req, fd)
            if req.opcode == wire.OP_CLOSE:
                self._finish(req, 0)
            self._update_poll()
            return msg

    def write_command(self, cmd: bytes) -> None:
        cmd = bytes(cmd)
        self.commands.append(cmd)
        with self._lock:
            self._check_open()
            if self.dead:
                raise _err(errno.EIO, "cache is dead")
            if len(cmd) > PAGE_SIZE - 1:
                raise _err(errno.EOPNOTSUPP, "command too long")
            if b"\0" in cmd:
                raise _err(errno.EINVAL, "NUL in command")
            newline = cmd.find(b"\n")
            if newline == 0:
                raise _err(errno.EINVAL, "empty command")
            if newline > 0:
                cmd = cmd[:newline]
            split = next((i for i, ch in enumerate(cmd) if ch in _C_SPACE), None)
            if split is None:
                word, args = cmd, b""
            elif split == 0:
                raise _err(errno.EOPNOTSUPP, "leading whitespace")
            else:
                word, args = cmd[:split], cmd[split + 1 :].lstrip(_C_SPACE)
            handler = self._commands().get(word)
            if handler is None:
                raise _err(errno.EOPNOTSUPP, f"unknown command {word!r}")
            handler(args)

    def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        with self._lock:
            anon = self._anon.get(fd)
            if anon is None:
                raise _err(errno.EBADF, f"fd {fd} is not an anonymous fd of this fake")
            if anon.obj.backing is None or not anon.bound:
                raise _err(errno.ENOBUFS, "object has no cache file")
            if offset % PAGE_SIZE:
                raise _err(errno.ENOBUFS, "DIO misfit: unaligned offset")
            if self._space == "stop":
                raise _err(errno.ENOBUFS, "cache below its stop limits")
        written = os.pwrite(fd, buf, offset)
        if self.version >= (6, 13) or written < len(buf):
            return written
        return round_up(len(buf))

    def read_complete(self, fd: int, msg_id: int) -> None:
        if not 0 <= msg_id < U32:
            raise ValueError(f"msg_id out of range: {msg_id}")
        with self._lock:
            anon = self._anon.get(fd)
            if anon is None:
                os.fstat(fd)  # EBADF for a closed number
                raise _err(errno.ENOTTY, f"fd {fd} is not an anonymous fd")
            req = self._requests.get(msg_id)
            if self.version >= (6, 10):
                if req is None or req.opcode != wire.OP_READ or req.obj is not anon.obj:
                    raise _err(errno.EINVAL, f"no READ {msg_id} for this object")
            elif req is None:
                raise _err(errno.EINVAL, f"no request {msg_id}")
            self._finish(req, 0)
            self._update_poll()

    def close_fd(self, fd: int) -> None:
        with self._lock:
            anon = self._anon.pop(fd, None)
            os.close(fd)
            if anon is None:
                return
            self._release_object_fd(anon.obj)
            self._update_poll()
            self._maybe_unbind()

    def close(self) -> None:
        """Close the device: the cache dies, every pending request fails with EIO."""
        with self._lock:
            if self.closed:
                return
            self.mark_dead()
            self.closed = True
            if self._poll is not None:
                self._poll.close()
                self._poll = None
            self._maybe_unbind()

    # == test controls ==================================================================

    def mark_dead(self) -> None:
        """``cachefiles_io_error``: DEAD, every pending request fails with EIO; the
        device stays open (writes EIO, reads return nothing)."""
        with self._lock:
            self.dead = True
            for req in list(self._requests.values()):
                self._finish(req, -errno.EIO)
            self._update_poll()

    def set_space(self, state: str) -> None:
        """Disk space as the kernel sees it: ``"ok"``; ``"cull"`` (below *cull*:
        POLLOUT); ``"stop"`` (below *stop*: POLLOUT and pwrite ENOBUFS)."""
        if state not in ("ok", "cull", "stop"):
            raise ValueError(state)
        with self._lock:
            self._space = state
            self._update_poll()

    def poll_mask(self) -> int:
        """What ``poll()`` on the device reports now (POLLIN|POLLOUT bits)."""
        import select

        p = select.poll()
        p.register(self.fileno(), select.POLLIN | select.POLLOUT)
        events = p.poll(0)
        return events[0][1] if events else 0

    def pending(self) -> list[tuple[int, int, bool]]:
        """(msg_id, opcode, unread) of every request in the table."""
        with self._lock:
            return [(r.msg_id, r.opcode, r.new) for r in self._requests.values()]

    def open_anon_fds(self) -> list[int]:
        """Anonymous fds handed out and not closed through ``close_fd``."""
        with self._lock:
            return sorted(self._anon)

    def close_leftover_fds(self) -> int:
        """Close the anon fds the daemon left open (test teardown); numbers that no
        longer point where the fake put them are left alone. Returns how many."""
        closed = 0
        with self._lock:
            for fd, anon in list(self._anon.items()):
                try:
                    same = _ident(os.fstat(fd)) == anon.ident
                except OSError:
                    same = False
                if same:
                    self.close_fd(fd)
                    closed += 1
                else:
                    del self._anon[fd]
        return closed

    def lookup(
        self, volume_key: bytes, cookie_key: bytes, timeout: float = 10.0
    ) -> FakeObjectHandle:
        """Acquire a cookie, as a mount does: queue an OPEN and wait for ``copen``.
        Raises OSError with the OPEN's errno (or ENOBUFS without an on-demand cache)."""
        with self._lock:
            if self.closed or self.dead:
                raise _err(errno.EIO, "cache is dead")
            if not (self.bound and self.ondemand) or self.dir is None:
                raise _err(errno.ENOBUFS, "no on-demand cache bound")
            key = (volume_key, cookie_key)
            if key in self._active:
                raise _err(errno.EBUSY, "cookie already acquired")
            try:
                path = layout.object_path(self.dir, volume_key, cookie_key)
            except ValueError as exc:
                raise _err(errno.EINVAL, str(exc)) from None
            self._ensure_volume(path.parent.parent)
            handle = FakeObjectHandle(self, volume_key, cookie_key, path)
            obj = handle._obj
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISREG(st.st_mode):
                    obj.in_use = _ident(st)
            self._active[key] = handle
            req = self._queue(wire.OP_OPEN, obj)
        try:
            if not req.done.wait(timeout):
                self._abandon(req)
                raise TimeoutError("OPEN not answered")
            if req.error:
                raise _err(-req.error, "OPEN failed")
            if not obj.attached.wait(timeout):
                raise TimeoutError("object file not attached")
            if obj.attach_error:
                raise _err(obj.attach_error, "object file")
        except BaseException:
            with self._lock:
                obj.in_use = None
                self._active.pop(key, None)
                handle.withdrawn = True
            raise
        return handle

    # == commands =======================================================================

    def _commands(self) -> dict[bytes, Callable[[bytes], None]]:
        table: dict[bytes, Callable[[bytes], None]] = {
            b"bind": self._cmd_bind,
            b"cull": lambda a: self._cull_or_inuse(a, cull=True),
            b"debug": self._cmd_debug,
            b"dir": self._cmd_dir,
            b"inuse": lambda a: self._cull_or_inuse(a, cull=False),
            b"secctx": self._cmd_secctx,
            b"tag": self._cmd_tag,
        }
        for name in self.thresholds:
            table[name.encode()] = functools.partial(self._cmd_threshold, name)
        if self.ondemand_config:
            table[b"copen"] = self._cmd_copen
            if self.version >= (6, 8):
                table[b"restore"] = self._cmd_restore
        return table

    def _cmd_dir(self, args: bytes) -> None:
        if not args:
            raise _err(errno.EINVAL, "Empty directory specified")
        if self.dir is not None:
            raise _err(errno.EEXIST, "Second cache directory specified")
        self.dir = Path(os.fsdecode(args))

    def _cmd_tag(self, args: bytes) -> None:
        if not args:
            raise _err(errno.EINVAL, "Empty tag specified")
        if self.tag is not None:
            raise _err(errno.EEXIST, "Second tag specified")
        self.tag = os.fsdecode(args)

    def _cmd_secctx(self, args: bytes) -> None:
        if not args:
            raise _err(errno.EINVAL, "Empty security context specified")
        if self.secctx is not None:
            raise _err(errno.EINVAL, "Second security context specified")
        if not self.secctx_supported:
            raise _err(errno.EOPNOTSUPP, "no LSM converts security contexts")
        self.secctx = os.fsdecode(args)

    def _cmd_debug(self, args: bytes) -> None:
        mask, rest = simple_strtoul(args, 0)
        if rest:
            raise _err(errno.EINVAL, "debug command requires mask")
        self.debug_mask = mask

    def _cmd_threshold(self, name: str, args: bytes) -> None:
        if not args:
            raise _err(errno.EINVAL, f"{name} needs a value")
        value, rest = simple_strtoul(args, 10)
        if rest != b"%":
            raise _err(errno.EINVAL, f"{name} needs <N>%")
        t = self.thresholds
        kind = name[0]
        run, cull, stop = t[kind + "run"], t[kind + "cull"], t[kind + "stop"]
        bad = {
            "run": value <= cull or value >= 100,
            "cull": value <= stop or value >= run,
            "stop": value >= cull,
        }[name[1:]]
        if bad:
            raise _err(errno.EINVAL, "Free space limits must be in range 0%<=stop<cull<run<100%")
        t[name] = value

    def _cmd_bind(self, args: bytes) -> None:
        t = self.thresholds
        for kind in "fb":
            if not t[kind + "stop"] < t[kind + "cull"] < t[kind + "run"] < 100:
                raise _err(errno.ERANGE, "thresholds out of order")
        if self.dir is None:
            raise _err(errno.EINVAL, "No cache directory specified")
        if self.bound:
            raise _err(errno.EBUSY, "Cache already bound")
        if args == b"ondemand" and self.ondemand_config:
            ondemand = True
        elif args:
            raise _err(errno.EINVAL, "Invalid argument to the 'bind' command")
        else:
            ondemand = False
        if self.tag is None:
            self.tag = "CacheFiles"
        root = Path(os.path.abspath(self.dir))
        st = os.stat(root)  # ENOENT and friends, as the kernel's path lookup
        if not stat.S_ISDIR(st.st_mode):
            raise _err(errno.ENOTDIR, str(root))
        (root / "cache").mkdir(mode=0o700, exist_ok=True)
        (root / "graveyard").mkdir(mode=0o700, exist_ok=True)
        self.dir = root
        self.bound, self.ondemand = True, ondemand

    def _cmd_copen(self, args: bytes) -> None:
        if not self.ondemand:
            raise _err(errno.EOPNOTSUPP, "not in on-demand mode")
        if not args:
            raise _err(errno.EINVAL, "Empty id specified")
        id_text, comma, size_text = args.partition(b",")
        if not comma:
            raise _err(errno.EINVAL, "Cache size is not specified")
        msg_id = kstrtoull(id_text)
        req = self._requests.get(msg_id)
        if self.version >= (6, 10):
            if req is None or req.opcode != wire.OP_OPEN or req.obj.ondemand_id == 0:
                raise _err(errno.EINVAL, f"no OPEN {msg_id} was read")
        elif req is None:
            raise _err(errno.EINVAL, f"no request {msg_id}")
        del self._requests[msg_id]
        obj = req.obj
        try:
            size = kstrtoll(size_text)
        except OSError as exc:
            self._copen_out(req, -(exc.errno or errno.EINVAL))
            raise
        if size < 0:
            if size < -commands.MAX_ERRNO:
                self._copen_out(req, -errno.EINVAL)
                raise _err(errno.EINVAL, "copen errno out of range")
            self._copen_out(req, size)
            return
        if obj.ondemand_id == ID_CLOSED:
            self._copen_out(req, -errno.EBADFD)
            return
        if req.opcode == wire.OP_OPEN:
            obj.handle.size = size
        obj.state = _State.OPEN
        if obj.backing is None:
            if self.attach_gate is not None:
                gate = self.attach_gate
                threading.Thread(target=self._attach_after, args=(gate, obj), daemon=True).start()
            else:
                self._attach(obj)
        else:
            self._bind_anon_fds(obj)
            obj.attached.set()
        self._copen_out(req, 0)

    def _copen_out(self, req: _Request, error: int) -> None:
        if req.obj.ondemand_id == ID_CLOSED:
            req.obj.state = _State.CLOSE
        self._finish(req, error)
        self._update_poll()

    def _cmd_restore(self, args: bytes) -> None:
        if not self.ondemand:
            raise _err(errno.EOPNOTSUPP, "not in on-demand mode")
        for req in self._requests.values():
            req.new = True
        self._update_poll()

    def _cull_or_inuse(self, args: bytes, *, cull: bool) -> None:
        if b"/" in args:
            raise _err(errno.EINVAL, "cull/inuse requires a plain name")
        if not self.bound:
            raise _err(errno.EIO, "applied to unready cache")
        cwd = os.getcwdb()
        if args in (b"", b".", b"..") or len(args) > layout.NAME_MAX:
            raise _err(errno.EIO, "lookup failed (internal error)")
        path = os.path.join(cwd, args)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise _err(errno.ENOENT, "no such object") from None
        if self._in_use(path, st):
            raise _err(errno.EBUSY, "object in use")
        if not cull:
            return
        if stat.S_ISDIR(st.st_mode):
            assert self.dir is not None
            self._graves += 1
            grave = f"{int(time.time()):08x}{self._graves:08x}"
            os.rename(path, self.dir / "graveyard" / grave)
        else:
            os.unlink(path)

    def _in_use(self, path: bytes, st: os.stat_result) -> bool:
        """S_KERNEL_FILE: the cache's own directories, the volume and fan-out
        directories of acquired volumes, and the files of acquired objects."""
        if not stat.S_ISDIR(st.st_mode):
            return any(h._obj.in_use == _ident(st) for h in self._active.values())
        assert self.dir is not None
        real = os.path.realpath(path)
        pinned = {os.fsencode(self.dir / "cache"), os.fsencode(self.dir / "graveyard")}
        volumes = {os.fsencode(h.path.parent.parent) for h in self._active.values()}
        return real in pinned or real in volumes or os.path.dirname(real) in volumes

    # == requests =======================================================================

    def _check_open(self) -> None:
        if self.closed:
            raise _err(errno.EBADF, "device closed")

    def _alloc_msg_id(self) -> int:
        if self.version < (6, 10):
            msg_id = 0
            while msg_id in self._requests:
                msg_id += 1
            return msg_id
        if len(self._requests) >= U32:
            raise _err(errno.EBUSY, "request table full")
        candidate = self._msg_id_next
        while candidate in self._requests:
            candidate = (candidate + 1) % U32
        self._msg_id_next = (candidate + 1) % U32
        return candidate

    def _alloc_object_id(self) -> int:
        start = self._object_id_next
        candidate = start
        while candidate in self._live_ids:
            candidate = candidate + 1 if candidate < INT_MAX else 1
            if candidate == start:
                raise _err(errno.EBUSY, "no free object id")
        self._object_id_next = candidate + 1 if candidate < INT_MAX else 1
        return candidate

    def _queue(self, opcode: int, obj: _Object, offset: int = 0, length: int = 0) -> _Request:
        """``cachefiles_ondemand_send_req`` up to the wait."""
        if self.dead or obj.state is _State.DROPPING:
            raise _err(errno.EIO, "cache dead or object dropping")
        req = _Request(self._alloc_msg_id(), opcode, obj, offset, length)
        if self.version < (6, 8) and opcode != wire.OP_OPEN:
            req.msg_object_id = obj.ondemand_id
        self._requests[req.msg_id] = req
        self._update_poll()
        return req

    def _finish(self, req: _Request, error: int) -> None:
        if self._requests.get(req.msg_id) is req:
            del self._requests[req.msg_id]
        req.error = error
        req.done.set()

    def _abandon(self, req: _Request) -> None:
        """A waiter gave up (the kernel's killable wait returning EINTR)."""
        with self._lock:
            if self._requests.get(req.msg_id) is req:
                self._finish(req, -errno.EINTR)
                self._update_poll()

    def _ordered(self) -> list[_Request]:
        ids = sorted(self._requests)
        first = next((i for i, m in enumerate(ids) if m >= self._req_id_next), len(ids))
        return [self._requests[m] for m in ids[first:] + ids[:first]]

    def _select(self) -> _Request | None:
        """``cachefiles_ondemand_select_req``: the next unread request, round-robin;
        a READ of a closed object starts its re-open (6.8+) and waits for it."""
        for req in self._ordered():
            if not req.new:
                continue
            if req.opcode != wire.OP_READ or self.version < (6, 8):
                return req
            obj = req.obj
            if obj.state is _State.CLOSE:
                obj.state = _State.REOPENING
                self._queue(wire.OP_OPEN, obj)  # the kernel's re-open worker
                continue
            if obj.state is _State.REOPENING:
                continue
            return req
        return None

    def _encode(self, req: _Request, fd: int) -> bytes:
        object_id = req.msg_object_id % U32
        h = req.obj.handle
        if req.opcode == wire.OP_OPEN:
            return wire.encode_message(
                wire.OpenRequest(req.msg_id, object_id, h.volume_key, h.cookie_key, fd, 0)
            )
        if req.opcode == wire.OP_READ:
            return wire.encode_message(
                wire.ReadRequest(req.msg_id, object_id, req.offset, req.length)
            )
        return wire.encode_message(wire.CloseRequest(req.msg_id, object_id))

    def _wants_pollin(self) -> bool:
        if not (self.bound and self.ondemand):
            return False
        if self.version < (6, 8):
            return bool(self._requests)
        return any(
            r.new and not (r.opcode == wire.OP_READ and r.obj.state is _State.REOPENING)
            for r in self._requests.values()
        )

    def _update_poll(self) -> None:
        if self._poll is not None:
            self._poll.set(pollin=self._wants_pollin(), pollout=self._space != "ok")

    # == anonymous fds and cache files ==================================================

    def _open_view(self, backing: int) -> int:
        """An O_WRONLY fd of the cache file, O_DIRECT if allowed, not close-on-exec."""
        source = f"/proc/self/fd/{backing}"
        fd = -1
        if self.direct_io:
            try:
                fd = os.open(source, os.O_WRONLY | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_io = False  # this filesystem has no O_DIRECT
        if fd < 0:
            fd = os.open(source, os.O_WRONLY)
        os.set_inheritable(fd, True)
        return fd

    def _install_anon_fd(self, obj: _Object) -> int:
        """``cachefiles_ondemand_get_fd``."""
        if self.version >= (6, 10) and obj.ondemand_id > 0:
            raise _err(errno.EEXIST, "object already has an anonymous fd")
        object_id = self._alloc_object_id()
        if obj.backing is not None:
            fd, bound = self._open_view(obj.backing), True
        else:
            fd, bound = os.open(os.devnull, os.O_WRONLY), False
            os.set_inheritable(fd, True)  # the kernel's anon fd has no FD_CLOEXEC
        self._anon[fd] = _AnonFd(fd, obj, bound, _ident(os.fstat(fd)))
        obj.ondemand_id = object_id
        self._live_ids[object_id] = obj
        return fd

    def _bind_anon_fds(self, obj: _Object) -> None:
        assert obj.backing is not None
        for anon in self._anon.values():
            if anon.obj is obj and not anon.bound:
                view = self._open_view(obj.backing)
                os.dup2(view, anon.fd, inheritable=os.get_inheritable(anon.fd))
                os.close(view)
                anon.bound = True
                anon.ident = _ident(os.fstat(anon.fd))

    def _release_object_fd(self, obj: _Object) -> None:
        """``cachefiles_ondemand_fd_release``."""
        object_id = obj.ondemand_id
        obj.ondemand_id = ID_CLOSED
        obj.state = _State.CLOSE
        for req in list(self._requests.values()):
            if req.obj is not obj:
                continue
            if self.version >= (6, 8):
                if req.new and req.opcode == wire.OP_CLOSE and req.msg_object_id == object_id:
                    self._finish(req, 0)
            elif req.opcode == wire.OP_READ:
                self._finish(req, -errno.EIO)
        self._live_ids.pop(object_id, None)

    def _attach_after(self, gate: threading.Event, obj: _Object) -> None:
        gate.wait()
        with self._lock:
            self._attach(obj)

    def _attach(self, obj: _Object) -> None:
        """After the first successful ``copen``: open the committed file if it passes
        the coherency check, else create a tmpfile of the object's size."""
        handle = obj.handle
        try:
            if obj.in_use is not None and _aux_matches(handle.path, handle.size):
                obj.backing = os.open(handle.path, os.O_RDWR | os.O_CLOEXEC)
                obj.tmpfile = False
            else:
                fd = os.open(handle.path.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
                if handle.size > 0:
                    os.ftruncate(fd, round_up(handle.size, DIO_BLOCK))
                obj.backing, obj.tmpfile = fd, True
            obj.in_use = _ident(os.fstat(obj.backing))
            self._bind_anon_fds(obj)
        except OSError as exc:
            obj.attach_error = exc.errno or errno.EIO
        finally:
            obj.attached.set()

    def _ensure_volume(self, volume_dir: Path) -> None:
        """What acquiring a volume does on disk: ``I<key>`` with its volume xattr and
        all 256 fan-out directories."""
        if volume_dir in self._volumes:
            return
        volume_dir.mkdir(mode=0o700, exist_ok=True)
        os.setxattr(volume_dir, AUX_XATTR, VOLUME_AUX)
        for i in range(256):
            (volume_dir / f"@{i:02x}").mkdir(mode=0o700, exist_ok=True)
        self._volumes.add(volume_dir)

    def _commit(self, obj: _Object) -> None:
        """``cachefiles_clean_up_object``: link a tmpfile into the tree (replacing a
        stale file) with its coherency xattr, then drop the file."""
        backing = obj.backing
        if backing is None:
            return
        handle = obj.handle
        try:
            if obj.tmpfile:
                os.setxattr(
                    backing,
                    AUX_XATTR,
                    AUX.pack(handle.size, 0, COOKIE_TYPE_DATA, CONTENT_NO_DATA),
                )
                fan = os.open(handle.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(handle.path.name, dir_fd=fan)
                    os.link(
                        f"/proc/self/fd/{backing}",
                        handle.path.name,
                        dst_dir_fd=fan,
                        follow_symlinks=True,
                    )
                finally:
                    os.close(fan)
                obj.tmpfile = False
        finally:
            os.close(backing)
            obj.backing = None
            obj.in_use = None

    def _maybe_unbind(self) -> None:
        """The unbind pin-count reaching zero: the device and every anon fd closed."""
        if not self.closed or self._anon:
            return
        for handle in list(self._active.values()):
            self._withdraw_now(handle)

    # == the filesystem side ============================================================

    def _read(self, handle: FakeObjectHandle, offset: int, length: int, timeout: float) -> bytes:
        obj = handle._obj
        out = bytearray()
        with self._lock:
            if handle.withdrawn:
                raise _err(errno.EIO, "not mounted")
            end = min(offset + max(length, 0), handle.size)
        pos = offset
        while pos < end:
            start = round_down(pos, DIO_BLOCK)
            with self._lock:
                is_data, upto = self._probe(obj, start, end)
                req = None
                if not is_data:
                    if self.version < (6, 8) and obj.ondemand_id == ID_CLOSED:
                        return self._failed(out, "anonymous fd closed prematurely")
                    limit = min(upto, round_up(handle.size, DIO_BLOCK))
                    try:
                        req = self._queue(wire.OP_READ, obj, start, limit - start)
                    except OSError:
                        return self._failed(out, "READ not sent")
                    self.reads_sent += 1
            if req is not None:
                if not req.done.wait(timeout):
                    self._abandon(req)
                    raise TimeoutError(f"READ {req.msg_id} not completed")
                if req.error:
                    return self._failed(out, f"READ failed ({req.error})")
                with self._lock:
                    is_data, upto = self._probe(obj, start, end)
                if not is_data or upto <= pos:
                    return self._failed(out, "prepare_ondemand_read failed")
            with self._lock:
                if obj.backing is None:
                    return self._failed(out, "object withdrawn")
                chunk = os.pread(obj.backing, min(upto, end) - pos, pos)
            if not chunk:
                break
            out += chunk
            pos += len(chunk)
        return bytes(out)

    @staticmethod
    def _failed(out: bytearray, why: str) -> bytes:
        """A read that fails part-way returns what it has; at its start it is EIO."""
        if out:
            return bytes(out)
        raise _err(errno.EIO, why)

    def _probe(self, obj: _Object, start: int, end: int) -> tuple[bool, int]:
        """SEEK_DATA/SEEK_HOLE at ``start``: (True, end of data) or (False, end of
        the hole, page-rounded, at most ``round_up(end)``)."""
        if obj.backing is None:
            return False, round_up(end, DIO_BLOCK)
        try:
            data = os.lseek(obj.backing, start, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return False, round_up(end, DIO_BLOCK)
        if data > start:
            return False, min(round_up(data, DIO_BLOCK), round_up(end, DIO_BLOCK))
        return True, os.lseek(obj.backing, start, os.SEEK_HOLE)

    def _withdraw(self, handle: FakeObjectHandle, timeout: float) -> None:
        obj = handle._obj
        with self._lock:
            if handle.withdrawn:
                return
            close = None
            if obj.state is _State.OPEN and not self.dead:
                close = self._queue(wire.OP_CLOSE, obj)
        if close is not None and not close.done.wait(timeout):
            raise TimeoutError("CLOSE not read")
        with self._lock:
            self._withdraw_now(handle)

    def _withdraw_now(self, handle: FakeObjectHandle) -> None:
        obj = handle._obj
        if handle.withdrawn:
            return
        if obj.ondemand_id != 0:
            obj.state = _State.DROPPING
            for req in list(self._requests.values()):
                if req.obj is obj:
                    self._finish(req, -errno.EIO)
        self._commit(obj)
        handle.withdrawn = True
        self._active.pop((handle.volume_key, handle.cookie_key), None)
        self._update_poll()


def _aux_matches(path: Path, size: int) -> bool:
    """``cachefiles_check_auxdata`` for a cookie without netfs coherency data."""
    try:
        aux = os.getxattr(path, AUX_XATTR)
    except OSError:
        return False
    if len(aux) != AUX.size:
        return False
    object_size, _zero_point, cookie_type, content = AUX.unpack(aux)
    return bool(
        cookie_type == COOKIE_TYPE_DATA and object_size == size and content != CONTENT_DIRTY
    )


# -- a harness for testing/kernel_contract.py ---------------------------------------------


class FakeMount:
    """What ``mount -t erofs -o fsid=<fsid>`` does to the fake: acquire the primary
    blob's cookie and read its superblock block, in the background."""

    def __init__(self, fake: FakeCachefiles, fsid: str, payload_offset: int) -> None:
        self._payload_offset = payload_offset
        self.handle: FakeObjectHandle | None = None
        self._job = Background(self._mount, fake, fsid)

    def _mount(self, fake: FakeCachefiles, fsid: str) -> None:
        handle = fake.lookup(b"erofs," + fsid.encode(), fsid.encode(), 60)
        try:
            handle.read(0, DIO_BLOCK, 60)
        except BaseException:
            handle.withdraw(60)
            raise
        self.handle = handle

    def wait(self, timeout: float) -> int:
        try:
            self._job.result(max(timeout, 0.001))
        except TimeoutError:
            return errno.ETIMEDOUT
        except OSError:
            # EROFS reports a failed cookie lookup or superblock read as EIO (or
            # ENOBUFS, on 6.12, depending on timing), never the OPEN's own errno.
            return errno.EIO
        return 0

    def read(self, offset: int, length: int) -> bytes:
        if self.handle is None:
            raise _err(errno.EIO, "not mounted")
        return self.handle.read(self._payload_offset + offset, length, 60)

    def umount(self) -> None:
        if self.handle is not None:
            self.handle.withdraw(60)


class FakeHarness:
    """A ``KernelHarness`` on :class:`FakeCachefiles`: a bound on-demand cache in
    ``cache_dir`` and an "image" whose payload sits at ``payload_offset``."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        version: Version = (6, 12),
        payload_offset: int = 8192,
        payload_size: int = 100_000,
    ) -> None:
        self.device = FakeCachefiles(version)
        self.device.write_command(commands.encode_dir(str(cache_dir)))
        self.device.write_command(commands.encode_bind(ondemand=True))
        self.payload_offset = payload_offset
        self.payload = pattern_bytes(4, 0, payload_size)
        self.image = bytes(payload_offset) + self.payload + bytes(3000)
        self.mounts: list[FakeMount] = []

    def mount(self, fsid: str) -> FakeMount:
        m = FakeMount(self.device, fsid, self.payload_offset)
        self.mounts.append(m)
        return m

    def close(self) -> None:
        self.device.close_leftover_fds()
        self.device.close()
