"""Header-only series candidates for the series selection tests (pipeline.select)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import MRImageStorage

from core.errors import Outcome
from pipeline.select import NoSuitableSeries, SelectionRules, SeriesCandidate, SeriesDecision, load_rules, select_series

#: Images of a candidate series (the shipped rules want at least 100).
SLICES = 120


def t1_header(**change: object) -> Dataset:
    """A 3D T1 MPRAGE header that passes every requirement and matches every score rule."""
    ds = Dataset()
    ds.Modality = "MR"
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
    ds.MRAcquisitionType = "3D"
    ds.ScanningSequence = ["GR", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.SequenceName = "*tfl3d1_16ns"
    ds.EchoTime = 2.98
    ds.InversionTime = 900.0
    ds.SeriesDescription = "t1_mprage_sag_p2_iso"
    ds.ProtocolName = "t1_mprage_sag_p2_iso"
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [1.0, 1.0]
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.SeriesNumber = 3
    with warnings.catch_warnings():  # lower-case code strings are not conformant, and some scanners send them
        warnings.filterwarnings("ignore", "Invalid value for VR CS", UserWarning)
        for keyword, value in change.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return ds


def candidate(uid: str = "1.2.3.3", slices: int = SLICES, **change: object) -> SeriesCandidate:
    """A series of *slices* copies of :func:`t1_header` (changed by *change*)."""
    header = t1_header(**change)
    return SeriesCandidate(uid, [header] * slices)


def decide(rules: SelectionRules, cand: SeriesCandidate) -> SeriesDecision:
    """The decision on a single candidate, chosen or not."""
    try:
        return select_series([cand], rules).decisions[0]
    except NoSuitableSeries as refused:
        assert refused.outcome is Outcome.NO_SUITABLE_SERIES
        return refused.decisions[0]


def winner(rules: SelectionRules, candidates: Sequence[SeriesCandidate]) -> tuple[str, list[SeriesDecision]]:
    """The chosen series' UID and every decision."""
    selection = select_series(candidates, rules)
    return selection.chosen.series_instance_uid, selection.decisions




def custom_rules(tmp_path: Path, text: str) -> SelectionRules:
    """Rules read from *text* (TOML) written under *tmp_path*."""
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return load_rules(path)
