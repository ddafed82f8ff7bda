"""``dicom-node``: the node's command line for PACS administrators."""

from __future__ import annotations

import argparse
import errno
import faulthandler
import logging
import signal
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from core.errors import NodeError
from dicom_node.cli import check as cli_check
from dicom_node.cli import edge as cli_edge
from dicom_node.cli import model as cli_model
from dicom_node.cli import runs as cli_runs
from dicom_node.cli import worker as cli_worker
from dicom_node.db.models import ClinicalNote as NoteRow
from dicom_node.db.models import utcnow
from dicom_node.logformat import formatter_for
from dicom_node.ops.http import bind_socket
from dicom_node.ops.queries import masked_url
from dicom_node.settings import Settings, load_settings

logger = logging.getLogger(__name__)


class CommandGroup(Protocol):
    """A module adding sub-commands: ``add_commands`` and ``dispatch`` (None: not mine)."""

    def add_commands(self, sub: Any, common: argparse.ArgumentParser) -> None: ...

    def dispatch(self, args: argparse.Namespace, settings: Settings) -> int | None: ...


#: Modules that add sub-commands (model training/evaluation, workers, the site check, ...).
EXTENSIONS: tuple[CommandGroup, ...] = (cli_worker, cli_model, cli_edge, cli_check, cli_runs)

