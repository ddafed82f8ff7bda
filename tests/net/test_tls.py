"""DICOM TLS with DCMTK peers: storescu/echoscu against the node, the node against a TLS storescp."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from dicom_node.cli.localpacs import free_port, wait_for
from dicom_node.db.models import AssociationLog, Instance
from dicom_node.net.scu import SendResult, echo, send_file
from dicom_node.statuses import FailureClass
from tests.conftest import require_tool
from tests.support.edge import echoscu, edge_server, mr_series, no_patient_data_in_logs, storescu
from tests.support.tls import pki, tls_args, tls_settings

__all__ = ["no_patient_data_in_logs", "pki"]  # the autouse log check applies here too; the test PKI


def test_dcmtk_clients_over_tls_and_refusals(tmp_path: Path, pki: Path) -> None:
    files = mr_series(tmp_path / "s", 6, 3)
    with edge_server(tls_settings(tmp_path, pki)) as server:
        assert echoscu(server.port, extra=tls_args(pki, "scanner")) == 0
        result = storescu(server.port, files, extra=tls_args(pki, "scanner"))
        assert result.returncode == 0 and result.stderr.count("Received Store Response (Success)") == 3, result.stderr
        assert echoscu(server.port, extra=tls_args(pki, "expired")) != 0     # expired client certificate
        assert echoscu(server.port, extra=tls_args(pki, "stranger")) != 0    # certificate of an unknown CA
        assert echoscu(server.port) != 0                                      # no TLS at all
        assert echoscu(server.port, calling="STRANGER", extra=tls_args(pki, "scanner")) != 0  # TLS, unknown AE
        logged = wait_for(lambda: (rows := _log(server)) and len([r for r in rows if r.ended_at]) == 3 and rows,
                          20, "the association log")
        with server.recorder.sessions() as session:
            assert len(session.scalars(select(Instance)).all()) == 3
    assert [(r.tls, r.outcome) for r in logged] == [(True, "released"), (True, "released"), (True, "rejected")]


def _log(server):
    with server.recorder.sessions() as session:
        return list(session.scalars(select(AssociationLog).order_by(AssociationLog.id)).all())


def test_node_sends_to_a_tls_storescp(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen([require_tool("storescp"), "+tls", str(pki / "scanner.key"), str(pki / "scanner.pem"),
                             "+cf", str(pki / "ca.pem"), "-od", str(out), "-aet", "TLSPACS", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        settings = tls_settings(tmp_path, pki, destinations=[
            {"name": "tlspacs", "ae_title": "TLSPACS", "host": "127.0.0.1", "port": port, "tls": True},
            {"name": "plain", "ae_title": "TLSPACS", "host": "127.0.0.1", "port": port, "tls": False}])
        result = wait_for(lambda: (r := echo(settings.destination("tlspacs"), settings)).status == 0 and r,
                          20, "C-ECHO over TLS")
        assert isinstance(result, SendResult)
        assert result.failure is None
        [path] = mr_series(tmp_path / "s", 7, 3)[:1]
        sent = send_file(path, settings.destination("tlspacs"), settings)
        assert sent.status == 0 and sent.ok, sent.error
        assert [dcmread(f).SOPInstanceUID for f in out.iterdir()] == [dcmread(path).SOPInstanceUID]
        plain = send_file(path, settings.destination("plain"), settings)
        assert not plain.ok and plain.failure in (FailureClass.ABORTED, FailureClass.TIMEOUT)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
