"""``dicom-node``: the node's command line for PACS administrators."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select

from dicom_node.cli import check as cli_check
from dicom_node.cli import edge as cli_edge
from dicom_node.cli import model as cli_model
from dicom_node.cli import worker as cli_worker
from dicom_node.db.audit import fmt_value, run_record
from dicom_node.db.models import ClinicalNote as NoteRow
from dicom_node.db.models import Run, utcnow
from dicom_node.settings import Settings, load_settings
from pipeline.errors import NodeError

logger = logging.getLogger(__name__)



class CommandGroup(Protocol):
    """A module adding sub-commands: ``add_commands`` and ``dispatch`` (None: not mine)."""

    def add_commands(self, sub: Any, common: argparse.ArgumentParser) -> None: ...

    def dispatch(self, args: argparse.Namespace, settings: Settings) -> int | None: ...



#: Modules that add sub-commands (model training/evaluation, workers, the site check, ...).
EXTENSIONS: tuple[CommandGroup, ...] = (cli_worker, cli_model, cli_edge, cli_check)



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



def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML settings file (default config/node.toml)")
    common.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common.add_argument("--ae-title", help="our AE title")
    common.add_argument("--bind", help="address to listen on")
    common.add_argument("--port", type=int, help="port to listen on (0: any free port)")
    common.add_argument("--data-dir", help="data directory (spool, database, outbox)")
    common.add_argument("--database-url", help="SQLAlchemy URL of the database")
    common.add_argument("--model", help="model directory")
    common.add_argument("--device", help="torch device: cpu, cuda, cuda:N")
    common.add_argument("--quiet-period", type=float, help="seconds without instances before a series is complete")
    common.add_argument("--workers", type=int, help="runs processed in parallel")
    common.add_argument("--executor", choices=["local", "celery"],
                        help="local: in-node workers; celery: enqueue to processing.broker_url for `dicom-node worker`")
    return common



def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dicom-node``."""
    common = _common()
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the DICOM node until SIGTERM")
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", parents=[common], help="bring the schema to the latest revision")
    runs = sub.add_parser("runs", help="audited runs").add_subparsers(dest="runs_command", required=True)
    runs_list = runs.add_parser("list", parents=[common], help="list recent runs")
    runs_list.add_argument("--limit", type=int, default=20)
    runs_show = runs.add_parser("show", parents=[common], help="show one run in full")
    runs_show.add_argument("run_id")
    notes = sub.add_parser("notes", help="clinical notes store").add_subparsers(dest="notes_command", required=True)
    notes_import = notes.add_parser("import", parents=[common], help="import notes from CSV or JSON lines")
    notes_import.add_argument("file", type=Path)
    model = sub.add_parser("model", help="model files").add_subparsers(dest="model_command", required=True)
    init_demo = model.add_parser("init-demo", parents=[common], help="write the seeded untrained demonstration model")
    init_demo.add_argument("--out", type=Path, help="target directory (default: the configured model path)")
    sub.add_parser("demo", parents=[common], help="run the node end to end against a local Orthanc")
    for extension in EXTENSIONS:
        extension.add_commands(sub, common)
    return parser



def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the file and environment, with the CLI flags on top."""
    overrides = {key: getattr(args, flag) for flag, key in OVERRIDES.items() if getattr(args, flag, None) is not None}
    return load_settings(args.config, overrides=overrides)



def configure_logging(level: str) -> None:
    """Log to stderr; pynetdicom is kept at WARNING since its debug output shows datasets."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)



def cmd_runs_list(settings: Settings, limit: int) -> None:
    """Print the most recent runs, one line each."""
    from dicom_node.db.session import open_database

    db = open_database(settings.database_url, migrate=False)
    with db.sessions() as session:
        runs = session.scalars(select(Run).order_by(Run.created_at.desc()).limit(limit)).all()
        print(f"{'run':36}  {'created':19}  {'state':12}  {'class':5}  outcome")
        for run in runs:
            print(f"{run.id:36}  {fmt_value(run.created_at)[:19]:19}  {run.state:12}  {run.predicted_class or '-':5}  "
                  f"{run.outcome or '-'}")



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
    """Entry point of ``dicom-node``."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = settings_from_args(args)
        return _dispatch(args, settings)
    except NodeError as exc:
        print(f"dicom-node: error: {exc}", file=sys.stderr)
        return 2



def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    for extension in EXTENSIONS:
        status = extension.dispatch(args, settings)
        if status is not None:
            return status
    if args.command == "serve":
        from dicom_node.app import Node

        # ``kill -USR1 <pid>`` writes every thread's stack to stderr (code locations only, no data),
        # for diagnosing a node that seems stuck without stopping it.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        Node(settings).serve_forever()
    elif args.command == "db":
        from dicom_node.db.session import upgrade

        upgrade(settings.database_url)
        print("database schema is at the latest revision")
    elif args.command == "runs" and args.runs_command == "list":
        cmd_runs_list(settings, args.limit)
    elif args.command == "runs":
        print(json.dumps(run_record(settings, args.run_id), indent=2))
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

