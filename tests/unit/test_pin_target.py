"""What ``cachefilesctl pin TARGET`` names: a blob, an image, a path inside one, or
a path on this host under an EROFS mount (``control/mounts.py``, mountinfo lines as
the kernel writes them)."""

from __future__ import annotations

import argparse

import pytest

from cachefilesd_py.control.mounts import erofs_mounts, image_path_of

MOUNTINFO = "\n".join(
    [
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
        "40 22 0:45 / /mnt/base rw,relatime shared:20 - erofs none ro,fsid=base.erofs",
        "41 22 0:46 / /mnt/my\\040image ro - erofs none ro,fsid=img,domain_id=common",
        "42 40 0:47 / /mnt/base/inner ro - erofs none ro,fsid=inner",
        "43 22 0:45 /usr/lib /srv/lib ro master:20 - erofs none ro,fsid=base.erofs",
        "44 22 7:0 / /mnt/loop ro - erofs /dev/loop0 ro,user_xattr",
    ]
)


def test_erofs_mounts_over_fscache_only() -> None:
    mounts = erofs_mounts(MOUNTINFO)
    assert [m.mountpoint for m in mounts] == [
        "/mnt/base",
        "/mnt/my image",
        "/mnt/base/inner",
        "/srv/lib",
    ]
    assert [m.blob for m in mounts] == [
        "erofs,base.erofs/base.erofs",
        "erofs,common/img",
        "erofs,inner/inner",
        "erofs,base.erofs/base.erofs",
    ]


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/mnt/base", ("erofs,base.erofs/base.erofs", "/")),
        ("/mnt/base/usr/lib/x.so", ("erofs,base.erofs/base.erofs", "/usr/lib/x.so")),
        ("/mnt/base/inner/a", ("erofs,inner/inner", "/a")),  # the innermost mount
        ("/mnt/baseline/a", None),  # a prefix of a mountpoint's name is not under it
        ("/mnt/my image/d", ("erofs,common/img", "/d")),
        ("/srv/lib/x.so", ("erofs,base.erofs/base.erofs", "/usr/lib/x.so")),  # bind root
        ("/mnt/loop/a", None),  # file- or block-backed: not this daemon's
        ("/etc/passwd", None),
    ],
)
def test_image_path_of(path: str, want: tuple[str, str] | None) -> None:
    if want is None:
        with pytest.raises(ValueError, match="not on an EROFS mount"):
            image_path_of(MOUNTINFO, path)
    else:
        assert image_path_of(MOUNTINFO, path) == want


def test_pin_arguments() -> None:
    from cachefilesd_py.control.live import pin_target

    def ns(blob: str, image: bool = False, path: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(blob=blob, image=image, path=path)

    assert pin_target(ns("erofs,a/a")) == ("erofs,a/a", "")
    assert pin_target(ns("erofs,a/a", image=True)) == ("erofs,a/a", "/")
    assert pin_target(ns("erofs,a/a", path="/usr")) == ("erofs,a/a", "/usr")
