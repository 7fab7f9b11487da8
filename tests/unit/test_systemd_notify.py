"""The sd_notify client (daemon/systemd.py) against a real AF_UNIX datagram socket, as
systemd's notification socket receives it."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.daemon import systemd


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def receive(sock: socket.socket) -> tuple[str, list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg.decode(), list(fds)


def test_fdstore_sends_the_fd_with_its_name_and_no_polling(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    f = tmp_path / "dev"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert systemd.fdstore(fd)
        text, fds = receive(notify_socket)
        assert text == "FDSTORE=1\nFDNAME=cachefiles\nFDPOLL=0"
        assert len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
        os.close(fds[0])
    finally:
        os.close(fd)
    assert systemd.fdstore_remove()
    assert receive(notify_socket) == ("FDSTOREREMOVE=1\nFDNAME=cachefiles", [])


def test_ready_status_watchdog(notify_socket: socket.socket) -> None:
    systemd.ready("serving 0 objects")
    assert receive(notify_socket)[0] == "READY=1\nSTATUS=serving 0 objects"
    systemd.watchdog()
    assert receive(notify_socket)[0] == "WATCHDOG=1"


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.under_systemd()
    assert not systemd.ready()


def test_a_vanished_socket_is_not_fatal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.watchdog() is False


def test_listen_fds_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    # make them 3 and 4 would clobber pytest's fds; check the parsing with real numbers
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    monkeypatch.setenv("LISTEN_FDNAMES", "")
    assert systemd.listen_fds() == {}
    assert "LISTEN_PID" not in os.environ
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == {}, "fds meant for another process"
    os.close(r)
    os.close(w)


def test_listen_fds_takes_fd3_on(tmp_path: Path) -> None:
    """In a child (fd numbers 3 and 4 are free to take there)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in (3, 4):
                os.dup2(os.open("/dev/null", os.O_RDONLY), fd, inheritable=True)
            os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2",
                              LISTEN_FDNAMES="cachefiles:cachefiles-bind")
            got = systemd.listen_fds()
            ok = got == {"cachefiles": 3, "cachefiles-bind": 4}
            ok = ok and not os.get_inheritable(3) and "LISTEN_FDS" not in os.environ
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None
