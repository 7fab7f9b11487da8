"""A userspace fake of ``/dev/cachefiles`` in on-demand mode, Linux 6.12 semantics.

It implements the :class:`~cachefilesd_py.kernel.device.Device` port with the kernel's
message bytes and errors, backed by real sparse files, so the daemon's driver runs
against it unchanged. The "filesystem" side (what EROFS would do) is driven by tests:

- :meth:`FakeCachefiles.lookup` queues an OPEN and waits for ``copen`` (like a mount);
- :meth:`FakeObject.read` reads a range of the blob; where the backing file has a hole
  (SEEK_DATA) it queues a READ, waits for READ_COMPLETE and checks again once: a hole
  at the offset still is EIO, a filled prefix shortens the read (protocol §2.5);
- :meth:`FakeObject.withdraw` queues a CLOSE, waits until the daemon read it, then
  commits the object's file into the cachefiles layout (new objects live as hidden
  files until then, like the kernel's tmpfiles) with the ``user.CacheFiles.cache``
  coherency xattr; a later lookup whose ``copen`` size does not match it, or whose xattr
  is spoiled, gets a fresh file (the kernel's stale-file replacement).

Kernel rules kept: one command per write (text after a newline ignored, leading
whitespace EOPNOTSUPP, unknown EOPNOTSUPP); ``dir``/``tag`` twice EEXIST; thresholds
``N%`` checked against current values; ``copen`` numbers in base 0 (``0x`` hex, leading
``0`` octal), negative sizes -1..-4095 fail the OPEN, below that EINVAL; ``copen`` for an
unknown id or one that is not a read OPEN is EINVAL; ``copen`` after the anon fd was
closed fails the OPEN with EBADFD; anon fds come without FD_CLOEXEC; pwrite at an
unaligned offset or on an object that is not open is ENOBUFS and returns the
page-rounded length (≤ 6.12); READ_COMPLETE with an unknown id, a non-READ id, or a fd
of another object (6.10) is EINVAL; a READ completed without data gives the reader EIO;
closing the device marks the cache dead and fails every pending request with EIO.
Checked against the real kernel by ``tests/vm/test_kernel_contract_guest.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.kernel.layout import object_path

PAGE = 4096
AUX_XATTR = "user.CacheFiles.cache"


def _round_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def _kstrtol(text: str) -> int:
    """The kernel's base-0 number parsing (``0x`` hex, leading ``0`` octal)."""
    sign = -1 if text.startswith("-") else 1
    body = text[1:] if text[:1] in "+-" else text
    if not body:
        raise ValueError
    if body.lower().startswith("0x"):
        return sign * int(body[2:], 16)
    if body.startswith("0") and len(body) > 1:
        return sign * int(body[1:], 8)
    if not body.isdigit():
        raise ValueError
    return sign * int(body)


@dataclass(eq=False)
class _Request:
    msg_id: int
    opcode: int
    object_id: int
    payload: object = None
    read: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: int = 0  # 0 or -errno for OPEN


@dataclass(eq=False)
class FakeObject:
    """One cache object, and the handle the "filesystem" side reads through."""

    fake: FakeCachefiles
    object_id: int
    volume: bytes
    cookie: bytes
    path: Path
    size: int = 0
    state: str = "new"  # new -> open -> closed
    fds: set[int] = field(default_factory=set)
    committed: bool = False

    def read(self, offset: int, length: int, timeout: float = 10) -> bytes:
        return self.fake._read(self, offset, length, timeout)

    def withdraw(self, timeout: float = 10) -> None:
        self.fake._withdraw(self, timeout)


