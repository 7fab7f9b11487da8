"""A fake classically bound ``/dev/cachefiles`` over a real cache tree.

Space is modelled by object count: the state line says ``cull=1`` once the tree holds
more than ``cull_above`` objects and keeps saying it until it is down to ``run_at``
(the kernel's hysteresis). ``cull <name>`` works relative to the process's working
directory like the kernel's: EINVAL for a ``/``, ESTALE for a missing name, EBUSY for a
name in ``in_use``; else a file is unlinked and a directory moved into ``graveyard/``, as
the kernel does.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path


class FakeClassic:
    def __init__(self, cache_dir: Path, *, cull_above: int, run_at: int) -> None:
        self.cache_dir = cache_dir
        self.cull_above, self.run_at = cull_above, run_at
        self.in_use: set[Path] = set()
        self.culling = False
        self.bound = False
        self.commands: list[bytes] = []
        #: how many times the state line was read (a serving loop reads it each round)
        self.reads = 0
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.write(self._w, b"x")  # always readable: the daemon polls with a timeout

    def objects(self) -> int:
        return sum(
            1 for p in (self.cache_dir / "cache").rglob("*") if p.is_file() and p.name[:1] in "DSTE"
        )

    def fileno(self) -> int:
        return self._r

    def read_message(self) -> bytes:
        self.reads += 1
        n = self.objects()
        if n > self.cull_above:
            self.culling = True
        elif n <= self.run_at:
            self.culling = False
        return (
            f"cull={int(self.culling)} frun=64 fcull=32 fstop=8 brun=1000 bcull=800 "
            f"bstop=200 freleased=0 breleased=0"
        ).encode()

    def write_command(self, cmd: bytes) -> None:
        self.commands.append(cmd)
        word, _, arg = cmd.decode().partition(" ")
        if word == "bind":
            (self.cache_dir / "cache").mkdir(exist_ok=True)
            (self.cache_dir / "graveyard").mkdir(exist_ok=True)
            self.bound = True
        elif word == "cull":
            if "/" in arg:
                raise OSError(errno.EINVAL, "slash")
            path = Path(os.getcwd()) / arg
            if not path.exists():
                raise OSError(errno.ESTALE, "gone")
            if path in self.in_use:
                raise OSError(errno.EBUSY, "in use")
            if path.is_dir():  # the kernel buries directories in the graveyard
                os.rename(path, self.cache_dir / "graveyard" / f"x{id(path):x}{arg}")
            else:  # and unlinks files (6.12 cachefiles_bury_object)
                path.unlink()

    def wait_reads(self, n: int, timeout: float = 20.0) -> bool:
        """Whether the state line has been read ``n`` times within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.reads < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
