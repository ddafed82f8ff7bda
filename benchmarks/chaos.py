"""The full reliability and security harness: ``make chaos``.

Runs, against a node in its own process: SIGKILLs at random moments while studies
stream in (default 50), hostile input over C-STORE (default 1,000 cases), PDU-level
fuzzing on raw sockets (default 1,000 cases), a PACS
outage, a PostgreSQL outage, load from 8 senders (default 10 minutes), and a scan
of every log for patient data. Prints a Markdown table of the figures and writes
them to ``var/chaos/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from dicom_node.cli.localpacs import LocalOrthanc
from model.inference import init_demo_model
from tests.chaos.pdu_fuzz import pdu_fuzz
from tests.chaos.scenarios import (
    Findings,
    crash_safety,
    database_outage,
    hostile_input,
    load,
    pacs_outage,
    scan_logs_for_phi,
)
from tests.chaos.traffic import PHI_NAME_PREFIX
from tests.conftest import POSTGRES_URL

SCENARIOS = ("crash", "restart", "fuzz", "pdu-fuzz", "pacs", "db", "load")


def main(argv: list[str] | None = None) -> int:
    """Run the harness; exit status 1 when any scenario found a problem."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=20, help="SIGTERM restarts under load")
    parser.add_argument("--fuzz", type=int, default=1000)
    parser.add_argument("--pdu-fuzz", type=int, default=1000, help="PDU-level fuzz cases")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--load-seconds", type=float, default=600)
    parser.add_argument("--study-interval", type=float, default=30,
                        help="each load sender starts a study at most every this many seconds (0: back to back)")
    parser.add_argument("--root", type=Path, default=Path("var/chaos"))
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                        help="run only these scenarios (default: all)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    model = init_demo_model(args.root / "model", trained=False)
    pacs = LocalOrthanc(args.root / "orthanc")
    pacs.start()
    results: list[Findings] = []
    started = time.monotonic()
    try:
        for name, run in (
            ("crash", lambda: crash_safety(args.root, pacs, model, kills=args.kills, max_gap_s=10)),
            ("restart", lambda: crash_safety(args.root, pacs, model, kills=args.restarts, max_gap_s=10,
                                             graceful=True)),
            ("fuzz", lambda: hostile_input(args.root, pacs, model, count=args.fuzz)),
            ("pdu-fuzz", lambda: pdu_fuzz(args.root, pacs, model, count=args.pdu_fuzz)),
            ("pacs", lambda: pacs_outage(args.root, pacs, model, down_s=30)),
            ("db", lambda: database_outage(args.root, pacs, model, postgres_url=POSTGRES_URL, down_s=20)),
            ("load", lambda: load(args.root, pacs, model, senders=args.senders, duration_s=args.load_seconds,
                                      study_interval_s=args.study_interval)),
        ):
            if name not in args.only:
                continue
            print(f"running {name} ...", flush=True)
            results.append(run())
            print(json.dumps(results[-1].figures), flush=True)
    finally:
        pacs.stop()
    logs = sorted(args.root.rglob("*.log"))
    results.append(scan_logs_for_phi(logs, [(PHI_NAME_PREFIX, "CHAOS-PID-")]))
    print(f"\nharness finished in {time.monotonic() - started:.0f} s\n")
    print("| scenario | figures | problems |\n|---|---|---|")
    for findings in results:
        figures = "; ".join(f"{k}: {v}" for k, v in findings.figures.items())
        print(f"| {findings.name} | {figures} | {'; '.join(findings.problems) or 'none'} |")
    (args.root / "results.json").write_text(json.dumps(
        [{"name": f.name, "figures": f.figures, "problems": f.problems} for f in results], indent=2, default=str))
    return 0 if all(f.ok for f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
