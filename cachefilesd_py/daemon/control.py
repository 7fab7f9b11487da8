"""What the control socket's operations do, against the serving daemon's live state.

``control/schema.py`` says what may be asked, ``daemon/control_server.py`` carries the
exchange; this module answers. Each handler runs in the server's connection thread,
reads the engine's state under its leaf locks (``Engine.blobs()``, a presence bitmap's
snapshot) and never holds a lock across I/O, so the serving path never waits for it.

The answers are plain JSON values, documented in ``docs/control.md``; ``cachefilesctl``
draws them, ``--json`` prints them as they are.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from cachefilesd_py import __version__
from cachefilesd_py.config.model import Config
from cachefilesd_py.control.presence_map import fold
from cachefilesd_py.control.schema import OPERATIONS, ControlError, ErrorCode
from cachefilesd_py.daemon.control_server import ControlServer, Handler
from cachefilesd_py.daemon.metrics import Figures, Metrics
from cachefilesd_py.daemon.pinning import Pinner, parse_key
from cachefilesd_py.engine.blob import Blob, BlobKey
from cachefilesd_py.engine.fill import Sink
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.errors import SourceError
from cachefilesd_py.presence.verify import verify
from cachefilesd_py.sources.policy import Deadline
from cachefilesd_py.space.pins import PinStore
from cachefilesd_py.space.stats import SpaceSnapshot

log = structlog.get_logger("control")

#: bytes a prefetch asks for per step (one progress line each)
PREFETCH_STEP = 4 << 20

Progress = Callable[[Mapping[str, Any]], None]

#: what ``status`` names as the kernel interface, by mode
KERNEL_INTERFACES = {
    "ondemand": "/dev/cachefiles (ondemand)",
    "classic": "/dev/cachefiles",
    "fanotify": "fanotify pre-content events (EROFS file-backed mounts)",
}


def group_id(name: str | None) -> int | None:
    """The gid of ``control_group`` (a name or a number); an unknown name is an error
    the operator must see at start, not a silently closed door."""
    if name is None:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ControlError(
            ErrorCode.UNAVAILABLE, f"control_group {name!r}: no such group"
        ) from None


@dataclass
class ServingState:
    """What the handlers read: the serving daemon's parts (``daemon/app.py`` fills it)."""

    mode: str
    cache_dir: Path
    config: Callable[[], Config]
    collect: Callable[[], dict[str, object]]
    engine: Engine | None = None
    objects: Callable[[], int] = lambda: 0
    reload: Callable[[], dict[str, Any]] | None = None
    #: ``credentials reload`` (None: not available in this mode)
    credentials_reload: Callable[[], dict[str, Any]] | None = None
    cull_plan: Callable[[], dict[str, Any]] | None = None
    cull_now: Callable[[], dict[str, Any]] | None = None
    #: the sink of a kernel object open on a blob (None: no object has it open)
    sink_for: Callable[[Blob], Sink | None] | None = None
    #: fanotify mode: makes ``[offset, offset+length)`` of an open blob present through
    #: the mode's own fill path (used by ``prefetch`` instead of ``sink_for``)
    fill: Callable[[Blob, int, int], None] | None = None
    #: where a blob's cache file is (None: cachefiles' layout under ``cache_dir``)
    cache_file: Callable[[BlobKey], Path | None] | None = None
    #: what a mode adds to ``status`` (fanotify: the images and their mounts) and to
    #: each blob's description (fanotify: its image and mount point)
    more_status: Callable[[], dict[str, Any]] = dict
    more_blob: Callable[[Blob], dict[str, Any]] = lambda _blob: {}
    histograms: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    #: the core's labelled counts (``daemon/metrics.py`` LABELLED keys)
    counts: Callable[[], Mapping[str, Mapping[str, int]]] = dict
    #: the cache tree as the culler's last scan found it: (unix time, objects, bytes)
    last_scan: Callable[[], tuple[float, int, int] | None] = lambda: None
    #: the pins made through ``cachefilesctl pin`` (``space/pins.py``); None: no pins
    pins: PinStore | None = None
    #: called after the offline policy was switched (held READs ask again)
    policy_changed: Callable[[], None] | None = None
    #: fanotify mode: the blobs of the served image whose primary blob is the key, in
    #: ``device=`` order (None: read the extra blobs from the image's device table)
    devices_of: Callable[[BlobKey], list[BlobKey] | None] = lambda _key: None


