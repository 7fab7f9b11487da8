"""Plain helpers of the guest tier (used by the fixtures in conftest.py and by
scripts/demo): run commands, build and mount EROFS images, start nginx, drive a real
``cachefilesd-py`` process and read its JSON log."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

WORK = Path("/tmp/vm")


def run(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root``, by relative path."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = sha256_file(p)
    return out


def mkfs_erofs(image: Path, src: Path, *extra: str) -> Path:
    run("mkfs.erofs", "--quiet", *extra, str(image), str(src))
    return image


#: regions of ``write_huge_tree``'s file, on both sides of the 1 GiB mark
HUGE_REGIONS = ((0, 2 << 20), (600 << 20, 1 << 20), (1100 << 20, 2 << 20))


def write_huge_tree(src: Path) -> Path:
    """``src/huge.bin``: 1.2 GiB, sparse, random bytes only in :data:`HUGE_REGIONS`
    (the > 1 GiB blob cases: chunk indexes and byte offsets past 32 bits of 256 KiB)."""
    src.mkdir()
    huge = src / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(1200 << 20)
        for off, n in HUGE_REGIONS:
            f.seek(off)
            f.write(os.urandom(n))
    return huge


def mount_erofs(
    mnt: Path,
    fsid: str,
    *,
    domain: str | None = None,
    devices: tuple[str, ...] = (),
    timeout: float = 120,
) -> None:
    opts = [f"fsid={fsid}"]
    if domain:
        opts.append(f"domain_id={domain}")
    opts += [f"device={d}" for d in devices]
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "erofs", "none", "-o", ",".join(opts), str(mnt), timeout=timeout)


def mount_tracked(mnt: Path, fsid: str, mounts: list[Path], **kw: object) -> None:
    """Mount and remember the mount point, so the fixture unmounts it if the test fails."""
    mount_erofs(mnt, fsid, **kw)  # type: ignore[arg-type]
    mounts.append(mnt)


def umount_tracked(mnt: Path, mounts: list[Path]) -> None:
    run("umount", str(mnt))
    mounts.remove(mnt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Nginx:
    root: Path
    url: str
    proc: subprocess.Popen[bytes]
    access_log: Path | None = None

    #: the nginx.conf written by :func:`start_nginx` (rewritten by :meth:`require_bearer`)
    conf: Path | None = None
    listen: str = "127.0.0.1"
    port: int = 0
    logging: bool = False

    def require_bearer(self, token: str | None, timeout: float = 20.0) -> None:
        """Answer 401 from now on unless a request carries ``Authorization: Bearer
        TOKEN`` (None: no check): the configuration is rewritten and nginx reloaded
        (SIGHUP: new workers take the new one, old ones finish and close their
        keep-alive connections). Returns once a request shows the new rule works."""
        assert self.conf is not None
        self.conf.write_text(
            nginx_conf(
                self.root,
                self.conf.parent,
                self.listen,
                self.port,
                access_log=self.logging,
                bearer=token,
            )
        )
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a wrong token: 401 once the rule is in force
            probe = http.client.HTTPConnection(self.listen, self.port, timeout=5)
            try:
                probe.request("HEAD", "/", headers={"Authorization": "Bearer -"})
                wrong = probe.getresponse().status
            except OSError:
                wrong = 0
            finally:
                probe.close()
            if (token is None and wrong != 401) or (token is not None and wrong == 401):
                return
            time.sleep(0.1)
        raise RuntimeError(f"nginx did not take the new Authorization rule ({token!r})")

    def requested(self) -> list[str]:
        """The request lines nginx logged (``access_log=True``)."""
        if self.access_log is None or not self.access_log.exists():
            return []
        return self.access_log.read_text(errors="replace").splitlines()


def nginx_conf(
    root: Path, prefix: Path, listen: str, port: int, *, access_log: bool, bearer: str | None
) -> str:
    """The configuration :func:`start_nginx` runs nginx with."""
    check = f'if ($http_authorization != "Bearer {bearer}") {{ return 401; }}' if bearer else ""
    return f"""daemon off;
user root;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {f"{prefix}/logs/access.log" if access_log else "off"};
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {listen}:{port};
        root {root};
        location / {{ {check} }}
    }}
}}
"""


def start_nginx(
    root: Path,
    workdir: Path,
    *,
    access_log: bool = False,
    listen: str = "127.0.0.1",
    port: int | None = None,
    argv_prefix: tuple[str, ...] = (),
    bearer: str | None = None,
) -> Nginx:
    """Debian's nginx serving ``root`` on a free loopback port (range requests → 206);
    or on ``listen:port``, started through ``argv_prefix`` (``ip netns exec NS``).
    With ``access_log``, every request is logged to ``Nginx.access_log``; with
    ``bearer``, a request without ``Authorization: Bearer BEARER`` is answered 401."""
    port = port or free_port()
    prefix = workdir / f"nginx-{port}"
    (prefix / "logs").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(root, prefix, listen, port, access_log=access_log, bearer=bearer))
    proc = subprocess.Popen([*argv_prefix, "nginx", "-c", str(conf), "-p", str(prefix)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((listen, port), 1):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("nginx did not start")
    n = Nginx(
        root,
        f"http://{listen}:{port}",
        proc,
        prefix / "logs" / "access.log",
        conf,
        listen,
        port,
        access_log,
    )
    return n


@dataclass
class Daemon:
    """A running ``cachefilesd-py`` process and its JSON log."""

    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    debug: bool = True
    events: list[dict[str, object]] = field(default_factory=list)
    #: a cgroup v2 directory to start the daemon in (its memory is charged there)
    cgroup: Path | None = None

    def start(self, timeout: float = 300) -> None:
        readies = self.count("ready") if self.log_path.exists() else 0
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # started inside its cgroup (a shell joins it, then execs the daemon), so
        # that every page it ever touches is charged there
        enter = (
            ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$0" "$@"']
            if self.cgroup is not None
            else []
        )
        self.proc = subprocess.Popen(
            [
                *enter,
                sys.executable,
                "-m",
                "cachefilesd_py.daemon.cli",
                "-n",
                "-s",
                *(["-d"] if self.debug else []),
                "--log-format",
                "json",
                "-f",
                str(self.config),
            ],
            stdout=self.log_file,
            stderr=self.log_file,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count("ready") > readies:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-4000:]
                )
            time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError("daemon not ready:\n" + tail)

    def read_events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict):
                    events.append(ev)
        self.events = events
        return events

    def count(self, event: str) -> int:
        return sum(1 for e in self.read_events() if e.get("event") == event)

    def wait_for(self, event: str, timeout: float) -> bool:
        """Whether ``event`` shows up in the log within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(event):
                return True
            time.sleep(0.2)
        return False

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self.log_file.close()
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.log_file.close()
