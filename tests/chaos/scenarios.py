"""The scenarios: crash safety, outages, hostile input, load, security. Each returns measured figures."""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_node.cli.localpacs import LocalOrthanc, wait_for
from dicom_node.db.models import AssociationLog, Delivery, DeliveryState, Instance, Run, RunState, Study
from dicom_node.db.session import Database, open_database
from dicom_node.net.associations import AssociationOutcome
from tests.chaos.fuzz import generate
from tests.chaos.node_process import NodeProcess, echo_ok
from tests.chaos.traffic import Ledger, make_study, send_files, send_until_acked
from tests.chaos.traffic import Study as SentStudy

FINISHED = (RunState.SUCCEEDED.value, RunState.NOT_ANALYSED.value, RunState.FAILED.value)
_SPOOL_FILE = re.compile(r"^spool/[0-9.]+/[0-9.]+/[0-9.]+\.dcm$")


@dataclass
class Findings:
    """Figures and problems of one scenario."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was found wrong."""
        return not self.problems


def node_db(node: NodeProcess) -> Database:
    """The node's database, opened by the harness (SQLite in WAL mode allows a second reader)."""
    url = node.env().get("DICOM_NODE_DATABASE__URL") or f"sqlite:///{node.data_dir / 'node.sqlite3'}"
    return open_database(url, migrate=False)


def stage_now(db: Database) -> str:
    """Where the node is, for classifying a kill."""
    stages = (("inferred_at", "building report"), ("notes_joined_at", "inference"),
              ("preprocessed_at", "joining notes"), ("converted_at", "preprocessing"),
              ("selected_at", "converting"), ("started_at", "selecting"))
    with db.sessions() as session:
        run = session.scalars(select(Run).where(Run.state == RunState.RUNNING.value)).first()
        if run is not None:
            for column, stage in stages:
                if getattr(run, column) is not None:
                    return stage
        pending = session.scalar(select(func.count(Delivery.id)).where(Delivery.state == DeliveryState.PENDING.value))
        if pending:
            return "sending"
    return "receiving/idle"


def drain(node: NodeProcess, db: Database, study_uids: set[str], stall_s: float) -> None:
    """Wait until every study has a finished run and nothing is queued, running or unsent.

    A backlog may take long to work off on a small machine; this fails only when
    nothing moved (no run finished, no report sent) for *stall_s*.
    """
    pause = threading.Event()
    progress, moved_at = -1, time.monotonic()
    while True:
        with db.sessions() as session:
            busy = session.scalar(select(func.count(Run.id)).where(Run.state.not_in(FINISHED)))
            unsent = session.scalar(select(func.count(Delivery.id)).where(
                Delivery.state == DeliveryState.PENDING.value))
            finished = set(session.scalars(select(Study.study_instance_uid).join(Run).where(
                Run.state.in_(FINISHED))).all())
            needs = session.scalar(select(func.count(Study.id)).where(Study.needs_run.is_(True)))
            done_runs = session.scalar(select(func.count(Run.id)).where(Run.state.in_(FINISHED))) or 0
            sent = session.scalar(select(func.count(Delivery.id)).where(
                Delivery.state != DeliveryState.PENDING.value)) or 0
        if not busy and not unsent and not needs and study_uids <= finished:
            return
        if done_runs + sent != progress:
            progress, moved_at = done_runs + sent, time.monotonic()
        elif time.monotonic() - moved_at > stall_s:
            raise TimeoutError(f"nothing moved for {stall_s:.0f} s: {busy} run(s) not finished, {unsent} report(s) "
                               f"unsent, {len(study_uids - finished)} stud(y/ies) without a finished run")
        pause.wait(0.5)


