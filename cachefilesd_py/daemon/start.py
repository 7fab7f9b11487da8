"""Start-up of the daemon's main process, in the order the kernel's rules decide.

1. raise RLIMIT_NOFILE and check it against the configured work (``daemon/limits.py``);
2. check the cache directory;
3. take ``/dev/cachefiles`` back from systemd's fd store, or open it (only one opener at
   a time: EBUSY means another daemon has it), send the configuration commands one per
   write and ``bind`` (``daemon/keeper.py``);
4. drop every capability (``daemon/privileges.py``);
5. without ``-n``: go to the background now that the bind worked (the parent exits 0
   once the pidfile is written; a failure before this point is its exit status);
6. run the supervisor, which forks the workers and tells systemd READY=1 once one
   serves (``daemon/supervisor.py``).

Importing this module imports what every mode needs to bind; what a worker of the
configured mode needs is imported once the cache is bound, before the first fork
(``daemon/app.py``'s ``import_mode``), so that workers, forked from the supervisor,
start with nothing left to import, and classic mode never imports on-demand's stack.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from cachefilesd_py.config.model import Config
from cachefilesd_py.daemon import host, limits, privileges, systemd
from cachefilesd_py.daemon.app import import_mode
from cachefilesd_py.daemon.keeper import DeviceKeeper
from cachefilesd_py.daemon.logging import set_process
from cachefilesd_py.daemon.supervisor import Supervisor
from cachefilesd_py.kernel import _sys

if TYPE_CHECKING:
    from cachefilesd_py.daemon.fanotify_keeper import FanotifyKeeper

log = structlog.get_logger("daemon")


def daemonize(pidfile: str) -> None:
    """Go to the background like cachefilesd after a successful bind: the calling
    process exits 0 once the background process has written ``pidfile`` (1 if it
    could not). The pidfile holds the supervisor's pid and is removed at a clean exit
    (cachefilesd leaves it behind)."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        ok = os.read(r, 2) == b"ok"
        os._exit(0 if ok else 1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    for sig in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as exc:
        log.error("pidfile.unwritable", pidfile=pidfile, error=exc.strerror)
        os.close(w)
        raise
    os.write(w, b"ok")
    os.close(w)
    pid = os.getpid()

    def remove_pidfile() -> None:
        if os.getpid() == pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pidfile)

    atexit.register(remove_pidfile)


def run(config: Config, options: object) -> int:
    """Entry point used by ``cachefilesd_py.daemon.cli`` (see the module docstring)."""
    assert config.dir is not None
    set_process("supervisor")
    with contextlib.suppress(OSError):
        _sys.set_comm("cachefilesd-py")
    os.umask(0o077)
    nofile = limits.raise_nofile()
    budget = limits.check(config, nofile)
    if budget.blobs < limits.WARN_BLOBS and config.ondemand:
        log.warning("nofile.low", limit=nofile, blobs=budget.blobs,
                    note="raise LimitNOFILE= / ulimit -n for more concurrently open blobs")
    if not Path(config.dir).is_dir():
        raise OSError(errno.ENOENT, f"Can't confirm cache location: {config.dir}")
    # fanotify mode: no /dev/cachefiles, the supervisor holds the group instead and
    # keeps CAP_SYS_ADMIN (workers mount and unmount the images)
    keeper: DeviceKeeper | FanotifyKeeper
    if config.fanotify:
        from cachefilesd_py.daemon.fanotify_keeper import FanotifyKeeper

        keeper = FanotifyKeeper(config)
    else:
        keeper = DeviceKeeper(config)
    keeper.acquire(systemd.listen_fds())
    try:
        if isinstance(keeper, DeviceKeeper):
            privileges.drop_after_bind(config.dir)
        import_mode(config)
        log.info(
            "cache.device", nofile=nofile, **host.cache_device(config.dir, udev=config.ondemand)
        )
        if not getattr(options, "foreground", True):
            daemonize(getattr(options, "pidfile", "/var/run/cachefilesd.pid"))
        supervisor = Supervisor(
            config,
            getattr(options, "config_path", "/etc/cachefilesd.conf"),
            bool(getattr(options, "nocull", False)),
            keeper,
        )
        return supervisor.run()
    finally:
        keeper.close()
