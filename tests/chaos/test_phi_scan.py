"""The privacy scan of the chaos harness: it finds patient data, and it fails when it has nothing to scan."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.scenarios import scan_logs_for_phi

PHI: list[tuple[str, ...]] = [("Chaos^Patient", "CHAOS-PID-")]


def test_a_clean_log_passes(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    log.write_text("run 1 queued for study 1.2.3\nseries row 4 closed\n")
    findings = scan_logs_for_phi([log], PHI)
    assert findings.ok, findings.problems
    assert findings.figures == {"log files scanned": 1, "empty log files": 0, "patient identifiers found": 0}


def test_patient_data_in_a_log_is_found_and_counted(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    log.write_text("refused CHAOS-PID-0001\nname Chaos^Patient7, again CHAOS-PID-0002\n")
    findings = scan_logs_for_phi([log], PHI)
    assert not findings.ok
    assert findings.problems == ["patient data in logs: {'node.log': 3}"]
    assert findings.figures["patient identifiers found"] == 3


def test_a_missing_log_fails(tmp_path: Path) -> None:
    present = tmp_path / "other.log"
    present.write_text("started\n")
    findings = scan_logs_for_phi([tmp_path / "node.log", present], PHI)
    assert not findings.ok
    assert findings.problems == [f"log file {tmp_path / 'node.log'} is missing: nothing to scan"]
    assert findings.figures["log files scanned"] == 1


def test_only_empty_logs_or_none_at_all_fail(tmp_path: Path) -> None:
    empty = tmp_path / "node.log"
    empty.write_text("\n")
    findings = scan_logs_for_phi([empty], PHI)
    assert findings.problems == ["no log with any content among 1 file(s): nothing to scan"]
    assert findings.figures["empty log files"] == 1
    assert scan_logs_for_phi([], PHI).problems == ["no log with any content among 0 file(s): nothing to scan"]


def test_nothing_to_look_for_fails(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    log.write_text("started\n")
    assert scan_logs_for_phi([log], [("", "")]).problems == ["no patient data to look for"]
