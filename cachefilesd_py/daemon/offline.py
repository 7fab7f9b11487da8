"""Disconnected operation in the serving worker (docs/offline.md): wires the parts.

At serve time the worker starts, for every HTTP(S) origin its ``source`` rules name
(``scheme://host:port``; a template whose host has a placeholder cannot be known in
advance and is not tracked), the netlink connectivity driver
(``sources/netlink.py``, one thread sleeping in ``select()`` on rtnetlink), and hands
it to the engine's offline gate (``engine/offline.py``), together with the
``offline_policy`` rules and who is pinned. Every transition of a source:

- is logged by the driver (``source.offline`` / ``source.online``, with the reason);
- goes to the D-Bus emitter (``SourceOffline`` / ``SourceOnline``;
  ``daemon/notify_dbus.py`` never blocks, without a bus it drops and retries later);
- wakes the READs held for that source (they ask the policy again);
- shows in the heartbeat, from which the supervisor sets systemd's ``STATUS=`` (only
  the main process talks to systemd, ``daemon/worker.py``);
- back online, starts a **resync** (``Engine.resync``, in its own thread): every open
  blob from that source, and every pinned idle one, is checked against the origin's
  version; one that changed is a conflict (``engine/conflicts.py``), logged
  (``blob.conflict``) and signalled (``Conflict``).

``file:`` sources are always online: they are not tracked. Without netlink (the
driver cannot start: a seccomp filter, a sandbox without ``NETLINK_ROUTE``) the
tracker still runs on fetch outcomes alone: three refused, unreachable or timed-out
fetches in a row take a source offline, and probes bring it back.

Credentials (every HTTP origin, tracked or not): the gate's
``CredentialsWatch`` (``engine/credentials.py``) reports when a source starts
answering 401/403 and when a fetch succeeds again; each transition is logged once
(``source.credentials_rejected`` / ``source.credentials_accepted``) and the first
goes to D-Bus (``CredentialsRejected``). The bus is the system bus, or the address
in ``DBUS_SYSTEM_BUS_ADDRESS`` (jeepney reads it), as for any D-Bus client.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import Config
from cachefilesd_py.engine.conflicts import Conflict
from cachefilesd_py.engine.offline_policy import OfflinePolicies, OfflinePolicy, PolicyRule
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.sources.online import Status, Transition

log = structlog.get_logger("daemon.offline")


def tracked_origins(templates: Iterable[str]) -> dict[str, str]:
    """``origin → host`` for the HTTP(S) URL templates whose host is fixed."""
    from cachefilesd_py.sources.http import origin_of

    out: dict[str, str] = {}
    for template in templates:
        if not template.lower().startswith(("http:", "https:")):
            continue
        netloc = urlsplit(template).netloc
        if "{" in netloc or "}" in netloc:
            continue
        host = urlsplit(template).hostname
        if host:
            out[origin_of(template)] = host
    return out


def policies_of(config: Config) -> OfflinePolicies:
    """The ``offline_policy`` lines as the engine's rules (the last line without a
    pattern is the default; ``error`` when there is none)."""
    rules = []
    default = OfflinePolicy()
    for r in config.offline_policies:
        policy = OfflinePolicy.parse(r.policy)
        if r.pattern is None:
            default = policy
        else:
            rules.append(PolicyRule(r.pattern, policy))
    return OfflinePolicies(tuple(rules), default)


def pinned_by(
    config: Callable[[], Config], cli_pins: Callable[[], frozenset[str]]
) -> Callable[[BlobKey], bool]:
    """Whether a blob is pinned: by ``cachefilesctl pin`` or a config ``pin`` glob."""

    def pinned(key: BlobKey) -> bool:
        if str(key) in cli_pins():
            return True
        return any(fnmatch.fnmatchcase(key.match_name, g) for g in config().pins)

    return pinned


def idle_pinned(pins: Any, driver: Any) -> list[tuple[BlobKey, Path]]:
    """The blobs pinned by ``cachefilesctl pin`` (``pins``: a ``PinStore``, or None)
    that no kernel object of ``driver`` has open, with their cache files."""
    if pins is None:
        return []
    from cachefilesd_py.control.schema import ControlError
    from cachefilesd_py.daemon.pinning import cache_file_of, parse_key

    busy = {obj.blob.key for obj in driver.objects()}
    out = []
    for name in sorted(pins.snapshot().names()):
        try:
            key = parse_key(name)
        except ControlError:  # not a key this mode stores: nothing to check
            continue
        path = cache_file_of(driver.cache_dir, key)
        if key not in busy and path is not None:
            out.append((key, path))
    return out


class OfflineWiring:
    """The connectivity driver and the D-Bus emitter of one serving worker."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        on_change: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self._on_change = on_change
        self.notifier: Any = None
        self.connectivity: Any = None
        #: the pinned blobs no kernel object has open, with their cache files: what a
        #: resync checks besides the open blobs (set once the pins are loaded)
        self.idle_pinned: Callable[[], Iterable[tuple[BlobKey, Path]]] = lambda: ()
        self._resyncs: list[threading.Thread] = []
        engine.conflicts.on_found = self._conflict
        hosts = tracked_origins(r.url_template for r in config.sources)
        engine.gate.policies = policies_of(config)
        engine.gate.credentials.on_change = self._credentials
        try:
            from cachefilesd_py.daemon.notify_dbus import DbusNotifier

            self.notifier = DbusNotifier()
        except Exception as exc:  # jeepney missing or broken: no signals, serving goes on
            log.warning("dbus.unavailable", error=str(exc))
        if not hosts:
            return
        from cachefilesd_py.sources.netlink import NetlinkConnectivity

        conn = NetlinkConnectivity(hosts, on_transition=self._transition)
        try:
            conn.start()
        except Exception as exc:  # no netlink: the tracker hears fetch outcomes only
            log.error(
                "connectivity.unavailable",
                error=str(exc),
                sources=sorted(hosts),
                note="no link or route events: a source goes offline after failed fetches",
            )
        self.connectivity = conn
        engine.gate.connectivity = conn
        engine.gate.tracked = frozenset(hosts)
        log.info(
            "connectivity.watching",
            sources={s: conn.state(s).status.value for s in sorted(hosts)},
        )

    def _transition(self, tr: Transition) -> None:
        if self.notifier is not None:
            if tr.new is Status.OFFLINE:
                self.notifier.source_offline(tr.source, tr.reason)
            elif tr.new is Status.ONLINE:
                self.notifier.source_online(tr.source, tr.reason)
        self._on_change(tr.source)
        if tr.new is Status.ONLINE and tr.old is Status.OFFLINE:
            thread = threading.Thread(
                target=self._resync, args=(tr.source,), name="resync", daemon=True
            )
            self._resyncs = [t for t in self._resyncs if t.is_alive()] + [thread]
            thread.start()

    def _resync(self, origin: str) -> None:
        try:
            self.engine.resync(origin, self.idle_pinned())
        except Exception:  # a resync's failure must not end the thread's caller
            log.exception("resync.failed", origin=origin)

    def _conflict(self, conflict: Conflict) -> None:
        if self.notifier is not None:
            volume, _, cookie = conflict.blob.partition("/")
            self.notifier.conflict(volume, cookie, conflict.cached, conflict.upstream)

    def _credentials(self, origin: str, status: int | None) -> None:
        if status is None:
            log.info("source.credentials_accepted", source=origin)
            return
        log.warning(
            "source.credentials_rejected",
            source=origin,
            status=status,
            note="fix the source_headers file, then: cachefilesctl credentials reload",
        )
        if self.notifier is not None:
            self.notifier.credentials_rejected(origin, status)

    def read_waiting(self, key: BlobKey, offset: int, length: int, cap: float) -> None:
        if self.notifier is not None:
            self.notifier.read_waiting(
                key.volume_key.decode(errors="backslashreplace"),
                key.name.decode(errors="backslashreplace"),
                offset,
                length,
                cap,
            )

    def offline(self) -> list[str]:
        """``origin (reason)`` of every offline source, for the heartbeat."""
        return [
            f"{origin} ({st.reason})"
            for origin, st in self.engine.gate.states().items()
            if st.status is Status.OFFLINE
        ]

    def close(self) -> None:
        if self.connectivity is not None:
            self.connectivity.stop()
        if self.notifier is not None:
            self.notifier.close()
