"""``python -m fuzz.seeds``: (re)write the generated seed inputs of ``fuzz/corpus/``.

Deterministic: the same files every time. Seeds captured from the real kernel
(``kernel-*`` files, written by ``tests/vm/test_fuzz_seeds_guest.py``) and files
merged from fuzzing runs are left alone.

- ``config/``: the shipped ``conf/cachefilesd.conf`` and one configuration per area
  (classic, on-demand with sources and sizes, caps and pins);
- ``wire/``: OPEN, READ and CLOSE messages as the kernel lays them out;
- ``sidecar/``: sidecars written by ``PresenceStore`` itself for the blob the harness
  expects (empty, partly and fully present) and for another geometry;
- ``classic_state/``: state lines of current and older kernels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.presence.bitmap import ChunkBitmap, ChunkGeometry
from cachefilesd_py.presence.store import BlobPresence, PresenceStore

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

CONFIGS = {
    "classic.conf": "dir /var/cache/fscache\ntag mycache\nbrun 10%\nbcull 7%\nbstop 3%\n"
    "frun 10%\nfcull 7%\nfstop 3%\nculltable 14\nresume_thresholds 1000 -\ndebug 0x1\n",
    "ondemand.conf": "dir /var/cache/fscache\ntag erofs\nondemand\n"
    "source images/* https://blobs.example.com/{volume}/{cookie}\n"
    "source * file:///srv/blobs/{cookie}\n"
    "chunk_size 1M\nsource_chunk_size images/* 256K\nreadahead 4M\n"
    "fetch_timeout 2.5\nfetch_retries 3\nfetch_concurrency 16\n"
    "source_headers images/* /etc/cachefilesd-py/headers\nca_file /etc/ssl/ca.pem\n",
    "caps.conf": "dir /c\nondemand\nsource * http://127.0.0.1:8080/{cookie}\n"
    "cache_max_bytes 10G\ncache_max_objects 100000\nvolume_max_bytes erofs,img 1G\n"
    "cull_policy lru\npin erofs,img/base.img\nnocull\nsecctx system_u:object_r:t\n",
}

STATE_LINES = {
    "6.12.bin": b"cull=0 frun=237 fcull=195 fstop=51 brun=1e3c bcull=1428 bstop=a14 "
    b"freleased=0 breleased=0",
    "culling.bin": b"cull=1 frun=237 fcull=195 fstop=51 brun=1e3c bcull=1428 bstop=a14 "
    b"freleased=3 breleased=1a0",
    "5.10-no-released.bin": b"cull=0 frun=1c3 fcull=149 fstop=40 brun=10e2 bcull=c1b bstop=452",
}


def wire_seeds() -> dict[str, bytes]:
    return {
        "open-erofs-test.img.bin": wire.encode_message(
            wire.OpenRequest(7, 3, b"erofs,test.img", b"test.img", 9, 0)
        ),
        "open-domain.bin": wire.encode_message(
            wire.OpenRequest(0, 1, b"erofs,domain,shared", b"layer\0sha256", 5, 0)
        ),
        "read-first-page.bin": wire.encode_message(wire.ReadRequest(2, 3, 0, 4096)),
        "read-1m.bin": wire.encode_message(wire.ReadRequest(11, 3, 1 << 20, 1 << 20)),
        "close.bin": wire.encode_message(wire.CloseRequest(12, 3)),
    }


def sidecar_seeds() -> dict[str, bytes]:
    # the blob the harness expects; imported here, not at the top, so that
    # `python -m fuzz.seeds` does not need the harness's temporary store
    from fuzz.fuzz_sidecar import BLOB_SIZE, CHUNK, KEY, TOKEN

    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = PresenceStore(Path(tmp))
        shapes = {
            "expected-empty.bin": (KEY, BLOB_SIZE, CHUNK, TOKEN, []),
            "expected-partial.bin": (KEY, BLOB_SIZE, CHUNK, TOKEN, [(0, 3), (17, 40), (100, 1)]),
            "expected-full.bin": (KEY, BLOB_SIZE, CHUNK, TOKEN, [(0, 101)]),
            "other-geometry.bin": (KEY, 5 << 30, 1 << 20, "5368709120:-", [(0, 4), (5119, 1)]),
        }
        for name, (key, size, chunk, token, runs) in shapes.items():
            geometry = ChunkGeometry(size, chunk)
            bp = BlobPresence(key, geometry, token, bytes(range(16)), ChunkBitmap(geometry.nchunks))
            for first, count in runs:
                bp.note_written(first, count)
            store.checkpoint([bp], force=True)
            out[name] = store.sidecar_path(key).read_bytes()
        store.close()
    return out


def write_all() -> None:
    conf = (HERE.parent / "conf" / "cachefilesd.conf").read_bytes()
    groups = {
        "config": {"cachefilesd.conf": conf, **{k: v.encode() for k, v in CONFIGS.items()}},
        "wire": wire_seeds(),
        "sidecar": sidecar_seeds(),
        "classic_state": STATE_LINES,
    }
    for group, files in groups.items():
        (CORPUS / group).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (CORPUS / group / name).write_bytes(data)
            print(f"fuzz/corpus/{group}/{name}: {len(data)} bytes")


if __name__ == "__main__":
    write_all()
