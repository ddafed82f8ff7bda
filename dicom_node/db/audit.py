"""Audit queries: what administrators read about runs (``dicom-node runs show``, the demo's summary)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from core.errors import NodeError
from dicom_node.db.models import Delivery, Run
from dicom_node.settings import Settings

STAGES = ("created_at", "started_at", "selected_at", "converted_at", "preprocessed_at", "notes_joined_at",
          "inferred_at", "report_built_at", "finished_at")


def run_record(settings: Settings, run_id: str) -> dict[str, Any]:
    """The audit record of one run as a JSON-friendly dict."""
    from dicom_node.db.session import open_database

    db = open_database(settings.database_url, migrate=False)
    with db.sessions() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise NodeError(f"no run {run_id}")
        deliveries = session.scalars(select(Delivery).where(Delivery.run_id == run_id)).all()
        return {
            "run": run.id,
            "state": run.state,
            "outcome": run.outcome,
            "reason": run.error_reason,
            "error_stage": run.error_stage,
            "error_traceback": run.error_traceback,
            "stages": {name: fmt_value(getattr(run, name)) for name in STAGES},
            "stage_seconds": run.stage_seconds,
            "series_instance_uid": run.series_instance_uid,
            "series_selection": run.selection,
            "input_sha256": run.input_sha256,
            "quality_control": run.qc,
            "notes_used": run.notes_used,
            "model": {"name": run.model_name, "version": run.model_version, "weights_sha256": run.model_weights_sha256},
            "probabilities": {"AD": run.prob_ad, "MCI": run.prob_mci, "CN": run.prob_cn},
            "predicted_class": run.predicted_class,
            "used_note": run.used_note,
            "report_sop_instance_uid": run.report_sop_instance_uid,
            "pdf_sop_instance_uid": run.pdf_sop_instance_uid,
            "validation": run.validation_messages,
            "deliveries": [
                {"destination": d.destination, "object": d.object_kind, "state": d.state, "attempts": d.attempts,
                 "last_status": None if d.last_status is None else f"0x{d.last_status:04X}",
                 "last_error": d.last_error, "sent_at": fmt_value(d.sent_at)}
                for d in deliveries
            ],
        }


def fmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "isoformat"):
        return str(value.isoformat(timespec="seconds"))
    return str(value)

