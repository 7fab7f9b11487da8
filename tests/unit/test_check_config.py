"""``--check-config``: the effective configuration in config syntax, what the kernel
will be told, and the checks that need no bind."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefilesd_py.config import check
from cachefilesd_py.config.model import Config, SizeRule, SourceRule
from cachefilesd_py.config.parse import parse_config
from cachefilesd_py.config.render import format_size, render_config
from cachefilesd_py.daemon.cli import main

# -- rendering -------------------------------------------------------------------------

_word = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-*?/", min_size=1, max_size=12)
#: a verbatim value: no NUL or newline, no leading blank, not empty, may end in blanks
_verbatim = st.text(
    st.characters(blacklist_characters="\0\n", blacklist_categories=("Cs",)), max_size=20
).map(lambda s: "x" + s)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    b = sorted(draw(st.lists(st.integers(0, 99), min_size=3, max_size=3, unique=True)))
    f = sorted(draw(st.lists(st.integers(0, 99), min_size=3, max_size=3, unique=True)))
    thresholds = {"bstop": b[0], "bcull": b[1], "brun": b[2], "fstop": f[0], "fcull": f[1]}
    thresholds["frun"] = f[2]
    names = draw(st.sets(st.sampled_from(sorted(thresholds))))
    chosen = {n: thresholds[n] for n in names}
    sources = tuple(
        SourceRule(p, f"http://h/{{volume}}/{u}/{{cookie}}")
        for p, u in draw(st.lists(st.tuples(_word, st.sampled_from("abc")), max_size=3))
    )
    try:
        candidate = Config(
            dir="/" + draw(_verbatim),
            tag=draw(st.none() | _verbatim),
            secctx=draw(st.none() | _verbatim),
            debug=draw(st.none() | st.integers(0, 2**32 - 1)),
            thresholds=chosen,
            culltable=draw(st.integers(12, 20)),
            resume_blocks=draw(st.none() | st.integers(1, 2**40)),
            resume_files=draw(st.none() | st.integers(1, 2**20)),
            nocull=draw(st.booleans()),
            ondemand=bool(sources) and draw(st.booleans()),
            sources=sources,
            chunk_size=1 << draw(st.integers(12, 26)),
            source_chunk_sizes=tuple(
                SizeRule(p, 1 << e)
                for p, e in draw(st.lists(st.tuples(_word, st.integers(12, 26)), max_size=2))
            ),
            readahead=draw(st.integers(0, 2**34)),
            fetch_timeout=draw(st.sampled_from([0.1, 0.5, 2.0, 30.0, 3600.0])),
            fetch_retries=draw(st.integers(0, 20)),
            fetch_concurrency=draw(st.integers(1, 256)),
            cache_max_bytes=draw(st.none() | st.integers(0, 2**50)),
            cache_max_objects=draw(st.none() | st.integers(1, 2**40)),
            volume_max_bytes=tuple(
                SizeRule(p, n) for p, n in draw(st.lists(st.tuples(_word, st.integers(0, 2**45))))
            ),
            cull_policy=draw(st.sampled_from(["s3fifo", "lru", "fifo"])),
            pins=tuple(draw(st.lists(_word, max_size=3))),
            pin_max_share=draw(st.integers(0, 100)),
        )
    except ValueError:
        raise AssertionError("bad strategy") from None
    full = {n: candidate.threshold(n) for n in thresholds}
    for kind in "bf":
        run, cull, stop = (full[kind + n] for n in ("run", "cull", "stop"))
        if not 0 <= stop < cull < run < 100:
            return Config(dir=candidate.dir)
    return candidate


@settings(deadline=None, max_examples=300)
@given(configs())
def test_rendered_config_parses_back_to_the_same_settings(cfg: Config) -> None:
    text = "\n".join(render_config(cfg)) + "\n"
    assert parse_config(text, "rendered.conf") == cfg


def test_rendering_is_config_syntax_not_python() -> None:
    cfg = parse_config(
        "dir /var/cache/fscache\ntag mycache\nbrun 10%\nbcull 7%\nbstop 3%\nondemand\n"
        "source * http://h/{cookie}\nchunk_size 256K\nvolume_max_bytes img 2G\n",
        "t.conf",
    )
    lines = render_config(cfg)
    for want in ("dir /var/cache/fscache", "tag mycache", "brun 10%", "bstop 3%", "#frun 7%"):
        assert want in lines
    assert "chunk_size 256K" in lines and "volume_max_bytes img 2G" in lines
    assert "#culltable 12" in lines and "#nocull" in lines and "ondemand" in lines
    text = "\n".join(lines)
    assert "{'" not in text and "SourceRule" not in text and "None" not in text


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1, 4096, 1 << 20, 3 << 30, (1 << 20) + 1)] == [
        "0",
        "1",
        "4K",
        "1M",
        "3G",
        "1048577",
    ]


# -- the checks ----------------------------------------------------------------------------


def levels(found: list[check.Finding]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"ok": [], "warning": [], "error": []}
    for f in found:
        out[f.level].append(f.text)
    return out


def test_cache_dir_on_a_real_filesystem_passes_every_probe(tmp_path: Path) -> None:
    found = levels(check.check_cache_dir(str(tmp_path)))
    assert not found["error"], found
    oks = " ".join(found["ok"])
    for probe in ("O_TMPFILE", "user xattrs", "SEEK_DATA", "O_DIRECT"):
        assert probe in oks
    assert os.listdir(tmp_path) == []  # the probes leave nothing behind


def test_missing_dir_and_file_as_dir(tmp_path: Path) -> None:
    assert "Can't confirm cache location" in check.check_cache_dir(str(tmp_path / "no"))[0].text
    (tmp_path / "f").write_text("")
    assert "not a directory" in check.check_cache_dir(str(tmp_path / "f"))[0].text
    blank = check.check_cache_dir(f"{tmp_path} ")[0]
    assert blank.level == "error" and "ends in a blank" in blank.text


def fake_mountinfo(tmp_path: Path, fstype: str, options: str = "rw") -> Path:
    st = os.stat(tmp_path)
    info = tmp_path.parent / f"mountinfo-{fstype}"
    info.write_text(
        "22 1 0:1 / / rw shared:1 - ext4 /dev/root rw\n"
        f"99 22 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / {tmp_path} {options} "
        f"shared:9 - {fstype} none {options}\n"
    )
    return info


@pytest.mark.parametrize(
    ("fstype", "options", "why"),
    [
        ("tmpfs", "rw", "tmpfs has no sync_fs: the kernel refuses it at bind"),
        ("ramfs", "rw", "ramfs has no sync_fs"),
        ("ext4", "ro", "read-only mount"),
        ("ext4", "rw,idmapped", "idmapped mount"),
    ],
)
def test_filesystems_the_kernel_refuses_at_bind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fstype: str, options: str, why: str
) -> None:
    info = fake_mountinfo(tmp_path, fstype, options)
    real = check.mount_of
    monkeypatch.setattr(check, "mount_of", lambda p: real(p, str(info)))
    found = levels(check.check_cache_dir(str(tmp_path)))
    assert any(why in e for e in found["error"]), found


def test_untested_filesystem_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = fake_mountinfo(tmp_path, "f2fs")
    real = check.mount_of
    monkeypatch.setattr(check, "mount_of", lambda p: real(p, str(info)))
    found = levels(check.check_cache_dir(str(tmp_path)))
    assert not found["error"] and any("f2fs" in w for w in found["warning"])


def test_mount_of_picks_the_longest_mount_point_and_unescapes(tmp_path: Path) -> None:
    d = tmp_path / "with space"
    d.mkdir()
    st = os.stat(d)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    info = tmp_path / "mountinfo"
    escaped = str(d).replace(" ", "\\040")
    info.write_text(
        f"1 0 {dev} / / rw - ext4 /dev/a rw\n"
        f"2 1 {dev} / {escaped} rw - xfs /dev/b rw\n"
        f"3 1 {dev} / {tmp_path}/other rw - btrfs /dev/c rw\n"
    )
    m = check.mount_of(str(d), str(info))
    assert m is not None and (m.mount_point, m.fstype, m.source) == (str(d), "xfs", "/dev/b")


def test_secctx_needs_an_lsm_that_resolves_contexts() -> None:
    cfg = Config(dir="/x", secctx="system_u:system_r:cachefiles_kernel_t:s0")
    assert check.check_secctx(Config(dir="/x"), None) == []
    assert check.check_secctx(cfg, ["capability", "landlock", "yama"])[0].level == "error"
    assert check.check_secctx(cfg, ["capability", "selinux"])[0].level == "ok"
    assert check.check_secctx(cfg, None)[0].level == "warning"


def test_ondemand_needs_5_19() -> None:
    cfg = Config(dir="/x", ondemand=True, sources=(SourceRule("*", "http://h/{cookie}"),))
    assert any(f.level == "error" for f in check.check_kernel(cfg, "5.15.0-91-generic"))
    assert not any(f.level == "error" for f in check.check_kernel(cfg, "6.12.1"))


def test_file_source_base_directory(tmp_path: Path) -> None:
    cfg = Config(
        dir="/x",
        sources=(
            SourceRule("a/*", f"file://{tmp_path}/{{cookie}}", "c", 3),
            SourceRule("*", f"file://{tmp_path}/absent/{{cookie}}", "c", 4),
        ),
    )
    found = check.check_sources(cfg)
    assert [f.level for f in found] == ["ok", "warning"]
    assert found[1].text.startswith("c:4: source *")


# -- the command ---------------------------------------------------------------------------


def test_check_config_prints_config_syntax_and_the_kernel_commands(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(
        f"dir\t{tmp_path}\ntag  mycache\nbrun 20%\nondemand\nsource * http://h/{{cookie}}\n"
    )
    out, err = io.StringIO(), io.StringIO()
    assert check.check_config_main(str(conf), out, err) == 0, err.getvalue()
    text = out.getvalue()
    assert f"dir {tmp_path}\n" in text and "\nbrun 20%\n" in text and "\n#bcull 5%\n" in text
    assert f"#   dir {tmp_path}\n#   tag mycache\n#   brun 20%\n#   bind ondemand\n" in text
    assert "7/5/1% (run/cull/stop)" in text
    # the report is itself a configuration file with the same settings
    again = tmp_path / "again.conf"
    again.write_text(text)
    assert check.check_config_main(str(again), io.StringIO(), io.StringIO()) == 0


def test_check_config_exit_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"dir {tmp_path}/absent\n")
    assert main(["--check-config", "-f", str(conf)]) == 1
    assert f"{conf}:1: dir '{tmp_path}/absent': Can't confirm cache location" in (
        capsys.readouterr().err
    )
    conf.write_text(f"dir {tmp_path}\ndebug -1\n")
    assert main(["--check-config", "-f", str(conf)]) == 2
    assert f"{conf}:2: debug: " in capsys.readouterr().err