class FakeCachefiles:
    """The fake device. ``version`` gates behaviour that changed between kernels."""

    def __init__(self, version: tuple[int, int] = (6, 12)) -> None:
        self.version = version
        self._lock = threading.RLock()
        self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._requests: dict[int, _Request] = {}
        self._next_msg = 0
        self._next_object = 1
        self._objects: dict[int, FakeObject] = {}
        self._fd_object: dict[int, FakeObject] = {}
        self.dir: Path | None = None
        self.tag: str | None = None
        self.thresholds = {"brun": 7, "bcull": 5, "bstop": 1, "frun": 7, "fcull": 5, "fstop": 1}
        self.bound = False
        self.ondemand = False
        self.dead = False
        self.commands: list[bytes] = []
        self.reads_sent = 0

    # -- Device port -------------------------------------------------------------------

    def fileno(self) -> int:
        return self._event

    def _signal(self) -> None:
        with self._lock:
            pending = any(not r.read for r in self._requests.values())
        if pending:
            os.eventfd_write(self._event, 1)
        else:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._event)

    def read_message(self) -> bytes:
        with self._lock:
            if not self.bound or self.dead:
                return b""
            req = next((r for r in self._requests.values() if not r.read), None)
            if req is None:
                self._signal()
                return b""
            req.read = True
            if req.opcode == wire.OP_OPEN:
                obj = self._objects[req.object_id]
                fd = os.open(obj.path, os.O_WRONLY)
                os.set_inheritable(fd, True)  # the kernel's anon fd has no FD_CLOEXEC
                obj.fds.add(fd)
                self._fd_object[fd] = obj
                msg = wire.encode_message(
                    wire.OpenRequest(req.msg_id, obj.object_id, obj.volume, obj.cookie, fd, 0)
                )
            elif req.opcode == wire.OP_READ:
                off, length = cast(tuple[int, int], req.payload)
                msg = wire.encode_message(wire.ReadRequest(req.msg_id, req.object_id, off, length))
            else:
                msg = wire.encode_message(wire.CloseRequest(req.msg_id, req.object_id))
                del self._requests[req.msg_id]
                req.done.set()
            self._signal()
            return msg

    def write_command(self, cmd: bytes) -> None:
        with self._lock:
            self.commands.append(cmd)
            if self.dead:
                raise OSError(errno.EIO, "cache is dead")
            if len(cmd) > PAGE - 1:
                raise OSError(errno.EOPNOTSUPP, "command too long")
            if b"\0" in cmd:
                raise OSError(errno.EINVAL, "NUL in command")
            if cmd.startswith(b"\n"):
                raise OSError(errno.EINVAL, "empty command")
            line = cmd.split(b"\n", 1)[0].decode("utf-8", "replace")
            if line[:1].isspace():
                raise OSError(errno.EOPNOTSUPP, "leading whitespace")
            word, _, args = line.partition(" ")
            handler = getattr(self, f"_cmd_{word}", None)
            if handler is None:
                raise OSError(errno.EOPNOTSUPP, f"unknown command {word!r}")
            handler(args.lstrip(" "))

    def _cmd_dir(self, args: str) -> None:
        if not args:
            raise OSError(errno.EINVAL, "Empty directory specified")
        if self.dir is not None:
            raise OSError(errno.EEXIST, "Second cache directory specified")
        self.dir = Path(args)

    def _cmd_tag(self, args: str) -> None:
        if not args:
            raise OSError(errno.EINVAL, "Empty tag specified")
        if self.tag is not None:
            raise OSError(errno.EEXIST, "second tag")
        self.tag = args

    def _threshold(self, name: str, args: str) -> None:
        if not args.endswith("%") or not args[:-1].isdigit():
            raise OSError(errno.EINVAL, "bad percentage")
        trial = {**self.thresholds, name: int(args[:-1])}
        k = name[0]
        if not 0 <= trial[k + "stop"] < trial[k + "cull"] < trial[k + "run"] < 100:
            raise OSError(errno.EINVAL, "Free space limits must be in range")
        self.thresholds = trial

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        for t in ("brun", "bcull", "bstop", "frun", "fcull", "fstop"):
            if name == f"_cmd_{t}":
                return lambda args, t=t: self._threshold(t, args)
        raise AttributeError(name)

    def _cmd_bind(self, args: str) -> None:
        if self.bound:
            raise OSError(errno.EBUSY, "already bound")
        if self.dir is None:
            raise OSError(errno.EINVAL, "No cache directory specified")
        if args not in ("", "ondemand"):
            raise OSError(errno.EINVAL, "bad bind argument")
        (self.dir / "cache").mkdir(parents=True, exist_ok=True)
        (self.dir / "graveyard").mkdir(exist_ok=True)
        (self.dir / "cache" / ".tmp").mkdir(exist_ok=True)
        self.bound, self.ondemand = True, args == "ondemand"

    def _cmd_copen(self, args: str) -> None:
        if not self.ondemand:
            raise OSError(errno.EOPNOTSUPP, "not on-demand")
        id_text, comma, size_text = args.partition(",")
        if not comma:
            raise OSError(errno.EINVAL, "missing comma")
        try:
            msg_id = _kstrtol(id_text)
        except ValueError:
            raise OSError(errno.EINVAL, "bad id") from None
        req = self._requests.get(msg_id)
        if req is None or req.opcode != wire.OP_OPEN or not req.read:
            raise OSError(errno.EINVAL, "no such OPEN")
        del self._requests[msg_id]
        obj = self._objects[req.object_id]
        try:
            size = _kstrtol(size_text.rstrip("\n"))
        except ValueError:
            req.result = -errno.EINVAL
            req.done.set()
            raise OSError(errno.EINVAL, "bad size") from None
        if size < -4095:
            req.result = -errno.EINVAL
            req.done.set()
            raise OSError(errno.EINVAL, "size out of range")
        if size < 0:
            req.result = size
        elif not obj.fds:
            req.result = -errno.EBADFD
        else:
            self._open_backing(obj, size)
            obj.state = "open"
        req.done.set()
        self._signal()

    def _cmd_restore(self, args: str) -> None:
        if not self.ondemand or self.version < (6, 8):
            raise OSError(errno.EOPNOTSUPP, "restore")
        for r in self._requests.values():
            r.read = False
        self._signal()

    def _cmd_cull(self, args: str) -> None:
        self._inuse_or_cull(args, cull=True)

    def _cmd_inuse(self, args: str) -> None:
        self._inuse_or_cull(args, cull=False)

    def _inuse_or_cull(self, name: str, cull: bool) -> None:
        if not self.bound or self.dead:
            raise OSError(errno.EIO, "not bound")
        if "/" in name:
            raise OSError(errno.EINVAL, "slash in name")
        path = Path(os.getcwd()) / name
        if not path.exists():
            raise OSError(errno.ESTALE, "no such object")
        if any(o.path == path and o.state == "open" for o in self._objects.values()):
            raise OSError(errno.EBUSY, "in use")
        if cull:
            assert self.dir is not None
            os.rename(path, self.dir / "graveyard" / f"x{os.getpid():x}x{id(path):x}")

    def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        with self._lock:
            obj = self._fd_object.get(fd)
            if obj is None:
                raise OSError(errno.EBADF, "not an anonymous fd")
            if obj.state != "open" or offset % PAGE or self.dead:
                raise OSError(errno.ENOBUFS, "no buffer space")
        os.pwrite(fd, buf, offset)
        return _round_up(len(buf))

    def read_complete(self, fd: int, msg_id: int) -> None:
        with self._lock:
            obj = self._fd_object.get(fd)
            req = self._requests.get(msg_id)
            if obj is None:
                raise OSError(errno.EBADF, "not an anonymous fd")
            if req is None or req.opcode != wire.OP_READ or not req.read:
                raise OSError(errno.EINVAL, "no such READ")
            if self.version >= (6, 10) and req.object_id != obj.object_id:
                raise OSError(errno.EINVAL, "READ of another object")
            del self._requests[msg_id]
            req.done.set()

    def close_fd(self, fd: int) -> None:
        with self._lock:
            obj = self._fd_object.pop(fd, None)
            if obj is not None:
                obj.fds.discard(fd)
                if not obj.fds and obj.state == "open":
                    obj.state = "closed"
        os.close(fd)

    def close(self) -> None:
        with self._lock:
            self.dead = True
            for req in self._requests.values():
                req.result = -errno.EIO
                req.done.set()
            self._requests.clear()
            for fd in list(self._fd_object):
                os.close(fd)  # what process exit would do
            self._fd_object.clear()
        os.close(self._event)

    # -- the filesystem side -----------------------------------------------------------

    def _queue(self, opcode: int, object_id: int, payload: object = None) -> _Request:
        with self._lock:
            if self.dead:
                raise OSError(errno.EIO, "cache dead")
            msg_id = self._next_msg
            self._next_msg = (self._next_msg + 1) % 2**32  # cyclic since 6.10
            req = _Request(msg_id, opcode, object_id, payload)
            self._requests[msg_id] = req
        self._signal()
        return req

    def _open_backing(self, obj: FakeObject, size: int) -> None:
        committed = object_path(self.dir or Path("/"), obj.volume, obj.cookie)
        fresh = True
        if committed is not None and committed.exists():
            try:
                aux = os.getxattr(committed, AUX_XATTR)
            except OSError:
                aux = b""
            if aux == str(size).encode():
                fresh = False
                self._swap_fd_target(obj, committed)
                obj.path, obj.committed = committed, True
        if fresh:
            os.truncate(obj.path, _round_up(size))
        obj.size = size

    def _swap_fd_target(self, obj: FakeObject, path: Path) -> None:
        for fd in list(obj.fds):
            new = os.open(path, os.O_WRONLY)
            os.dup2(new, fd, inheritable=os.get_inheritable(fd))
            os.close(new)

    def lookup(self, volume: bytes, cookie: bytes, timeout: float = 10) -> FakeObject:
        """Like acquiring a cookie at mount: OPEN, then wait for ``copen``."""
        if not (self.bound and self.ondemand):
            raise OSError(errno.ENOBUFS, "no on-demand cache bound")
        assert self.dir is not None
        with self._lock:
            object_id = self._next_object
            self._next_object += 1
            tmp = self.dir / "cache" / ".tmp" / f"obj{object_id}"
            tmp.write_bytes(b"")
            obj = FakeObject(self, object_id, volume, cookie, tmp)
            self._objects[object_id] = obj
        req = self._queue(wire.OP_OPEN, object_id)
        if not req.done.wait(timeout):
            raise TimeoutError("OPEN not answered")
        if req.result < 0:
            raise OSError(-req.result, os.strerror(-req.result))
        return obj

    def _has_hole(self, obj: FakeObject, offset: int, length: int) -> int | None:
        """Offset of the first hole in the range, or None."""
        end = min(offset + length, _round_up(obj.size))
        with open(obj.path, "rb") as f:
            pos = offset
            while pos < end:
                try:
                    data = os.lseek(f.fileno(), pos, os.SEEK_DATA)
                except OSError:
                    return pos
                if data > pos:
                    return pos
                pos = os.lseek(f.fileno(), pos, os.SEEK_HOLE)
        return None

    def _read(self, obj: FakeObject, offset: int, length: int, timeout: float) -> bytes:
        if obj.state != "open":
            raise OSError(errno.EIO, "object not open")
        length = min(length, obj.size - offset)
        if length <= 0:
            return b""
        if self._has_hole(obj, offset, length) is not None:
            self.reads_sent += 1
            req = self._queue(wire.OP_READ, obj.object_id, (offset, length))
            if not req.done.wait(timeout):
                raise TimeoutError("READ not completed")
            hole = self._has_hole(obj, offset, length)
            if hole == offset:
                raise OSError(errno.EIO, "prepare_ondemand_read failed")
            if hole is not None:
                length = hole - offset
        with open(obj.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _withdraw(self, obj: FakeObject, timeout: float) -> None:
        req = self._queue(wire.OP_CLOSE, obj.object_id)
        if not req.done.wait(timeout):
            raise TimeoutError("CLOSE not read")
        with self._lock:
            obj.state = "closed"
            target = object_path(self.dir or Path("/"), obj.volume, obj.cookie)
            if target is not None and not obj.committed:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(obj.path, target)
                os.setxattr(target, AUX_XATTR, str(obj.size).encode())
                obj.path, obj.committed = target, True
