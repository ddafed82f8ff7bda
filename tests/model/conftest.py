"""Fixtures shared by the model tests: a labelled cohort of scanner-like DICOM prepared by the node's own code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dicom_node.cli.main import main
from pipeline.convert import convert_series
from tests.support.corpus import write_variant

#: A study with a T1 series and a localizer (tests/support/corpus.py).
MULTI_SERIES = "siemens_cor_mprage_oblique"


@pytest.fixture(scope="session")
def scanner_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """``cohort prepare`` (run twice: the second from the cache) on four labelled scans.

    S1: the DICOM study (Dementia), S2: its T1 as NIfTI (EMCI), S3: its localizer alone
    (CN, refused: no suitable series), S4: a missing folder (AD).  Volumes pooled to 64^3.

    Returns
    -------
    tuple
        ``(cohort folder, folder holding the inputs, preprocessing identity)``.
    """
    root = tmp_path_factory.mktemp("prepare")
    files = write_variant(MULTI_SERIES, root / "dicom")
    convert_series([f for f in files if f.parent.name == "t1"], root / "t1.nii.gz")
    shutil.copytree(root / "dicom" / MULTI_SERIES / "localizer", root / "localizer_only")
    (root / "labels.csv").write_text(
        "scan_id,subject_id,label,scan_date,note,path\n"
        f"S1,P1,Dementia,2024-03-01,,dicom/{MULTI_SERIES}\n"
        "S2,P2,EMCI,20240302,MMSE 27/30.,t1.nii.gz\n"
        "S3,P3,CN,2024-03-04,,localizer_only\n"
        "S4,P4,AD,2024-03-05,,missing_folder\n", encoding="utf-8")
    out = root / "cohort"
    argv = ["cohort", "prepare", str(root / "labels.csv"), "--out", str(out), "--jobs", "2", "--size", "64",
            "--no-progress"]
    assert main(argv) == 0
    first = json.loads((out / "cohort.json").read_text())
    assert main(argv) == 0  # the second run takes everything it can from the cache
    return out, root, first["preprocessing_version"]
