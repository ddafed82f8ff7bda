"""Rows of a small audited history, for the HTTP side's tests (no patient of the other tests)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import AssociationLog, Delivery, Instance, Rejection, Run, Series, Study, utcnow

PATIENT_ID = "OPS-PID-0815"
RUN_OK = "a1b2c3d4-0000-4000-8000-000000000001"
RUN_NA = "a1b2ffff-0000-4000-8000-000000000002"
RUN_QUEUED = "c0ffee00-0000-4000-8000-000000000003"
STUDY_UID = "1.2.826.0.1.3680043.10.1389.42.1"


def seed(sessions: sessionmaker[Session]) -> None:
    """Two studies, three runs (succeeded, not analysed, queued), deliveries (sent, dead), logs."""
    now = utcnow()
    with sessions.begin() as s:
        study = Study(study_instance_uid=STUDY_UID, patient_id=PATIENT_ID, accession_number="ACC-OPS-1",
                      first_received_at=now, last_received_at=now)
        other = Study(study_instance_uid="1.2.826.0.1.3680043.10.1389.42.2", patient_id="OPS-PID-0816",
                      accession_number="ACC-OPS-2", first_received_at=now, last_received_at=now)
        s.add_all([study, other])
        s.flush()
        series = Series(series_instance_uid=STUDY_UID + ".3", study_id=study.id, first_received_at=now,
                        last_received_at=now)
        s.add(series)
        s.flush()
        for n in range(3):
            s.add(Instance(sop_instance_uid=f"{STUDY_UID}.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                           series_id=series.id, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae_title="SCANNER",
                           peer_address="127.0.0.1", spool_path="/x", size_bytes=1, sha256="0" * 64, received_at=now))
        s.add(Rejection(received_at=now, calling_ae_title="SCANNER", peer_address="127.0.0.1", status=0x0122,
                        reason="not MR"))
        s.add_all([
            AssociationLog(calling_ae_title="SCANNER", called_ae_title="AD_NODE", peer_address="127.0.0.1",
                           started_at=now, ended_at=now, instances_stored=3, instances_refused=1, outcome="released"),
            AssociationLog(calling_ae_title="SCANNER", called_ae_title="AD_NODE", peer_address="127.0.0.1",
                           started_at=now, ended_at=now, outcome="aborted", reason="peer aborted"),
        ])
        s.add(Run(id=RUN_OK, study_id=study.id, state="succeeded", outcome="analysed", created_at=now - timedelta(
            minutes=5), started_at=now - timedelta(minutes=5), finished_at=now - timedelta(minutes=4),
            stage_seconds={"selected": 0.2, "converted": 3.0, "preprocessed": 40.0},
            selection=[{"series_instance_uid": STUDY_UID + ".3", "description": "t1_mprage_sag", "modality": "MR",
                        "score": 7, "accepted": True, "reasons": ["+2 T1 protocol name"]}],
            qc={"template_correlation": 0.65}, notes_used=[{"id": "N-17", "date": "2026-10-01", "type": "memory"}],
            model_name="brain-adapter-demo", model_version="0.1", model_weights_sha256="ab" * 32,
            prob_ad=0.2, prob_mci=0.3, prob_cn=0.5, predicted_class="CN"))
        s.add(Run(id=RUN_NA, study_id=other.id, state="not_analysed", outcome="no_suitable_series",
                  created_at=now - timedelta(minutes=3), started_at=now - timedelta(minutes=3),
                  finished_at=now - timedelta(minutes=3), stage_seconds={"selected": 0.1}))
        s.add(Run(id=RUN_QUEUED, study_id=other.id, state="queued", created_at=now - timedelta(seconds=90)))
        s.flush()
        s.add_all([
            Delivery(run_id=RUN_OK, destination="pacs", sop_instance_uid="1.2.3.1", object_path="/x/sr.dcm",
                     state="sent", attempts=1, last_status=0, created_at=now, next_attempt_at=now, sent_at=now,
                     last_attempt_at=now, object_kind="sr",
                     history=[{"at": "t", "attempt": 1, "status": "0x0000", "class": None, "error": None}]),
            Delivery(run_id=RUN_OK, destination="pacs", sop_instance_uid="1.2.3.2", object_path="/x/pdf.dcm",
                     state="dead", attempts=8, last_status=0xA700, last_error="C-STORE status 0xA700",
                     failure_class="out_of_resources", created_at=now, next_attempt_at=now,
                     last_attempt_at=now - timedelta(minutes=1), object_kind="pdf"),
        ])
