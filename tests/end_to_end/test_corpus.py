"""Scanner-like T1 studies through the whole node: DCMTK storescu in, an analysis SR out.

The studies come from :mod:`tests.support.corpus` (real brains, vendor headers, pose in
the scanner, bias field, Rician noise, coil fall-off, 12/16-bit storage, every
transfer syntax a scanner or PACS sends), never from :mod:`pipeline.synth`.

One node (default settings, SQLite, the trained demonstration model) and one
Orthanc serve the whole module: every selected variant is written and sent as its
own study while the node works through the earlier ones; the tests then check
each run's record and SR.

``make test`` sends every variant at its affordable size (about 1.35 mm voxels,
at least 100 slices along every axis) and the variants marked ``full_in_default``
at the scanner's size.  ``make corpus`` (``DICOM_NODE_CORPUS=full``) sends every
variant at the scanner's size and writes ``var/corpus-report.md`` and
``var/corpus-report.csv``; otherwise the report goes to the test's temporary
directory.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select

from core.errors import NodeError, Outcome
from dicom_node.app import Node
from dicom_node.cli.localpacs import LocalOrthanc, wait_for
from dicom_node.db.audit import run_record
from dicom_node.db.models import Instance, Run, RunState, Series, Study
from dicom_node.runs.context import preprocess_config
from pipeline.convert import convert_series
from tests.conftest import require_tool
from tests.support import corpus as corpus_module
from tests.support.corpus import (
    VARIANTS,
    Appearance,
    groups,
    identity,
    realistic_head,
    resample_head,
    variant_size,
    write_variant,
)
from tests.support.node import dciodvfy_errors, node_settings, send

#: ``DICOM_NODE_CORPUS=full``: every variant at full size, report under ``var/``.
FULL = os.environ.get("DICOM_NODE_CORPUS", "").strip().lower() == "full"
#: Where ``make corpus`` writes its report.
REPORT_DIR = Path(__file__).resolve().parents[2] / "var"
#: Same decoded pixels must give the same probabilities within this.
PROBABILITY_TOLERANCE = 1e-4
#: Time allowed per study (processing one at a time on a small machine) plus a constant.
SECONDS_PER_STUDY = 150.0
SECONDS_BASE = 120.0

#: What storescu proposes for each transfer syntax the corpus writes: the file's own syntax, so the node
#: receives what the scanner wrote (storescu's default proposes uncompressed syntaxes only and would
#: transcode implicit VR to explicit VR on the way).
STORESCU_PROPOSAL: dict[UID, str] = {
    ExplicitVRLittleEndian: "-xe", ImplicitVRLittleEndian: "-xi", JPEGLSLossless: "-xt",
    JPEG2000Lossless: "-xv", RLELossless: "-xr",
}

#: Run workers of the corpus node (results do not depend on it; throughput does).
WORKERS = int(os.environ.get("DICOM_NODE_CORPUS_WORKERS", "2"))

pytestmark = pytest.mark.slow


@dataclass
class CorpusResult:
    """What one variant's study gave."""

    name: str
    size: str
    study_instance_uid: str
    send_seconds: float
    files: list[Path] = field(default_factory=list)
    received_syntaxes: set[str] = field(default_factory=set)
    record: dict[str, Any] | None = None
    sr_path: Path | None = None
    seconds: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Corpus:
    """The results by variant name, the QC limit the node applied, the report written."""

    results: dict[str, CorpusResult]
    min_correlation: float
    report: Path


def _selected(session: pytest.Session) -> list[str]:
    """Variants the selected tests of this module need (``-k`` and deselection respected)."""
    names: set[str] = set()
    for item in session.items:
        if not isinstance(item, pytest.Function) or item.module is None or item.module.__name__ != __name__:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "name" in params:
            names.add(params["name"])
        if "group" in params:
            names.update(groups()[params["group"]])
    return [name for name in VARIANTS if name in names]


def _runs_by_study(node: Node, uids: set[str]) -> dict[str, list[Run]]:
    with node.db.sessions() as session:
        rows = session.execute(select(Study.study_instance_uid, Run).join(Run, Run.study_id == Study.id)
                               .where(Study.study_instance_uid.in_(uids)).order_by(Run.created_at)).all()
        out: dict[str, list[Run]] = {}
        for uid, run in rows:
            session.expunge(run)
            out.setdefault(uid, []).append(run)
        return out


def _received_syntaxes(node: Node, series_uid: str) -> set[str]:
    with node.db.sessions() as session:
        return set(session.scalars(select(Instance.transfer_syntax_uid).join(Series, Instance.series_id == Series.id)
                                   .where(Series.series_instance_uid == series_uid).distinct()).all())


def _all_finished(node: Node, uids: set[str]) -> bool:
    runs = _runs_by_study(node, uids)
    return set(runs) == uids and all(r.finished_at is not None for rs in runs.values() for r in rs)


def _wait(condition: Callable[[], object], timeout_s: float, interval_s: float) -> bool:
    """Wait for ``condition``; False (not an error) on timeout, so the report covers what finished."""
    try:
        wait_for(condition, timeout_s, "the corpus", interval_s)
    except NodeError:
        return False
    return True


