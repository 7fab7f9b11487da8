"""What ``cachefilesctl pin TARGET`` names: a blob, an image, a path inside one, or
a path on this host under an EROFS mount (``control/mounts.py``, mountinfo lines as
the kernel writes them)."""

from __future__ import annotations

import argparse
from typing import Any

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


#: fanotify mode: the image is mounted file-backed, its cache file the source, no fsid
FILE_BACKED = "\n".join(
    [
        MOUNTINFO,
        "50 22 0:52 / /mnt/fan ro,relatime - erofs /var/cache/fscache/fanotify/imgs/app.erofs"
        " ro,user_xattr",
        "51 50 0:53 / /mnt/fan/nested ro - erofs none ro,fsid=inner",
    ]
)


@pytest.mark.parametrize(
    ("path", "want", "asks"),
    [
        ("/mnt/fan", ("erofs,imgs/app.erofs", "/"), True),
        ("/mnt/fan/usr/lib/x.so", ("erofs,imgs/app.erofs", "/usr/lib/x.so"), True),
        ("/mnt/fan/nested/a", ("erofs,inner/inner", "/a"), False),  # the innermost mount
        ("/mnt/base/usr", ("erofs,base.erofs/base.erofs", "/usr"), False),  # fscache
        ("/mnt/loop/a", None, True),  # file-backed, but not an image the daemon serves
    ],
)
def test_image_path_of_a_file_backed_mount_by_the_daemons_images(
    path: str, want: tuple[str, str] | None, asks: bool
) -> None:
    asked: list[int] = []

    def served() -> dict[str, str]:
        asked.append(1)
        return {"/mnt/fan": "erofs,imgs/app.erofs"}

    if want is None:
        with pytest.raises(ValueError, match=r"file-backed EROFS mount \(/mnt/loop, from"):
            image_path_of(FILE_BACKED, path, served)
    else:
        assert image_path_of(FILE_BACKED, path, served) == want
    assert bool(asked) is asks, "the daemon is asked only about a mount with no fsid"


def test_pin_target_of_a_path_asks_status_for_file_backed_mounts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import builtins
    import io

    from cachefilesd_py.control import live

    real_open = builtins.open

    def fake_open(file: Any, *a: Any, **k: Any) -> Any:
        if file == "/proc/self/mountinfo":
            return io.StringIO(FILE_BACKED)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(live.os.path, "realpath", lambda p: p)
    status = {
        "images": [
            {
                "image": "imgs/app.erofs",
                "mountpoint": "/mnt/fan",
                "mounted": True,
                "blobs": ["erofs,imgs/app.erofs", "erofs,imgs/extra"],
            },
            {"image": "imgs/b", "mountpoint": "/mnt/loop", "mounted": False, "blobs": ["x/y"]},
        ]
    }
    args = argparse.Namespace(blob="/mnt/fan/usr", image=False, path=None)
    assert live.pin_target(args, lambda: status) == ("erofs,imgs/app.erofs", "/usr")
    with pytest.raises(ValueError, match="does not serve"):  # not mounted: not served
        live.pin_target(
            argparse.Namespace(blob="/mnt/loop/a", image=False, path=None), lambda: status
        )
