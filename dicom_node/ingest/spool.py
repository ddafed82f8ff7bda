"""The spool: received instances as Part 10 files, written atomically and durably.

``<study uid>/<series uid>/<sop uid>.dcm`` under ``storage.spool_dir``; each file is written to a
temporary name, fsynced, renamed, and its directory fsynced before the instance is recorded (docs/edge.md).
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_node.ingest.header import Buffer
from dicom_node.ingest.identity import InstanceIdentity, RejectedInstance
from dicom_node.settings import Settings
from dicom_node.statuses import StoreStatus


def _meta_element(tag_element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, tag_element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information of a received data set's file.

    Built without a pydicom Dataset (this is on the C-STORE hot path); the
    data set follows as received, in its transfer syntax.
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii")),
        _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
        _meta_element(0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
        _meta_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii")),
        _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
        _meta_element(0x0016, b"AE", source_ae_title.encode("ascii", "replace")[:16]),
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"".join((b"\x00" * 128, b"DICM", group_length, body))


#: How long a measured free-space figure of the spool is trusted.
FREE_SPACE_TTL_S = 0.5


class Spool:
    """The spool directory: ``<study uid>/<series uid>/<sop uid>.dcm``.

    Parameters
    ----------
    root : Path
        The spool directory (created).
    fsync : bool
        Flush each file to disk before it is recorded (``storage.fsync``).
    quarantine : Path, optional
        Where start-up reconciliation moves spool files it cannot record (same
        layout; :mod:`dicom_node.ingest.reconcile`).
    """

    def __init__(self, root: Path, *, fsync: bool = True, quarantine: Path | None = None) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.quarantine = (quarantine or self.root.parent / "quarantine").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._dirs: set[Path] = set()
        self._series_dirs: dict[tuple[str, str], Path] = {}
        self._free_measured = 0
        self._free_measured_at = -FREE_SPACE_TTL_S
        self._written_since = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Spool:
        """The spool of ``storage.spool_dir`` with ``storage.fsync`` and ``storage.quarantine_dir``."""
        return cls(settings.spool_dir, fsync=settings.storage.fsync, quarantine=settings.quarantine_dir)

    def path_for(self, ident: InstanceIdentity) -> Path:
        """The file of an instance; UIDs were checked, so they are safe names.

        The series directory is resolved (symbolic links followed) once, when
        first used: a path that would leave the spool is refused.
        """
        key = (ident.study_instance_uid, ident.series_instance_uid)
        directory = self._series_dirs.get(key)
        if directory is None:
            directory = self.root / key[0] / key[1]
            if self.root not in (directory / "x").resolve().parents:
                raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, "instance path escapes the spool")
            if len(self._series_dirs) > 10_000:
                self._series_dirs.clear()
            self._series_dirs[key] = directory
        return directory / f"{ident.sop_instance_uid}.dcm"

    def free_bytes(self) -> int:
        """Free space on the spool's file system.

        Measured at most every :data:`FREE_SPACE_TTL_S`; the bytes the spool
        wrote since are subtracted from the last measurement.
        """
        now = time.monotonic()
        if now - self._free_measured_at > FREE_SPACE_TTL_S:
            self._free_measured = int(shutil.disk_usage(self.root).free)
            self._free_measured_at = now
            self._written_since = 0
        return self._free_measured - self._written_since

    def write(self, path: Path, data: Buffer | Sequence[Buffer]) -> None:
        """Write *data* (one buffer, or several written in order) atomically and durably.

        A temporary file, fsynced, renamed into place, then the directory
        fsynced (with ``storage.fsync``; new directories' parents too), so the
        file and its name survive a power loss before the row is committed.
        """
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        parent = path.parent
        if parent not in self._dirs:
            created = self._make_dirs(parent)
            if self.fsync:  # the new directories' own entries, from the top down
                for directory in created:
                    fsync_directory(directory.parent)
            if len(self._dirs) > 10_000:
                self._dirs.clear()
            self._dirs.add(parent)
        tmp = parent / f".{path.name}.{threading.get_ident()}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            total = sum(len(part) for part in parts)
            written = os.writev(fd, parts)
            if written < total:  # a short write: finish it part by part
                view = memoryview(b"".join(parts))[written:]
                while view:
                    view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self.fsync:  # the rename itself: without it a power loss can leave the old name, or none
            fsync_directory(parent)
        self._written_since += total

    def _make_dirs(self, directory: Path) -> list[Path]:
        """Create *directory* and missing parents; returns those created, topmost first."""
        missing: list[Path] = []
        probe = directory
        while probe != self.root and not probe.is_dir() and self.root in probe.parents:
            missing.append(probe)
            probe = probe.parent
        directory.mkdir(parents=True, exist_ok=True)
        return missing[::-1]

    def quarantine_path(self, spooled: Path) -> Path:
        """Where a spooled file goes when it cannot be recorded (and where earlier versions moved aborted ones)."""
        try:
            relative = spooled.resolve().relative_to(self.root)
        except ValueError:
            relative = Path(spooled.name)
        return self.quarantine / relative


def fsync_directory(directory: Path) -> None:
    """fsync a directory, making the entries created or renamed in it durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

