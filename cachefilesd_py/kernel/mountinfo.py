"""``/proc/<pid>/mountinfo``, parsed (pure): what is mounted where, as the kernel says.

One line per mount (``proc(5)``)::

    36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue

that is: id, parent id, major:minor, root, mount point, mount options, optional fields,
``-``, fstype, source, super options.

``root`` is the directory of the filesystem the mount shows (a bind mount of a
subdirectory shows that subdirectory). The optional fields are zero or more, ended by a
lone ``-``. The kernel writes a blank, tab, newline or backslash in a path or source as
an octal escape (``\\040``); :func:`unescape` turns them back. A line that does not have
this shape is skipped, never guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """A mountinfo field with its ``\\ooo`` escapes turned back into characters."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    dev: str  #: ``major:minor`` of the filesystem
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    def super_option(self, name: str) -> str | None:
        """The value of ``name=value`` among the super options (``""`` for a bare
        ``name``), or None."""
        for opt in self.super_options:
            key, eq, value = opt.partition("=")
            if key == name:
                return value if eq else ""
        return None


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every well-formed line of a mountinfo text, in order."""
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        out.append(
            MountEntry(
                dev=fields[2],
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                mount_options=tuple(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=unescape(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")),
            )
        )
    return out
