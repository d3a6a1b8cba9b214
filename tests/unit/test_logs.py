# Rank-aware logging (mgt_scale/logs.py): which rank logs what, at which level, with which prefix.
import logging

import pytest

from mgt_scale.logs import get_logger, parse_level, setup_logging


@pytest.fixture(autouse=True)
def _restore():
    yield
    setup_logging(rank=0, world=1, level="INFO", all_ranks=False)


def test_single_process_plain_lines_info_stdout_warning_stderr(capsys):
    setup_logging(rank=0, world=1, level="INFO", all_ranks=False)
    log = get_logger("mgt_scale.x")
    log.info("hello %d", 3)
    log.warning("careful")
    log.debug("hidden")
    out, err = capsys.readouterr()
    assert out == "hello 3\n"
    assert err == "warning: careful\n"


def test_other_ranks_quiet_unless_all_ranks(capsys):
    setup_logging(rank=3, world=8, level="INFO", all_ranks=False)
    log = get_logger("x")
    log.info("progress")
    log.error("broken")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "[rank 3] error: broken\n"
    setup_logging(rank=3, world=8, level="INFO", all_ranks=True)
    log.info("progress")
    assert capsys.readouterr().out == "[rank 3] progress\n"


def test_level_from_environment(monkeypatch, capsys):
    monkeypatch.setenv("MGT_LOG_LEVEL", "warning")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    setup_logging()
    get_logger("x").info("quiet")
    get_logger("x").warning("loud")
    out, err = capsys.readouterr()
    assert out == "" and err == "[rank 0] warning: loud\n"


def test_bad_level_names_the_variable():
    with pytest.raises(ValueError, match="MGT_LOG_LEVEL='chatty'"):
        parse_level("chatty")
    assert parse_level("debug") == logging.DEBUG


@pytest.mark.parametrize("name", ["CRITICAL", "fatal", "NOTSET", "50"])
def test_level_that_would_hide_errors_is_refused(name):
    """A level above ERROR would drop every error line (a failed command exits 2 printing nothing)."""
    with pytest.raises(ValueError, match="MGT_LOG_LEVEL"):
        parse_level(name)
    assert parse_level("warn") == logging.WARNING
    assert parse_level("ERROR") == logging.ERROR
