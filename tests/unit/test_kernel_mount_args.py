"""Argument checks of the mount and fanotify wrappers that need no system call."""

from __future__ import annotations

import pytest

from cachefilesd_py.kernel import fanotify, mount


def test_erofs_options_are_joined_in_order() -> None:
    assert mount._erofs_options(["/c/b1", "/c/b2"], ["directio"]) == [
        "device=/c/b1",
        "device=/c/b2",
        "directio",
    ]


@pytest.mark.parametrize(
    ("devices", "options"), [(["/c/a,b"], []), ([], ["fsoffset=1,device=/etc/passwd"])]
)
def test_a_comma_cannot_smuggle_another_option(devices: list[str], options: list[str]) -> None:
    with pytest.raises(ValueError, match="','"):
        mount._erofs_options(devices, options)


def test_a_response_is_at_least_eight_bytes() -> None:
    with pytest.raises(ValueError, match="8 bytes"):
        fanotify.write_response(-1, b"\0" * 7)
