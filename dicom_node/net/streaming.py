"""Data sets pynetdicom streams to files while they are received (``STORE_RECV_CHUNKED_DATASET``).

Used by the Storage SCP on the public DIMSE path and for C-STOREs the lean
path hands to pynetdicom: the files go to ``<spool>/.receiving/``, are read
through a memory map, and are removed when their receipt is cut off.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

#: (0002,0000) File Meta Information Group Length, explicit VR little endian, as the first element after "DICM".
_GROUP_LENGTH_TAG = b"\x02\x00\x00\x00UL\x04\x00"


#: Preamble, "DICM" and the group length element: where the rest of the file meta starts.
_META_START = 128 + 4 + 12


_chunked_lock = threading.Lock()


_chunked_users = 0


_chunked_before = False


_tempfile_before: Any = None


def chunked_receive(on: bool, receiving_dir: Path | None = None) -> None:
    """Turn pynetdicom's global ``STORE_RECV_CHUNKED_DATASET`` on while a server runs, data sets into *receiving_dir*.

    pynetdicom then writes each C-STORE data set to a temporary file as its
    fragments arrive.  The files go to the first running server's
    ``<spool>/.receiving/`` as ``.rx-*.part`` (never to a RAM-backed /tmp; one
    left by a crash is removed by start-up reconciliation).  Counted: on while
    at least one server runs in this process, then back to what it was.
    """
    global _chunked_users, _chunked_before, _tempfile_before
    with _chunked_lock:
        if on:
            if _chunked_users == 0:
                _chunked_before = bool(_config.STORE_RECV_CHUNKED_DATASET)
                _tempfile_before = dimse_messages.NamedTemporaryFile
                if receiving_dir is not None:
                    receiving_dir.mkdir(parents=True, exist_ok=True)
                    dimse_messages.NamedTemporaryFile = _receiving_file(receiving_dir)
            _chunked_users += 1
            _config.STORE_RECV_CHUNKED_DATASET = True
        elif _chunked_users > 0:
            _chunked_users -= 1
            if _chunked_users == 0:
                _config.STORE_RECV_CHUNKED_DATASET = _chunked_before
                dimse_messages.NamedTemporaryFile = _tempfile_before


def _receiving_file(directory: Path) -> Any:
    """pynetdicom's ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``, in *directory*."""
    def named_temporary_file(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(dir=directory, prefix=".rx-", suffix=".part")
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # pynetdicom closes and removes it
    return named_temporary_file


@contextlib.contextmanager
def streamed_dataset(path: Any) -> Iterator[memoryview]:
    """The encoded data set of a file pynetdicom streamed a C-STORE to, memory-mapped (never read whole).

    The file is pynetdicom's Part 10 file: preamble, "DICM", file meta (group
    length first), then the data set exactly as received.

    Raises
    ------
    ValueError
        Not a file meta that pynetdicom writes.
    """
    with open(path, "rb") as stream:
        head = stream.read(_META_START)
        if len(head) < _META_START or head[128:132] != b"DICM" or head[132:140] != _GROUP_LENGTH_TAG:
            raise ValueError("not a file meta pynetdicom writes")
        start = _META_START + int.from_bytes(head[140:144], "little")
        size = os.fstat(stream.fileno()).st_size
        if start > size:
            raise ValueError("file meta past the end of the file")
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as whole:
            view = whole[start:]
            try:
                yield view
            finally:
                view.release()


def discard_partial(assoc: Any) -> None:
    """Close and remove the temporary file of a C-STORE data set whose receipt ended unfinished.

    pynetdicom removes the file after ``EVT_C_STORE``; a data set cut off by an
    abort or a closed connection was never handed over, and its file would stay.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    with contextlib.suppress(OSError):
        partial.close()
    with contextlib.suppress(OSError):
        os.unlink(partial.name)