def _sr_of_study(pacs: LocalOrthanc, study_uid: str) -> list[dict[str, Any]]:
    return pacs.find_instances(Modality="SR", StudyInstanceUID=study_uid)


def _describe(name: str, size: str) -> tuple[str, str]:
    variant = VARIANTS[name]
    grid = variant.grid(size)
    matrix = "x".join(str(n) for n in grid.shape)
    voxel = "x".join(f"{s:.2f}" for s in grid.spacing)
    return matrix, voxel


def write_report(results: dict[str, CorpusResult], directory: Path, limit: float) -> Path:
    """``corpus-report.md`` (a README table) and ``corpus-report.csv`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    header = ["variant", "size", "matrix (cols x rows x slices)", "voxel (mm)", "transfer syntax", "state",
              "outcome", "class", "P(AD)", "P(MCI)", "P(CN)", "template correlation", "coverage", "WM/GM",
              "seconds", "preprocess s"]
    rows = []
    for name, result in results.items():
        record = result.record or {}
        qc = record.get("quality_control") or {}
        probs = record.get("probabilities") or {}
        stages = record.get("stage_seconds") or {}
        matrix, voxel = _describe(name, result.size)
        variant = VARIANTS[name]
        syntax = "Enhanced MR, " if variant.enhanced else ""

        def fmt(value: object, digits: int = 3) -> str:
            return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

        rows.append([name, result.size, matrix, voxel, syntax + variant.transfer_syntax.name,
                     record.get("state", "not finished"), record.get("outcome") or "-",
                     record.get("predicted_class") or "-", fmt(probs.get("AD"), 4), fmt(probs.get("MCI"), 4),
                     fmt(probs.get("CN"), 4), fmt(qc.get("correlation")), fmt(qc.get("coverage")),
                     fmt(qc.get("wm_gm_ratio")), fmt(result.seconds, 1), fmt(stages.get("preprocessed"), 1)])
    with (directory / "corpus-report.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    lines = [f"Scanner-like corpus through the node ({'full size' if FULL else 'make test sizes'}; "
             f"template correlation limit {limit:.2f}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    lines += ["", "Variants:", ""] + [f"* `{name}`: {VARIANTS[name].note}" for name in results]
    path = directory / "corpus-report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           demo_model: Path) -> Iterator[Corpus]:
    """Every selected variant sent to one node; its run records and SRs, by variant name."""
    names = _selected(request.session)
    root = tmp_path_factory.mktemp("corpus")
    pacs = LocalOrthanc(root / "orthanc")
    pacs.start()
    # two run workers: registration is single-threaded, so two studies at a time use both cores
    node = Node(node_settings(root, pacs, demo_model, **{"processing.workers": WORKERS}))
    node.start()
    results: dict[str, CorpusResult] = {}
    try:
        for name in names:  # the node works on the earlier studies while the next is written
            size = "full" if FULL else variant_size(name)
            files = write_variant(name, root / "studies", size)
            started = time.monotonic()
            send(node, root / "studies" / name, timeout_s=300,
                 options=[STORESCU_PROPOSAL[VARIANTS[name].transfer_syntax]])
            results[name] = CorpusResult(name, size, identity(name).study_instance_uid,
                                         time.monotonic() - started, files)
        uids = {r.study_instance_uid for r in results.values()}
        _wait(lambda: _all_finished(node, uids), SECONDS_BASE + SECONDS_PER_STUDY * len(uids), 2.0)
        runs = _runs_by_study(node, uids)
        for result in results.values():
            result.received_syntaxes = _received_syntaxes(node, identity(result.name).series_instance_uid)
            study_runs = runs.get(result.study_instance_uid, [])
            if len(study_runs) != 1:
                result.problems.append(f"{len(study_runs)} runs for the study (expected 1)")
            finished = [r for r in study_runs if r.finished_at is not None]
            if not finished:
                continue
            run = finished[-1]
            assert run.finished_at is not None
            result.record = run_record(node.settings, run.id)
            if run.started_at is not None:
                result.seconds = (run.finished_at - run.started_at).total_seconds()
        srs = root / "sr"
        srs.mkdir()
        for result in results.values():
            if result.record is None:
                continue
            uid = result.study_instance_uid
            if _wait(functools.partial(_sr_of_study, pacs, uid), 60, 0.5):
                found = _sr_of_study(pacs, uid)
                if len(found) != 1:
                    result.problems.append(f"{len(found)} SRs in the PACS for the study")
                result.sr_path = srs / f"{result.name}.dcm"
                result.sr_path.write_bytes(pacs.get_bytes(f"/instances/{found[0]['ID']}/file"))
        limit = preprocess_config(node.settings).min_correlation
        report = write_report(results, REPORT_DIR if FULL else root, limit)
        print(f"\ncorpus report: {report}")
        yield Corpus(results, limit, report)
    finally:
        node.stop()
        pacs.stop()


def _result(corpus: Corpus, name: str) -> CorpusResult:
    result = corpus.results[name]
    assert result.record is not None, f"{name}: no finished run for study {result.study_instance_uid}"
    return result


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_is_analysed(name: str, corpus: Corpus) -> None:
    result = _result(corpus, name)
    record = result.record
    assert record is not None
    where = f"{name} ({result.size}): {record['state']} / {record['outcome']}: {record['reason']}"
    assert record["outcome"] != Outcome.PROCESSING_ERROR.value, where
    assert record["state"] == RunState.SUCCEEDED.value, where
    assert result.problems == [], result.problems
    assert dciodvfy_errors(result.files[len(result.files) // 2]) == [], "the variant itself is not valid DICOM"
    assert result.received_syntaxes == {VARIANTS[name].transfer_syntax}, "the node got another transfer syntax"

    # the T1 series was chosen (not the localizer), and analysed
    chosen = [d for d in record["series_selection"] if d["accepted"]]
    assert record["series_instance_uid"] == identity(name).series_instance_uid, chosen
    assert record["predicted_class"] in {"AD", "MCI", "CN"}, where
    probabilities = record["probabilities"]
    assert all(p is not None and 0.0 <= p <= 1.0 for p in probabilities.values()), probabilities
    assert abs(sum(probabilities.values()) - 1.0) < 1e-6, probabilities

    # quality control passed, with the template correlation recorded
    qc = record["quality_control"] or {}
    limit = corpus.min_correlation
    assert "correlation" in qc, qc
    assert qc["correlation"] >= limit, f"{name}: template correlation {qc['correlation']:.3f} < {limit}"

    # the SR reached the PACS, is valid and is an analysis
    assert result.sr_path is not None, f"{name}: no SR in the PACS"
    assert dciodvfy_errors(result.sr_path) == []
    sr = dcmread(result.sr_path)
    assert sr.StudyInstanceUID == result.study_instance_uid and sr.PatientID == identity(name).patient_id
    assert sr.SOPInstanceUID == record["report_sop_instance_uid"]
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", str(result.sr_path)], capture_output=True, text=True,
                          check=True).stdout
    assert "Probability" in dump and "Not analysed" not in dump, dump[-2000:]


@pytest.mark.parametrize("group", list(groups()))
def test_same_pixels_give_the_same_probabilities(group: str, corpus: Corpus) -> None:
    members = groups()[group]
    sizes = {corpus.results[name].size for name in members}
    assert len(sizes) == 1, f"group {group} written at several sizes {sizes}"
    records = {name: _result(corpus, name).record for name in members}
    for name, record in records.items():
        assert record is not None and record["state"] == RunState.SUCCEEDED.value, (name, record)
    reference_name = members[0]
    reference = records[reference_name]["probabilities"]  # type: ignore[index]
    table = [f"{name}: " + ", ".join(f"{label} {p:.6f}" for label, p in record["probabilities"].items())
             for name, record in records.items() if record is not None]
    differences = {name: max(abs(p - reference[label]) for label, p in record["probabilities"].items())
                   for name, record in records.items() if record is not None}
    assert max(differences.values()) <= PROBABILITY_TOLERANCE, (
        f"same decoded pixels, different probabilities (vs {reference_name}, tolerance {PROBABILITY_TOLERANCE}):\n"
        + "\n".join(table))


# ---------------------------------------------------------------------------------------------------------------
# The generator itself (no node)
# ---------------------------------------------------------------------------------------------------------------


def _clear_caches() -> None:
    for cached in (corpus_module.load_source, corpus_module._subject, corpus_module._stored_pixels):
        cached.cache_clear()


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    name = "philips_sag_tfe_150x182x165"
    first = write_variant(name, tmp_path / "a")
    _clear_caches()  # render again from the source, not from the cache
    second = write_variant(name, tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))


def test_written_geometry_is_the_heads_world_geometry(tmp_path: Path) -> None:
    """The node's converter puts a double-oblique, signed, zero-filled series back where the posed head is."""
    name = "ge_ax_bravo_double_oblique_0p9"
    variant = VARIANTS[name]
    files = write_variant(name, tmp_path)
    img = cast(nib.Nifti1Image, nib.load(convert_series(files, tmp_path / "t1.nii.gz")))
    data = img.get_fdata(dtype=np.float32)
    look = variant.appearance
    source, affine = corpus_module._subject(look.source, look.seed, look.warp_mm)
    expected = resample_head(source, affine, look.pose, img.affine, data.shape)
    head = expected > 0.1
    r = np.corrcoef(expected[head], data[head])[0, 1]
    mirrored = np.corrcoef(expected[::-1][head], data[head])[0, 1]
    assert r > 0.85 and r > mirrored + 0.3, (r, mirrored)


def test_realistic_head_is_seeded_and_posed() -> None:
    first, second = realistic_head(7), realistic_head(7)
    assert np.array_equal(first.get_fdata(dtype=np.float32), second.get_fdata(dtype=np.float32))
    pose = json.loads(first.header["descrip"].item().decode())
    assert max(abs(v) for v in pose["rot"]) <= 15 and max(abs(v) for v in pose["shift"]) <= 30
    assert abs(pose["scale"] - 1) <= 0.08 and first.header.get_zooms() == (1.0, 1.0, 1.0)
    assert Appearance.random(8) != Appearance.random(7)
