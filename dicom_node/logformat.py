"""Log formats of the node: ``text`` lines or one JSON object per line (``logging.format``).

Lowest layer (beside settings), so that the node's worker processes, which
rebuild the node's logging configuration (:class:`dicom_node.runs.worker.LogConfig`),
get the same format: a handler whose format string is :data:`JSON_FORMAT` gets
a :class:`JsonFormatter`.  The JSON object has ``time`` (UTC, ISO 8601 with
milliseconds), ``level``, ``logger`` and ``message``, plus ``run_id`` and
``study_uid`` when the call passed them in ``extra``, and ``exception`` (the
traceback) when there is one.  Messages are the same as in text form: UIDs and
run ids, never patient names or IDs.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The format string that stands for :class:`JsonFormatter` (in a handler captured for a worker process).
JSON_FORMAT = "%(message)s json"
EXTRA_KEYS = ("run_id", "study_uid")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(JSON_FORMAT, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EXTRA_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = str(value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def make_formatter(fmt: str | None, datefmt: str | None = None) -> logging.Formatter:
    """The formatter a format string stands for (:data:`JSON_FORMAT`: a :class:`JsonFormatter`)."""
    return JsonFormatter() if fmt == JSON_FORMAT else logging.Formatter(fmt, datefmt)


def formatter_for(kind: str) -> logging.Formatter:
    """The formatter of ``logging.format`` (``text`` or ``json``)."""
    return JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT)
