"""The name of a blob, one type for the whole daemon: :class:`BlobKey`.

A blob is one cache file's worth of bytes: an EROFS image, or one of the extra blobs
its device table names. Every part of the daemon keys its state by the blob: the
engine (which blobs are open, their fills), presence (which sidecar belongs to which
blob), space (which blob a cache file is, whether it is pinned or in use) and the
``source`` rules (which URL serves it). They all use this type, and only this module
knows how its parts are spelled.

**The two parts.** ``volume_key`` names a set of blobs and ``name`` one blob in it. The
spelling is fscache's, because on-demand mode is where blobs were named first and
sidecars written since then record it:

- on-demand mode (:meth:`BlobKey.ondemand`): exactly what the kernel's OPEN carries,
  the volume key (``erofs,<fsid>`` or ``erofs,<domain_id>``) and the cookie key (the
  fsid for the primary image, a device tag or ``device=`` name for extra blobs).
  Both are bytes taken by length; the cookie key is not a C string.
- a frontend that names blobs itself (the fanotify frontend prepares an image file per
  blob; ``cachefilesctl``): :meth:`BlobKey.named` with a volume and a name, spelled the
  same way (``erofs,`` + volume), so a blob has one key, one sidecar and one set of
  rules whichever kernel interface serves it.

**What is derived from it, once:**

- :attr:`~BlobKey.volume`: the volume without its ``erofs,`` prefix. This is the only
  place that prefix is stripped; the ``source``, ``source_chunk_size``, ``pin`` and
  ``volume_max_bytes`` globs all see it this way;
- :attr:`~BlobKey.match_name`: ``<volume>/<name>``, what those globs match;
- :attr:`~BlobKey.digest`: sha256 of ``volume_key NUL name``, which names the blob's
  presence sidecar and is recorded in it;
- ``str(key)``: ``<volume_key>/<name>`` for logs (undecodable bytes escaped);
- the on-demand cache tree, both ways (``docs/protocol-ondemand.md`` §5):
  :meth:`~BlobKey.cache_path` is where cachefiles keeps the blob's file,
  :meth:`BlobKey.from_cache_path` which blob a file of that tree is, including the
  ``S``/``T``/``E`` names of cookies that hold ``/`` or bytes outside ``!``..``DEL``.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cachefilesd_py.kernel import layout

#: EROFS's volume keys start with this; it carries no information for the daemon
EROFS_PREFIX: Final = b"erofs,"


@dataclass(frozen=True, slots=True)
class BlobKey:
    """A blob's name: its volume key (no trailing NUL) and its name in the volume."""

    volume_key: bytes
    name: bytes

    @classmethod
    def ondemand(cls, volume_key: bytes, cookie_key: bytes) -> BlobKey:
        """The key of the blob an on-demand OPEN names (a trailing NUL of the volume
        key, as ``volume_key_size`` counts it, is dropped)."""
        if volume_key.endswith(b"\0"):
            volume_key = volume_key[:-1]
        return cls(volume_key, cookie_key)

    @classmethod
    def named(cls, volume: str | bytes, name: str | bytes) -> BlobKey:
        """The key of blob ``name`` in ``volume``, for frontends that name blobs
        themselves: the same key on-demand mode would give it."""
        vol = volume.encode() if isinstance(volume, str) else volume
        raw = name.encode() if isinstance(name, str) else name
        return cls(EROFS_PREFIX + vol, raw)

    @property
    def volume(self) -> bytes:
        """The volume as rules see it: the key without its ``erofs,`` prefix."""
        return volume_of(self.volume_key)

    @property
    def match_name(self) -> str:
        """``<volume>/<name>``, decoded leniently: what ``source``, ``pin`` and
        ``source_chunk_size`` globs match."""
        return _text(self.volume) + "/" + _text(self.name)

    @property
    def digest(self) -> bytes:
        """sha256 of ``volume_key NUL name``: names the presence sidecar."""
        import hashlib  # on-demand only: OpenSSL's libcrypto is slow to load in a guest

        return hashlib.sha256(self.volume_key + b"\0" + self.name).digest()

    def __str__(self) -> str:
        return _text(self.volume_key) + "/" + _text(self.name)

    # -- the on-demand cache tree -----------------------------------------------------

    def cache_path(self, cache_dir: Path | str) -> Path:
        """``<cache_dir>/cache/I<volume key>/@xx/<name>``: where cachefiles keeps this
        blob's file. ValueError for keys the kernel cannot store."""
        return layout.object_path(cache_dir, self.volume_key, self.name)

    @classmethod
    def from_cache_path(cls, volume_dir: str, file_name: str) -> BlobKey | None:
        """The blob whose cache file is ``file_name`` in the volume directory named
        ``volume_dir`` (``I<volume key>``), or None if no key maps there. For ``S``/``T``
        names the shortest key is returned (see ``kernel/layout.py``)."""
        volume_key = layout.volume_key_of_dir_name(volume_dir)
        if volume_key is None:
            return None
        cookie = layout.cookie_key_of_name(file_name)
        if cookie is None:
            return None
        return cls(volume_key, cookie)


def volume_of(volume_key: bytes) -> bytes:
    """A volume key without its ``erofs,`` prefix (``erofs,imgs`` → ``imgs``; an NFS
    key such as ``nfs,4.2,...`` stays as it is)."""
    return volume_key.removeprefix(EROFS_PREFIX)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")
