"""structlog configuration: JSON or console lines on stderr, level filtering, role, idempotence."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from common.log import configure_logging, get_logger


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_with_level_timestamp_role_and_logger(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("replay.service")  # created before configuration, as module-level loggers are
    configure_logging("info", json_logs=True, role="replay")
    log.info("stored subtree", tree_id="t1", seq=3)
    log.debug("not shown")
    captured = capsys.readouterr()
    assert captured.out == ""
    [record] = _json_lines(captured.err)
    assert record["event"] == "stored subtree"
    assert record["level"] == "info"
    assert record["role"] == "replay"
    assert record["logger"] == "replay.service"
    assert (record["tree_id"], record["seq"]) == ("t1", 3)
    stamp = datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00"))
    assert stamp.tzinfo is not None


def test_stdlib_records_share_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", json_logs=True, role="actor")
    logging.getLogger("zmq.auth").warning("denied %s", "key")
    logging.getLogger("zmq.auth").info("quiet")
    [record] = _json_lines(capsys.readouterr().err)
    assert record == {**record, "event": "denied key", "level": "warning", "role": "actor", "logger": "zmq.auth"}


def test_exceptions_are_structured_without_locals(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json_logs=True)
    secret_local = "s3cr3t-key-material"
    try:
        raise ValueError(f"bad {len(secret_local)}")
    except ValueError:
        get_logger("t").exception("failed")
    err = capsys.readouterr().err
    [record] = _json_lines(err)
    assert "role" not in record
    assert isinstance(record["exception"], list)
    assert record["exception"][0]["exc_type"] == "ValueError"
    assert secret_local not in err


def test_console_renderer_when_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", json_logs=False, role="learner")
    get_logger("learner.loop").debug("step done", step=7)
    err = capsys.readouterr().err
    assert "step done" in err and "step=7" in err and "role=learner" in err
    assert not err.lstrip().startswith("{")
    assert "\x1b[" not in err  # no colour codes when stderr is not a terminal


def test_json_is_the_default_when_stderr_is_not_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    get_logger("t").info("hello")
    [record] = _json_lines(capsys.readouterr().err)
    assert record["event"] == "hello"


def test_configuring_twice_replaces_instead_of_duplicating(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json_logs=True, role="a")
    configure_logging("info", json_logs=True, role="b")
    get_logger("t").info("once")
    logging.getLogger("lib").warning("once too")
    records = _json_lines(capsys.readouterr().err)
    assert [r["event"] for r in records] == ["once", "once too"]
    assert {r["role"] for r in records} == {"b"}


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="verbose"):
        configure_logging("verbose")
