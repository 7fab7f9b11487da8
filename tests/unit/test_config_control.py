"""The control directives: control_socket, control_group, metrics_listen."""

from __future__ import annotations

import pytest

from cachefilesd_py.config.parse import parse_config, parse_listen
from cachefilesd_py.errors import ConfigError

BASE = "dir /var/cache/fscache\n"


def test_defaults_and_values() -> None:
    cfg = parse_config(BASE, "f")
    assert cfg.control_socket == "/run/cachefilesd-py/control.sock"
    assert cfg.control_group is None and cfg.metrics_listen is None
    cfg = parse_config(
        BASE + "control_socket /run/x.sock\ncontrol_group adm\nmetrics_listen [::1]:9101\n", "f"
    )
    assert (cfg.control_socket, cfg.control_group, cfg.metrics_listen) == (
        "/run/x.sock",
        "adm",
        "[::1]:9101",
    )
    assert parse_config(BASE + "control_socket none\n", "f").control_socket == ""
    assert parse_config(BASE + "control_group 4242\n", "f").control_group == "4242"


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        ("control_socket run/x.sock", "absolute path or 'none'"),
        ("control_socket /" + "x" * 120, "at most 107 bytes"),
        ("control_group a:b", "group name or number"),
        ("control_group", "exactly one argument"),
        ("metrics_listen 0.0.0.0:9101", "not a loopback address"),
        ("metrics_listen 10.1.2.3:9101", "not a loopback address"),
        ("metrics_listen localhost:9101", "not an IP address"),
        ("metrics_listen 127.0.0.1", "<loopback address>:<port>"),
        ("metrics_listen 127.0.0.1:0", "<loopback address>:<port>"),
        ("metrics_listen 127.0.0.1:70000", "<loopback address>:<port>"),
    ],
)
def test_bad_control_directives_name_file_line_and_rule(line: str, rule: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + line + "\n", "t.conf")
    assert "t.conf:2" in str(e.value) and rule in str(e.value)


def test_given_twice() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + "control_socket /a\ncontrol_socket /b\n", "t.conf")
    assert "t.conf:3" in str(e.value) and "given twice" in str(e.value)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9101") == ("127.0.0.1", 9101)
    assert parse_listen("[::1]:1") == ("::1", 1)
    assert parse_listen("127.8.9.10:65535") == ("127.8.9.10", 65535)
