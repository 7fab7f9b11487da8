"""The mountinfo parser both the config check and ``cachefilesctl pin PATH`` use."""

from __future__ import annotations

from cachefilesd_py.kernel.mountinfo import parse_mountinfo, unescape

TEXT = (
    "36 35 98:0 /mnt1 /mnt/par\\040ent rw,noatime master:1 shared:2 - ext3 /dev/ro\\134ot "
    "rw,errors=continue\n"
    "40 1 0:52 / /mnt/img ro,relatime - erofs none ro,fsid=img,domain_id=dom\n"
    "41 1 0:53 / /x rw - \n"  # too short after the separator: skipped
    "garbage\n"
    "42 1 0:54 / /y rw no-separator-here ext4 /dev/y rw\n"
)


def test_fields_escapes_and_optional_fields() -> None:
    first, erofs = parse_mountinfo(TEXT)
    assert first.dev == "98:0" and first.root == "/mnt1"
    assert first.mount_point == "/mnt/par ent" and first.source == "/dev/ro\\ot"
    assert first.fstype == "ext3" and first.mount_options == ("rw", "noatime")
    assert first.super_options == ("rw", "errors=continue")
    assert erofs.super_option("fsid") == "img" and erofs.super_option("domain_id") == "dom"
    assert erofs.super_option("ro") == "" and erofs.super_option("nosuch") is None


def test_unescape() -> None:
    assert unescape("a\\040b\\011c\\012d\\134e") == "a b\tc\nd\\e"
    assert unescape("no\\08escape") == "no\\08escape"
