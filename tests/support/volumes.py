"""Volumes, a prior study and a normative table for the report tests, built directly (volumetry is never run).

The current study of :func:`tests.support.sr.make_mr_series` is of 2024-03-04 (a 76-year-old woman);
the prior here is of 2022-03-04, 731 days earlier (2024 is a leap year).
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from pydicom.uid import MRImageStorage, generate_uid

from pipeline.normative import NormativeTable
from pipeline.volumetry import Volumes
from structured_reports.types import PriorResult, ReportInput
from tests.support.sr import make_report

ALGORITHM = ("pipeline.volumetry 1 (ANTsPy 0.6.1: SyN to Colin27, AAL hippocampus, Colin27 lateral ventricles, "
             "Atropos 3 classes)")
CURRENT = Volumes(hippocampus_left_ml=3.412, hippocampus_right_ml=3.287, lateral_ventricles_ml=24.5,
                  grey_matter_ml=612.4, white_matter_ml=480.2, intracranial_ml=1450.0, algorithm=ALGORITHM)
PRIOR = Volumes(hippocampus_left_ml=3.5, hippocampus_right_ml=3.35, lateral_ventricles_ml=22.1,
                grey_matter_ml=620.0, white_matter_ml=482.0, intracranial_ml=1451.0, algorithm=ALGORITHM)
PRIOR_DATE = datetime.date(2022, 3, 4)
CURRENT_DATE = datetime.date(2024, 3, 4)
PRIOR_PROBABILITIES = {"AD": 0.5, "MCI": 0.3, "CN": 0.2}

#: A normative table: the left hippocampus of women aged 70-80 (mean 3.8, SD 0.4) and the ICV of everyone.
NORMATIVE_CSV = """# source: Test cohort (synthetic), measured with pipeline.volumetry 1
structure,sex,age_min,age_max,mean_ml,sd_ml
hippocampus_left,F,70,80,3.8,0.4
hippocampus_left,any,70,80,3.6,0.5
intracranial,any,0,120,1400,120
"""


def make_prior(*, volumes: Volumes | None = PRIOR, probabilities: dict[str, float] | None = None,
               instances: int = 4) -> PriorResult:
    """A prior study of :data:`PRIOR_DATE` with *instances* MR instances (new UIDs each call)."""
    return PriorResult(
        study_instance_uid=generate_uid(),
        study_date=PRIOR_DATE,
        series_instance_uid=generate_uid(),
        instances=tuple((MRImageStorage, generate_uid()) for _ in range(instances)),
        volumes=volumes,
        probabilities=dict(PRIOR_PROBABILITIES) if probabilities is None else probabilities,
        run_id="run-0007",
    )


def normative_table(tmp_path: Path) -> NormativeTable:
    """:data:`NORMATIVE_CSV` written to a file and loaded as the node does."""
    path = tmp_path / "normative.csv"
    path.write_text(NORMATIVE_CSV, encoding="utf-8")
    return NormativeTable.load(path)


def report_with(**changes: object) -> ReportInput:
    """:func:`tests.support.sr.make_report` with the volume and prior fields given."""
    return dataclasses.replace(make_report(), **changes)  # type: ignore[arg-type]
