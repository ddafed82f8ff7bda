"""Read the result out of an SR's content tree, by its codes, never by searching the text.

Every SR names the three classes (AD, MCI, CN) in its series description and in
the probabilities, so "the predicted class appears in the dump" holds for any
class.  The class the node concluded is the coded value of the one
``(121073, DCM, "Impression")`` CODE item; the codes are spelled out here, as
published, independently of :mod:`structured_reports.concepts`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydicom import Dataset, dcmread

#: (CodeValue, CodingSchemeDesignator) of the concept name of the conclusion.
IMPRESSION = ("121073", "DCM")
#: (121071, DCM, "Finding"): the class a probability belongs to (a modifier of each NUM).
FINDING = ("121071", "DCM")
#: The coded value of each class: SNOMED CT for AD and MCI, the node's own scheme for CN.
CLASS_OF_CODE = {("26929004", "SCT"): "AD", ("386805003", "SCT"): "MCI", ("CN", "99ADNODE"): "CN"}


def _items(sequence: object) -> Iterator[Dataset]:
    for item in sequence or []:  # type: ignore[attr-defined]
        yield item
        yield from _items(item.get("ContentSequence"))


def _code(item: Dataset, keyword: str) -> tuple[str, str] | None:
    codes = item.get(keyword)
    if not codes:
        return None
    return str(codes[0].CodeValue), str(codes[0].CodingSchemeDesignator)


def coded_items(sr: Dataset | Path, name: tuple[str, str]) -> list[tuple[str, str]]:
    """Coded values of every CODE content item of *sr* whose concept name is *name*."""
    ds = sr if isinstance(sr, Dataset) else dcmread(sr)
    return [value for item in _items(ds.get("ContentSequence"))
            if item.get("ValueType") == "CODE" and _code(item, "ConceptNameCodeSequence") == name
            and (value := _code(item, "ConceptCodeSequence")) is not None]


def impression_class(sr: Dataset | Path) -> str:
    """The class of the SR's one coded Impression (``"AD"``, ``"MCI"`` or ``"CN"``).

    Raises
    ------
    AssertionError
        When there is not exactly one Impression, or its code is none of the classes.
    """
    impressions = coded_items(sr, IMPRESSION)
    assert len(impressions) == 1, f"expected one coded Impression, found {impressions}"
    assert impressions[0] in CLASS_OF_CODE, f"the Impression {impressions[0]} is none of the classes"
    return CLASS_OF_CODE[impressions[0]]
