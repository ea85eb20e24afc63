"""logconfig: one structlog configuration; events below the level cost no processing."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from rebuildd import logconfig


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    """structlog and the root logger as ``configure`` leaves them, writing to a buffer;
    both restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved = structlog.get_config()
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        root.handlers[:], root.level = handlers, level
        structlog.configure(**saved)


def _configure(buffer: io.StringIO, level: str) -> None:
    logconfig.configure(level=level, fmt="json")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


class TestConfigure:
    def test_events_at_or_above_the_level_are_written_as_json(
        self, configured: io.StringIO
    ) -> None:
        """An event at the level is one JSON line with its level, logger and key-values."""
        _configure(configured, "warning")
        structlog.get_logger("rebuildd.test").bind(action="rebuild").warning("slow", ms=3)
        [line] = _lines(configured)
        assert line["event"] == "slow" and line["level"] == "warning"
        assert line["logger"] == "rebuildd.test"
        assert line["action"] == "rebuild" and line["ms"] == 3

    def test_events_below_the_level_reach_no_processor(
        self, configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A debug event at level warning is dropped before the timestamp is even taken."""
        _configure(configured, "warning")
        stamped: list[str] = []
        original = structlog.processors.TimeStamper.__call__

        def counting(self: Any, logger: Any, name: str, event: Any) -> Any:
            stamped.append(name)
            return original(self, logger, name, event)

        monkeypatch.setattr(structlog.processors.TimeStamper, "__call__", counting)
        log = structlog.get_logger("rebuildd.test")
        log.debug("step", step="power_off")
        log.info("job finished")
        assert stamped == [] and configured.getvalue() == ""
        log.error("job failed")
        assert stamped == ["error"]
        assert [line["event"] for line in _lines(configured)] == ["job failed"]

    def test_stdlib_loggers_go_through_the_same_formatter(self, configured: io.StringIO) -> None:
        """uvicorn's stdlib records come out as the same JSON lines."""
        _configure(configured, "info")
        logging.getLogger("uvicorn.error").info("started")
        [line] = _lines(configured)
        assert line["event"] == "started" and line["logger"] == "uvicorn.error"
