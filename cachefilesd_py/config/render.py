"""A :class:`Config` written back in configuration syntax (pure).

What ``--check-config`` prints: every setting, one directive per line, a setting left
at its default as a commented-out directive (``#culltable 12``), so that the output
reads like the sample configuration and parses back to the same settings
(``parse_config(render_config(cfg)) == cfg``, tested with hypothesis). Thresholds come
in the order the daemon sends them to the kernel, so the cachefilesd subset of the
output is also a file cachefilesd accepts.
"""

from __future__ import annotations

from cachefilesd_py.config.model import THRESHOLDS, Config
from cachefilesd_py.config.parse import BLANKS
from cachefilesd_py.kernel.commands import threshold_commands

_UNITS = (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))


def format_size(n: int) -> str:
    """``1048576`` → ``1M``: the largest binary suffix that divides ``n`` exactly."""
    for suffix, unit in _UNITS:
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def render_config(cfg: Config) -> list[str]:
    """The configuration as lines (no newlines)."""
    d = Config()
    out: list[str] = ["# cachefilesd's directives"]

    def put(word: str, value: str, is_default: bool) -> None:
        if is_default:
            out.append(f"#{word} {value}".rstrip())
            return
        if value != value.rstrip(BLANKS):
            out.append(f"# (the {word} below ends in a blank, kept as cachefilesd keeps it)")
        out.append(f"{word} {value}")

    assert cfg.dir is not None
    put("dir", cfg.dir, False)
    put("tag", cfg.tag or "CacheFiles", cfg.tag is None)
    put("secctx", cfg.secctx or "<label>", cfg.secctx is None)
    for name in _threshold_order(cfg):
        put(name, f"{cfg.threshold(name)}%", name not in cfg.thresholds)
    put("debug", str(cfg.debug or 0), cfg.debug is None)
    put("culltable", str(cfg.culltable), cfg.culltable == d.culltable)
    resume = (cfg.resume_blocks, cfg.resume_files)
    put(
        "resume_thresholds",
        " ".join("-" if v is None else str(v) for v in resume),
        resume == (d.resume_blocks, d.resume_files),
    )
    out.append("nocull" if cfg.nocull else "#nocull")

    out += ["", "# this daemon's directives"]
    out.append("ondemand" if cfg.ondemand else "#ondemand")
    out += [f"source {r.pattern} {r.url_template}" for r in cfg.sources]
    if not cfg.sources:
        out.append("#source <pattern> <url-template>")
    put("chunk_size", format_size(cfg.chunk_size), cfg.chunk_size == d.chunk_size)
    out += [f"source_chunk_size {r.pattern} {format_size(r.size)}" for r in cfg.source_chunk_sizes]
    put("readahead", format_size(cfg.readahead), cfg.readahead == d.readahead)
    put("fetch_timeout", format_seconds(cfg.fetch_timeout), cfg.fetch_timeout == d.fetch_timeout)
    put("fetch_retries", str(cfg.fetch_retries), cfg.fetch_retries == d.fetch_retries)
    put(
        "fetch_concurrency",
        str(cfg.fetch_concurrency),
        cfg.fetch_concurrency == d.fetch_concurrency,
    )
    put("ca_file", cfg.ca_file or "<system CA store>", cfg.ca_file is None)
    out += [f"source_headers {r.pattern} {r.path}" for r in cfg.source_headers]
    caps = (cfg.cache_max_bytes, cfg.cache_max_objects)
    for word, value in zip(("cache_max_bytes", "cache_max_objects"), caps, strict=True):
        if value is None:
            out.append(f"#{word} <no cap>")
        else:
            out.append(f"{word} {format_size(value) if word == 'cache_max_bytes' else value}")
    out += [f"volume_max_bytes {r.pattern} {format_size(r.size)}" for r in cfg.volume_max_bytes]
    put("cull_policy", cfg.cull_policy, cfg.cull_policy == d.cull_policy)
    out += [f"pin {p}" for p in cfg.pins]
    put("pin_max_share", f"{cfg.pin_max_share}%", cfg.pin_max_share == d.pin_max_share)
    out += [
        f"offline_policy {r.pattern + ' ' if r.pattern else ''}{r.policy}"
        for r in cfg.offline_policies
    ]
    if not cfg.offline_policies:
        out.append("#offline_policy [<pattern>] error|wait <duration>")
    return out


def _threshold_order(cfg: Config) -> list[str]:
    """The threshold names in the order the kernel is told them (set ones first, as
    ``threshold_commands`` orders them), then the unset ones."""
    sent = [c.split(b" ", 1)[0].decode() for c in threshold_commands(cfg.thresholds)]
    return sent + [n for n in THRESHOLDS if n not in sent]
