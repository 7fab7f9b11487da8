"""Absolute caps, for admins who think in sizes rather than percentages.

``cache_max_bytes`` and ``cache_max_objects`` bound the whole cache tree,
``volume_max_bytes <glob> <size>`` each volume whose name matches (first rule wins).
A volume's name is its directory under ``cache/`` without the ``I`` prefix and, for
EROFS, without ``erofs,`` (so ``volume_max_bytes images-* 10G`` reads naturally); an
NFS volume is named by the kernel's key, e.g. ``nfs,4.2,2,,...``.

The kernel knows nothing of these caps: they hold only because the daemon culls. Bytes
are allocated bytes (``st_blocks``), what the filesystem actually spends. Pure.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cachefilesd_py.blobkey import volume_of
from cachefilesd_py.config.model import Config, SizeRule


def volume_name(volume_dir: str) -> str:
    """``Ierofs,imgs`` → ``imgs``; ``Infs,4.2,...`` → ``nfs,4.2,...``."""
    return os.fsdecode(volume_of(os.fsencode(volume_dir.removeprefix("I"))))


def pinned(pins: tuple[str, ...], volume: str, name: str) -> bool:
    """Whether ``<volume>/<name>`` matches a ``pin`` glob. On-demand mode matches the
    blob's cookie (its name); classic mode the object's file name in the cache, whose
    cookie keys are binary, so there pins are mostly per volume (``nfs,*/*``)."""
    full = f"{volume}/{name}"
    return any(fnmatch.fnmatchcase(full, p) for p in pins)


@dataclass(frozen=True)
class CapNeeds:
    """What the caps ask to free now."""

    bytes: int = 0
    objects: int = 0
    #: bytes above its cap, per volume directory name (``I...``)
    volumes: dict[str, int] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return self.bytes > 0 or self.objects > 0 or any(v > 0 for v in self.volumes.values())


@dataclass(frozen=True)
class Caps:
    max_bytes: int | None = None
    max_objects: int | None = None
    volume_rules: tuple[SizeRule, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> Caps:
        return cls(cfg.cache_max_bytes, cfg.cache_max_objects, cfg.volume_max_bytes)

    @property
    def configured(self) -> bool:
        return self.max_bytes is not None or self.max_objects is not None or bool(self.volume_rules)

    def volume_cap(self, volume_dir: str) -> int | None:
        name = volume_name(volume_dir)
        for rule in self.volume_rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.size
        return None

    def needs(
        self, total_bytes: int, total_objects: int, volume_bytes: Mapping[str, int]
    ) -> CapNeeds:
        over: dict[str, int] = {}
        for volume, used in volume_bytes.items():
            cap = self.volume_cap(volume)
            if cap is not None and used > cap:
                over[volume] = used - cap
        return CapNeeds(
            bytes=max(0, total_bytes - self.max_bytes) if self.max_bytes is not None else 0,
            objects=max(0, total_objects - self.max_objects) if self.max_objects is not None else 0,
            volumes=over,
        )


@dataclass(frozen=True)
class CullRules:
    """What an admin says about culling, the same for every frontend: the absolute
    caps and the ``pin`` globs."""

    caps: Caps = field(default_factory=Caps)
    pins: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> CullRules:
        return cls(Caps.from_config(cfg), cfg.pins)

    def pinned(self, volume: str, name: str) -> bool:
        return bool(self.pins) and pinned(self.pins, volume, name)
