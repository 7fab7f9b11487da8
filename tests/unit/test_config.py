"""Configuration rules: each one good and bad, with file:line in every error."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.config.load import load_config, load_headers
from cachefilesd_py.config.parse import parse_config, parse_size
from cachefilesd_py.errors import ConfigError
from cachefilesd_py.frontends.bind import kernel_commands

BASE = "dir /var/cache/fscache\n"


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.conf")
    return info.value


def test_shipped_style_file_parses() -> None:
    cfg = parse_config(
        "# comment\n\ndir /var/cache/fscache\ntag mycache\nbrun 10%\nbcull 7%\nbstop 3%\n"
        "frun 10%\nfcull 7%\nfstop 3%\nculltable 14\nresume_thresholds 100 -\nnocull\n",
        "x.conf",
    )
    assert cfg.dir == "/var/cache/fscache" and cfg.tag == "mycache"
    assert cfg.threshold("bcull") == 7 and cfg.threshold("fstop") == 3
    assert cfg.culltable == 14 and cfg.resume_blocks == 100 and cfg.resume_files is None
    assert cfg.nocull


def test_missing_final_newline_is_accepted() -> None:
    assert parse_config("dir /x\ntag t", "f").tag == "t"


def test_ondemand_directives() -> None:
    cfg = parse_config(
        BASE + "ondemand\nsource img/* http://h:8080/{volume}/{cookie}\n"
        "source * file:///srv/blobs/{cookie}\nchunk_size 1M\nsource_chunk_size big/* 4M\n"
        "readahead 2M\nfetch_timeout 5\nfetch_retries 2\nfetch_concurrency 16\n"
        "cache_max_bytes 10G\ncache_max_objects 1000\nvolume_max_bytes img 1G\n"
        "cull_policy lru\npin img/base.erofs\n",
        "f",
    )
    assert cfg.ondemand and [r.pattern for r in cfg.sources] == ["img/*", "*"]
    assert cfg.sources[0].line == 3
    assert cfg.chunk_size == 1 << 20 and cfg.source_chunk_sizes[0].size == 4 << 20
    assert cfg.cache_max_bytes == 10 << 30 and cfg.cull_policy == "lru"
    assert cfg.pins == ("img/base.erofs",)


@pytest.mark.parametrize(
    ("text", "line", "rule"),
    [
        (BASE + "brun 10\n", 2, "whole percentage"),
        (BASE + "brun 10 %\n", 2, "whole percentage"),
        (BASE + "brun 100%\n", 2, "not below 100"),
        (BASE + "tag a\ntag b\n", 3, "given twice"),
        (BASE + "bcull 8%\n", 2, "bstop 1% < bcull 8% < brun 7%"),
        (BASE + "frun 3%\nfcull 3%\n", 3, "fstop 1% < fcull 3% < frun 3%"),
        (BASE + "bogus 1\n", 2, "unknown directive 'bogus'"),
        (BASE + "bind\n", 2, "'bind' command not permitted"),
        (BASE + "brun 10%\r\n", 2, "CRLF"),
        (BASE + "brun 10% \n", 2, "nothing after the %"),
        (BASE + " tag x\n", 2, "leading whitespace"),
        (BASE + "tag\n", 2, "empty tag"),
        (BASE + "dir /y\n", 2, "given twice"),
        (BASE + "tag a\0b\n", 2, "NUL"),
        (BASE + "tag " + "x" * 5000 + "\n", 2, "too long"),
        (BASE + "culltable 11\n", 2, "12 <= N <= 20"),
        (BASE + "culltable 1x\n", 2, "invalid cull table size number"),
        (BASE + "resume_thresholds 5\n", 2, "two arguments"),
        (BASE + "resume_thresholds 0 5\n", 2, "invalid resume threshold (blocks)"),
        (BASE + "resume_thresholds 5 x\n", 2, "invalid resume threshold (files)"),
        (BASE + "debug zz\n", 2, "requires a mask"),
        # issue 10, item 12: only ASCII digits are numbers, and no sign
        (BASE + "debug -1\n", 2, "requires a mask"),
        (BASE + "fetch_retries \u0661\u0662\n", 2, "ASCII digits"),
        (BASE + "fetch_concurrency \uff18\n", 2, "ASCII digits"),
        (BASE + "cache_max_objects 1\u0660\n", 2, "ASCII digits"),
        (BASE + "fetch_timeout \u0665\n", 2, "ASCII digits"),
        (BASE + "fetch_timeout nan\n", 2, "ASCII digits"),
        (BASE + "fetch_timeout 1_0\n", 2, "ASCII digits"),
        (BASE + "chunk_size \u0664K\n", 2, "not a size"),
        (BASE + "readahead \u0661M\n", 2, "not a size"),
        (BASE + "resume_thresholds \u0661 5\n", 2, "invalid resume threshold (blocks)"),
        # source URLs must parse and name one resource whatever the keys are
        (BASE + "source * http:///{cookie}\n", 2, "names no host"),
        (BASE + "source * http://h:99999/{cookie}\n", 2, "is not a URL"),
        (BASE + "source * http://h:x/{cookie}\n", 2, "is not a URL"),
        (BASE + "source * http://{volume}.example.com/{cookie}\n", 2, "only in the URL's path"),
        (BASE + "source * https://h{cookie}\n", 2, "only in the URL's path"),
        (BASE + "source * file://host/srv/{cookie}\n", 2, "names no host"),
        (BASE + "source * file:srv/{cookie}\n", 2, "absolute path"),
        (BASE + "nocull yes\n", 2, "no argument"),
        (BASE + "source * ftp://h/{cookie}\n", 2, "scheme"),
        (BASE + "source * http://h/{blob}\n", 2, "placeholder"),
        (BASE + "source *\n", 2, "two arguments"),
        (BASE + "chunk_size 3000\n", 2, "power of two"),
        (BASE + "chunk_size 1Q\n", 2, "not a size"),
        (BASE + "cull_policy mru\n", 2, "one of s3fifo"),
        (BASE + "fetch_timeout soon\n", 2, "seconds"),
        (BASE + "pin_max_share 101%\n", 2, "percentage 0%..100%"),
        (BASE + "pin_max_share half\n", 2, "percentage 0%..100%"),
        (BASE + "pin_max_share 10%\npin_max_share 20%\n", 3, "given twice"),
        (BASE + "ondemand\n", 2, "needs at least one 'source'"),
        ("dir relative/path\n", 1, "absolute"),
    ],
)
def test_rule_violations_name_file_line_and_rule(text: str, line: int, rule: str) -> None:
    e = err(text)
    assert e.file == "test.conf" and e.line == line, str(e)
    assert rule in e.rule
    assert str(e).startswith(f"test.conf:{line}: ")
    assert e.exit_code == 2


def test_missing_dir_names_the_file() -> None:
    e = err("tag x\n")
    assert str(e) == "test.conf: no 'dir' directive: the cache directory is mandatory"


def test_sizes() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("256K") == 256 << 10
    assert parse_size("2g") == 2 << 30
    with pytest.raises(ValueError):
        parse_size("-1")


@settings(deadline=None)  # a robustness test, not a timing one: the machine is shared
@given(st.text(max_size=300))
def test_garbage_raises_only_config_errors(text: str) -> None:
    try:
        parse_config(text, "fuzz.conf")
    except ConfigError as e:
        assert str(e).startswith("fuzz.conf")


def kernel_accepts(cmds: list[bytes]) -> bool:
    """A model of the kernel's per-command threshold check (daemon.c): every new
    value is checked against the values held at that moment, from 7/5/1."""
    held = {k: {"run": 7, "cull": 5, "stop": 1} for k in "bf"}
    for cmd in cmds:
        word, _, arg = cmd.decode().partition(" ")
        if word[1:] in ("run", "cull", "stop"):
            trial = {**held[word[0]], word[1:]: int(arg.rstrip("%"))}
            if not 0 <= trial["stop"] < trial["cull"] < trial["run"] < 100:
                return False
            held[word[0]] = trial
    return True


@given(
    st.lists(st.integers(0, 99), min_size=3, max_size=3, unique=True),
    st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_kernel_command_order_always_passes_the_kernel_checks(values, given_) -> None:  # type: ignore[no-untyped-def]
    stop, cull, run = sorted(values)
    lines = [
        f"b{n} {v}%"
        for n, v, g in zip(("run", "cull", "stop"), (run, cull, stop), given_, strict=True)
        if g
    ]
    text = BASE + "".join(line + "\n" for line in lines)
    try:
        cfg = parse_config(text, "t")
    except ConfigError:
        return  # unset values fall back to 7/5/1 and the mix may be unordered: refused
    cmds = kernel_commands(cfg)
    assert cmds[0] == b"dir /var/cache/fscache"
    assert kernel_accepts(cmds)
    assert len([c for c in cmds if c.startswith(b"b")]) == sum(given_)


def test_header_values_outside_latin1_are_refused_at_load(tmp_path: Path) -> None:
    """Issue 10, item 12: a header value HTTP cannot carry is refused when the
    configuration is loaded, naming the headers file and line, not when a request is
    sent (where it raised outside the source error types)."""
    headers = tmp_path / "blobs.headers"
    headers.write_text("# credentials\nAuthorization: Bearer t\u00f6ken\nX-Team: \u65e5\u672c\n")
    headers.chmod(0o600)
    conf = tmp_path / "c.conf"
    conf.write_text(
        f"dir {tmp_path}\nondemand\nsource * http://h/{{cookie}}\nsource_headers * {headers}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(conf))
    assert str(info.value).startswith(f"{headers}:3: header X-Team: ")
    assert "ISO-8859-1" in info.value.rule
    headers.write_text("Authorization: Bearer t\u00f6ken\n")
    assert load_headers(str(headers)) == {"Authorization": "Bearer t\u00f6ken"}
    headers.write_text("Bad Name: x\n")
    with pytest.raises(ConfigError, match=":1: not a 'Name: value' header line"):
        load_headers(str(headers))


@pytest.mark.parametrize(
    "line",
    [
        "fetch_retries \u0661\u0662",  # Arabic-Indic 12
        "brun \u0661\u0660%",
        "fetch_concurrency \uff18",  # fullwidth 8
        "resume_thresholds \u0665 -",
        "culltable \u0661\u0664",
    ],
)
def test_numbers_take_ascii_digits_only(line: str) -> None:
    """str.isdigit() and a str pattern's \\d take any script's digits; the kernel and
    cachefilesd read ASCII only, so such a value is a configuration error (issue 10
    item 12), named with its line."""
    with pytest.raises(ConfigError) as info:
        parse_config(f"dir /var/cache/fscache\n{line}\n", "c.conf")
    assert "c.conf:2" in str(info.value)


def test_every_configured_chunk_size_fits_one_fill_buffer() -> None:
    """A ``source_chunk_size`` above the 4 MiB default buffer made every full-chunk READ
    of those blobs fail (issue 10 item 12): the fill buffers are sized for the largest
    chunk any rule can give."""
    from cachefilesd_py.daemon.app import engine_settings

    cfg = parse_config(
        "dir /var/cache/fscache\nondemand\nsource * file:///srv/{cookie}\n"
        "source_chunk_size big/* 16M\n",
        "c.conf",
    )
    assert engine_settings(cfg).max_run >= 16 << 20