def check_outcome(node: NodeProcess, db: Database, pacs: LocalOrthanc, ledger: Ledger,
                  studies: list[SentStudy], findings: Findings) -> None:
    """Nothing lost, one finished run (or chain) per study, each report once in the PACS, nothing stuck."""
    with db.sessions() as session:
        stored = {uid: path for uid, path in session.execute(select(Instance.sop_instance_uid, Instance.spool_path))}
        runs = session.scalars(select(Run)).all()
        study_of_run = dict(session.execute(select(Run.id, Study.study_instance_uid).join(Study)).all())
        deliveries = session.scalars(select(Delivery)).all()
    lost = [uid for uid in ledger.acked if uid not in stored or not Path(stored[uid]).exists()]
    findings.figures["instances acknowledged"] = len(ledger.acked)
    findings.figures["instances lost"] = len(lost)
    if lost:
        findings.problems.append(f"{len(lost)} acknowledged instance(s) missing from spool or database")
    stuck = [r.id for r in runs if r.state not in FINISHED]
    findings.figures["runs stuck"] = len(stuck)
    if stuck:
        findings.problems.append(f"{len(stuck)} run(s) not finished: {stuck[:3]}")
    reports_by_study: dict[str, set[str]] = {}
    for run in runs:
        if run.report_sop_instance_uid:
            reports_by_study.setdefault(study_of_run[run.id], set()).add(run.report_sop_instance_uid)
    in_pacs = pacs.find_instances(Modality="SR")
    pacs_by_study = Counter(item["MainDicomTags"].get("SOPInstanceUID", item["ID"]) for item in in_pacs)
    duplicates = sum(count - 1 for count in pacs_by_study.values() if count > 1)
    sent_twice = Counter((d.run_id, d.destination, d.object_kind) for d in deliveries
                         if d.state == DeliveryState.SENT.value)
    findings.figures["duplicate reports in PACS"] = duplicates + sum(c - 1 for c in sent_twice.values() if c > 1)
    expected = {uid for uids in reports_by_study.values() for uid in uids}
    missing = expected - set(pacs_by_study)
    findings.figures["reports in PACS"] = len(pacs_by_study)
    if missing:
        findings.problems.append(f"{len(missing)} report(s) never reached the PACS")
    without_run = [s.study_instance_uid for s in studies if s.study_instance_uid not in reports_by_study]
    if without_run:
        findings.problems.append(f"{len(without_run)} stud(y/ies) without a report: {without_run[:3]}")


