"""``dicom-node runs list|show``: the audited runs, read-only (nothing is created when there is no database)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dicom_node.db.audit import run_record
from dicom_node.ops.queries import RunFilter, check_schema, list_runs, open_existing, resolve_run_id
from dicom_node.settings import Settings


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``runs list`` and ``runs show``."""
    runs = sub.add_parser("runs", help="audited runs").add_subparsers(dest="runs_command", required=True)
    listing = runs.add_parser("list", parents=[common], help="list runs, newest first")
    listing.add_argument("--state", choices=["queued", "running", "succeeded", "not_analysed", "failed"])
    listing.add_argument("--outcome", help="e.g. analysed, no_suitable_series, processing_error")
    listing.add_argument("--accession", help="AccessionNumber of the study")
    listing.add_argument("--study", help="StudyInstanceUID")
    listing.add_argument("--id", dest="id_prefix", help="run id or its first characters")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true", help="JSON records instead of the table")
    show = runs.add_parser("show", parents=[common], help="show one run in full (JSON)")
    show.add_argument("run_id", help="run id or a unique prefix (the short id of `runs list`)")


def dispatch(args: argparse.Namespace, settings: Settings) -> int | None:
    """Run ``runs list`` or ``runs show``; None for other commands."""
    if args.command != "runs":
        return None
    db = open_existing(settings.database_url)
    try:
        check_schema(db.engine)
        if args.runs_command == "show":
            print(json.dumps(run_record(settings, resolve_run_id(db.sessions, args.run_id)), indent=2))
            return 0
        rows = list_runs(db.sessions, RunFilter(args.state, args.outcome, args.accession, args.study,
                                                args.id_prefix, args.limit))
    finally:
        db.engine.dispose()
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
        return 0
    print(f"{'run':8}  {'created (UTC)':19}  {'state':12}  {'class':5}  {'outcome':20}  {'accession':16}  study")
    for r in rows:
        print(f"{r.short_id:8}  {r.created_at.isoformat(sep=' ', timespec='seconds')[:19]:19}  {r.state:12}  "
              f"{r.predicted_class or '-':5}  {r.outcome or '-':20}  {r.accession_number or '-':16}  "
              f"{r.study_instance_uid}")
    if not rows:
        print("(no run matches)")
    return 0
