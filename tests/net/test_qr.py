"""The prior-study Q/R SCU against a real Orthanc (and pynetdicom peers for what Orthanc does not do).

Orthanc holds one patient's history (tests/support/qr.py): the query must find
the priors and not the current, later, too old or other-issuer studies; C-MOVE
to a Storage SCP on the node's AE title and C-GET into a callback must bring
every instance of the series; refusals, a closed port and silent peers must
end quickly in a named error category.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt

from core.errors import ConfigError, NodeError
from dicom_node.cli.localpacs import LocalOrthanc, free_port, wait_for
from dicom_node.net.qr import FIND, MOVE, PriorStudyClient, prior_pacs
from dicom_node.net.qrtypes import PriorFailure, PriorStudyError, QRStatus
from dicom_node.settings import Settings
from tests.conftest import make_settings
from tests.support.qr import (
    NODE_AE,
    PID_A,
    PID_B,
    STUDIES,
    QRPacs,
    no_patient_data_in_qr_logs,
    qr_pacs,
    storage_scp,
)
from tests.support.sr import make_mr_series

__all__ = ["no_patient_data_in_qr_logs", "qr_pacs"]  # the autouse log check and the module's Orthanc

CURRENT = STUDIES["current"]
CURRENT_DATE = datetime.date(2025, 3, 10)


def qr_settings(tmp_path: Path, port: int, ae_title: str = "PACS", **overrides: object) -> Settings:
    """Settings whose prior.pacs is *ae_title* on 127.0.0.1:*port*, with short timeouts."""
    values: dict[str, object] = {
        "prior.enabled": True, "prior.pacs.ae_title": ae_title, "prior.pacs.host": "127.0.0.1",
        "prior.pacs.port": port, "prior.acse_timeout_s": 5, "prior.dimse_timeout_s": 10,
        "prior.network_timeout_s": 10}
    values.update(overrides)
    return make_settings(tmp_path, **values)


def client(tmp_path: Path, pacs: QRPacs, **overrides: object) -> PriorStudyClient:
    return PriorStudyClient(qr_settings(tmp_path, pacs.orthanc.dicom_port, pacs.orthanc.ae_title, **overrides))


def find_a(qr: PriorStudyClient, issuer: str | None = "HOSP_A") -> list[str]:
    studies = qr.find_prior_studies(PID_A, issuer, CURRENT_DATE, CURRENT.study_instance_uid)
    return [s.study_instance_uid for s in studies]


# ----- C-FIND ----------------------------------------------------------------------------------------------------
def test_find_returns_the_priors_newest_first_without_the_current_study(tmp_path: Path, qr_pacs: QRPacs) -> None:
    qr = client(tmp_path, qr_pacs)
    studies = qr.find_prior_studies(PID_A, "HOSP_A", CURRENT_DATE, CURRENT.study_instance_uid)
    assert [s.study_instance_uid for s in studies] == [STUDIES["prior_t2_only"].study_instance_uid,
                                                       STUDIES["prior"].study_instance_uid]
    assert [s.study_date for s in studies] == [datetime.date(2024, 2, 1), datetime.date(2023, 1, 15)]
    assert studies[1].accession_number == STUDIES["prior"].accession_number
    assert studies[1].modalities == ("MR",)


def test_find_matches_the_issuer_and_the_age_limit(tmp_path: Path, qr_pacs: QRPacs) -> None:
    uid = {key: header.study_instance_uid for key, header in STUDIES.items()}
    # Without the issuer, the same PatientID of another issuer matches too.
    assert find_a(client(tmp_path, qr_pacs), None) == [uid["prior_t2_only"], uid["prior"], uid["other_issuer"]]
    # 12 years back reaches the 2014 study; 1 year back none.
    assert find_a(client(tmp_path, qr_pacs, **{"prior.max_age_years": 12})) == [
        uid["prior_t2_only"], uid["prior"], uid["ancient"]]
    assert find_a(client(tmp_path, qr_pacs, **{"prior.max_age_years": 1})) == []


def test_series_level_rules_rank_the_t1_series(tmp_path: Path, qr_pacs: QRPacs) -> None:
    qr = client(tmp_path, qr_pacs)
    t1, t2 = qr_pacs.series["prior"]
    matches = qr.find_t1_series(STUDIES["prior"].study_instance_uid)
    assert [m.series_instance_uid for m in matches] == [t1.series_uid]  # the T2 fails the description rule
    assert matches[0].description == t1.description
    assert matches[0].instances == len(t1.sop_uids)
    assert matches[0].score > 0
    assert t2.series_uid not in {m.series_instance_uid for m in matches}
    assert qr.find_t1_series(STUDIES["prior_t2_only"].study_instance_uid) == []


def test_find_prior_takes_the_newest_prior_with_a_t1_series(tmp_path: Path, qr_pacs: QRPacs) -> None:
    candidate = client(tmp_path, qr_pacs).find_prior(PID_A, "HOSP_A", CURRENT_DATE, CURRENT.study_instance_uid)
    assert candidate.study.study_instance_uid == STUDIES["prior"].study_instance_uid
    assert [s.series_instance_uid for s in candidate.series] == [qr_pacs.series["prior"][0].series_uid]


def test_a_patient_with_a_single_study_has_no_prior(tmp_path: Path, qr_pacs: QRPacs) -> None:
    qr = client(tmp_path, qr_pacs)
    single = STUDIES["single"]
    assert qr.find_prior_studies(PID_B, "HOSP_A", CURRENT_DATE, single.study_instance_uid) == []
    with pytest.raises(PriorStudyError, match=r"^no prior: 0 prior studies") as caught:
        qr.find_prior(PID_B, "HOSP_A", CURRENT_DATE, single.study_instance_uid)
    assert caught.value.category is PriorFailure.NO_PRIOR


def test_more_matches_than_the_bound_is_refused(tmp_path: Path, qr_pacs: QRPacs) -> None:
    qr = client(tmp_path, qr_pacs, **{"prior.max_matches": 1})
    with pytest.raises(PriorStudyError, match=r"^query too broad: more than prior.max_matches = 1 STUDY") as caught:
        find_a(qr)
    assert caught.value.category is PriorFailure.QUERY_TOO_BROAD


# ----- C-MOVE and C-GET ------------------------------------------------------------------------------------------
def test_c_move_sends_every_instance_to_the_node_ae(tmp_path: Path, qr_pacs: QRPacs) -> None:
    t1 = qr_pacs.series["prior"][0]
    with storage_scp(qr_pacs.node_port) as received:
        result = client(tmp_path, qr_pacs, **{"prior.retrieve": "move"}).retrieve_series(t1.study_uid, t1.series_uid)
        # The C-MOVE's final response follows the last sub-operation's C-STORE response.
        assert {str(ds.SOPInstanceUID) for ds in received} == t1.sop_uids
    assert (result.method, result.status, result.completed, result.failed, result.warning) == (
        "move", QRStatus.SUCCESS, len(t1.sop_uids), 0, 0)
    assert str(result) == f"C-MOVE Success (0x0000): {len(t1.sop_uids)} completed, 0 failed, 0 warning sub-operations"


def test_c_get_hands_every_instance_to_the_callback(tmp_path: Path, qr_pacs: QRPacs) -> None:
    t1 = qr_pacs.series["prior"][0]
    stored: list[Dataset] = []
    qr = client(tmp_path, qr_pacs, **{"prior.retrieve": "get"})
    result = qr.retrieve_series(t1.study_uid, t1.series_uid, stored.append)
    assert {str(ds.SOPInstanceUID) for ds in stored} == t1.sop_uids
    assert all("PixelData" in ds and ds.file_meta.TransferSyntaxUID for ds in stored)
    assert (result.method, result.status, result.completed, result.failed, result.received) == (
        "get", QRStatus.SUCCESS, len(t1.sop_uids), 0, len(t1.sop_uids))
    with pytest.raises(NodeError, match="needs a store callback"):
        qr.retrieve_series(t1.study_uid, t1.series_uid)


def test_c_get_sub_operations_refused_by_the_callback_make_the_prior_not_retrievable(
        tmp_path: Path, qr_pacs: QRPacs) -> None:
    t1 = qr_pacs.series["prior"][0]

    def full(ds: Dataset) -> None:
        raise NodeError("spool full")

    with pytest.raises(PriorStudyError, match=rf"^prior not retrievable: C-GET .*0 completed, "
                                              rf"{len(t1.sop_uids)} failed") as caught:
        client(tmp_path, qr_pacs).get_series(t1.study_uid, t1.series_uid, full)
    assert caught.value.result is not None and caught.value.result.failed == len(t1.sop_uids)


def test_orthanc_refuses_a_move_to_an_ae_it_does_not_know(tmp_path: Path, qr_pacs: QRPacs) -> None:
    # Orthanc 1.10 answers an unknown move destination with 0xC000 (Unable to Process), not 0xA801.
    t1 = qr_pacs.series["prior"][0]
    qr = client(tmp_path, qr_pacs, **{"prior.move_destination": "NOBODY"})
    with pytest.raises(PriorStudyError, match=r"^prior not retrievable: C-MOVE Unable to Process \(0xC000\): "
                                              r"0 completed.*is the C-MOVE destination known"):
        qr.move_series(t1.study_uid, t1.series_uid)


@contextmanager
def qr_scp(port: int, on_find: Any = None, on_move: Any = None) -> Iterator[None]:
    """A pynetdicom Q/R SCP (AE ``QRSCP``) with the given C-FIND / C-MOVE handlers."""
    ae = AE(ae_title="QRSCP")
    ae.add_supported_context(FIND)
    ae.add_supported_context(MOVE)
    ae.requested_contexts = StoragePresentationContexts  # C-MOVE sub-operations
    handlers: list[Any] = [(event, handler) for event, handler in ((evt.EVT_C_FIND, on_find), (evt.EVT_C_MOVE, on_move))
                if handler is not None]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        yield
    finally:
        server.shutdown()


def test_move_destination_unknown_is_a_refusal_by_name(tmp_path: Path) -> None:
    def on_move(event: Any) -> Iterator[Any]:
        yield None, None  # pynetdicom answers 0xA801 for a destination it cannot resolve

    port = free_port()
    with qr_scp(port, on_move=on_move):
        qr = PriorStudyClient(qr_settings(tmp_path, port, "QRSCP"))
        with pytest.raises(PriorStudyError, match=r"^PACS refused: C-MOVE Move destination unknown "
                                                  rf"\(0xA801\).*does not know the AE title {NODE_AE}") as caught:
            qr.move_series("1.2.3", "1.2.3.4")
    assert caught.value.category is PriorFailure.PACS_REFUSED
    assert caught.value.result is not None and caught.value.result.status == QRStatus.MOVE_DESTINATION_UNKNOWN


def test_a_retrieve_past_its_deadline_is_cancelled(tmp_path: Path) -> None:
    instances = make_mr_series(3)
    scp_port, qr_port = free_port(), free_port()

    def on_move(event: Any) -> Iterator[Any]:
        yield "127.0.0.1", scp_port
        yield len(instances)
        yield 0xFF00, instances[0]
        # The client sends C-CANCEL on the first Pending response (its deadline has passed): wait for it.
        wait_for(lambda: event.is_cancelled, 10, "the C-CANCEL", 0.01)
        yield 0xFE00, None

    with storage_scp(scp_port) as received, qr_scp(qr_port, on_move=on_move):
        qr = PriorStudyClient(qr_settings(tmp_path, qr_port, "QRSCP", **{"prior.retrieve_timeout_s": 0.001}))
        with pytest.raises(PriorStudyError, match=r"^prior not retrievable: C-MOVE Cancel \(0xFE00\): 1 completed, "
                                                  r"0 failed.*cancelled after prior.retrieve_timeout_s = 0.001"):
            qr.move_series("1.2.3", "1.2.3.4")
    assert [str(ds.SOPInstanceUID) for ds in received] == [str(instances[0].SOPInstanceUID)]


# ----- refusals and silence --------------------------------------------------------------------------------------
def test_orthanc_that_does_not_know_the_node_refuses(tmp_path: Path, orthanc: LocalOrthanc) -> None:
    qr = PriorStudyClient(qr_settings(tmp_path, orthanc.dicom_port, orthanc.ae_title))
    started = time.monotonic()
    with pytest.raises(PriorStudyError, match=r"^PACS refused: PACS ended the association instead of answering the "
                                              r"C-FIND"):
        find_a(qr)
    with pytest.raises(PriorStudyError, match=r"^PACS refused: .*C-GET"):
        qr.get_series("1.2.3", "1.2.3.4", lambda ds: None)
    assert time.monotonic() - started < 5


def test_rejected_association_is_a_refusal(tmp_path: Path, qr_pacs: QRPacs) -> None:
    qr = client(tmp_path, qr_pacs, **{"prior.pacs.ae_title": "NOT_ORTHANC"})  # DicomCheckCalledAet
    with pytest.raises(PriorStudyError, match=r"^PACS refused: NOT_ORTHANC@127.0.0.1:\d+ rejected the association"):
        find_a(qr)


def test_closed_port_is_unreachable_at_once(tmp_path: Path) -> None:
    qr = PriorStudyClient(qr_settings(tmp_path, free_port()))
    started = time.monotonic()
    with pytest.raises(PriorStudyError, match=r"^PACS unreachable: connection to PACS@127.0.0.1:\d+ refused"):
        find_a(qr)
    assert time.monotonic() - started < 3


def test_peer_that_never_answers_the_association_times_out(tmp_path: Path) -> None:
    with socket.socket() as silent:  # the kernel accepts the connection; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        qr = PriorStudyClient(qr_settings(tmp_path, silent.getsockname()[1], "PACS", **{"prior.acse_timeout_s": 1}))
        started = time.monotonic()
        with pytest.raises(PriorStudyError, match=r"^PACS unreachable: no association response .* = 1$"):
            find_a(qr)
    assert 0.9 < time.monotonic() - started < 5


def test_peer_that_never_answers_the_query_times_out(tmp_path: Path) -> None:
    release = threading.Event()

    def on_find(event: Any) -> Iterator[Any]:
        release.wait(30)
        yield 0x0000, None

    port = free_port()
    with qr_scp(port, on_find=on_find):
        qr = PriorStudyClient(qr_settings(tmp_path, port, "QRSCP", **{"prior.dimse_timeout_s": 1}))
        started = time.monotonic()
        try:
            with pytest.raises(PriorStudyError, match=r"^PACS unreachable: no C-FIND response within "
                                                      r"prior.dimse_timeout_s = 1$"):
                find_a(qr)
        finally:
            release.set()
    assert time.monotonic() - started < 5


# ----- settings --------------------------------------------------------------------------------------------------
def test_prior_pacs_by_destination_name(tmp_path: Path) -> None:
    dest = {"name": "main", "ae_title": "MAIN_PACS", "host": "10.0.0.5", "port": 104}
    settings = make_settings(tmp_path, destinations=[dest], **{"prior.enabled": True, "prior.pacs.destination": "main"})
    assert (prior_pacs(settings).ae_title, prior_pacs(settings).port) == ("MAIN_PACS", 104)
    wrong = make_settings(tmp_path, **{"prior.enabled": True, "prior.pacs.destination": "main"})
    with pytest.raises(ConfigError, match="unknown destination 'main'"):
        PriorStudyClient(wrong)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"prior.enabled": True}, "prior.enabled needs prior.pacs"),
    ({"prior.pacs.destination": "main", "prior.pacs.ae_title": "X"}, "either destination or ae_title"),
    ({"prior.pacs.ae_title": "X", "prior.pacs.host": "h"}, "ae_title, host and port go together"),
    ({"prior.retrieve": "store"}, "prior.retrieve"),
    ({"prior.max_matches": 0}, "prior.max_matches"),
])
def test_invalid_prior_settings_are_refused(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_settings(tmp_path, **overrides)
