"""Configuration of the fanotify frontend: ``fanotify`` and ``fanotify_image``."""

from __future__ import annotations

import pytest

from cachefilesd_py.config.model import FanotifyImage
from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.errors import ConfigError

BASE = "dir /var/cache/fscache\nsource imgs/* http://h:8080/{volume}/{cookie}\n"


def test_fanotify_images() -> None:
    cfg = parse_config(
        BASE + "fanotify\nfanotify_image imgs/app.erofs /mnt/app\n"
        "fanotify_image imgs/chunked.erofs /mnt/chunked blob1 blob-2.img\n",
        "f",
    )
    assert cfg.fanotify and not cfg.ondemand
    assert cfg.fanotify_images == (
        FanotifyImage("imgs", "app.erofs", "/mnt/app", (), "f", 4),
        FanotifyImage("imgs", "chunked.erofs", "/mnt/chunked", ("blob1", "blob-2.img"), "f", 5),
    )


@pytest.mark.parametrize(
    ("text", "line", "rule"),
    [
        (BASE + "fanotify\n", 3, "at least one 'fanotify_image'"),
        ("dir /x\nfanotify\nfanotify_image a/b /m\n", 2, "at least one 'source'"),
        (BASE + "fanotify_image imgs/a /m\n", 3, "needs the 'fanotify' directive"),
        (BASE + "fanotify\nondemand\nfanotify_image imgs/a /m\n", 3, "exclude each other"),
        (BASE + "fanotify\nfanotify_image imgs/a\n", 4, "takes <volume>/<name>"),
        (BASE + "fanotify\nfanotify_image a /m\n", 4, "<volume>/<name>"),
        (BASE + "fanotify\nfanotify_image imgs/../x /m\n", 4, "image name '../x'"),
        (BASE + "fanotify\nfanotify_image ../x /m\n", 4, "volume '..'"),
        (BASE + "fanotify\nfanotify_image imgs/.hidden /m\n", 4, "image name"),
        (BASE + "fanotify\nfanotify_image imgs/a m\n", 4, "absolute path"),
        (BASE + "fanotify\nfanotify_image imgs/a /m,x\n", 4, "without ','"),
        (BASE + "fanotify\nfanotify_image imgs/a /m b/c\n", 4, "blob name 'b/c'"),
        (BASE + "fanotify\nfanotify_image imgs/a /m a\n", 4, "each of its blobs once"),
        (
            BASE + "fanotify\nfanotify_image imgs/a /m\nfanotify_image imgs/b /m/\n",
            5,
            "already used on line 4",
        ),
        (
            BASE + "fanotify\nfanotify_image imgs/a /m\nfanotify_image imgs/b /n a\n",
            5,
            "imgs/a is already served by line 4",
        ),
        (BASE + "fanotify\nfanotify\nfanotify_image imgs/a /m\n", 4, "given twice"),
    ],
)
def test_fanotify_rule_violations(text: str, line: int, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.conf")
    e = info.value
    assert (e.file, e.line) == ("test.conf", line), str(e)
    assert rule in e.rule, str(e)


def test_same_name_in_another_volume_is_another_blob() -> None:
    cfg = parse_config(
        BASE + "fanotify\nfanotify_image imgs/a /m\nfanotify_image other/a /n\n", "f"
    )
    assert [i.volume for i in cfg.fanotify_images] == ["imgs", "other"]