class ControlHandlers:
    """The operations of ``control/schema.py``, answered from a :class:`ServingState`."""

    def __init__(self, state: ServingState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        self.pinner = Pinner(state, self._describe)

    def table(self) -> dict[str, Handler]:
        table: dict[str, Handler] = {
            "status": lambda a, p: self.status(),
            "stats": lambda a, p: self.stats(),
            "metrics": lambda a, p: {"text": self.metrics.text()},
        }
        if self.state.engine is not None:
            table |= {
                "blobs": lambda a, p: self.blobs(a["limit"]),
                "show": lambda a, p: self.show(a["blob"], a["width"]),
                "verify": lambda a, p: self.verify(a["blob"], p),
                "prefetch": lambda a, p: self.prefetch(a["blob"], a["offset"], a["length"], p),
            }
        if self.state.engine is not None and self.state.pins is not None:
            table |= {
                "pin": lambda a, p: self.pinner.pin(a["blob"], a["path"], p),
                "unpin": lambda a, p: self.unpin(a["blob"]),
                "pins": lambda a, p: self.pins(),
            }
        if self.state.engine is not None and self.state.mode == "ondemand":
            table["offline_policy"] = lambda a, p: self.offline_policy(
                a["pattern"] or None, a["policy"]
            )
            table["conflicts"] = lambda a, p: self.conflicts()
            table["resolve"] = lambda a, p: self.resolve(a["blob"], a["how"])
        if self.state.reload is not None:
            reload = self.state.reload
            table["reload"] = lambda a, p: reload()
        if self.state.credentials_reload is not None:
            creds = self.state.credentials_reload
            table["credentials_reload"] = lambda a, p: creds()
        if self.state.cull_plan is not None:
            plan = self.state.cull_plan
            table["cull_plan"] = lambda a, p: plan()
        if self.state.cull_now is not None:
            now = self.state.cull_now
            table["cull"] = lambda a, p: now()
        for op in OPERATIONS.keys() - table.keys():  # refused, naming the mode
            table[op] = _refuse(op, self.state.mode)
        return table

    # -- read-only -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        cfg = self.state.config()
        snap = SpaceSnapshot.of(str(self.state.cache_dir))
        engine = self.state.engine
        blobs = engine.blobs() if engine is not None else []
        return {
            "version": __version__,
            "pid": os.getpid(),
            "mode": self.state.mode,
            "kernel_interface": KERNEL_INTERFACES.get(self.state.mode, "/dev/cachefiles"),
            "cache_dir": str(self.state.cache_dir),
            "uptime_s": round(time.monotonic() - self.state.started, 1),
            "space": {
                "bytes_total": snap.blocks * snap.block_size,
                "bytes_free": snap.blocks_free * snap.block_size,
                "files_total": snap.files,
                "files_free": snap.files_free,
                "thresholds_pct": {
                    n: cfg.threshold(n)
                    for n in ("brun", "bcull", "bstop", "frun", "fcull", "fstop")
                },
                "cache_max_bytes": cfg.cache_max_bytes,
                "cache_max_objects": cfg.cache_max_objects,
                "volume_max_bytes": {r.pattern: r.size for r in cfg.volume_max_bytes},
            },
            "objects": self.state.objects(),
            "open_blobs": len(blobs),
            "fetches_in_flight": sum(len(b.inflight) for b in blobs),
            **(offline_status(engine) if engine is not None else {}),
            **self.state.more_status(),
        }

    def conflicts(self) -> dict[str, Any]:
        """The conflict book (``engine/conflicts.py``), each with whether it is open."""
        engine = self.state.engine
        assert engine is not None
        busy = {str(b.key) for b in engine.blobs()}
        return {
            "conflicts": [{**c.to_json(), "open": c.blob in busy} for c in engine.conflicts.all()],
            "needing_attention": engine.conflicts.needing_attention(),
        }

    def resolve(self, blob: str, how: str) -> dict[str, Any]:
        from cachefilesd_py.engine.conflicts import Resolution

        engine = self.state.engine
        assert engine is not None
        try:
            done = engine.conflicts.resolve(blob, Resolution(how))
        except KeyError:
            raise ControlError(ErrorCode.NOT_FOUND, f"{blob}: no conflict") from None
        is_open = any(str(b.key) == blob for b in engine.blobs())
        if done.resolution is Resolution.KEEP:
            note = "the cached version stays in force"
        elif is_open:
            note = "open objects keep the cached version; the next OPEN takes the origin's"
        else:
            note = "the next OPEN takes the origin's version"
        return {**done.to_json(), "open": is_open, "note": note}

    def offline_policy(self, pattern: str | None, text: str) -> dict[str, Any]:
        """Switch the offline policy of ``pattern`` (None: the default) at run time."""
        from cachefilesd_py.engine.offline_policy import OfflinePolicy

        engine = self.state.engine
        assert engine is not None
        policy = OfflinePolicy.parse(text)
        engine.gate.set_policy(pattern, policy)
        log.info("offline_policy.set", pattern=pattern, policy=str(policy))
        if self.state.policy_changed is not None:
            self.state.policy_changed()
        return {"pattern": pattern, "policy": str(policy), **offline_status(engine)}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counters": {}, "latency_ms": {}, "by_label": self.state.counts()}
        for k, v in self.state.collect().items():
            if k.endswith("_ms") or k.endswith("_n"):
                out["latency_ms"][k] = v
            else:
                out["counters"][k] = v
        return out

    def _find(self, name: str) -> Blob:
        assert self.state.engine is not None
        blobs = self.state.engine.blobs()
        for blob in blobs:
            if str(blob.key) == name:
                return blob
        raise ControlError(
            ErrorCode.NOT_FOUND,
            f"no open blob {name!r} (the daemon knows the blobs the kernel has open; "
            f"{len(blobs)} now, see 'cachefilesctl blobs')",
        )

    def _describe(self, blob: Blob) -> dict[str, Any]:
        cfg = self.state.config()
        presence = blob.presence
        present = 0
        if presence is not None:
            with presence.lock:
                present = presence.bitmap.count()
        nchunks = blob.geometry.nchunks
        key = str(blob.key)
        match_name = key.removeprefix("erofs,")
        return {
            "blob": key,
            "size": blob.size,
            "chunk_size": blob.chunk_size,
            "chunks": nchunks,
            "present_chunks": present,
            "present_pct": round(100.0 * present / nchunks, 2) if nchunks else 100.0,
            "trusted": bool(presence is not None and presence.trusted),
            "source": blob.identity.url,
            **self.state.more_blob(blob),
            "users": blob.users,
            "in_flight": len(blob.inflight),
            **_last_use(blob.last_use),
            "pinned": any(fnmatch.fnmatchcase(match_name, p) for p in cfg.pins)
            or (self.state.pins is not None and self.state.pins.is_pinned(key)),
        }

    def blobs(self, limit: int) -> dict[str, Any]:
        assert self.state.engine is not None
        blobs = sorted(self.state.engine.blobs(), key=lambda b: str(b.key))
        shown = blobs[:limit] if limit else blobs
        return {"blobs": [self._describe(b) for b in shown], "total": len(blobs)}

    def show(self, name: str, width: int) -> dict[str, Any]:
        blob = self._find(name)
        out = self._describe(blob)
        if blob.presence is None:
            raise ControlError(ErrorCode.UNAVAILABLE, f"{name}: no presence bitmap")
        _version, bits = blob.presence.snapshot()
        out["cells"] = fold(bits, blob.geometry.nchunks, width)
        return out

    def verify(self, name: str, progress: Progress) -> dict[str, Any]:
        """Check ``name``'s presence bitmap against its cache file and its source
        (``presence/verify.py``). A blob the kernel has open is checked as the engine
        holds it; any other blob of the cache tree is opened by the engine for the
        check (under a use lease, so no trim runs meanwhile) and released after."""
        engine = self.state.engine
        assert engine is not None
        open_blob = next((b for b in engine.blobs() if str(b.key) == name), None)
        if open_blob is not None:
            return self._verify_blob(open_blob, progress)
        key = parse_key(name)
        cache_file = self._cache_file(key)
        if cache_file is None or not cache_file.exists():
            raise ControlError(ErrorCode.NOT_FOUND, f"{name}: no such blob in the cache tree")
        with self.pinner.idle_blob(key, cache_file, bind=False) as blob:
            return self._verify_blob(blob, progress)

    def _cache_file(self, key: BlobKey) -> Path | None:
        return self.pinner.cache_file(key)

    def _verify_blob(self, blob: Blob, progress: Progress) -> dict[str, Any]:
        name = str(blob.key)
        if blob.presence is None:
            raise ControlError(ErrorCode.UNAVAILABLE, f"{name}: no presence bitmap")
        cache_file = self._cache_file(blob.key)
        if cache_file is None or not cache_file.exists():
            raise ControlError(
                ErrorCode.FAILED,
                f"{name}: its cache file is new and not linked into the cache tree yet "
                "(the kernel links it when it drops the object); verify it after that",
            )
        timeout = self.state.config().fetch_timeout

        def read_source(off: int, n: int) -> bytes:
            buf = bytearray(n)
            blob.source.fetch_into(off, memoryview(buf), Deadline.after(timeout))
            return bytes(buf)

        progress({"phase": "verify", "blob": name, "chunks": blob.geometry.nchunks})
        try:
            report = verify(blob.presence, cache_file, read_source)
        except (SourceError, OSError) as exc:
            raise ControlError(ErrorCode.FAILED, f"{name}: {exc}") from None
        return {
            "blob": name,
            "trusted": blob.presence.trusted,
            "chunks": report.chunks,
            "present": report.present,
            "lagging": report.lagging,
            "errors": report.errors[:100],
            "ok": report.ok,
        }

    # -- mutating --------------------------------------------------------------------

    def unpin(self, name: str) -> dict[str, Any]:
        """Drop a pin made by ``pin`` (a config ``pin`` glob stays: edit the file)."""
        assert self.state.pins is not None
        try:
            removed = self.state.pins.unpin(name)
        except OSError as exc:
            raise ControlError(ErrorCode.FAILED, f"{name}: unpin not saved: {exc}") from None
        if not removed:
            raise ControlError(ErrorCode.NOT_FOUND, f"{name} is not pinned by 'cachefilesctl pin'")
        log.info("control.unpinned", blob=name)
        key = parse_key(name)
        still = any(fnmatch.fnmatchcase(key.match_name, p) for p in self.state.config().pins)
        return {"blob": name, "unpinned": True, "config_pin_still_holds": still}

    def pins(self) -> dict[str, Any]:
        """Every pin: those of ``pin`` (source ``cli``) with their present share, the
        config's globs (source ``config``) and the open blobs they match."""
        engine, pins = self.state.engine, self.state.pins
        assert engine is not None and pins is not None
        open_blobs = {str(b.key): b for b in engine.blobs()}
        held = pins.snapshot()
        out: list[dict[str, Any]] = []
        for pin in sorted(held.pins, key=lambda p: p.blob):
            out.append(
                {
                    "blob": pin.blob,
                    "source": "cli",
                    "size": pin.size,
                    **self._present(pin.blob, open_blobs.get(pin.blob)),
                }
            )
        globs = self.state.config().pins
        for glob in globs:
            out.append({"blob": glob, "source": "config", "size": None, "present_pct": None})
        for name, blob in sorted(open_blobs.items()):
            if name not in held.names() and any(
                fnmatch.fnmatchcase(blob.key.match_name, g) for g in globs
            ):
                out.append(
                    {
                        "blob": name,
                        "source": "config",
                        "size": blob.size,
                        **self._present(name, blob),
                    }
                )
        cfg = self.state.config()
        return {"pins": out, "cli_total_bytes": held.total, "pin_max_share": cfg.pin_max_share}

    def _present(self, name: str, blob: Blob | None) -> dict[str, Any]:
        """A pinned blob's present share: from the open blob's bitmap, else from its
        sidecar if that is bound to its cache file (None: not known)."""
        if blob is not None:
            d = self._describe(blob)
            return {"present_pct": d["present_pct"], "open": True}
        assert self.state.engine is not None
        key = parse_key(name)
        path = self.pinner.cache_file(key)
        bp = self.state.engine.presence.load_bound(key, path) if path is not None else None
        if bp is None:
            return {
                "present_pct": 0.0 if path is None or not path.exists() else None,
                "open": False,
            }
        n = bp.geometry.nchunks
        return {
            "present_pct": round(100.0 * bp.bitmap.count() / n, 2) if n else 100.0,
            "open": False,
        }

    def prefetch(self, name: str, offset: int, length: int, progress: Progress) -> dict[str, Any]:
        """Fetch ``[offset, offset+length)`` of an open blob into its cache file, a step
        at a time, through the sink of a kernel object that has it open (its anonymous
        fd, borrowed per write: a CLOSE meanwhile ends the prefetch with EBADF, never a
        write elsewhere). Chunks present already cost nothing; chunks another worker
        is fetching are waited for. One progress line per step. In fanotify mode the
        step goes through the mode's ``fill`` (``daemon/fanotify_control.py``)."""
        engine, sink_for, fill = self.state.engine, self.state.sink_for, self.state.fill
        if engine is None or (sink_for is None and fill is None):
            raise ControlError(
                ErrorCode.UNAVAILABLE, f"prefetch is not available in {self.state.mode} mode"
            )
        blob = self._find(name)
        if offset >= blob.size:
            raise ControlError(ErrorCode.BAD_ARGS, f"offset {offset} is past the end ({blob.size})")
        end = blob.size if length == 0 else min(blob.size, offset + length)
        step = max(PREFETCH_STEP, blob.chunk_size)
        timeout = self.state.config().fetch_timeout
        fetched_before = engine.filler.stats.bytes_fetched
        began = time.monotonic()
        pos = offset
        while pos < end:
            n = min(step, end - pos)
            try:
                if fill is not None:
                    fill(blob, pos, n)
                else:
                    assert sink_for is not None
                    sink = sink_for(blob)
                    if sink is None:
                        raise ControlError(
                            ErrorCode.FAILED, f"{name}: no kernel object has it open now"
                        )
                    engine.ensure(blob, pos, n, sink, Deadline.after(timeout))
            except (SourceError, OSError) as exc:
                raise ControlError(
                    ErrorCode.FAILED, f"{name}: prefetch stopped at {pos}: {exc}"
                ) from None
            pos += n
            progress({"done": pos - offset, "total": end - offset})
        log.info("control.prefetched", blob=name, offset=offset, length=end - offset)
        return {
            "blob": name,
            "offset": offset,
            "length": end - offset,
            "seconds": round(time.monotonic() - began, 3),
            "fetched_bytes_daemon_wide": engine.filler.stats.bytes_fetched - fetched_before,
            **{k: v for k, v in self._describe(blob).items() if k.startswith("present")},
        }


def offline_status(engine: Engine) -> dict[str, Any]:
    """Each source's state, reason and credentials, and the offline policies in force.

    The sources are the tracked origins and every origin a fetch has reported on
    (an untracked one's state is ``not watched``)."""
    gate = engine.gate
    now = time.monotonic()
    policies = gate.policies
    sources: dict[str, dict[str, Any]] = {
        origin: {
            "state": st.status.value,
            "reason": st.reason,
            "since_s": round(max(0.0, now - st.since), 1),
        }
        for origin, st in gate.states().items()
    }
    for origin in gate.credentials.origins():
        sources.setdefault(origin, {"state": "not watched", "reason": "", "since_s": None})
    for origin, entry in sources.items():
        entry["credentials"] = gate.credentials.describe(origin)
    return {
        "sources": dict(sorted(sources.items())),
        "offline_policy": {
            "default": str(policies.default),
            "rules": [{"pattern": r.pattern, "policy": str(r.policy)} for r in policies.rules],
        },
        # conflicts nobody decided yet (``cachefilesctl conflicts``)
        "conflicts": engine.conflicts.needing_attention(),
    }


#: a source's state as a number, for the ``source_online`` gauge
STATE_VALUES = {"online": 1.0, "offline": 0.0, "unknown": -1.0}


def _refuse(op: str, mode: str) -> Handler:
    def refuse(_args: Any, _progress: Progress) -> dict[str, Any]:
        raise ControlError(ErrorCode.UNAVAILABLE, f"'{op}' is not available in {mode} mode")

    return refuse


def _last_use(at: float | None) -> dict[str, Any]:
    """A blob's last use (the kernel's last OPEN or READ of it that reached the
    daemon) as ISO 8601 in UTC, and its age in seconds by the daemon's clock."""
    if at is None:
        return {"last_use": None, "last_use_age_s": None}
    return {
        "last_use": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
        "last_use_age_s": round(max(0.0, time.time() - at), 1),
    }


class ControlService:
    """The control socket's server and the metrics, as one thing to close."""

    def __init__(self, server: ControlServer | None, metrics: Metrics | None) -> None:
        self.server = server
        self.metrics = metrics
        #: the pins of ``cachefilesctl pin`` (held by the culler even without a socket)
        self.pins: PinStore | None = None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.metrics is not None:
            self.metrics.close()


def start_control(state: ServingState, config: Config) -> ControlService:
    """The metrics registry, the control socket's server (unless ``control_socket
    none``) and the loopback metrics port (if ``metrics_listen``), all started."""
    server_ref: list[ControlServer] = []

    def labelled() -> dict[str, tuple[str, str, Mapping[str, float]]]:
        answered = dict(server_ref[0].answered) if server_ref else {}
        out: dict[str, tuple[str, str, Mapping[str, float]]] = {
            "control_requests_total": ("outcome", "control requests by outcome", answered)
        }
        if state.engine is not None:
            creds = state.engine.gate.credentials
            out["source_credentials_rejected"] = (
                "source",
                "1 while the source answers 401/403 to its credentials, else 0",
                {o: float(creds.status(o) is not None) for o in creds.origins()},
            )
        if state.engine is not None and state.engine.gate.tracked:
            gate = state.engine.gate
            states = {o: STATE_VALUES[st.status.value] for o, st in gate.states().items()}
            out["source_online"] = (
                "source",
                "connectivity per source: 1 online, 0 offline, -1 not known yet",
                states,
            )
        return out

    def gauges() -> dict[str, tuple[float, str]]:
        snap = SpaceSnapshot.of(str(state.cache_dir))
        cfg = state.config()
        out = {
            "cache_fs_bytes": (float(snap.blocks * snap.block_size), "cache filesystem size"),
            "cache_fs_free_bytes": (
                float(snap.blocks_free * snap.block_size),
                "cache filesystem bytes free (for unprivileged users)",
            ),
            "cache_fs_free_files": (float(snap.files_free), "cache filesystem inodes free"),
            "kernel_objects": (float(state.objects()), "kernel cache objects open"),
            "uptime_seconds": (time.monotonic() - state.started, "seconds since serving began"),
        }
        if state.engine is not None and state.mode == "ondemand":
            out["conflicts"] = (
                float(state.engine.conflicts.needing_attention()),
                "blobs changed upstream while cached, not resolved yet",
            )
        if cfg.cache_max_bytes is not None:
            out["cache_max_bytes"] = (float(cfg.cache_max_bytes), "configured cache_max_bytes")
        if cfg.cache_max_objects is not None:
            out["cache_max_objects"] = (float(cfg.cache_max_objects), "cache_max_objects")
        scanned = state.last_scan()
        if scanned is not None:
            at, objects, nbytes = scanned
            out |= {
                "cache_tree_objects": (float(objects), "cache files, at the last cull scan"),
                "cache_tree_bytes": (float(nbytes), "cache bytes allocated, at the last scan"),
                "cache_tree_scan_timestamp_seconds": (at, "unix time of that scan"),
            }
        if state.engine is not None:
            blobs = state.engine.blobs()
            out["open_blobs"] = (float(len(blobs)), "blobs the kernel has open")
            out["fetches_in_flight"] = (
                float(sum(len(b.inflight) for b in blobs)),
                "chunks being fetched now",
            )
        return out

    figures = Figures(
        counters=state.collect,
        histograms=state.histograms,
        gauges=gauges,
        labelled=labelled,
        counts=state.counts,
    )
    metrics = Metrics(figures)
    server = None
    if config.control_socket:
        handlers = ControlHandlers(state, metrics).table()
        server = ControlServer(
            config.control_socket, handlers, read_gid=group_id(config.control_group)
        ).start()
        server_ref.append(server)
    if config.metrics_listen:
        metrics.serve_http(config.metrics_listen)
        log.info("metrics.listening", address=config.metrics_listen)
    return ControlService(server, metrics)


def pass_report(result: Any) -> dict[str, Any]:
    """A cull pass's result (``space/culler.py`` PassResult) as a reply."""
    return {
        "needed": result.needed,
        "need_bytes": getattr(result, "need_bytes", None),
        "need_objects": getattr(result, "need_objects", None),
        "scanned": result.scanned,
        **result.tally.as_fields(),
        "decisions": [
            {"blob": d.blob, "outcome": d.outcome, "bytes": d.bytes, "reason": d.reason}
            for d in getattr(result, "decisions", [])
        ],
    }


def engine_histograms(engine: Engine) -> dict[str, tuple[Any, str]]:
    """The engine's latency histograms, for the metrics."""
    return {
        "fetch": (engine.filler.fetch_times, "source fetch time per run"),
        "write": (engine.filler.write_times, "cache write time per run"),
        "checkpoint": (engine.checkpoint_times, "presence checkpoint time"),
    }


def core_counts(engine: Engine | None, factory: Any) -> dict[str, Mapping[str, int]]:
    """The core's labelled counts (``daemon/metrics.py`` LABELLED keys)."""
    out: dict[str, Mapping[str, int]] = {}
    if engine is not None:
        out["fetched_by_source"] = engine.filler.fetched_by_source.snapshot()
        out["fetch_errors"] = engine.filler.errors.snapshot()
        out["open_errors"] = engine.open_errors.snapshot()
    if factory is not None:
        out["retries"] = factory.retries.snapshot()
    return out


def _config_op(run: Callable[[], dict[str, Any]], what: str) -> Callable[[], dict[str, Any]]:
    """An operation that re-reads configuration files: a refused file is answered as
    an error that names file:line (and the daemon changed nothing)."""

    def op() -> dict[str, Any]:
        from cachefilesd_py.errors import ConfigError

        try:
            return run()
        except ConfigError as exc:
            raise ControlError(ErrorCode.FAILED, f"{what} rejected: {exc}") from None

    return op


def reload_of(daemon: Any) -> Callable[[], dict[str, Any]]:
    """The ``reload`` operation: ``daemon.reload_report()`` (as SIGHUP)."""
    return _config_op(lambda: daemon.reload_report(), "configuration")


def credentials_reload_of(daemon: Any) -> Callable[[], dict[str, Any]]:
    """The ``credentials_reload`` operation: ``daemon.reload_credentials()``."""
    return _config_op(lambda: daemon.reload_credentials(), "credentials")


def cli_pins(cache_dir: Path, culler: Any) -> PinStore:
    """The pins of ``cachefilesctl pin`` of this cache (``<dir>/cachefilesd-py/pins.json``,
    ``space/pins.py``), held by ``culler`` (a ``BlobCuller``; None: no culling) from
    now on. Both modes that serve blobs take them here."""
    from cachefilesd_py.daemon.app import STATE_DIR_NAME

    pins = PinStore(cache_dir / STATE_DIR_NAME)
    if culler is not None:
        culler.held_pins = lambda: pins.snapshot().names()
    return pins


def serve_control(
    daemon: Any, mode: str, collect: Callable[[], dict[str, object]], engine: Any, driver: Any
) -> ControlService:
    """Start the control socket and metrics for the serving ``daemon``
    (``daemon/app.py``'s ``Daemon``); a failure is logged and serving goes on without
    them (the cache matters more than its dashboard)."""
    histograms: dict[str, tuple[Any, str]] = {}
    if driver is not None and hasattr(driver, "read_times"):
        histograms["read_service"] = (driver.read_times, "READ service time")
    if engine is not None:
        histograms |= engine_histograms(engine)
    reload = reload_of(daemon)

    def sink_for(blob: Blob) -> Sink | None:
        for obj in driver.objects():
            if obj.blob is blob:
                sink: Sink = obj.sink
                return sink
        return None

    culler: Any = getattr(driver, "culler", None) if driver is not None else None
    factory: Any = getattr(daemon, "_factory", None)
    pins: PinStore | None = None
    if engine is not None and mode == "ondemand":
        from cachefilesd_py.daemon.offline import pinned_by

        pins = store = cli_pins(daemon.cache_dir, culler)
        engine.gate.is_pinned = pinned_by(lambda: daemon.config, lambda: store.snapshot().names())

    def counts() -> dict[str, Mapping[str, int]]:
        return core_counts(engine, factory)

    def cull_plan() -> dict[str, Any]:
        return pass_report(culler.cull_pass(dry_run=True))

    def cull_now() -> dict[str, Any]:
        return pass_report(culler.cull_pass())

    state = ServingState(
        mode=mode,
        cull_plan=cull_plan if culler is not None else None,
        cull_now=cull_now if culler is not None else None,
        cache_dir=daemon.cache_dir,
        config=lambda: daemon.config,
        collect=collect,
        engine=engine,
        objects=(lambda: len(driver.objects())) if driver is not None else (lambda: 0),
        reload=reload,
        credentials_reload=credentials_reload_of(daemon) if engine is not None else None,
        sink_for=sink_for if driver is not None else None,
        histograms=histograms,
        counts=counts,
        last_scan=lambda: getattr(culler, "last_scan", None),
        pins=pins,
        policy_changed=getattr(driver, "policy_changed", None),
    )
    try:
        service = start_control(state, daemon.config)
    except (OSError, ControlError) as exc:
        log.error("control.unavailable", error=str(exc), path=daemon.config.control_socket)
        service = ControlService(None, None)
    service.pins = pins
    return service
