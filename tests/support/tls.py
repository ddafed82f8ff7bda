"""A throwaway PKI for the DICOM TLS tests, and the node's and DCMTK's TLS options that use it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_settings

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
