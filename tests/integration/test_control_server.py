"""The control socket's server (``daemon/control_server.py``) on a real Unix socket:
callers identified by the kernel (SO_PEERCRED, a forked child that drops to another
uid), malformed, oversized, slow and excess connections, stale sockets, and the fuzz
harness over its corpus."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.control.client import call
from cachefilesd_py.control.schema import MAX_REQUEST_BYTES, ControlError, ErrorCode, parse_reply
from cachefilesd_py.daemon import control_server
from cachefilesd_py.daemon.control_server import ControlServer

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


def handlers(gate: threading.Event | None = None) -> dict[str, Any]:
    def status(args: Mapping[str, Any], progress: Any) -> dict[str, Any]:
        if gate is not None:
            gate.wait(10)
        return {"up": True}

    def prefetch(args: Mapping[str, Any], progress: Any) -> dict[str, Any]:
        for i in range(3):
            progress({"done": i, "total": 3})
        return {"blob": args["blob"]}

    def broken(args: Mapping[str, Any], progress: Any) -> None:
        raise RuntimeError("a bug")

    return {"status": status, "prefetch": prefetch, "reload": lambda a, p: {}, "stats": broken}


@pytest.fixture
def sock_path() -> Iterator[str]:
    # not under tmp_path: its parents are root-only, and the unprivileged child must
    # reach the socket
    d = Path(tempfile.mkdtemp(prefix="ctl-"))
    d.chmod(0o755)
    yield str(d / "run" / "control.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sock_path: str) -> Iterator[ControlServer]:
    srv = ControlServer(sock_path, handlers(), read_gid=4242).start()
    yield srv
    srv.close()


def raw_exchange(path: str, data: bytes, shut: bool = True) -> list[bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(path)
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return s.makefile("rb").readlines()


def test_root_may_call_everything(server: ControlServer, sock_path: str) -> None:
    assert call(sock_path, "status") == {"up": True}
    assert call(sock_path, "reload") == {}
    seen: list[Mapping[str, Any]] = []
    assert call(sock_path, "prefetch", blob="v/c", on_progress=seen.append) == {"blob": "v/c"}
    assert [p["done"] for p in seen] == [0, 1, 2]


def test_socket_is_connectable_by_anyone(server: ControlServer, sock_path: str) -> None:
    assert os.stat(sock_path).st_mode & 0o777 == 0o666


def test_unknown_handler_and_handler_bug(server: ControlServer, sock_path: str) -> None:
    with pytest.raises(ControlError) as e:
        call(sock_path, "blobs")
    assert e.value.code is ErrorCode.UNAVAILABLE
    with pytest.raises(ControlError) as e:
        call(sock_path, "stats")
    assert e.value.code is ErrorCode.INTERNAL and "a bug" in e.value.message
    assert call(sock_path, "status") == {"up": True}  # the server lives on


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"garbage\n", ErrorCode.MALFORMED),
        (b'{"v":1,"op":"status"', ErrorCode.MALFORMED),  # EOF before the newline
        (b'{"v":3,"op":"status"}\n', ErrorCode.UNSUPPORTED_VERSION),
        (b"x" * (MAX_REQUEST_BYTES + 10), ErrorCode.TOO_LARGE),
    ],
)
def test_bad_requests_get_one_error_reply(
    server: ControlServer, sock_path: str, data: bytes, code: ErrorCode
) -> None:
    lines = raw_exchange(sock_path, data)
    assert len(lines) == 1
    reply = parse_reply(lines[0])
    assert not reply.ok and reply.error is not None and reply.error.code is code


def test_endless_request_is_cut_at_the_limit(server: ControlServer, sock_path: str) -> None:
    """A client that keeps sending without a newline gets too_large and is closed,
    the server never buffers more than the limit."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(sock_path)
        sent = 0
        try:
            while sent < 50 * MAX_REQUEST_BYTES:
                s.sendall(b"y" * 4096)
                sent += 4096
        except OSError:
            pass
        data = s.recv(65536)
    assert b"too_large" in data


def test_slow_client_times_out_without_holding_others(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_server, "REQUEST_TIMEOUT", 0.5)
    srv = ControlServer(sock_path, handlers()).start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            slow.settimeout(15)
            slow.connect(sock_path)
            slow.sendall(b'{"v":1,')
            assert call(sock_path, "status") == {"up": True}  # served meanwhile
            reply = parse_reply(slow.makefile("rb").readline())
        assert not reply.ok and reply.error is not None
        assert reply.error.code is ErrorCode.TIMEOUT
    finally:
        srv.close()


