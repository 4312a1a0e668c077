"""Log output: text or JSON lines on stderr, with repeated identical messages rate-limited.

One line per event that matters (start, listen, repoint, state change, reload, budget
exhaustion). When an upstream flaps or a client floods, the same line can come thousands of
times a second; the RepeatFilter lets each distinct line through at most once per
REPEAT_WINDOW_SECONDS and says how many were held back on the next one that passes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

REPEAT_WINDOW_SECONDS = 10.0
# Distinct messages remembered; past this the memory is cleared (a flood of distinct lines is
# not what the filter is for, and it must stay bounded).
MAX_REMEMBERED_MESSAGES = 10_000
LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RepeatFilter(logging.Filter):
    """Pass a message (same logger, level and text) at most once per window; the next one
    let through after a window with repeats carries " (repeated N times)"."""

    def __init__(self, window_seconds: float = REPEAT_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_seconds = window_seconds
        self.clock = clock
        # key -> [window start, repeats held back since]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        key = (record.name, record.levelno, message)
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.window_seconds:
            seen[1] += 1
            return False
        if len(self._seen) >= MAX_REMEMBERED_MESSAGES:
            self._seen.clear()
        repeats = int(seen[1]) if seen is not None else 0
        self._seen[key] = [now, 0]
        if repeats:
            # Freeze the text with its suffix, so every formatter shows it.
            record.msg = f"{message} (repeated {repeats} times)"
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record to stderr in `log_format`, through the repeat filter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(_TEXT_FORMAT))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
