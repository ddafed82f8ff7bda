"""``dicom-node echo`` and ``dicom-node deliveries list|retry``: the network edge's commands.

Registered in :data:`dicom_node.cli.main.EXTENSIONS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dicom_node.settings import Settings


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``echo`` and ``deliveries`` to the ``dicom-node`` parser."""
    echo = sub.add_parser("echo", parents=[common], help="C-ECHO a configured destination (TLS if configured)")
    echo.add_argument("destination", help="name of a [[destinations]] entry")
    deliveries = sub.add_parser("deliveries", help="the outbox: list and replay deliveries")
    commands = deliveries.add_subparsers(dest="deliveries_command", required=True)
    listing = commands.add_parser("list", parents=[common], help="list deliveries, newest first")
    listing.add_argument("--state", choices=["pending", "sent", "dead"], help="only deliveries in this state")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="full records with the attempt history, as JSON")
    retry = commands.add_parser("retry", parents=[common], help="replay dead-letter deliveries now")
    retry.add_argument("ids", nargs="*", type=int, help="delivery ids (see `deliveries list --state dead`)")
    retry.add_argument("--all-dead", action="store_true", help="replay every dead delivery")


def _status(value: int | None) -> str:
    return "-" if value is None else f"0x{value:04X}"


def dispatch(args: argparse.Namespace, settings: Settings) -> int | None:
    """Run ``echo`` or ``deliveries``; None for any other command."""
    if args.command == "echo":
        from dicom_node.net.scu import echo

        result = echo(settings.destination(args.destination), settings)
        outcome = f"status {_status(result.status)}" if result.status is not None else f"failed ({result.error})"
        print(f"C-ECHO {args.destination}: {outcome}")
        return 0 if result.status == 0 else 1
    if args.command != "deliveries":
        return None
    from dicom_node.ops.queries import open_existing, replayable_ids
    from dicom_node.outbox.delivery import list_deliveries, retry_deliveries

    db = open_existing(settings.database_url)  # read-only commands create no database
    try:
        if args.deliveries_command == "list":
            rows = list_deliveries(db.sessions, args.state, args.limit)
            if args.json:
                print(json.dumps([{**vars(r), "next_attempt_at": r.next_attempt_at and r.next_attempt_at.isoformat()}
                                  for r in rows], indent=2))
                return 0
            print(f"{'id':>6}  {'run':36}  {'destination':12}  {'kind':4}  {'state':7}  {'tries':>5}  "
                  f"{'status':6}  {'class':18}  next attempt / last error")
            for r in rows:
                tail = r.next_attempt_at.isoformat(timespec="seconds") if r.next_attempt_at else (r.last_error or "")
                print(f"{r.id:6}  {r.run_id:36}  {r.destination:12}  {r.object_kind:4}  {r.state:7}  {r.attempts:5}  "
                      f"{_status(r.last_status):6}  {r.failure_class or '-':18}  {tail}")
            return 0
        if not args.ids and not args.all_dead:
            print("dicom-node deliveries retry: give delivery ids or --all-dead")
            return 2
        _, sent, unknown = replayable_ids(db.sessions, args.ids)
        count = retry_deliveries(db.sessions, args.ids, all_dead=args.all_dead)
        print(f"{count} delivery(ies) queued for a new attempt")
        for label, ids in (("no delivery", unknown), ("already sent", sent)):
            if ids:
                print(f"dicom-node: error: {label}: {', '.join(map(str, ids))}", file=sys.stderr)
        return 1 if unknown or sent else 0
    finally:
        db.engine.dispose()