def test_connections_beyond_the_limit_are_told_busy(sock_path: str) -> None:
    gate = threading.Event()
    srv = ControlServer(sock_path, handlers(gate)).start()
    held: list[threading.Thread] = []
    results: list[Any] = []
    try:
        for _ in range(control_server.MAX_CONNECTIONS):
            t = threading.Thread(target=lambda: results.append(call(sock_path, "status")))
            t.start()
            held.append(t)
        deadline = time.monotonic() + 10
        while srv._slots._value > 0 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        with pytest.raises(ControlError) as e:
            call(sock_path, "status")
        assert e.value.code is ErrorCode.BUSY
    finally:
        gate.set()
        for t in held:
            t.join(10)
        srv.close()
    assert results == [{"up": True}] * control_server.MAX_CONNECTIONS
    assert srv.answered["busy"] == 1


def test_stale_socket_is_replaced_and_close_leaves_a_successor_alone(sock_path: str) -> None:
    Path(sock_path).parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # a dead worker's socket: the path exists, nobody listens
    first = ControlServer(sock_path, handlers()).start()
    assert call(sock_path, "status") == {"up": True}
    second = ControlServer(sock_path, handlers()).start()  # a worker taking over
    first.close()
    assert os.path.exists(sock_path)
    assert call(sock_path, "status") == {"up": True}
    second.close()
    assert not os.path.exists(sock_path)


def test_a_file_at_the_socket_path_is_refused(sock_path: str) -> None:
    Path(sock_path).parent.mkdir(parents=True)
    Path(sock_path).write_text("not a socket")
    with pytest.raises(OSError) as e:
        ControlServer(sock_path, handlers()).start()
    assert "not a socket" in str(e.value)
    assert Path(sock_path).read_text() == "not a socket"


def as_user(uid: int, gid: int, groups: list[int], fn: Any) -> tuple[str, str]:
    """Run ``fn()`` in a forked child with the given credentials; returns
    ``("ok", repr(result))`` or ``(error code, message)``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            try:
                out = ("ok", repr(fn()))
            except ControlError as err:
                out = (err.code.value, err.message)
            os.write(w, "\n".join(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read().decode()
    os.waitpid(pid, 0)
    code, _, message = data.partition("\n")
    return code, message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_callers_are_told_apart_by_the_kernel(server: ControlServer, sock_path: str) -> None:
    # a member of the control group (4242, as a supplementary group): read-only calls
    assert as_user(NOBODY, NOBODY, [4242], lambda: call(sock_path, "status")) == (
        "ok",
        "{'up': True}",
    )
    code, message = as_user(NOBODY, NOBODY, [4242], lambda: call(sock_path, "reload"))
    assert code == "forbidden" and "root only" in message
    # the control group as primary group
    assert as_user(NOBODY, 4242, [], lambda: call(sock_path, "status"))[0] == "ok"
    # anyone else: refused, with a message that says why
    code, message = as_user(NOBODY, NOBODY, [], lambda: call(sock_path, "status"))
    assert code == "forbidden" and f"uid {NOBODY}" in message
    assert server.answered["forbidden"] == 2


def test_fuzz_harness_over_its_corpus() -> None:
    import runpy

    harness = runpy.run_path(str(REPO / "fuzz" / "fuzz_control.py"))
    corpus = sorted((REPO / "fuzz" / "corpus" / "control").iterdir())
    assert corpus
    for f in corpus:
        harness["TestOneInput"](f.read_bytes())


def test_random_requests_never_crash_the_server(sock_path: str) -> None:
    """Hypothesis over the live socket: whatever the bytes, one reply line that parses
    (an error for all but valid requests), and the server keeps answering."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    srv = ControlServer(sock_path, handlers()).start()
    try:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            st.one_of(
                st.binary(max_size=3000),
                st.builds(
                    lambda a, b: a + b,
                    st.sampled_from([b'{"v":1,"op":"status"', b'{"v":1,"op":"prefetch","args":{']),
                    st.binary(max_size=200),
                ),
            )
        )
        def exchange(data: bytes) -> None:
            lines = raw_exchange(sock_path, data)
            assert len(lines) >= 1
            parse_reply(lines[-1])

        exchange()
        assert call(sock_path, "status") == {"up": True}
        assert srv.answered.get("internal", 0) == 0
    finally:
        srv.close()
