"""Where the logs go, as cachefilesd decides it: syslog unless ``-s``."""

from __future__ import annotations

import pytest

from cachefilesd_py.daemon import logging as dlog


@pytest.mark.parametrize("tty", [True, False])
def test_without_s_logs_go_to_syslog_even_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tty: bool
) -> None:
    monkeypatch.setattr(dlog.os.path, "exists", lambda p: p == "/dev/log")
    monkeypatch.setattr(dlog.sys.stderr, "isatty", lambda: tty, raising=False)
    assert dlog.choose_format("auto", use_stderr=False) == "syslog"


def test_without_s_and_without_dev_log_the_journal_form_goes_to_stderr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dlog.os.path, "exists", lambda p: False)
    assert dlog.choose_format("auto", use_stderr=False) == "journal"


def test_with_s_stderr_console_or_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlog, "stderr_is_journal", lambda: False)
    assert dlog.choose_format("auto", use_stderr=True) == "console"
    monkeypatch.setattr(dlog, "stderr_is_journal", lambda: True)
    assert dlog.choose_format("auto", use_stderr=True) == "journal"
    assert dlog.choose_format("json", use_stderr=False) == "json"


def test_lines_name_the_process(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    dlog.configure_logging(0, "json", True)
    dlog.set_process("serving")
    try:
        structlog.get_logger("t").info("hello")
    finally:
        dlog.set_process(None)
        structlog.reset_defaults()  # the captured stderr goes away after this test
    err = capsys.readouterr().err
    assert '"proc": "serving"' in err and '"pid": ' in err
