"""``cachefilesctl verify --offline``: a blob checked without the daemon."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.load import load_config
from cachefilesd_py.daemon.app import STATE_DIR_NAME, engine_settings, source_settings
from cachefilesd_py.engine.service import chunk_size_for
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.presence.verify import verify
from cachefilesd_py.sources.open import SourceFactory
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.sources.resolve import SourceResolver


def verify_offline(args: argparse.Namespace) -> int:
    """Compare a blob's presence bitmap with its cache file and its source."""
    if args.volume.startswith("erofs,"):
        print(
            f"cachefilesctl: spell the volume as the configuration does: "
            f"{args.volume.removeprefix('erofs,')!r}, without 'erofs,'",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(args.f)
    assert cfg.dir is not None
    key = BlobKey.named(args.volume, args.cookie)  # the volume as the config spells it
    try:
        path: Path | None = key.cache_path(cfg.dir)
    except ValueError:  # a key the kernel could not have stored
        path = None
    url = SourceResolver(cfg.sources).resolve(key.volume_key, key.name)
    if path is None or url is None or not path.exists():
        print("no cache file or no source for that blob")
        return 1
    source = SourceFactory(source_settings(cfg)).open(url)
    ident = source.identity(Deadline.after(cfg.fetch_timeout))
    chunk = chunk_size_for(engine_settings(cfg), key)
    store = PresenceStore(Path(cfg.dir) / STATE_DIR_NAME / "presence")
    presence = store.load(key, path, ident.size, ident.token(), chunk_size=chunk)

    def read_source(off: int, n: int) -> bytes:
        buf = bytearray(n)
        source.fetch_into(off, memoryview(buf), Deadline.after(cfg.fetch_timeout))
        return bytes(buf)

    report = verify(presence, path, read_source)
    print(
        f"trusted={presence.trusted} chunks={report.chunks} present={report.present} "
        f"lagging={report.lagging} errors={len(report.errors)}"
    )
    for err in report.errors[:20]:
        print("  " + err)
    return 0 if report.ok and presence.trusted else 1
