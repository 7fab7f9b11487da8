"""Presence sidecar bytes → a ``Sidecar`` or ``PresenceCorrupt`` (``format.decode``),
and through the store's load paths on real files → a ``BlobPresence`` (trusted only if
the bytes are a valid sidecar of the expected blob) or a miss, never an exception.

Checksums stop a byte-level fuzzer cold (a mutation almost never keeps a crc32 valid),
so each input is also tried *resealed*: both crcs recomputed where its header puts
them, which is what an attacker who can write the file does. The store part writes the
input as the sidecar of :data:`KEY` and binds the cache file to the binding id found
at bytes 32..48 of it, so a mutated sidecar gets past the binding check and reaches the
geometry, token and bitmap checks behind it. The
seeds in ``fuzz/corpus/sidecar/`` are sidecars written by ``PresenceStore`` for
:data:`KEY` with :data:`BLOB_SIZE`, :data:`CHUNK` and :data:`TOKEN`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.errors import PresenceCorrupt
from cachefilesd_py.presence import format as fmt
from cachefilesd_py.presence.bitmap import ChunkBitmap, ChunkGeometry
from cachefilesd_py.presence.store import BINDING_XATTR, BlobPresence, PresenceStore
from cachefilesd_py.testing.sidecars import reseal

MAX_LEN = 4096
KEY = BlobKey(b"erofs,fuzz.img", b"fuzz.img")
CHUNK = 4096
BLOB_SIZE = 100 * CHUNK + 123
TOKEN = '409723:"5f2b-1a"'
TOKENS = (fmt.MAGIC, TOKEN.encode())

_work = Path(tempfile.mkdtemp(prefix="fuzz-sidecar-"))
atexit.register(shutil.rmtree, _work, True)
STORE = PresenceStore(_work / "presence")
CACHE_FILE = _work / "Dfuzz.img"
CACHE_FILE.write_bytes(b"")


def _check_decoded(data: bytes) -> fmt.Sidecar | None:
    try:
        sc = fmt.decode(data)
    except PresenceCorrupt:
        return None
    geometry = ChunkGeometry(sc.blob_size, sc.chunk_size)
    assert geometry.nchunks == sc.nchunks
    ChunkBitmap(sc.nchunks, sc.bitmap)
    assert fmt.encode(sc) == data
    return sc


def _check_store(data: bytes, sc: fmt.Sidecar | None) -> None:
    STORE.sidecar_path(KEY).write_bytes(data)
    os.setxattr(CACHE_FILE, BINDING_XATTR, data[32:48].hex().encode())
    bp = STORE.load(KEY, CACHE_FILE, BLOB_SIZE, TOKEN, chunk_size=CHUNK)
    assert isinstance(bp, BlobPresence) and bp.token == TOKEN
    if bp.trusted:  # a trusted sidecar keeps its own chunk size
        assert sc is not None and bp.bitmap.to_bytes() == sc.bitmap
        assert (sc.blob_size, sc.token) == (BLOB_SIZE, TOKEN)
        assert bp.geometry == ChunkGeometry(BLOB_SIZE, sc.chunk_size)
    else:
        assert bp.geometry == ChunkGeometry(BLOB_SIZE, CHUNK)
        assert bp.bitmap.count() == 0
    bound = STORE.load_bound(KEY, CACHE_FILE)
    if bound is not None:
        assert sc is not None and bound.bitmap.to_bytes() == sc.bitmap
        assert bound.geometry == ChunkGeometry(sc.blob_size, sc.chunk_size)


def TestOneInput(data: bytes) -> None:
    _check_store(data, _check_decoded(data))
    sealed = reseal(data)
    if sealed != data:
        _check_store(sealed, _check_decoded(sealed))
