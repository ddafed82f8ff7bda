"""A check that no log record written during a test quotes patient data."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def logs_free_of(phi: Sequence[str], *, debug: Sequence[str] = ("dicom_node",)) -> Iterator[None]:
    """Fail when a record of the loggers ``debug`` (at DEBUG) or pynetdicom (at INFO) contains a string of ``phi``."""
    handler = _Collect()
    root = logging.getLogger()
    names = [*debug, "pynetdicom"]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.INFO if name == "pynetdicom" else logging.DEBUG)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    leaked = [line for line in handler.lines if any(s in line for s in phi)]
    assert not leaked, leaked[:3]