#: The flag groups each command module's sub-commands take (every command takes --config and --log-level).
EXTENSION_FLAGS: dict[str, tuple[str, ...]] = {
    cli_worker.__name__: ("storage", "model", "device", "processing"),
    cli_model.__name__: ("device",),
    cli_edge.__name__: ("storage",),
    cli_check.__name__: (),
    cli_runs.__name__: ("storage",),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


#: CLI flag -> dotted settings key.
OVERRIDES = {
    "ae_title": "network.ae_title",
    "bind": "network.bind_address",
    "port": "network.port",
    "data_dir": "storage.data_dir",
    "database_url": "database.url",
    "model": "model.path",
    "device": "model.device",
    "quiet_period": "completeness.quiet_period_s",
    "workers": "processing.workers",
    "executor": "processing.executor",
}


def _flags(*groups: str) -> argparse.ArgumentParser:
    """A parent parser with ``--config``, ``--log-level`` and the flags of *groups*."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", type=Path, help="TOML settings file (default config/node.toml)")
    parent.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help="debug, info, warning or error (default: logging.level, INFO)")
    if "network" in groups:
        parent.add_argument("--ae-title", help="our AE title")
        parent.add_argument("--bind", help="address to listen on")
        parent.add_argument("--port", type=int, help="port to listen on (0: any free port)")
    if "storage" in groups:
        parent.add_argument("--data-dir", help="data directory (spool, database, outbox)")
        parent.add_argument("--database-url", help="SQLAlchemy URL of the database")
    if "model" in groups:
        parent.add_argument("--model", help="model directory")
    if "device" in groups:
        parent.add_argument("--device", help="torch device: cpu, cuda, cuda:N")
    if "processing" in groups:
        parent.add_argument("--quiet-period", type=float,
                            help="seconds without instances before a series is complete")
        parent.add_argument("--workers", type=int, help="runs processed in parallel")
        parent.add_argument("--executor", choices=["local", "celery"],
                            help="local: in-node workers; celery: enqueue to processing.broker_url for "
                                 "`dicom-node worker`")
    return parent


def _version() -> str:
    try:
        return metadata.version("dicom-node")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dicom-node``; each sub-command takes only the flags it uses."""
    everything = _flags("network", "storage", "model", "device", "processing")
    storage = _flags("storage")
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicom-node {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[everything], help="run the DICOM node until SIGTERM")
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", parents=[storage], help="bring the schema to the latest revision")
    notes = sub.add_parser("notes", help="clinical notes store").add_subparsers(dest="notes_command", required=True)
    notes_import = notes.add_parser("import", parents=[storage], help="import notes from CSV or JSON lines")
    notes_import.add_argument("file", type=Path)
    model = sub.add_parser("model", help="model files").add_subparsers(dest="model_command", required=True)
    init_demo = model.add_parser("init-demo", parents=[_flags("storage", "model")],
                                 help="write the seeded untrained demonstration model")
    init_demo.add_argument("--out", type=Path, help="target directory (default: the configured model path)")
    cli_model.add_model_commands(model, _flags())
    sub.add_parser("demo", parents=[everything], help="run the node end to end against a local Orthanc")
    for extension in EXTENSIONS:
        extension.add_commands(sub, _flags(*EXTENSION_FLAGS.get(getattr(extension, "__name__", ""), ())))
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the file and environment, with the CLI flags on top."""
    overrides = {key: getattr(args, flag) for flag, key in OVERRIDES.items() if getattr(args, flag, None) is not None}
    return load_settings(args.config, overrides=overrides)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr as text lines or JSON objects (``logging.format``), like :func:`logging.basicConfig`.

    As with ``basicConfig``, a process whose root logger already has handlers of
    its own (an embedding application, pytest) keeps them; a handler installed
    here before is replaced.  pynetdicom is kept at WARNING (its debug output shows data).
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "dicom_node", False)]
    if not root.handlers or ours:
        for old in ours:
            root.removeHandler(old)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter_for(fmt))
        handler.dicom_node = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def cmd_notes_import(settings: Settings, path: Path) -> int:
    """Import clinical notes into the node's database."""
    from dicom_node.db.session import open_database
    from pipeline.notes import parse_notes_file

    notes = parse_notes_file(path)
    db = open_database(settings.database_url)
    now = utcnow()
    with db.sessions.begin() as session:
        for note in notes:
            session.add(NoteRow(external_id=note.note_id, patient_id=note.patient_id,
                                issuer_of_patient_id=note.issuer_of_patient_id,
                                accession_number=note.accession_number, note_date=note.note_date,
                                note_type=note.note_type, text=note.text, imported_at=now))
    return len(notes)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dicom-node``: exit 0 on success; errors are one line on stderr (exit 2, or 1)."""
    args = build_parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = settings_from_args(args)
        args.log_level = args.log_level or settings.logging.level  # the effective level, for the commands
        configure_logging(args.log_level, settings.logging.format)
        return _dispatch(args, settings)
    except NodeError as exc:
        return _error(str(exc))
    except SQLAlchemyError as exc:
        url = masked_url(settings.database_url) if settings is not None else "?"
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        return _error(f"database {url}: {reason}")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _error(f"cannot listen: address already in use ({exc})")
        raise


def _error(message: str) -> int:
    print(f"dicom-node: error: {message}", file=sys.stderr)
    return 2


def _check_dicom_port(settings: Settings) -> None:
    """Fail at once (before the model loads) when the DICOM port is taken."""
    net = settings.network
    if net.port:
        bind_socket(net.bind_address, net.port, key="network.port").close()


def _serve(settings: Settings) -> None:
    from dicom_node.app import Node

    _check_dicom_port(settings)
    # ``kill -USR1 <pid>`` writes every thread's stack to stderr (code locations only, no data),
    # for diagnosing a node that seems stuck without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    node = Node(settings)
    try:
        node.serve_forever()
    except BaseException:
        node.stop()
        raise


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    for extension in EXTENSIONS:
        status = extension.dispatch(args, settings)
        if status is not None:
            return status
    if args.command == "serve":
        _serve(settings)
    elif args.command == "db":
        from dicom_node.db.session import upgrade

        upgrade(settings.database_url)
        print("database schema is at the latest revision")
    elif args.command == "notes":
        print(f"imported {cmd_notes_import(settings, args.file)} note(s)")
    elif args.command == "model":
        from model.inference import init_demo_model

        out = init_demo_model(args.out or settings.model_path)
        print(f"demonstration model written to {out}")
    elif args.command == "demo":
        from dicom_node.cli.demo import run_demo

        return run_demo(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

