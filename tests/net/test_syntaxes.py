"""Compressed and deflated transfer syntaxes: accepted by the node and decoded by the pipeline."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.db.models import Instance
from dicom_node.net.requestor import associate
from dicom_node.statuses import StoreStatus
from pipeline.convert import convert_series
from tests.conftest import make_settings, require_tool
from tests.support.edge import edge_server, mr_series, no_patient_data_in_logs

__all__ = ["no_patient_data_in_logs"]


def _htj2k(path: Path, syntax: UID, target: Path) -> None:
    """Encode one single-frame unsigned 16-bit instance with OpenJPH's ``ojph_compress`` (reversible)."""
    ds = dcmread(path)
    pixels = ds.pixel_array
    pgm, codestream = target.with_suffix(".pgm"), target.with_suffix(".j2c")
    pgm.write_bytes(f"P5\n{ds.Columns} {ds.Rows}\n65535\n".encode() + pixels.astype(">u2").tobytes())
    subprocess.run([require_tool("ojph_compress"), "-i", str(pgm), "-o", str(codestream), "-reversible", "true",
                    "-prog_order", "RPCL"], check=True, capture_output=True)
    ds.PixelData = encapsulate([codestream.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(target, enforce_file_format=True)


def _encode(files: list[Path], syntax: UID, out: Path) -> list[Path]:
    out.mkdir()
    written = []
    for path in files:
        target = out / path.name
        if syntax in (HTJ2KLossless, HTJ2KLosslessRPCL):  # pydicom has no HTJ2K encoder
            _htj2k(path, syntax, target)
        elif syntax in (JPEGLosslessSV1, JPEGLossless):
            flag = "+e1" if syntax == JPEGLosslessSV1 else "+el"
            subprocess.run([require_tool("dcmcjpeg"), flag, str(path), str(target)], check=True, capture_output=True)
        else:
            ds = dcmread(path)
            if syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
                ds.file_meta.TransferSyntaxUID = syntax
            else:
                ds.compress(syntax)
            ds.save_as(target, enforce_file_format=True)
        assert dcmread(target).file_meta.TransferSyntaxUID == syntax
        written.append(target)
    return written


SYNTAXES = [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless,
            JPEG2000Lossless, RLELossless, HTJ2KLossless, HTJ2KLosslessRPCL]


def test_each_lossless_syntax_is_accepted_and_decodes_in_the_pipeline(tmp_path: Path) -> None:
    original = mr_series(tmp_path / "orig", 8, 5, size=64)
    reference = cast(nib.Nifti1Image, nib.load(convert_series(original, tmp_path / "ref.nii.gz"))).get_fdata()
    with edge_server(make_settings(tmp_path)) as server:
        for n, syntax in enumerate(SYNTAXES):
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(MRImageStorage, [syntax])
            assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
            assert assoc.is_established and assoc.accepted_contexts[0].transfer_syntax[0] == syntax
            for path in _encode(original, syntax, tmp_path / f"ts{n}"):
                assert assoc.send_c_store(dcmread(path)).Status == StoreStatus.SUCCESS, syntax
            assoc.release()
            with server.recorder.sessions() as session:
                spooled = session.scalars(select(Instance.spool_path).where(
                    Instance.transfer_syntax_uid == syntax)).all()
            assert len(spooled) == 5 and dcmread(spooled[0]).file_meta.TransferSyntaxUID == syntax
            converted = convert_series([Path(p) for p in spooled], tmp_path / f"ts{n}.nii.gz")
            decoded = cast(nib.Nifti1Image, nib.load(converted)).get_fdata()
            assert np.array_equal(decoded, reference), syntax.name
            # the next syntax re-sends the same SOP instances: replace them
            with server.recorder.sessions.begin() as session:
                for row in session.scalars(select(Instance)).all():
                    session.delete(row)


@pytest.mark.parametrize("accept_lossy", [True, False])
def test_htj2k_and_lossy_syntaxes_negotiated_by_setting(tmp_path: Path, accept_lossy: bool) -> None:
    with edge_server(make_settings(tmp_path, **{"storage.accept_lossy": accept_lossy})) as server:
        ae = AE(ae_title="SCANNER")
        for syntax in (HTJ2KLossless, JPEGBaseline8Bit, ExplicitVRLittleEndian):
            ae.add_requested_context(MRImageStorage, [syntax])
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assoc.release()
    assert HTJ2KLossless in accepted and ExplicitVRLittleEndian in accepted
    assert (JPEGBaseline8Bit in accepted) is accept_lossy
