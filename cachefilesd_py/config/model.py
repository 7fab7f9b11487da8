"""The configuration as values: what ``/etc/cachefilesd.conf`` says, after checking."""

from __future__ import annotations

from dataclasses import dataclass, field

from cachefilesd_py.kernel.commands import KERNEL_DEFAULTS

#: the kernel's thresholds at every fresh open of the device (``kernel/commands.py``)
KERNEL_DEFAULT_PERCENT = KERNEL_DEFAULTS
THRESHOLDS = ("brun", "bcull", "bstop", "frun", "fcull", "fstop")


@dataclass(frozen=True)
class SourceRule:
    """``source <pattern> <url-template>``: blobs matching the glob are fetched there."""

    pattern: str
    url_template: str
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class SizeRule:
    """``<directive> <pattern> <size>`` (per-blob chunk size, per-volume cap)."""

    pattern: str
    size: int
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class OfflineRule:
    """``offline_policy [<pattern>] error|wait <duration>``: what a READ of missing
    bytes does while its source is offline (``engine/offline_policy.py``). ``pattern``
    is None for the default; ``policy`` is the normalized text (``error``,
    ``wait 300s``)."""

    pattern: str | None
    policy: str
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class HeaderRule:
    """``source_headers <pattern> <file>``: extra request headers from a root-only file."""

    pattern: str
    path: str
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class FanotifyImage:
    """``fanotify_image <volume>/<name> <mountpoint> [<blob> ...]``: an EROFS image the
    fanotify frontend serves from a sparse cache file it mounts on ``mountpoint``;
    ``blobs`` are the extra blobs of a chunked image (``device=``, in the image's
    device-table order), in the same volume."""

    volume: str
    name: str
    mountpoint: str
    blobs: tuple[str, ...] = ()
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class Config:
    # cachefilesd's own directives
    dir: str | None = None
    #: the line of the ``dir`` directive (0: not from a file), for errors about it
    dir_line: int = field(default=0, compare=False)
    tag: str | None = None
    secctx: str | None = None
    debug: int | None = None
    thresholds: dict[str, int] = field(default_factory=dict)
    culltable: int = 12
    resume_blocks: int | None = None
    resume_files: int | None = 5
    nocull: bool = False
    # this project's directives
    ondemand: bool = False
    #: serve EROFS file-backed mounts through fanotify pre-content events
    fanotify: bool = False
    fanotify_images: tuple[FanotifyImage, ...] = ()
    sources: tuple[SourceRule, ...] = ()
    #: 1 MiB: chosen by the sweep in docs/benchmarks.md (bench.bench_ondemand)
    chunk_size: int = 1024 * 1024
    source_chunk_sizes: tuple[SizeRule, ...] = ()
    readahead: int = 4 * 1024 * 1024
    fetch_timeout: float = 30.0
    fetch_retries: int = 3
    fetch_concurrency: int = 8
    ca_file: str | None = None
    source_headers: tuple[HeaderRule, ...] = ()
    cache_max_bytes: int | None = None
    cache_max_objects: int | None = None
    volume_max_bytes: tuple[SizeRule, ...] = ()
    cull_policy: str = "s3fifo"
    pins: tuple[str, ...] = ()
    #: the pins made through ``cachefilesctl pin`` may total at most this percentage
    #: of the cache's size (``space/pins.py``)
    pin_max_share: int = 50
    #: ``offline_policy`` lines, in file order (first matching pattern wins; the
    #: last line without a pattern is the default, else ``error``)
    offline_policies: tuple[OfflineRule, ...] = ()
    #: the control socket (``docs/control.md``); "" when ``control_socket none``
    control_socket: str = "/run/cachefilesd-py/control.sock"
    #: a group (name or number) whose members may use the read-only control calls
    control_group: str | None = None
    #: ``<loopback address>:<port>`` for Prometheus metrics over HTTP (off if None)
    metrics_listen: str | None = None

    def threshold(self, name: str) -> int:
        """The effective percentage: as configured, else the kernel's default."""
        return self.thresholds.get(name, KERNEL_DEFAULT_PERCENT[name[1:]])
