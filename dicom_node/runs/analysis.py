"""Analysis steps a run applies to a series, shared by the study's own series and a retrieved prior.

:func:`notes_for` joins the clinical notes of a study; :func:`measure` runs the
volumetry (:mod:`pipeline.volumetry`) on a preprocessed series and turns every
failure into a sentence for the report (the run itself goes on: a study without
volumes still gets its classification); :func:`volumes_record` and
:func:`volumes_from_record` are the run's ``volumes`` column, which a later run
reuses when this study is its prior (:func:`same_method` says whether it may).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import date
from typing import Any

from core.errors import NodeError, NotAnalysed, audit_traceback
from dicom_node.db.notes import NodeNotes
from dicom_node.runs.context import RunContext
from pipeline.notes import ClinicalNote, choose_notes
from pipeline.preprocess import Preprocessed
from pipeline.volumetry import Volumes, VolumetryConfig, measure_volumes

logger = logging.getLogger(__name__)

_VOLUME_FIELDS = ("hippocampus_left_ml", "hippocampus_right_ml", "lateral_ventricles_ml", "grey_matter_ml",
                  "white_matter_ml", "intracranial_ml")


def notes_for(ctx: RunContext, patient_id: str | None, issuer: str | None, study_date: date | None,
              accession_number: str | None) -> list[ClinicalNote]:
    """The clinical notes of a study (``processing.note_window_days`` before *study_date*), best first."""
    if not patient_id:
        return []
    source = ctx.notes or NodeNotes(ctx.sessions)  # the notes store reads in its own short session
    return choose_notes(
        source.for_patient(patient_id),
        patient_id=patient_id,
        issuer=issuer,
        study_date=study_date or date.today(),
        accession_number=accession_number,
        window_days=ctx.settings.processing.note_window_days,
    )


def measure(ctx: RunContext, run_id: str, pre: Preprocessed, what: str = "study") -> tuple[Volumes | None, str]:
    """The volumes of a preprocessed series and ``""``, or None and why there are none.

    Parameters
    ----------
    ctx : RunContext
        ``ctx.volumetry`` is the method (None: volumetry off, ``(None, "")``).
    run_id : str
        For the log.
    pre : Preprocessed
        The series, preprocessed with an affine registration.
    what : str
        ``"study"`` or ``"prior study"``, for the log.

    Returns
    -------
    tuple of (Volumes or None, str)
        The volumes and ``""``; or None and the reason in plain words (a refusal's reason, or that volumetry
        failed: the log keeps the traceback, without patient data); ``(None, "")`` when volumetry is off.
    """
    if ctx.volumetry is None:
        return None, ""
    try:
        return measure_volumes(pre, ctx.volumetry, ctx.preprocess_config.template_path), ""
    except NotAnalysed as exc:
        logger.warning("run %s: volumes of the %s not measured (%s)", run_id, what, exc.outcome.value)
        return None, f"volumes not measured: {exc.reason}"
    except NodeError as exc:  # ours: its message has no patient data
        logger.warning("run %s: volumetry of the %s failed: %s", run_id, what, exc)
        return None, f"volumes not measured: volumetry could not be done ({exc})"
    except Exception as exc:  # noqa: BLE001 - a bug in volumetry must not cost the study its classification
        logger.error("run %s: volumetry of the %s failed (%s):\n%s", run_id, what, type(exc).__name__,
                     audit_traceback(exc))
        return None, f"volumes not measured: volumetry failed ({type(exc).__name__}; see the node's log)"


def volumes_record(volumes: Volumes, config: VolumetryConfig) -> dict[str, Any]:
    """The run's ``volumes`` column: millilitres, method, QC and the method's settings."""
    return {
        **{name: float(getattr(volumes, name)) for name in _VOLUME_FIELDS},
        "algorithm": volumes.algorithm,
        "qc": {key: float(value) for key, value in volumes.qc.items()},
        "method": _method(config),
    }


def volumes_from_record(record: dict[str, Any]) -> Volumes:
    """:class:`Volumes` back from a run's ``volumes`` column.

    Raises
    ------
    NodeError
        The record lacks a volume (written by another version).
    """
    try:
        return Volumes(**{name: float(record[name]) for name in _VOLUME_FIELDS}, algorithm=str(record["algorithm"]),
                       qc={str(k): float(v) for k, v in (record.get("qc") or {}).items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise NodeError(f"stored volumes unreadable ({type(exc).__name__})") from exc


def same_method(record: dict[str, Any], config: VolumetryConfig) -> bool:
    """True when stored volumes were measured with *config*'s method (so they compare with volumes measured now)."""
    from pipeline.volumetry import algorithm_name

    return record.get("method") == _method(config) and record.get("algorithm") == algorithm_name()


def _method(config: VolumetryConfig) -> dict[str, Any]:
    """The settings that change a volume, as JSON (paths left out: the atlas is named by the algorithm)."""
    values = asdict(config)
    values.pop("atlas_dir", None)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
