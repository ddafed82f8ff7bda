"""DICOM TLS with DCMTK peers: storescu/echoscu against the node, the node against a TLS storescp."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.cli.localpacs import free_port, wait_for
from dicom_node.db.models import AssociationLog, Instance
from dicom_node.net.scu import echo, send_file
from dicom_node.statuses import FailureClass
from tests.conftest import make_settings, require_tool
from tests.test_edge_ingest import echoscu, edge_server, mr_series, no_patient_data_in_logs, storescu

__all__ = ["no_patient_data_in_logs"]  # the autouse log check applies here too

CA_CONFIG = """[ca]
default_ca = ca_default
[ca_default]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = policy_any
copy_extensions = copy
[policy_any]
commonName = supplied
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _cert(d: Path, name: str, ca: str, *, expired: bool = False) -> None:
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", "-addext", san, cwd=d)
    if expired:
        _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key", "-in",
                 f"{name}.csr", "-out", f"{name}.pem", "-startdate", "20200101000000Z", "-enddate",
                 "20200201000000Z", "-notext", cwd=d)
    else:
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-copy_extensions", "copy", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA with server, client and expired client certificates, and an untrusted CA's client."""
    d = tmp_path_factory.mktemp("pki")
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(CA_CONFIG.format(dir=d))
    _ca(d, "ca")
    _ca(d, "rogue")
    _cert(d, "node", "ca")
    _cert(d, "scanner", "ca")
    _cert(d, "expired", "ca", expired=True)
    _cert(d, "stranger", "rogue")
    return d


def tls_settings(tmp_path: Path, pki: Path, **extra: object):
    return make_settings(tmp_path, **{
        "network.tls.enabled": True, "network.tls.certificate": str(pki / "node.pem"),
        "network.tls.private_key": str(pki / "node.key"), "network.tls.ca_certificates": str(pki / "ca.pem"),
        "network.tls.require_client_certificate": True, **extra})


def tls_args(pki: Path, who: str) -> tuple[str, ...]:
    return ("+tls", str(pki / f"{who}.key"), str(pki / f"{who}.pem"), "+cf", str(pki / "ca.pem"))


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
