"""Hostile keys against a real nginx on loopback (issue 10 item 4): a key must never
change which resource the template names. nginx decodes ``%2F`` and normalises the
path, so percent-escaping a key does not keep it in its segment: the first test shows
the escape is real (the test can see it), the second that no key reaches it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.config.model import SourceRule
from cachefilesd_py.errors import SourceError
from cachefilesd_py.sources.open import SourceFactory, SourceSettings
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.sources.resolve import SourceResolver
from tests.vm.rig import Nginx, start_nginx

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx-light")

SECRET = b"the private blob: credentials attached " * 50
PUBLIC = b"public blob " * 400
HOSTILE = [
    b"../private/secret.img",
    b"..%2Fprivate%2Fsecret.img",
    b"..%252Fprivate%252Fsecret.img",
    b"%2e%2e/private/secret.img",
    b"..\\private\\secret.img",
    b"../../public/../private/secret.img",
    b"..;/private/secret.img",
    b"./../private/secret.img",
    b"secret.img/../../private/secret.img",
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Nginx]:
    root = tmp_path / "www"
    (root / "public").mkdir(parents=True)
    (root / "private").mkdir()
    (root / "public" / "blob.img").write_bytes(PUBLIC)
    (root / "private" / "secret.img").write_bytes(SECRET)
    n = start_nginx(root, tmp_path, access_log=True)
    yield n
    n.proc.terminate()
    n.proc.wait(10)


def read_whole(factory: SourceFactory, url: str) -> bytes:
    src = factory.open(url)
    size = src.identity(Deadline.after(5)).size
    buf = bytearray(size)
    src.fetch_into(0, memoryview(buf), Deadline.after(5))
    return bytes(buf)


def test_nginx_decodes_an_escaped_slash(served: Nginx) -> None:
    """What the old resolver sent for ``../private/secret.img``: nginx serves the secret."""
    f = SourceFactory(SourceSettings(retries=0))
    assert read_whole(f, f"{served.url}/public/..%2Fprivate%2Fsecret.img") == SECRET
    f.close()


def test_no_key_reaches_another_resource(served: Nginx) -> None:
    rules = SourceResolver([SourceRule("*", served.url + "/public/{cookie}")])
    f = SourceFactory(SourceSettings(retries=0, headers_for=lambda u: {"Authorization": "x"}))
    assert read_whole(f, str(rules.resolve(b"erofs,v", b"blob.img"))) == PUBLIC
    before = len(served.requested())
    for cookie in HOSTILE:
        url = rules.resolve(b"erofs,v", cookie)
        if url is None:
            continue
        try:
            got = read_whole(f, url)
        except SourceError:
            continue
        assert got != SECRET, f"{cookie!r} reached the private file through {url}"
    f.close()
    assert not any("private" in line for line in served.requested()[before:])