def crash_safety(root: Path, pacs: LocalOrthanc, model: Path, *, kills: int, t1_every: int = 4,
                 seed: int = 7, max_gap_s: float = 6.0, graceful: bool = False) -> Findings:
    """SIGKILL the node at random moments while studies stream in and runs execute.

    With *graceful*, SIGTERM instead (an administrator's restart under load): the
    node stops accepting, lets associations in flight end within
    ``network.shutdown_grace_s``, aborts the others, and every instance it
    answered Success must still be processed after the restart.
    """
    findings = Findings("restart under load" if graceful else "crash safety")
    rng = random.Random(seed)
    node = NodeProcess(root / ("restart" if graceful else "crash"), pacs, model)
    node.start()
    db = node_db(node)
    ledger, stop, alive = Ledger(), threading.Event(), threading.Event()
    alive.set()
    studies: list[SentStudy] = []

    def sender() -> None:
        index = 0
        while not stop.is_set():
            study = make_study(root / "crash-studies", 1000 + index, "t1" if index % t1_every == 0 else "quick")
            studies.append(study)
            send_until_acked(node.port, study, ledger, threading.Event(), alive)  # a study is always finished
            index += 1

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    stages: Counter[str] = Counter()
    for number in range(kills):
        # Every other kill at a random moment; the others aimed at the stages in turn (a short stage such as
        # inference is seldom hit by chance), or at the end of the gap when the stage did not come.
        target = None if number % 2 == 0 else KILL_TARGETS[(number // 2) % len(KILL_TARGETS)]
        stages[_wait_to_kill(db, rng.uniform(0.3, max_gap_s) if target is None else max_gap_s, target)] += 1
        alive.clear()
        if graceful:
            if node.stop() != 0:
                findings.problems.append("the node did not exit cleanly on SIGTERM")
        else:
            node.kill()
        node.start()
        alive.set()
    stop.set()
    thread.join(timeout=300)
    sent = [s for s in studies if all(_acked(ledger, f) for f in s.files)]
    try:
        drain(node, db, {s.study_instance_uid for s in sent}, 600)
    except Exception as exc:  # noqa: BLE001 - reported as a finding, the checks below still run
        findings.problems.append(str(exc))
    check_outcome(node, db, pacs, ledger, sent, findings)
    findings.figures.update({("restarts" if graceful else "kills survived"): kills,
                             ("restarts by stage" if graceful else "kills by stage"): dict(stages),
                             "studies": len(sent),
                             "node starts": node.starts, "peak memory (MB)": node.peak_rss_kb // 1024})
    if graceful:
        with db.sessions() as session:
            cut = session.execute(select(func.count(), func.coalesce(func.sum(AssociationLog.instances_stored), 0))
                                  .where(AssociationLog.reason.like("aborted by the node stopping%"))).one()
        findings.figures["associations aborted by a stop"] = int(cut[0])
        findings.figures["instances acknowledged in them (all kept)"] = int(cut[1])
    node.stop()
    db.engine.dispose()
    return findings


#: The stages aimed at by every other kill, in turn.
KILL_TARGETS = ("inference", "preprocessing", "building report", "sending", "converting", "selecting",
                "joining notes", "receiving/idle")


def _wait_to_kill(db: Database, gap_s: float, target: str | None) -> str:
    """Wait *gap_s*, or until the node is in stage *target*; the stage it is in then."""
    pause = threading.Event()
    deadline = time.monotonic() + gap_s
    while target is not None and time.monotonic() < deadline:
        stage = stage_now(db)
        if stage == target:
            return stage
        pause.wait(0.02)
    pause.wait(max(0.0, deadline - time.monotonic()))
    return stage_now(db)


def _acked(ledger: Ledger, path: Path) -> bool:
    from tests.chaos.traffic import sop_uid

    return sop_uid(path) in ledger.acked


def hostile_input(root: Path, pacs: LocalOrthanc, model: Path, *, count: int, seed: int = 1234,
                  memory_limit_mb: int = 3000) -> Findings:
    """Malformed and adversarial datasets over C-STORE while a good sender keeps sending."""
    findings = Findings("hostile input")
    node = NodeProcess(root / "fuzz", pacs, model)
    node.start()
    before = {p for p in Path("/tmp").iterdir()} if Path("/tmp").exists() else set()
    stop = threading.Event()
    good = Ledger()
    good_failures: list[int | None] = []

    def good_sender() -> None:
        index = 0
        while not stop.is_set():
            study = make_study(root / "fuzz-good", 5000 + index, "quick")
            results = send_files(node.port, study.files, good)
            good_failures.extend(s for s in results.values() if s != 0)
            good.acked.update(str(p) for p, s in results.items() if s == 0)
            index += 1

    thread = threading.Thread(target=good_sender, daemon=True)
    thread.start()
    statuses: Counter[str] = Counter()
    families: Counter[str] = Counter()
    no_response: Counter[str] = Counter()
    for case in generate(root / "fuzz-cases", count, seed):
        result = send_files(node.port, [case.path], Ledger())[case.path]
        answer = "no response" if result is None else ("success" if result == 0 else f"0x{result:04X}")
        statuses[answer] += 1
        families[case.family] += 1
        if answer == "no response":
            no_response[case.family] += 1
        case.path.unlink()
        if not node.alive:
            findings.problems.append(f"node died on case {case.index} ({case.family})")
            node.start()
    stop.set()
    thread.join(timeout=120)
    if not echo_ok(node.port):
        findings.problems.append("node does not answer C-ECHO after the fuzzing")
    if good_failures:
        findings.problems.append(f"good sender saw {len(good_failures)} failure(s) during fuzzing")
    outside = [str(p.relative_to(node.data_dir)) for p in node.data_dir.rglob("*.dcm")
               if p.relative_to(node.data_dir).parts[0] == "spool"
               and not _SPOOL_FILE.match(str(p.relative_to(node.data_dir)))]
    escaped = [str(p) for p in Path("/tmp").iterdir() if p not in before and p.name in ("evil", "x", "passwd")]
    if outside or escaped:
        findings.problems.append(f"files outside the spool layout: {(outside + escaped)[:5]}")
    log = node.log_path.read_text(errors="replace")
    for symptom in ("scheduler tick failed", "crashed", "Traceback"):
        if symptom in log:
            findings.problems.append(f"node log shows '{symptom}' ({log.count(symptom)} times)")
    if node.peak_rss_kb // 1024 > memory_limit_mb:
        findings.problems.append(f"peak memory {node.peak_rss_kb // 1024} MB above {memory_limit_mb} MB")
    findings.figures.update({"malformed inputs tried": count, "answers": dict(statuses),
                             "families": dict(families),
                             "no response by family": dict(no_response), "crashes": node.starts - 1,
                             "good instances during fuzzing": len(good.acked),
                             "peak memory (MB)": node.peak_rss_kb // 1024})
    node.stop()
    return findings


def load(root: Path, pacs: LocalOrthanc, model: Path, *, senders: int, duration_s: float,
         t1_every: int = 10, study_interval_s: float = 0.0) -> Findings:
    """Several senders for a while; instances/s, turnaround percentiles, memory, losses.

    Each sender starts a study at most every *study_interval_s* (0: back to back, which measures how much
    the node takes in while it processes, and leaves a backlog the turnaround then mostly measures).
    """
    findings = Findings("load")
    node = NodeProcess(root / "load", pacs, model)
    node.start()
    db = node_db(node)
    ledger, stop, all_sent = Ledger(), threading.Event(), threading.Event()
    studies: list[SentStudy] = []
    seen: dict[str, float] = {}
    counter = iter(range(10**6))
    lock = threading.Lock()

    def sender() -> None:
        while not stop.is_set():
            began = time.monotonic()
            with lock:
                index = next(counter)
            study = make_study(root / "load-studies", 20000 + index, "t1" if index % t1_every == t1_every - 1
                               else "quick")
            send_until_acked(node.port, study, ledger, threading.Event())  # a study is always finished
            studies.append(study)
            stop.wait(study_interval_s - (time.monotonic() - began))

    def watcher() -> None:
        pause, known = threading.Event(), set()
        while not (all_sent.is_set() and len(seen) >= len(studies)):  # a sender may be mid-study after stop
            for item in pacs.find_instances(Modality="SR"):
                if item["ID"] not in known:  # one look-up per report, not one per report and poll
                    known.add(item["ID"])
                    uid = pacs.get(f"/instances/{item['ID']}/study")["MainDicomTags"]["StudyInstanceUID"]
                    seen.setdefault(uid, time.monotonic())
            pause.wait(0.5)

    started = time.monotonic()
    threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    for thread in threads:
        thread.start()
    watch = threading.Thread(target=watcher, daemon=True)
    watch.start()
    threading.Event().wait(duration_s)
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    all_sent.set()
    elapsed = time.monotonic() - started
    try:
        drain(node, db, {s.study_instance_uid for s in studies}, 300)
        wait_for(lambda: len(seen) >= len(studies), 120, "every report in the PACS")
        findings.figures["backlog worked off after sending stopped (s)"] = round(time.monotonic() - started - elapsed)
    except Exception as exc:  # noqa: BLE001 - reported as a finding
        findings.problems.append(str(exc))
    turnaround = sorted(seen[s.study_instance_uid] - ledger.last_sent[s.study_instance_uid]
                        for s in studies if s.study_instance_uid in seen)
    check_outcome(node, db, pacs, ledger, studies, findings)
    with db.sessions() as session:
        aborted = session.scalar(select(func.count(AssociationLog.id))
                                 .where(AssociationLog.outcome == AssociationOutcome.ABORTED))
    findings.figures["C-STOREs without response"] = ledger.dropped
    findings.figures["associations aborted"] = aborted
    if ledger.dropped or aborted:  # nothing is killed here: every C-STORE must be answered, every association released
        findings.problems.append(f"{ledger.dropped} C-STORE(s) without response, {aborted} association(s) aborted")
    findings.figures.update({
        "senders": senders, "study interval (s)": study_interval_s, "duration (s)": round(elapsed),
        "instances/s": round(len(ledger.acked) / elapsed, 1), "studies": len(studies),
        "turnaround p50 (s)": round(turnaround[len(turnaround) // 2], 1) if turnaround else None,
        "turnaround p95 (s)": round(turnaround[int(len(turnaround) * 0.95)], 1) if turnaround else None,
        "peak memory (MB)": node.peak_rss_kb // 1024,
    })
    node.stop()
    db.engine.dispose()
    return findings


def pacs_outage(root: Path, pacs: LocalOrthanc, model: Path, *, down_s: float) -> Findings:
    """The PACS is down while reports are due; they arrive once it is back, attempts recorded."""
    findings = Findings("PACS outage")
    node = NodeProcess(root / "outage", pacs, model)
    node.start()
    db = node_db(node)
    pacs.stop()
    ledger, stop = Ledger(), threading.Event()
    studies = [make_study(root / "outage-studies", 30000 + i, "quick") for i in range(3)]
    for study in studies:
        send_until_acked(node.port, study, ledger, stop)

    def attempted_while_down() -> bool:
        with db.sessions() as session:
            return bool(session.scalar(select(func.count(Delivery.id)).where(Delivery.attempts >= 2)))
    wait_for(attempted_while_down, 60 + down_s, "failed delivery attempts while the PACS is down")
    threading.Event().wait(down_s)
    pacs.start()
    drain(node, db, {s.study_instance_uid for s in studies}, 120)
    with db.sessions() as session:
        attempts = session.scalars(select(Delivery.attempts)).all()
    findings.figures.update({"reports": len(attempts), "max attempts": max(attempts), "studies": len(studies)})
    check_outcome(node, db, pacs, ledger, studies, findings)
    node.stop()
    db.engine.dispose()
    return findings


def database_outage(root: Path, pacs: LocalOrthanc, model: Path, *, postgres_url: str, down_s: float) -> Findings:
    """PostgreSQL unreachable for a while: clean refusals while it is down, everything delivered after."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tests.chaos.proxy import CuttableProxy

    findings = Findings("database outage")
    base = make_url(postgres_url)
    proxy = CuttableProxy(base.host or "127.0.0.1", base.port or 5432)
    proxy.start()
    schema = f"chaos_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    url = base.set(port=proxy.port, query={"options": f"-csearch_path={schema}"})
    node = NodeProcess(root / "db-outage", pacs, model,
                       extra_env={"DICOM_NODE_DATABASE__URL": url.render_as_string(hide_password=False)})
    try:
        node.start()
        db = node_db(node)
        ledger, stop = Ledger(), threading.Event()
        before = [make_study(root / "db-studies", 40000 + i, "quick") for i in range(2)]
        for study in before:
            send_until_acked(node.port, study, ledger, stop)
        proxy.cut()
        during = make_study(root / "db-studies", 40100, "quick")
        results = send_files(node.port, during.files, ledger)
        answers = Counter("success" if s == 0 else ("no response" if s is None else f"0x{s:04X}")
                          for s in results.values())
        threading.Event().wait(down_s)
        alive_during = node.alive
        proxy.restore()
        send_until_acked(node.port, during, ledger, stop)
        drain(node, db, {s.study_instance_uid for s in [*before, during]}, 180)
        check_outcome(node, db, pacs, ledger, [*before, during], findings)
        if not alive_during:
            findings.problems.append("node died during the database outage")
        findings.figures.update({"answers while the database was down": dict(answers), "down (s)": down_s})
        db.engine.dispose()
    finally:
        node.stop()
        proxy.close()
        with admin.begin() as conn:
            conn.execute(text(f'drop schema "{schema}" cascade'))
        admin.dispose()
    return findings


def scan_logs_for_phi(paths: list[Path], studies_phi: list[tuple[str, ...]]) -> Findings:
    """No patient name, ID, birth date or note text in any log.

    A scan that had nothing to scan proves nothing, so it is a problem too: a log
    file that is missing, no log with any content, or nothing to look for.
    """
    findings = Findings("privacy")
    needles = {value for values in studies_phi for value in values if value}
    hits: Counter[str] = Counter()
    scanned = empty = 0
    for path in paths:
        if not path.is_file():
            findings.problems.append(f"log file {path} is missing: nothing to scan")
            continue
        text = path.read_text(errors="replace")
        if not text.strip():
            empty += 1
            continue
        scanned += 1
        for needle in needles:
            if needle in text:
                hits[path.name] += text.count(needle)
    if not scanned:
        findings.problems.append(f"no log with any content among {len(paths)} file(s): nothing to scan")
    if not needles:
        findings.problems.append("no patient data to look for")
    findings.figures["log files scanned"] = scanned
    findings.figures["empty log files"] = empty
    findings.figures["patient identifiers found"] = sum(hits.values())
    if hits:
        findings.problems.append(f"patient data in logs: {dict(hits)}")
    return findings
